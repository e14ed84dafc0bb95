"""Training loop: AdamW, warmup + cosine, clipping, periodic validation and checkpoints.

The loop keeps every per-step quantity on the device and only synchronises with the
host at log/eval intervals, so on a GPU the step rate is bound by the arithmetic.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tga.data import load_token_file, read_token_metadata, sample_batch
from tga.device import autocast_context, resolve_device
from tga.evaluate import mean_loss_over_windows
from tga.model import ModelConfig, Transformer, save_checkpoint

LOG_COLUMNS = ("step", "lr", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "elapsed_s")


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, unusable data)."""


class TrainConfigError(ValueError):
    """A training setting that makes no sense."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 20
    checkpoint_interval: int = 200
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    threads: int = 0

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "eval_interval", "eval_batches", "checkpoint_interval")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainConfigError(f"training setting {name}={value!r} must be a positive integer")
        if not self.learning_rate > 0:
            raise TrainConfigError(f"training setting learning_rate={self.learning_rate!r} must be > 0")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise TrainConfigError(
                f"training setting warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps}]"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainConfigError(f"training setting min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainConfigError(f"training setting precision={self.precision!r} must be auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise TrainConfigError(f"training setting device={self.device!r} must be auto, cpu, cuda[:N] or mps")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = peak * config.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matmul weights: norms' gains, biases and embeddings are left alone."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(param)
            else:
                no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = optimizer_param_groups(model, config.weight_decay)
    kwargs: dict[str, Any] = {"lr": config.learning_rate, "betas": (config.beta1, config.beta2)}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def load_tokens_to_device(path: Path, device: torch.device) -> torch.Tensor:
    """The whole token file as int32 on the device, so batches are gathered there."""
    tokens = load_token_file(path)
    return torch.from_numpy(np.asarray(tokens, dtype=np.int32)).to(device)


def checkpoint_steps(config: TrainConfig) -> list[int]:
    """Steps (counted as completed optimizer steps) at which a checkpoint is kept."""
    return list(range(config.checkpoint_interval, config.max_steps + 1, config.checkpoint_interval))


def train_step(
    forward_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: Any,
    grad_clip: float,
) -> torch.Tensor:
    """One optimizer step; returns the loss without synchronising with the host.
    ``forward_model`` may be the compiled wrapper of ``model``."""
    if forward_model is not model:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph replays may reuse buffers
    with amp:
        loss = forward_model(x, y).loss
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_COLUMNS})
    os.replace(tmp, path)


def _format(value: float) -> str:
    return f"{value:.6g}"


def train_model(
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_tokens: Path,
    val_tokens: Path,
    out_dir: Path,
    run_name: str = "model",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train one variant with one seed; writes ``init.pt``, ``final.pt``,
    ``train_log.csv`` and ``checkpoints/step*.pt`` under ``out_dir``.

    ``model_config.vocab_size`` is replaced by the token file's, so a config never has
    to repeat what the tokenizer already decided.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_token_metadata(train_tokens)
    val_meta = read_token_metadata(val_tokens)
    if val_meta["vocab_size"] != meta["vocab_size"]:
        raise TrainingError(
            f"{val_tokens} was tokenized with vocab_size={val_meta['vocab_size']} but {train_tokens} with "
            f"{meta['vocab_size']}: tokenize both splits with the same tokenizer"
        )
    model_config = ModelConfig.from_dict({**asdict(model_config), "vocab_size": int(meta["vocab_size"])})
    if meta["n_tokens"] <= model_config.block_size:
        raise TrainingError(
            f"{train_tokens} holds {meta['n_tokens']} tokens, fewer than block_size+1="
            f"{model_config.block_size + 1}: give more training text or a smaller block_size"
        )

    if train_config.threads > 0:
        torch.set_num_threads(train_config.threads)
    device = resolve_device(train_config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(train_config.seed)
    model = Transformer(model_config)
    save_checkpoint(out_dir / "init.pt", model, {"step": 0, "seed": train_config.seed, "run": run_name})
    model.to(device)
    optimizer = make_optimizer(model, train_config, device)
    step_fn_model = torch.compile(model, mode=train_config.compile_mode) if train_config.compile else model

    train_data = load_tokens_to_device(train_tokens, device)
    val_data = load_tokens_to_device(val_tokens, device)
    n_val_windows = train_config.eval_batches * train_config.batch_size
    generator = torch.Generator(device=device).manual_seed(train_config.seed + 1)
    amp = autocast_context(device, train_config.precision)

    def validate() -> float:
        model.eval()
        loss = mean_loss_over_windows(
            model, val_data, model_config.block_size, train_config.batch_size, amp, max_windows=n_val_windows
        )
        model.train()
        return loss

    rows: list[dict[str, Any]] = []
    log_path = out_dir / "train_log.csv"
    keep = set(checkpoint_steps(train_config))
    tokens_per_step = train_config.batch_size * model_config.block_size
    loss_sum = torch.zeros((), device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    steps_since_log = 0
    start = last_time = time.perf_counter()
    last_logged_step = 0

    val_loss = validate()
    rows.append({"step": 0, "lr": _format(learning_rate_at(0, train_config)), "train_loss": None,
                 "val_loss": _format(val_loss), "val_ppl": _format(math.exp(val_loss)),
                 "tokens_per_s": None, "elapsed_s": _format(0.0)})

    model.train()
    progress = tqdm(total=train_config.max_steps, desc=run_name, disable=not show_progress, mininterval=1.0)
    for step in range(train_config.max_steps):
        lr = learning_rate_at(step, train_config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = sample_batch(train_data, train_config.batch_size, model_config.block_size, generator)
        loss_detached = train_step(step_fn_model, model, optimizer, x, y, amp, train_config.grad_clip)
        first_bad_step = torch.where(
            (first_bad_step < 0) & ~torch.isfinite(loss_detached), torch.full_like(first_bad_step, step + 1),
            first_bad_step,
        )
        loss_sum += loss_detached
        steps_since_log += 1
        done = step + 1
        progress.update(1)

        at_eval = done % train_config.eval_interval == 0 or done == train_config.max_steps
        if at_eval:
            bad = int(first_bad_step.item())
            if bad >= 0:
                _write_log(log_path, rows)
                progress.close()
                raise TrainingError(
                    f"training of {run_name} diverged: the loss became NaN/inf at step {bad} "
                    f"(seed {train_config.seed}); lower learning_rate or raise warmup_steps. "
                    f"The log up to step {last_logged_step} is in {log_path}"
                )
            now = time.perf_counter()
            train_loss = loss_sum.item() / steps_since_log
            val_loss = validate()
            rows.append({
                "step": done, "lr": _format(lr), "train_loss": _format(train_loss),
                "val_loss": _format(val_loss), "val_ppl": _format(math.exp(val_loss)),
                "tokens_per_s": _format(steps_since_log * tokens_per_step / max(now - last_time, 1e-9)),
                "elapsed_s": _format(now - start),
            })
            _write_log(log_path, rows)
            progress.set_postfix(train_loss=f"{train_loss:.3f}", val_ppl=f"{math.exp(val_loss):.1f}")
            loss_sum.zero_()
            steps_since_log = 0
            last_logged_step = done
            last_time = time.perf_counter()
        if done in keep:
            save_checkpoint(out_dir / "checkpoints" / f"step{done:06d}.pt", model,
                            {"step": done, "seed": train_config.seed, "run": run_name})
    progress.close()
    summary = {"step": train_config.max_steps, "seed": train_config.seed, "run": run_name,
               "final_val_loss": float(val_loss), "final_val_ppl": math.exp(val_loss)}
    save_checkpoint(out_dir / "final.pt", model, summary)
    return summary


def train_from_settings(
    settings: dict[str, dict[str, Any]],
    seed: int,
    threads: int,
    train_tokens: Path,
    val_tokens: Path,
    out_dir: Path,
    run_name: str = "model",
) -> dict[str, Any]:
    """Train from a resolved variant (``{"model": {...}, "training": {...}}``, as
    :func:`tga.settings.resolve_variant` makes it)."""
    model_config = ModelConfig.from_dict({"vocab_size": 1, **settings["model"]})
    train_config = TrainConfig.from_dict({**settings["training"], "seed": seed, "threads": threads})
    return train_model(model_config, train_config, Path(train_tokens), Path(val_tokens), Path(out_dir), run_name)
