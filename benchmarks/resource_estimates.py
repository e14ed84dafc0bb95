"""Estimated against measured peak memory (and time per step) of one training job.

    python benchmarks/resource_estimates.py --tokens-dir outputs/data/tokens \
        --config config/config.yaml [config/quick.yaml ...] [--variant standard-postln]

The configs are merged left to right, section by section, as Snakemake merges
``--configfile``; keys they leave out take the schema's defaults. The job trains the
variant for a few steps with the real ``train_model`` in a fresh process, on the token
files the workflow's tokenize step wrote (``train.bin``/``validation.bin``), and reads
that process's peak RSS from /proc. It prints one JSON line: tga/resources.py's
estimate (what the scheduler gets is this times MEMORY_SAFETY_FACTOR), the measured
peak, their ratio, and the estimated and measured seconds per training step.
"""

from __future__ import annotations

import argparse
import csv
import json
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


def main() -> None:
    from tga.model import ModelConfig
    from tga.resources import MB, estimate_training, job_device_type, scheduler_resources
    from tga.settings import merged_config, resolve_variant

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-dir", required=True, type=Path)
    parser.add_argument("--config", nargs="+", required=True, type=Path)
    parser.add_argument("--variant", default="standard-postln")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

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
