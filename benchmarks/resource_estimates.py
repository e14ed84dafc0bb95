"""Estimated against measured peak memory (and time per step) of one training job;
or, with ``--recipe``, the estimates alone of a large recipe's jobs, as a table.

    python benchmarks/resource_estimates.py --tokens-dir outputs/data/tokens \
        --config config/config.yaml [config/quick.yaml ...] [--variant standard-postln]
    python benchmarks/resource_estimates.py --recipe config/config.yaml \
        config/recipes/gpt2-small.yaml [--gpus 1 8] [--gpu-memory-gb 80]

The configs are merged left to right, section by section, as Snakemake merges
``--configfile``; keys they leave out take the schema's defaults. The job trains the
variant for a few steps with the real ``train_model`` in a fresh process, on the token
files the workflow's tokenize step wrote (``train.bin``/``validation.bin``), and reads
that process's peak RSS from /proc. It prints one JSON line: tga/resources.py's
estimate (what the scheduler gets is this times MEMORY_SAFETY_FACTOR), the measured
peak, their ratio, and the estimated and measured seconds per training step.

``--recipe`` trains nothing: for each variant of the merged configs and each number of
GPUs per training job it prints tga/resources.py's memory per GPU (and its largest
parts), the host memory the scheduler is asked for, the accumulation steps, seconds per
optimizer step, tokens/s and hours per run, then the evaluation and geometry jobs on a
GPU, as a Markdown table (docs/recipe.md shows it). Times rest on the throughput that
tga/resources.py assumes (CUDA_MFU of the H100/H200 peak), which the header states.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path


STEPS = 4


def _child(spec: dict) -> None:
    """In the fresh process: train, then print the peak and the RSS before training."""
    from tga.resources import process_memory_bytes
    from tga.train import train_from_settings

    Path("/proc/self/clear_refs").write_text("5")  # the peak of this process only
    base = process_memory_bytes("VmRSS")
    train_from_settings(spec["settings"], 0, spec["threads"], Path(spec["train"]), Path(spec["validation"]),
                        Path(spec["out"]), "benchmark")
    print(json.dumps({"peak": process_memory_bytes("VmHWM"), "base": base}))


def _resolved_for_estimates(config: dict, variant: str) -> tuple[dict, int]:
    """A variant's settings, the schema's defaults under them, and its evolution's
    number of stages (init and every kept checkpoint)."""
    from tga.evolution import evolution_stages
    from tga.schema import defaults
    from tga.settings import resolve_variant

    for section in ("model", "training"):
        config[section] = {**defaults(section), **config.get(section, {})}
    settings = resolve_variant(config, variant)
    stages = len(evolution_stages(settings["training"], "."))
    # keys that resolve_variant does not know yet on a branch without them (issue 23's
    # training.micro_batch_size) are taken from the config as written
    for key, value in config["training"].items():
        settings["training"].setdefault(key, value)
    return settings, stages


def recipe_table(paths: list[Path], gpus: list[int], gpu_memory: int) -> str:
    """The Markdown table of ``--recipe`` (see the module's docstring)."""
    import datetime
    import platform

    from tga.model import ModelConfig
    from tga.resources import (CUDA_MFU, CUDA_PEAK_FLOPS, GB, _corpus_tokens, _prompt_shape, _test_tokens,
                               cuda_flops, estimate_evaluation, estimate_geometry, estimate_training,
                               scheduler_resources, vocab_size_for)
    from tga.settings import merged_config

    config = merged_config(paths)
    n_tokens = _corpus_tokens(config)
    seeds = len(config.get("seeds", [0, 1, 2]))
    geometry = config.get("geometry", {})
    longest, n_prompts = _prompt_shape(geometry.get("prompts", "config/prompts.txt"))
    lines = [
        f"Estimates of `{' + '.join(str(p) for p in paths)}` by tga/resources.py, printed by "
        f"`python benchmarks/resource_estimates.py --recipe {' '.join(str(p) for p in paths)}"
        f"{' --gpus ' + ' '.join(map(str, gpus))} --gpu-memory-gb {gpu_memory // GB}` on "
        f"{datetime.date.today()} ({platform.node() or 'this machine'}, {platform.machine()}; computed, not "
        f"measured). Time at {CUDA_MFU:.1%} MFU of {CUDA_PEAK_FLOPS['bf16'] / 1e12:.1f} TFLOP/s (bf16, H100/H200 "
        f"SXM) = {cuda_flops('bf16') / 1e12:.0f} TFLOP/s per GPU; the head resolved for a {gpu_memory // GB} GB GPU; "
        f"{n_tokens:,} tokens of training and validation data; {seeds} seeds.",
        "",
        "| variants | job | GPUs per job | memory per GPU | largest parts (GB) | host `mem_mb` | forwards per step "
        "| s per step | tokens/s per job | hours per job | hours x GPUs per variant, all seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[str, list[str]] = {}  # row without its variant -> the variants it holds for
    train_hours: dict[int, float] = {world: 0.0 for world in gpus}  # summed over the study's training jobs
    for variant in config["variants"]:
        settings, stages = _resolved_for_estimates(config, variant)
        model = ModelConfig.from_dict({**settings["model"], "vocab_size": vocab_size_for(config)})
        training = settings["training"]
        for world in gpus:
            train = estimate_training(model, training, "cuda", n_tokens, world_size=world, device_memory=gpu_memory)
            hours = train.seconds / 3600
            train_hours[world] += hours * seeds
            rows.setdefault(
                f"| train | {world} | {train.device_bytes / GB:.1f} GB | {_largest(train)} | "
                f"{scheduler_resources(train)['mem_mb']:,} | {train.accumulation} | {train.seconds_per_step:.2f} | "
                f"{train.tokens_per_second:,.0f} | {hours:.2f} | {hours * world * seeds:.1f} |", []).append(variant)
        evaluation = estimate_evaluation(model, int(config.get("evaluation", {}).get("batch_size", 16)), "cuda",
                                         _test_tokens(config, n_tokens))
        batch = int(geometry.get("batch_size", 1) or 1)
        for job, estimate in (("evaluate", evaluation),
                              ("geometry", estimate_geometry(model, longest, n_prompts, 2, "cuda", batch_size=batch)),
                              ("evolution", estimate_geometry(model, longest, n_prompts, stages, "cuda", "evolution",
                                                              batch_size=batch))):
            hours = estimate.seconds / 3600
            rows.setdefault(f"| {job} | 1 | {estimate.device_bytes / GB:.1f} GB | {_largest(estimate)} | "
                            f"{scheduler_resources(estimate)['mem_mb']:,} | | | | {hours:.2f} | {hours * seeds:.1f} |",
                            []).append(variant)
    lines += [f"| {', '.join(variants)} {row}" for row, variants in rows.items()]
    n_jobs = len(config["variants"]) * seeds
    lines += ["", f"Training, all {n_jobs} runs, on one node with 8 GPUs: " + "; ".join(
        f"{train_hours[w] * w:.1f} GPU-hours, about {train_hours[w] / n_jobs * math.ceil(n_jobs / (8 // w)):.1f} h "
        f"wall with {w} GPU{'s' if w > 1 else ''} per job ({8 // w} at a time)" for w in gpus if w <= 8) + "."]
    return "\n".join(lines)


def _largest(estimate) -> str:
    from tga.resources import GB

    parts = sorted(((k, v) for k, v in estimate.parts.items() if k != "process" and v), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{name} {value / GB:.1f}" for name, value in parts)


def main() -> None:
    from tga.model import ModelConfig
    from tga.resources import MB, estimate_training, job_device_type, scheduler_resources
    from tga.settings import merged_config, resolve_variant

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-dir", type=Path)
    parser.add_argument("--config", nargs="+", type=Path)
    parser.add_argument("--variant", default="standard-postln")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipe", nargs="+", type=Path, metavar="CONFIG",
                        help="print the estimates of these merged configs' jobs as a table; trains nothing")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 8], help="with --recipe: GPUs per training job")
    parser.add_argument("--gpu-memory-gb", type=int, default=80,
                        help="with --recipe: the GPU's memory, for resolving loss_head: auto")
    args = parser.parse_args()
    if args.recipe:
        missing = [str(p) for p in args.recipe if not p.is_file()]
        if missing:
            sys.exit(f"resource_estimates: --recipe {' '.join(missing)}: not a file (give config files)")
        print(recipe_table(args.recipe, args.gpus, args.gpu_memory_gb * 2**30))
        return
    if args.tokens_dir is None or not args.config:
        sys.exit("resource_estimates: give --tokens-dir and --config (a measured run), or --recipe CONFIG ...")

    for path in [*args.config, *(args.tokens_dir / f"{split}.{ext}" for split in ("train", "validation")
                                 for ext in ("bin", "json"))]:
        if not path.is_file():
            sys.exit(f"resource_estimates: {path} is not a file (give the workflow's outputs/data/tokens folder "
                     "and existing config files)")
    config = merged_config(args.config)
    config.setdefault("variants", {}).setdefault(args.variant, {})
    settings = resolve_variant(config, args.variant)
    training = settings["training"]
    configured = dict(training)
    training.update(max_steps=STEPS, eval_interval=STEPS, checkpoint_interval=STEPS, warmup_steps=1)
    meta = {split: json.loads((args.tokens_dir / f"{split}.json").read_text()) for split in ("train", "validation")}
    model = ModelConfig.from_dict({**settings["model"], "vocab_size": meta["train"]["vocab_size"]})
    training["device"] = device = job_device_type(str(training.get("device", "auto")))
    n_tokens = sum(m["n_tokens"] for m in meta.values())
    estimate = estimate_training(model, training, device, n_tokens, args.threads)
    # time of a training step alone, as the log's throughput measures it (no evaluations)
    step_only = estimate_training(model, {**configured, "device": device, "eval_batches": 0}, device, n_tokens,
                                  args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        spec = {"settings": settings, "threads": args.threads, "out": str(Path(tmp) / "run"),
                "train": str(args.tokens_dir / "train.bin"), "validation": str(args.tokens_dir / "validation.bin")}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        # the log's last row: training throughput since the previous row, evaluations excluded
        last = list(csv.DictReader(open(Path(tmp) / "run" / "train_log.csv")))[-1]
    tokens_per_step = int(training["batch_size"]) * model.block_size
    print(json.dumps({
        "configs": [str(p) for p in args.config], "variant": args.variant, "device": device,
        "precision": estimate.precision, "threads": args.threads, "vocab_size": model.vocab_size,
        "estimated_peak_mb": round(estimate.host_bytes / MB), "measured_peak_mb": round(measured["peak"] / MB),
        "ratio": round(estimate.host_bytes / measured["peak"], 2),
        "scheduler_mem_mb": scheduler_resources(estimate)["mem_mb"],
        "estimated_parts_mb": {k: round(v / MB) for k, v in estimate.parts.items()},
        "estimated_s_per_step": round(step_only.seconds_per_step, 3),
        "measured_s_per_step": round(tokens_per_step / float(last["tokens_per_s"]), 3),
    }))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
    else:
        main()
