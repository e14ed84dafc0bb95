"""Watch a Post-LN run fall onto (or stay off) the unigram plateau: JSON lines with the
training and validation loss and the mean pairwise cosine between tokens at every depth.

    python benchmarks/postln_plateau.py --tokens-dir outputs/data/tokens \
        --fixed '{"n_embd": 192, "learning_rate": 2e-3, "precision": "bf16"}' --steps 300

Each run is made with and without ``unigram_bias`` (or only as given in --fixed). The
schedule is that of a ``max_steps`` run (default 1000) cut after --steps, so the first
steps match the full recipe's. A mean cosine near 1 from some block on means the
stream has collapsed to one direction there (rank 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tga.data import read_token_metadata, sample_batch
from tga.device import autocast_context, resolve_device
from tga.metrics import mean_pairwise_cosine
from tga.model import ModelConfig, Transformer
from tga.train import TrainConfig, learning_rate_at, load_tokens_to_device, make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).parent))
from recipe_sweep import settings_for  # noqa: E402


def run(settings: dict, train: torch.Tensor, val: torch.Tensor, vocab_size: int, steps: int, every: int,
        label: dict) -> None:
    model_config = ModelConfig(**settings["model"], vocab_size=vocab_size)
    train_config = TrainConfig(**settings["training"])
    device = resolve_device(train_config.device)
    torch.manual_seed(train_config.seed)
    model = Transformer(model_config).to(device)
    model.init_logit_bias(torch.bincount(train.long(), minlength=model_config.vocab_size))
    optimizer = make_optimizer(model, train_config, device)
    amp = autocast_context(device, train_config.precision)
    generator = torch.Generator(device=device).manual_seed(train_config.seed + 1)
    probe = sample_batch(val, train_config.batch_size, model_config.block_size,
                         torch.Generator(device=device).manual_seed(7))
    start, losses = time.perf_counter(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, train_config)
        x, y = sample_batch(train, train_config.batch_size, model_config.block_size, generator)
        losses.append(train_step(model, model, optimizer, x, y, amp, train_config.grad_clip))
        if (step + 1) % every == 0:
            model.eval()
            with torch.inference_mode(), amp:
                out = model(*probe, return_hidden_states=True)
            cosines = [round(float(mean_pairwise_cosine(h[:, ::4].float()).mean()), 3) for h in out.hidden_states]
            model.train()
            print(json.dumps({**label, "step": step + 1,
                              "train_loss": round(float(torch.stack(losses).mean()), 3),
                              "val_loss": round(float(out.loss), 3), "mean_cosine_by_depth": cosines,
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
            losses = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-dir", required=True, type=Path, help="holds train.bin and validation.bin")
    parser.add_argument("--variant", default="standard-postln")
    parser.add_argument("--fixed", default="{}", help="JSON object: settings applied to every run")
    parser.add_argument("--steps", type=int, default=300, help="steps to run of the max_steps schedule")
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    fixed = json.loads(args.fixed)
    bias_values = [fixed.pop("unigram_bias")] if "unigram_bias" in fixed else [False, True]
    device = resolve_device(settings_for(args.variant, fixed)["training"]["device"])
    train = load_tokens_to_device(args.tokens_dir / "train.bin", device)
    val = load_tokens_to_device(args.tokens_dir / "validation.bin", device)
    vocab_size = read_token_metadata(args.tokens_dir / "train.bin")["vocab_size"]
    for bias in bias_values:
        settings = settings_for(args.variant, {**fixed, "unigram_bias": bias})
        run(settings, train, val, vocab_size, args.steps, args.every, {"variant": args.variant, "unigram_bias": bias, **fixed})


if __name__ == "__main__":
    sys.exit(main())
