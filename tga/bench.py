"""Speed and memory benchmark: ``python -m tga.bench`` prints JSON per device.

Figures: training tokens/s, model FLOPs utilisation (MFU) with the peak it divided by,
peak memory, evaluation tokens/s, geometry seconds per model and, with ``--e2e``, the
wall time of the quick config run end to end through Snakemake.

What is timed is the pipeline's own training step (:class:`tga.train.TrainingStep`,
the function the training rule runs: schedule, batch, rare-token relabeling where
configured, the compiled or eager step, the on-device loss sum and NaN/inf check) on
the model and training settings of the pipeline's config (``config/config.yaml``,
with ``config/quick.yaml`` merged on top for ``quick``), resolved for one variant as
the workflow resolves it. Only the batch size, device, precision and compile setting
are the benchmark's own. Synthetic token ids stand in for the corpus, so the
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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tga.atomic import atomic_write_text
from tga.device import (Runtime, autocast_context, compile_decision, compile_mode_choice, resolve_device,
                        resolved_precision)
from tga.evaluate import summed_loss_over_windows
from tga.model import ModelConfig, Transformer
from tga.resources import vocab_size_for
from tga.resume import TrainState
from tga.schema import key_specs
from tga.settings import merged_config, resolve_variant
from tga.train import (TrainConfig, TrainingStep, compile_for_training, new_training_parts,
                       token_counts_and_relabeler)

# The config files each benchmarked model comes from, merged left to right as
# ``snakemake --configfile`` merges them (relative to the repository root).
CONFIG_FILES = {
    "default": ("config/config.yaml",),
    "quick": ("config/config.yaml", "config/quick.yaml"),
}
SYNTHETIC_TOKENS = 1_000_000
# Variants the benchmark knows besides a config's own, for like-for-like comparisons
# with other code bases; they are not part of any study. ``nanogpt-like`` is nanoGPT's
# block (Pre-LN, LayerNorm, GELU, learned positions, no dropout; biases off, as in
# nanoGPT's bench.py) on the config's sizes, with the config's tied head.
BENCH_VARIANTS: dict[str, dict[str, Any]] = {
    "nanogpt-like": {"norm_position": "pre", "norm": "layernorm", "activation": "gelu",
                     "position_encoding": "learned", "dropout": 0.0, "bias": False},
}
PROFILE_STEPS = 5  # steps recorded by --profile, after the timed ones


class PeakFlops(NamedTuple):
    """Dense (no sparsity) peak FLOP/s of one GPU model, from NVIDIA's datasheets.

    ``tf32`` is what fp32 training runs at: tga turns TF32 matmuls on for CUDA
    (tga.device.Runtime); ``None`` where the GPU has no TF32 (V100), so fp32 runs
    are divided by ``fp32``. ``bf16`` is ``None`` where the GPU has no bf16.
    """

    bf16: float | None
    tf32: float | None
    fp32: float


# Name fragments in the order they are tried: the specific form factors first
# (torch reports "NVIDIA H100 PCIe" and "NVIDIA H100 NVL", but the SXM part as "NVIDIA
# H100 80GB HBM3"), so a plain "H100" or "H200" is the SXM part; GH200 contains "H200"
# and has that peak. A100 SXM and PCIe share one peak.
PEAK_FLOPS: dict[str, PeakFlops] = {
    "H200 NVL": PeakFlops(bf16=835.5e12, tf32=417.5e12, fp32=60e12),
    "H200": PeakFlops(bf16=989.5e12, tf32=494.7e12, fp32=66.9e12),  # SXM
    "H100 NVL": PeakFlops(bf16=835.5e12, tf32=417.5e12, fp32=60e12),
    "H100 PCIe": PeakFlops(bf16=756.5e12, tf32=378e12, fp32=51.2e12),
    "H100": PeakFlops(bf16=989.5e12, tf32=494.7e12, fp32=66.9e12),  # SXM
    "A100": PeakFlops(bf16=312e12, tf32=156e12, fp32=19.5e12),
    "L40S": PeakFlops(bf16=362.05e12, tf32=183e12, fp32=91.6e12),
    "A10G": PeakFlops(bf16=125e12, tf32=62.5e12, fp32=31.2e12),  # the A10's datasheet figures
    "RTX 4090": PeakFlops(bf16=165.2e12, tf32=82.6e12, fp32=82.6e12),
    "V100": PeakFlops(bf16=None, tf32=None, fp32=15.7e12),  # SXM2; no bf16, no TF32
}


class PeakMatch(NamedTuple):
    device: str  # the PEAK_FLOPS entry the device name matched
    kind: str  # which of its peaks: bf16, tf32 or fp32
    flops: float


def peak_flops_for(device_name: str, precision: str) -> PeakMatch | None:
    """The peak a run on ``device_name`` (as torch.cuda.get_device_name says it) in
    ``precision`` (resolved: fp32 or bf16) is divided by for its MFU; None when no
    entry matches (and for CPUs, whose names match none)."""
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in device_name:
            if precision == "bf16":
                return None if peaks.bf16 is None else PeakMatch(fragment, "bf16", peaks.bf16)
            if peaks.tf32 is not None:
                return PeakMatch(fragment, "tf32", peaks.tf32)
            return PeakMatch(fragment, "fp32", peaks.fp32)
    return None


def pipeline_settings(repo: Path, model: str, variant: str | None = None) -> tuple[str, ModelConfig, TrainConfig]:
    """(variant, model config, training config) of ``model``'s config files, as the
    training rule gets them: :func:`tga.settings.resolve_variant` (schema defaults for
    every key the config leaves out) and the tokenizer's vocabulary. ``variant``
    defaults to the config's first; a name of :data:`BENCH_VARIANTS` that the config
    lacks is that variant's settings over the config's shared ones."""
    config = merged_config([repo / name for name in CONFIG_FILES[model]])
    if variant in BENCH_VARIANTS and variant not in config["variants"]:
        config["variants"] = {**config["variants"], variant: BENCH_VARIANTS[variant]}
    data = config.get("data") or {}
    for split in ("train", "validation", "test"):  # the workflow runs in the repository root
        if data.get(split):
            data[split] = str(repo / data[split])
    variant = variant or next(iter(config["variants"]))
    settings = resolve_variant(config, variant)
    model_config = ModelConfig.from_dict({**settings["model"], "vocab_size": vocab_size_for(config)})
    return variant, model_config, TrainConfig.from_dict(settings["training"])


def flops_per_token(config: ModelConfig) -> float:
    """6N + 12·L·T·d, with N the non-embedding weights plus the (tied) output head."""
    model = Transformer(config)
    n = model.num_parameters(non_embedding=True) + config.vocab_size * config.n_embd
    if model.logit_bias is not None:
        n -= model.logit_bias.numel()  # an addition per logit, not a matmul weight
    return 6 * n + 12 * config.n_layer * config.block_size * config.n_embd


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(run_step: TrainingStep, state: TrainState, first_step: int, steps: int, device: torch.device,
                  top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` kernels of ``steps`` training steps by their own time (torch.profiler):
    on CUDA the GPU kernels by device time, on a CPU the operators by CPU time, each
    with its calls and milliseconds per step and its share of the recorded total."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as recorded:
        for step in range(first_step, first_step + steps):
            run_step(state, step)
        _sync(device)
    events = recorded.key_averages()
    own = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events) or 1.0
    ranked = sorted((e for e in events if own(e) > 0), key=own, reverse=True)[:top]
    return [{"name": e.key, "calls_per_step": round(e.count / steps, 2), "ms_per_step": round(own(e) / 1000 / steps, 4),
             "share": round(own(e) / total, 4)} for e in ranked]


def profile_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The profile as a markdown table, for docs/results.md."""
    lines = [f"**{title}**", "", "| kernel | calls/step | ms/step | share |", "|---|---|---|---|"]
    for row in rows:
        name = row["name"].replace("|", "\\|")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{name}` | {row['calls_per_step']:g} | {row['ms_per_step']:.3f} | {100 * row['share']:.1f}% |")
    return "\n".join(lines) + "\n"


def bench_training(model_config: ModelConfig, train_config: TrainConfig, steps: int, warmup: int,
                   profile: int = 0) -> dict[str, Any]:
    """Time ``steps`` pipeline training steps after ``warmup`` untimed ones (which pay
    for compilation) with ``train_config``'s batch size, device, precision and compile
    setting; with ``profile``, then record that many more steps with torch.profiler
    (:func:`profile_steps`). Dynamo is reset first, so each shape is compiled afresh
    for itself, as in a training job, and not as a dynamic-shape graph left over from
    the last shape."""
    torch._dynamo.reset()
    rt = Runtime.resolve(train_config.device, train_config.precision, train_config.threads)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    torch.manual_seed(0)
    vocab = model_config.vocab_size
    data = torch.randint(0, vocab, (SYNTHETIC_TOKENS,), dtype=torch.int32, device=rt.device)
    counts, relabel = token_counts_and_relabeler(data, vocab, train_config)
    model, optimizer, generator = new_training_parts(model_config, train_config, rt.device, counts)
    compiled = compile_decision(train_config.compile, rt.device.type)
    run_step = TrainingStep(model, compile_for_training(model, train_config, rt.device.type), optimizer, data,
                            generator, relabel, train_config, model_config.block_size, rt.amp)
    state = TrainState().on(rt.device)
    start = time.perf_counter()
    for step in range(warmup):
        run_step(state, step)
    _sync(rt.device)
    warmup_s = time.perf_counter() - start
    loss_before = state.loss_sum.clone()
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        run_step(state, step)
    mean_loss = (state.loss_sum - loss_before).item() / steps  # syncs, as the loop's log step does
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * train_config.batch_size * model_config.block_size / elapsed
    per_token = flops_per_token(model_config)
    peak = peak_flops_for(device_label(rt.device), rt.precision) if rt.device.type == "cuda" else None
    batch_tokens = train_config.batch_size * model_config.block_size
    result = {
        "batch_size": train_config.batch_size,
        "block_size": model_config.block_size,
        "compile": compile_mode_choice(train_config.compile_mode, rt.device.type, batch_tokens) if compiled else False,
        "loss_head": model.loss_head,
        "optimizer_fused": bool(optimizer.defaults.get("fused")),
        "precision": rt.precision,
        "relabel_probability": train_config.rare_relabel_probability,
        "steps_timed": steps,
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 3),
        "step_ms": round(1000 * elapsed / steps, 3),
        "train_tokens_per_s": round(tokens_per_s, 1),
        "mean_loss": round(mean_loss, 4),
        "diverged": int(state.first_bad_step.item()) >= 0,
        "flops_per_token": per_token,
        "peak_flops": None if peak is None else peak.flops,
        "peak_flops_device": None if peak is None else peak.device,
        "peak_flops_kind": None if peak is None else peak.kind,
        "mfu": None if peak is None else round(tokens_per_s * per_token / peak.flops, 4),
    }
    if rt.device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**20, 1)
    else:
        result["peak_memory_mb"] = _peak_rss_mb()
    if profile:
        result["profile_steps"] = profile
        result["profile"] = profile_steps(run_step, state, warmup + steps, profile, rt.device)
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
    report: dict[str, Any] = {"device": device_label(device), "torch": torch.__version__, "models": {}}
    on_gpu = device.type == "cuda"
    repo = Path(args.repo)
    for name in args.models:
        variant, config, configured = pipeline_settings(repo, name, args.variant)
        entry: dict[str, Any] = {"config_files": list(CONFIG_FILES[name]), "variant": variant,
                                 "config": asdict(config), "training": asdict(configured), "train": [], "eval": []}
        batches = args.batch_sizes or ([configured.batch_size, 64] if on_gpu else [configured.batch_size])
        compiles = {"auto": [configured.compile], "off": [False], "on": [True], "both": [False, True]}[args.compile]
        for precision in args.precision:
            for batch in batches:
                for compile_setting in compiles:
                    steps = args.steps or (200 if on_gpu else (3 if name == "default" else 50))
                    warmup = args.warmup if args.warmup is not None else (30 if on_gpu else 1)
                    own = {"compile_mode": args.compile_mode, "loss_head": args.loss_head}
                    train_config = replace(configured, batch_size=batch, device=args.device, precision=precision,
                                           compile=compile_setting, threads=args.threads,
                                           **{k: v for k, v in own.items() if v})
                    timing = bench_training(config, train_config, steps, warmup, PROFILE_STEPS if args.profile else 0)
                    entry["train"].append(timing)
                    if args.profile:
                        write_profile(Path(args.profile), name, variant, timing)
            eval_tokens = args.eval_tokens or (2_000_000 if on_gpu else (20_000 if name == "default" else 100_000))
            entry["eval"].append(bench_evaluation(config, 64 if on_gpu else 16, eval_tokens, device, precision))
        entry["geometry"] = bench_geometry(config, n_prompts=16, prompt_tokens=128)
        report["models"][name] = entry
    if args.e2e:
        report["quick_e2e"] = bench_quick_e2e(repo, args.e2e_cores)
    return report


def write_profile(folder: Path, model: str, variant: str, timing: dict[str, Any]) -> Path:
    """``<folder>/profile-<model>-<variant>-b<batch>-<compile>-<precision>.{json,md}``."""
    folder.mkdir(parents=True, exist_ok=True)
    compiled = timing["compile"] or "eager"
    stem = f"profile-{model}-{variant}-b{timing['batch_size']}-{compiled}-{timing['precision']}"
    title = (f"{model} model, {variant}, batch {timing['batch_size']} x {timing['block_size']}, {compiled}, "
             f"{timing['precision']}, {timing['loss_head']} head: {timing['step_ms']} ms/step; top kernels over "
             f"{timing['profile_steps']} profiled steps")
    atomic_write_text(folder / f"{stem}.json", json.dumps({"title": title, "rows": timing["profile"]}, indent=1))
    atomic_write_text(folder / f"{stem}.md", profile_markdown(timing["profile"], title))
    return folder / f"{stem}.md"


def schema_choices(key: str) -> list[str]:
    """The values the schema allows for training setting ``key``, for a flag's choices."""
    return list(key_specs("training")[key]["enum"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tga.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda[:N]")
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIG_FILES), default=["default", "quick"],
                        help="which configs' models to time: default = config/config.yaml, quick = that with "
                             "config/quick.yaml merged on top (default: both)")
    parser.add_argument("--variant", help="the variant whose settings are timed (default: each config's first); "
                                          f"also {', '.join(BENCH_VARIANTS)} (the benchmark's own, not a study's)")
    parser.add_argument("--batch-sizes", nargs="+", type=int,
                        help="training batch sizes (default: the config's, and 64 on GPU)")
    parser.add_argument("--compile", choices=["auto", "off", "on", "both"], default="auto",
                        help="auto: as the config says (its compile: auto compiles on CUDA only); "
                             "or time training without and/or with torch.compile")
    parser.add_argument("--compile-mode", default=None, choices=schema_choices("compile_mode"),
                        help="torch.compile mode (default: the config's, auto: CUDA graphs for batches up to "
                             "16,384 tokens on CUDA; reduce-overhead adds CUDA graphs)")
    parser.add_argument("--loss-head", default=None, choices=schema_choices("loss_head"),
                        help="training's output head and loss (default: the config's, auto: full on CUDA, "
                             "chunked elsewhere)")
    parser.add_argument("--profile", metavar="FOLDER",
                        help=f"also record {PROFILE_STEPS} steps per timing with torch.profiler and write the top "
                             "kernels to FOLDER/profile-*.md and .json")
    parser.add_argument("--precision", nargs="+", choices=["auto", "fp32", "bf16"], default=["auto"],
                        help="autocast precision(s) to time (auto: bf16 on CUDA GPUs with bf16, fp32 elsewhere)")
    parser.add_argument("--steps", type=int, help="timed training steps (default: 200 on GPU, few on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps")
    parser.add_argument("--eval-tokens", type=int, help="tokens scored by the evaluation timing")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--e2e", action="store_true", help="also time the quick config end to end via Snakemake")
    parser.add_argument("--e2e-cores", type=int, default=4, help="--cores for the end-to-end run")
    parser.add_argument("--repo", default=".", help="repository root holding config/ (and Snakefile, for --e2e)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
