"""Tests for tga.geometry: hand-computed metric values on tiny tensors, the prompt/IO
error paths, and the analysis driver on a fake model (plus one round trip through a
real tga checkpoint)."""

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
from tga.geometry import GeometryError

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "config" / "prompts.txt"


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


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

    def forward(self, idx, targets=None, return_hidden_states=False):
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
        return SimpleNamespace(logits=x, loss=None, hidden_states=hs if return_hidden_states else None)


class CharTok:
    """Toy tokenizer: one id per character (code point mod 128)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 128 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


# ------------------------------------------------------------------ cosine / norms


def test_cosine_orthogonal_identical_and_60_degrees():
    assert geo.mean_pairwise_cosine(t([[1, 0], [0, 1]])).item() == pytest.approx(0.0, abs=1e-12)
    assert geo.mean_pairwise_cosine(t([[2, 1], [2, 1], [4, 2]])).item() == pytest.approx(1.0)
    sixty = t([[1, 0], [0.5, math.sqrt(3) / 2]])
    assert geo.mean_pairwise_cosine(sixty).item() == pytest.approx(0.5)
    # off-diagonal mean only: three vectors with pairwise cosines 1, 0, 0 -> 1/3
    assert geo.mean_pairwise_cosine(t([[1, 0], [3, 0], [0, 2]])).item() == pytest.approx(1 / 3)


def test_cosine_matrix_values_and_zero_vector_guard():
    m = geo.cosine_similarity_matrix(t([[1, 0], [1, 1], [0, 0]]))
    s = 1 / math.sqrt(2)
    expected = t([[1, s, 0], [s, 1, 0], [0, 0, 0]])
    assert m.shape == (3, 3)
    assert torch.allclose(m, expected)
    assert torch.isfinite(geo.mean_pairwise_cosine(t([[0, 0], [1, 0]])))


def test_layer_batched_metrics_match_per_layer_calls():
    h = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(1))
    for fn in (geo.mean_pairwise_cosine, geo.mean_centered_cosine, geo.mean_token_norm,
               geo.effective_rank, geo.rank1_residual, geo.twonn_intrinsic_dimension):
        batched = fn(h)
        assert batched.shape == (4,)
        assert torch.allclose(batched, torch.stack([fn(h[i]) for i in range(4)])), fn.__name__
    assert geo.cosine_similarity_matrix(h).shape == (4, 7, 7)


def test_token_norm_and_update_norm():
    assert geo.mean_token_norm(t([[3, 4], [0, 1]])).item() == pytest.approx(3.0)
    h = t([[[0, 0], [1, 1]], [[3, 4], [1, 1]], [[3, 4], [1, 2]]])  # (L=3, T=2, d=2)
    u = geo.mean_update_norm(h)
    assert math.isnan(u[0].item())
    assert u[1].item() == pytest.approx(2.5)  # (5 + 0) / 2
    assert u[2].item() == pytest.approx(0.5)  # (0 + 1) / 2
    with pytest.raises(GeometryError, match="stacked layers"):
        geo.mean_update_norm(t([[1, 2], [3, 4]]))


def test_centered_cosine_hand_values():
    # mean (1, 1); centred (1,-1), (-1,-1), (0,2): cosines 0, -1/sqrt2, -1/sqrt2
    h = t([[2, 0], [0, 0], [1, 3]])
    assert geo.mean_centered_cosine(h).item() == pytest.approx(-math.sqrt(2) / 3)
    # two distinct tokens always centre to x and -x
    assert geo.mean_centered_cosine(t([[5, 1], [2, 7]])).item() == pytest.approx(-1.0)
    # a huge shared offset makes raw cosine ~1 but leaves the centred value unchanged
    shifted = h + t([1000, -2000])
    assert geo.mean_pairwise_cosine(shifted).item() > 0.99
    assert geo.mean_centered_cosine(shifted).item() == pytest.approx(-math.sqrt(2) / 3)
    # identical tokens centre to zero vectors: guarded, not NaN
    assert geo.mean_centered_cosine(t([[1, 2], [1, 2], [1, 2]])).item() == 0.0


# ------------------------------------------------------------------ rank metrics


def test_effective_rank():
    assert geo.effective_rank(torch.eye(4, dtype=torch.float64)).item() == pytest.approx(4.0)
    # 3 orthonormal rows in 5-D, equally scaled: three equal singular values
    q, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert geo.effective_rank(7.0 * q.T).item() == pytest.approx(3.0)
    rank1 = torch.outer(t([1, 2, 3, 4]), t([0.5, -1, 2]))
    assert geo.effective_rank(rank1).item() == pytest.approx(1.0, abs=1e-9)
    # diag(3, 1): p = (3/4, 1/4)
    p = np.array([0.75, 0.25])
    assert geo.effective_rank(t([[3, 0], [0, 1]])).item() == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert math.isnan(geo.effective_rank(torch.zeros(3, 2)).item())


def test_rank1_residual():
    rank1 = torch.outer(t([1, -2, 3]), t([4, 0, 1, 2]))
    assert geo.rank1_residual(rank1).item() == pytest.approx(0.0, abs=1e-9)
    # diag(3, 4): best rank-1 keeps the 4, residual ||3|| / ||(3,4)|| = 3/5
    assert geo.rank1_residual(t([[3, 0], [0, 4]])).item() == pytest.approx(0.6)
    assert geo.rank1_residual(torch.eye(4, dtype=torch.float64)).item() == pytest.approx(math.sqrt(3 / 4))


# ------------------------------------------------------------------ TwoNN


def _plane_in_10d(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 2, dtype=torch.float64, generator=g)
    basis, _ = torch.linalg.qr(torch.randn(10, 2, dtype=torch.float64, generator=g))
    return pts @ basis.T + torch.randn(10, dtype=torch.float64, generator=g)


def test_twonn_uniform_plane_in_10d_is_about_two():
    # The MLE has relative std ~ 1/sqrt(N): for N = 1000, d = 2 that is ~0.063; boundary
    # effects of the unit square bias it by a few percent. 0.25 is ~4 sigma of slack, while
    # a wrong estimator (e.g. 1 or 3, or the ambient 10) is far outside it.
    ids = [geo.twonn_intrinsic_dimension(_plane_in_10d(1000, seed)).item() for seed in range(3)]
    for d in ids:
        assert abs(d - 2.0) < 0.25, ids


def test_twonn_line_and_duplicates():
    g = torch.Generator().manual_seed(5)
    line = torch.rand(400, 1, dtype=torch.float64, generator=g) * t([[1, 2, -1, 0.5]])
    assert abs(geo.twonn_intrinsic_dimension(line).item() - 1.0) < 0.2
    # duplicated points are collapsed: the estimate equals the one without the copies
    pts = _plane_in_10d(200, 9)
    with_dups = torch.cat([pts, pts[:50], pts[10:20]])
    assert geo.twonn_intrinsic_dimension(with_dups).item() == pytest.approx(
        geo.twonn_intrinsic_dimension(pts).item()
    )
    # hand value: points 0, 1, 3 on a line: (r1, r2) = (1, 3), (1, 2), (2, 3) -> mu = 3, 2, 1.5
    pts3 = t([[0.0], [1.0], [3.0]])
    expected = 2 / (math.log(3) + math.log(2) + math.log(1.5))
    assert geo.twonn_intrinsic_dimension(pts3).item() == pytest.approx(expected)
    with pytest.raises(GeometryError, match="at least 3 tokens"):
        geo.twonn_intrinsic_dimension(t([[0, 1], [1, 0]]))


# ------------------------------------------------------------------ neighbourhood overlap


def test_neighbourhood_overlap_identical_layers_is_one():
    h = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(3)).repeat(3, 1, 1)
    ov = geo.neighbourhood_overlap(h, k=3)
    assert math.isnan(ov[0].item())
    assert ov[1:].tolist() == [1.0, 1.0]


def test_neighbourhood_overlap_hand_case():
    # 1-D positions, k=1. Layer A: 0,1,3,10 -> NN = [1,0,1,2]; layer B: 0,5,6,20 -> NN = [1,2,1,2]
    h = t([[[0], [1], [3], [10]], [[0], [5], [6], [20]]])
    ov = geo.neighbourhood_overlap(h, k=1)
    assert ov[1].item() == pytest.approx(0.75)
    # k is clipped to T-1 = 3: every other token is a neighbour, so the overlap is 1
    rnd = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    assert geo.neighbourhood_overlap(rnd, k=10)[1].item() == 1.0
    with pytest.raises(GeometryError, match="knn_k"):
        geo.neighbourhood_overlap(rnd, k=0)


# ------------------------------------------------------------------ all metrics of a prompt


def test_compute_layer_metrics_matches_the_single_functions():
    h = torch.randn(5, 12, 8, generator=torch.Generator().manual_seed(2))
    m = geo.compute_layer_metrics(h, knn_k=4)
    assert list(m) == list(geo.METRIC_NAMES)
    ref = {
        "mean_cosine": geo.mean_pairwise_cosine(h),
        "centered_cosine": geo.mean_centered_cosine(h),
        "token_norm": geo.mean_token_norm(h),
        "update_norm": geo.mean_update_norm(h),
        "effective_rank": geo.effective_rank(h),
        "rank1_residual": geo.rank1_residual(h),
        "intrinsic_dim": geo.twonn_intrinsic_dimension(h),
        "knn_overlap": geo.neighbourhood_overlap(h, k=4),
    }
    for name, v in ref.items():
        assert v.shape == (5,)
        assert torch.allclose(m[name], v, equal_nan=True), name


def test_exclude_first_token():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 9, 6, dtype=torch.float64, generator=g)
    h[:, 0] = 0.0
    h[:, 0, 0] = 500.0  # an attention-sink-like token with a huge norm
    full = geo.compute_layer_metrics(h)
    excl = geo.compute_layer_metrics(h, exclude_first_token=True)
    rest = geo.compute_layer_metrics(h[:, 1:])
    for name in geo.METRIC_NAMES:
        assert torch.allclose(excl[name], rest[name], equal_nan=True), name
    assert (full["token_norm"] > excl["token_norm"] + 40).all()  # 500/9 dominates the mean
    assert (full["rank1_residual"] < excl["rank1_residual"]).all()
    with pytest.raises(GeometryError, match="after excluding the first token"):
        geo.compute_layer_metrics(h[:, :3], exclude_first_token=True)


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
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 128, size=n).tolist() for n in lengths]


def test_analyze_model_fake_model():
    model = FakeModel(n_layer=3)
    model.train()
    ids = _prompt_ids()
    df, mats = geo.analyze_model(model, ids, stage="init", step=7, heatmap_layers=[0, -1])
    assert list(df.columns) == geo.METRICS_COLUMNS
    n_total = 3 + 2
    assert len(df) == len(ids) * n_total * len(geo.METRIC_NAMES)
    assert sorted(df["layer"].unique()) == list(range(n_total))
    names = df.drop_duplicates("layer").set_index("layer")["layer_name"].to_dict()
    assert names == {0: "embedding", 1: "block1", 2: "block2", 3: "block3", 4: "final_norm"}
    assert set(df["stage"]) == {"init"} and set(df["step"]) == {7}
    assert df.groupby("prompt")["n_tokens"].first().tolist() == [12, 9, 15]
    nan_rows = df[df["value"].isna()]
    assert set(nan_rows["metric"]) == {"update_norm", "knn_overlap"}
    assert set(nan_rows["layer"]) == {0}
    assert df[df["layer"] > 0]["value"].notna().all()
    # one unpadded forward per prompt, in eval mode, without autograd; training mode restored
    assert model.forward_calls == [(1, 12), (1, 9), (1, 15)]
    assert not any(model.grad_enabled_in_forward) and not any(model.training_in_forward)
    assert model.training
    assert set(mats) == {f"init/layer{j}/prompt{i}" for j in (0, 4) for i in range(3)}
    m = mats["init/layer4/prompt1"]
    assert m.dtype == np.float32 and m.shape == (9, 9)
    assert np.allclose(np.diag(m), 1.0, atol=1e-5)
    # the matrix agrees with the mean_cosine row
    row = df.query("layer == 4 and prompt == 1 and metric == 'mean_cosine'")["value"].item()
    assert (m.sum() - np.trace(m)) / (9 * 8) == pytest.approx(row, abs=1e-5)


def test_analyze_model_exclude_first_token_and_errors():
    model = FakeModel(n_layer=2)
    ids = _prompt_ids((10, 6))
    df, mats = geo.analyze_model(model, ids, "trained", 100, [1], exclude_first_token=True)
    assert df.groupby("prompt")["n_tokens"].first().tolist() == [9, 5]
    assert mats["trained/layer1/prompt1"].shape == (5, 5)
    with pytest.raises(GeometryError, match=r"heatmap layer index 4 is out of range.*-4\.\.3"):
        geo.analyze_model(model, ids, "init", 0, [4])
    with pytest.raises(GeometryError, match=r"prompt 1 \(2 tokens\)"):
        geo.analyze_model(model, [[1, 2, 3], [4, 5]], "init", 0, [0])


def test_summarize_metrics():
    rows = [
        ("init", 0, 1, "block1", 0, 5, "mean_cosine", 1.0),
        ("init", 0, 1, "block1", 1, 5, "mean_cosine", 3.0),
        ("init", 0, 0, "embedding", 0, 5, "update_norm", float("nan")),
        ("init", 0, 0, "embedding", 1, 5, "update_norm", float("nan")),
        ("trained", 50, 1, "block1", 0, 5, "mean_cosine", 4.0),
    ]
    s = geo.summarize_metrics(pd.DataFrame(rows, columns=geo.METRICS_COLUMNS))
    assert list(s.columns) == geo.SUMMARY_COLUMNS
    a = s.query("stage == 'init' and metric == 'mean_cosine'").iloc[0]
    assert (a["mean"], a["std"], a["n_prompts"]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    b = s.query("stage == 'trained'").iloc[0]
    assert b["mean"] == 4.0 and math.isnan(b["std"]) and b["n_prompts"] == 1
    c = s.query("metric == 'update_norm'").iloc[0]
    assert math.isnan(c["mean"]) and c["n_prompts"] == 0


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
    prompts.write_text("# c\nhello world, this is a prompt\n" + "x" * 40 + "y\n")
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
    assert len(df) == 2 * 2 * 4 * len(geo.METRIC_NAMES)  # stages x prompts x layers x metrics
    summ = pd.read_csv(out / "summary.csv")
    assert list(summ.columns) == geo.SUMMARY_COLUMNS and len(summ) == 2 * 4 * len(geo.METRIC_NAMES)
    pt = pd.read_csv(out / "prompts.csv")
    assert pt["truncated"].tolist() == [False, True]
    assert pt["n_tokens_input"].tolist() == [29, 32] and pt["n_tokens_original"].tolist() == [29, 41]
    with np.load(out / "similarity.npz") as z:
        assert set(z.files) == {f"{s}/layer3/prompt{i}" for s in ("init", "trained") for i in (0, 1)} | {
            "tokens/prompt0", "tokens/prompt1", "layer_names"}
        assert "".join(z["tokens/prompt0"]) == "hello world, this is a prompt"
        assert z["trained/layer3/prompt1"].shape == (32, 32)
        assert z["layer_names"].tolist() == ["embedding", "block1", "block2", "final_norm"]
        assert not np.allclose(z["init/layer3/prompt0"], z["trained/layer3/prompt0"])


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
    model_mod = pytest.importorskip("tga.model")
    cfg = model_mod.ModelConfig(vocab_size=128, block_size=48, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model_mod.save_checkpoint(tmp_path / "init.pt", model_mod.Transformer(cfg), {"step": 0})
    model_mod.save_checkpoint(tmp_path / "final.pt", model_mod.Transformer(cfg), {"step": 20})
    out = tmp_path / "geo"
    with pytest.warns(UserWarning, match="truncated"):
        geo.analyze_checkpoints(
            {"init": tmp_path / "init.pt", "trained": tmp_path / "final.pt"},
            PROMPTS_FILE, CharTok(), out, heatmap_layers=[0, -1], exclude_first_token=True,
        )
    df = pd.read_csv(out / "metrics.csv")
    assert sorted(df["layer_name"].unique()) == ["block1", "block2", "embedding", "final_norm"]
    assert set(df["n_tokens"]) == {47}  # every default prompt truncated to 48 chars, minus token 0
    assert df.query("layer > 0")["value"].notna().all()
    with np.load(out / "similarity.npz") as z:
        assert z["trained/layer3/prompt15"].shape == (47, 47)
        assert len(z["tokens/prompt15"]) == 47
