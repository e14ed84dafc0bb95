"""Where and in which precision to run: one place, shared by training, evaluation
and analysis."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


class DeviceError(ValueError):
    """A device that was asked for but is not there."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"device={name!r} is not a device: use auto, cpu, cuda[:N] or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={name!r} was asked for but CUDA is not available: use device: auto or cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"device={name!r} was asked for but MPS is not available: use device: auto or cpu")
    return device


def resolved_precision(device: torch.device, precision: str = "auto") -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere: on CPUs bf16 pays only for large
    matmuls on chips with native bf16 (1.5x for the default model on an AVX512-BF16
    CPU) and gains little or loses on small models, so it is opt-in there."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """bf16 autocast (fp32 master weights) where :func:`resolved_precision` says so."""
    if resolved_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class Runtime:
    """Device, precision and autocast of one job, decided once at its start, so the
    loop and everything it calls agree (``auto`` resolved, one autocast object)."""

    device: torch.device
    precision: str  # resolved: "fp32" or "bf16"
    amp: AbstractContextManager

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto", threads: int = 0) -> "Runtime":
        """Also the process-wide settings a job owns: the CPU thread count (0 keeps
        torch's) and TF32 matmuls on CUDA, where fp32 work otherwise runs far slower."""
        if threads > 0:
            torch.set_num_threads(threads)
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(resolved, resolved_precision(resolved, precision), autocast_context(resolved, precision))

    def rng_states(self) -> dict[str, torch.Tensor]:
        """The global CPU RNG (dropout on the CPU) and the device's (dropout there)."""
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        elif self.device.type == "mps":
            states["mps"] = torch.mps.get_rng_state()
        return states

    def set_rng_states(self, states: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(states["cpu"])
        if self.device.type == "cuda" and "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], self.device)
        elif self.device.type == "mps" and "mps" in states:
            torch.mps.set_rng_state(states["mps"])
