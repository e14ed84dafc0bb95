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
  cosine between random tokens of *different* prompts (fixed seed, same pairs at every
  layer and stage); NaN with fewer than two prompts.
- ``mean_logit_freq_corr``: Pearson correlation, over the tokens seen in the training
  split, between the logits of the mean final-norm vector (through the tied output
  embedding, plus the logit bias if any) and the log training frequency (Gao et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "EPS",
    "PROMPT_METRICS",
    "CROSS_PROMPT_METRICS",
    "METRIC_NAMES",
    "MIN_TOKENS_TWONN",
    "TWONN_FRACTION",
    "BASELINE_PAIRS",
    "BASELINE_SEED",
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
    "cross_prompt_pairs",
    "cross_prompt_cosine",
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
CROSS_PROMPT_METRICS: tuple[str, ...] = ("cross_prompt_cosine", "mean_logit_freq_corr")
METRIC_NAMES: tuple[str, ...] = PROMPT_METRICS + CROSS_PROMPT_METRICS

MIN_TOKENS_TWONN = 3  # a point needs a first and a second neighbour
TWONN_FRACTION = 0.9
"""Share of the smallest ``mu`` Facco et al. (2017) keep for the fit (the tail is noisy)."""
BASELINE_PAIRS = 10_000
"""Random cross-prompt token pairs behind ``cross_prompt_cosine``; its sampling s.e. is
about ``sd(cos) / 100``, well below the layer-to-layer changes it is read for."""
BASELINE_SEED = 0


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


def _twonn_log_mu(dist: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, ``log(r2 / r1)`` of every point, exact duplicates kept once.

    A point that coincides with an earlier one has ``r1 = 0`` and no finite ``mu``; only
    the first copy is used. :func:`tga.geometry.analysed_positions` already removes
    repeated tokens, so in the pipeline this guard only matters for distinct tokens that
    coincide.
    """
    _, t, _ = dist.shape
    eye = torch.eye(t, dtype=torch.bool, device=dist.device)
    earlier = torch.ones(t, t, dtype=torch.bool, device=dist.device).tril(-1)  # j < i
    dup = ((dist == 0) & earlier).any(dim=-1)  # (L, T)
    d = dist.masked_fill(eye, math.inf).masked_fill(dup.unsqueeze(-2), math.inf)
    r = torch.topk(d, k=2, dim=-1, largest=False).values  # (L, T, 2)
    keep = ~dup & torch.isfinite(r[..., 1])
    log_mu = torch.log(r[..., 1] / r[..., 0].clamp_min(EPS))
    return [log_mu[layer][keep[layer]] for layer in range(dist.shape[0])]


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


def cross_prompt_pairs(
    sizes: Sequence[int],
    token_ids: Sequence[int] | None = None,
    n_pairs: int = BASELINE_PAIRS,
    seed: int = BASELINE_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` random pairs of tokens from different prompts, as indices into all
    prompts' tokens concatenated (``sizes[i]`` tokens from prompt ``i``).

    The first token is uniform over all tokens, the second uniform over the other
    prompts' tokens. With ``token_ids`` (the concatenated ids), pairs of the same id are
    redrawn: within a prompt each id is analysed once, so the baseline compares distinct
    tokens too. Fixed ``seed``: every layer and stage is measured on the same pairs.
    Empty arrays when no such pair exists (fewer than two prompts, or one id throughout).
    """
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    if (sizes_arr < 0).any() or n_pairs < 1:
        raise GeometryError(f"cross_prompt_pairs needs sizes >= 0 and n_pairs >= 1, got {list(sizes)}, {n_pairs}")
    total = int(sizes_arr.sum())
    ids = None if token_ids is None else np.asarray(token_ids, dtype=np.int64)
    if ids is not None and ids.shape != (total,):
        raise GeometryError(f"cross_prompt_pairs got {ids.size} token ids for {total} tokens")
    owner = np.repeat(np.arange(len(sizes_arr)), sizes_arr)
    none = np.zeros(0, dtype=np.int64)
    if int((sizes_arr > 0).sum()) < 2 or (ids is not None and np.unique(ids).size < 2):
        return none, none  # with two prompts and two ids, some cross-prompt pair differs
    starts = np.concatenate([[0], np.cumsum(sizes_arr)[:-1]])
    rng = np.random.default_rng(seed)
    firsts, seconds, have = [], [], 0
    while have < n_pairs:
        first = rng.integers(0, total, size=n_pairs)
        p = owner[first]
        other = (rng.random(n_pairs) * (total - sizes_arr[p])).astype(np.int64)  # uniform over the rest
        second = np.where(other < starts[p], other, other + sizes_arr[p])
        ok = np.ones(n_pairs, dtype=bool) if ids is None else ids[first] != ids[second]
        firsts.append(first[ok])
        seconds.append(second[ok])
        have += int(ok.sum())
    return np.concatenate(firsts)[:n_pairs], np.concatenate(seconds)[:n_pairs]


def cross_prompt_cosine(
    hidden: Sequence[torch.Tensor],
    token_ids: Sequence[Sequence[int]] | None = None,
    n_pairs: int = BASELINE_PAIRS,
    seed: int = BASELINE_SEED,
) -> torch.Tensor:
    """Ethayarajh's (2019) anisotropy baseline per layer, ``(L,)``: the mean cosine between
    random tokens of different prompts (:func:`cross_prompt_pairs`; with ``token_ids``,
    one list per prompt, never two copies of one id).

    ``hidden`` is one ``(L, T_i, d)`` tensor per prompt. Two unrelated tokens share no
    context, so whatever cosine they have comes from the space itself being anisotropic;
    NaN when no pair exists (fewer than two prompts).
    """
    pooled, sizes = _stacked_prompts(hidden, "cross_prompt_cosine")
    ids = None if token_ids is None else [int(t) for seq in token_ids for t in seq]
    first, second = cross_prompt_pairs(sizes, ids, n_pairs, seed)
    if first.size == 0:
        return torch.full((pooled.shape[0],), math.nan, dtype=torch.float64, device=pooled.device)
    u = _unit(pooled)
    a = torch.as_tensor(first, device=u.device)
    b = torch.as_tensor(second, device=u.device)
    return (u[:, a] * u[:, b]).sum(dim=-1).mean(dim=-1)


def mean_logit_frequency_correlation(
    mean_hidden: torch.Tensor,
    output_embedding: torch.Tensor,
    logit_bias: torch.Tensor | None,
    token_counts: np.ndarray | torch.Tensor,
) -> float:
    """Pearson correlation between the mean vector's logits and log token frequency.

    ``logits = E m + b`` (``E``: ``(V, d)`` output embedding, ``m``: the mean final-norm
    vector, ``b``: the logit bias or none), correlated with ``log(count)`` over the tokens
    with ``count >= 1``. A logit that equals ``log p(token) + c`` (a unigram model) gives
    exactly 1, which is why Pearson and not a rank correlation: it asks whether the mean
    direction *is* the frequency direction (Gao et al. 2019). NaN if fewer than two tokens
    were seen or either side is constant.
    """
    emb = output_embedding.detach().to(torch.float64)
    counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64, device=emb.device)
    if emb.dim() != 2 or counts.dim() != 1 or counts.numel() != emb.shape[0] or mean_hidden.numel() != emb.shape[1]:
        raise GeometryError(
            f"frequency correlation needs an output embedding (V, d), a mean vector (d,) and V counts; got "
            f"{tuple(emb.shape)}, {tuple(mean_hidden.shape)} and {tuple(counts.shape)}"
        )
    logits = emb @ mean_hidden.detach().to(torch.float64).reshape(-1)
    if logit_bias is not None:
        logits = logits + logit_bias.detach().to(torch.float64).reshape(-1)[: emb.shape[0]]
    seen = counts > 0
    x, y = logits[seen], torch.log(counts[seen])
    if x.numel() < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else math.nan


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
