"""Perplexity over non-overlapping windows, so that every token of a split (but the
very first, which has no context) is scored exactly once."""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tga.atomic import atomic_write_text
from tga.data import load_token_file, non_overlapping_windows, read_token_metadata, tokens_to_tensor
from tga.device import autocast_context, job_device
from tga.model import load_checkpoint
from tga.progress import progress
from tga.resources import check_evaluation_fits


def summed_loss_over_windows(
    model: nn.Module,
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    amp: AbstractContextManager | None = None,
    max_windows: int | None = None,
    progress_label: str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and number of scored tokens; with a
    ``progress_label``, the windows done are shown under it (:mod:`tga.progress`).
    ``shard=(rank, world_size)`` scores every world_size-th of the chosen windows, from
    the rank-th on: the processes of one distributed job split a validation pass.

    Windows are cut without overlap: window k feeds tokens [kT, kT+T) and scores
    [kT+1, kT+T], so each token is predicted once, with between 0 and T-1 tokens of
    context. That is the standard "non-overlapping" protocol (a strided evaluation
    would give lower numbers at a higher cost).
    """
    inputs, targets, mask = non_overlapping_windows(tokens, block_size)
    if max_windows is not None and max_windows < inputs.shape[0]:
        # Evenly spaced over the whole split: its first windows can be far easier or
        # harder than the rest (WikiText-2's test split starts 1.5x easier).
        keep = torch.linspace(0, inputs.shape[0] - 1, max_windows, device=inputs.device).round().long()
        inputs, targets, mask = inputs[keep], targets[keep], mask[keep]
    if shard[1] > 1:
        inputs, targets, mask = inputs[shard[0]::shard[1]], targets[shard[0]::shard[1]], mask[shard[0]::shard[1]]
    amp = amp or nullcontext()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    shown = progress(total=inputs.shape[0], desc=progress_label or "", unit="windows", enabled=bool(progress_label))
    with torch.inference_mode(), shown:
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size].to(device=device, dtype=torch.long)
            y = targets[start : start + batch_size].to(device=device, dtype=torch.long)
            m = mask[start : start + batch_size].to(device)
            y = torch.where(m, y, torch.full_like(y, -100))
            n = int(m.sum())
            with amp:
                loss = model(x, y).loss
            total += loss.double() * n
            count += n
            shown.update(x.shape[0])
    return float(total.item()), count


def mean_loss_over_windows(
    model: nn.Module,
    tokens: torch.Tensor,
    block_size: int,
    batch_size: int,
    amp: AbstractContextManager | None = None,
    max_windows: int | None = None,
) -> float:
    total, count = summed_loss_over_windows(model, tokens, block_size, batch_size, amp, max_windows)
    return total / count


def perplexity_metrics(total_nats: float, n_scored: int, n_bytes: int, n_words: int) -> dict[str, float]:
    """Token perplexity, bits per byte and word-level perplexity from one summed NLL.

    Bits per byte and word perplexity spread the same total over the split's UTF-8
    bytes and whitespace-separated words, which makes tokenizers comparable.
    """
    return {
        "loss_nats": total_nats / n_scored,
        "token_ppl": _exp_or_inf(total_nats / n_scored),
        "bits_per_byte": total_nats / math.log(2) / n_bytes,
        "word_ppl": _exp_or_inf(total_nats / n_words),
    }


def _exp_or_inf(value: float) -> float:
    """exp that reports an astronomically bad model as inf instead of crashing."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def evaluate_checkpoint(
    checkpoint: Path,
    token_file: Path,
    out_json: Path,
    labels: dict[str, Any] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    threads: int = 0,
) -> dict[str, Any]:
    """Score one checkpoint on one token file and write the metrics as JSON."""
    if threads > 0:
        torch.set_num_threads(threads)
    torch_device = job_device(device)
    model, _ = load_checkpoint(checkpoint, map_location=torch_device)
    model.eval()
    meta = read_token_metadata(token_file)
    if meta["vocab_size"] != model.config.vocab_size:
        raise ValueError(
            f"{token_file} was tokenized with vocab_size={meta['vocab_size']} but {checkpoint} expects "
            f"{model.config.vocab_size}: evaluate with the tokenizer the model was trained with"
        )
    check_evaluation_fits(model.config, batch_size, torch_device.type, int(meta["n_tokens"]))
    tokens = tokens_to_tensor(load_token_file(token_file))
    total, count = summed_loss_over_windows(
        model, tokens, model.config.block_size, batch_size, autocast_context(torch_device, "auto"),
        progress_label=f"perplexity of {checkpoint}",
    )
    result: dict[str, Any] = dict(labels or {})
    result.update({
        "tokenizer": meta["tokenizer"],
        "n_tokens_scored": count,
        "n_bytes": int(meta["n_bytes"]),
        "n_words": int(meta["n_words"]),
        "block_size": model.config.block_size,
    })
    result.update(perplexity_metrics(total, count, int(meta["n_bytes"]), int(meta["n_words"])))
    atomic_write_text(out_json, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
