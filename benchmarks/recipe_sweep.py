"""Train one or more variants over a grid of recipe settings and report validation
and test perplexity as JSON lines: how the default recipe was chosen.

    python benchmarks/recipe_sweep.py --tokens-dir outputs/data/tokens/gpt2 \
        --variant standard-postln --grid '{"learning_rate": [5e-4, 1e-3], "dropout": [0.0, 0.1]}'

Token files come from the workflow's tokenize step (train/validation/test .bin).
Variants are the four defaults of config/config.yaml; settings not in the grid
keep the TrainConfig/ModelConfig defaults (which equal the schema's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

from tga.evaluate import evaluate_checkpoint
from tga.model import ModelConfig
from tga.train import TrainConfig, TrainingError, train_from_settings

VARIANTS = {
    "llama-preln": {"norm_position": "pre", "norm": "rmsnorm", "activation": "swiglu"},
    "llama-postln": {"norm_position": "post", "norm": "rmsnorm", "activation": "swiglu"},
    "standard-preln": {"norm_position": "pre", "norm": "rmsnorm", "activation": "gelu"},
    "standard-postln": {"norm_position": "post", "norm": "rmsnorm", "activation": "gelu"},
}


def settings_for(variant: str, overrides: dict) -> dict:
    model_keys = {f.name for f in fields(ModelConfig)} - {"vocab_size"}
    train_keys = {f.name for f in fields(TrainConfig)} - {"seed", "threads"}
    model = {k: v for k, v in asdict(ModelConfig()).items() if k in model_keys}
    training = {k: v for k, v in asdict(TrainConfig()).items() if k in train_keys}
    for key, value in {**VARIANTS[variant], **overrides}.items():
        (model if key in model_keys else training)[key] = value
    return {"model": model, "training": training}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-dir", required=True, type=Path)
    parser.add_argument("--variant", nargs="+", default=["standard-postln"], choices=sorted(VARIANTS))
    parser.add_argument("--grid", default="{}", help="JSON object: setting -> list of values")
    parser.add_argument("--fixed", default="{}", help="JSON object: settings applied to every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, help="keep checkpoints here (default: temporary)")
    args = parser.parse_args()
    grid = json.loads(args.grid)
    fixed = json.loads(args.fixed)
    keys = sorted(grid)
    for variant in args.variant:
        for values in itertools.product(*(grid[k] for k in keys)):
            overrides = {**fixed, **dict(zip(keys, values))}
            settings = settings_for(variant, overrides)
            with tempfile.TemporaryDirectory() as tmp:
                out = (args.out_dir / variant / "_".join(f"{k}={v}" for k, v in overrides.items())) if args.out_dir else Path(tmp)
                record = {"variant": variant, **overrides}
                start = time.perf_counter()
                try:
                    # with --out-dir a killed run continues from its last checkpoint step
                    resume = out.parent / f".{out.name}.resume" if args.out_dir else None
                    summary = train_from_settings(settings, args.seed, 0, args.tokens_dir / "train.bin",
                                                  args.tokens_dir / "validation.bin", out, variant, resume_dir=resume)
                    record["train_s"] = round(time.perf_counter() - start, 2)
                    record["val_ppl"] = round(summary["final_val_ppl"], 2)
                    test = evaluate_checkpoint(out / "final.pt", args.tokens_dir / "test.bin", out / "test.json",
                                               batch_size=64)
                    record["test_ppl"] = round(test["token_ppl"], 2)
                    record["test_bits_per_byte"] = round(test["bits_per_byte"], 4)
                except TrainingError as exc:
                    record["diverged"] = str(exc)
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
