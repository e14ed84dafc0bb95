"""Tests for tga.geometry: which tokens are analysed, the prompt/IO error paths, and the
analysis driver on a fake model (plus one round trip through a real tga checkpoint).
The metric functions themselves are tested in tests/test_metrics.py."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from tga import geometry as geo
from tga import metrics as met
from tga.figure_style import FLOOR_LABEL
from tga.metrics import GeometryError

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "config" / "prompts.txt"


# ------------------------------------------------------------------ fakes


class FakeModel(nn.Module):
    """Embedding + n_layer random linear residual blocks + LayerNorm, with the tga forward API."""

    def __init__(self, n_layer: int = 3, d: int = 16, vocab: int = 128, block_size: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(n_layer=n_layer, block_size=block_size)
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)
        self.forward_calls: list[tuple[int, ...]] = []
        self.grad_enabled_in_forward: list[bool] = []
        self.training_in_forward: list[bool] = []

    def forward(self, idx, targets=None, return_hidden_states=False, return_logits=True):
        self.forward_calls.append(tuple(idx.shape))
        self.grad_enabled_in_forward.append(torch.is_grad_enabled())
        self.training_in_forward.append(self.training)
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        hs = [x]
        for b in self.blocks:
            x = x + torch.tanh(b(x))
            hs.append(x)
        x = self.norm(x)
        hs.append(x)
        return SimpleNamespace(logits=x if return_logits else None, loss=None,
                               hidden_states=hs if return_hidden_states else None)


class CharTok:
    """Toy tokenizer: one id per character (code point mod 128)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 128 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


# ------------------------------------------------------------------ which tokens


def test_analysed_positions_are_first_occurrences():
    assert geo.analysed_positions([5, 7, 5, 9, 7, 7, 2]) == [0, 1, 3, 6]
    # position 0 goes first, so a later copy of its id is the first occurrence that counts
    assert geo.analysed_positions([5, 7, 5, 9, 7, 7, 2], exclude_first_token=True) == [1, 2, 3, 6]
    assert geo.analysed_positions([3, 3, 3]) == [0]
    assert geo.analysed_positions([]) == []


def test_untrained_default_model_has_no_duplicate_jump_in_twonn():
    """Rotary positions add nothing at layer 0, so a repeated character is one point there
    and a near-copy after block 1; on first occurrences the jump is gone (issue 13)."""
    from tga.model import ModelConfig, Transformer
    from tga.tokenizers import CharTokenizer

    prompts = geo.load_prompts(PROMPTS_FILE)
    tok = CharTokenizer.from_text("\n".join(prompts))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size))  # defaults: rotary, 6 x 384
    assert model.config.position_encoding == "rope"
    ids, _ = geo.encode_prompts(prompts[:6], tok, model.config.block_size)
    df, _ = geo.analyze_model(model, ids, "init", 0, [])
    twonn = df[df.metric == "twonn"].groupby("layer")["value"].mean()
    assert 0.5 < twonn[1] / twonn[0] < 2.0, twonn.tolist()
    # the same model over every position shows the artefact the rule removes
    model.eval()
    with torch.no_grad():
        every = [torch.stack(model(torch.tensor([p]), return_hidden_states=True).hidden_states)[:2, 0] for p in ids]
    all_pos = torch.stack([met.twonn_intrinsic_dimension(h) for h in every]).mean(0)
    assert all_pos[1] / all_pos[0] < 0.25, all_pos.tolist()


# ------------------------------------------------------------------ training-split token counts


def test_train_token_counts_from_a_token_file(tmp_path):
    from tga.data import tokenize_to_file
    from tga.tokenizers import CharTokenizer

    text = "abracadabra"
    tok = CharTokenizer.from_text(text)
    (tmp_path / "train.txt").write_text(text)
    tokenize_to_file(tmp_path / "train.txt", tok, tmp_path / "train.bin")
    counts = geo.train_token_counts(tmp_path / "train.bin", tok.vocab_size)
    assert counts.shape == (tok.vocab_size,)
    for ch, n in {"a": 5, "b": 2, "r": 2, "c": 1, "d": 1}.items():
        assert counts[tok.encode(ch)[0]] == n
    assert counts.sum() == len(text)
    with pytest.raises(GeometryError, match=rf"train token file .*train.bin has vocab_size {tok.vocab_size}"):
        geo.train_token_counts(tmp_path / "train.bin", tok.vocab_size + 1)


# ------------------------------------------------------------------ prompts


def test_load_prompts_skips_comments_and_blank_lines(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\n\n  first prompt  \n   # indented comment\nsecond\n\n")
    assert geo.load_prompts(p) == ["first prompt", "second"]


@pytest.mark.parametrize(
    "content, match",
    [(None, "does not exist"), ("", "is empty"), ("  \n\n", "is empty"), ("# a\n\n# b\n", "only comments")],
)
def test_load_prompts_errors(tmp_path, content, match):
    p = tmp_path / "prompts.txt"
    if content is not None:
        p.write_text(content)
    with pytest.raises(GeometryError, match=match) as err:
        geo.load_prompts(p)
    assert str(p) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_default_prompts_file():
    prompts = geo.load_prompts(PROMPTS_FILE)
    assert len(prompts) == 16
    assert len(set(prompts)) == 16
    for p in prompts:
        assert 60 <= len(p.split()) <= 120
        assert p.endswith(" .")
    valid = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
    if valid.is_file():  # verbatim check where the offline copy exists
        body = valid.read_text(encoding="utf-8")
        for p in prompts:
            assert f" {p} " in body


def test_encode_prompts_truncation_and_errors():
    tok = CharTok()
    ids, info = geo.encode_prompts(["abcdef", "xy"], tok, block_size=4)
    assert ids == [[97, 98, 99, 100], [120, 121]]
    assert info[0] == {"prompt": 0, "n_tokens": 4, "n_tokens_original": 6, "truncated": True}
    assert info[1]["truncated"] is False and info[1]["n_tokens_original"] == 2
    with pytest.raises(GeometryError, match=r"prompt 0 .*6 tokens.*block_size=4"):
        geo.encode_prompts(["abcdef", "xy"], tok, block_size=4, truncate=False)
    with pytest.raises(GeometryError, match="prompt 1 is empty"):
        geo.encode_prompts(["ok", "   "], tok, block_size=8)


def test_resolve_layer_indices():
    assert geo.resolve_layer_indices([0, -1, 2, 4], 5) == [0, 4, 2]
    for bad in (5, -6):
        with pytest.raises(GeometryError, match=rf"index {bad} is out of range.*-5\.\.4"):
            geo.resolve_layer_indices([bad], 5)


# ------------------------------------------------------------------ analyze_model / summary


def _prompt_ids(lengths=(12, 9, 15), seed=0):
    """Random ids from a small vocabulary, so that prompts repeat tokens."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 20, size=n).tolist() for n in lengths]


def _analysed(model, ids, exclude_first_token=False):
    """What analyze_model measures, rebuilt by hand: each prompt's analysed hidden states."""
    model.eval()
    with torch.no_grad():
        out = []
        for p in ids:
            hs = torch.stack(model(torch.tensor([p]), return_hidden_states=True).hidden_states)[:, 0]
            out.append(hs[:, geo.analysed_positions(p, exclude_first_token)].double())
    return out


def test_analyze_model_fake_model():
    model = FakeModel(n_layer=3)
    model.train()
    ids = _prompt_ids()
    df, mats = geo.analyze_model(model, ids, stage="init", step=7, heatmap_layers=[0, -1])
    assert list(df.columns) == geo.METRICS_COLUMNS
    n_total = 3 + 2
    # + the cross-prompt rows at every layer: cross_prompt_cosine and the two pooled TwoNN
    assert len(df) == len(ids) * n_total * len(met.PROMPT_METRICS) + 3 * n_total
    assert sorted(df["layer"].unique()) == list(range(n_total))
    names = df.drop_duplicates("layer").set_index("layer")["layer_name"].to_dict()
    assert names == {0: "embedding", 1: "block1", 2: "block2", 3: "block3", 4: "final_norm"}
    assert set(df["stage"]) == {"init"} and set(df["step"]) == {7}
    distinct = [len(set(p)) for p in ids]
    assert distinct != [12, 9, 15]  # the prompts do repeat tokens
    per_prompt = df[df["prompt"] != geo.CROSS_PROMPT]
    assert per_prompt.groupby("prompt")["n_tokens"].first().tolist() == distinct
    nan_rows = df[df["value"].isna()]
    assert df[df["metric"].str.startswith("twonn")]["null_mean"].notna().all()
    assert df[~df["metric"].str.startswith("twonn")][geo.NULL_COLUMNS].isna().all().all()
    assert set(nan_rows["metric"]) == {"update_norm", "knn_overlap"}
    assert set(nan_rows["layer"]) == {0}
    assert df[df["layer"] > 0]["value"].notna().all()
    # one unpadded forward per prompt, in eval mode, without autograd; training mode restored
    assert model.forward_calls == [(1, 12), (1, 9), (1, 15)]
    assert not any(model.grad_enabled_in_forward) and not any(model.training_in_forward)
    assert model.training
    # the cross-prompt rows: one per layer, over every analysed token of every prompt
    cross = df[df["prompt"] == geo.CROSS_PROMPT]
    assert set(cross["metric"]) == {"cross_prompt_cosine", "twonn_pooled", "twonn_mle_pooled"}
    base_rows = cross[cross.metric == "cross_prompt_cosine"]
    assert base_rows["layer"].tolist() == list(range(n_total)) and set(base_rows["n_tokens"]) == {sum(distinct)}
    states = _analysed(model, ids)
    analysed_ids = [[p[i] for i in geo.analysed_positions(p)] for p in ids]
    baseline = met.cross_prompt_cosine(states, analysed_ids)
    assert np.allclose(base_rows["value"], baseline.numpy())
    for metric, fn in (("mean_cosine", met.mean_pairwise_cosine), ("twonn", met.twonn_intrinsic_dimension)):
        got = per_prompt[per_prompt.metric == metric].sort_values(["prompt", "layer"])["value"].to_numpy()
        assert np.allclose(got, torch.cat([fn(h) for h in states]).numpy()), metric
    # each prompt's TwoNN beside the Gaussian floor of its own N (distinct tokens) and d = 16
    for metric, which in (("twonn", 0), ("twonn_mle", 1)):
        rows = per_prompt[per_prompt.metric == metric]
        for prompt, n in enumerate(distinct):
            floor = np.mean(met.gaussian_twonn_draws(n, 16)[which])
            assert np.allclose(rows[rows.prompt == prompt]["null_mean"], floor), (metric, prompt)
    # the pooled TwoNN: every id once over all prompts, with the floor of that N
    n_ids = len({t for p in ids for t in p})
    for metric, fn, which in (("twonn_pooled", met.twonn_intrinsic_dimension, 0),
                              ("twonn_mle_pooled", met.twonn_mle, 1)):
        rows = cross[cross.metric == metric].sort_values("layer")
        assert set(rows["n_tokens"]) == {n_ids} and rows["layer"].tolist() == list(range(n_total))
        assert np.allclose(rows["value"], fn(met.pooled_distinct(states, analysed_ids)).numpy())
        assert np.allclose(rows["null_mean"], np.mean(met.gaussian_twonn_draws(n_ids, 16)[which]))
    adjusted = per_prompt[per_prompt.metric == "adjusted_cosine"]["value"].to_numpy()
    raw = per_prompt[per_prompt.metric == "mean_cosine"]["value"].to_numpy()
    assert np.allclose(adjusted, raw - np.tile(baseline.numpy(), len(ids)))
    share = per_prompt[per_prompt.metric == "common_direction_share"].sort_values(["prompt", "layer"])["value"]
    direction = met.mean_direction(states)
    assert np.allclose(share, torch.cat([met.common_direction_share(h, direction) for h in states]).numpy())
    # heatmaps cover every position; restricted to the analysed ones they give mean_cosine
    assert set(mats) == {f"init/layer{j}/prompt{i}" for j in (0, 4) for i in range(3)}
    m = mats["init/layer4/prompt1"]
    assert m.dtype == np.float32 and m.shape == (9, 9)
    assert np.allclose(np.diag(m), 1.0, atol=1e-5)
    keep = geo.analysed_positions(ids[1])
    sub = m[np.ix_(keep, keep)]
    row = df.query("layer == 4 and prompt == 1 and metric == 'mean_cosine'")["value"].item()
    assert (sub.sum() - np.trace(sub)) / (len(keep) * (len(keep) - 1)) == pytest.approx(row, abs=1e-5)


def test_analyze_model_exclude_first_token_and_errors():
    model = FakeModel(n_layer=2)
    ids = [[3, 1, 2, 3, 4, 5, 1, 6, 7, 8], [9, 9, 10, 11, 12, 13]]
    df, _ = geo.analyze_model(model, ids, "trained", 100, [1], exclude_first_token=True)
    # prompt 0 after position 0: 1 2 3 4 5 (1) 6 7 8 -> 8 distinct; prompt 1: 9 10 11 12 13 -> 5
    assert df[df["prompt"] != geo.CROSS_PROMPT].groupby("prompt")["n_tokens"].first().tolist() == [8, 5]
    # a first token seen nowhere else: 9 and 6 distinct with it, 8 and 5 without. auto
    # drops it exactly when the tokenizer adds a BOS
    bos_ids = [[20, *ids[0][1:]], [21, *ids[1][1:]]]
    for setting, adds_bos, counts, size in ((True, False, [8, 5], 5), ("auto", True, [8, 5], 5),
                                            ("auto", False, [9, 6], 6), (False, True, [9, 6], 6)):
        df, mats = geo.analyze_model(model, bos_ids, "trained", 100, [1], exclude_first_token=setting,
                                     adds_bos=adds_bos)
        per_prompt = df[df["prompt"] != geo.CROSS_PROMPT]
        assert per_prompt.groupby("prompt")["n_tokens"].first().tolist() == counts, (setting, adds_bos)
        assert mats["trained/layer1/prompt1"].shape == (size, size)
    with pytest.raises(GeometryError, match="exclude_first_token must be auto, true or false, got 'yes'"):
        geo.analyze_model(model, ids, "init", 0, [0], exclude_first_token="yes")
    with pytest.raises(GeometryError, match=r"heatmap layer index 4 is out of range.*-4\.\.3"):
        geo.analyze_model(model, ids, "init", 0, [4])
    with pytest.raises(GeometryError, match=r"prompt 1 \(2 tokens\) has 2 distinct token"):
        geo.analyze_model(model, [[1, 2, 3], [4, 5]], "init", 0, [0])
    with pytest.raises(GeometryError, match=r"prompt 1 \(5 tokens\) has 2 distinct token\(s\) after excluding"):
        geo.analyze_model(model, [[1, 2, 3, 4], [7, 4, 4, 5, 5]], "init", 0, [0], exclude_first_token=True)
    with pytest.raises(GeometryError, match="needs the tied output embedding `token_embedding`; FakeModel"):
        geo.analyze_model(model, ids, "init", 0, [0], token_counts=np.ones(128))


def test_analyze_model_logit_frequency_correlation():
    from tga.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16,
                                    unigram_bias=True))
    ids = _prompt_ids((12, 9, 15))
    counts = np.arange(20, dtype=np.float64) ** 2  # token 0 never seen
    df, _ = geo.analyze_model(model, ids, "trained", 5, [], token_counts=counts)
    row = df[df.metric == "mean_logit_freq_corr"]
    assert len(row) == 1 and row["layer"].item() == 3 and row["layer_name"].item() == "final_norm"
    assert row["prompt"].item() == geo.CROSS_PROMPT
    states = _analysed(model, ids)
    # the prompts' tokens (ids < 20 drawn from 0..19, so most of the vocabulary) are left out
    in_prompts = sorted({t for p in ids for t in p})
    assert len(in_prompts) < 19
    r, null = met.mean_logit_frequency_correlation(
        met.mean_direction(states)[-1], model.token_embedding.weight[:20], counts, exclude_ids=in_prompts)
    assert row["value"].item() == pytest.approx(r)
    assert r != pytest.approx(met.mean_logit_frequency_correlation(
        met.mean_direction(states)[-1], model.token_embedding.weight[:20], counts)[0])
    band = met.null_band(null, r)
    assert row[geo.NULL_COLUMNS].iloc[0].tolist() == pytest.approx(list(band))
    assert row["null_lo"].item() < row["null_hi"].item() and 0 <= row["null_percentile"].item() <= 100
    # the logit bias is left out: a bias equal to log frequency with the embedding zeroed
    # read 1.0 when the bias counted; without it the logits are constant -> NaN
    with torch.no_grad():
        model.token_embedding.weight.zero_()
        model.logit_bias[1:20] = torch.log(torch.as_tensor(counts[1:]))
    df, _ = geo.analyze_model(model, ids, "trained", 5, [], token_counts=counts)
    assert math.isnan(df[df.metric == "mean_logit_freq_corr"]["value"].item())


def test_summarize_metrics():
    rows = [
        ("init", 0, 1, "block1", 0, 5, "mean_cosine", 1.0),
        ("init", 0, 1, "block1", 1, 5, "mean_cosine", 3.0),
        ("init", 0, 0, "embedding", 0, 5, "update_norm", float("nan")),
        ("init", 0, 0, "embedding", 1, 5, "update_norm", float("nan")),
        ("init", 0, 1, "block1", geo.CROSS_PROMPT, 10, "cross_prompt_cosine", 0.25),
        ("trained", 50, 1, "block1", 0, 5, "mean_cosine", 4.0),
        ("trained", 50, 1, "block1", geo.CROSS_PROMPT, 5, "cross_prompt_cosine", float("nan")),
    ]
    nulls = [(10.0, 8.0, 12.0, 0.0), (20.0, 16.0, 24.0, 50.0)] + [(math.nan,) * 4] * 5
    frame = pd.DataFrame([r + n for r, n in zip(rows, nulls)], columns=geo.METRICS_COLUMNS)
    s = geo.summarize_metrics(frame)
    assert list(s.columns) == geo.SUMMARY_COLUMNS
    # the null columns: the mean over prompts of each prompt's reference
    assert s.query("stage == 'init' and metric == 'mean_cosine'")[geo.NULL_COLUMNS].iloc[0].tolist() == [
        15.0, 12.0, 18.0, 25.0]
    assert s.query("metric == 'cross_prompt_cosine'")[geo.NULL_COLUMNS].isna().all().all()
    # a table written before the null columns existed still summarises, with NaN there
    old = geo.summarize_metrics(frame.drop(columns=geo.NULL_COLUMNS))
    assert list(old.columns) == geo.SUMMARY_COLUMNS and old[geo.NULL_COLUMNS].isna().all().all()
    assert old[["mean", "n_prompts"]].equals(s[["mean", "n_prompts"]])
    a = s.query("stage == 'init' and metric == 'mean_cosine'").iloc[0]
    assert (a["mean"], a["std"], a["n_prompts"]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    b = s.query("stage == 'trained' and metric == 'mean_cosine'").iloc[0]
    assert b["mean"] == 4.0 and math.isnan(b["std"]) and b["n_prompts"] == 1
    c = s.query("metric == 'update_norm'").iloc[0]
    assert math.isnan(c["mean"]) and c["n_prompts"] == 0
    # a cross-prompt value: itself, no spread, and the prompts it pools (0 when undefined)
    d = s.query("stage == 'init' and metric == 'cross_prompt_cosine'").iloc[0]
    assert d["mean"] == 0.25 and math.isnan(d["std"]) and d["n_prompts"] == 2
    e = s.query("stage == 'trained' and metric == 'cross_prompt_cosine'").iloc[0]
    assert math.isnan(e["mean"]) and e["n_prompts"] == 0


# ------------------------------------------------------------------ analyze_checkpoints


def _fake_model_module(monkeypatch):
    """Replace tga.model with a stub whose checkpoints are JSON files {seed, step}."""
    mod = types.ModuleType("tga.model")

    def load_checkpoint(path, map_location="cpu"):
        spec = json.loads(Path(path).read_text())
        extra = {"step": spec["step"]} if "step" in spec else {}
        return FakeModel(n_layer=2, block_size=spec.get("block_size", 32), seed=spec["seed"]), extra

    mod.load_checkpoint = load_checkpoint
    monkeypatch.setitem(sys.modules, "tga.model", mod)


def test_analyze_checkpoints_writes_files(tmp_path, monkeypatch):
    _fake_model_module(monkeypatch)
    (tmp_path / "init.json").write_text(json.dumps({"seed": 1}))
    (tmp_path / "final.json").write_text(json.dumps({"seed": 2, "step": 500}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# c\nhello world, this is a prompt\n" + "abcdefghij" * 4 + "k\n")
    out = tmp_path / "geo"
    with pytest.warns(UserWarning, match=r"prompts \[1\] were truncated"):
        geo.analyze_checkpoints(
            {"init": tmp_path / "init.json", "trained": tmp_path / "final.json"},
            prompts, CharTok(), out, heatmap_layers=[-1],
        )
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "prompts.csv", "similarity.npz", "summary.csv"]
    df = pd.read_csv(out / "metrics.csv")
    assert list(df.columns) == geo.METRICS_COLUMNS
    assert df.groupby("stage")["step"].unique().map(list).to_dict() == {"init": [0], "trained": [500]}
    # stages x (prompts x layers x per-prompt metrics + layers x 3 cross-prompt metrics); no
    # train token file, so no mean_logit_freq_corr
    assert len(df) == 2 * (2 * 4 * len(met.PROMPT_METRICS) + 3 * 4)
    assert set(df["metric"]) == set(met.METRIC_NAMES) - {"mean_logit_freq_corr"}
    summ = pd.read_csv(out / "summary.csv")
    assert list(summ.columns) == geo.SUMMARY_COLUMNS and len(summ) == 2 * 4 * (len(met.METRIC_NAMES) - 1)
    pt = pd.read_csv(out / "prompts.csv")
    assert pt["truncated"].tolist() == [False, True]
    assert pt["first_token_excluded"].tolist() == [False, False]  # auto, and CharTok adds no BOS
    assert pt["n_tokens_input"].tolist() == [29, 32] and pt["n_tokens_original"].tolist() == [29, 41]
    with np.load(out / "similarity.npz") as z:
        assert set(z.files) == {f"{s}/layer3/prompt{i}" for s in ("init", "trained") for i in (0, 1)} | {
            "tokens/prompt0", "tokens/prompt1", "layer_names"}
        assert "".join(z["tokens/prompt0"]) == "hello world, this is a prompt"
        assert "".join(z["tokens/prompt1"]) == ("abcdefghij" * 4)[:32]
        assert z["trained/layer3/prompt1"].shape == (32, 32)
        assert z["layer_names"].tolist() == ["embedding", "block1", "block2", "final_norm"]
        assert not np.allclose(z["init/layer3/prompt0"], z["trained/layer3/prompt0"])


class BosTok(CharTok):
    """CharTok behind a BOS token, as a pretrained Llama tokenizer encodes."""

    adds_bos = True

    def encode(self, text: str) -> list[int]:
        return [1] + super().encode(text)


def test_exclude_first_token_auto_follows_the_tokenizer_and_is_recorded(tmp_path, monkeypatch):
    _fake_model_module(monkeypatch)
    (tmp_path / "init.json").write_text(json.dumps({"seed": 1}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nsome prompt text\n")
    for tok, setting, excluded in ((BosTok(), "auto", True), (CharTok(), "auto", False), (BosTok(), False, False)):
        out = tmp_path / f"{type(tok).__name__}-{setting}"
        geo.analyze_checkpoints({"init": tmp_path / "init.json"}, prompts, tok, out, [0], exclude_first_token=setting)
        assert pd.read_csv(out / "prompts.csv")["first_token_excluded"].tolist() == [excluded] * 2
        n_tokens = pd.read_csv(out / "metrics.csv").query("prompt == 0")["n_tokens"].iloc[0]
        # "hello world" has 8 distinct characters; the BOS adds one unless it is dropped
        assert n_tokens == (9 if isinstance(tok, BosTok) and not excluded else 8), (type(tok).__name__, setting)
        with np.load(out / "similarity.npz") as z:
            assert len(z["tokens/prompt0"]) == 11 + (isinstance(tok, BosTok) and not excluded)
    assert not geo.tokenizer_adds_bos(CharTok()) and geo.tokenizer_adds_bos(BosTok())


def test_bundled_tokenizers_add_no_bos():
    from tga.tokenizers import CharTokenizer, GPT2Tokenizer

    char = CharTokenizer.from_text("abc")
    assert char.adds_bos is False and len(char.encode("ab")) == 2
    assert GPT2Tokenizer.adds_bos is False


def test_analyze_checkpoints_bad_heatmap_layer_and_missing_checkpoint(tmp_path, monkeypatch):
    _fake_model_module(monkeypatch)
    (tmp_path / "init.json").write_text(json.dumps({"seed": 1}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("some prompt text\n")
    with pytest.raises(GeometryError, match="heatmap layer index 9"):
        geo.analyze_checkpoints({"init": tmp_path / "init.json"}, prompts, CharTok(), tmp_path / "o", [9])
    with pytest.raises(GeometryError, match="checkpoint for stage 'trained' not found"):
        geo.analyze_checkpoints({"trained": tmp_path / "nope.pt"}, prompts, CharTok(), tmp_path / "o", [0])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_analyze_checkpoints_real_model_roundtrip(tmp_path):
    from tga.data import tokenize_to_file
    from tga.model import ModelConfig, Transformer, save_checkpoint
    from tga.tokenizers import CharTokenizer

    text = PROMPTS_FILE.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    tokenize_to_file(tmp_path / "train.txt", tok, tmp_path / "train.bin")
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init.pt", Transformer(cfg), {"step": 0})
    save_checkpoint(tmp_path / "final.pt", Transformer(cfg), {"step": 20})
    out = tmp_path / "geo"
    with pytest.warns(UserWarning, match="truncated"):
        geo.analyze_checkpoints(
            {"init": tmp_path / "init.pt", "trained": tmp_path / "final.pt"},
            PROMPTS_FILE, tok, out, heatmap_layers=[0, -1], exclude_first_token=True,
            train_tokens=tmp_path / "train.bin",
        )
    df = pd.read_csv(out / "metrics.csv")
    assert sorted(df["layer_name"].unique()) == ["block1", "block2", "embedding", "final_norm"]
    ids, _ = geo.encode_prompts(geo.load_prompts(PROMPTS_FILE), tok, 48)
    per_prompt = df[(df["prompt"] != geo.CROSS_PROMPT) & (df["stage"] == "init")]
    assert per_prompt.groupby("prompt")["n_tokens"].first().tolist() == [
        len(geo.analysed_positions(p, exclude_first_token=True)) for p in ids]
    assert df.query("layer > 0")["value"].notna().all()
    freq = df[df.metric == "mean_logit_freq_corr"]
    assert freq["stage"].tolist() == ["init", "trained"] and set(freq["layer"]) == {3}
    assert freq["value"].between(-1, 1).all()
    with np.load(out / "similarity.npz") as z:
        assert z["trained/layer3/prompt15"].shape == (47, 47)  # heatmaps keep every position after 0
        assert len(z["tokens/prompt15"]) == 47
    (tmp_path / "other.txt").write_text("abc")
    tokenize_to_file(tmp_path / "other.txt", CharTokenizer.from_text("abc"), tmp_path / "other.bin")
    with pytest.raises(GeometryError, match=r"other\.bin has vocab_size \d+ but the model's is"):
        geo.analyze_checkpoints({"init": tmp_path / "init.pt"}, PROMPTS_FILE, tok, tmp_path / "o2", [0],
                                train_tokens=tmp_path / "other.bin")


# ------------------------------------------------------------------ geometry_layers.png


METRICS_ROW = ("mean_cosine", "token_norm", "update_norm")


def _layers_summary() -> pd.DataFrame:
    """A summary.csv with the null columns: TwoNN below its floor, norms spanning 100x."""
    rows = []
    names = ["embedding", "block1", "block2", "block3", "final_norm"]
    for stage, step in (("init", 0), ("trained", 300)):
        for layer, name in enumerate(names):
            for metric, mean, std, null in (
                ("mean_cosine", 0.1 * layer, 0.02, None),
                ("token_norm", 0.3 * 3.2**layer, 0.1, None),
                ("update_norm", math.nan if layer == 0 else 0.1 * 3.5**layer, 0.05, None),
                ("twonn", 20.0 - 2 * layer, 3.0, (27.0, 18.0, 40.0, 5.0)),
                ("twonn_pooled", 25.0 - 3 * layer, math.nan, (60.0, 55.0, 66.0, 0.0)),
            ):
                rows.append(dict(stage=stage, step=step, layer=layer, layer_name=name, metric=metric, mean=mean,
                                 std=std, n_prompts=16, **dict(zip(geo.NULL_COLUMNS, null or (math.nan,) * 4))))
    return pd.DataFrame(rows)


def test_geometry_layers_draws_the_floors_readable_log_axes_and_labels_clear_of_the_title(tmp_path):
    from tga import figures_model
    from tga.figure_style import metric_short

    summary = _layers_summary()
    fig = figures_model._figure_geometry_layers(summary, "llama-preln, seed 0", "a data label",
                                                figures_model.GEOMETRY_LAYER_METRICS)
    panels = {ax.get_title().replace("\n", " "): ax for ax in fig.axes if ax.get_title()}
    floor_lines = {title: [ln for ln in ax.get_lines() if ln.get_label() == FLOOR_LABEL]
                   for title, ax in panels.items()}
    # the two TwoNN panels carry their Gaussian floor (the null_mean column), the others none
    twonn, pooled = panels[metric_short("twonn")], panels[metric_short("twonn_pooled")]
    assert list(floor_lines[metric_short("twonn")][0].get_ydata()) == [27.0] * 5
    assert list(floor_lines[metric_short("twonn_pooled")][0].get_ydata()) == [60.0] * 5
    assert not floor_lines[metric_short("mean_cosine")] and not floor_lines[metric_short("token_norm")]
    assert twonn.get_ylim()[0] == 0 and pooled.get_ylim()[1] >= 66.0  # the band fits in the panel
    # the legend (in the free cell) names the floor
    legend_texts = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert FLOOR_LABEL in legend_texts
    # the log axes: plain numbers at several ticks inside the data range, not one or two powers of ten
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    for metric in ("token_norm", "update_norm"):
        ax = panels[metric_short(metric)]
        assert ax.get_yscale() == "log"
        lo, hi = ax.get_ylim()
        shown = [t.get_text() for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if lo <= v <= hi]
        assert len([s for s in shown if s]) >= 4, (metric, shown)
        assert all("10^" not in s and "$" not in s for s in shown), shown
    # every y label ends below the figure title (the update-norm label ran into it), also
    # in the one-row figure of the three panels it used to have
    row = figures_model._figure_geometry_layers(  # the quick config's title, with which the label ran over
        summary, "llama-preln, seed 0", "WikiText-2 sample (CPU demo): trained on part of wiki.valid.raw, "
        "evaluated on part of wiki.test.raw", METRICS_ROW)
    for drawn in (fig, row):
        renderer = FigureCanvasAgg(drawn).get_renderer()
        drawn.draw(renderer)
        title_bottom = drawn._suptitle.get_window_extent(renderer).y0
        for ax in drawn.axes:
            if ax.get_ylabel():
                assert ax.yaxis.label.get_window_extent(renderer).y1 < title_bottom, ax.get_ylabel()
    out = figures_model.plot_geometry_layers(summary, tmp_path / "g.png", "v", "d")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hf_tokenizer_says_whether_it_adds_a_bos():
    """tga.pretrained.HFTokenizer probes its tokenizer: a Llama-style post-processor that
    puts <s> first is a BOS (auto then drops position 0); a tokenizer that has a BOS token
    but does not add it (GPT-2's) is not."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from tga.pretrained import HFTokenizer

    def hf(add_bos: bool) -> HFTokenizer:
        words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        if add_bos:
            words.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>")
        return HFTokenizer(fast, "tiny")

    with_bos, without = hf(True), hf(False)
    assert with_bos.encode("a b") == [1, 2, 3] and with_bos.adds_bos and geo.tokenizer_adds_bos(with_bos)
    assert without.encode("a b") == [2, 3] and not without.adds_bos
    assert geo.resolve_exclude_first_token("auto", with_bos.adds_bos) is True
    assert geo.resolve_exclude_first_token("auto", without.adds_bos) is False
