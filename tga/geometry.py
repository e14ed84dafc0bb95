"""The geometry analysis of a model: prompts in, ``metrics.csv`` and friends out.

Why a module of its own: this is the driver around the metric functions of
:mod:`tga.metrics` (their definitions: docs/metrics.md). It reads and encodes the
prompts, runs each prompt through a model for its hidden states at every layer, chooses
the tokens the metrics see, and writes the long tables and similarity matrices
(docs/design.md) for one or several checkpoints. The metrics know nothing of models or
files; everything here does.

**Which tokens.** Every metric is computed over each token's *first occurrence* in a
prompt (positions from :func:`analysed_positions`; position 0 is dropped first when
``exclude_first_token`` is true, or is ``auto`` and the tokenizer adds a BOS token:
:func:`resolve_exclude_first_token`; ``prompts.csv`` records which was done). The rule depends only on the token ids, so the same token set
is measured at every layer and every training stage. It removes duplicates, which with
rotary positions are identical at layer 0 (no position is added there) and nearly
identical after block 1: distance-based metrics would otherwise jump between those two
layers for no reason but the duplicates.

**Rows.** Per-prompt metrics (:data:`tga.metrics.PROMPT_METRICS`) get one row per prompt
and layer. The cross-prompt metrics pool the tokens of every prompt; their rows carry
``prompt = -1`` (:data:`CROSS_PROMPT`): ``cross_prompt_cosine``, ``twonn_pooled`` and
``twonn_mle_pooled`` at every layer, and ``mean_logit_freq_corr`` (the mean final-norm
vector's logits through the tied output embedding against the training split's log
token frequency) as one row at the ``final_norm`` layer, written only when the train
token file is given.

**Prompts.** A prompts file (one prompt per line), or ``N`` windows of ``L`` tokens of
the test split (``geometry.prompts: {test_windows, length, seed}``,
:mod:`tga.prompt_windows`), fed to the model as they are; ``prompts.csv`` then records
each window's start and the split's sha256, and only the first :data:`HEATMAP_PROMPTS`
windows keep heatmap matrices. ``geometry.batch_size`` prompts go through one forward
(:func:`_hidden_states`).

**Null columns.** :data:`NULL_COLUMNS` hold, beside a value that has one, its null
reference (:class:`tga.metrics.NullBand`): for every TwoNN value the isotropic
Gaussian of the same number of points and dimensions, for ``mean_logit_freq_corr``
random directions in the same embedding; NaN elsewhere. They are columns, not metrics,
so nothing that iterates the ``metric`` column (the A − B comparisons) treats a
reference as a measurement.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from tga.atomic import atomic_write
from tga.metrics import (
    MIN_TOKENS_TWONN,
    NULL_NAN,
    PROMPT_METRICS,
    GeometryError,
    NullBand,
    compute_layer_metrics,
    cosine_similarity_matrix,
    cross_prompt_cosine,
    mean_direction,
    mean_logit_frequency_correlation,
    null_band,
    pooled_distinct,
    twonn_both,
    twonn_null,
)
from tga.prompt_windows import (DEVICE_BATCH_SIZE, TEST_WINDOW_KEYS, TestWindows, is_test_windows, prompt_batch_size,
                                read_test_windows, window_texts)

__all__ = [
    "CROSS_PROMPT",
    "NULL_COLUMNS",
    "METRICS_COLUMNS",
    "SUMMARY_COLUMNS",
    "FIRST_TOKEN_SETTINGS",
    "analysed_positions",
    "tokenizer_adds_bos",
    "resolve_exclude_first_token",
    "prompt_table",
    "train_token_counts",
    "layer_names",
    "load_prompts",
    "encode_prompts",
    "resolve_layer_indices",
    "analyze_model",
    "summarize_metrics",
    "analyze_checkpoints",
    "analyze_run",
    "prompt_source",
    "window_prompts",
    "resolve_batch_size",
    "HEATMAP_PROMPTS",
]

CROSS_PROMPT = -1
"""``prompt`` value of the rows of a metric computed across prompts, not within one."""

NULL_COLUMNS: list[str] = ["null_mean", "null_lo", "null_hi", "null_percentile"]
"""A value's null reference (:class:`tga.metrics.NullBand`): its mean, 95% band, and the
value's percentile in it; NaN for a metric without one. In ``summary.csv``, the mean over
prompts of each prompt's field."""
_BASE_METRICS_COLUMNS = ["stage", "step", "layer", "layer_name", "prompt", "n_tokens", "metric", "value"]
METRICS_COLUMNS: list[str] = _BASE_METRICS_COLUMNS + NULL_COLUMNS
SUMMARY_COLUMNS: list[str] = ["stage", "step", "layer", "layer_name", "metric", "mean", "std", "n_prompts", *NULL_COLUMNS]
FIRST_TOKEN_SETTINGS: tuple[object, ...] = ("auto", True, False)
"""Values of ``geometry.exclude_first_token``."""
HEATMAP_PROMPTS = 8
"""With test windows, only windows 0-7 keep similarity matrices (and their tokens) in
``similarity.npz``: the figures draw prompt 0, and a thousand windows' matrices would
make the file hundreds of MB per stage. A prompts file keeps every prompt's."""
"""Prompts per forward on a GPU when ``geometry.batch_size`` is null."""


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# --------------------------------------------------------------------------- tokens and layers


def analysed_positions(ids: Sequence[int], exclude_first_token: bool = False) -> list[int]:
    """Positions whose hidden states the metrics use: each token id's first occurrence.

    Position 0 is dropped first when ``exclude_first_token`` (an attention sink with an
    outsized norm, Xiao et al. 2023). Depends on the ids only, so every layer and every
    checkpoint is measured on the same tokens, and no duplicate (identical at layer 0
    under rotary positions) can make a distance-based metric jump between layers.
    """
    seen: set[int] = set()
    keep: list[int] = []
    for pos in range(1 if exclude_first_token else 0, len(ids)):
        tok = int(ids[pos])
        if tok not in seen:
            seen.add(tok)
            keep.append(pos)
    return keep


def tokenizer_adds_bos(tokenizer: object) -> bool:
    """Whether ``tokenizer.encode`` puts a BOS token first (its ``adds_bos``; False if it
    does not say: tga's own char and GPT-2 tokenizers add none)."""
    return bool(getattr(tokenizer, "adds_bos", False))


def resolve_exclude_first_token(setting: bool | str, adds_bos: bool) -> bool:
    """``geometry.exclude_first_token`` as a decision: ``auto`` drops position 0 exactly
    when the tokenizer adds a BOS token, whose attention sink (Xiao et al. 2023) would
    otherwise enter every metric and the common direction; ``true`` / ``false`` as said."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return bool(adds_bos)
    raise GeometryError(
        f"geometry.exclude_first_token must be auto, true or false, got {setting!r}"
    )


def train_token_counts(path: str | os.PathLike[str], vocab_size: int) -> np.ndarray:
    """Occurrences of each of ``vocab_size`` ids in a token file (tga/data.py format)."""
    from tga.data import load_token_file, read_token_metadata  # lazy: keeps this module light

    meta_vocab = int(read_token_metadata(path)["vocab_size"])
    if meta_vocab != vocab_size:
        raise GeometryError(
            f"train token file {path} has vocab_size {meta_vocab} but the model's is {vocab_size}: "
            "it was tokenized for another model"
        )
    tokens = np.asarray(load_token_file(path), dtype=np.int64)
    return np.bincount(tokens, minlength=vocab_size).astype(np.float64)


def layer_names(n_layer: int) -> list[str]:
    """``['embedding', 'block1', ..., 'blockN', 'final_norm']`` (docs/design.md)."""
    return ["embedding", *(f"block{i}" for i in range(1, n_layer + 1)), "final_norm"]


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


def _output_embedding(model: torch.nn.Module) -> torch.Tensor:
    """The tied output embedding over the real vocabulary (a logit bias is left out:
    the frequency correlation asks about the residual stream, not the bias)."""
    emb = getattr(model, "token_embedding", None)
    if not isinstance(emb, torch.nn.Embedding):
        raise GeometryError(
            f"the logit-frequency correlation needs the tied output embedding `token_embedding`; "
            f"{type(model).__name__} has none"
        )
    return emb.weight[: int(model.config.vocab_size)]


def _rows(stage: str, step: int, names: list[str], prompt: int, n_tok: int, metric: str,
          values: Sequence[float], nulls: Sequence[NullBand] | None = None) -> list[tuple]:
    """One metrics.csv row per layer of ``values`` (with its null, NaN without)."""
    nulls = nulls or [NULL_NAN] * len(values)
    return [(stage, int(step), j, names[j], prompt, n_tok, metric, float(v), *nb)
            for j, (v, nb) in enumerate(zip(values, nulls))]


def analyze_model(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    stage: str,
    step: int,
    heatmap_layers: Sequence[int],
    exclude_first_token: bool | str = "auto",
    knn_k: int = 5,
    device: str | torch.device = "cpu",
    token_counts: np.ndarray | None = None,
    adds_bos: bool = False,
    progress_label: str | None = None,
    batch_size: int = 1,
    heatmap_prompts: int | None = None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Run every prompt through ``model`` and measure all layers.

    ``batch_size`` 1 runs one unpadded forward per prompt (the CPU default: the default
    study's outputs bit for bit); more runs that many prompts per forward
    (:func:`_hidden_states`: prompts of equal length together, right-padded; exact for a
    causal model, whose positions never attend to the padding after them). On a CPU the
    padded batch's float32 sums may differ in the last bits (up to 2.5e-6 measured at
    6 x 384); equal-length batches (test windows) were bit-identical on the CPU tested.

    Metrics use each prompt's :func:`analysed_positions`; the cross-prompt ones pool them
    over all prompts. ``token_counts`` (training-split occurrences per id, see
    :func:`train_token_counts`) adds ``mean_logit_freq_corr``. ``exclude_first_token``
    is resolved by :func:`resolve_exclude_first_token` with ``adds_bos`` (whether the
    tokenizer that made ``prompt_ids`` puts a BOS first). Returns the long metrics
    DataFrame (:data:`METRICS_COLUMNS`; ``n_tokens`` = tokens a value is computed over,
    ``prompt`` = :data:`CROSS_PROMPT` for cross-prompt rows) and the cosine matrices
    ``{f"{stage}/layer{j}/prompt{i}": float32 (T, T)}`` of the requested layers over every
    position (after ``exclude_first_token``), so a heatmap reads as the prompt's text.
    ``progress_label`` names a per-prompt progress display (:func:`tga.progress.progress`),
    worth it for large pretrained models; None shows none. ``heatmap_prompts`` keeps the
    matrices of the first that many prompts only (None: all), so a thousand test windows
    do not write a thousand heatmaps (:data:`HEATMAP_PROMPTS`).
    """
    from tga.progress import progress

    exclude_first_token = resolve_exclude_first_token(exclude_first_token, adds_bos)
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
    selected: list[torch.Tensor] = []
    selected_ids: list[list[int]] = []
    mats: dict[str, np.ndarray] = {}
    start = 1 if exclude_first_token else 0
    if batch_size < 1:
        raise GeometryError(f"geometry.batch_size must be >= 1, got {batch_size}")
    positions_of = []
    for i, ids in enumerate(prompt_ids):
        if len(ids) > block_size:
            raise GeometryError(
                f"prompt {i} has {len(ids)} tokens but block_size is {block_size}; "
                "encode with encode_prompts(..., truncate=True)"
            )
        positions = analysed_positions(ids, exclude_first_token)
        if len(positions) < MIN_TOKENS_TWONN:
            why = " after excluding the first token" if exclude_first_token else ""
            raise GeometryError(
                f"prompt {i} ({len(ids)} tokens) has {len(positions)} distinct token(s){why}; the "
                f"geometry metrics need at least {MIN_TOKENS_TWONN} (TwoNN needs two neighbours per token)"
            )
        positions_of.append(positions)
    n_heat = len(prompt_ids) if heatmap_prompts is None else heatmap_prompts
    try:
        with torch.inference_mode():
            shown = progress(_hidden_states(model, prompt_ids, batch_size, n_total, device), total=len(prompt_ids),
                             desc=progress_label or "", unit="prompts", enabled=bool(progress_label))
            for i, hidden in enumerate(shown):  # hidden: (L, T, d)
                positions = positions_of[i]
                selected.append(hidden[:, positions].to(torch.float64))
                selected_ids.append([int(prompt_ids[i][p]) for p in positions])
                if heat and i < n_heat:
                    cos = cosine_similarity_matrix(hidden[heat, start:]).to(torch.float32).cpu().numpy()
                    for pos, j in enumerate(heat):
                        mats[f"{stage}/layer{j}/prompt{i}"] = cos[pos]
            direction = mean_direction(selected)
            baseline = cross_prompt_cosine(selected, selected_ids)
            values = {i: compute_layer_metrics(x, direction, baseline, knn_k) for i, x in enumerate(selected)}
            distinct = pooled_distinct(selected, selected_ids)
            pooled_fit, pooled_mle = twonn_both(distinct)
            freq_corr = None
            if token_counts is not None:
                prompt_tokens = sorted({int(t) for ids in prompt_ids for t in ids})
                freq_corr = mean_logit_frequency_correlation(direction[-1], _output_embedding(model), token_counts,
                                                             exclude_ids=prompt_tokens)
    finally:
        model.train(was_training)
    d_model = int(selected[0].shape[-1])
    rows: list[tuple] = []
    for i, metrics in values.items():
        n_tok = int(selected[i].shape[1])
        for m in PROMPT_METRICS:
            nulls = twonn_null(n_tok, d_model, metrics[m], mle=m == "twonn_mle") if m in _TWONN else None
            rows += _rows(stage, step, names, i, n_tok, m, metrics[m].cpu().tolist(), nulls)
    n_pooled = sum(int(x.shape[1]) for x in selected)
    rows += _rows(stage, step, names, CROSS_PROMPT, n_pooled, "cross_prompt_cosine", baseline.cpu().tolist())
    n_distinct = int(distinct.shape[1])
    for m, v, mle in (("twonn_pooled", pooled_fit, False), ("twonn_mle_pooled", pooled_mle, True)):
        rows += _rows(stage, step, names, CROSS_PROMPT, n_distinct, m, v.cpu().tolist(),
                      twonn_null(n_distinct, d_model, v, mle=mle))
    if freq_corr is not None:
        r, null = freq_corr
        rows.append((stage, int(step), n_total - 1, names[-1], CROSS_PROMPT, n_pooled, "mean_logit_freq_corr", r,
                     *null_band(null, r)))
    return pd.DataFrame(rows, columns=METRICS_COLUMNS), mats


_TWONN = ("twonn", "twonn_mle")


def _forward_hidden(model: torch.nn.Module, idx: torch.Tensor, n_total: int) -> torch.Tensor:
    """The ``(L, B, T, d)`` hidden states of a ``(B, T)`` batch of ids."""
    hs = model(idx, return_hidden_states=True, return_logits=False).hidden_states  # no LM head: unused here
    if hs is None or len(hs) != n_total:
        got = None if hs is None else len(hs)
        raise GeometryError(f"model returned {got} hidden states, expected n_layer + 2 = {n_total}")
    return torch.stack(list(hs))


def _hidden_states(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], batch_size: int, n_total: int,
                   device: str | torch.device) -> Iterator[torch.Tensor]:
    """Each prompt's ``(L, T_i, d)`` hidden states, in prompt order.

    ``batch_size`` 1: one unpadded forward per prompt. More: the prompts sorted by length
    (stable), ``batch_size`` at a time, each batch right-padded to its longest with id 0.
    A causal model's position ``t`` attends to positions ``<= t`` only and its position
    encoding (rotary or learned) depends on ``t`` alone, so a prompt's states do not
    depend on the padding after it; equal-length prompts (test windows) need none. The
    states of a batch are held until the prompts before them in order are handed out.
    """
    if batch_size == 1:
        for ids in prompt_ids:
            idx = torch.as_tensor(list(ids), dtype=torch.long, device=device).unsqueeze(0)
            yield _forward_hidden(model, idx, n_total)[:, 0]
        return
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    ready: dict[int, torch.Tensor] = {}
    next_out = 0
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        longest = max(len(prompt_ids[i]) for i in batch)
        idx = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            idx[row, : len(prompt_ids[i])] = torch.as_tensor(list(prompt_ids[i]), dtype=torch.long)
        hidden = _forward_hidden(model, idx.to(device), n_total)
        for row, i in enumerate(batch):
            ready[i] = hidden[:, row, : len(prompt_ids[i])]
        while next_out in ready:
            yield ready.pop(next_out)
            next_out += 1


def summarize_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof=1) across prompts per (stage, step, layer, metric).

    ``n_prompts`` counts the non-NaN values the statistics are over (0 for update_norm /
    knn_overlap at layer 0); std is NaN with fewer than two. A cross-prompt metric (rows
    with ``prompt == CROSS_PROMPT``) has one value: mean = that value, std NaN, and
    ``n_prompts`` = the prompts it pools (0 if the value is NaN). The :data:`NULL_COLUMNS`
    are the mean over prompts of each prompt's (NaN where absent, as in a table written
    before they existed). Row order follows ``df``.
    """
    missing = set(_BASE_METRICS_COLUMNS) - set(df.columns)
    if missing:
        raise GeometryError(f"metrics DataFrame lacks columns {sorted(missing)}")
    keys = ["stage", "step", "layer", "layer_name", "metric"]
    d = df.assign(_cross=df["prompt"] == CROSS_PROMPT, **{c: np.nan for c in NULL_COLUMNS if c not in df.columns})
    out = (
        d.groupby(keys, sort=False, dropna=False)
        .agg(mean=("value", "mean"), std=("value", lambda v: v.std(ddof=1)), n_prompts=("value", "count"),
             cross=("_cross", "all"), **{c: (c, "mean") for c in NULL_COLUMNS})
        .reset_index()
    )
    pooled = out["stage"].map(d[~d["_cross"]].groupby("stage")["prompt"].nunique()).fillna(0)
    cross = out["cross"].astype(bool)
    out.loc[cross, "n_prompts"] = np.where(out.loc[cross, "n_prompts"] > 0, pooled[cross], 0)
    out["n_prompts"] = out["n_prompts"].astype(int)
    return out[SUMMARY_COLUMNS]


def prompt_table(prompts: Sequence[str], info: Sequence[Mapping[str, Any]], first_token_excluded: bool,
                 windows: TestWindows | None = None) -> pd.DataFrame:
    """``prompts.csv``: per prompt the tokens fed to the model, the tokens before
    truncation, whether it was cut to the block size, whether position 0 was left out
    of the metrics (``geometry.exclude_first_token`` as resolved), and the text. For
    test ``windows`` also each window's ``start`` (token offset in the split) and the
    split's ``split_sha256``; the text is the decoded window."""
    table = pd.DataFrame(
        [(d["prompt"], d["n_tokens"], d["n_tokens_original"], d["truncated"], bool(first_token_excluded),
          prompts[d["prompt"]]) for d in info],
        columns=["prompt", "n_tokens_input", "n_tokens_original", "truncated", "first_token_excluded", "text"],
    )
    if windows is not None:
        table.insert(1, "start", [windows.starts[d["prompt"]] for d in info])
        table.insert(len(table.columns) - 1, "split_sha256", windows.split_sha256)
    return table


def window_prompts(windows: TestWindows, tokenizer: _Tokenizer, block_size: int
                   ) -> tuple[list[str], list[list[int]], list[dict[str, Any]]]:
    """Test windows as prompts: ``(texts, ids, info)`` as :func:`encode_prompts` gives
    them for a prompts file, the ids being the windows themselves (never re-encoded:
    decoding and encoding a cut window need not give back its ids)."""
    if windows.length > block_size:
        raise GeometryError(
            f"geometry.prompts: windows of {windows.length} tokens are longer than the model's block_size="
            f"{block_size}; set length to at most {block_size}"
        )
    ids = windows.as_lists()
    info = [{"prompt": i, "n_tokens": len(w), "n_tokens_original": len(w), "truncated": False}
            for i, w in enumerate(ids)]
    return window_texts(windows, tokenizer), ids, info


def resolve_batch_size(setting: int | None, device: str | torch.device) -> int:
    """``geometry.batch_size`` for a job on ``device``
    (:func:`tga.prompt_windows.prompt_batch_size`)."""
    return prompt_batch_size(setting, torch.device(device).type)


def analyze_checkpoints(
    checkpoints: Mapping[str, str | os.PathLike[str]],
    prompts_path: str | os.PathLike[str] | TestWindows,
    tokenizer: _Tokenizer,
    out_dir: str | os.PathLike[str],
    heatmap_layers: Sequence[int],
    exclude_first_token: bool | str = "auto",
    knn_k: int = 5,
    device: str | torch.device = "cpu",
    train_tokens: str | os.PathLike[str] | None = None,
    batch_size: int = 1,
) -> None:
    """Analyse each checkpoint (stage name -> path) on the prompts and write the geometry files.

    ``prompts_path`` is a prompts file, or test windows (:func:`tga.prompt_windows.read_test_windows`):
    their ids go to the model as they are, and only the first :data:`HEATMAP_PROMPTS`
    windows keep similarity matrices. Writes ``metrics.csv``, ``summary.csv``,
    ``similarity.npz`` (docs/design.md) and ``prompts.csv`` (:func:`prompt_table`) into
    ``out_dir``, each atomically. ``exclude_first_token`` ``auto`` follows the tokenizer
    (:func:`tokenizer_adds_bos`). A checkpoint's step is ``extra["step"]`` (default 0).
    All stages must see the same token ids (same block size). ``train_tokens`` (the
    training split's token file) adds ``mean_logit_freq_corr`` to every stage.
    ``batch_size``: prompts per forward pass (:func:`analyze_model`).
    """
    from tga.model import load_checkpoint  # lazy: keeps this module importable on its own
    from tga.progress import progress

    if not checkpoints:
        raise GeometryError("no checkpoints given to analyse")
    out = Path(out_dir)
    windows = prompts_path if isinstance(prompts_path, TestWindows) else None
    prompts = [] if windows is not None else load_prompts(prompts_path)
    exclude_first_token = resolve_exclude_first_token(exclude_first_token, tokenizer_adds_bos(tokenizer))
    frames: list[pd.DataFrame] = []
    mats: dict[str, np.ndarray] = {}
    ids_ref: list[list[int]] | None = None
    info_ref: list[dict[str, Any]] = []
    counts: np.ndarray | None = None
    # Progress only for an evolution series: init + trained take seconds, and `tga analyze`
    # keeps its stderr to the one error line when the prompts are bad.
    for stage, ckpt in progress(checkpoints.items(), total=len(checkpoints), desc=f"geometry into {out}",
                                unit="checkpoints", enabled=len(checkpoints) > 2):
        if "/" in stage:
            raise GeometryError(f"stage name {stage!r} must not contain '/' (used as the npz key separator)")
        if not Path(ckpt).is_file():
            raise GeometryError(f"checkpoint for stage {stage!r} not found: {ckpt}")
        model, extra = load_checkpoint(ckpt, map_location="cpu")
        if windows is not None:
            prompts, ids, info = window_prompts(windows, tokenizer, int(model.config.block_size))
        else:
            ids, info = encode_prompts(prompts, tokenizer, int(model.config.block_size), truncate=True)
        if ids_ref is None:
            ids_ref, info_ref = ids, info
            if train_tokens is not None:
                counts = train_token_counts(train_tokens, int(model.config.vocab_size))
        elif ids != ids_ref:
            raise GeometryError(
                f"stage {stage!r} ({ckpt}) tokenizes the prompts differently from the first stage "
                "(different block_size?); analyse checkpoints of one run together"
            )
        step = int((extra or {}).get("step", 0))
        model_config_layers = model.config.n_layer
        df, m = analyze_model(
            model, ids, stage, step, heatmap_layers,
            exclude_first_token=exclude_first_token, knn_k=knn_k, device=device, token_counts=counts,
            batch_size=batch_size, heatmap_prompts=None if windows is None else HEATMAP_PROMPTS,
        )
        frames.append(df)
        mats.update(m)
        del model
    assert ids_ref is not None
    truncated = [d["prompt"] for d in info_ref if d["truncated"]]
    if truncated:
        warnings.warn(f"prompts {truncated} were truncated to the model's block size", stacklevel=2)
    start = 1 if exclude_first_token else 0
    for i, ids in enumerate(ids_ref if windows is None else ids_ref[:HEATMAP_PROMPTS]):
        mats[f"tokens/prompt{i}"] = np.array([tokenizer.decode([t]) for t in ids[start:]], dtype=np.str_)
    mats["layer_names"] = np.array(layer_names(int(model_config_layers)), dtype=np.str_)

    metrics = pd.concat(frames, ignore_index=True)
    summary = summarize_metrics(metrics)
    table = prompt_table(prompts, info_ref, exclude_first_token, windows)

    def _npz(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, **mats)

    atomic_write(out / "metrics.csv", lambda p: metrics.to_csv(p, index=False))
    atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False))
    atomic_write(out / "prompts.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(out / "similarity.npz", _npz)


def prompt_source(settings: Mapping[str, Any], prompts_path: str | os.PathLike[str]
                  ) -> str | os.PathLike[str] | TestWindows:
    """What :func:`analyze_checkpoints` takes as prompts under the ``geometry`` settings:
    the prompts file ``prompts_path``; or, when ``geometry.prompts`` is a mapping
    ``{test_windows, length, seed}``, its windows of ``prompts_path``, the test split's
    token file. Settings without ``prompts`` (the command line's) mean a file."""
    setting = settings.get("prompts")
    if not is_test_windows(setting):
        return prompts_path
    return read_test_windows(prompts_path, **{k: int(setting[k]) for k in TEST_WINDOW_KEYS})


def analyze_run(
    checkpoints: Mapping[str, str | os.PathLike[str]],
    prompts_path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
    threads: int = 0,
    train_tokens: str | os.PathLike[str] | None = None,
) -> None:
    """:func:`analyze_checkpoints` driven by the workflow's ``geometry`` settings and
    a saved tokenizer, as the pipeline calls it. ``prompts_path`` is the prompts file,
    or the test split's token file when ``geometry.prompts`` asks for test windows
    (:func:`prompt_source`)."""
    from tga.device import job_device
    from tga.tokenizers import load_tokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    device = job_device(str(settings["device"]))
    analyze_checkpoints(
        checkpoints,
        prompt_source(settings, prompts_path),
        load_tokenizer(tokenizer_path),
        out_dir,
        heatmap_layers=list(settings["heatmap_layers"]),
        exclude_first_token=settings["exclude_first_token"],
        knn_k=int(settings["knn_k"]),
        device=device,
        train_tokens=train_tokens,
        batch_size=resolve_batch_size(settings.get("batch_size"), device),
    )
