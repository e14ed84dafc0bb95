"""Geometry of token representations across layers.

Every metric takes the hidden states of ONE prompt, either ``(T, d)`` (one layer) or
``(L, T, d)`` (all layers stacked, computed in one vectorized call), works in float64
and returns a scalar / ``(L,)`` tensor. Prompts are processed unpadded, so no masking
is needed. Layer indexing follows docs/design.md: 0 = embedding, 1..N = blocks,
N+1 = final norm.

Metrics (names as written to ``metrics.csv``, see :data:`METRIC_NAMES`):

- ``mean_cosine``: off-diagonal mean of the token cosine-similarity matrix; its rise
  towards 1 with depth is the representation-degeneration / anisotropy signal
  (Ethayarajh 2019).
- ``centered_cosine``: the same after subtracting the mean token vector, which removes
  the common direction that dominates raw cosines (Ethayarajh 2019; Timkey & van
  Schijndel 2021). For T tokens the value is always ``>= -1/(T-1)``.
- ``token_norm``: mean L2 norm of the token vectors (residual-stream growth in Pre-LN,
  Xiong et al. 2020).
- ``update_norm``: mean over tokens of ``||h_l - h_{l-1}||``; NaN at layer 0.
- ``effective_rank``: ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` over the singular
  values of the ``T x d`` matrix (Roy & Vetterli 2007).
- ``rank1_residual``: ``||H - H_1||_F / ||H||_F`` with ``H_1`` the best rank-1
  approximation of the (uncentred) ``T x d`` matrix (Eckart-Young: equals
  ``sqrt(sum_{i>=2} s_i^2 / sum_i s_i^2)``). Dong, Cordonnier & Loukas (2021) measure
  the residual to ``1 x^T`` instead (all tokens equal); that is a stronger notion of
  collapse and is not what is reported here.
- ``intrinsic_dim``: TwoNN (Facco et al. 2017), maximum-likelihood form
  ``d = (N - 1) / sum_i log(r2_i / r1_i)`` (not the paper's linear fit); duplicate
  points are collapsed to one copy first, since the estimator needs ``r1 > 0``.
- ``knn_overlap``: neighbourhood overlap between consecutive layers (Doimo et al. 2020):
  fraction of each token's k nearest neighbours (Euclidean, self excluded) that are
  the same at layer l-1 and layer l, averaged over tokens; NaN at layer 0.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

__all__ = [
    "EPS",
    "METRIC_NAMES",
    "METRICS_COLUMNS",
    "SUMMARY_COLUMNS",
    "GeometryError",
    "cosine_similarity_matrix",
    "mean_pairwise_cosine",
    "mean_centered_cosine",
    "mean_token_norm",
    "mean_update_norm",
    "effective_rank",
    "rank1_residual",
    "twonn_intrinsic_dimension",
    "neighbourhood_overlap",
    "layer_names",
    "compute_layer_metrics",
    "load_prompts",
    "encode_prompts",
    "resolve_layer_indices",
    "analyze_model",
    "summarize_metrics",
    "analyze_checkpoints",
]

EPS = 1e-12
"""Guard for divisions by a norm; zero vectors get cosine 0 with everything."""

METRIC_NAMES: tuple[str, ...] = (
    "mean_cosine",
    "centered_cosine",
    "token_norm",
    "update_norm",
    "effective_rank",
    "rank1_residual",
    "intrinsic_dim",
    "knn_overlap",
)
METRICS_COLUMNS: list[str] = ["stage", "step", "layer", "layer_name", "prompt", "n_tokens", "metric", "value"]
SUMMARY_COLUMNS: list[str] = ["stage", "step", "layer", "layer_name", "metric", "mean", "std", "n_prompts"]

MIN_TOKENS_TWONN = 3  # a point needs a first and a second neighbour


class GeometryError(ValueError):
    """Bad input to the geometry analysis (prompts file, prompt, layer index...)."""


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# --------------------------------------------------------------------------- metrics


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


def mean_centered_cosine(h: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine after subtracting the mean token vector.

    Removes the shared direction (e.g. a large common bias) so that what remains is the
    relative arrangement of the tokens. Since the centred vectors sum to zero the value
    is bounded below by ``-1/(T-1)`` (attained when all centred vectors share one norm).
    """
    x, single = _batched(h, what="centered_cosine")
    return _unbatch(mean_pairwise_cosine(x - x.mean(dim=-2, keepdim=True)), single)


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


def _twonn_from_distances(dist: torch.Tensor) -> torch.Tensor:
    l, t, _ = dist.shape
    eye = torch.eye(t, dtype=torch.bool, device=dist.device)
    earlier = torch.ones(t, t, dtype=torch.bool, device=dist.device).tril(-1)  # j < i
    # A point is a duplicate if an earlier point coincides with it: keep the first copy only.
    dup = ((dist == 0) & earlier).any(dim=-1)  # (L, T)
    d = dist.masked_fill(eye, math.inf).masked_fill(dup.unsqueeze(-2), math.inf)
    r = torch.topk(d, k=2, dim=-1, largest=False).values  # (L, T, 2)
    keep = ~dup & torch.isfinite(r[..., 1])
    log_mu = torch.where(keep, torch.log(r[..., 1] / r[..., 0].clamp_min(EPS)), torch.zeros_like(r[..., 0]))
    n = keep.sum(dim=-1).to(dist.dtype)
    est = (n - 1) / log_mu.sum(dim=-1)
    return torch.where(n >= MIN_TOKENS_TWONN, est, torch.full_like(est, math.nan))


def twonn_intrinsic_dimension(h: torch.Tensor) -> torch.Tensor:
    """TwoNN intrinsic dimension (Facco et al. 2017), maximum-likelihood variant.

    For each point, ``mu = r2 / r1`` (2nd / 1st nearest-neighbour distance) is Pareto
    distributed with shape ``d`` on a locally uniform ``d``-manifold, whose MLE is
    ``(N - 1) / sum log mu`` (the unbiased form). Exact duplicates are collapsed to one
    copy (the paper's linear fit is not used). Needs ``T >= 3``; NaN if fewer than 3
    distinct points remain; ``inf`` if every ``mu == 1`` (perfect lattice).
    """
    x, single = _batched(h, min_tokens=MIN_TOKENS_TWONN, what="intrinsic_dim (TwoNN)")
    return _unbatch(_twonn_from_distances(_pairwise_distances(x)), single)


def _knn_membership(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(L, T, T)``: entry ``[l, i, j]`` is True iff j is among i's k nearest (self excluded)."""
    t = dist.shape[-1]
    eye = torch.eye(t, dtype=torch.bool, device=dist.device)
    idx = torch.topk(dist.masked_fill(eye, math.inf), k=k, dim=-1, largest=False).indices
    member = torch.zeros(dist.shape, dtype=torch.bool, device=dist.device)
    return member.scatter_(-1, idx, True)


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
    neighbourhood structure, ~k/(T-1) = unrelated. NaN at layer 0. Ties are broken by
    ``torch.topk`` (deterministic for identical inputs).
    """
    if h.dim() != 3:
        raise GeometryError(f"knn_overlap needs stacked layers (L, T, d), got shape {tuple(h.shape)}")
    x, _ = _batched(h, what="knn_overlap")
    return _overlap_from_distances(_pairwise_distances(x), _check_k(k, x.shape[1]))


def layer_names(n_layer: int) -> list[str]:
    """``['embedding', 'block1', ..., 'blockN', 'final_norm']`` (docs/design.md)."""
    return ["embedding", *(f"block{i}" for i in range(1, n_layer + 1)), "final_norm"]


def compute_layer_metrics(
    hidden: torch.Tensor, exclude_first_token: bool = False, knn_k: int = 5
) -> dict[str, torch.Tensor]:
    """All metrics of one prompt: ``hidden`` is ``(L, T, d)``; returns name -> ``(L,)`` float64.

    ``exclude_first_token`` drops position 0 before everything: the first token acts as an
    attention sink with an outsized norm (Xiao et al. 2023) and can dominate the geometry.
    Shares one distance matrix between TwoNN and kNN and one SVD between the rank metrics.
    """
    if hidden.dim() != 3:
        raise GeometryError(f"expected stacked hidden states (L, T, d), got shape {tuple(hidden.shape)}")
    x = hidden[:, 1:] if exclude_first_token else hidden
    t = x.shape[1]
    if t < MIN_TOKENS_TWONN:
        why = " after excluding the first token" if exclude_first_token else ""
        raise GeometryError(
            f"only {t} token(s){why}; the geometry metrics need at least {MIN_TOKENS_TWONN} "
            "(TwoNN needs two neighbours per token)"
        )
    x = x.to(torch.float64)
    u = _unit(x)
    cos = _offdiag_mean(u @ u.transpose(-2, -1))
    erank, resid = _entropy_rank_and_residual(x)
    dist = _pairwise_distances(x)
    return {
        "mean_cosine": cos,
        "centered_cosine": mean_centered_cosine(x),
        "token_norm": x.norm(dim=-1).mean(dim=-1),
        "update_norm": mean_update_norm(x),
        "effective_rank": erank,
        "rank1_residual": resid,
        "intrinsic_dim": _twonn_from_distances(dist),
        "knn_overlap": _overlap_from_distances(dist, _check_k(knn_k, t)),
    }


# --------------------------------------------------------------------------- prompts


def load_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Read a prompts file: one prompt per non-empty line, ``#`` lines are comments."""
    p = Path(path)
    if not p.is_file():
        raise GeometryError(
            f"prompts file {p} does not exist; create it (one prompt per line, '#' for comments) "
            "or point the config at an existing file (default: config/prompts.txt)"
        )
    text = p.read_text(encoding="utf-8")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        what = "is empty" if not text.strip() else "contains only comments/blank lines"
        raise GeometryError(f"prompts file {p} {what}; add at least one prompt (one per line, '#' for comments)")
    return prompts


def encode_prompts(
    prompts: Sequence[str], tokenizer: _Tokenizer, block_size: int, truncate: bool = True
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Tokenize prompts for the model's context.

    Returns ``(ids, info)``; ``info[i]`` = ``{"prompt", "n_tokens", "n_tokens_original",
    "truncated"}``. A prompt longer than ``block_size`` keeps its first ``block_size``
    tokens if ``truncate``, else raises.
    """
    if block_size < 1:
        raise GeometryError(f"block_size must be >= 1, got {block_size}")
    all_ids: list[list[int]] = []
    info: list[dict[str, Any]] = []
    for i, text in enumerate(prompts):
        if not text.strip():
            raise GeometryError(f"prompt {i} is empty; remove it or give it some text")
        ids = list(tokenizer.encode(text.strip()))
        if not ids:
            raise GeometryError(f"prompt {i} ({text[:40]!r}) encodes to zero tokens")
        n_orig = len(ids)
        if n_orig > block_size:
            if not truncate:
                raise GeometryError(
                    f"prompt {i} ({text[:40]!r}...) has {n_orig} tokens, more than the model's "
                    f"block_size={block_size}; shorten it or enable truncation"
                )
            ids = ids[:block_size]
        all_ids.append(ids)
        info.append({"prompt": i, "n_tokens": len(ids), "n_tokens_original": n_orig, "truncated": n_orig > block_size})
    return all_ids, info


def resolve_layer_indices(layers: Sequence[int], n_layers_total: int) -> list[int]:
    """Map python-style (possibly negative) layer indices to ``0..L-1``; deduplicated, order kept."""
    out: list[int] = []
    for j in layers:
        if isinstance(j, bool) or not isinstance(j, (int, np.integer)):
            raise GeometryError(f"heatmap layer index {j!r} is not an integer")
        if not -n_layers_total <= j < n_layers_total:
            raise GeometryError(
                f"heatmap layer index {j} is out of range: the model has {n_layers_total} hidden states "
                f"(embedding, blocks, final_norm), valid indices are {-n_layers_total}..{n_layers_total - 1}"
            )
        jj = int(j) % n_layers_total
        if jj not in out:
            out.append(jj)
    return out


# --------------------------------------------------------------------------- analysis


def analyze_model(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    stage: str,
    step: int,
    heatmap_layers: Sequence[int],
    exclude_first_token: bool = False,
    knn_k: int = 5,
    device: str | torch.device = "cpu",
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Run every prompt through ``model`` (one unpadded forward each) and measure all layers.

    Returns the long metrics DataFrame (:data:`METRICS_COLUMNS`; ``n_tokens`` = tokens the
    metrics were computed over, i.e. after ``exclude_first_token``) and the cosine matrices
    ``{f"{stage}/layer{j}/prompt{i}": float32 (T, T)}`` for the requested layers (with the
    first token excluded too when asked, so heatmaps match the metrics).
    """
    n_layer = int(model.config.n_layer)
    block_size = int(model.config.block_size)
    n_total = n_layer + 2
    heat = resolve_layer_indices(heatmap_layers, n_total)
    names = layer_names(n_layer)
    if not prompt_ids:
        raise GeometryError("no prompts to analyse")
    was_training = model.training
    model.eval()
    model.to(device)
    rows: list[tuple] = []
    mats: dict[str, np.ndarray] = {}
    try:
        with torch.inference_mode():
            for i, ids in enumerate(prompt_ids):
                if len(ids) > block_size:
                    raise GeometryError(
                        f"prompt {i} has {len(ids)} tokens but block_size is {block_size}; "
                        "encode with encode_prompts(..., truncate=True)"
                    )
                idx = torch.as_tensor(list(ids), dtype=torch.long, device=device).unsqueeze(0)
                out = model(idx, return_hidden_states=True)
                hs = out.hidden_states
                if hs is None or len(hs) != n_total:
                    got = None if hs is None else len(hs)
                    raise GeometryError(f"model returned {got} hidden states, expected n_layer + 2 = {n_total}")
                hidden = torch.stack([h[0] for h in hs])  # (L, T, d)
                try:
                    metrics = compute_layer_metrics(hidden, exclude_first_token=exclude_first_token, knn_k=knn_k)
                except GeometryError as e:
                    raise GeometryError(f"prompt {i} ({len(ids)} tokens): {e}") from e
                x = hidden[:, 1:] if exclude_first_token else hidden
                n_tok = x.shape[1]
                values = torch.stack([metrics[m] for m in METRIC_NAMES]).cpu().numpy()  # (M, L)
                for mi, m in enumerate(METRIC_NAMES):
                    for layer in range(n_total):
                        rows.append((stage, int(step), layer, names[layer], i, n_tok, m, float(values[mi, layer])))
                if heat:
                    cos = cosine_similarity_matrix(x[heat]).to(torch.float32).cpu().numpy()
                    for pos, j in enumerate(heat):
                        mats[f"{stage}/layer{j}/prompt{i}"] = cos[pos]
    finally:
        model.train(was_training)
    df = pd.DataFrame(rows, columns=METRICS_COLUMNS)
    return df, mats


def summarize_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof=1) across prompts per (stage, step, layer, metric).

    ``n_prompts`` counts the non-NaN values the statistics are over (0 for update_norm /
    knn_overlap at layer 0); std is NaN with fewer than two. Row order follows ``df``.
    """
    missing = set(METRICS_COLUMNS) - set(df.columns)
    if missing:
        raise GeometryError(f"metrics DataFrame lacks columns {sorted(missing)}")
    keys = ["stage", "step", "layer", "layer_name", "metric"]
    g = df.groupby(keys, sort=False, dropna=False)["value"]
    out = g.agg(mean="mean", std=lambda v: v.std(ddof=1), n_prompts="count").reset_index()
    out["n_prompts"] = out["n_prompts"].astype(int)
    return out[SUMMARY_COLUMNS]


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then ``os.replace`` so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def analyze_checkpoints(
    checkpoints: Mapping[str, str | os.PathLike[str]],
    prompts_path: str | os.PathLike[str],
    tokenizer: _Tokenizer,
    out_dir: str | os.PathLike[str],
    heatmap_layers: Sequence[int],
    exclude_first_token: bool = False,
    knn_k: int = 5,
    device: str | torch.device = "cpu",
) -> None:
    """Analyse each checkpoint (stage name -> path) on the prompts and write the geometry files.

    Writes ``metrics.csv``, ``summary.csv``, ``similarity.npz`` (docs/design.md) and
    ``prompts.csv`` (``prompt,n_tokens_input,n_tokens_original,truncated,text``: tokens fed
    to the model, tokens before truncation, whether the prompt was cut to the block size) into ``out_dir``, each atomically. A checkpoint's step is
    ``extra["step"]`` (default 0). All stages must see the same token ids (same block size).
    """
    from tga.model import load_checkpoint  # lazy: keeps this module importable on its own

    if not checkpoints:
        raise GeometryError("no checkpoints given to analyse")
    out = Path(out_dir)
    prompts = load_prompts(prompts_path)
    frames: list[pd.DataFrame] = []
    mats: dict[str, np.ndarray] = {}
    ids_ref: list[list[int]] | None = None
    info_ref: list[dict[str, Any]] = []
    for stage, ckpt in checkpoints.items():
        if "/" in stage:
            raise GeometryError(f"stage name {stage!r} must not contain '/' (used as the npz key separator)")
        if not Path(ckpt).is_file():
            raise GeometryError(f"checkpoint for stage {stage!r} not found: {ckpt}")
        model, extra = load_checkpoint(ckpt, map_location="cpu")
        ids, info = encode_prompts(prompts, tokenizer, int(model.config.block_size), truncate=True)
        if ids_ref is None:
            ids_ref, info_ref = ids, info
        elif ids != ids_ref:
            raise GeometryError(
                f"stage {stage!r} ({ckpt}) tokenizes the prompts differently from the first stage "
                "(different block_size?); analyse checkpoints of one run together"
            )
        step = int((extra or {}).get("step", 0))
        model_config_layers = model.config.n_layer
        df, m = analyze_model(
            model, ids, stage, step, heatmap_layers,
            exclude_first_token=exclude_first_token, knn_k=knn_k, device=device,
        )
        frames.append(df)
        mats.update(m)
        del model
    assert ids_ref is not None
    truncated = [d["prompt"] for d in info_ref if d["truncated"]]
    if truncated:
        warnings.warn(f"prompts {truncated} were truncated to the model's block size", stacklevel=2)
    start = 1 if exclude_first_token else 0
    for i, ids in enumerate(ids_ref):
        mats[f"tokens/prompt{i}"] = np.array([tokenizer.decode([t]) for t in ids[start:]], dtype=np.str_)
    mats["layer_names"] = np.array(layer_names(int(model_config_layers)), dtype=np.str_)

    metrics = pd.concat(frames, ignore_index=True)
    summary = summarize_metrics(metrics)
    prompt_table = pd.DataFrame(
        [
            (d["prompt"], d["n_tokens"], d["n_tokens_original"], d["truncated"], prompts[d["prompt"]])
            for d in info_ref
        ],
        columns=["prompt", "n_tokens_input", "n_tokens_original", "truncated", "text"],
    )

    def _npz(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **mats)

    _atomic_write(out / "metrics.csv", lambda p: metrics.to_csv(p, index=False))
    _atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    _atomic_write(out / "prompts.csv", lambda p: prompt_table.to_csv(p, index=False))
    _atomic_write(out / "similarity.npz", _npz)


def analyze_run(
    checkpoints: Mapping[str, str | os.PathLike[str]],
    prompts_path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
    threads: int = 0,
) -> None:
    """:func:`analyze_checkpoints` driven by the workflow's ``geometry`` settings and
    a saved tokenizer, as the pipeline calls it."""
    from tga.device import resolve_device
    from tga.tokenizers import load_tokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    analyze_checkpoints(
        checkpoints,
        prompts_path,
        load_tokenizer(tokenizer_path),
        out_dir,
        heatmap_layers=list(settings["heatmap_layers"]),
        exclude_first_token=bool(settings["exclude_first_token"]),
        knn_k=int(settings["knn_k"]),
        device=resolve_device(str(settings["device"])),
    )
