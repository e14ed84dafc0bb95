"""Tokens per second of ``data.source: hf`` (tga/hf_corpus.py) with 1 and 2 processes.

    python benchmarks/hf_tokenize_speed.py [--copies 2] [--procs 1 2] [--shard-documents 8]

Writes a json-lines corpus of WikiText-2's validation and test articles (the offline
copies in ../shared/data/wikitext-2-raw, cut at their " = Title = " headings), repeated
``--copies`` times, then tokenizes it with GPT-2 (tiktoken) through
``prepare_hf_corpus`` into fresh folders, once per process count, and prints per run
the tokens, wall seconds, CPU seconds of this process and its children, tokens per wall
second, and whether the token files equal the first run's. Every run writes a fresh
folder (no shard is reused). The wall time includes opening the dataset with
``datasets``; the first run also pays its first import and its json -> Arrow
conversion, so list a process count twice (``--procs 1 1 2``) and read the later
runs. docs/corpora.md quotes a run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import tempfile
import time
from pathlib import Path

from tga.corpus import _article_starts
from tga.hf_corpus import prepare_hf_corpus
from tga.schema import key_specs
from tga.tokenizers import build_tokenizer

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"


def articles(path: Path) -> list[str]:
    raw = path.read_bytes()
    starts = [*_article_starts(raw), len(raw)]
    return [raw[a:b].decode("utf-8") for a, b in zip(starts, starts[1:])]


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-documents", type=int, default=8)
    args = parser.parse_args()
    docs = (articles(WIKI / "wiki.valid.raw") + articles(WIKI / "wiki.test.raw")) * args.copies
    tokenizer = build_tokenizer({"name": "gpt2"})
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "wiki.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        print(f"corpus: {len(docs)} documents, {corpus.stat().st_size:,} bytes of json lines")
        data = {key: spec.get("default") for key, spec in key_specs("data").items()}
        data.update(source="hf", dataset="json", data_files=str(corpus), validation_documents=5, test_documents=5,
                    shard_documents=args.shard_documents)
        first = None
        for run, procs in enumerate(args.procs):
            out = Path(tmp) / f"run{run}"
            wall, cpu = time.perf_counter(), cpu_seconds()
            meta = prepare_hf_corpus(data, tokenizer, out / "tokens", out / "corpus", num_proc=procs,
                                     show_progress=False)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            tokens = sum(s["n_tokens"] for s in meta["splits"].values())
            digest = hashlib.sha256(b"".join((out / "tokens" / f"{s}.bin").read_bytes()
                                             for s in ("train", "validation", "test"))).hexdigest()
            first = first or digest
            print(f"num_proc {procs}: {tokens:,} tokens, {wall:.2f} s wall, {cpu:.2f} CPU-s, "
                  f"{tokens / wall:,.0f} tokens/s, same bytes as the first run: {digest == first}")


if __name__ == "__main__":
    main()
