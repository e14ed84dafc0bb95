"""Tests for tga.metrics: hand-computed and closed-form values of every metric function
on tiny tensors (docs/metrics.md), the batched and single-layer forms agreeing, and
their input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tga import metrics as met
from tga.metrics import GeometryError


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------ cosine / norms


def test_cosine_orthogonal_identical_and_60_degrees():
    assert met.mean_pairwise_cosine(t([[1, 0], [0, 1]])).item() == pytest.approx(0.0, abs=1e-12)
    assert met.mean_pairwise_cosine(t([[2, 1], [2, 1], [4, 2]])).item() == pytest.approx(1.0)
    sixty = t([[1, 0], [0.5, math.sqrt(3) / 2]])
    assert met.mean_pairwise_cosine(sixty).item() == pytest.approx(0.5)
    # off-diagonal mean only: three vectors with pairwise cosines 1, 0, 0 -> 1/3
    assert met.mean_pairwise_cosine(t([[1, 0], [3, 0], [0, 2]])).item() == pytest.approx(1 / 3)


def test_cosine_matrix_values_and_zero_vector_guard():
    m = met.cosine_similarity_matrix(t([[1, 0], [1, 1], [0, 0]]))
    s = 1 / math.sqrt(2)
    expected = t([[1, s, 0], [s, 1, 0], [0, 0, 0]])
    assert m.shape == (3, 3)
    assert torch.allclose(m, expected)
    assert torch.isfinite(met.mean_pairwise_cosine(t([[0, 0], [1, 0]])))


def test_layer_batched_metrics_match_per_layer_calls():
    h = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(1))
    for fn in (met.mean_pairwise_cosine, met.mean_token_norm, met.effective_rank, met.rank1_residual,
               met.twonn_intrinsic_dimension, met.twonn_mle):
        batched = fn(h)
        assert batched.shape == (4,)
        assert torch.allclose(batched, torch.stack([fn(h[i]) for i in range(4)])), fn.__name__
    assert met.cosine_similarity_matrix(h).shape == (4, 7, 7)


def test_token_norm_and_update_norm():
    assert met.mean_token_norm(t([[3, 4], [0, 1]])).item() == pytest.approx(3.0)
    h = t([[[0, 0], [1, 1]], [[3, 4], [1, 1]], [[3, 4], [1, 2]]])  # (L=3, T=2, d=2)
    u = met.mean_update_norm(h)
    assert math.isnan(u[0].item())
    assert u[1].item() == pytest.approx(2.5)  # (5 + 0) / 2
    assert u[2].item() == pytest.approx(0.5)  # (0 + 1) / 2
    with pytest.raises(GeometryError, match="stacked layers"):
        met.mean_update_norm(t([[1, 2], [3, 4]]))


# ------------------------------------------------------------------ rank metrics


def test_effective_rank():
    assert met.effective_rank(torch.eye(4, dtype=torch.float64)).item() == pytest.approx(4.0)
    # 3 orthonormal rows in 5-D, equally scaled: three equal singular values
    q, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert met.effective_rank(7.0 * q.T).item() == pytest.approx(3.0)
    rank1 = torch.outer(t([1, 2, 3, 4]), t([0.5, -1, 2]))
    assert met.effective_rank(rank1).item() == pytest.approx(1.0, abs=1e-9)
    # diag(3, 1): p = (3/4, 1/4)
    p = np.array([0.75, 0.25])
    assert met.effective_rank(t([[3, 0], [0, 1]])).item() == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert math.isnan(met.effective_rank(torch.zeros(3, 2)).item())
    # identical vectors span one direction
    assert met.effective_rank(t([[1, 2], [1, 2], [1, 2]])).item() == pytest.approx(1.0)


def test_rank1_residual():
    rank1 = torch.outer(t([1, -2, 3]), t([4, 0, 1, 2]))
    assert met.rank1_residual(rank1).item() == pytest.approx(0.0, abs=1e-9)
    # diag(3, 4): best rank-1 keeps the 4, residual ||3|| / ||(3,4)|| = 3/5
    assert met.rank1_residual(t([[3, 0], [0, 4]])).item() == pytest.approx(0.6)
    assert met.rank1_residual(torch.eye(4, dtype=torch.float64)).item() == pytest.approx(math.sqrt(3 / 4))


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
        assert abs(met.twonn_intrinsic_dimension(x).item() - d) < tol, (d, seed)
        assert abs(met.twonn_mle(x).item() - d) < tol, (d, seed)


def test_twonn_points_on_a_circle_is_one():
    # 500 points on a circle in a 2-D plane of 16-D space; measured 0.97-1.04 over 3 seeds
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        theta = torch.rand(500, dtype=torch.float64, generator=g) * 2 * math.pi
        basis, _ = torch.linalg.qr(torch.randn(16, 2, dtype=torch.float64, generator=g))
        circle = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1) @ basis.T
        assert abs(met.twonn_intrinsic_dimension(circle).item() - 1.0) < 0.15, seed
        assert abs(met.twonn_mle(circle).item() - 1.0) < 0.15, seed


def test_twonn_uniform_plane_in_10d_is_about_two():
    # relative s.d. ~ 1/sqrt(N) = 0.03 at N = 1000; 0.25 is ~4 s.d. of slack
    for seed in range(3):
        pts = _plane_in_10d(1000, seed)
        assert abs(met.twonn_intrinsic_dimension(pts).item() - 2.0) < 0.25, seed
        assert abs(met.twonn_mle(pts).item() - 2.0) < 0.25, seed


def test_twonn_hand_values_fit_and_mle():
    # points 0, 1, 3 on a line: (r1, r2) = (1, 3), (1, 2), (2, 3) -> mu = 3, 2, 1.5
    pts3 = t([[0.0], [1.0], [3.0]])
    assert met.twonn_mle(pts3).item() == pytest.approx(2 / (math.log(3) + math.log(2) + math.log(1.5)))
    # Facco: keep int(0.9 * 3) = 2 smallest mu (1.5, 2) with F = 1/3, 2/3, so
    # y = -log(1 - F) = log 1.5, log 3; slope through the origin = sum(xy) / sum(x^2)
    x = [math.log(1.5), math.log(2)]
    y = [math.log(1.5), math.log(3)]
    fit = (x[0] * y[0] + x[1] * y[1]) / (x[0] ** 2 + x[1] ** 2)
    assert met.twonn_intrinsic_dimension(pts3).item() == pytest.approx(fit)
    assert abs(fit - met.twonn_mle(pts3).item()) > 0.1  # the two estimators really differ
    with pytest.raises(GeometryError, match="at least 3 tokens"):
        met.twonn_intrinsic_dimension(t([[0, 1], [1, 0]]))
    # a lattice: every mu == 1 -> the CDF is a step at log(mu) = 0, slope infinite
    square = t([[0, 0], [1, 0], [0, 1], [1, 1]])
    assert met.twonn_intrinsic_dimension(square).item() == math.inf and met.twonn_mle(square).item() == math.inf


def test_twonn_keeps_one_copy_of_coinciding_points():
    pts = _plane_in_10d(200, 9)
    with_dups = torch.cat([pts, pts[:50], pts[10:20]])
    for fn in (met.twonn_intrinsic_dimension, met.twonn_mle):
        assert fn(with_dups).item() == pytest.approx(fn(pts).item()), fn.__name__
    # identical vectors: a single distinct point, no neighbours -> undefined
    assert math.isnan(met.twonn_intrinsic_dimension(t([[1, 2], [1, 2], [1, 2]])).item())


# ------------------------------------------------------------------ neighbourhood overlap


def test_neighbourhood_overlap_identical_layers_is_one():
    h = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(3)).repeat(3, 1, 1)
    ov = met.neighbourhood_overlap(h, k=3)
    assert math.isnan(ov[0].item())
    assert ov[1:].tolist() == [1.0, 1.0]


def test_neighbourhood_overlap_hand_case():
    # 1-D positions, k=1. Layer A: 0,1,3,10 -> NN = [1,0,1,2]; layer B: 0,5,6,20 -> NN = [1,2,1,2]
    h = t([[[0], [1], [3], [10]], [[0], [5], [6], [20]]])
    ov = met.neighbourhood_overlap(h, k=1)
    assert ov[1].item() == pytest.approx(0.75)
    # k is clipped to T-1 = 3: every other token is a neighbour, so the overlap is 1
    rnd = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    assert met.neighbourhood_overlap(rnd, k=10)[1].item() == 1.0
    with pytest.raises(GeometryError, match="knn_k"):
        met.neighbourhood_overlap(rnd, k=0)


def test_neighbourhood_overlap_breaks_exact_ties_by_index():
    # Layer A: four identical vectors, every distance ties at 0 -> each token's k=2
    # neighbours are the two lowest other indices: 0:{1,2} 1:{0,2} 2:{0,1} 3:{0,1}.
    # Layer B: 1-D positions 0,1,2,3; token 2 ties between 1 and 3 (both at 1), token 3
    # has 2 then 1: 0:{1,2} 1:{0,2} 2:{1,3} 3:{1,2}. Overlaps 1, 1, 1/2, 1/2 -> 0.75.
    a = torch.zeros(4, 1, dtype=torch.float64)
    b = t([[0], [1], [2], [3]])
    assert met.neighbourhood_overlap(torch.stack([a, b]), k=2)[1].item() == 0.75
    member = met._knn_membership(met._pairwise_distances(torch.stack([a, b])), 2)
    assert member[0].nonzero().tolist() == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1], [3, 0], [3, 1]]
    # the same rule at both layers: identical tied layers overlap fully
    assert met.neighbourhood_overlap(torch.stack([a, a, a]), k=2)[1:].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ common direction


def test_common_direction_share_constructed_case():
    # h_i = a e1 + b_i with b_i orthogonal to e1, |b_i| = c and sum b_i = 0: the mean is
    # a e1 and every token has cos^2 = a^2 / (a^2 + c^2) with it
    a, c = 3.0, 4.0
    h = t([[a, c, 0], [a, -c, 0], [a, 0, c], [a, 0, -c]])
    direction = met.mean_direction([h.unsqueeze(0)])[0]
    assert torch.allclose(direction, t([a, 0, 0]))
    assert met.common_direction_share(h, direction).item() == pytest.approx(a * a / (a * a + c * c))
    # identical vectors lie entirely along their mean; orthogonal ones share 1/d of it
    assert met.common_direction_share(t([[1, 2], [1, 2]]), t([1, 2])).item() == pytest.approx(1.0)
    eye = torch.eye(4, dtype=torch.float64)
    assert met.common_direction_share(eye, eye.mean(0)).item() == pytest.approx(1 / 4)
    # stacked layers, one direction per layer
    stacked = met.common_direction_share(torch.stack([h, eye[:, :3]]), t([[1, 0, 0], [0, 0, 1]]))
    assert stacked.tolist() == pytest.approx([a * a / (a * a + c * c), 1 / 4])
    with pytest.raises(GeometryError, match="common direction of shape"):
        met.common_direction_share(h, t([1, 0]))


def test_common_direction_share_isotropic_is_one_over_d():
    x = _gaussian(20000, 8, seed=1)
    # E[cos^2] with a fixed unit direction is exactly 1/d for isotropic vectors
    share = met.common_direction_share(x, t([1, 0, 0, 0, 0, 0, 0, 0])).item()
    assert share == pytest.approx(1 / 8, abs=0.005)  # s.e. ~ 0.11 / sqrt(20000) = 0.0008


# ------------------------------------------------------------------ Ethayarajh's baseline


def _brute_force_cross_prompt_cosine(prompts, ids=None):
    """The definition as a double loop: every ordered pair of tokens of different prompts,
    leaving out two copies of one id."""
    units = [met._unit(p) for p in prompts]
    total = torch.zeros(prompts[0].shape[0], dtype=torch.float64)
    n = 0
    for a, ua in enumerate(units):
        for b, ub in enumerate(units):
            if a == b:
                continue
            for i in range(ua.shape[1]):
                for j in range(ub.shape[1]):
                    if ids is not None and ids[a][i] == ids[b][j]:
                        continue
                    total += (ua[:, i] * ub[:, j]).sum(-1)
                    n += 1
    return total / n


def test_cross_prompt_cosine_constructed_cases():
    e1, e2 = t([1, 0, 0]), t([0, 1, 0])
    a = torch.stack([e1, 2 * e1, 5 * e1]).unsqueeze(0)  # (L=1, 3, 3), all along e1
    b = torch.stack([e2, 3 * e2]).unsqueeze(0)
    diag = torch.stack([e1 + e2, 2 * (e1 + e2)]).unsqueeze(0)
    assert met.cross_prompt_cosine([a, b]).item() == pytest.approx(0.0, abs=1e-15)
    assert met.cross_prompt_cosine([a, a]).item() == pytest.approx(1.0)
    assert met.cross_prompt_cosine([a, diag]).item() == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(met.cross_prompt_cosine([a]).item())  # one prompt: no pair
    # the only cross pairs hold one id twice: none left
    assert math.isnan(met.cross_prompt_cosine([a[:, :1], b[:, :1]], [[7], [7]]).item())


def test_cross_prompt_cosine_is_the_exact_mean_over_every_cross_pair():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(3, n, 6, dtype=torch.float64, generator=g) + 0.7 for n in (5, 9, 7, 4)]
    prompts[1][:, 2] = 0.0  # a zero vector: cosine 0 with everything, and still a pair
    # ids repeat ACROSS prompts (never within one): 3 is in prompts 0, 1 and 3, 11 in 1 and 2
    ids = [[1, 2, 3, 4, 5], [3, 6, 7, 8, 9, 10, 11, 12, 13], [11, 14, 15, 16, 17, 18, 19], [3, 20, 21, 22]]
    got = met.cross_prompt_cosine(prompts, ids)
    assert got.shape == (3,)
    assert torch.allclose(got, _brute_force_cross_prompt_cosine(prompts, ids), rtol=0, atol=1e-12)
    # without ids every cross pair counts, and leaving the repeated ids out does change the value
    no_ids = met.cross_prompt_cosine(prompts)
    assert torch.allclose(no_ids, _brute_force_cross_prompt_cosine(prompts), rtol=0, atol=1e-12)
    assert (no_ids - got).abs().max() > 1e-4
    with pytest.raises(GeometryError, match="an id twice within a prompt"):
        met.cross_prompt_cosine(prompts[:2], [ids[0], [6, 6, 7, 8, 9, 10, 11, 12, 13]])
    with pytest.raises(GeometryError, match="got 13 token ids for 14 tokens"):
        met.cross_prompt_cosine(prompts[:2], [ids[0], ids[1][:-1]])


# ------------------------------------------------------------------ TwoNN: pooled, and its noise floor


def test_pooled_distinct_keeps_each_id_once_at_its_first_prompt():
    a = torch.arange(12, dtype=torch.float64).reshape(1, 3, 4)
    b = 100 + torch.arange(8, dtype=torch.float64).reshape(1, 2, 4)
    pooled = met.pooled_distinct([a, b], [[5, 6, 7], [6, 8]])
    assert torch.equal(pooled, torch.cat([a, b[:, 1:]], dim=1))  # b's copy of id 6 is left out


def test_gaussian_floor_is_the_estimators_on_seeded_gaussians_and_caps_small_samples():
    fits, mles = met.gaussian_twonn_draws(21, 64)
    assert len(fits) == len(mles) == met.NULL_DRAWS
    # the measurement: 21 Gaussian points in 64 dimensions read about 27, not 64
    assert 20 < np.mean(fits) < 35 and 20 < np.mean(mles) < 35
    # the draws are the estimators on isotropic Gaussians of that (N, d), seed NULL_SEED
    gen = torch.Generator().manual_seed(met.NULL_SEED)
    first = torch.randn(8, 21, 64, dtype=torch.float64, generator=gen)
    assert fits[:8] == pytest.approx(met.twonn_intrinsic_dimension(first).tolist(), rel=1e-12)
    assert mles[:8] == pytest.approx(met.twonn_mle(first).tolist(), rel=1e-12)
    # with many points in few dimensions the floor reaches the true dimension
    assert np.mean(met.gaussian_twonn_draws(1000, 3)[0]) == pytest.approx(3.0, abs=0.3)
    assert met.gaussian_twonn_draws(21, 64) is met.gaussian_twonn_draws(21, 64)  # cached
    assert met.gaussian_twonn_draws(2, 64) == ((), ())
    bands = met.twonn_null(21, 64, t([5.0, 1e6]), mle=False)
    assert bands[0].percentile == 0.0 and bands[1].percentile == 100.0
    assert bands[0].lo < bands[0].mean < bands[0].hi and bands[0].mean == pytest.approx(np.mean(fits))
    assert met.twonn_null(21, 64, t([5.0]), mle=True)[0].mean == pytest.approx(np.mean(mles))


def test_null_band_hand_values():
    draws = np.arange(1, 101, dtype=float)  # 1..100
    band = met.null_band(draws, 10.0)
    assert band.mean == pytest.approx(50.5)
    assert band.lo == pytest.approx(np.quantile(draws, 0.025)) and band.hi == pytest.approx(np.quantile(draws, 0.975))
    assert band.percentile == pytest.approx(10.0)  # 1..10 are at or below 10
    assert math.isnan(met.null_band(draws, math.nan).percentile)
    assert all(math.isnan(v) for v in met.null_band(np.array([np.nan]), 1.0))


# ------------------------------------------------------------------ Gao et al.'s frequency direction


def test_mean_logit_frequency_correlation_constructed_embedding():
    counts = np.array([100.0, 10.0, 1.0, 0.0, 1000.0])
    log_c = np.log(np.where(counts > 0, counts, 1.0))
    # embedding rows whose logits with the mean vector m are 2 log(count) - 7 (and garbage
    # for the unseen token 3, which is left out): exactly a unigram model, r = 1
    m = t([1.0, 0.5])
    emb = torch.stack([t([(2 * lc - 7) , 0.0]) for lc in log_c])
    emb[3] = t([50.0, 0.0])
    assert met.mean_logit_frequency_correlation(m, emb, counts)[0] == pytest.approx(1.0)
    assert met.mean_logit_frequency_correlation(m, -emb, counts)[0] == pytest.approx(-1.0)
    # hand value: logits (1, 0, 0, *, 0) against log counts of the seen tokens
    x = np.array([1.0, 0, 0, 0])
    y = np.log([100.0, 10.0, 1.0, 1000.0])
    one = torch.zeros(5, 2, dtype=torch.float64)
    one[0, 0] = 1.0
    assert met.mean_logit_frequency_correlation(t([1.0, 0.0]), one, counts)[0] == pytest.approx(
        np.corrcoef(x, y)[0, 1])
    # the prompts' own tokens are left out: without token 0 the logits are constant -> NaN
    r, null = met.mean_logit_frequency_correlation(t([1.0, 0.0]), one, counts, exclude_ids=[0])
    assert math.isnan(r)
    # ... and leaving token 2 out gives the correlation over tokens 0, 1 and 4
    r, _ = met.mean_logit_frequency_correlation(m, emb + t([0.0, 1.0]) * t([[0], [0], [9], [0], [0]]), counts,
                                                exclude_ids=[2, 999])
    assert r == pytest.approx(1.0)
    assert math.isnan(met.mean_logit_frequency_correlation(m, torch.zeros(5, 2), counts)[0])  # constant
    with pytest.raises(GeometryError, match="frequency correlation needs"):
        met.mean_logit_frequency_correlation(m, emb, counts[:3])


@pytest.mark.parametrize("d", [4, 40])  # the Gram route (d <= directions) and the direct one
def test_frequency_null_is_the_correlation_of_seeded_random_directions(d):
    g = torch.Generator().manual_seed(5)
    v = 300
    emb = torch.randn(v, d, dtype=torch.float64, generator=g)
    counts = torch.randint(0, 50, (v,), generator=g).double().numpy()
    m = torch.randn(d, dtype=torch.float64, generator=g)
    exclude = [1, 2, 3]
    r, null = met.mean_logit_frequency_correlation(m, emb, counts, exclude_ids=exclude, n_null=16, seed=9)
    keep = counts > 0
    keep[exclude] = False
    y = np.log(counts[keep])
    e = emb.numpy()[keep]
    assert r == pytest.approx(np.corrcoef(e @ m.numpy(), y)[0, 1], abs=1e-12)
    w = torch.randn(d, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).numpy()
    expected = [np.corrcoef(e @ w[:, k], y)[0, 1] for k in range(16)]
    assert null.shape == (16,) and null == pytest.approx(expected, abs=1e-12)
    again = met.mean_logit_frequency_correlation(m, emb, counts, exclude_ids=exclude, n_null=16, seed=9)[1]
    assert np.array_equal(null, again)


def test_frequency_null_of_a_frequency_shaped_embedding_is_wide():
    # an embedding whose first axis is log frequency: every direction with a component on
    # it correlates, so the null band is wide and a mean vector along that axis is at its top
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 1000, (2000,), generator=g).double()
    emb = torch.randn(2000, 8, dtype=torch.float64, generator=g)
    emb[:, 0] = 3 * torch.log(counts)
    r, null = met.mean_logit_frequency_correlation(t([1.0] + [0.0] * 7), emb, counts.numpy())
    band = met.null_band(null, r)
    assert r > 0.99 and band.percentile == 100.0
    assert band.hi > 0.8 and band.lo < -0.8  # random directions already reach |r| > 0.8


# ------------------------------------------------------------------ all metrics of a prompt


def test_compute_layer_metrics_matches_the_single_functions():
    h = torch.randn(5, 12, 8, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    baseline = torch.linspace(0.1, 0.5, 5)
    m = met.compute_layer_metrics(h, direction, baseline, knn_k=4)
    assert list(m) == list(met.PROMPT_METRICS)
    ref = {
        "mean_cosine": met.mean_pairwise_cosine(h),
        "adjusted_cosine": met.mean_pairwise_cosine(h) - baseline.double(),
        "common_direction_share": met.common_direction_share(h, direction),
        "token_norm": met.mean_token_norm(h),
        "update_norm": met.mean_update_norm(h),
        "effective_rank": met.effective_rank(h),
        "rank1_residual": met.rank1_residual(h),
        "twonn": met.twonn_intrinsic_dimension(h),
        "twonn_mle": met.twonn_mle(h),
        "knn_overlap": met.neighbourhood_overlap(h, k=4),
    }
    for name, v in ref.items():
        assert v.shape == (5,)
        assert torch.allclose(m[name], v, equal_nan=True), name
    with pytest.raises(GeometryError, match="only 2 distinct token"):
        met.compute_layer_metrics(h[:, :2], direction, baseline)


def test_blockwise_twonn_gives_the_whole_matrix_numbers(monkeypatch):
    """Thousands of pooled tokens go block by block (no (L, N, N) matrix); the values
    are the whole matrix's, bit for bit, exact duplicates included (kept once)."""
    import tga.metrics as metrics

    x = torch.randn(3, 300, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[:, 10] = x[:, 3]
    x[0, 20] = x[0, 3]
    whole = metrics.twonn_both(x)
    monkeypatch.setattr(metrics, "DISTANCE_BLOCK_ELEMENTS", 1000)  # 3 rows a block
    blocks = metrics.twonn_both(x)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])
    per_layer = metrics._twonn_log_mu_blockwise(x)
    assert [len(v) for v in per_layer] == [298, 299, 299]  # the repeated points counted once


def test_pooled_points_past_the_cap_are_a_fixed_subset_in_order(monkeypatch):
    import tga.metrics as metrics

    hidden = [torch.arange(2 * 6 * 4, dtype=torch.float64).reshape(2, 6, 4) + 100 * k for k in range(2)]
    ids = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 1, 9, 10]]  # 11 distinct ids; id 1 repeats
    everything = metrics.pooled_distinct(hidden, ids)
    assert everything.shape[1] == 11
    monkeypatch.setattr(metrics, "POOLED_TWONN_MAX_POINTS", 5)
    first, again = metrics.pooled_distinct(hidden, ids), metrics.pooled_distinct(hidden, ids)
    assert first.shape == (2, 5, 4) and torch.equal(first, again)
    rows = [next(i for i in range(11) if torch.equal(everything[:, i], first[:, j])) for j in range(5)]
    assert rows == sorted(rows) and len(set(rows)) == 5  # a subset, in the original order
