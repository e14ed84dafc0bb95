"""Training loop: AdamW, warmup + cosine, clipping, periodic validation and checkpoints.

The loop keeps every per-step quantity on the device and only synchronises with the
host at log/eval intervals, so on a GPU the step rate is bound by the arithmetic.

Resumable: at every checkpoint step the full training state (weights, optimizer,
RNGs, log, loss accumulators) goes atomically to a ``resume_dir`` kept outside the
job's declared outputs, because Snakemake deletes those when a job fails. A killed
run continues from there and ends bitwise equal to an uninterrupted one (CPU).
A diverged run leaves its log and a ``failure.json`` in a ``failure_dir``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tga.data import (
    RareTokenRelabeler,
    load_token_file,
    read_token_metadata,
    sample_batch,
    sha256_file,
    tokens_to_tensor,
)
from tga.device import autocast_context, resolve_device, resolved_precision
from tga.evaluate import mean_loss_over_windows
from tga.model import ModelConfig, Transformer, save_checkpoint
from tga.resources import check_training_fits
# The config is torch-free so that the workflow reads settings without torch.
from tga.schema import TrainConfig, TrainConfigError, checkpoint_steps

LOG_COLUMNS = ("step", "lr", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "elapsed_s")


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, unusable data)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN/inf; carries where, so callers can record the failure."""

    def __init__(self, message: str, run_name: str, seed: int, step: int, last_logged_step: int) -> None:
        super().__init__(message)
        self.run_name = run_name
        self.seed = seed
        self.step = step
        self.last_logged_step = last_logged_step


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = peak * config.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def optimizer_param_groups(model: nn.Module, weight_decay: float, token_eps: float) -> list[dict[str, Any]]:
    """Decay only matmul weights: norms' gains, biases and embeddings are left alone.

    The token embedding and logit bias get their own Adam ``eps``. Tokens the training
    split rarely or never holds receive only tiny "push this logit down" gradients,
    which Adam rescales to full-size steps until they fall below ``eps``; with 1e-8
    that crushes the probabilities of test-only tokens, with 1e-6 it stops near the
    mass such tokens really have.
    """
    embedding = getattr(model, "token_embedding", None)
    candidates = (getattr(embedding, "weight", None), getattr(model, "logit_bias", None))
    token_params = {id(p) for p in candidates if isinstance(p, nn.Parameter)}
    decay, no_decay, tokens = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if id(param) in token_params:
                tokens.append(param)
            elif isinstance(module, nn.Linear) and name == "weight":
                decay.append(param)
            else:
                no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": tokens, "weight_decay": 0.0, "eps": token_eps},
    ]


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = optimizer_param_groups(model, config.weight_decay, config.token_adam_eps)
    kwargs: dict[str, Any] = {"lr": config.learning_rate, "betas": (config.beta1, config.beta2)}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def load_tokens_to_device(path: Path, device: torch.device) -> torch.Tensor:
    """The whole token file as int32 on the device, so batches are gathered there."""
    return tokens_to_tensor(load_token_file(path), device)


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


# --------------------------------------------------------------------------- resume

RESUME_FORMAT = "tga-resume-v1"
RESUME_STATE = "state.pt"
FAILURE_RECORD = "failure.json"
# Thread count is an execution resource that Snakemake lowers under a smaller --cores;
# keeping a run's progress is worth more than rounding-level equality with a run that
# used another count, so it does not invalidate a resume state.
_NOT_FINGERPRINTED = frozenset({"threads"})
# Sidecar keys that identify a token file's content ("source" is a path, which may move).
_TOKEN_IDENTITY = ("dtype", "n_tokens", "vocab_size", "tokenizer", "n_bytes", "n_words", "sha256")


def _say(message: str) -> None:
    """Report on stderr, which the workflow's job log captures."""
    print(f"tga train: {message}", file=sys.stderr, flush=True)


def run_side_dirs(out_dir: Path, variant: str, seed: int) -> tuple[Path, Path]:
    """``(resume_dir, failure_dir)`` for a model directory ``<root>/models/<variant>/seed<seed>``:
    ``<root>/.resume/<variant>/seed<seed>`` and ``<root>/failed/<variant>/seed<seed>``.

    Both lie outside the training job's declared outputs, which Snakemake deletes when
    the job fails. An ``out_dir`` of another shape gets hidden siblings instead, which
    are still never declared outputs.
    """
    out_dir = Path(out_dir)
    tail = ("models", *Path(variant).parts, f"seed{seed}")
    if len(out_dir.parts) >= len(tail) and out_dir.parts[-len(tail):] == tail:
        root = Path(*out_dir.parts[: -len(tail)])
        rel = Path(variant) / f"seed{seed}"
        return root / ".resume" / rel, root / "failed" / rel
    return out_dir.parent / f".{out_dir.name}.resume", out_dir.parent / f".{out_dir.name}.failed"


def run_settings(
    model_config: ModelConfig,
    train_config: TrainConfig,
    device: torch.device,
    train_meta: dict[str, Any],
    val_meta: dict[str, Any],
) -> dict[str, Any]:
    """Everything that determines a run's trajectory, as plain JSON-able values.

    ``device``/``precision`` are stored resolved, so ``auto`` and the device it picks
    count as the same setting (RNG states are device-specific, so the type matters).
    """
    training = {k: v for k, v in asdict(train_config).items() if k not in _NOT_FINGERPRINTED}
    training["device"] = device.type
    training["precision"] = resolved_precision(device, train_config.precision)
    return {
        "format": RESUME_FORMAT,
        "model": asdict(model_config),
        "training": training,
        "train_tokens": {k: train_meta.get(k) for k in _TOKEN_IDENTITY},
        "val_tokens": {k: val_meta.get(k) for k in _TOKEN_IDENTITY},
    }


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def _settings_diff(old: Any, new: dict[str, Any]) -> str:
    """``section.key: old -> new`` for what changed, so the log says why a state was dropped."""
    if not isinstance(old, dict):
        return "no readable settings"
    changes = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
        elif a != b:
            changes.append(f"{section}: {a!r} -> {b!r}")
    return ", ".join(changes) or "identical settings but another fingerprint"


def _temp_name(path: Path) -> Path:
    """A per-process sibling; unlike ``mkstemp`` the file it becomes gets the umask's
    permissions, so records meant for people are not left owner-only."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_resume_state(resume_dir: Path, payload: dict[str, Any]) -> None:
    """Temp file + fsync + rename: a kill at any moment leaves the previous state intact."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    path = resume_dir / RESUME_STATE
    fd, tmp = tempfile.mkstemp(dir=resume_dir, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clear_resume_dir(resume_dir: Path) -> None:
    """Remove only the files this module writes there (never a whole tree: the path
    comes from the caller), then the folders if they are left empty."""
    resume_dir = Path(resume_dir)
    if not resume_dir.is_dir():
        return
    ckpt_dir = resume_dir / "checkpoints"
    doomed = [resume_dir / RESUME_STATE, *resume_dir.glob(f".{RESUME_STATE}.*.tmp")]
    if ckpt_dir.is_dir():
        doomed += [*ckpt_dir.glob("step*.pt"), *ckpt_dir.glob(".step*.pt.*.tmp")]
    for path in doomed:
        path.unlink(missing_ok=True)
    for folder in (ckpt_dir, resume_dir):
        try:
            folder.rmdir()
        except OSError:
            pass


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resume_state_problem(
    state: Any, fingerprint: str, settings: dict[str, Any], keep: set[int], resume_dir: Path
) -> str | None:
    """Why ``state`` must not be used, or None. Cheap structural checks first, so that
    a state that loads but is incomplete is never trained on."""
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        return f"it is not a {RESUME_FORMAT} state"
    if state.get("fingerprint") != fingerprint:
        try:
            old = json.loads(state.get("settings", ""))
        except (TypeError, ValueError):
            old = None
        return f"it was written with other settings ({_settings_diff(old, settings)})"
    step = state.get("step")
    if not _is_int(step) or step not in keep:
        return f"its step {step!r} is not a checkpoint step of these settings"
    tensors = {"loss_sum": state.get("loss_sum"), "generator": state.get("generator")}
    rng = state.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        return "its RNG state is missing"
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    bad += [k for k in ("steps_since_log", "first_bad_step", "last_logged_step") if not _is_int(state.get(k))]
    bad += [k for k in ("last_val_loss", "elapsed_s") if not isinstance(state.get(k), float)]
    model = state.get("model")
    if not isinstance(model, dict) or not model or not all(isinstance(v, torch.Tensor) for v in model.values()):
        bad.append("model")
    optim = state.get("optimizer")
    if not isinstance(optim, dict) or not {"state", "param_groups"} <= set(optim):
        bad.append("optimizer")
    rows = state.get("rows")
    if (not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows)
            or rows[0].get("step") != 0 or not _is_int(rows[-1].get("step")) or rows[-1]["step"] > step):
        bad.append("rows")
    if bad:
        return f"its entries {bad} are missing or malformed"
    hashes = state.get("checkpoints")
    expected = {f"step{s:06d}.pt" for s in keep if s <= step}
    if not isinstance(hashes, dict) or set(hashes) != expected:
        return "its list of kept checkpoints does not match its step"
    for name, digest in sorted(hashes.items()):
        path = resume_dir / "checkpoints" / name
        if not path.is_file() or sha256_file(path) != digest:
            return f"its copy of checkpoint {name} is missing or altered"
    return None


def _load_resume_state(
    resume_dir: Path, fingerprint: str, settings: dict[str, Any], keep: set[int]
) -> dict[str, Any] | None:
    """The usable state in ``resume_dir``, or None after saying why it is not used
    (and clearing it, so stale files never mix with the fresh run's)."""
    path = resume_dir / RESUME_STATE
    if not path.is_file():
        clear_resume_dir(resume_dir)  # leftovers of a run killed before its first state
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        problem = f"it is corrupt or truncated ({type(exc).__name__}: {str(exc)[:200]})"
    else:
        problem = _resume_state_problem(state, fingerprint, settings, keep, resume_dir)
    if problem is None:
        return state
    _say(f"not resuming from {path}: {problem}; starting fresh from step 0")
    clear_resume_dir(resume_dir)
    return None


def _restore_optimizer(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Load and check that every moment buffer has its parameter's shape, which
    ``load_state_dict`` itself does not (a wrong one would only fail mid-step)."""
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"optimizer {key} has shape {tuple(value.shape)}, parameter {tuple(param.shape)}")


def _device_rng_state(device: torch.device) -> torch.Tensor | None:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The global CPU RNG (dropout on CPU) and the device's (dropout on the GPU)."""
    states = {"cpu": torch.get_rng_state()}
    device_state = _device_rng_state(device)
    if device_state is not None:
        states[device.type] = device_state
    return states


def _set_device_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


# --------------------------------------------------------------------------- failure records

def _variant_of(run_name: str, seed: int) -> str:
    """The workflow names runs ``<variant>/seed<seed>``; anything else is its own variant."""
    suffix = f"/seed{seed}"
    return run_name[: -len(suffix)] if run_name.endswith(suffix) else run_name


def _clear_failure_record(failure_dir: Path) -> None:
    """A new attempt makes an older failure record stale."""
    for name in (FAILURE_RECORD, "train_log.csv"):
        (failure_dir / name).unlink(missing_ok=True)
        for stale in failure_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    try:
        failure_dir.rmdir()
    except OSError:
        pass


def _write_failure_record(failure_dir: Path, log_path: Path, record: dict[str, Any]) -> None:
    """The log first, then ``failure.json``: the record's presence implies the log's."""
    failure_dir.mkdir(parents=True, exist_ok=True)
    if log_path.is_file():
        _atomic_copy(log_path, failure_dir / "train_log.csv")
    _atomic_write_text(failure_dir / FAILURE_RECORD, json.dumps(record, indent=1) + "\n")


def read_failure_record(failure_dir: Path) -> dict[str, Any] | None:
    """The ``failure.json`` of a diverged run, or None if there is none (or it is unreadable)."""
    try:
        record = json.loads((Path(failure_dir) / FAILURE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def failure_matches_settings(record: dict[str, Any], settings: dict[str, dict[str, Any]], seed: int) -> bool:
    """Whether a failure record was made with these resolved variant settings
    (``{"model": ..., "training": ...}``) and seed; a record from settings since
    changed is stale and the variant deserves another try. Token data is not compared."""
    recorded = record.get("settings")
    if not isinstance(recorded, dict) or record.get("seed") != seed:
        return False
    model = asdict(ModelConfig.from_dict({"vocab_size": 1, **settings["model"]}))
    train = asdict(TrainConfig.from_dict({**settings["training"], "seed": seed}))
    old_model, old_train = recorded.get("model") or {}, recorded.get("training") or {}
    same_model = all(old_model.get(k) == v for k, v in model.items() if k != "vocab_size")
    same_train = all(old_train.get(k) == v for k, v in train.items()
                     if k not in _NOT_FINGERPRINTED and k not in ("device", "precision"))
    return same_model and same_train


# --------------------------------------------------------------------------- training

def train_model(
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_tokens: Path,
    val_tokens: Path,
    out_dir: Path,
    run_name: str = "model",
    show_progress: bool = True,
    resume_dir: Path | None = None,
    failure_dir: Path | None = None,
) -> dict[str, Any]:
    """Train one variant with one seed; writes ``init.pt``, ``final.pt``,
    ``train_log.csv`` and ``checkpoints/step*.pt`` under ``out_dir``.

    ``model_config.vocab_size`` is replaced by the token file's, so a config never has
    to repeat what the tokenizer already decided.

    With ``resume_dir``, every checkpoint step also saves the whole training state
    there, and a run that finds a state of the same settings continues from it,
    rewriting ``init.pt``, the kept checkpoints and the log so that its outputs equal
    an uninterrupted run's; the state is removed once ``final.pt`` is written. Keep
    ``resume_dir`` outside anything a workflow deletes on failure.

    With ``failure_dir``, a divergence also leaves ``train_log.csv`` and
    ``failure.json`` (variant, seed, step, message, settings) there.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_dir = Path(resume_dir) if resume_dir is not None else None
    failure_dir = Path(failure_dir) if failure_dir is not None else None
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
    check_training_fits(model_config, train_config, device.type, int(meta["n_tokens"]) + int(val_meta["n_tokens"]), _say)
    settings = run_settings(model_config, train_config, device, meta, val_meta)
    fingerprint = settings_fingerprint(settings)
    if failure_dir is not None:
        _clear_failure_record(failure_dir)
    for stale in (*out_dir.glob(".init.pt.*.tmp"), *out_dir.glob(".final.pt.*.tmp")):
        stale.unlink(missing_ok=True)  # temp files of a killed run; never declared outputs

    keep = set(checkpoint_steps(train_config))
    train_data = load_tokens_to_device(train_tokens, device)
    val_data = load_tokens_to_device(val_tokens, device)
    token_counts = torch.bincount(train_data.long(), minlength=model_config.vocab_size)
    relabel = RareTokenRelabeler(token_counts, model_config.vocab_size, train_config.rare_relabel_max_count,
                                 train_config.rare_relabel_probability)

    def fresh() -> tuple[Transformer, torch.optim.AdamW, torch.Generator]:
        """Seeded init: the global RNG is left exactly where an uninterrupted run's is."""
        torch.manual_seed(train_config.seed)
        built = Transformer(model_config)
        built.to(device)
        built.init_logit_bias(token_counts)
        return (built, make_optimizer(built, train_config, device),
                torch.Generator(device=device).manual_seed(train_config.seed + 1))

    model, optimizer, generator = fresh()
    save_checkpoint(out_dir / "init.pt", model, {"step": 0, "seed": train_config.seed, "run": run_name})

    state = _load_resume_state(resume_dir, fingerprint, settings, keep) if resume_dir is not None else None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            _restore_optimizer(optimizer, state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["rng"]["cpu"])  # last: everything above may still fail
            _set_device_rng_state(device, state["rng"].get(device.type))
        except Exception as exc:
            _say(f"not resuming from {resume_dir / RESUME_STATE}: it cannot be restored "
                 f"({type(exc).__name__}: {str(exc)[:200]}); starting fresh from step 0")
            clear_resume_dir(resume_dir)
            state = None
            model, optimizer, generator = fresh()

    step_fn_model = torch.compile(model, mode=train_config.compile_mode) if train_config.compile else model
    n_val_windows = train_config.eval_batches * train_config.batch_size
    amp = autocast_context(device, train_config.precision)

    def validate() -> float:
        """Eval mode and no sampling: validation draws nothing from any RNG, so it cannot
        make a resumed run's random stream differ from an uninterrupted one's."""
        model.eval()
        loss = mean_loss_over_windows(
            model, val_data, model_config.block_size, train_config.batch_size, amp, max_windows=n_val_windows
        )
        model.train()
        return loss

    log_path = out_dir / "train_log.csv"
    (out_dir / "checkpoints").mkdir(exist_ok=True)  # a declared output even when nothing is kept
    tokens_per_step = train_config.batch_size * model_config.block_size
    if state is None:
        rows: list[dict[str, Any]] = []
        kept_hashes: dict[str, str] = {}
        start_step = 0
        loss_sum = torch.zeros((), device=device)
        first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        steps_since_log = 0
        last_logged_step = 0
        elapsed_before = 0.0
        val_loss = validate()
        rows.append({"step": 0, "lr": _format(learning_rate_at(0, train_config)), "train_loss": None,
                     "val_loss": _format(val_loss), "val_ppl": _format(math.exp(val_loss)),
                     "tokens_per_s": None, "elapsed_s": _format(0.0)})
    else:
        rows = [dict(row) for row in state["rows"]]
        kept_hashes = dict(state["checkpoints"])
        start_step = state["step"]
        loss_sum = state["loss_sum"].to(device)
        first_bad_step = torch.full((), state["first_bad_step"], dtype=torch.long, device=device)
        steps_since_log = state["steps_since_log"]
        last_logged_step = state["last_logged_step"]
        elapsed_before = state["elapsed_s"]
        val_loss = state["last_val_loss"]
        for name in sorted(kept_hashes):
            _atomic_copy(resume_dir / "checkpoints" / name, out_dir / "checkpoints" / name)
        _write_log(log_path, rows)
        _say(f"resuming {run_name} from step {start_step} of {train_config.max_steps} "
             f"(state in {resume_dir / RESUME_STATE})")
    start = time.perf_counter() - elapsed_before
    last_time = time.perf_counter()
    timed_steps = 0  # steps run by this process since its last log row, for tokens/s

    def diverged(bad: int) -> TrainingDiverged:
        _write_log(log_path, rows)
        progress.close()
        # A workflow deletes a failed job's outputs, so name the copy that survives.
        kept_log = failure_dir / "train_log.csv" if failure_dir is not None else log_path
        message = (f"training of {run_name} diverged: the loss became NaN/inf at step {bad} "
                   f"(seed {train_config.seed}); lower learning_rate or raise warmup_steps. "
                   f"The log up to step {last_logged_step} is in {kept_log}")
        if failure_dir is not None:
            _write_failure_record(failure_dir, log_path, {
                "variant": _variant_of(run_name, train_config.seed), "seed": train_config.seed,
                "run": run_name, "reason": "diverged", "step": bad, "last_logged_step": last_logged_step,
                "message": message, "fingerprint": fingerprint, "settings": settings,
            })
        return TrainingDiverged(message, run_name, train_config.seed, bad, last_logged_step)

    model.train()
    progress = tqdm(total=train_config.max_steps, initial=start_step, desc=run_name, disable=not show_progress,
                    mininterval=1.0)
    for step in range(start_step, train_config.max_steps):
        lr = learning_rate_at(step, train_config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = sample_batch(train_data, train_config.batch_size, model_config.block_size, generator)
        x, y = relabel(x, y, generator)
        loss_detached = train_step(step_fn_model, model, optimizer, x, y, amp, train_config.grad_clip)
        first_bad_step = torch.where(
            (first_bad_step < 0) & ~torch.isfinite(loss_detached), torch.full_like(first_bad_step, step + 1),
            first_bad_step,
        )
        loss_sum += loss_detached
        steps_since_log += 1
        timed_steps += 1
        done = step + 1
        progress.update(1)

        at_eval = done % train_config.eval_interval == 0 or done == train_config.max_steps
        if at_eval or done in keep:  # both sync with the host anyway; never keep a diverged model
            bad = int(first_bad_step.item())
            if bad >= 0:
                raise diverged(bad)
        if at_eval:
            now = time.perf_counter()
            train_loss = loss_sum.item() / steps_since_log
            val_loss = validate()
            rows.append({
                "step": done, "lr": _format(lr), "train_loss": _format(train_loss),
                "val_loss": _format(val_loss), "val_ppl": _format(math.exp(val_loss)),
                "tokens_per_s": _format(timed_steps * tokens_per_step / max(now - last_time, 1e-9)),
                "elapsed_s": _format(now - start),
            })
            _write_log(log_path, rows)
            progress.set_postfix(train_loss=f"{train_loss:.3f}", val_ppl=f"{math.exp(val_loss):.1f}")
            loss_sum.zero_()
            steps_since_log = 0
            timed_steps = 0
            last_logged_step = done
            last_time = time.perf_counter()
        if done in keep:
            name = f"step{done:06d}.pt"
            save_checkpoint(out_dir / "checkpoints" / name, model,
                            {"step": done, "seed": train_config.seed, "run": run_name})
            if resume_dir is not None:
                _atomic_copy(out_dir / "checkpoints" / name, resume_dir / "checkpoints" / name)
                kept_hashes[name] = sha256_file(resume_dir / "checkpoints" / name)
                raw = getattr(model, "_orig_mod", model)
                _save_resume_state(resume_dir, {
                    "format": RESUME_FORMAT, "fingerprint": fingerprint,
                    "settings": json.dumps(settings, sort_keys=True), "step": done,
                    "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_states(device),
                    "generator": generator.get_state(),
                    "rows": [dict(row) for row in rows], "checkpoints": dict(kept_hashes),
                    "loss_sum": loss_sum.detach().cpu(), "steps_since_log": steps_since_log,
                    "first_bad_step": int(first_bad_step.item()), "last_logged_step": last_logged_step,
                    "last_val_loss": float(val_loss), "elapsed_s": time.perf_counter() - start,
                })
    progress.close()
    summary = {"step": train_config.max_steps, "seed": train_config.seed, "run": run_name,
               "final_val_loss": float(val_loss), "final_val_ppl": math.exp(val_loss)}
    save_checkpoint(out_dir / "final.pt", model, summary)
    if resume_dir is not None:
        clear_resume_dir(resume_dir)
    return summary


def train_from_settings(
    settings: dict[str, dict[str, Any]],
    seed: int,
    threads: int,
    train_tokens: Path,
    val_tokens: Path,
    out_dir: Path,
    run_name: str = "model",
    resume_dir: Path | None = None,
    failure_dir: Path | None = None,
) -> dict[str, Any]:
    """Train from a resolved variant (``{"model": {...}, "training": {...}}``, as
    :func:`tga.settings.resolve_variant` makes it); see :func:`train_model` for
    ``resume_dir`` and ``failure_dir``."""
    model_config = ModelConfig.from_dict({"vocab_size": 1, **settings["model"]})
    train_config = TrainConfig.from_dict({**settings["training"], "seed": seed, "threads": threads})
    return train_model(model_config, train_config, Path(train_tokens), Path(val_tokens), Path(out_dir), run_name,
                       resume_dir=resume_dir, failure_dir=failure_dir)
