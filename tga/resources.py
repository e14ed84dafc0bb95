"""What a job will cost before it runs: peak memory and time of training, evaluation,
geometry and evolution, estimated from the resolved settings.

The workflow declares these estimates to the scheduler (``mem_mb``, ``runtime``), and
every heavy job checks them against the memory it has before it starts, so a setting
that cannot fit stops with one line naming the key to change instead of being killed
by the kernel's OOM killer hours into a run.

Memory is counted tensor by tensor from what ``tga/model.py`` and ``tga/train.py``
allocate (see ``_activation_units``); the constants below that are not counted but
measured say where they come from. ``tests/test_resources.py`` compares the estimates
with the peak RSS of real runs.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from tga.prompt_windows import prompt_batch_size
from tga.schema import LOSS_CHUNK_TOKENS, ModelConfig

__all__ = [
    "MEMORY_SAFETY_FACTOR",
    "RUNTIME_SAFETY_FACTOR",
    "STEP_WARNING_SECONDS",
    "ResourceError",
    "ResourceEstimate",
    "available_memory",
    "check_evaluation_fits",
    "check_fits",
    "check_training_fits",
    "estimate_evaluation",
    "estimate_geometry",
    "estimate_training",
    "estimate_variant_jobs",
    "job_device_type",
    "process_memory_bytes",
    "scheduler_resources",
    "slow_step_warning",
    "vocab_size_for",
]

MB = 2**20
GB = 2**30
# Scheduler requests are the estimate times this: the estimates are checked to lie
# within [0.67x, 1.5x] of the measured peak RSS (tests/test_resources.py), so 1.5x
# covers an estimate that is low by as much as the test allows.
MEMORY_SAFETY_FACTOR = 1.5
# Time estimates rest on an assumed throughput (below), which a busy or slow node can
# miss several-fold; SLURM kills a job at its limit, so the request is generous.
RUNTIME_SAFETY_FACTOR = 3.0
MIN_RUNTIME_MINUTES = 10
# A step estimated to take longer than this gets a warning (the job still runs).
STEP_WARNING_SECONDS = 60.0

# Resident memory of a job's Python process before any tensor: interpreter, torch,
# numpy (and pandas/matplotlib for geometry), plus Snakemake's script preamble.
# Measured: `import tga.train` alone peaks at 221 MB RSS, `import tga.geometry` at
# 286 MB (torch 2.13 CPU); the Snakemake preamble adds about 100 MB.
PROCESS_BASE_BYTES = {"train": 330 * MB, "evaluate": 330 * MB, "geometry": 400 * MB, "evolution": 400 * MB}
# What the first training step adds on CPU whatever the model (oneDNN and OpenMP
# scratch, allocator arenas): measured 90 MB for a 1-layer, 32-dim model.
CPU_RUNTIME_BYTES = 90 * MB
# Host memory a CUDA job holds for the driver and kernels once CUDA is initialized.
CUDA_HOST_BYTES = 1500 * MB
# Device memory CUDA keeps outside torch's allocator (context, cuBLAS workspace).
CUDA_CONTEXT_BYTES = 600 * MB
# Bytes per logit the full head holds at its peak (training.loss_head: full): the bf16
# (or fp32) logits, their fp32 upcast for the softmax and the logits' gradient. Also
# tga.device.loss_head_choice's measure of whether the full head fits.
FULL_HEAD_BYTES_PER_LOGIT = 12
# DistributedDataParallel's gradient buckets: a second fp32 copy of the gradients
# (gradient_as_bucket_view off, torch's default), on every rank of a multi-GPU job.
DDP_BUCKET_BYTES_PER_WEIGHT = 4
# Sustained throughput assumed for the time estimates. CPU: the default model trains at
# ~440 tokens/s per thread in bf16 (README, Scale-out) = 0.18 GFLOP x 440 = ~8e10 per
# thread; fp32 reaches about half of that.
CPU_FLOPS_PER_THREAD = 4e10
# CUDA: a fraction CUDA_MFU of an H100/H200 SXM's dense peak (NVIDIA's datasheet, as
# tga.bench.PEAK_FLOPS: bf16 989.5 TFLOP/s, TF32 494.7 for fp32 runs, which tga runs as
# TF32). 23.8% is what tga's compiled bf16 training step reached on one H200 for the
# default model at batch 64 x 256 (13.0 ms/step, docs/benchmarks.md); with the per-step
# overheads below the same constants give 9.6 ms for the config's batch 8 (measured
# 9.56 ms) and 20.7 ms at 64 (where the overheads overlap the arithmetic: measured
# 13.0). Larger models fill the GPU better, so for GPT-2 small this is a cautious
# figure (nanoGPT users report 29% MFU for GPT-2 124M on one RTX 4090: nanoGPT issue
# 182). Another GPU scales the time by its peak: an A100's bf16 peak is 312 TFLOP/s.
CUDA_PEAK_FLOPS = {"bf16": 989.5e12, "fp32": 494.7e12}
CUDA_MFU = 0.238
# Fixed cost per step and layer (kernel launches, Python) that dominates tiny models.
STEP_OVERHEAD_SECONDS = 2e-3
LAYER_OVERHEAD_SECONDS = 1e-3
# The char tokenizer's vocabulary is only known once it is built from the training text;
# WikiText-2's raw training text holds about a thousand distinct characters.
CHAR_VOCAB_ASSUMED = 1024
GPT2_VOCAB = 50257
# WikiText-2 raw, all three splits, in bytes: a bound on its token count before download.
WIKITEXT2_BYTES = 13_400_000
# Tokens assumed per held-out document of a ``datasets`` corpus (validation_documents,
# test_documents): twice FineWeb-Edu's mean (sample-10BT: about 10B GPT-2 tokens in
# 9.67M documents), as a bound for corpora of longer documents.
HELD_OUT_DOCUMENT_TOKENS = 2048


class ResourceError(RuntimeError):
    """A job whose estimated memory exceeds what the machine or the GPU has."""


@dataclass(frozen=True)
class ResourceEstimate:
    """Peak memory (host and device) and time of one job, with what they are made of."""

    job: str
    device_type: str
    precision: str
    host_bytes: int
    device_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    flops_per_step: float = 0.0
    steps: int = 1
    seconds_per_step: float = 0.0
    # Settings that drive the largest part, as (config key, value), for messages.
    culprits: tuple[tuple[str, Any], ...] = ()
    hint: str = ""
    # Training: forwards per step and process, processes, and tokens per optimizer step.
    accumulation: int = 1
    world_size: int = 1
    tokens_per_step: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Training tokens per second of the whole job (all its processes)."""
        return self.tokens_per_step / self.seconds_per_step if self.seconds_per_step else 0.0

    @property
    def seconds(self) -> float:
        return self.steps * self.seconds_per_step

    def describe(self, gpu: bool = False) -> str:
        """'610.5 GB (logits 480.3 GB, activations 120.1 GB, ...)': the largest parts first."""
        parts = sorted(((k, v) for k, v in self.parts.items() if k != "process" and v), key=lambda kv: -kv[1])[:3]
        total = self.device_bytes if gpu else self.host_bytes
        return f"{_size(total)} ({', '.join(f'{name} {_size(b)}' for name, b in parts)})"


def _size(n: float) -> str:
    return f"{n / GB:,.1f} GB" if n >= GB else f"{n / MB:,.0f} MB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


# --------------------------------------------------------------------------- counting


def _matmul_params(model: ModelConfig) -> int:
    """Weights every token multiplies through, the tied output head included."""
    d, h = model.n_embd, model.mlp_width
    attention = 4 * d * d
    mlp = (3 if model.activation == "swiglu" else 2) * d * h if model.mlp else 0
    return model.n_layer * (attention + mlp) + model.padded_vocab_size * d


def _parameters(model: ModelConfig) -> int:
    """Exactly what ``Transformer(model)`` holds (checked against it in the tests)."""
    d, h, n = model.n_embd, model.mlp_width, model.n_layer
    norm = d * (2 if model.norm == "layernorm" and model.bias else 1)
    attention = 4 * d * d + (4 * d if model.bias else 0)
    mlp = 0
    if model.mlp:
        n_up = 2 * h if model.activation == "swiglu" else h
        mlp = d * n_up + h * d + ((n_up + d) if model.bias else 0) + norm
    total = n * (attention + norm + mlp) + norm + model.padded_vocab_size * d
    if model.position_encoding == "learned":
        total += model.block_size * d
    if model.unigram_bias:
        total += model.padded_vocab_size
    return total


def _activation_units(model: ModelConfig, dropout: bool) -> float:
    """Tensors of shape (batch, window, n_embd) that one block keeps for the backward
    pass, counted from tga/model.py (a hidden-width tensor counts mlp_width/n_embd):
    RMSNorm keeps its normalized input and output (LayerNorm only its output); qkv's
    output (3) stays alive through v; RoPE makes new q and k (2); attention's output,
    its contiguous copy and the projection's output (3); each dropout a mask (1/4,
    bool) and an output (1); each residual sum (1). SwiGLU keeps the up projection
    (2h), silu(gate) (h) and the product (h); GELU and ReLU the up projection and
    their output."""
    d, h = model.n_embd, model.mlp_width
    norm = 2.0 if model.norm == "rmsnorm" else 1.0
    drop = 1.25 if dropout else 0.0
    attention = norm + 3 + (2 if model.position_encoding == "rope" else 0) + 3 + drop + 1
    mlp = 0.0
    if model.mlp:
        hidden = (4 if model.activation == "swiglu" else 2) * h / d
        mlp = norm + hidden + 1 + drop + 1
    return attention + mlp


def _attention_matrix_bytes(model: ModelConfig, batch: int, device_type: str, dropout: bool) -> int:
    """Memory of the (window x window) attention matrices. Flash attention keeps none,
    but on CPU PyTorch falls back to the plain kernel when dropout is on in training,
    which keeps scores, softmax, dropout mask and result per block (measured: one
    block's backward peaks at 4.1x one fp32 matrix, 2048-token window)."""
    if device_type == "cuda" or not dropout:
        return 0
    t = model.block_size
    matrix = batch * model.n_head * t * t * 4
    return int(matrix * (2.25 * model.n_layer + 2))


def _token_bytes(n_tokens: int) -> int:
    """Token files become int32 tensors; tokenization's memmap pages come on top."""
    return 6 * n_tokens


def _precision(device_type: str, precision: str) -> str:
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def cuda_flops(precision: str = "bf16") -> float:
    """Sustained FLOP/s assumed for a CUDA job: CUDA_MFU of the H100/H200 peak."""
    return CUDA_PEAK_FLOPS["bf16" if precision == "bf16" else "fp32"] * CUDA_MFU


def _seconds_per_step(flops: float, device_type: str, threads: int, n_layer: int, precision: str = "bf16") -> float:
    rate = cuda_flops(precision) if device_type == "cuda" else CPU_FLOPS_PER_THREAD * max(1, threads)
    return flops / rate + STEP_OVERHEAD_SECONDS + LAYER_OVERHEAD_SECONDS * n_layer


def _forward_flops(model: ModelConfig, batch: int, window: int) -> float:
    """2 FLOPs per weight and token, plus causal attention's scores and mix (Kaplan et al. 2020)."""
    tokens = batch * window
    return 2.0 * _matmul_params(model) * tokens + 2.0 * model.n_layer * window * model.n_embd * tokens


def _base_bytes(job: str, device_type: str) -> int:
    """The process before any tensor, plus what the compute library holds once it has run."""
    return PROCESS_BASE_BYTES[job] + (CUDA_HOST_BYTES if device_type == "cuda" else CPU_RUNTIME_BYTES)


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------- estimates


def estimate_training(
    model: ModelConfig,
    training: Any,
    device_type: str = "cpu",
    n_tokens: int = 0,
    threads: int = 0,
    world_size: int = 1,
    device_memory: int = 0,
) -> ResourceEstimate:
    """Peak memory (per process: per GPU in a multi-GPU job) and time of ``train_model``
    for ``model`` (its real vocab_size) and ``training`` (a TrainConfig or its dict) on
    ``world_size`` processes; ``n_tokens``: train + validation tokens. ``device_memory``
    (bytes of the GPU, 0 = unknown) lets ``loss_head: auto`` be resolved as training
    resolves it; unknown, the chunked head is assumed.

    Each process runs forwards of ``micro_batch_size`` windows (null: batch_size /
    world_size), accumulating batch_size / (micro x world_size) of them per step.
    Peak = process + weights, gradients and AdamW's two moments (16 bytes a weight in
    fp32; bf16 autocast adds a 2-byte copy; DDP's gradient buckets 4 more) + the
    activations the blocks keep for one micro-batch + the output head: the full head's
    (tokens x padded vocabulary) logits at FULL_HEAD_BYTES_PER_LOGIT, or the logits of
    one chunk of the fused LM head (tga.lm_head: at most LOSS_CHUNK_TOKENS tokens over
    the padded vocabulary: the fp32 logits, turned into their gradient in place, and
    log-sum-exp's temporary, 8 bytes a logit; under bf16 the bf16 product and its bf16
    gradient add 4), plus the gradients it keeps from its forward for the backward (the
    weight's, vocabulary x d, and the hidden states', n x d, in fp32) + the attention
    matrices where the kernel materializes them. The activations are eager PyTorch's:
    a compiled step (Inductor fuses norms, activations and residual sums, and recomputes
    some in the backward) keeps fewer, so there this is an upper bound. Checkpoint saves
    (one serialized copy of the weights) happen between steps, when the gradients are
    freed, so they add nothing."""
    get = training.get if isinstance(training, Mapping) else lambda k, d=None: getattr(training, k, d)
    batch, steps = int(get("batch_size", 8)), int(get("max_steps", 1000))
    world = max(1, int(world_size))
    micro_setting = get("micro_batch_size", None)
    micro = int(micro_setting) if micro_setting else max(1, math.ceil(batch / world))
    accumulation = max(1, math.ceil(batch / (micro * world)))
    precision = _precision(device_type, str(get("precision", "auto")))
    threads = int(threads or get("threads", 0) or _threads())
    dropout = model.dropout > 0
    t, d = model.block_size, model.n_embd
    act_bytes = 4 if precision == "fp32" else 3  # bf16 matmul outputs, fp32 norm statistics
    n = micro * t
    params = _parameters(model)
    weights = params * (16 + (2 if precision == "bf16" else 0))
    buckets = params * DDP_BUCKET_BYTES_PER_WEIGHT if world > 1 else 0
    layers = model.n_layer * _activation_units(model, dropout) + 2 + (1.25 if dropout else 0) + 2
    activations = int(n * d * layers * act_bytes)
    n_logits = n * model.padded_vocab_size
    head = str(get("loss_head", "auto"))
    if head == "auto" and device_type == "cuda" and device_memory > 0:
        from tga.device import loss_head_choice

        head = loss_head_choice(head, device_type, n_logits, device_memory)
    if head == "full":
        logits = n_logits * FULL_HEAD_BYTES_PER_LOGIT
    else:
        logits = (min(n, LOSS_CHUNK_TOKENS) * model.padded_vocab_size * (8 if precision == "fp32" else 12)
                  + (model.padded_vocab_size + n) * d * 4)
    attention = _attention_matrix_bytes(model, micro, device_type, dropout)
    tokens = _token_bytes(n_tokens)
    parts = {"weights and optimizer": weights, "DDP gradient buckets": buckets, "activations": activations,
             "logits": logits, "attention matrices": attention, "token data": tokens}
    tensors = weights + buckets + activations + logits + attention
    if device_type == "cuda":
        host = _base_bytes("train", device_type) + tokens + 3 * params * 4
        device = tensors + tokens + CUDA_CONTEXT_BYTES
    else:
        host = _base_bytes("train", device_type) + tensors + tokens
        device = 0
    parts["process"] = _base_bytes("train", device_type)
    flops = 3.0 * _forward_flops(model, batch, t) / world  # this process's share of a step
    eval_windows = int(get("eval_batches", 20)) * batch
    n_evals = steps // max(1, int(get("eval_interval", 50))) + 2
    eval_flops_per_step = _forward_flops(model, eval_windows, t) * n_evals / max(1, steps) / world
    per_step = _seconds_per_step(flops + eval_flops_per_step, device_type, threads, model.n_layer, precision)
    largest = max(("activations", activations), ("logits", logits), ("attention matrices", attention),
                  ("weights and optimizer", weights), key=lambda kv: kv[1])[0]
    batch_key = ("training.micro_batch_size", micro) if micro_setting else ("training.batch_size", batch)
    culprits: tuple[tuple[str, Any], ...]
    if largest == "weights and optimizer":
        culprits = (("model.n_embd", d), ("model.n_layer", model.n_layer))
    elif largest == "attention matrices":
        culprits = (("model.block_size", t), batch_key)
    else:
        culprits = (batch_key, ("model.block_size", t))
    hint = (", or set model.dropout: 0 (with dropout, CPU attention keeps window x window matrices)"
            if largest == "attention matrices" else "")
    if micro_setting is None and accumulation == 1 and largest in ("activations", "logits"):
        hint += ", or set training.micro_batch_size to accumulate gradients over smaller forwards"
    return ResourceEstimate("train", device_type, precision, int(host), int(device), parts, flops, steps,
                            per_step, culprits, hint, accumulation=accumulation, world_size=world,
                            tokens_per_step=batch * t)


def estimate_evaluation(
    model: ModelConfig, batch_size: int, device_type: str = "cpu", n_tokens: int = 0, threads: int = 1
) -> ResourceEstimate:
    """Peak memory and time of ``evaluate_checkpoint``: the weights (loaded, then copied
    into the model), the split cut into windows (int64 inputs, targets, mask), and per
    batch the logits, their fp32 copy and log-softmax; under inference mode no
    activations are kept beyond the few tensors alive at once."""
    precision = _precision(device_type, "auto")
    t = model.block_size
    params = _parameters(model)
    n = batch_size * t
    weights = 2 * params * 4
    windows = 20 * n_tokens
    logits = n * model.padded_vocab_size * (8 if precision == "fp32" else 10)
    activations = n * max(3 * model.n_embd, 2 * model.mlp_width) * 4
    tensors = weights + logits + activations
    base = _base_bytes("evaluate", device_type)
    parts = {"weights": weights, "logits": logits, "activations": activations, "token data": windows,
             "process": base}
    if device_type == "cuda":
        host, device = base + weights + windows, tensors + windows + CUDA_CONTEXT_BYTES
    else:
        host, device = base + tensors + windows, 0
    n_batches = max(1, math.ceil(n_tokens / max(1, t) / batch_size))
    flops = _forward_flops(model, batch_size, t)
    per_step = _seconds_per_step(flops, device_type, threads, model.n_layer)
    return ResourceEstimate("evaluate", device_type, precision, int(host), int(device), parts, flops, n_batches,
                            per_step, (("evaluation.batch_size", batch_size), ("model.block_size", t)))


def estimate_geometry(
    model: ModelConfig,
    max_prompt_tokens: int,
    n_prompts: int = 1,
    n_stages: int = 2,
    device_type: str = "cpu",
    job: str = "geometry",
    batch_size: int = 1,
) -> ResourceEstimate:
    """Peak memory and time of the geometry of ``n_stages`` checkpoints (one loaded at
    a time) on prompts of at most ``max_prompt_tokens`` tokens (truncated to the
    window), ``batch_size`` prompts per forward pass: per forward the hidden states of
    every layer (and their copy off the device) and the logits; then per prompt, on the
    CPU, the states' float64 copies and unit vectors and several (layers x T x T) float64
    matrices (cosines, distances, neighbour ranks). On CUDA the forward passes (and the
    model, its states and logits) are on the GPU, and the metrics stay on the host."""
    t = max(1, min(model.block_size, max_prompt_tokens))
    batch = max(1, min(int(batch_size), n_prompts))
    layers = model.n_layer + 2
    params = _parameters(model)
    weights = 2 * params * 4
    states = batch * layers * t * model.n_embd * 4  # one forward's hidden states, fp32
    metrics = layers * t * model.n_embd * (8 + 8 + 8)
    matrices = layers * t * t * 8 * 4
    logits = batch * t * model.padded_vocab_size * 4 * 2
    base = _base_bytes(job, device_type)
    parts = {"weights": weights, "hidden states": 2 * states + metrics, "token x token matrices": matrices,
             "logits": logits, "process": base}
    if device_type == "cuda":
        host = base + weights + states + metrics + matrices
        device = params * 4 + states + logits + CUDA_CONTEXT_BYTES
    else:
        host = base + weights + 2 * states + metrics + matrices + logits
        device = 0
    forward = _forward_flops(model, 1, t)  # per prompt
    analysis = layers * (t * t * model.n_embd * 6 + t * model.n_embd**2 * 4)
    if device_type == "cuda":
        per_step = forward / cuda_flops("fp32") + _seconds_per_step(analysis, "cpu", 1, model.n_layer) \
            + STEP_OVERHEAD_SECONDS / batch
    else:
        per_step = _seconds_per_step(forward + analysis, "cpu", 1, model.n_layer)
    return ResourceEstimate(job, device_type, "fp32", int(host), int(device), parts, forward + analysis,
                            n_stages * n_prompts, per_step,
                            (("model.block_size", model.block_size), ("geometry.prompts", f"{t}-token prompts")))


# --------------------------------------------------------------------------- what the machine has


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _gpu_memory(index: int) -> tuple[int, str]:
    """The GPU's total memory; asked of nvidia-smi while this process has no CUDA
    context, so that checking does not make one (it would hold GPU memory all run)."""
    import torch

    if not torch.cuda.is_available():
        return 0, "no GPU"  # nothing to compare with: the job itself says CUDA is missing
    if not torch.cuda.is_initialized():
        try:
            out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.total,name",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
            mib, name = out.stdout.strip().split(", ", 1)
            return int(mib) * MB, f"the GPU ({name})"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    props = torch.cuda.get_device_properties(index)
    return int(props.total_memory), f"the GPU ({props.name})"


def process_memory_bytes(field: str = "VmHWM") -> int:
    """This process's resident memory from /proc/self/status (Linux): ``VmHWM`` is the
    peak, ``VmRSS`` the current size. Measurements of jobs against the estimates use it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def available_memory(device_type: str = "cpu", index: int | None = None) -> tuple[int, str]:
    """(bytes, where): the GPU's total memory for CUDA; for the host the machine's
    memory, or the cgroup limit (v2 memory.max, v1 memory.limit_in_bytes) when lower."""
    if device_type == "cuda":
        return _gpu_memory(index or 0)
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    where = "this machine"
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = _read_int(path)
        if limit is not None and (total is None or limit < total):
            total, where = limit, f"this machine's cgroup limit ({path})"
    return int(total or 0), where


# --------------------------------------------------------------------------- checks


def check_fits(estimate: ResourceEstimate, available: tuple[int, str] | None = None, what: str = "") -> None:
    """Raise ResourceError, one line, when the estimate exceeds the memory there is
    (the GPU's for a CUDA job, else the host's)."""
    gpu = estimate.device_type == "cuda"
    have, where = available if available is not None else available_memory("cuda" if gpu else "cpu")
    need = estimate.device_bytes if gpu else estimate.host_bytes
    if not have or need <= have:
        return
    keys = " or ".join(f"{key} ({value})" for key, value in estimate.culprits)
    job = {"train": "training", "evaluate": "evaluation"}.get(estimate.job, estimate.job)
    raise ResourceError(
        f"{what + ': ' if what else ''}{job} needs an estimated {estimate.describe(gpu)} of "
        f"{'GPU ' if gpu else ''}memory, but {where} has {_size(have)}: lower {keys}{estimate.hint}"
    )


def slow_step_warning(estimate: ResourceEstimate, limit: float = STEP_WARNING_SECONDS, what: str = "") -> str | None:
    """A warning when one step is estimated to take longer than ``limit`` seconds."""
    if estimate.seconds_per_step <= limit:
        return None
    keys = " or ".join(key for key, _ in estimate.culprits)
    job = {"train": "training", "evaluate": "evaluation"}.get(estimate.job, estimate.job)
    return (f"{what + ': ' if what else ''}one {job} step is estimated at {_duration(estimate.seconds_per_step)} "
            f"({estimate.flops_per_step:.2g} FLOPs on {estimate.device_type}), {_duration(estimate.seconds)} for "
            f"{estimate.steps} steps; it runs anyway; lower {keys} to make it faster")


def check_training_fits(
    model: ModelConfig,
    training: Any,
    device_type: str,
    n_tokens: int = 0,
    warn: Callable[[str], None] = print,
    world_size: int | None = None,
) -> None:
    """Before training allocates anything: raise ResourceError if it cannot fit in this
    machine's (or GPU's) memory; pass ``warn`` one line if a step will be slow.
    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 outside torchrun); on a GPU
    the head is counted as ``loss_head: auto`` will resolve it for this GPU's memory."""
    device_type = "cuda" if device_type == "cuda" else "cpu"
    available = available_memory(device_type)
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    estimate = estimate_training(model, training, device_type, n_tokens, world_size=world,
                                 device_memory=available[0] if device_type == "cuda" else 0)
    check_fits(estimate, available)
    warning = slow_step_warning(estimate)
    if warning:
        warn(warning)


def check_evaluation_fits(model: ModelConfig, batch_size: int, device_type: str, n_tokens: int = 0) -> None:
    """Before evaluation batches anything: raise ResourceError if it cannot fit."""
    check_fits(estimate_evaluation(model, batch_size, "cuda" if device_type == "cuda" else "cpu", n_tokens))


def scheduler_resources(estimate: ResourceEstimate) -> dict[str, int]:
    """``mem_mb`` (host memory) and ``runtime`` (minutes) to declare for a job: the
    estimate times MEMORY_SAFETY_FACTOR / RUNTIME_SAFETY_FACTOR, rounded up."""
    mem_mb = math.ceil(estimate.host_bytes * MEMORY_SAFETY_FACTOR / MB / 100) * 100
    runtime = max(MIN_RUNTIME_MINUTES, math.ceil(estimate.seconds * RUNTIME_SAFETY_FACTOR / 60))
    return {"mem_mb": int(mem_mb), "runtime": int(runtime)}


# --------------------------------------------------------------------------- from the workflow config


def job_device_type(setting: str, gpus: int = 0, this_machine: bool = True) -> str:
    """'cuda' or 'cpu' for a device setting. ``auto`` resolves as the job will: here,
    when the job runs on this machine; on a cluster, CUDA exactly when it asks for GPUs."""
    if setting == "auto":
        if this_machine:
            from tga.device import resolve_device

            return "cuda" if resolve_device("auto").type == "cuda" else "cpu"
        return "cuda" if gpus > 0 else "cpu"
    return "cuda" if setting.startswith("cuda") else "cpu"


def vocab_size_for(config: Mapping[str, Any], tokenizer_json: str | Path | None = None) -> int:
    """The vocabulary the models will have: GPT-2's, an hf tokenizer's ``len(tokenizer)``,
    the saved char tokenizer's, or the distinct characters of the training text (+ <unk>)
    before it is built."""
    if config["tokenizer"]["name"] == "hf":
        from tga.tokenizers import hf_vocab_size

        return hf_vocab_size(str(config["tokenizer"]["path"]), config["tokenizer"].get("revision"))
    if config["tokenizer"]["name"] != "char":
        return GPT2_VOCAB
    if tokenizer_json is not None and Path(tokenizer_json).is_file():
        import json

        return int(json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["vocab_size"])
    data = config["data"]
    if data["source"] == "text" and data.get("train") and Path(data["train"]).is_file():
        return len(set(Path(data["train"]).read_text(encoding="utf-8", errors="replace"))) + 1
    return CHAR_VOCAB_ASSUMED


def _corpus_tokens(config: Mapping[str, Any]) -> int:
    """A bound on the token count (tokens <= UTF-8 bytes for both tokenizers); for a
    ``datasets`` corpus (``source: hf``) its training token budget plus the validation
    documents (0 when the budget is null: the whole corpus, unknown before it is read)."""
    data = config["data"]
    if data["source"] == "hf":
        return int(data.get("token_budget") or 0) + _held_out_tokens(data, "validation_documents")
    if data["source"] == "text":
        return sum(Path(data[s]).stat().st_size for s in ("train", "validation", "test")
                   if data.get(s) and Path(data[s]).is_file())
    return WIKITEXT2_BYTES if config["tokenizer"]["name"] == "char" else WIKITEXT2_BYTES // 4


def _held_out_tokens(data: Mapping[str, Any], key: str) -> int:
    return int(data.get(key) or 0) * HELD_OUT_DOCUMENT_TOKENS


def _test_tokens(config: Mapping[str, Any], n_tokens: int) -> int:
    """Tokens of the test split: held-out documents of a ``datasets`` corpus, else
    about a tenth of the corpus (WikiText-2's share)."""
    if config["data"]["source"] == "hf":
        return _held_out_tokens(config["data"], "test_documents")
    return n_tokens // 10


def _prompt_shape(path: str | Path | Mapping[str, Any]) -> tuple[int, int]:
    """(longest prompt in UTF-8 bytes, number of prompts): bytes bound the token count.
    Test windows (``geometry.prompts`` as a mapping) are ``test_windows`` of ``length`` tokens."""
    if isinstance(path, Mapping):
        return int(path["length"]), int(path["test_windows"])
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError):
        return 1, 1
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    return max((len(p.encode()) for p in prompts), default=1), max(1, len(prompts))


def estimate_variant_jobs(
    config: Mapping[str, Any],
    resolved: Mapping[str, Mapping[str, Any]],
    vocab_size: int,
    this_machine: bool = True,
    n_stages: int = 2,
) -> dict[str, ResourceEstimate]:
    """Estimates of one variant's train, evaluate, geometry and evolution jobs, from
    the config and the variant's resolved settings (``tga.settings.resolve_variant``)."""
    model = ModelConfig.from_dict({**resolved["model"], "vocab_size": vocab_size})
    training = dict(resolved["training"])
    resources = config.get("resources", {})
    gpus = int(resources.get("train_gpus", 0) or 0)
    world = max(1, gpus) * max(1, int(resources.get("train_nodes", 1) or 1)) if gpus > 1 else 1
    threads = int(resources.get("train_threads", 1) or 1)
    n_tokens = _corpus_tokens(config)
    train_device = job_device_type(str(training.get("device", "auto")), gpus, this_machine)
    evaluation = config.get("evaluation", {})
    eval_device = job_device_type(str(evaluation.get("device", "auto")), 0, this_machine)
    geometry = config.get("geometry", {})
    longest, n_prompts = _prompt_shape(geometry.get("prompts", ""))
    geometry_device = job_device_type(str(geometry.get("device", "cpu")), 0, this_machine)
    batch = prompt_batch_size(geometry.get("batch_size"), geometry_device)
    steps = int(training.get("max_steps", 1000))
    interval = int(training.get("checkpoint_interval", 200))
    n_checkpoints = 1 + steps // max(1, interval) + (0 if steps % max(1, interval) == 0 else 1)
    return {
        "train": estimate_training(model, training, train_device, n_tokens, threads, world_size=world),
        "evaluate": estimate_evaluation(model, int(evaluation.get("batch_size", 16)), eval_device,
                                        _test_tokens(config, n_tokens)),
        "geometry": estimate_geometry(model, longest, n_prompts, n_stages, geometry_device, batch_size=batch),
        "evolution": estimate_geometry(model, longest, n_prompts, max(n_stages, n_checkpoints), geometry_device,
                                       job="evolution", batch_size=batch),
    }
