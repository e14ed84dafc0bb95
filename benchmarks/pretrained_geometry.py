"""Time and peak memory of the geometry of a GPT-2-small-sized pretrained entry on CPU.

    python benchmarks/pretrained_geometry.py --gpt2-files ../shared/data/gpt2 \
        [--prompts config/prompts.txt] [--train-text resources/wikitext-2-sample/train.txt] [--threads 2]

No hub access is needed: the model is ``GPT2Config()`` (124M parameters) with random
weights, saved with GPT-2's tokenizer (built from ``encoder.json``/``vocab.bpe``) into
a temporary folder, which a ``pretrained:`` entry then names, as a user's local folder
would be. The job is the workflow's: :func:`tga.pretrained.analyze_pretrained`, in a
fresh process, whose peak RSS is read from /proc. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = {"heatmap_layers": [0, 6, -1], "exclude_first_token": False, "knn_k": 10}


def _child(spec: dict) -> None:
    import torch

    from tga.pretrained import analyze_pretrained
    from tga.resources import process_memory_bytes

    start = time.perf_counter()
    analyze_pretrained({"model": spec["model"], "dtype": "float32", "device": "cpu"}, "gpt2-small-random",
                       {"trained": None}, spec["prompts"], spec["out"], GEOMETRY, train_text=spec["train_text"],
                       threads=spec["threads"])
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_bytes": process_memory_bytes("VmHWM"),
                      "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt2-files", required=True, type=Path, help="folder with encoder.json and vocab.bpe")
    parser.add_argument("--prompts", type=Path, default=ROOT / "config" / "prompts.txt")
    parser.add_argument("--train-text", type=Path, default=ROOT / "resources" / "wikitext-2-sample" / "train.txt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import pandas as pd
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small-random"
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        transformers.GPT2Tokenizer(vocab=str(args.gpt2_files / "encoder.json"),
                                   merges=str(args.gpt2_files / "vocab.bpe")).save_pretrained(folder)
        del model
        spec = {"model": str(folder), "prompts": str(args.prompts), "out": str(Path(tmp) / "geometry"),
                "train_text": str(args.train_text), "threads": args.threads}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        n_tokens = pd.read_csv(Path(tmp) / "geometry" / "prompts.csv")["n_tokens_input"].tolist()
    print(json.dumps({
        "model": "GPT2Config() random weights", "parameters": n_params, "dtype": "float32",
        "threads": measured["threads"], "prompts": len(n_tokens), "prompt_tokens": sum(n_tokens),
        "longest_prompt": max(n_tokens, default=0), "seconds": round(measured["seconds"], 1),
        "peak_rss_gb": round(measured["peak_bytes"] / 2**30, 2),
    }))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
    else:
        main()
