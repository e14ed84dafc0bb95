"""Test-split windows as geometry prompts (``geometry.prompts: {test_windows, length, seed}``,
tga/prompt_windows.py) and batched hidden-state capture (``geometry.batch_size``).

Tiny models (2 layers x 16 dims) and a char-tokenized corpus written here keep each test
well under a second."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tga import geometry as geo
from tga.data import tokenize_to_file
from tga.metrics import GeometryError
from tga.model import ModelConfig, Transformer, save_checkpoint
from tga.prompt_windows import (
    OverlappingWindowsWarning,
    TestWindowsError,
    read_test_windows,
    window_starts,
    window_texts,
)
from tga.seen_prompts import write_seen_prompts_table
from tga.settings import ConfigError, check_config, coerce_config_types, schema_error_message
from tga.tokenizers import CharTokenizer
from test_settings import base_config

SAMPLE_TEST = Path(__file__).resolve().parents[1] / "resources" / "wikitext-2-sample" / "test.txt"


# ------------------------------------------------------------------ drawing the windows


def test_window_starts_do_not_overlap_are_sorted_and_repeat_with_the_seed():
    starts, overlapping = window_starts(1000, 30, 20, seed=3)
    assert not overlapping and len(starts) == 30
    assert (np.diff(starts) >= 20).all() and starts[0] >= 0 and starts[-1] + 20 <= 1000
    assert np.array_equal(starts, window_starts(1000, 30, 20, seed=3)[0])
    assert not np.array_equal(starts, window_starts(1000, 30, 20, seed=4)[0])
    # exactly N * L tokens: the windows tile the split
    tiled, _ = window_starts(600, 30, 20, seed=0)
    assert tiled.tolist() == list(range(0, 600, 20))


def test_window_starts_overlap_only_when_the_split_is_short_and_refuse_a_split_too_short():
    starts, overlapping = window_starts(100, 30, 20, seed=0)  # 600 tokens asked of 100
    assert overlapping and len(set(starts.tolist())) == 30 and (np.diff(starts) > 0).all()
    assert starts.max() <= 80
    with pytest.raises(TestWindowsError, match=r"holds 100 tokens, room for 81 distinct window\(s\) of length 20, "
                                               r"fewer than test_windows=82; lower test_windows or length"):
        window_starts(100, 82, 20, seed=0)
    with pytest.raises(TestWindowsError, match="holds 10 tokens, not one window of length 20"):
        window_starts(10, 1, 20, seed=0)


def _test_split(tmp_path: Path, text: str | None = None) -> tuple[Path, CharTokenizer]:
    text = SAMPLE_TEST.read_text(encoding="utf-8") if text is None else text
    tok = CharTokenizer.from_text(text)
    (tmp_path / "test.txt").write_text(text, encoding="utf-8")
    tokenize_to_file(tmp_path / "test.txt", tok, tmp_path / "test.bin")
    return tmp_path / "test.bin", tok


def test_read_test_windows_takes_the_token_file_slices_and_records_the_split(tmp_path):
    path, tok = _test_split(tmp_path)
    windows = read_test_windows(path, test_windows=40, length=32, seed=1)
    tokens = np.fromfile(path, dtype=np.uint16)
    assert windows.starts == tuple(window_starts(tokens.size, 40, 32, 1)[0].tolist())
    assert all(list(w) == tokens[s:s + 32].tolist() for s, w in zip(windows.starts, windows.ids))
    assert windows.split_sha256 == json.loads(path.with_suffix(".json").read_text())["sha256"]
    text = SAMPLE_TEST.read_text(encoding="utf-8")
    assert window_texts(windows, tok)[0] == text[windows.starts[0]:windows.starts[0] + 32]  # char ids = chars
    with pytest.warns(OverlappingWindowsWarning, match="the windows overlap"):
        assert read_test_windows(path, test_windows=1000, length=64, seed=0).overlapping
    # a token file that no longer matches its sidecar is refused, not sampled
    path.write_bytes(path.read_bytes()[::-1])
    with pytest.raises(Exception, match="sha256"):
        read_test_windows(path, test_windows=4, length=8, seed=0)


# ------------------------------------------------------------------ the geometry on windows


def _checkpoints(tmp_path: Path, vocab: int, block_size: int = 40, position_encoding: str = "rope") -> dict:
    cfg = ModelConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                      position_encoding=position_encoding)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init.pt", Transformer(cfg), {"step": 0})
    save_checkpoint(tmp_path / "final.pt", Transformer(cfg), {"step": 5})
    return {"init": tmp_path / "init.pt", "trained": tmp_path / "final.pt"}


def test_analyze_run_on_test_windows_writes_starts_sha_texts_and_few_heatmaps(tmp_path):
    path, tok = _test_split(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    settings = {"prompts": {"test_windows": 9, "length": 24, "seed": 7}, "heatmap_layers": [0, -1],
                "exclude_first_token": "auto", "knn_k": 3, "device": "cpu", "batch_size": None}
    geo.analyze_run(_checkpoints(tmp_path, tok.vocab_size), path, tmp_path / "tokenizer.json", tmp_path / "geo",
                    settings)
    windows = read_test_windows(path, 9, 24, 7)
    table = pd.read_csv(tmp_path / "geo" / "prompts.csv", keep_default_na=False)
    assert list(table.columns) == ["prompt", "start", "n_tokens_input", "n_tokens_original", "truncated",
                                   "first_token_excluded", "split_sha256", "text"]
    assert table["start"].tolist() == list(windows.starts)
    assert set(table["split_sha256"]) == {windows.split_sha256}
    assert table["text"].tolist() == window_texts(windows, tok)
    metrics = pd.read_csv(tmp_path / "geo" / "metrics.csv")
    assert sorted(metrics.loc[metrics["prompt"] >= 0, "prompt"].unique()) == list(range(9))
    with np.load(tmp_path / "geo" / "similarity.npz") as z:
        kept = sorted({int(k.rsplit("prompt", 1)[1]) for k in z.files if "prompt" in k})
    assert kept == list(range(geo.HEATMAP_PROMPTS))
    # windows longer than the model's context: one error naming the setting
    settings["prompts"] = {"test_windows": 2, "length": 64, "seed": 0}
    with pytest.raises(GeometryError, match="windows of 64 tokens are longer than the model's block_size=40"):
        geo.analyze_run(_checkpoints(tmp_path, tok.vocab_size), path, tmp_path / "tokenizer.json",
                        tmp_path / "geo2", settings)


def test_a_prompts_file_keeps_todays_table_and_every_heatmap(tmp_path):
    """The path form is unchanged: no start / split_sha256 columns, every prompt's matrices."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i} has a few words" for i in range(10)) + "\n")
    tok = CharTokenizer.from_text(prompts.read_text())
    geo.analyze_checkpoints(_checkpoints(tmp_path, tok.vocab_size), prompts, tok, tmp_path / "geo", [0])
    assert list(pd.read_csv(tmp_path / "geo" / "prompts.csv").columns) == [
        "prompt", "n_tokens_input", "n_tokens_original", "truncated", "first_token_excluded", "text"]
    with np.load(tmp_path / "geo" / "similarity.npz") as z:
        assert "init/layer0/prompt9" in z.files and "tokens/prompt9" in z.files


# ------------------------------------------------------------------ batched capture


def _stacked(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack(model(torch.tensor([ids]), return_hidden_states=True).hidden_states)[:, 0]


@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
def test_right_padded_batches_give_each_prompts_own_hidden_states(position_encoding):
    """Right padding is exact for a causal model: each prompt's states from a padded batch
    equal its own forward's to 1e-6 (float32), for both position encodings. Left padding,
    which shifts every position, must fail the same comparison (the test can fail)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                                    position_encoding=position_encoding)).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (24, 9, 17, 9, 3)]
    with torch.inference_mode():
        batched = list(geo._hidden_states(model, prompts, 3, 4, "cpu"))
    for ids, hidden in zip(prompts, batched):
        assert hidden.shape == (4, len(ids), 16)
        torch.testing.assert_close(hidden, _stacked(model, ids), rtol=1e-6, atol=1e-6)
    left = [0] * (24 - len(prompts[1])) + prompts[1]  # the mutation: padding before the prompt
    assert not torch.allclose(_stacked(model, left)[:, -len(prompts[1]):], _stacked(model, prompts[1]), atol=1e-6)


def test_batched_analysis_gives_the_one_prompt_metrics():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randperm(40, generator=gen)[:n].tolist() for n in (20, 32, 12, 20, 25)]
    one, mats_one = geo.analyze_model(model, prompts, "s", 0, [0, -1], exclude_first_token=False)
    batched, mats_batched = geo.analyze_model(model, prompts, "s", 0, [0, -1], exclude_first_token=False,
                                              batch_size=4)
    pd.testing.assert_frame_equal(one, batched, check_exact=False, rtol=1e-5, atol=1e-7)
    assert mats_one.keys() == mats_batched.keys()
    # windows analysed with heatmap_prompts keep only the first prompts' matrices
    _, few = geo.analyze_model(model, prompts, "s", 0, [0, -1], heatmap_prompts=2)
    assert sorted(few) == sorted(k for k in mats_one if k.endswith(("prompt0", "prompt1")))
    with pytest.raises(GeometryError, match="batch_size must be >= 1"):
        geo.analyze_model(model, prompts, "s", 0, [0], batch_size=0)


def test_the_cpu_default_keeps_one_prompt_per_forward_and_a_gpu_batches():
    assert geo.resolve_batch_size(None, "cpu") == 1
    assert geo.resolve_batch_size(None, torch.device("cuda")) == geo.DEVICE_BATCH_SIZE
    assert geo.resolve_batch_size(8, "cpu") == 8


# ------------------------------------------------------------------ config and seen prompts


def test_config_check_takes_windows_and_refuses_long_ones_and_pretrained_entries(tmp_path):
    config = base_config(tmp_path)
    config["geometry"]["prompts"] = {"test_windows": 100, "length": 16, "seed": 0}
    check_config(config, this_machine=False, warn=lambda line: None)
    config["variants"]["b"]["block_size"] = 8
    with pytest.raises(ConfigError, match=r"windows of length 16 do not fit variants\.b's block_size=8"):
        check_config(config, this_machine=False, warn=lambda line: None)
    del config["variants"]["b"]["block_size"]
    config["pretrained"] = {"gpt2": {"model": "gpt2"}}
    with pytest.raises(ConfigError, match=r"pretrained entries \(gpt2\) cannot read.*Give a prompts file"):
        check_config(config, this_machine=False, warn=lambda line: None)


def test_schema_error_for_a_bad_mapping_names_the_missing_key_and_both_forms():
    from jsonschema import Draft202012Validator

    from tga.schema import load_schema

    config = {"geometry": {"prompts": {"test_windows": 10, "length": 64}}}
    error = next(Draft202012Validator(load_schema()).iter_errors(config))
    wrapper = RuntimeError("validation failed")
    wrapper.__cause__ = error
    message = schema_error_message(wrapper)
    assert message.startswith("Invalid config: geometry.prompts: ")
    assert "'seed' is a required property" in message and "not valid under any" not in message
    assert "Give a prompts file (e.g. config/prompts.txt) or a mapping {test_windows: N" in message
    # --config hands the mapping's numbers over as strings: the mapping's form decides their type
    coerced = coerce_config_types({"geometry": {"prompts": {"test_windows": "256", "length": "64", "seed": "0"}}})
    assert coerced["geometry"]["prompts"] == {"test_windows": 256, "length": 64, "seed": 0}
    assert not list(Draft202012Validator(load_schema()).iter_errors(coerced))


def test_seen_windows_table_flags_a_window_the_training_text_holds(tmp_path):
    path, tok = _test_split(tmp_path, "abcdefghij " * 3 + "0123456789 klmnopqrst uvwxyz")
    windows = read_test_windows(path, 3, 10, seed=0)
    texts = window_texts(windows, tok)
    train = tmp_path / "train.txt"
    train.write_text("unrelated text " + texts[1] + " more")
    tok.save(tmp_path / "tokenizer.json")
    lines = write_seen_prompts_table(path, train, tmp_path / "seen.csv", "data.train",
                                     test_windows={"test_windows": 3, "length": 10, "seed": 0},
                                     tokenizer_path=tmp_path / "tokenizer.json")
    rows = list(csv.DictReader((tmp_path / "seen.csv").open()))
    assert [r["start"] for r in rows] == [str(s) for s in windows.starts]
    assert [r["text"] for r in rows] == texts
    flagged = [r["prompt"] for r in rows if r["in_training_text"] == "True"]
    assert "1" in flagged and all(texts[int(i)] in train.read_text() for i in flagged)
    assert any(f"prompt 1 (test window at token {windows.starts[1]} of {path}" in line for line in lines)


@pytest.mark.workflow
def test_the_rules_read_the_test_token_file_for_windows(tmp_path):
    """With test windows the geometry, evolution and check_prompts jobs take the test
    split's token file (check_prompts also the tokenizer, to decode them); a dry run."""
    from workflow_runs import make_workdir, snakemake, tiny_config

    config = tiny_config()
    config["geometry"]["prompts"] = {"test_windows": 50, "length": 16, "seed": 0}
    work = make_workdir(tmp_path, config)
    out = snakemake(work, "--dry-run",
                    "outputs/data/prompts_in_training_text.csv", "outputs/geometry/llama-preln/seed0/metrics.csv",
                    "outputs/evolution/llama-preln/seed0/metrics.csv").stdout
    blocks = {b.split(":", 1)[0].split()[-1]: b for b in out.split("\nrule ")[1:] + out.split("\nlocalrule ")[1:]}
    assert "outputs/data/tokens/test.bin" in blocks["check_prompts"]
    assert "outputs/data/tokens/tokenizer.json" in blocks["check_prompts"]
    for rule in ("geometry", "evolution_geometry"):
        assert "outputs/data/tokens/test.bin" in blocks[rule] and "tiny_prompts.txt" not in blocks[rule]
