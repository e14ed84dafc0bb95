"""Speed and memory benchmark: ``python -m tga.bench`` prints JSON per device.

Figures: training tokens/s, model FLOPs utilisation (MFU), peak memory, evaluation
tokens/s, geometry seconds per model and, with ``--e2e``, the wall time of the
quick config run end to end through Snakemake. Synthetic token ids are used so the
benchmark needs no data files; the arithmetic is the same as on real text.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tga.data import sample_batch
from tga.device import autocast_context, resolve_device, resolved_precision
from tga.evaluate import summed_loss_over_windows
from tga.model import ModelConfig, Transformer
from tga.train import TrainConfig, make_optimizer, train_step

# Dense bf16 (CUDA) peak FLOP/s by device name fragment; MFU is reported against it.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}

MODELS = {
    "default": ModelConfig(vocab_size=50257, block_size=256, n_layer=6, n_head=6, n_embd=384,
                           norm_position="post", activation="gelu"),

    "quick": ModelConfig(vocab_size=200, block_size=64, n_layer=4, n_head=4, n_embd=64,
                         norm_position="post", activation="gelu"),
}


def flops_per_token(config: ModelConfig) -> float:
    """6N + 12·L·T·d, with N the non-embedding weights plus the (tied) output head."""
    model = Transformer(config)
    n = model.num_parameters(non_embedding=True) + config.vocab_size * config.n_embd
    if model.logit_bias is not None:
        n -= model.logit_bias.numel()  # an addition per logit, not a matmul weight
    return 6 * n + 12 * config.n_layer * config.block_size * config.n_embd


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_FLOPS.items():
        if fragment in name:
            return peak
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_training(config: ModelConfig, batch_size: int, steps: int, warmup: int, device: torch.device,
                   compile_model: bool, compile_mode: str = "default", precision: str = "auto") -> dict[str, Any]:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    model = Transformer(config).to(device)
    optimizer = make_optimizer(model, TrainConfig(), device)
    forward_model = torch.compile(model, mode=compile_mode) if compile_model else model
    amp = autocast_context(device, precision)
    data = torch.randint(0, config.vocab_size, (1_000_000,), dtype=torch.int32, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    for _ in range(warmup):
        x, y = sample_batch(data, batch_size, config.block_size, generator)
        train_step(forward_model, model, optimizer, x, y, amp, 1.0)
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        x, y = sample_batch(data, batch_size, config.block_size, generator)
        loss = train_step(forward_model, model, optimizer, x, y, amp, 1.0)
    loss.item()
    _sync(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * batch_size * config.block_size / elapsed
    peak = device_peak_flops(device)
    result = {
        "batch_size": batch_size,
        "block_size": config.block_size,
        "compile": compile_mode if compile_model else False,
        "precision": resolved_precision(device, precision),
        "steps_timed": steps,
        "warmup_s": round(warmup_s, 3),
        "step_ms": round(1000 * elapsed / steps, 3),
        "train_tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token(config),
        "mfu": None if peak is None else round(tokens_per_s * flops_per_token(config) / peak, 4),
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result["peak_memory_mb"] = _peak_rss_mb()
    return result


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)


def bench_evaluation(config: ModelConfig, batch_size: int, n_tokens: int, device: torch.device,
                     precision: str = "auto") -> dict[str, Any]:
    torch.manual_seed(0)
    model = Transformer(config).to(device).eval()
    tokens = torch.randint(0, config.vocab_size, (n_tokens,), dtype=torch.int32)
    amp = autocast_context(device, precision)
    summed_loss_over_windows(model, tokens[: config.block_size * batch_size + 1], config.block_size,
                             batch_size, amp)  # warm-up
    _sync(device)
    start = time.perf_counter()
    _, scored = summed_loss_over_windows(model, tokens, config.block_size, batch_size, amp)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"eval_batch_size": batch_size, "precision": resolved_precision(device, precision),
            "eval_tokens": scored, "eval_tokens_per_s": round(scored / elapsed, 1)}


def bench_geometry(config: ModelConfig, n_prompts: int, prompt_tokens: int) -> dict[str, Any]:
    """Seconds to analyse one model (init and trained stages) on CPU."""
    from tga.geometry import analyze_model

    torch.manual_seed(0)
    model = Transformer(config)
    length = min(prompt_tokens, config.block_size)
    prompts = [torch.randint(0, config.vocab_size, (length,)).tolist() for _ in range(n_prompts)]
    start = time.perf_counter()
    for stage in ("init", "trained"):
        analyze_model(model, prompts, stage, 0, [0, -1])
    return {"geometry_prompts": n_prompts, "geometry_prompt_tokens": length,
            "geometry_s_per_model": round(time.perf_counter() - start, 3)}


def bench_quick_e2e(repo: Path, cores: int) -> dict[str, Any]:
    """Wall time of ``snakemake --cores N --configfile config/quick.yaml`` in a fresh folder."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("Snakefile", "workflow", "config", "resources"):
            source = repo / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, work / name)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", "config/quick.yaml"],
            cwd=work, capture_output=True, text=True,
        )
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"quick config run failed:\n{proc.stderr[-3000:]}")
    return {"quick_e2e_cores": cores, "quick_e2e_s": round(elapsed, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "models": {},
    }
    on_gpu = device.type == "cuda"
    for name in args.models:
        config = MODELS[name]
        entry: dict[str, Any] = {"config": asdict(config), "train": [], "eval": []}
        batches = args.batch_sizes or ([8, 64] if on_gpu else [8])
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        for precision in args.precision:
            for batch in batches:
                for compile_model in compiles:
                    steps = args.steps or (200 if on_gpu else (3 if name == "default" else 50))
                    warmup = args.warmup if args.warmup is not None else (30 if on_gpu else 1)
                    entry["train"].append(bench_training(config, batch, steps, warmup, device, compile_model,
                                                         args.compile_mode, precision))
            eval_tokens = args.eval_tokens or (2_000_000 if on_gpu else (20_000 if name == "default" else 100_000))
            entry["eval"].append(bench_evaluation(config, 64 if on_gpu else 16, eval_tokens, device, precision))
        entry["geometry"] = bench_geometry(config, n_prompts=16, prompt_tokens=128)
        report["models"][name] = entry
    if args.e2e:
        report["quick_e2e"] = bench_quick_e2e(Path(args.repo), args.e2e_cores)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tga.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda[:N]")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["default", "quick"],
                        help="which model sizes to time (default: both)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="training batch sizes (default: 8 and 64 on GPU, 8 on CPU)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="time training without and/or with torch.compile")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode (reduce-overhead adds CUDA graphs)")
    parser.add_argument("--precision", nargs="+", choices=["auto", "fp32", "bf16"], default=["auto"],
                        help="autocast precision(s) to time (auto: bf16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--steps", type=int, help="timed training steps (default: 200 on GPU, few on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps")
    parser.add_argument("--eval-tokens", type=int, help="tokens scored by the evaluation timing")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--e2e", action="store_true", help="also time the quick config end to end via Snakemake")
    parser.add_argument("--e2e-cores", type=int, default=4, help="--cores for the end-to-end run")
    parser.add_argument("--repo", default=".", help="repository root holding Snakefile and config/ (for --e2e)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
