"""How much of a model's test loss is "could have been copied from the context"?

    python benchmarks/context_copy.py --tokens-dir outputs/data/tokens \
        --checkpoint outputs/models/standard-postln/seed0/final.pt [--windows 300]

Prints one JSON object. Everything is scored on the same non-overlapping windows of
``block_size`` tokens as ``tga.evaluate`` (context never crosses a window), against the
``test`` split, with token counts taken from the ``train`` split:

- ``kneser_ney_trigram``: an interpolated Kneser-Ney trigram (discount 0.75) estimated on
  the train split: the count-based model a small transformer should beat;
- for it and for each checkpoint, ``ppl_with_cache``: the perplexity after mixing in a
  unigram cache of the window so far, ``(1 - lam) * p + lam * count_in_window / t``
  (Kuhn & De Mori 1990; Grave et al. 2017). A large drop means the model does not
  copy tokens that already appeared in its context;
- ``buckets``: mean NLL by how often the target occurs in the train split, split into
  targets that already appear earlier in the window (``repeat``) and those that do not
  (``first``). A model that copies has a much lower ``repeat`` NLL for rare tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tga.data import load_token_file, non_overlapping_windows
from tga.model import load_checkpoint

CACHE_WEIGHTS = (0.05, 0.1, 0.2)
TRAIN_COUNT_BUCKETS = ((0, 0), (1, 2), (3, 10), (11, 100), (101, math.inf))


class KneserNeyTrigram:
    """Interpolated Kneser-Ney with one absolute discount; the lowest order is the
    continuation unigram interpolated with the uniform distribution, so every token of
    the vocabulary has non-zero probability and each conditional sums to one."""

    def __init__(self, tokens: list[int], vocab_size: int, discount: float = 0.75) -> None:
        self.vocab_size, self.discount = vocab_size, discount
        self.bigrams = Counter(zip(tokens, tokens[1:]))
        self.trigrams = Counter(zip(tokens, tokens[1:], tokens[2:]))
        self.unigram_continuation = Counter(b for _, b in self.bigrams)
        self.bigram_continuation = Counter((b, c) for _, b, c in self.trigrams)
        self.bigram_context, self.bigram_context_types = Counter(), Counter()
        for (b, _), n in self.bigram_continuation.items():
            self.bigram_context[b] += n
            self.bigram_context_types[b] += 1
        self.trigram_context, self.trigram_context_types = Counter(), Counter()
        for (a, b, _), n in self.trigrams.items():
            self.trigram_context[(a, b)] += n
            self.trigram_context_types[(a, b)] += 1

    def unigram(self, w: int) -> float:
        d, total = self.discount, len(self.bigrams)
        return (max(self.unigram_continuation[w] - d, 0.0) + d * len(self.unigram_continuation) / self.vocab_size) / total

    def bigram(self, b: int, w: int) -> float:
        n = self.bigram_context[b]
        if n == 0:
            return self.unigram(w)
        d = self.discount
        return (max(self.bigram_continuation[(b, w)] - d, 0.0) + d * self.bigram_context_types[b] * self.unigram(w)) / n

    def trigram(self, a: int | None, b: int, w: int) -> float:
        n = self.trigram_context[(a, b)] if a is not None else 0
        if n == 0:
            return self.bigram(b, w)
        d = self.discount
        return (max(self.trigrams[(a, b, w)] - d, 0.0) + d * self.trigram_context_types[(a, b)] * self.bigram(b, w)) / n

    def window_nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """NLL of each target given at most the two previous tokens of its window."""
        nll = torch.empty(y.shape, dtype=torch.float64)
        for i, (xs, ys) in enumerate(zip(x.tolist(), y.tolist())):
            for t, w in enumerate(ys):
                a = xs[t - 1] if t > 0 else None
                nll[i, t] = -math.log(self.trigram(a, xs[t], w))
        return nll


def window_cache_probability(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of the window's tokens so far (inputs up to t) that equal target t."""
    same = (x.unsqueeze(1) == y.unsqueeze(2)).tril()  # [window, target t, input s<=t]
    return same.sum(-1).double() / torch.arange(1, x.size(1) + 1, dtype=torch.float64)


def report(nll: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor, train_count: torch.Tensor) -> dict:
    probability = (-nll).exp()
    out = {"ppl": round(math.exp(nll[mask].mean().item()), 1), "ppl_with_cache": {}, "buckets": []}
    for lam in CACHE_WEIGHTS:
        mixed = (1 - lam) * probability + lam * cache
        out["ppl_with_cache"][str(lam)] = round(math.exp(-mixed[mask].log().mean().item()), 1)
    repeat = cache > 0
    for low, high in TRAIN_COUNT_BUCKETS:
        in_bucket = mask & (train_count >= low) & (train_count <= high)
        row = {"train_count": f"{low}-{high}" if high != math.inf else f">={low}",
               "share": round(in_bucket.double().mean().item(), 4)}
        for name, sel in (("repeat", in_bucket & repeat), ("first", in_bucket & ~repeat)):
            row[f"n_{name}"] = int(sel.sum())
            row[f"nll_{name}"] = round(nll[sel].mean().item(), 3) if sel.any() else None
        out["buckets"].append(row)
    return out


def model_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 16) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logits = model(x[i:i + batch]).logits.float()
            rows.append(F.cross_entropy(logits.transpose(1, 2), y[i:i + batch], reduction="none"))
    return torch.cat(rows).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens-dir", type=Path, required=True, help="folder with train.bin and test.bin")
    parser.add_argument("--checkpoint", type=Path, nargs="*", default=[])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--windows", type=int, default=0, help="score only the first N windows (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = np.asarray(load_token_file(args.tokens_dir / "train.bin"), dtype=np.int64)
    test = torch.from_numpy(np.asarray(load_token_file(args.tokens_dir / "test.bin"), dtype=np.int64))
    x, y, mask = non_overlapping_windows(test, args.block_size)
    if args.windows:
        x, y, mask = x[: args.windows], y[: args.windows], mask[: args.windows]
    models = {str(path): load_checkpoint(path)[0] for path in args.checkpoint}
    vocab_size = max([int(max(train.max(), test.max())) + 1] + [m.config.vocab_size for m in models.values()])
    train_count = torch.from_numpy(np.bincount(train, minlength=vocab_size))[y]
    cache = window_cache_probability(x, y)
    kn = KneserNeyTrigram(train.tolist(), vocab_size)
    result = {"tokens_dir": str(args.tokens_dir), "windows": len(x), "scored_tokens": int(mask.sum()),
              "kneser_ney_trigram": report(kn.window_nll(x, y), mask, cache, train_count), "checkpoints": {}}
    for name, model in models.items():
        result["checkpoints"][name] = report(model_nll(model, x, y), mask, cache, train_count)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
