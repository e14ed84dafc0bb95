"""The geometry metrics themselves: hidden states in, numbers out.

Why a module of its own: these functions are the definitions docs/metrics.md gives,
each checked against closed-form values (tests/test_metrics.py). They know nothing of
models, prompts files, tokenizers or output tables; :mod:`tga.geometry` decides which
tokens they see (each token's first occurrence in a prompt) and writes what they return
to ``metrics.csv``. Keeping them apart lets a metric be read, tested and reused (the
benchmarks, the pretrained models) without the driver. They are torch functions, not
numpy ones, so that they run on the device the hidden states are on.

**Per-prompt metrics** take the hidden states of ONE prompt, ``(T, d)`` or ``(L, T, d)``
(all layers stacked, computed in one vectorized call), work in float64 and return a
scalar / ``(L,)`` tensor:

- ``mean_cosine``: off-diagonal mean of the token cosine-similarity matrix.
- ``adjusted_cosine``: ``mean_cosine`` minus the layer's ``cross_prompt_cosine``: the
  similarity that sharing a prompt adds beyond the anisotropy every token has (Ethayarajh 2019).
- ``common_direction_share``: mean over tokens of ``cos^2(h_i, m_l)`` with ``m_l`` the
  layer's mean vector over all prompts' tokens: the share of each token's squared norm
  that lies along the common direction (Gao et al. 2019; Mu & Viswanath 2018).
- ``token_norm``: mean L2 norm of the token vectors.
- ``update_norm``: mean over tokens of ``||h_l - h_{l-1}||``; NaN at layer 0.
- ``effective_rank``: ``exp(H(p))``, ``p_i = s_i / sum_j s_j`` (Roy & Vetterli 2007).
- ``rank1_residual``: ``||H - H_1||_F / ||H||_F``, ``H_1`` the best rank-1 approximation.
- ``twonn``: TwoNN intrinsic dimension as Facco et al. (2017) estimate it: the slope of a
  line through the origin fitted to ``-log(1 - F(mu))`` against ``log(mu)``, the largest
  10% of ``mu = r2 / r1`` discarded.
- ``twonn_mle``: the maximum-likelihood TwoNN estimate ``(N - 1) / sum_i log(mu_i)``.
- ``knn_overlap``: neighbourhood overlap between consecutive layers (Doimo et al. 2020),
  ties broken by token index; NaN at layer 0.

**Cross-prompt metrics** need tokens of several prompts (one ``(L, T_i, d)`` tensor each):

- ``cross_prompt_cosine``: Ethayarajh's (2019) anisotropy baseline per layer, the mean
  cosine over every pair of tokens of *different* prompts (exact, never two copies of
  one id); NaN with fewer than two prompts.
- ``twonn_pooled`` / ``twonn_mle_pooled``: the two TwoNN estimates over all prompts'
  analysed tokens together, each id once (:func:`pooled_distinct`): a TwoNN whose
  number of points does not cap it as a prompt's few dozen tokens do.
- ``mean_logit_freq_corr``: Pearson correlation, over the tokens seen in the training
  split but not in the prompts, between the logits of the mean final-norm vector
  through the tied output embedding (no logit bias) and the log training frequency
  (Gao et al. 2019).

**Null references.** A TwoNN value over ``N`` points in ``d`` dimensions is read beside
what isotropic Gaussian points of the same ``N`` and ``d`` give
(:func:`gaussian_twonn_draws`, :func:`twonn_null`), and ``mean_logit_freq_corr`` beside
the same correlation for random directions in the same embedding; :class:`NullBand`
summarises either (mean, 95% band, the value's percentile). Both use :data:`NULL_SEED`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "EPS",
    "PROMPT_METRICS",
    "CROSS_PROMPT_METRICS",
    "METRIC_NAMES",
    "MIN_TOKENS_TWONN",
    "TWONN_FRACTION",
    "NULL_SEED",
    "NULL_DRAWS",
    "NULL_DIRECTIONS",
    "NULL_NAN",
    "NullBand",
    "GeometryError",
    "cosine_similarity_matrix",
    "mean_pairwise_cosine",
    "mean_token_norm",
    "mean_update_norm",
    "effective_rank",
    "rank1_residual",
    "twonn_intrinsic_dimension",
    "twonn_mle",
    "neighbourhood_overlap",
    "mean_direction",
    "common_direction_share",
    "cross_prompt_cosine",
    "pooled_distinct",
    "twonn_both",
    "null_band",
    "gaussian_twonn_draws",
    "twonn_null",
    "mean_logit_frequency_correlation",
    "compute_layer_metrics",
]

EPS = 1e-12
"""Guard for divisions by a norm; zero vectors get cosine 0 with everything."""

PROMPT_METRICS: tuple[str, ...] = (
    "mean_cosine",
    "adjusted_cosine",
    "common_direction_share",
    "token_norm",
    "update_norm",
    "effective_rank",
    "rank1_residual",
    "twonn",
    "twonn_mle",
    "knn_overlap",
)
CROSS_PROMPT_METRICS: tuple[str, ...] = (
    "cross_prompt_cosine", "twonn_pooled", "twonn_mle_pooled", "mean_logit_freq_corr",
)
METRIC_NAMES: tuple[str, ...] = PROMPT_METRICS + CROSS_PROMPT_METRICS

MIN_TOKENS_TWONN = 3  # a point needs a first and a second neighbour
# Distances one TwoNN holds at once (float64: 256 MB); more points go block by block.
DISTANCE_BLOCK_ELEMENTS = 1 << 25
# Points of the pooled TwoNN (and of its Gaussian floor) at most: past this, a fixed
# random subset (seed NULL_SEED) of the distinct tokens. The floor's 32 draws cost
# O(draws x N^2 x d); 4,096 points keep them to minutes on a CPU.
POOLED_TWONN_MAX_POINTS = 4096
TWONN_FRACTION = 0.9
"""Share of the smallest ``mu`` Facco et al. (2017) keep for the fit (the tail is noisy)."""
NULL_SEED = 0
"""Seed of every null reference (Gaussian point clouds, random directions): fixed, so a
reference is the same for every model, stage and rerun."""
NULL_DRAWS = 32
"""Isotropic Gaussian samples per ``(N, d)`` behind a TwoNN noise floor."""
NULL_DIRECTIONS = 1000
"""Random unit directions behind the null of ``mean_logit_freq_corr``."""


class GeometryError(ValueError):
    """Bad input to the geometry analysis (prompts file, prompt, layer index, hidden states...)."""


def _batched(h: torch.Tensor, min_tokens: int = 2, what: str = "this metric") -> tuple[torch.Tensor, bool]:
    """Return ``h`` as float64 ``(L, T, d)`` and whether the input was a single layer."""
    if h.dim() == 2:
        h, single = h.unsqueeze(0), True
    elif h.dim() == 3:
        single = False
    else:
        raise GeometryError(f"expected hidden states of shape (T, d) or (L, T, d), got {tuple(h.shape)}")
    if h.shape[1] < min_tokens:
        raise GeometryError(f"{what} needs at least {min_tokens} tokens, got T={h.shape[1]}")
    return h.to(torch.float64), single


def _unbatch(x: torch.Tensor, single: bool) -> torch.Tensor:
    return x[0] if single else x


def _offdiag_mean(m: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of ``(..., T, T)`` matrices."""
    t = m.shape[-1]
    return (m.sum(dim=(-2, -1)) - torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)) / (t * (t - 1))


def _unit(h: torch.Tensor) -> torch.Tensor:
    return h / h.norm(dim=-1, keepdim=True).clamp_min(EPS)


def cosine_similarity_matrix(h: torch.Tensor) -> torch.Tensor:
    """Token-by-token cosine similarities, ``(T, T)`` (or ``(L, T, T)``), float64.

    Zero vectors are guarded with :data:`EPS` and get similarity 0 (also on the diagonal).
    """
    x, single = _batched(h, min_tokens=1)
    u = _unit(x)
    return _unbatch(u @ u.transpose(-2, -1), single)


def mean_pairwise_cosine(h: torch.Tensor) -> torch.Tensor:
    """Off-diagonal mean cosine similarity: 1 when all tokens point the same way
    (anisotropy / rank collapse, Ethayarajh 2019), ~0 for isotropic random vectors."""
    x, single = _batched(h, what="mean_cosine")
    u = _unit(x)
    return _unbatch(_offdiag_mean(u @ u.transpose(-2, -1)), single)


def mean_token_norm(h: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the token vectors."""
    x, single = _batched(h, min_tokens=1)
    return _unbatch(x.norm(dim=-1).mean(dim=-1), single)


def mean_update_norm(h: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||h_l - h_{l-1}||`` for layers stacked as ``(L, T, d)``.

    Returns ``(L,)`` with NaN at layer 0 (no previous layer). How much each block writes
    into the residual stream differs sharply between Pre-LN and Post-LN (Xiong et al. 2020).
    """
    if h.dim() != 3:
        raise GeometryError(f"update_norm needs stacked layers (L, T, d), got shape {tuple(h.shape)}")
    x = h.to(torch.float64)
    out = torch.full((x.shape[0],), math.nan, dtype=torch.float64, device=x.device)
    if x.shape[0] > 1:
        out[1:] = (x[1:] - x[:-1]).norm(dim=-1).mean(dim=-1)
    return out


def _entropy_rank_and_residual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective rank and rank-1 residual from ONE batched ``svdvals`` call on ``(L, T, d)``."""
    s = torch.linalg.svdvals(x)  # (L, min(T, d)), descending
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(EPS)
    erank = torch.exp(-torch.special.xlogy(p, p).sum(dim=-1))
    energy = (s * s).sum(dim=-1)
    resid = torch.sqrt((s[..., 1:] ** 2).sum(dim=-1) / energy.clamp_min(EPS))
    zero = total.squeeze(-1) <= 0  # all-zero matrix: both quantities undefined
    nan = torch.full_like(erank, math.nan)
    return torch.where(zero, nan, erank), torch.where(zero, nan, resid)


def effective_rank(h: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007) effective rank ``exp(-sum p_i log p_i)``, ``p_i = s_i / sum s``.

    Ranges from 1 (rank one) to ``min(T, d)`` (all singular values equal); a continuous
    measure of how many directions the prompt's tokens really span. NaN for a zero matrix.
    """
    x, single = _batched(h, min_tokens=1)
    return _unbatch(_entropy_rank_and_residual(x)[0], single)


def rank1_residual(h: torch.Tensor) -> torch.Tensor:
    """``||H - H_1||_F / ||H||_F`` with ``H_1`` the best rank-1 approximation (via SVD).

    0 means the tokens lie on one line through the origin (rank collapse, cf. Dong,
    Cordonnier & Loukas 2021, who use the residual to ``1 x^T`` instead); NaN for a zero
    matrix.
    """
    x, single = _batched(h, min_tokens=1)
    return _unbatch(_entropy_rank_and_residual(x)[1], single)


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distances ``(L, T, T)``; the non-matmul path keeps identical rows at 0."""
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def _repeats_earlier(rows: torch.Tensor, start: int) -> torch.Tensor:
    """``(..., B)``: whether each point of distance rows ``(..., B, T)`` (points ``start``
    to ``start + B - 1``) coincides with an earlier point (an exact 0 distance, ``j < i``)."""
    b, t = rows.shape[-2:]
    earlier = torch.arange(t, device=rows.device)[None, :] < torch.arange(start, start + b, device=rows.device)[:, None]
    return ((rows == 0) & earlier).any(dim=-1)


def _two_nearest(rows: torch.Tensor, start: int, dup: torch.Tensor) -> torch.Tensor:
    """``(..., B, 2)``: the first and second nearest-neighbour distances of those rows'
    points, neither the point itself nor a repeated point (``dup``: ``(..., T)``)."""
    b, t = rows.shape[-2:]
    itself = torch.arange(t, device=rows.device)[None, :] == torch.arange(start, start + b, device=rows.device)[:, None]
    d = rows.masked_fill(itself, math.inf).masked_fill(dup.unsqueeze(-2), math.inf)
    return torch.topk(d, k=2, dim=-1, largest=False).values


def _kept_log_mu(r: torch.Tensor, dup: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, ``log(r2 / r1)`` of the points that repeat no earlier one."""
    keep = ~dup & torch.isfinite(r[..., 1])
    log_mu = torch.log(r[..., 1] / r[..., 0].clamp_min(EPS))
    return [log_mu[layer][keep[layer]] for layer in range(r.shape[0])]


def _twonn_log_mu(dist: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, ``log(r2 / r1)`` of every point, exact duplicates kept once.

    A point that coincides with an earlier one has ``r1 = 0`` and no finite ``mu``; only
    the first copy is used. :func:`tga.geometry.analysed_positions` already removes
    repeated tokens, so in the pipeline this guard only matters for distinct tokens that
    coincide.
    """
    dup = _repeats_earlier(dist, 0)  # (L, T)
    return _kept_log_mu(_two_nearest(dist, 0, dup), dup)


def _twonn_fit(log_mu: torch.Tensor) -> float:
    """Facco et al.'s estimate from one layer's ``log(mu)``: least-squares slope through the
    origin of ``y_i = -log(1 - i/N)`` on the ``i``-th smallest ``log(mu)``, ``i <= 0.9 N``."""
    n = log_mu.numel()
    if n < MIN_TOKENS_TWONN:
        return math.nan
    n_fit = int(n * TWONN_FRACTION)
    x = torch.sort(log_mu).values[:n_fit]
    i = torch.arange(1, n_fit + 1, dtype=torch.float64, device=x.device)
    y = -torch.log1p(-i / n)
    sxx = float((x * x).sum())
    return float((x * y).sum()) / sxx if sxx > 0 else math.inf  # every mu == 1: a lattice


def _twonn_mle(log_mu: torch.Tensor) -> float:
    """``(N - 1) / sum log(mu)``: the unbiased maximum-likelihood form of the Pareto shape."""
    n = log_mu.numel()
    if n < MIN_TOKENS_TWONN:
        return math.nan
    s = float(log_mu.sum())
    return (n - 1) / s if s > 0 else math.inf


def _per_layer(log_mus: list[torch.Tensor], estimate: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([estimate(v) for v in log_mus], dtype=torch.float64, device=like.device)


def twonn_intrinsic_dimension(h: torch.Tensor) -> torch.Tensor:
    """TwoNN intrinsic dimension exactly as Facco et al. (2017) estimate it.

    For each point ``mu = r2 / r1`` (2nd / 1st nearest-neighbour distance) follows
    ``F(mu) = 1 - mu^-d`` on a locally uniform ``d``-manifold, so ``-log(1 - F)`` is a line
    through the origin with slope ``d`` in ``log(mu)``. The empirical ``F = i/N`` of the
    sorted ``mu`` is fitted by least squares, the largest 10% of ``mu`` discarded
    (:data:`TWONN_FRACTION`). Needs ``T >= 3``; NaN if fewer than 3 distinct points, ``inf``
    if every kept ``mu == 1``.
    """
    x, single = _batched(h, min_tokens=MIN_TOKENS_TWONN, what="twonn")
    return _unbatch(_per_layer(_twonn_log_mu(_pairwise_distances(x)), _twonn_fit, x), single)


def twonn_mle(h: torch.Tensor) -> torch.Tensor:
    """Maximum-likelihood TwoNN estimate ``(N - 1) / sum_i log(mu_i)`` over all points.

    Same ``mu`` as :func:`twonn_intrinsic_dimension`; uses the whole tail instead of a
    fit, so it reacts more to a few points with a tiny first-neighbour distance.
    """
    x, single = _batched(h, min_tokens=MIN_TOKENS_TWONN, what="twonn_mle")
    return _unbatch(_per_layer(_twonn_log_mu(_pairwise_distances(x)), _twonn_mle, x), single)


def _knn_membership(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(L, T, T)``: ``[l, i, j]`` is True iff j is among i's k nearest (self excluded).

    Neighbours are ranked by (distance, index): a stable sort of each row, so exact ties
    go to the lower token index at every layer, whatever the backend's ``topk`` does.
    """
    t = dist.shape[-1]
    eye = torch.eye(t, dtype=torch.bool, device=dist.device)
    order = torch.sort(dist.masked_fill(eye, math.inf), dim=-1, stable=True).indices
    member = torch.zeros(dist.shape, dtype=torch.bool, device=dist.device)
    return member.scatter_(-1, order[..., :k], True)


def _check_k(k: int, t: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise GeometryError(f"knn_k must be a positive integer, got {k!r}")
    return min(k, t - 1)


def _overlap_from_distances(dist: torch.Tensor, k: int) -> torch.Tensor:
    member = _knn_membership(dist, k)
    out = torch.full((dist.shape[0],), math.nan, dtype=torch.float64, device=dist.device)
    if dist.shape[0] > 1:
        shared = (member[1:] & member[:-1]).sum(dim=-1).to(torch.float64)  # (L-1, T)
        out[1:] = (shared / k).mean(dim=-1)
    return out


def neighbourhood_overlap(h: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Neighbourhood overlap between consecutive layers (Doimo et al. 2020), ``(L,)``.

    For each token, the fraction of its ``k`` nearest neighbours (Euclidean, self
    excluded; ``k`` clipped to ``T - 1``) at layer ``l - 1`` that are still among its
    ``k`` nearest at layer ``l``; averaged over tokens. 1 = the layer kept the local
    neighbourhood structure, ~k/(T-1) = unrelated. NaN at layer 0. Exact distance ties
    are broken by token index (lower first), the same rule at every layer.
    """
    if h.dim() != 3:
        raise GeometryError(f"knn_overlap needs stacked layers (L, T, d), got shape {tuple(h.shape)}")
    x, _ = _batched(h, what="knn_overlap")
    return _overlap_from_distances(_pairwise_distances(x), _check_k(k, x.shape[1]))


def _stacked_prompts(hidden: Sequence[torch.Tensor], what: str) -> tuple[torch.Tensor, list[int]]:
    """All prompts' ``(L, T_i, d)`` states concatenated along tokens, float64, and the ``T_i``."""
    if not hidden:
        raise GeometryError(f"{what} needs the hidden states of at least one prompt")
    shapes = {(h.shape[0], h.shape[-1]) for h in hidden}
    if any(h.dim() != 3 for h in hidden) or len(shapes) != 1:
        got = [tuple(h.shape) for h in hidden]
        raise GeometryError(f"{what} needs every prompt as (L, T_i, d) with one L and d, got shapes {got}")
    return torch.cat([h.to(torch.float64) for h in hidden], dim=1), [int(h.shape[1]) for h in hidden]


def mean_direction(hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per layer, the mean vector of every token of every prompt, ``(L, d)``: the common
    direction of Gao et al. (2019) and Mu & Viswanath (2018)."""
    pooled, _ = _stacked_prompts(hidden, "mean_direction")
    return pooled.mean(dim=1)


def common_direction_share(h: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``cos^2(h_i, direction)``, per layer.

    ``cos^2`` is the fraction of ``||h_i||^2`` that lies along the direction: 1 when every
    token is a multiple of it, ``1/d`` on average for isotropic tokens in ``d`` dimensions.
    ``h`` is ``(T, d)`` with ``direction`` ``(d,)``, or ``(L, T, d)`` with ``(L, d)``.
    """
    x, single = _batched(h, min_tokens=1)
    m = direction.to(torch.float64)
    m = m.unsqueeze(0) if m.dim() == 1 else m
    if tuple(m.shape) != (x.shape[0], x.shape[-1]):
        raise GeometryError(
            f"common direction of shape {tuple(direction.shape)} does not fit hidden states {tuple(h.shape)}"
        )
    cos = (_unit(x) * _unit(m).unsqueeze(1)).sum(dim=-1)  # (L, T)
    return _unbatch((cos * cos).mean(dim=-1), single)


def cross_prompt_cosine(
    hidden: Sequence[torch.Tensor],
    token_ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Ethayarajh's (2019) anisotropy baseline per layer, ``(L,)``: the mean cosine over
    EVERY pair of tokens from different prompts, exactly (no sampling).

    ``hidden`` is one ``(L, T_i, d)`` tensor per prompt. With ``token_ids`` (one list per
    prompt, each id once within its prompt as :func:`tga.geometry.analysed_positions`
    gives them), pairs of two copies of one id are left out, as within a prompt. Two
    unrelated tokens share no context, so whatever cosine they have comes from the space
    itself being anisotropic. Computed from sums of unit vectors: with ``S`` the sum over
    all tokens, ``S_p`` over prompt ``p`` and ``S_v`` over the copies of id ``v``, the
    ordered cross-prompt pairs sum to ``|S|^2 - sum_p |S_p|^2`` and the same-id ones among
    them to ``sum_v (|S_v|^2 - sum_copies |u|^2)``: one pass over the tokens per layer,
    where a sample of pairs left a bias shared by every model. NaN when no pair exists.
    """
    pooled, sizes = _stacked_prompts(hidden, "cross_prompt_cosine")
    n_layers, total = pooled.shape[0], pooled.shape[1]
    u = _unit(pooled)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=u.device), torch.as_tensor(sizes, device=u.device))
    per_prompt = torch.zeros(n_layers, len(sizes), u.shape[-1], dtype=u.dtype, device=u.device).index_add_(1, owner, u)
    pair_sum = (u.sum(dim=1) ** 2).sum(-1) - (per_prompt**2).sum(dim=(-2, -1))
    n_pairs = total * total - sum(n * n for n in sizes)
    if token_ids is not None:
        ids = [int(t) for seq in token_ids for t in seq]
        if len(ids) != total or any(len(set(seq)) != len(seq) for seq in token_ids):
            raise GeometryError(
                f"cross_prompt_cosine got {len(ids)} token ids for {total} tokens, or an id twice within a "
                "prompt; give each prompt's analysed ids (tga.geometry.analysed_positions)"
            )
        _, which, copies = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True, return_counts=True)
        inv = torch.as_tensor(which.reshape(-1), device=u.device)
        per_id = torch.zeros(n_layers, copies.size, u.shape[-1], dtype=u.dtype, device=u.device).index_add_(1, inv, u)
        pair_sum = pair_sum - ((per_id**2).sum(dim=(-2, -1)) - (u**2).sum(dim=(-2, -1)))
        n_pairs -= int((copies * (copies - 1)).sum())
    if n_pairs == 0:
        return torch.full((n_layers,), math.nan, dtype=torch.float64, device=pooled.device)
    return pair_sum / n_pairs


def pooled_distinct(hidden: Sequence[torch.Tensor], token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """All prompts' analysed tokens in one ``(L, N, d)`` set, each id once (its first prompt).

    The pooled TwoNN's points: within a prompt each id is analysed once already; across
    prompts a second copy would be identical at layer 0 under rotary positions and close
    after it, the near-duplicates :func:`tga.geometry.analysed_positions` keeps out. Past
    :data:`POOLED_TWONN_MAX_POINTS` distinct ids, a fixed random subset of them (in order).
    """
    pooled, sizes = _stacked_prompts(hidden, "the pooled TwoNN")
    ids = [int(t) for seq in token_ids for t in seq]
    if len(ids) != pooled.shape[1]:
        raise GeometryError(f"the pooled TwoNN got {len(ids)} token ids for {pooled.shape[1]} tokens")
    first = {}
    for i, tok in enumerate(ids):
        first.setdefault(tok, i)
    keep = sorted(first.values())
    if len(keep) > POOLED_TWONN_MAX_POINTS:  # thousands of test windows: a fixed subset
        chosen = np.random.default_rng(NULL_SEED).choice(len(keep), POOLED_TWONN_MAX_POINTS, replace=False)
        keep = [keep[i] for i in sorted(chosen.tolist())]
    return pooled[:, torch.as_tensor(keep, dtype=torch.long, device=pooled.device)]


def _twonn_log_mu_blockwise(x: torch.Tensor) -> list[torch.Tensor]:
    """:func:`_twonn_log_mu` of points ``(L, T, d)`` without the ``(L, T, T)`` distance
    matrices: per layer, :data:`DISTANCE_BLOCK_ELEMENTS` distances at a time, in two
    passes (which points repeat an earlier one; then each point's two nearest among the
    rest), with the same steps on each block. Every distance is computed as the whole
    matrix computes it, so the numbers are the same; only memory differs (thousands of
    pooled test-window tokens)."""
    n = x.shape[1]
    rows = max(1, DISTANCE_BLOCK_ELEMENTS // n)
    out: list[torch.Tensor] = []
    for points in x:
        def blocks() -> Iterator[tuple[int, torch.Tensor]]:
            for start in range(0, n, rows):
                yield start, torch.cdist(points[start:start + rows], points, compute_mode="donot_use_mm_for_euclid_dist")
        dup = torch.cat([_repeats_earlier(dist, start) for start, dist in blocks()])
        r = torch.cat([_two_nearest(dist, start, dup) for start, dist in blocks()])
        out += _kept_log_mu(r[None], dup[None])
    return out


def twonn_both(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(twonn, twonn_mle)`` of ``(L, T, d)`` from one distance matrix per layer, or,
    when those would hold more than :data:`DISTANCE_BLOCK_ELEMENTS` distances, from
    blocks of it (:func:`_twonn_log_mu_blockwise`: the same numbers)."""
    x, _ = _batched(h, min_tokens=MIN_TOKENS_TWONN, what="twonn")
    whole = x.shape[0] * x.shape[1] * x.shape[1] <= DISTANCE_BLOCK_ELEMENTS
    log_mu = _twonn_log_mu(_pairwise_distances(x)) if whole else _twonn_log_mu_blockwise(x)
    return _per_layer(log_mu, _twonn_fit, x), _per_layer(log_mu, _twonn_mle, x)


# --------------------------------------------------------------------------- null references


class NullBand(NamedTuple):
    """A value's reference distribution, summarised: its mean, its central 95% band and
    the percentile (0-100) of the value in it (the share of null draws at or below)."""

    mean: float
    lo: float
    hi: float
    percentile: float


NULL_NAN = NullBand(math.nan, math.nan, math.nan, math.nan)


def null_band(draws: np.ndarray | torch.Tensor, value: float) -> NullBand:
    """:class:`NullBand` of ``value`` among the finite ``draws`` (NaN fields without draws or value)."""
    d = np.asarray(torch.as_tensor(draws).detach().cpu(), dtype=np.float64).reshape(-1)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return NULL_NAN
    lo, hi = np.quantile(d, [0.025, 0.975])
    pct = 100.0 * float((d <= value).mean()) if not math.isnan(value) else math.nan
    return NullBand(float(d.mean()), float(lo), float(hi), pct)


@functools.lru_cache(maxsize=512)
def gaussian_twonn_draws(n: int, d: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """TwoNN of :data:`NULL_DRAWS` isotropic Gaussian samples of ``n`` points in ``d``
    dimensions: ``(Facco fits, MLEs)``, seed :data:`NULL_SEED`, cached per ``(n, d)``.

    The noise floor of a TwoNN value over ``n`` points: structureless points of full
    dimension ``d`` give these, far below ``d`` when ``n`` is small (21 points in 64
    dimensions give about 27), so a value near them says that ``n`` limits the estimate,
    not that the model's tokens have that dimension.
    """
    if n < MIN_TOKENS_TWONN or d < 1:
        return (), ()
    gen = torch.Generator().manual_seed(NULL_SEED)
    fits: list[float] = []
    mles: list[float] = []
    for start in range(0, NULL_DRAWS, 8):  # a few draws per batch bounds the (K, n, n) distances
        k = min(8, NULL_DRAWS - start)
        fit, mle = twonn_both(torch.randn(k, n, d, dtype=torch.float64, generator=gen))
        fits += fit.tolist()
        mles += mle.tolist()
    return tuple(fits), tuple(mles)


def twonn_null(n: int, d: int, values: torch.Tensor, mle: bool) -> list[NullBand]:
    """Per layer, the Gaussian floor of TwoNN ``values`` (``(L,)``) measured over ``n`` points in ``d`` dimensions."""
    draws = np.asarray(gaussian_twonn_draws(int(n), int(d))[1 if mle else 0], dtype=np.float64)
    return [null_band(draws, float(v)) for v in values.detach().cpu().tolist()]


def mean_logit_frequency_correlation(
    mean_hidden: torch.Tensor,
    output_embedding: torch.Tensor,
    token_counts: np.ndarray | torch.Tensor,
    exclude_ids: Sequence[int] = (),
    n_null: int = NULL_DIRECTIONS,
    seed: int = NULL_SEED,
) -> tuple[float, np.ndarray]:
    """Pearson correlation between the mean vector's logits and log token frequency, and
    the same correlation for ``n_null`` random unit directions (its null).

    ``logits = E m`` (``E``: ``(V, d)`` output embedding, ``m``: the mean final-norm
    vector; a logit bias is left out, since it would measure the bias, not the residual
    stream), correlated with ``log(count)`` over the tokens with ``count >= 1`` that are
    not in ``exclude_ids`` (the prompts' own tokens, which sit inside ``m``). A logit
    that equals ``log p(token) + c`` gives exactly 1, which is why Pearson: it asks
    whether the mean direction *is* the frequency direction (Gao et al. 2019). Any
    direction of a trained embedding already correlates with frequency, so the null is
    the correlation of isotropic random directions ``w`` in the same embedding (seed
    ``seed``): ``r(w) = w.g / sqrt(w^T G w) / |y|`` with ``g = E_c^T y`` and
    ``G = E_c^T E_c`` over the centred rows. Returns ``(r, null r's)``; NaN and an empty
    null if fewer than two tokens remain or either side is constant.
    """
    emb = output_embedding.detach().to(torch.float64)
    counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64, device=emb.device)
    if emb.dim() != 2 or counts.dim() != 1 or counts.numel() != emb.shape[0] or mean_hidden.numel() != emb.shape[1]:
        raise GeometryError(
            f"frequency correlation needs an output embedding (V, d), a mean vector (d,) and V counts; got "
            f"{tuple(emb.shape)}, {tuple(mean_hidden.shape)} and {tuple(counts.shape)}"
        )
    keep = counts > 0
    out = [int(i) for i in exclude_ids if 0 <= int(i) < keep.numel()]
    if out:
        keep[torch.as_tensor(out, dtype=torch.long, device=keep.device)] = False
    e, y = emb[keep], torch.log(counts[keep])
    if y.numel() < 2:
        return math.nan, np.zeros(0)
    e, y = e - e.mean(dim=0), y - y.mean()
    y_norm = float(y.norm())
    if y_norm == 0:
        return math.nan, np.zeros(0)
    m = mean_hidden.detach().to(emb).reshape(-1, 1)
    w = torch.randn(emb.shape[1], n_null, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    w = (w / w.norm(dim=0, keepdim=True)).to(emb.device)
    dirs = torch.cat([m, w], dim=1)  # (d, 1 + n_null)
    g = e.T @ y
    if e.shape[1] <= dirs.shape[1]:  # the (d, d) Gram matrix is the cheaper route
        spread = ((e.T @ e) @ dirs * dirs).sum(dim=0)
    else:
        spread = torch.cat([((e @ part) ** 2).sum(dim=0) for part in dirs.split(256, dim=1)])
    denom = torch.sqrt(spread.clamp_min(0)) * y_norm
    r = torch.where(denom > 0, (g @ dirs) / denom.clamp_min(EPS), torch.full_like(denom, math.nan))
    return float(r[0]), r[1:].cpu().numpy()


def compute_layer_metrics(
    hidden: torch.Tensor, direction: torch.Tensor, baseline: torch.Tensor, knn_k: int = 5
) -> dict[str, torch.Tensor]:
    """The per-prompt metrics (:data:`PROMPT_METRICS`) of one prompt's analysed tokens.

    ``hidden`` is ``(L, T, d)``, already restricted to
    :func:`tga.geometry.analysed_positions`; ``direction`` the ``(L, d)``
    :func:`mean_direction` and ``baseline`` the ``(L,)`` :func:`cross_prompt_cosine` of the
    prompts analysed together. Returns name -> ``(L,)`` float64. Shares one distance
    matrix between TwoNN and kNN and one SVD between the rank metrics.
    """
    if hidden.dim() != 3:
        raise GeometryError(f"expected stacked hidden states (L, T, d), got shape {tuple(hidden.shape)}")
    t = hidden.shape[1]
    if t < MIN_TOKENS_TWONN:
        raise GeometryError(
            f"only {t} distinct token(s) analysed; the geometry metrics need at least {MIN_TOKENS_TWONN} "
            "(TwoNN needs two neighbours per token)"
        )
    x = hidden.to(torch.float64)
    u = _unit(x)
    cos = _offdiag_mean(u @ u.transpose(-2, -1))
    erank, resid = _entropy_rank_and_residual(x)
    dist = _pairwise_distances(x)
    log_mu = _twonn_log_mu(dist)
    return {
        "mean_cosine": cos,
        "adjusted_cosine": cos - baseline.to(cos),
        "common_direction_share": common_direction_share(x, direction),
        "token_norm": x.norm(dim=-1).mean(dim=-1),
        "update_norm": mean_update_norm(x),
        "effective_rank": erank,
        "rank1_residual": resid,
        "twonn": _per_layer(log_mu, _twonn_fit, x),
        "twonn_mle": _per_layer(log_mu, _twonn_mle, x),
        "knn_overlap": _overlap_from_distances(dist, _check_k(knn_k, t)),
    }
