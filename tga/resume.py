"""Resumable training state: one state object and one store that loads, saves and clears it.

At every checkpoint step the training loop saves its whole state (weights, optimizer,
RNGs, log rows, loss accumulators) to a folder kept outside the job's declared outputs,
because Snakemake deletes those when a job fails. A killed run that finds a state of
the same settings continues from it and ends bitwise equal to an uninterrupted run
(CPU). A state that is damaged, incomplete or from other settings is never trained on:
the store says why on stderr, clears it, and the run starts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tga.atomic import atomic_write, stale_temporaries
from tga.data import sha256_file
from tga.device import Runtime, compile_decision
from tga.model import ModelConfig
from tga.schema import TrainConfig

RESUME_FORMAT = "tga-resume-v1"
RESUME_STATE = "state.pt"
# Thread count is an execution resource that Snakemake lowers under a smaller --cores;
# keeping a run's progress is worth more than rounding-level equality with a run that
# used another count, so it does not invalidate a resume state.
_NOT_FINGERPRINTED = frozenset({"threads"})
# Sidecar keys that identify a token file's content ("source" is a path, which may move).
_TOKEN_IDENTITY = ("dtype", "n_tokens", "vocab_size", "tokenizer", "n_bytes", "n_words", "sha256")


def say(message: str) -> None:
    """Report on stderr, which the workflow's job log captures."""
    print(f"tga train: {message}", file=sys.stderr, flush=True)


def resume_dir_for(out_dir: Path, variant: str, seed: int) -> Path:
    """``<root>/.resume/<variant>/seed<seed>`` for a model directory
    ``<root>/models/<variant>/seed<seed>``: outside the training job's declared outputs,
    which Snakemake deletes when the job fails. Another layout gets a hidden sibling."""
    out_dir = Path(out_dir)
    tail = ("models", *Path(variant).parts, f"seed{seed}")
    if len(out_dir.parts) >= len(tail) and out_dir.parts[-len(tail):] == tail:
        return Path(*out_dir.parts[: -len(tail)]) / ".resume" / variant / f"seed{seed}"
    return out_dir.parent / f".{out_dir.name}.resume"


def run_settings(
    model_config: ModelConfig, train_config: TrainConfig, runtime: Runtime,
    train_meta: dict[str, Any], val_meta: dict[str, Any], world_size: int = 1,
) -> dict[str, Any]:
    """Everything that determines a run's trajectory, as plain JSON-able values.

    ``device``/``precision``/``compile`` are stored resolved, so ``auto`` and what it
    picks count as the same setting (RNG states are device-specific, so the type
    matters): a state saved with ``compile: false`` on a CPU resumes under ``auto``.
    A distributed job's ``world_size`` (one RNG state per rank) and a set
    ``micro_batch_size`` count too; left at 1 and null they are not recorded, so the
    states of single-process runs keep their fingerprints.
    """
    training = {k: v for k, v in asdict(train_config).items()
                if k not in _NOT_FINGERPRINTED and not (k == "micro_batch_size" and v is None)}
    if world_size > 1:
        training["world_size"] = world_size
    training["device"] = runtime.device.type
    training["precision"] = runtime.precision
    training["compile"] = compile_decision(train_config.compile, runtime.device.type)
    return {
        "format": RESUME_FORMAT,
        "model": asdict(model_config),
        "training": training,
        "train_tokens": {k: train_meta.get(k) for k in _TOKEN_IDENTITY},
        "val_tokens": {k: val_meta.get(k) for k in _TOKEN_IDENTITY},
    }


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class TrainState:
    """Where a run stands after ``step`` optimizer steps.

    The loop keeps one of these live: ``loss_sum`` and ``first_bad_step`` are then
    tensors on the device, so a step never waits for the host. A saved state also holds
    the weights, the optimizer, the RNGs and the batch generator (all on the CPU).
    """

    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[str, str] = field(default_factory=dict)  # kept checkpoint -> sha256 of the store's copy
    loss_sum: torch.Tensor | None = None
    first_bad_step: torch.Tensor | None = None  # first step whose loss was NaN/inf (1-based), -1 if none
    steps_since_log: int = 0
    last_logged_step: int = 0
    last_val_loss: float = math.nan
    elapsed_s: float = 0.0
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] | None = None
    generator: torch.Tensor | None = None

    def on(self, device: torch.device) -> "TrainState":
        """The live accumulators on ``device`` (zero for a fresh run)."""
        loss_sum = self.loss_sum if self.loss_sum is not None else torch.zeros(())
        bad = self.first_bad_step if self.first_bad_step is not None else -1
        self.loss_sum = loss_sum.to(device)
        self.first_bad_step = torch.as_tensor(bad, dtype=torch.long).to(device)
        return self


_COUNTERS = ("steps_since_log", "last_logged_step")
_FLOATS = ("last_val_loss", "elapsed_s")


class ResumeStore:
    """One run's resume folder: ``state.pt`` plus copies of the kept checkpoints (a
    workflow deletes the originals with a failed job's outputs)."""

    def __init__(self, folder: Path, settings: dict[str, Any], keep: set[int]) -> None:
        self.folder = Path(folder)
        self.settings = settings
        self.fingerprint = settings_fingerprint(settings)
        self.keep = keep
        self.path = self.folder / RESUME_STATE

    def save(self, state: TrainState, checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, runtime: Runtime, rng: dict[str, Any] | None = None) -> None:
        """The live ``state`` with the weights, optimizer and RNGs it goes with, after a
        copy of the checkpoint just written (recorded in ``state.checkpoints``). Fsynced
        and renamed: a kill at any moment leaves the previous state usable. ``rng``:
        the RNG states to keep (default: this process's; a distributed job passes
        every rank's)."""
        copy = self.folder / "checkpoints" / checkpoint.name
        atomic_write(copy, lambda tmp: shutil.copyfile(checkpoint, tmp))
        state.checkpoints[checkpoint.name] = sha256_file(copy)
        raw = getattr(model, "_orig_mod", model)
        payload = {f.name: getattr(state, f.name) for f in fields(state)}
        payload.update(format=RESUME_FORMAT, fingerprint=self.fingerprint,
                       settings=json.dumps(self.settings, sort_keys=True),
                       rows=[dict(row) for row in state.rows], checkpoints=dict(state.checkpoints),
                       loss_sum=state.loss_sum.detach().cpu(), first_bad_step=int(state.first_bad_step.item()),
                       last_val_loss=float(state.last_val_loss), elapsed_s=float(state.elapsed_s),
                       model={k: v.detach().cpu() for k, v in raw.state_dict().items()},
                       optimizer=optimizer.state_dict(), rng=runtime.rng_states() if rng is None else rng,
                       generator=generator.get_state())

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())

        atomic_write(self.path, write)

    def load(self) -> TrainState | None:
        """The usable state, or None after saying why not (and clearing the folder, so
        stale files never mix with a fresh run's)."""
        if not self.path.is_file():
            self.clear()  # leftovers of a run killed before its first state
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for truncated/corrupt files
            problem = f"it is corrupt or truncated ({type(exc).__name__}: {str(exc)[:200]})"
        else:
            problem = self._problem(payload)
        if problem is None:
            return _state_of(payload)
        self.discard(problem)
        return None

    def read(self) -> TrainState:
        """The state as saved, unchecked and never cleared: for the other ranks of a
        distributed job, after rank 0's :meth:`load` found it usable."""
        return _state_of(torch.load(self.path, map_location="cpu", weights_only=True))

    def discard(self, problem: str) -> None:
        say(f"not resuming from {self.path}: {problem}; starting fresh from step 0")
        self.clear()

    def restore_checkpoints(self, state: TrainState, folder: Path) -> None:
        """Put the kept checkpoints back where the workflow expects them."""
        for name in sorted(state.checkpoints):
            source = self.folder / "checkpoints" / name
            atomic_write(folder / name, lambda tmp: shutil.copyfile(source, tmp))

    def clear(self) -> None:
        """Remove only the files this store writes (never a whole tree: the folder
        comes from the caller), then the folders if they are left empty."""
        ckpt_dir = self.folder / "checkpoints"
        doomed = [self.path, *stale_temporaries(self.path)]
        if ckpt_dir.is_dir():
            for kept in ckpt_dir.glob("step*.pt"):
                doomed += [kept, *stale_temporaries(kept)]
            doomed += ckpt_dir.glob(".step*.pt.*.tmp")
        for path in doomed:
            path.unlink(missing_ok=True)
        for folder in (ckpt_dir, self.folder):
            try:
                folder.rmdir()
            except OSError:
                pass

    def _problem(self, state: Any) -> str | None:
        """Why ``state`` must not be used, or None. Cheap structural checks first, so
        that a state that loads but is incomplete is never trained on."""
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            return f"it is not a {RESUME_FORMAT} state"
        if state.get("fingerprint") != self.fingerprint:
            try:
                old = json.loads(state.get("settings", ""))
            except (TypeError, ValueError):
                old = None
            return f"it was written with other settings ({_settings_diff(old, self.settings)})"
        step = state.get("step")
        if not _is_int(step) or step not in self.keep:
            return f"its step {step!r} is not a checkpoint step of these settings"
        rng = state.get("rng")
        if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
            return "its RNG state is missing"
        world_size = self.settings["training"].get("world_size", 1)
        if world_size > 1 and (not isinstance(rng.get("ranks"), list) or len(rng["ranks"]) != world_size):
            return f"it lacks the RNG states of its {world_size} ranks"
        bad = [k for k in ("loss_sum", "generator") if not isinstance(state.get(k), torch.Tensor)]
        bad += [k for k in (*_COUNTERS, "first_bad_step") if not _is_int(state.get(k))]
        bad += [k for k in _FLOATS if not isinstance(state.get(k), float)]
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
        if not isinstance(hashes, dict) or set(hashes) != {f"step{s:06d}.pt" for s in self.keep if s <= step}:
            return "its list of kept checkpoints does not match its step"
        for name, digest in sorted(hashes.items()):
            path = self.folder / "checkpoints" / name
            if not path.is_file() or sha256_file(path) != digest:
                return f"its copy of checkpoint {name} is missing or altered"
        return None


def _state_of(payload: dict[str, Any]) -> TrainState:
    return TrainState(**{f.name: payload[f.name] for f in fields(TrainState)})


def restore_optimizer(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Load and check that every moment buffer has its parameter's shape, which
    ``load_state_dict`` itself does not (a wrong one would only fail mid-step)."""
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"optimizer {key} has shape {tuple(value.shape)}, parameter {tuple(param.shape)}")


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
