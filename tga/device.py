"""Where and in which precision to run: one place, shared by training, evaluation
and analysis."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

# Bytes per logit the full head holds at its peak (the logits, their fp32 upcast for the
# softmax and the logits' gradient): declared where the memory estimates count it.
from tga.resources import FULL_HEAD_BYTES_PER_LOGIT


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


def job_device(name: str) -> torch.device:
    """The device a job runs on: :func:`resolve_device`, except that a job whose
    setting is ``auto`` or ``cuda`` and which sees several GPUs claims one of them for
    as long as it runs (tga.gpu_slots: a lock-file slot, ``resources.jobs_per_gpu`` per
    device), so that jobs started side by side on a multi-GPU node each get their own
    device instead of all running on ``cuda:0``. An explicit ``cuda:N`` is used as
    given. A rank of a multi-process job (``WORLD_SIZE`` > 1, as torchrun sets it)
    takes ``cuda:LOCAL_RANK`` of the devices its launcher gave it, and a job whose
    launcher claimed its devices (``TGA_GPUS_ASSIGNED``) claims nothing."""
    device = resolve_device(name)
    if device.type != "cuda" or name not in ("auto", "cuda"):
        return device
    from tga import gpu_slots

    visible = gpu_slots.visible_devices()
    if len(visible) <= 1:
        return device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    elif os.environ.get(gpu_slots.ASSIGNED_ENV) == "1":
        return device
    else:
        index = gpu_slots.claim_process_gpu(visible)
    torch.cuda.set_device(index)  # so code that says plain "cuda" lands there too
    return torch.device("cuda", index)


class PrecisionChoice(NamedTuple):
    precision: str  # "fp32" or "bf16"
    note: str | None  # one line for the job's log when ``auto`` had to fall back, else None


def choose_precision(device_type: str, bf16_supported: bool, requested: str = "auto") -> PrecisionChoice:
    """The precision a job runs in, from the device type, whether that device does bf16
    natively, and the ``precision`` setting. A pure function, so the fallback is tested
    without the hardware it is for.

    ``auto`` is bf16 on CUDA devices with native bf16 (Ampere and later) and fp32
    everywhere else. On CPUs bf16 pays only for large matmuls on chips with native bf16
    (1.5-1.6x for the default model on an AVX512-BF16 CPU) and gains little or loses on
    small models, so it is opt-in there. A GPU without bf16 (V100, T4) falls back to
    fp32, not fp16: fp16 training needs a GradScaler against underflowing gradients,
    which this loop does not have. An explicit ``bf16`` on such a GPU is refused rather
    than emulated at a fraction of fp32's speed.
    """
    if requested == "auto":
        if device_type != "cuda":
            return PrecisionChoice("fp32", None)
        if bf16_supported:
            return PrecisionChoice("bf16", None)
        return PrecisionChoice("fp32", "precision auto is fp32 here: this GPU has no native bf16 (fp16 would need "
                                       "a gradient scaler, which tga's training does not use)")
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise DeviceError("precision='bf16' was asked for, but this GPU has no native bf16 (it needs compute "
                          "capability 8.0, Ampere, or later): set precision: auto or fp32")
    return PrecisionChoice(requested, None)


def device_supports_bf16(device: torch.device) -> bool:
    """Native bf16 on a CUDA device (emulation does not count: torch's default
    ``including_emulation=True`` says yes on a V100). CPUs and MPS run bf16 autocast
    everywhere torch supports them; whether it pays there is the user's call."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def resolved_precision(device: torch.device, precision: str = "auto") -> str:
    """``precision`` resolved for ``device`` (see :func:`choose_precision`)."""
    return choose_precision(device.type, device_supports_bf16(device), precision).precision


def autocast_context(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """bf16 autocast (fp32 master weights) where :func:`resolved_precision` says so."""
    if resolved_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def compile_decision(setting: bool | str, device_type: str) -> bool:
    """Whether training compiles its step. ``auto`` compiles on CUDA only: there the
    compiled step is several times faster and its minute of compilation is paid back
    within the first few hundred steps; on a CPU, compiling (Inductor builds C++) costs
    minutes that 1000 small steps never win back, and MPS support is incomplete.
    ``true``/``false`` force it either way."""
    if setting == "auto":
        return device_type == "cuda"
    return bool(setting)


# The settings below are execution choices: they change how fast a step runs, not what
# it computes (to the tolerances tests/test_fast_path.py states), so ``auto`` may pick
# per device. Each is a pure function of strings, tested without the hardware.

# Batches of at most this many tokens run through CUDA graphs under ``compile_mode:
# auto``: there a step is a few hundred small kernels whose launches, not their
# arithmetic, set the pace (9.56 ms for batch 8 x 256 on an H200, against 13.0 ms
# for eight times the tokens). Larger batches keep Inductor's default mode: their
# kernels are long enough to hide the launches, and a graph's private memory pool
# would hold activations of gigabytes twice (training and validation graphs).
CUDA_GRAPH_MAX_TOKENS = 16_384


def compile_mode_choice(setting: str, device_type: str, batch_tokens: int) -> str:
    """The ``torch.compile`` mode of a compiled step. ``auto`` is ``reduce-overhead``
    (CUDA graphs) on CUDA for batches of at most :data:`CUDA_GRAPH_MAX_TOKENS` tokens and
    ``default`` everywhere else (CUDA graphs exist only on CUDA). ``max-autotune``
    stays opt-in: its minutes of kernel search do not pay back in a 1000-step job.
    Any other value is used as given."""
    if setting != "auto":
        return setting
    if device_type == "cuda" and batch_tokens <= CUDA_GRAPH_MAX_TOKENS:
        return "reduce-overhead"
    return "default"




def loss_head_choice(setting: str, device_type: str, n_logits: int, device_memory: int) -> str:
    """How training computes its output head and loss: ``chunked`` (tga.lm_head, never
    holding the (tokens x vocab) logits) or ``full`` (the logits, then
    ``F.cross_entropy``, which Inductor fuses into few kernels and which a CUDA graph
    captures whole). ``auto`` is ``full`` on CUDA when a step's ``n_logits`` (batch
    tokens x padded vocabulary) take at most a quarter of the GPU's ``device_memory``
    (bytes) at :data:`FULL_HEAD_BYTES_PER_LOGIT`: 9.9 GB at batch 64 x 256 with GPT-2's
    vocabulary, a fraction of an H100's 80 GB. Everywhere else it is ``chunked``:
    on a CPU it is the faster path, and memory there is shared with everything else."""
    if setting != "auto":
        return setting
    fits = n_logits * FULL_HEAD_BYTES_PER_LOGIT <= device_memory // 4
    return "full" if device_type == "cuda" and fits else "chunked"


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of a CUDA device; 0 elsewhere (no choice above depends on it there)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return 0


def optimizer_options(device_type: str) -> dict[str, bool]:
    """AdamW's implementation: ``fused`` (a few kernels for all parameters, instead of
    several per parameter) on CUDA; elsewhere torch's default, so that the CPU path
    stays as it was measured."""
    return {"fused": True} if device_type == "cuda" else {}


def use_compile_cache(directory: Path) -> Path:
    """Keep Inductor's compiled kernels (its FX graph cache) and AOTAutograd's traced
    forward and backward graphs under ``directory``, shared by every job that names it:
    a job whose graph another job compiled loads it in seconds instead of compiling
    it for a minute. Set through the environment (which Inductor's compile workers
    inherit and which its ``cache_dir()`` reads each time) and through the config
    modules, in case torch read the environment before this ran. Returns the folder."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return directory


def compile_key(**parts: Any) -> str:
    """A short name for what decides a compiled graph (shapes, dtypes, modes, torch), so
    that jobs that compile the same graph find each other (:func:`compile_lock`)."""
    text = json.dumps({**parts, "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def compile_lock(directory: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock named ``key`` under ``directory`` (a compile cache): jobs
    started together that compile the same graph take turns, so the first compiles
    and writes the cache, and the others, once it lets go, load from it. On systems
    without ``fcntl`` (Windows) there is no lock and each job compiles for itself."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    locks = Path(directory) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        torch's), TF32 matmuls on CUDA, where fp32 work otherwise runs far slower, and
        on a node with several GPUs this job's own device (:func:`job_device`)."""
        if threads > 0:
            torch.set_num_threads(threads)
        resolved = job_device(device)
        if resolved.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        choice = choose_precision(resolved.type, device_supports_bf16(resolved), precision)
        if choice.note:
            print(f"tga: {choice.note}", file=sys.stderr, flush=True)
        return cls(resolved, choice.precision, autocast_context(resolved, choice.precision))

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
