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
    for fn in (geo.mean_pairwise_cosine, geo.mean_token_norm, geo.effective_rank, geo.rank1_residual,
               geo.twonn_intrinsic_dimension, geo.twonn_mle):
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


# ------------------------------------------------------------------ which tokens


def test_analysed_positions_are_first_occurrences():
    assert geo.analysed_positions([5, 7, 5, 9, 7, 7, 2]) == [0, 1, 3, 6]
    # position 0 goes first, so a later copy of its id is the first occurrence that counts
    assert geo.analysed_positions([5, 7, 5, 9, 7, 7, 2], exclude_first_token=True) == [1, 2, 3, 6]
    assert geo.analysed_positions([3, 3, 3]) == [0]
    assert geo.analysed_positions([]) == []


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
    # identical vectors span one direction
    assert geo.effective_rank(t([[1, 2], [1, 2], [1, 2]])).item() == pytest.approx(1.0)


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


def _gaussian(n: int, d: int, seed: int, ambient: int = 0) -> torch.Tensor:
    """n isotropic Gaussian points in d dims, rotated into ``ambient`` dims if given."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    if ambient:
        basis, _ = torch.linalg.qr(torch.randn(ambient, d, dtype=torch.float64, generator=g))
        x = x @ basis.T
    return x


@pytest.mark.parametrize("d, n, tol", [(5, 1000, 0.6), (10, 2000, 1.0)])
def test_twonn_isotropic_gaussian_is_its_dimension(d, n, tol):
    # Measured over 10 seeds: d=5, N=1000 gives 5.09 +- 0.16 (fit) and 5.06 +- 0.16 (MLE);
    # d=10, N=2000 gives 9.73 +- 0.26 (the Gaussian's curved density biases it down a
    # little). tol is ~4 s.d. (plus that bias): the ambient dimension 64 or d +- 2 fail it.
    for seed in range(3):
        x = _gaussian(n, d, seed, ambient=64)
        assert abs(geo.twonn_intrinsic_dimension(x).item() - d) < tol, (d, seed)
        assert abs(geo.twonn_mle(x).item() - d) < tol, (d, seed)


def test_twonn_points_on_a_circle_is_one():
    # 500 points on a circle in a 2-D plane of 16-D space; measured 0.97-1.04 over 3 seeds
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        theta = torch.rand(500, dtype=torch.float64, generator=g) * 2 * math.pi
        basis, _ = torch.linalg.qr(torch.randn(16, 2, dtype=torch.float64, generator=g))
        circle = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1) @ basis.T
        assert abs(geo.twonn_intrinsic_dimension(circle).item() - 1.0) < 0.15, seed
        assert abs(geo.twonn_mle(circle).item() - 1.0) < 0.15, seed


def test_twonn_uniform_plane_in_10d_is_about_two():
    # relative s.d. ~ 1/sqrt(N) = 0.03 at N = 1000; 0.25 is ~4 s.d. of slack
    for seed in range(3):
        pts = _plane_in_10d(1000, seed)
        assert abs(geo.twonn_intrinsic_dimension(pts).item() - 2.0) < 0.25, seed
        assert abs(geo.twonn_mle(pts).item() - 2.0) < 0.25, seed


def test_twonn_hand_values_fit_and_mle():
    # points 0, 1, 3 on a line: (r1, r2) = (1, 3), (1, 2), (2, 3) -> mu = 3, 2, 1.5
    pts3 = t([[0.0], [1.0], [3.0]])
    assert geo.twonn_mle(pts3).item() == pytest.approx(2 / (math.log(3) + math.log(2) + math.log(1.5)))
    # Facco: keep int(0.9 * 3) = 2 smallest mu (1.5, 2) with F = 1/3, 2/3, so
    # y = -log(1 - F) = log 1.5, log 3; slope through the origin = sum(xy) / sum(x^2)
    x = [math.log(1.5), math.log(2)]
    y = [math.log(1.5), math.log(3)]
    fit = (x[0] * y[0] + x[1] * y[1]) / (x[0] ** 2 + x[1] ** 2)
    assert geo.twonn_intrinsic_dimension(pts3).item() == pytest.approx(fit)
    assert abs(fit - geo.twonn_mle(pts3).item()) > 0.1  # the two estimators really differ
    with pytest.raises(GeometryError, match="at least 3 tokens"):
        geo.twonn_intrinsic_dimension(t([[0, 1], [1, 0]]))
    # a lattice: every mu == 1 -> the CDF is a step at log(mu) = 0, slope infinite
    square = t([[0, 0], [1, 0], [0, 1], [1, 1]])
    assert geo.twonn_intrinsic_dimension(square).item() == math.inf and geo.twonn_mle(square).item() == math.inf


def test_twonn_keeps_one_copy_of_coinciding_points():
    pts = _plane_in_10d(200, 9)
    with_dups = torch.cat([pts, pts[:50], pts[10:20]])
    for fn in (geo.twonn_intrinsic_dimension, geo.twonn_mle):
        assert fn(with_dups).item() == pytest.approx(fn(pts).item()), fn.__name__
    # identical vectors: a single distinct point, no neighbours -> undefined
    assert math.isnan(geo.twonn_intrinsic_dimension(t([[1, 2], [1, 2], [1, 2]])).item())


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


def test_neighbourhood_overlap_breaks_exact_ties_by_index():
    # Layer A: four identical vectors, every distance ties at 0 -> each token's k=2
    # neighbours are the two lowest other indices: 0:{1,2} 1:{0,2} 2:{0,1} 3:{0,1}.
    # Layer B: 1-D positions 0,1,2,3; token 2 ties between 1 and 3 (both at 1), token 3
    # has 2 then 1: 0:{1,2} 1:{0,2} 2:{1,3} 3:{1,2}. Overlaps 1, 1, 1/2, 1/2 -> 0.75.
    a = torch.zeros(4, 1, dtype=torch.float64)
    b = t([[0], [1], [2], [3]])
    assert geo.neighbourhood_overlap(torch.stack([a, b]), k=2)[1].item() == 0.75
    member = geo._knn_membership(geo._pairwise_distances(torch.stack([a, b])), 2)
    assert member[0].nonzero().tolist() == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1], [3, 0], [3, 1]]
    # the same rule at both layers: identical tied layers overlap fully
    assert geo.neighbourhood_overlap(torch.stack([a, a, a]), k=2)[1:].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ common direction


def test_common_direction_share_constructed_case():
    # h_i = a e1 + b_i with b_i orthogonal to e1, |b_i| = c and sum b_i = 0: the mean is
    # a e1 and every token has cos^2 = a^2 / (a^2 + c^2) with it
    a, c = 3.0, 4.0
    h = t([[a, c, 0], [a, -c, 0], [a, 0, c], [a, 0, -c]])
    direction = geo.mean_direction([h.unsqueeze(0)])[0]
    assert torch.allclose(direction, t([a, 0, 0]))
    assert geo.common_direction_share(h, direction).item() == pytest.approx(a * a / (a * a + c * c))
    # identical vectors lie entirely along their mean; orthogonal ones share 1/d of it
    assert geo.common_direction_share(t([[1, 2], [1, 2]]), t([1, 2])).item() == pytest.approx(1.0)
    eye = torch.eye(4, dtype=torch.float64)
    assert geo.common_direction_share(eye, eye.mean(0)).item() == pytest.approx(1 / 4)
    # stacked layers, one direction per layer
    stacked = geo.common_direction_share(torch.stack([h, eye[:, :3]]), t([[1, 0, 0], [0, 0, 1]]))
    assert stacked.tolist() == pytest.approx([a * a / (a * a + c * c), 1 / 4])
    with pytest.raises(GeometryError, match="common direction of shape"):
        geo.common_direction_share(h, t([1, 0]))


def test_common_direction_share_isotropic_is_one_over_d():
    x = _gaussian(20000, 8, seed=1)
    # E[cos^2] with a fixed unit direction is exactly 1/d for isotropic vectors
    share = geo.common_direction_share(x, t([1, 0, 0, 0, 0, 0, 0, 0])).item()
    assert share == pytest.approx(1 / 8, abs=0.005)  # s.e. ~ 0.11 / sqrt(20000) = 0.0008


# ------------------------------------------------------------------ Ethayarajh's baseline


def test_cross_prompt_pairs_are_across_prompts_distinct_and_seeded():
    sizes = [3, 1, 4]
    first, second = geo.cross_prompt_pairs(sizes, n_pairs=5000, seed=3)
    owner = np.repeat([0, 1, 2], sizes)
    assert len(first) == len(second) == 5000
    assert (owner[first] != owner[second]).all()
    assert set(first) == set(range(8)) and set(second) == set(range(8))  # every token is reachable
    again = geo.cross_prompt_pairs(sizes, n_pairs=5000, seed=3)
    assert (again[0] == first).all() and (again[1] == second).all()
    # with ids, a pair never holds one id twice: prompt 0 = ids (5, 6), prompt 1 = (5,)
    f, s2 = geo.cross_prompt_pairs([2, 1], token_ids=[5, 6, 5], n_pairs=200)
    assert {(int(i), int(j)) for i, j in zip(f, s2)} == {(1, 2), (2, 1)}
    for no_pair in ([4], [4, 0], ):
        assert geo.cross_prompt_pairs(no_pair)[0].size == 0
    assert geo.cross_prompt_pairs([1, 1], token_ids=[7, 7])[0].size == 0


def test_cross_prompt_cosine_constructed_cases():
    e1, e2 = t([1, 0, 0]), t([0, 1, 0])
    a = torch.stack([e1, 2 * e1, 5 * e1]).unsqueeze(0)  # (L=1, 3, 3), all along e1
    b = torch.stack([e2, 3 * e2]).unsqueeze(0)
    diag = torch.stack([e1 + e2, 2 * (e1 + e2)]).unsqueeze(0)
    assert geo.cross_prompt_cosine([a, b]).item() == pytest.approx(0.0, abs=1e-15)
    assert geo.cross_prompt_cosine([a, a]).item() == pytest.approx(1.0)
    assert geo.cross_prompt_cosine([a, diag]).item() == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(geo.cross_prompt_cosine([a]).item())  # one prompt: no pair


def test_cross_prompt_cosine_estimates_the_mean_over_cross_pairs():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(2, n, 6, dtype=torch.float64, generator=g) + 1.0 for n in (5, 9, 7)]
    got = geo.cross_prompt_cosine(prompts)
    # exact expectation: first token uniform over all, second uniform over other prompts
    u = [geo._unit(p) for p in prompts]
    owner = [i for i, p in enumerate(prompts) for _ in range(p.shape[1])]
    pooled = torch.cat(u, dim=1)
    cos = pooled @ pooled.transpose(-2, -1)
    other = torch.tensor([[owner[i] != owner[j] for j in range(len(owner))] for i in range(len(owner))])
    expected = ((cos * other).sum(-1) / other.sum(-1)).mean(-1)
    assert torch.allclose(got, expected, atol=0.01)  # s.e. of 10000 pairs ~ 0.3 / 100
    assert got.shape == (2,)


# ------------------------------------------------------------------ Gao et al.'s frequency direction


def test_mean_logit_frequency_correlation_constructed_embedding():
    counts = np.array([100.0, 10.0, 1.0, 0.0, 1000.0])
    log_c = np.log(np.where(counts > 0, counts, 1.0))
    # embedding rows whose logits with the mean vector m are 2 log(count) - 7 (and garbage
    # for the unseen token 3, which is left out): exactly a unigram model, r = 1
    m = t([1.0, 0.5])
    emb = torch.stack([t([(2 * lc - 7) , 0.0]) for lc in log_c])
    emb[3] = t([50.0, 0.0])
    assert geo.mean_logit_frequency_correlation(m, emb, None, counts) == pytest.approx(1.0)
    assert geo.mean_logit_frequency_correlation(m, -emb, None, counts) == pytest.approx(-1.0)
    # the bias counts too: zero embedding logits, bias = log frequency -> r = 1
    bias = torch.as_tensor(log_c)
    assert geo.mean_logit_frequency_correlation(m, torch.zeros(5, 2), bias, counts) == pytest.approx(1.0)
    # hand value: logits (1, 0, 0, *, 0) against log counts of the seen tokens
    x = np.array([1.0, 0, 0, 0])
    y = np.log([100.0, 10.0, 1.0, 1000.0])
    emb = torch.zeros(5, 2, dtype=torch.float64)
    emb[0, 0] = 1.0
    assert geo.mean_logit_frequency_correlation(t([1.0, 0.0]), emb, None, counts) == pytest.approx(
        np.corrcoef(x, y)[0, 1])
    assert math.isnan(geo.mean_logit_frequency_correlation(m, torch.zeros(5, 2), None, counts))  # constant
    with pytest.raises(GeometryError, match="frequency correlation needs"):
        geo.mean_logit_frequency_correlation(m, emb, None, counts[:3])


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


# ------------------------------------------------------------------ all metrics of a prompt


def test_compute_layer_metrics_matches_the_single_functions():
    h = torch.randn(5, 12, 8, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    baseline = torch.linspace(0.1, 0.5, 5)
    m = geo.compute_layer_metrics(h, direction, baseline, knn_k=4)
    assert list(m) == list(geo.PROMPT_METRICS)
    ref = {
        "mean_cosine": geo.mean_pairwise_cosine(h),
        "adjusted_cosine": geo.mean_pairwise_cosine(h) - baseline.double(),
        "common_direction_share": geo.common_direction_share(h, direction),
        "token_norm": geo.mean_token_norm(h),
        "update_norm": geo.mean_update_norm(h),
        "effective_rank": geo.effective_rank(h),
        "rank1_residual": geo.rank1_residual(h),
        "twonn": geo.twonn_intrinsic_dimension(h),
        "twonn_mle": geo.twonn_mle(h),
        "knn_overlap": geo.neighbourhood_overlap(h, k=4),
    }
    for name, v in ref.items():
        assert v.shape == (5,)
        assert torch.allclose(m[name], v, equal_nan=True), name
    with pytest.raises(GeometryError, match="only 2 distinct token"):
        geo.compute_layer_metrics(h[:, :2], direction, baseline)


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
    all_pos = torch.stack([geo.twonn_intrinsic_dimension(h) for h in every]).mean(0)
    assert all_pos[1] / all_pos[0] < 0.25, all_pos.tolist()


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
    assert len(df) == len(ids) * n_total * len(geo.PROMPT_METRICS) + n_total  # + cross_prompt_cosine
    assert sorted(df["layer"].unique()) == list(range(n_total))
    names = df.drop_duplicates("layer").set_index("layer")["layer_name"].to_dict()
    assert names == {0: "embedding", 1: "block1", 2: "block2", 3: "block3", 4: "final_norm"}
    assert set(df["stage"]) == {"init"} and set(df["step"]) == {7}
    distinct = [len(set(p)) for p in ids]
    assert distinct != [12, 9, 15]  # the prompts do repeat tokens
    per_prompt = df[df["prompt"] != geo.CROSS_PROMPT]
    assert per_prompt.groupby("prompt")["n_tokens"].first().tolist() == distinct
    nan_rows = df[df["value"].isna()]
    assert set(nan_rows["metric"]) == {"update_norm", "knn_overlap"}
    assert set(nan_rows["layer"]) == {0}
    assert df[df["layer"] > 0]["value"].notna().all()
    # one unpadded forward per prompt, in eval mode, without autograd; training mode restored
    assert model.forward_calls == [(1, 12), (1, 9), (1, 15)]
    assert not any(model.grad_enabled_in_forward) and not any(model.training_in_forward)
    assert model.training
    # the cross-prompt rows: one per layer, over every analysed token of every prompt
    cross = df[df["prompt"] == geo.CROSS_PROMPT]
    assert set(cross["metric"]) == {"cross_prompt_cosine"} and cross["layer"].tolist() == list(range(n_total))
    assert set(cross["n_tokens"]) == {sum(distinct)}
    states = _analysed(model, ids)
    baseline = geo.cross_prompt_cosine(states, [[p[i] for i in geo.analysed_positions(p)] for p in ids])
    assert np.allclose(cross["value"], baseline.numpy())
    for metric, fn in (("mean_cosine", geo.mean_pairwise_cosine), ("twonn", geo.twonn_intrinsic_dimension)):
        got = per_prompt[per_prompt.metric == metric].sort_values(["prompt", "layer"])["value"].to_numpy()
        assert np.allclose(got, torch.cat([fn(h) for h in states]).numpy()), metric
    adjusted = per_prompt[per_prompt.metric == "adjusted_cosine"]["value"].to_numpy()
    raw = per_prompt[per_prompt.metric == "mean_cosine"]["value"].to_numpy()
    assert np.allclose(adjusted, raw - np.tile(baseline.numpy(), len(ids)))
    share = per_prompt[per_prompt.metric == "common_direction_share"].sort_values(["prompt", "layer"])["value"]
    direction = geo.mean_direction(states)
    assert np.allclose(share, torch.cat([geo.common_direction_share(h, direction) for h in states]).numpy())
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
    df, mats = geo.analyze_model(model, ids, "trained", 100, [1], exclude_first_token=True)
    per_prompt = df[df["prompt"] != geo.CROSS_PROMPT]
    # prompt 0 after position 0: 1 2 3 4 5 (1) 6 7 8 -> 8 distinct; prompt 1: 9 10 11 12 13 -> 5
    assert per_prompt.groupby("prompt")["n_tokens"].first().tolist() == [8, 5]
    assert mats["trained/layer1/prompt1"].shape == (5, 5)
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
    expected = geo.mean_logit_frequency_correlation(
        geo.mean_direction(states)[-1], model.token_embedding.weight[:20], model.logit_bias[:20], counts)
    assert row["value"].item() == pytest.approx(expected)
    # a bias equal to log frequency and no embedding contribution: exactly the unigram -> 1
    with torch.no_grad():
        model.token_embedding.weight.zero_()
        model.logit_bias[1:20] = torch.log(torch.as_tensor(counts[1:]))
    df, _ = geo.analyze_model(model, ids, "trained", 5, [], token_counts=counts)
    assert df[df.metric == "mean_logit_freq_corr"]["value"].item() == pytest.approx(1.0)


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
    s = geo.summarize_metrics(pd.DataFrame(rows, columns=geo.METRICS_COLUMNS))
    assert list(s.columns) == geo.SUMMARY_COLUMNS
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
    # stages x (prompts x layers x per-prompt metrics + layers of cross_prompt_cosine); no
    # train token file, so no mean_logit_freq_corr
    assert len(df) == 2 * (2 * 4 * len(geo.PROMPT_METRICS) + 4)
    assert set(df["metric"]) == set(geo.METRIC_NAMES) - {"mean_logit_freq_corr"}
    summ = pd.read_csv(out / "summary.csv")
    assert list(summ.columns) == geo.SUMMARY_COLUMNS and len(summ) == 2 * 4 * (len(geo.METRIC_NAMES) - 1)
    pt = pd.read_csv(out / "prompts.csv")
    assert pt["truncated"].tolist() == [False, True]
    assert pt["n_tokens_input"].tolist() == [29, 32] and pt["n_tokens_original"].tolist() == [29, 41]
    with np.load(out / "similarity.npz") as z:
        assert set(z.files) == {f"{s}/layer3/prompt{i}" for s in ("init", "trained") for i in (0, 1)} | {
            "tokens/prompt0", "tokens/prompt1", "layer_names"}
        assert "".join(z["tokens/prompt0"]) == "hello world, this is a prompt"
        assert "".join(z["tokens/prompt1"]) == ("abcdefghij" * 4)[:32]
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
