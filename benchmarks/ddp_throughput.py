"""Training tokens/s of one process against N DDP processes, through the workflow's launcher.

    python benchmarks/ddp_throughput.py [--processes 2] [--steps 40] [--device cpu]

Both runs train the same small model on WikiText-2's validation text (character
tokenizer) with the same global batch and seed, through
``tga.distributed.launch_training``: the 1-process run trains in place, the N-process
run starts ``torchrun --standalone`` (gloo on CPU, NCCL on CUDA) exactly as the train
rule does with ``resources.train_gpus: N``. The job's threads (``--threads``) are split
among the processes, as in the workflow. Prints one JSON object: tokens/s of the last
logged interval (validation excluded; ``train_log.csv``'s ``tokens_per_s``), wall and
CPU seconds of each run (children included), and the largest difference between the
two runs' logged losses.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from tga.data import tokenize_to_file
from tga.distributed import launch_training
from tga.tokenizers import CharTokenizer

WIKITEXT = Path(os.environ.get("TGA_WIKITEXT_DIR", "/work/shared/data/wikitext-2-raw"))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "train_log.csv") as handle:
        return list(csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="the job's CPU threads, split among its processes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="tga-ddp-bench-"))
    text = (WIKITEXT / "wiki.valid.raw").read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    (folder / "train.txt").write_text(text, encoding="utf-8")
    (folder / "valid.txt").write_text(text[:50_000], encoding="utf-8")
    tokenize_to_file(folder / "train.txt", tokenizer, folder / "train.bin")
    tokenize_to_file(folder / "valid.txt", tokenizer, folder / "valid.bin")
    settings = {
        "model": {"block_size": args.block_size, "n_layer": 2, "n_head": 4, "n_embd": 128, "dropout": 0.0},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "warmup_steps": 5,
                     "eval_interval": args.steps // 2, "eval_batches": 2, "checkpoint_spacing": "linear",
                     "checkpoint_interval": args.steps, "device": args.device, "compile": False},
    }
    result: dict[str, object] = {"model": settings["model"], "batch_size": args.batch_size, "steps": args.steps,
                                 "threads": args.threads, "device": args.device}
    runs = {}
    for processes in (1, args.processes):
        run_dir = folder / f"p{processes}"
        job = dict(settings=settings, seed=0, threads=args.threads, train_tokens=folder / "train.bin",
                   val_tokens=folder / "valid.bin", out_dir=run_dir, run_name=f"p{processes}", show_progress=False)
        cpu, wall = cpu_seconds(), time.perf_counter()
        launch_training(job, gpus_per_node=processes)
        rows = log_rows(run_dir)
        runs[processes] = rows
        result[f"{processes}_process"] = {"tokens_per_s": float(rows[-1]["tokens_per_s"]),
                                          "wall_s": round(time.perf_counter() - wall, 2),
                                          "cpu_s": round(cpu_seconds() - cpu, 2)}
    result["max_logged_loss_difference"] = max(
        abs(float(a[k]) - float(b[k])) for a, b in zip(runs[1], runs[args.processes])
        for k in ("train_loss", "val_loss") if a[k])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
