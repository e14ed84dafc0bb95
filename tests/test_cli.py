"""The ``tga`` command line: the seed study's workflow end to end on tiny models, the
help of every subcommand, GPT-2 BPE from local files, and one clear error (exit 2,
nothing written) for each kind of bad input."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tga.plots
from tga.cli import build_parser, main
from tga.data import read_token_metadata
from tga.geometry import CROSS_PROMPT
from tga.model import ModelConfig, Transformer, load_checkpoint, save_checkpoint
from tga.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "wikitext-2-sample"
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4",
        "--eval-batches", "2", "--device", "cpu"]
LONG_PROMPT = "The quick brown fox jumps over the lazy dog near the river bank today ."  # > 32 chars
PROMPTS = f"# comment line\n{LONG_PROMPT}\nHomarus gammarus is a lobster .\nA short one .\n"
PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args: object) -> tuple[int, str, str]:
    """Run ``tga`` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def download_sample(data_dir: Path) -> tuple[int, str, str]:
    return cli("download", "--data-dir", data_dir, "--text-train", SAMPLE / "train.txt",
               "--text-validation", SAMPLE / "validation.txt", "--text-test", SAMPLE / "test.txt")


def assert_error(result: tuple[int, str, str], *needles: str) -> str:
    """Exit code 2 and exactly one ``tga: error:`` line naming every needle."""
    code, _, err = result
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tga: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err
    return lines[0]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """download -> train (the workflow's defaults: Pre-LN, SwiGLU, RMSNorm) on the shipped sample, char tokenizer."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    downloaded = download_sample(data)
    trained = cli("train", "--tokenizer", "char", "--data-dir", data, "--output-dir", root / "models",
                  "--model-name", "tiny", "--max-steps", 5, "--checkpoint-interval", 2,
                  "--checkpoint-spacing", "linear", *TINY)
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    return {"root": root, "data": data, "model": root / "models" / "tiny", "prompts": prompts,
            "downloaded": downloaded, "trained": trained}


# --------------------------------------------------------------------------- the workflow


def test_download_copies_the_splits(study: dict) -> None:
    code, out, err = study["downloaded"]
    assert code == 0, err
    for split in ("train", "validation", "test"):
        assert (study["data"] / f"{split}.txt").read_bytes() == (SAMPLE / f"{split}.txt").read_bytes()
        assert f"{split}.txt" in out


def test_train_writes_the_run_and_token_files(study: dict) -> None:
    code, out, err = study["trained"]
    assert code == 0, err
    run = study["model"]
    for name in ("init.pt", "final.pt", "train_log.csv", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["step000002.pt", "step000004.pt"]
    log = pd.read_csv(run / "train_log.csv")
    assert list(log["step"]) == [0, 5]
    assert np.isfinite(log["val_loss"]).all()

    tokenizer = load_tokenizer(run / "tokenizer.json")
    model, extra = load_checkpoint(run / "final.pt")
    assert extra["step"] == 5
    # The workflow's defaults, from the one schema: Pre-LN, SwiGLU, RMSNorm, rotary positions.
    assert (model.config.norm_position, model.config.activation, model.config.norm) == ("pre", "swiglu", "rmsnorm")
    assert model.config.position_encoding == "rope"
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head, model.config.block_size) == (1, 32, 2, 32)
    assert model.config.vocab_size == tokenizer.vocab_size
    for split in ("train", "validation", "test"):
        meta = read_token_metadata(study["data"] / "tokens" / "char" / f"{split}.bin")
        assert (meta["tokenizer"], meta["vocab_size"]) == ("char", tokenizer.vocab_size)
    assert "tokenized" in out and "trained tiny: 5 steps" in out


def test_evaluate_writes_sane_perplexities(study: dict) -> None:
    out_json = study["root"] / "eval" / "tiny.json"
    code, out, err = cli("evaluate", "--model", study["model"], "--data-dir", study["data"],
                         "--output", out_json, "--device", "cpu")
    assert code == 0, err
    result = json.loads(out_json.read_text())
    meta = read_token_metadata(study["data"] / "tokens" / "char" / "test.bin")
    vocab = meta["vocab_size"]
    assert (result["variant"], result["seed"], result["split"], result["tokenizer"]) == ("tiny", 0, "test", "char")
    assert result["n_tokens_scored"] == meta["n_tokens"] - 1
    # 5 steps from a random init: near the uniform distribution, certainly not worse than 2x it.
    assert 1.0 < result["token_ppl"] < 2 * vocab
    assert math.isclose(result["bits_per_byte"],
                        result["loss_nats"] * result["n_tokens_scored"] / math.log(2) / meta["n_bytes"])
    assert result["word_ppl"] > result["token_ppl"]  # a word spans several characters
    assert out.count("\n") == 2  # "reusing ..." and the one-line summary
    assert f"token ppl {result['token_ppl']:.3f}" in out and str(out_json) in out
    assert "reusing" in out  # the test split was tokenized by train


def test_analyze_writes_geometry_and_figures(study: dict) -> None:
    out_dir = study["root"] / "geometry"
    code, out, err = cli("analyze", "--trained-model", study["model"], "--prompts", study["prompts"],
                         "--output-dir", out_dir, "--heatmap-layers", 0, -1)
    assert code == 0, err
    metrics = pd.read_csv(out_dir / "metrics.csv")
    assert set(metrics["stage"]) == {"init", "trained"}
    assert set(metrics["layer"]) == {0, 1, 2}
    assert set(metrics["prompt"]) == {CROSS_PROMPT, 0, 1, 2}  # -1: the cross-prompt baseline rows
    summary = pd.read_csv(out_dir / "summary.csv")
    cos = summary[summary["metric"] == "mean_cosine"]["mean"]
    assert ((cos > -1) & (cos <= 1)).all()
    with np.load(out_dir / "similarity.npz") as npz:
        stored = {k for k in npz.files if k.startswith(("init/", "trained/"))}
        assert stored == {f"{s}/layer{j}/prompt{i}" for s in ("init", "trained") for j in (0, 2) for i in range(3)}
        assert npz["trained/layer2/prompt0"].shape == (32, 32)
    # The long prompt is cut to the block size, and the output says so.
    table = pd.read_csv(out_dir / "prompts.csv")
    assert list(table["truncated"]) == [True, False, False]
    assert table.loc[0, "n_tokens_input"] == 32 and table.loc[0, "n_tokens_original"] == len(LONG_PROMPT)
    assert "tga: note: prompt(s) 0 " in err and "truncated to their first 32 tokens" in err
    assert is_png(out_dir / "geometry_layers.png") and is_png(out_dir / "similarity_heatmaps.png")


def test_evolve_analyses_every_checkpoint(study: dict) -> None:
    out_dir = study["root"] / "evolution"
    code, out, err = cli("evolve", "--max-steps", 5, "--learning-rate", "1e-3", "--output-dir", out_dir,
                         "--prompts", study["prompts"], "--data-dir", study["data"], "--tokenizer", "char",
                         "--pre-ln", "--use-swiglu", "--norm", "layernorm", "--eval-interval", 5,
                         "--heatmap-layers", 0, -1,
                         "--checkpoint-spacing", "linear", *TINY)
    assert code == 0, err
    run = out_dir / "model"
    model, _ = load_checkpoint(run / "final.pt")
    assert (model.config.norm_position, model.config.activation, model.config.norm) == ("pre", "swiglu", "layernorm")
    # --checkpoint-interval defaults to a fifth of --max-steps: a checkpoint every step.
    assert len(list((run / "checkpoints").glob("step*.pt"))) == 5
    summary = pd.read_csv(out_dir / "summary.csv")
    steps = summary.drop_duplicates("stage").set_index("stage")["step"].to_dict()
    assert steps == {"init": 0, "step1": 1, "step2": 2, "step3": 3, "step4": 4, "step5": 5}
    for name in ("metrics.csv", "prompts.csv", "similarity.npz"):
        assert (out_dir / name).is_file()
    figures = ["geometry_layers.png", "training_curves.png"]
    optional = {"plot_metrics_by_step": "metrics_by_step.png", "plot_heatmaps_before_after": "heatmaps_before_after.png",
                "plot_similarity_change": "similarity_change.png"}
    figures += [png for func, png in optional.items() if hasattr(tga.plots, func)]
    for png in figures:
        assert is_png(out_dir / png), png
    assert "reusing" in out  # the splits were tokenized by the study's train run


def test_retraining_reuses_tokens_and_overwrite_drops_stale_checkpoints(study: dict) -> None:
    models = study["root"] / "models"
    args = ["train", "--tokenizer", "char", "--data-dir", study["data"], "--output-dir", models,
            "--model-name", "again", "--max-steps", 2, "--checkpoint-interval", 1, *TINY]
    code, out, err = cli(*args)
    assert code == 0, err
    assert out.count("reusing") == 3 and "tokenized" not in out
    assert len(list((models / "again" / "checkpoints").glob("*.pt"))) == 2

    assert_error(cli(*args), "already holds a model", "--overwrite")
    code, _, err = cli(*args, "--max-steps", 1, "--overwrite")
    assert code == 0, err
    assert [p.name for p in (models / "again" / "checkpoints").glob("*.pt")] == ["step000001.pt"]


def test_token_files_of_another_char_vocabulary_are_not_reused(study: dict, tmp_path: Path) -> None:
    """Another training text gives another char vocabulary: its token files replace the old
    ones, and evaluating the first model re-encodes the split with the first model's vocabulary."""
    data = tmp_path / "data"
    shutil.copytree(study["data"], data)
    (data / "train.txt").write_text((SAMPLE / "train.txt").read_text(encoding="utf-8") + " \u03a9\n",
                                    encoding="utf-8")
    code, out, err = cli("train", "--tokenizer", "char", "--data-dir", data, "--output-dir", tmp_path / "models",
                         "--model-name", "omega", "--max-steps", 1, *TINY)
    assert code == 0, err
    assert out.count("tokenized") == 3
    old_vocab = load_tokenizer(study["model"] / "tokenizer.json").vocab_size
    assert read_token_metadata(data / "tokens" / "char" / "test.bin")["vocab_size"] == old_vocab + 1

    code, out, err = cli("evaluate", "--model", study["model"], "--data-dir", data, "--output", tmp_path / "e.json")
    assert code == 0, err
    assert "tokenized" in out
    assert read_token_metadata(data / "tokens" / "char" / "test.bin")["vocab_size"] == old_vocab
    assert not (data / "tokens" / "char" / "train.bin").exists()  # ids of two vocabularies never mix
    reference = study["root"] / "eval" / "reference.json"
    code, _, err = cli("evaluate", "--model", study["model"], "--data-dir", study["data"], "--output", reference)
    assert code == 0, err
    got, want = json.loads((tmp_path / "e.json").read_text()), json.loads(reference.read_text())
    assert got["token_ppl"] == pytest.approx(want["token_ppl"], rel=1e-6)


# --------------------------------------------------------------------------- GPT-2 BPE


def test_bpe_from_local_files_round_trips(study: dict, gpt2_files: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, shared_data_dir: Path) -> None:
    data = tmp_path / "data"
    assert download_sample(data)[0] == 0
    code, out, err = cli("train", "--tokenizer", "bpe", "--encoder-json", gpt2_files["encoder_json"],
                         "--vocab-bpe", gpt2_files["vocab_bpe"], "--data-dir", data, "--output-dir",
                         tmp_path / "models", "--model-name", "bpe", "--max-steps", 1, *TINY, "--batch-size", 1)
    assert code == 0, err
    run = tmp_path / "models" / "bpe"
    tokenizer = load_tokenizer(run / "tokenizer.json")
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"
    meta = read_token_metadata(data / "tokens" / "gpt2" / "train.bin")
    assert (meta["tokenizer"], meta["vocab_size"]) == ("gpt2", 50257)
    assert meta["n_tokens"] < 0.5 * meta["n_bytes"]  # real BPE merges, not bytes
    assert load_checkpoint(run / "final.pt")[0].config.vocab_size == 50257

    # tiktoken's gpt2 (from TIKTOKEN_CACHE_DIR) gives the same ids, so bpe's token files are reused.
    cache = tmp_path / "tiktoken_cache"
    shutil.copytree(shared_data_dir / "gpt2" / "tiktoken_cache", cache)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    code, out, err = cli("evaluate", "--model", run, "--tokenizer", "tiktoken", "--data-dir", data,
                         "--output", tmp_path / "e.json", "--device", "cpu")
    assert code == 0, err
    assert "reusing" in out and "tokenized" not in out
    assert json.loads((tmp_path / "e.json").read_text())["tokenizer"] == "gpt2"


# --------------------------------------------------------------------------- help


EXPECTED_FLAGS = {
    "download": ["--data-dir", "--archive", "--text-train", "--text-validation", "--text-test"],
    "train": ["--pre-ln", "--post-ln", "--use-swiglu", "--norm", "--tokenizer", "--encoder-json", "--vocab-bpe",
              "--n-layer", "--n-head", "--n-embd", "--block-size", "--batch-size", "--max-steps", "--warmup-steps",
              "--learning-rate", "--weight-decay", "--dropout", "--eval-interval", "--checkpoint-interval",
              "--eval-batches", "--seed", "--device", "--model-name", "--data-dir", "--output-dir"],
    "evaluate": ["--model", "--data-dir", "--split", "--output", "--tokenizer"],
    "export": ["RUN_DIR_or_CHECKPOINT", "OUT_DIR", "--tokenizer", "--encoder-json", "--vocab-bpe", "--data-dir",
               "--overwrite"],
    "analyze": ["--prompts", "--output-dir", "--heatmap-layers", "--geometry-device", "--trained-model",
                "--init-model", "--tokenizer", "--exclude-first-token"],
    "evolve": ["--max-steps", "--geometry-device", "--learning-rate", "--output-dir", "--prompts",
               "--checkpoint-interval",
               "--pre-ln", "--post-ln", "--use-swiglu", "--norm", "--tokenizer", "--encoder-json", "--vocab-bpe",
               "--n-layer", "--n-head", "--n-embd", "--block-size", "--batch-size", "--seed", "--device",
               "--data-dir", "--heatmap-layers", "--exclude-first-token"],
}


@pytest.mark.parametrize("command", sorted(EXPECTED_FLAGS))
def test_help_explains_every_flag(command: str) -> None:
    code, out, err = cli(command, "--help")
    assert code == 0, err
    for flag in EXPECTED_FLAGS[command]:
        assert flag in out, flag
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices[command]
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    if command in ("train", "evolve"):
        assert "(default: 8)" in out  # --batch-size: defaults are shown


@pytest.mark.parametrize("command", ["train", "evolve"])
def test_setting_flags_are_the_schemas_keys_with_its_defaults(command: str) -> None:
    """Every model and training key of the workflow is a flag of train/evolve, with the
    schema's default (evolve derives its intervals, and warmup is capped by the steps)."""
    from tga.schema import key_specs

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    defaults: dict[str, object] = {}
    for action in subparsers.choices[command]._actions:  # the first action of a dest sets its default
        defaults.setdefault(action.dest, action.default)
    derived = {"warmup_steps", *(("checkpoint_interval", "eval_interval") if command == "evolve" else ())}
    for section in ("model", "training"):
        for key, spec in key_specs(section).items():
            assert defaults[key] == (None if key in derived else spec["default"]), key


def test_top_level_help_and_missing_command() -> None:
    code, out, _ = cli("--help")
    assert code == 0
    for command in EXPECTED_FLAGS:
        assert command in out
    assert_error(cli(), "COMMAND")


def test_module_entry_point_fails_cleanly(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tga.cli", "train", "--tokenizer", "char",
                           "--data-dir", tmp_path / "missing", "--output-dir", tmp_path / "models"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tga: error: --data-dir") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "models").exists()


# --------------------------------------------------------------------------- bad input


def test_train_bad_input_writes_nothing(study: dict, tmp_path: Path) -> None:
    out = tmp_path / "models"
    base = ["train", "--data-dir", study["data"], "--output-dir", out, *TINY]
    assert_error(cli("train", "--tokenizer", "char", "--data-dir", tmp_path / "nowhere", "--output-dir", out),
                 "--data-dir", "nowhere", "tga download")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(study["data"] / "train.txt", partial)
    assert_error(cli("train", "--tokenizer", "char", "--data-dir", partial, "--output-dir", out),
                 "validation.txt", "tga download")
    assert_error(cli(*base, "--tokenizer", "bpe"), "--tokenizer bpe", "--encoder-json", "--vocab-bpe")
    assert_error(cli(*base, "--tokenizer", "bpe", "--encoder-json", tmp_path / "encoder.json"), "--vocab-bpe")
    assert_error(cli(*base, "--tokenizer", "char", "--vocab-bpe", tmp_path / "v.bpe"), "--vocab-bpe", "bpe")
    assert_error(cli(*base, "--tokenizer", "bpe", "--encoder-json", tmp_path / "e.json", "--vocab-bpe",
                     tmp_path / "v.bpe"), "--encoder-json", "e.json", "does not exist")
    assert_error(cli(*base, "--tokenizer", "char", "--n-embd", 30, "--n-head", 4), "n_embd=30", "n_head=4", "--n-embd")
    assert_error(cli(*base, "--tokenizer", "char", "--max-steps", 5, "--warmup-steps", 10),
                 "warmup_steps=10", "--warmup-steps")
    assert_error(cli(*base, "--tokenizer", "char", "--max-steps", 0), "max_steps=0", "--max-steps")
    assert_error(cli(*base, "--tokenizer", "char", "--block-size", 200_000, "--max-steps", 1),
                 "block_size", "smaller block_size")
    assert_error(cli(*base, "--tokenizer", "char", "--norm", "batchnorm"), "--norm", "batchnorm")
    assert_error(cli(*base, "--tokenizer", "char", "--pre-ln", "--post-ln"), "--post-ln", "--pre-ln")
    assert not out.exists()


def test_download_bad_input_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert_error(cli("download", "--data-dir", data, "--text-train", SAMPLE / "train.txt"),
                 "--text-validation", "--text-test")
    assert_error(cli("download", "--data-dir", data, "--text-train", tmp_path / "nope.txt",
                     "--text-validation", SAMPLE / "validation.txt", "--text-test", SAMPLE / "test.txt"),
                 "--text-train", "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_error(cli("download", "--data-dir", data, "--text-train", SAMPLE / "train.txt",
                     "--text-validation", empty, "--text-test", SAMPLE / "test.txt"), "empty.txt", "empty")
    fake = tmp_path / "wikitext-2-raw-v1.zip"
    fake.write_bytes(b"not a zip")
    assert_error(cli("download", "--data-dir", data, "--archive", fake), str(fake), "sha256")
    assert_error(cli("download", "--data-dir", data, "--archive", tmp_path / "missing.zip"), "missing.zip")
    assert not data.exists()


def test_analyze_bad_prompts(study: dict, tmp_path: Path) -> None:
    out = tmp_path / "geometry"

    def analyze(prompts: Path, *extra: object) -> tuple[int, str, str]:
        return cli("analyze", "--trained-model", study["model"], "--prompts", prompts, "--output-dir", out, *extra)

    assert_error(analyze(tmp_path / "missing.txt"), "--prompts", "missing.txt", "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_error(analyze(empty), "--prompts", "empty.txt", "is empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("# only a comment\n\n   \n")
    assert_error(analyze(blank), "blank.txt", "only comments/blank lines")
    short = tmp_path / "short.txt"
    short.write_text("A fine prompt .\nab\n")
    assert_error(analyze(short), "prompt 1", "2 distinct token(s)", "at least 3")
    exactly3 = tmp_path / "three.txt"
    exactly3.write_text("abc\n")
    assert_error(analyze(exactly3, "--exclude-first-token"), "prompt 0", "after excluding the first token")
    assert not out.exists()


def test_analyze_bad_models_and_layers(study: dict, tmp_path: Path) -> None:
    out = tmp_path / "geometry"
    model, prompts = study["model"], study["prompts"]

    def analyze(*extra: object) -> tuple[int, str, str]:
        return cli("analyze", "--prompts", prompts, "--output-dir", out, *extra)

    assert_error(analyze("--trained-model", model, "--heatmap-layers", 0, 3), "--heatmap-layers", "index 3", "-3..2")
    assert_error(analyze("--trained-model", model, "--heatmap-layers", -4), "--heatmap-layers", "index -4")
    other = tmp_path / "other_init.pt"
    save_checkpoint(other, Transformer(ModelConfig(vocab_size=load_checkpoint(model / "final.pt")[0].config.vocab_size,
                                                   block_size=32, n_layer=1, n_head=2, n_embd=16,
                                                   norm_position="post", activation="gelu")))
    assert_error(analyze("--trained-model", model, "--init-model", other), "--init-model", "another architecture",
                 "n_embd=16 (expected 32)")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((model / "final.pt").read_bytes()[:1000])
    assert_error(analyze("--trained-model", corrupt, "--tokenizer", model / "tokenizer.json"),
                 "--trained-model", "corrupt.pt", "corrupt or truncated")
    assert_error(analyze("--trained-model", model, "--init-model", corrupt), "--init-model", "corrupt.pt")
    assert_error(analyze("--trained-model", tmp_path / "nope"), "--trained-model", "nope", "does not exist")
    assert_error(analyze("--trained-model", model / "checkpoints" / "step000002.pt", "--tokenizer",
                         tmp_path / "missing.json"), "missing.json", "not found")
    other_tok = tmp_path / "other_tok.json"
    other_tok.write_text(json.dumps({"type": "char", "chars": ["a", "b", "c"], "vocab_size": 4}))
    assert_error(analyze("--trained-model", model, "--tokenizer", other_tok), "--tokenizer", "4 ids")
    assert not out.exists()


def test_evaluate_bad_input(study: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(study["data"] / "train.txt", data)
    assert_error(cli("evaluate", "--model", study["model"], "--data-dir", data), "test.txt", "tga download")
    assert_error(cli("evaluate", "--model", tmp_path, "--data-dir", study["data"]), "--model", "no final.pt")
    corrupt = tmp_path / "final.pt"
    corrupt.write_bytes(b"garbage")
    assert_error(cli("evaluate", "--model", corrupt, "--tokenizer", study["model"] / "tokenizer.json",
                     "--data-dir", study["data"]), "--model", "corrupt")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(study["model"] / "final.pt", lonely)
    assert_error(cli("evaluate", "--model", lonely, "--data-dir", study["data"]), "tokenizer.json", "--tokenizer")
    assert_error(cli("evaluate", "--model", study["model"], "--split", "dev"), "--split", "dev")
    assert not (tmp_path / "data" / "tokens").exists()


def test_export_writes_a_folder_transformers_opens(study: dict, tmp_path: Path) -> None:
    """`tga export` of the trained run: AutoModelForCausalLM and AutoTokenizer open the
    folder and give tga's logits and ids; an existing OUT_DIR needs --overwrite."""
    import torch

    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    code, stdout, err = cli("export", study["model"], out)
    assert code == 0, err
    assert "as LlamaForCausalLM" in stdout and str(out) in stdout
    model, _ = load_checkpoint(study["model"] / "final.pt")
    tokenizer = load_tokenizer(study["model"] / "tokenizer.json")
    ids = torch.tensor([tokenizer.encode("Homarus gammarus is a lobster .")])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert float((model(ids).logits - loaded(input_ids=ids).logits).abs().max()) <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(out)("lobster .")["input_ids"] == tokenizer.encode("lobster .")
    assert json.loads((out / "tga.json").read_text())["source_checkpoint"] == str(study["model"] / "final.pt")
    before = (out / "model.safetensors").read_bytes()
    assert_error(cli("export", study["model"], out), f"OUT_DIR {out} already exists", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    code, _, err = cli("export", study["model"] / "checkpoints" / "step000002.pt", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "tga.json").read_text())["checkpoint_extra"]["step"] == 2


def test_export_bad_input_writes_nothing(study: dict, tmp_path: Path) -> None:
    config = load_checkpoint(study["model"] / "final.pt")[0].config
    post = tmp_path / "post"
    save_checkpoint(post / "final.pt", Transformer(ModelConfig.from_dict({**config.__dict__, "norm_position": "post"})))
    out = tmp_path / "out"
    assert_error(cli("export", post, out), "Post-LN", "norm_position='post'", "after the residual sum")
    assert_error(cli("export", tmp_path / "missing", out), "RUN_DIR_or_CHECKPOINT", "does not exist")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(study["model"] / "final.pt", lone / "final.pt")
    assert_error(cli("export", lone, out), "no tokenizer.json", "--tokenizer")
    (tmp_path / "file.txt").write_text("mine")
    assert_error(cli("export", study["model"], tmp_path / "file.txt"), "is a file")
    assert_error(cli("export", study["model"], out, "--ovewrite"), "did you mean --overwrite?")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "lone", "post"]
    assert sorted(p.name for p in lone.iterdir()) == ["final.pt"]


def test_evolve_checks_prompts_and_layers_before_training(study: dict, tmp_path: Path) -> None:
    out = tmp_path / "evolution"
    short = tmp_path / "short.txt"
    short.write_text("ok prompt\nab\n")
    base = ["evolve", "--max-steps", 5, "--output-dir", out, "--data-dir", study["data"], "--tokenizer", "char",
            *TINY]
    assert_error(cli(*base, "--prompts", short), "prompt 1", "at least 3")
    assert_error(cli(*base, "--prompts", study["prompts"], "--heatmap-layers", 5), "--heatmap-layers", "index 5")
    assert_error(cli(*base, "--prompts", tmp_path / "none.txt"), "--prompts", "none.txt")
    assert_error(cli(*base, "--prompts", study["prompts"], "--checkpoint-interval", 0),
                 "checkpoint_interval=0", "--checkpoint-interval")
    assert_error(cli(*base[:2], 0, *base[3:], "--prompts", study["prompts"]), "max_steps=0", "--max-steps")
    assert not out.exists()


# --------------------------------------------------------------------------- one name per setting

# The config sections whose keys each subcommand takes as flags.
SECTIONS = {"train": ("model", "training"), "evolve": ("model", "training", "geometry"),
            "evaluate": ("evaluation",), "analyze": ("geometry",), "download": (),
            "export": ()}  # export sets no config key


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if a.dest == "command").choices


def _setting(dest: str, sections: tuple[str, ...]) -> tuple[str, str] | None:
    """(section, key) a flag's destination sets: the key itself, or section_key."""
    from tga.schema import key_specs

    for section in sections:
        if dest in key_specs(section):
            return section, dest
        if dest.startswith(f"{section}_") and dest[len(section) + 1:] in key_specs(section):
            return section, dest[len(section) + 1:]
    return None


def test_every_setting_flag_is_named_as_its_config_key() -> None:
    """Each setting has one name, its config key's: n_layer is --n-layer, max_steps
    --max-steps in train and evolve alike (evolve once called it --iterations), and a key
    two sections share carries its section (geometry.device: --geometry-device). The
    seed study's shorthands only set a key to one of its values."""
    from tga.schema import key_specs

    checked = 0
    for command, parser in _subcommands().items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            setting = _setting(action.dest, SECTIONS[command])
            if setting is None:
                continue
            section, key = setting
            if type(action) is argparse._StoreConstAction:  # --pre-ln, --post-ln, --use-swiglu
                assert action.const in key_specs(section)[key]["enum"], action.option_strings
                continue
            names = {f"--{key}".replace("_", "-"), f"--{section}-{key}".replace("_", "-")}
            assert action.option_strings[0] in names, (command, action.option_strings, f"{section}.{key}")
            checked += 1
    assert checked > 2 * (len(key_specs("model")) + len(key_specs("training")))


@pytest.mark.parametrize("command", ["train", "evolve"])
def test_every_model_and_training_flag_maps_to_a_schema_key(command: str) -> None:
    from tga.schema import key_specs

    keys = {*key_specs("model"), *key_specs("training")}
    parser = _subcommands()[command]
    groups = [g for g in parser._action_groups if g.title.startswith(("model architecture", "training"))]
    assert len(groups) == 2
    for action in (a for g in groups for a in g._group_actions if a.help != argparse.SUPPRESS):
        # --seed is one of the config's seeds; --overwrite is about the run folder.
        assert action.dest in keys | {"seed", "overwrite"}, action.option_strings


def test_former_flag_names_say_the_new_one(study: dict, tmp_path: Path) -> None:
    base = ["--prompts", study["prompts"], "--output-dir", tmp_path / "out"]
    assert_error(cli("evolve", "--iterations", 5, *base), "--iterations is now --max-steps")
    assert_error(cli("analyze", "--trained-model", study["model"], "--layers", 0, -1, *base),
                 "--layers is now --heatmap-layers")
    assert_error(cli("analyze", "--trained-model", study["model"], "--analysis-device", "cpu", *base),
                 "--analysis-device is now --geometry-device")
    assert not (tmp_path / "out").exists()


def test_a_misspelt_flag_gets_a_suggestion() -> None:
    line = assert_error(cli("train", "--learnig-rate", "1e-3"), "unrecognized arguments: --learnig-rate 1e-3",
                        "did you mean --learning-rate?")
    assert "--weight-decay" not in line  # one suggestion, not the list of every flag
    assert_error(cli("evolve", "--max-stpes=5", "--heatmap-layres", 0, "--prompts", "p.txt", "--output-dir", "o"),
                 "did you mean --max-steps for --max-stpes, --heatmap-layers for --heatmap-layres?")
    line = assert_error(cli("train", "--zzz"), "unrecognized arguments: --zzz", "tga train --help")
    assert "did you mean" not in line


def test_version_is_the_package_metadata() -> None:
    from importlib.metadata import version

    import tomllib

    code, out, _ = cli("--version")
    assert code == 0
    assert out == f"tga {version('tga')}\n"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert version("tga") == pyproject["project"]["version"], "reinstall: pip install -e ."


def test_license_file_matches_pyproject() -> None:
    import tomllib

    license = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"]
    declared = license["text"] if isinstance(license, dict) else license
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert declared == "MIT"
    assert text.splitlines()[0] == "MIT License"
    assert "Permission is hereby granted, free of charge, to any person obtaining a copy" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


# --------------------------------------------------------------------------- unknown config keys


def _schema_message(edit) -> str:
    """The workflow's one-line message for an edited copy of config/config.yaml."""
    import copy

    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    from tga.schema import SCHEMA_PATH
    from tga.settings import merged_config, schema_error_message

    config = copy.deepcopy(merged_config([ROOT / "config" / "config.yaml"]))
    edit(config)
    with pytest.raises(WorkflowError) as info:
        validate(config, str(SCHEMA_PATH))
    message = schema_error_message(info.value)
    assert "\n" not in message
    return message


def test_an_unknown_config_key_gets_a_suggestion() -> None:
    message = _schema_message(lambda c: c["model"].update(n_layers=6))
    assert message == "Invalid config: model: unknown key ('n_layers' was unexpected); did you mean 'n_layer'?"
    message = _schema_message(lambda c: c["variants"]["llama-preln"].update(learnig_rate=1e-3))
    assert message.endswith("did you mean 'learning_rate'?")
    # Nothing close: the valid keys instead.
    message = _schema_message(lambda c: c.update(colour="red"))
    assert "did you mean" not in message and "valid: 'comparisons', 'data'," in message


def test_a_dotted_key_says_how_nested_keys_are_written() -> None:
    message = _schema_message(lambda c: c.update({"training.max_steps": 10}))
    assert message.endswith("nested keys are written as training: {max_steps: 10} in a --configfile, "
                            "or as --config 'training={max_steps: 10}' on the command line")


def test_unknown_settings_of_the_library_get_suggestions() -> None:
    from tga.schema import TrainConfig, TrainConfigError
    from tga.settings import ConfigError, merged_config, resolve_variant

    with pytest.raises(TrainConfigError, match=r"\['max_step'\]: did you mean 'max_steps'\?$"):
        TrainConfig.from_dict({"max_step": 10})
    config = merged_config([ROOT / "config" / "config.yaml"])
    config["variants"]["llama-preln"]["lernig_rate"] = 1e-3
    with pytest.raises(ConfigError, match=r"\['lernig_rate'\].*did you mean 'learning_rate'\?$"):
        resolve_variant(config, "llama-preln")


# --------------------------------------------------------------------------- snakemake --config


@pytest.mark.workflow  # runs Snakemake or fresh processes
def test_snakemake_config_sets_nested_keys_in_the_documented_form(tmp_path: Path) -> None:
    """`--config 'training={max_steps: 10}'` sets one nested key, merged key by key into
    the config files' section and typed by the schema. The dotted `training.max_steps=10`
    never reaches the workflow: Snakemake's own --config parser refuses keys with dots
    (snakemake/cli.py parse_config, Snakemake >= 8.17); when that changes, the README's
    note on it is out of date."""
    from test_workflow import TINY, make_workdir, snakemake

    workdir = make_workdir(tmp_path, TINY)
    assert snakemake(workdir, "--dry-run", "--config", "training={max_steps: 10}").returncode == 0
    # max_steps 3 with tiny.yaml's warmup_steps 4: the error proves both arrived, as numbers.
    proc = snakemake(workdir, "--dry-run", "--config", "training={max_steps: 3}", check=False)
    assert proc.returncode != 0 and "warmup_steps=4 must be in [0, max_steps=3]" in proc.stdout + proc.stderr
    proc = snakemake(workdir, "--dry-run", "--config", "training.max_steps=10", check=False)
    assert proc.returncode != 0 and "Config entry must start with a valid identifier" in proc.stdout + proc.stderr
