"""Any text corpus through Hugging Face ``datasets`` (``data.source: hf``), tokenized
once, in parallel, into shards that a killed run keeps.

What it writes is what the WikiText-2 route writes, so training, evaluation and the
geometry read it unchanged: ``<tokens>/{split}.bin`` (raw little-endian ids) with its
``.json`` sidecar, ``<corpus>/{split}.txt`` (the split's documents, each followed by a
blank line, for the prompt check, the char vocabulary's tools and the pretrained
models' evaluation, which read text) and ``<corpus>/splits.json`` (which documents went
where, their tokens and bytes, and the dataset's id, configuration, revision, local
files' sha256 and ``datasets`` fingerprint where it has one).

* Splits: the corpus's own ``validation`` (or ``valid``/``dev``) and ``test`` splits
  when it has them (a ``data_files`` mapping makes such splits for local files); else
  the first ``validation_documents`` and then ``test_documents`` documents of
  ``dataset_split`` are held out, and training starts after them. The first documents,
  not random ones or the last: a stream reaches them without reading the whole corpus,
  and they are the same whether streamed or not and on every run.
* Shards: each split's documents are cut into shards of ``shard_documents`` documents
  (never by process count); shard k is ``<tokens>/shards/{split}/{k:06d}.bin/.txt/.json``.
  ``num_proc`` processes tokenize shards in parallel and the split's file is their
  ordered concatenation, so 1 and 4 processes give the same bytes. A shard whose
  sidecar names the same recipe (dataset, files, tokenizer, shard size, first document)
  and whose files match its sha256 is kept on the next run: a killed run resumes by
  shard. The shards stay after the run (a changed label or a rerun costs no
  re-tokenization); delete the folder to reclaim their space.
* Documents: each document's ids are followed by the tokenizer's ``eot_token`` (GPT-2's
  <|endoftext|>, as nanoGPT's OpenWebText preparation does); a tokenizer without one
  encodes the document with its blank-line separator instead.
* ``token_budget``: training takes whole documents, in order, until it holds at least
  that many tokens; shards past that point are not tokenized (beyond those already
  under way), and the count reached is recorded.

Torch-free; ``datasets`` is imported when a corpus is opened.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tga.atomic import atomic_write, atomic_write_bytes, atomic_write_many
from tga.corpus import CORPUS_METADATA, LOCAL_BUILDERS, DataError, local_data_files
from tga.data import (
    SPLITS,
    _DTYPES,
    _env_true,
    _hf_reachable,
    _sha256_bytes,
    sha256_file,
    token_bytes,
    token_dtype_name,
)
from tga.progress import progress

__all__ = [
    "DOCUMENT_SEPARATOR",
    "is_local_dataset",
    "offline_hint",
    "prepare_hf_corpus",
]

# A corpus's own held-out splits, by the names datasets' corpora give them.
OWN_SPLITS = {"validation": ("validation", "valid", "dev"), "test": ("test",)}
# What follows each document in the split's text (and its tokens, without an eot token).
DOCUMENT_SEPARATOR = "\n\n"
# Part of every shard's recipe: raise it when the shard layout changes, so no old shard is kept.
_SHARD_FORMAT = 1
_READ_BATCH = 1000


# --------------------------------------------------------------------------- the dataset


def is_local_dataset(dataset: str) -> bool:
    """Whether ``data.dataset`` reads local files (a packaged builder, or a folder or
    loading script on disk) rather than a hub repository."""
    return dataset in LOCAL_BUILDERS or Path(dataset).expanduser().exists()


def offline_hint(dataset: str, dataset_config: str | None) -> str:
    """How to run on a machine that cannot reach the hub: local copies through data_files."""
    name = dataset + (f" ({dataset_config})" if dataset_config else "")
    return (
        f"To use {name} without the hub, download its data files on a machine with network access (e.g. "
        f"`huggingface-cli download --repo-type dataset {dataset} --local-dir corpus/`), copy them here, and set "
        "`data.dataset: parquet` (or json / text, after the files' format) with `data.data_files` pointing at the "
        "local copies (a path, a glob such as corpus/sample/10BT/*.parquet, a list, or a mapping "
        "{train: ..., test: ...}); keep `data.text_column` naming the text column"
    )


def _file_records(data: Mapping[str, Any]) -> Any:
    """The local files' path, bytes and sha256 (what a rerun must match), or the
    ``data_files`` patterns as given for a hub dataset (files inside its repository)."""
    if not is_local_dataset(data["dataset"]):
        return data.get("data_files")
    return {
        split: [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]
        for split, files in local_data_files(data.get("data_files")).items()
    }


def _open_dataset(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Every split of the corpus, as ``datasets.load_dataset(dataset, dataset_config,
    data_files=..., revision=..., streaming=...)`` returns them. A hub dataset that
    cannot be reached gives one DataError saying how to use local copies instead."""
    dataset, config = data["dataset"], data.get("dataset_config")
    hub = not is_local_dataset(dataset)
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
    if hub and not offline:
        try:
            _hf_reachable(20.0)
        except OSError as e:
            raise DataError(f"data.dataset {dataset!r} is on the Hugging Face hub, which cannot be reached ({e}). "
                            f"{offline_hint(dataset, config)}") from None
    import datasets

    try:
        loaded = datasets.load_dataset(
            dataset, config, data_files=data.get("data_files"), revision=data.get("revision"),
            streaming=bool(data.get("streaming")),
        )
    except Exception as e:  # datasets raises many types: connection, missing builder, bad files
        if hub and (offline or isinstance(e, ConnectionError)):
            where = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline else "the hub is unreachable"
            raise DataError(f"data.dataset {dataset!r} could not be loaded: {where} and it is not in the datasets "
                            f"cache ({type(e).__name__}: {e}). {offline_hint(dataset, config)}") from None
        raise DataError(f"data.dataset {dataset!r}: datasets.load_dataset failed ({type(e).__name__}: {e}); check "
                        "data.dataset, data.dataset_config, data.data_files and data.revision") from None
    return loaded


def _texts(ds: Any, column: str, what: str) -> Iterator[str]:
    """The documents' texts of one split, in order, read in batches of one column."""
    names = getattr(ds, "column_names", None)
    if names is not None and column not in names:
        raise DataError(f"data.text_column {column!r} is not a column of {what}; its columns: {sorted(names)}")
    index = 0
    try:
        for batch in ds.select_columns([column]).iter(batch_size=_READ_BATCH):
            for text in batch[column]:
                if not isinstance(text, str):
                    raise DataError(f"document {index} of {what} has {type(text).__name__} in column "
                                    f"{column!r}, not text; set data.text_column to the text column")
                index += 1
                yield text
    except (KeyError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read column {column!r} of {what} ({type(e).__name__}: {e}); "
                        "set data.text_column to the text column") from None


def _plan(splits: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Where each tga split's documents come from: ``{"dataset_split", "first", "count",
    "held_out"}`` (``count`` None: to the end, or to the token budget)."""
    source = data["dataset_split"]
    if source not in splits:
        raise DataError(f"data.dataset_split {source!r} is not a split of data.dataset {data['dataset']!r}; "
                        f"its splits: {sorted(splits)}")
    plan: dict[str, dict[str, Any]] = {}
    held = 0
    for split, key in (("validation", "validation_documents"), ("test", "test_documents")):
        own = next((name for name in OWN_SPLITS[split] if name in splits and name != source), None)
        if own is not None:
            plan[split] = {"dataset_split": own, "first": 0, "count": None, "held_out": False}
        else:
            count = int(data[key])
            plan[split] = {"dataset_split": source, "first": held, "count": count, "held_out": True}
            held += count
    plan["train"] = {"dataset_split": source, "first": held, "count": None, "held_out": False}
    return plan


# --------------------------------------------------------------------------- shards


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    """A pool process's tokenizer (inherited, not pickled, where processes fork)."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _separator(tokenizer: Any) -> dict[str, Any]:
    eot = getattr(tokenizer, "eot_token", None)
    return {"eot_token": None if eot is None else int(eot), "text": DOCUMENT_SEPARATOR}


def _tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    identity = {"name": str(tokenizer.name), "vocab_size": int(tokenizer.vocab_size), **_separator(tokenizer)}
    to_dict = getattr(tokenizer, "to_dict", None)
    if callable(to_dict):
        identity["description"] = to_dict()
    return identity


def _shard_paths(stem: Path) -> dict[str, Path]:
    return {ext: stem.with_suffix(f".{ext}") for ext in ("bin", "txt", "json")}


def _write_shard(stem: Path, documents: Sequence[str], first: int, recipe: str, source: str) -> dict[str, Any]:
    """Tokenize one shard's documents (in a pool process or inline: the same code, so
    the bytes never depend on the process count) into its .bin, .txt and sidecar."""
    tokenizer = _WORKER_TOKENIZER
    eot = _separator(tokenizer)["eot_token"]
    ids: list[np.ndarray] = []
    doc_tokens: list[int] = []
    doc_bytes: list[int] = []
    doc_words: list[int] = []
    texts: list[bytes] = []
    for document in documents:
        with_separator = document + DOCUMENT_SEPARATOR
        encoded = np.asarray(tokenizer.encode(document if eot is not None else with_separator), dtype=np.int64)
        if eot is not None:
            encoded = np.append(encoded, np.int64(eot))
        raw = with_separator.encode("utf-8")
        ids.append(encoded)
        texts.append(raw)
        doc_tokens.append(int(encoded.size))
        doc_bytes.append(len(raw))
        doc_words.append(len(document.split()))
    payload = token_bytes(np.concatenate(ids) if ids else np.zeros(0, np.int64), tokenizer)
    text = b"".join(texts)
    meta = {
        "format": _SHARD_FORMAT,
        "recipe": recipe,
        "documents": [first, first + len(documents)],
        "dtype": token_dtype_name(tokenizer.vocab_size),
        "n_tokens": sum(doc_tokens),
        "vocab_size": int(tokenizer.vocab_size),
        "tokenizer": str(tokenizer.name),
        "source": source,
        "n_bytes": len(text),
        "n_words": sum(doc_words),
        "sha256": _sha256_bytes(payload),
        "text_sha256": _sha256_bytes(text),
        "separator": _separator(tokenizer),
        "document_tokens": doc_tokens,
        "document_bytes": doc_bytes,
        "document_words": doc_words,
    }
    paths = _shard_paths(stem)
    # The sidecar last: a shard is trusted only when its sidecar exists and matches.
    atomic_write_many({paths["bin"]: payload, paths["txt"]: text,
                       paths["json"]: (json.dumps(meta) + "\n").encode("utf-8")})
    return meta


def _finished_shard(stem: Path, recipe: str, first: int, n_documents: int) -> dict[str, Any] | None:
    """The sidecar of a shard an earlier run completed with this recipe and these
    documents, when its files are whole (sizes and sha256); else None (tokenize it)."""
    paths = _shard_paths(stem)
    try:
        meta = json.loads(paths["json"].read_text(encoding="utf-8"))
        if meta.get("recipe") != recipe or meta.get("documents") != [first, first + n_documents]:
            return None
        itemsize = _DTYPES[meta["dtype"]].itemsize
        if paths["bin"].stat().st_size != int(meta["n_tokens"]) * itemsize:
            return None
        if paths["txt"].stat().st_size != int(meta["n_bytes"]):
            return None
        if sha256_file(paths["bin"]) != meta["sha256"] or sha256_file(paths["txt"]) != meta["text_sha256"]:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _tokenize_split(
    documents: Iterable[str], stem_of: Callable[[int], Path], recipe: str, source: str, first: int,
    shard_documents: int, pool: Any, window: int, budget: int | None, bar: Any,
) -> list[dict[str, Any]]:
    """The sidecars of one split's shards, in order: kept from an earlier run or
    tokenized (at most ``window`` read ahead, for ``pool``'s processes), until the
    ordered shards hold ``budget`` tokens."""
    kept: list[dict[str, Any]] = []
    pending: deque[Any] = deque()
    held = 0

    def settle(block: bool) -> None:
        nonlocal held
        while pending and (block or len(pending) >= window or not hasattr(pending[0], "ready")
                           or pending[0].ready()):
            item = pending.popleft()
            meta = item.get() if hasattr(item, "ready") else item
            if budget is None or held < budget:  # shards past the budget (under way in parallel) are not used
                kept.append(meta)
                held += int(meta["n_tokens"])
                bar.set_postfix(tokens=f"{held:,}")
                bar.update(meta["documents"][1] - meta["documents"][0])

    for k, docs in enumerate(_chunks(documents, shard_documents)):
        if budget is not None and held >= budget:
            break
        start = first + k * shard_documents
        stem = stem_of(k)
        done = _finished_shard(stem, recipe, start, len(docs))
        if done is not None:
            pending.append(done)
        elif pool is None:
            pending.append(_write_shard(stem, docs, start, recipe, source))
        else:
            pending.append(pool.apply_async(_write_shard, (stem, docs, start, recipe, source)))
        settle(block=False)
    settle(block=True)
    return kept


# --------------------------------------------------------------------------- a split's files


def _budget_cut(metas: Sequence[dict[str, Any]], budget: int | None) -> list[int]:
    """How many documents of each shard the split keeps: all, or, with a budget, up to
    and including the document at which the tokens first reach it."""
    keep = [meta["documents"][1] - meta["documents"][0] for meta in metas]
    if budget is None:
        return keep
    held = 0
    for i, meta in enumerate(metas):
        for j, n in enumerate(meta["document_tokens"]):
            held += n
            if held >= budget:
                return keep[:i] + [j + 1]
    return keep


def _concatenate(parts: Sequence[tuple[Path, int]], out: Path) -> str:
    """Write the first ``n`` bytes of each file in ``parts`` to ``out`` (atomically) and
    return the result's sha256."""
    digest = hashlib.sha256()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for path, n in parts:
                with open(path, "rb") as src:
                    block = src.read(n)
                if len(block) != n:
                    raise DataError(f"shard {path} has {len(block)} bytes, expected at least {n}; delete it and rerun")
                digest.update(block)
                f.write(block)

    atomic_write(out, write)
    return digest.hexdigest()


def _write_split(
    split: str, metas: Sequence[dict[str, Any]], stems: Sequence[Path], budget: int | None,
    tokens_dir: Path, corpus_dir: Path,
) -> dict[str, Any]:
    """The split's token file, its text and their totals, from its shards in order."""
    keep = _budget_cut(metas, budget)
    token_parts, text_parts = [], []
    n_tokens = n_bytes = n_words = 0
    for meta, stem, n_docs in zip(metas, stems, keep):
        tokens = sum(meta["document_tokens"][:n_docs])
        size = sum(meta["document_bytes"][:n_docs])
        itemsize = _DTYPES[meta["dtype"]].itemsize
        token_parts.append((stem.with_suffix(".bin"), tokens * itemsize))
        text_parts.append((stem.with_suffix(".txt"), size))
        n_tokens, n_bytes, n_words = n_tokens + tokens, n_bytes + size, n_words + sum(meta["document_words"][:n_docs])
    text_path = corpus_dir / f"{split}.txt"
    return {
        "n_documents": sum(keep),
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_words": n_words,
        "shards": len(keep),
        "tokens_sha256": _concatenate(token_parts, tokens_dir / f"{split}.bin"),
        "sha256": _concatenate(text_parts, text_path),
        "text": str(text_path),
    }


# --------------------------------------------------------------------------- the whole corpus


def prepare_hf_corpus(
    data: Mapping[str, Any],
    tokenizer: Any,
    tokens_dir: str | os.PathLike[str],
    corpus_dir: str | os.PathLike[str],
    num_proc: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The config's ``data`` block (``source: hf``) -> ``<tokens_dir>/{split}.bin/.json``,
    ``<corpus_dir>/{split}.txt`` and ``<corpus_dir>/splits.json`` (see the module's
    docstring); returns the splits.json metadata. ``num_proc`` (default
    ``data.num_proc``) processes tokenize; the files do not depend on it. ``tokenizer``
    needs ``name``, ``vocab_size``, ``encode`` and optionally ``eot_token``."""
    tokens_dir, corpus_dir = Path(tokens_dir), Path(corpus_dir)
    num_proc = int(num_proc if num_proc is not None else data.get("num_proc", 1))
    if num_proc < 1:
        raise DataError(f"num_proc must be at least 1, got {num_proc}")
    shard_documents = int(data["shard_documents"])
    files = _file_records(data)
    # Processes fork before datasets starts Arrow's threads (a fork copies no thread, but
    # may copy a lock one of them held); where processes spawn, the tokenizer is pickled.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    _init_worker(tokenizer)
    pool = context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) if num_proc > 1 else None
    try:
        metadata = _prepare(data, tokenizer, tokens_dir, corpus_dir, num_proc, shard_documents, files, pool,
                            show_progress)
    except BaseException:
        if pool is not None:  # stop shards under way: a rerun redoes what has no sidecar
            pool.terminate()
            pool.join()
        raise
    if pool is not None:
        pool.close()
        pool.join()
    return metadata


def _prepare(
    data: Mapping[str, Any], tokenizer: Any, tokens_dir: Path, corpus_dir: Path, num_proc: int,
    shard_documents: int, files: Any, pool: Any, show_progress: bool,
) -> dict[str, Any]:
    """:func:`prepare_hf_corpus` once its processes run."""
    splits = _open_dataset(data)
    plan = _plan(splits, data)
    dataset = {key: data.get(key) for key in ("dataset", "dataset_config", "dataset_split", "revision", "text_column")}
    dataset["data_files"] = files
    dataset["fingerprints"] = {name: getattr(splits[name], "_fingerprint", None)
                               for name in sorted({p["dataset_split"] for p in plan.values()})}
    identity = _tokenizer_identity(tokenizer)

    origins: dict[str, dict[str, Any]] = {}
    for split in ("validation", "test", "train"):
        where = plan[split]
        name, first, count = where["dataset_split"], where["first"], where["count"]
        what = f"split {name!r} of {data['dataset']}" + (f" ({data['dataset_config']})" if data.get("dataset_config") else "")
        documents = itertools.islice(_texts(splits[name], data["text_column"], what), first,
                                     None if count is None else first + count)
        recipe = _sha256_bytes(json.dumps(
            {"format": _SHARD_FORMAT, "dataset": {k: v for k, v in dataset.items() if k != "fingerprints"},
             "read_split": name, "first": first, "shard_documents": shard_documents, "tokenizer": identity},
            sort_keys=True, default=str).encode("utf-8"))
        budget = data.get("token_budget") if split == "train" else None
        total = count if count is not None else (None if budget is not None else _length(splits[name], first))

        def stem_of(k: int, split: str = split) -> Path:
            return tokens_dir / "shards" / split / f"{k:06d}"

        for stale in (tokens_dir / "shards" / split).glob(".*.tmp"):  # left by a killed run's writers
            stale.unlink()

        with progress(total=total, desc=f"tokenizing {split}", unit="documents", enabled=show_progress) as bar:
            metas = _tokenize_split(documents, stem_of, recipe, f"{what}, from document {first}", first,
                                    shard_documents, pool, 2 * num_proc, budget, bar)
        info = _write_split(split, metas, [stem_of(k) for k in range(len(metas))], budget, tokens_dir, corpus_dir)
        _check_split(split, info, where, data)
        origins[split] = {"from": what, "dataset_split": name, "held_out": where["held_out"],
                          "documents": [first, first + info["n_documents"]], **info}
        if split == "train":
            origins[split]["token_budget"] = budget

    metadata = {"source": "hf", "dataset": dataset, "tokenizer": {k: identity[k] for k in ("name", "vocab_size")},
                "separator": _separator(tokenizer), "shard_documents": shard_documents,
                "token_budget": data.get("token_budget"), "splits": {s: origins[s] for s in SPLITS}}
    for split in SPLITS:
        info = origins[split]
        sidecar = {
            "dtype": token_dtype_name(tokenizer.vocab_size), "n_tokens": info["n_tokens"],
            "vocab_size": int(tokenizer.vocab_size), "tokenizer": str(tokenizer.name), "source": info["text"],
            "n_bytes": info["n_bytes"], "n_words": info["n_words"], "sha256": info["tokens_sha256"],
            "separator": _separator(tokenizer), "origin": info,
        }
        atomic_write_bytes(tokens_dir / f"{split}.json", (json.dumps(sidecar, indent=1) + "\n").encode("utf-8"))
    atomic_write_bytes(corpus_dir / CORPUS_METADATA, (json.dumps(metadata, indent=1) + "\n").encode("utf-8"))
    return metadata


def _length(ds: Any, first: int) -> int | None:
    """Documents from ``first`` on, where the dataset knows its length (not streamed)."""
    try:
        return max(0, len(ds) - first)
    except TypeError:
        return None


def _check_split(split: str, info: Mapping[str, Any], where: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """One DataError when a split came out short: held-out documents the corpus lacks,
    or too few tokens to predict anything."""
    if where["held_out"] and info["n_documents"] < where["count"]:
        raise DataError(
            f"data.dataset_split {where['dataset_split']!r} has only {where['first'] + info['n_documents']} documents, "
            f"too few to hold out {split} documents {where['first']}..{where['first'] + where['count'] - 1} "
            f"(data.validation_documents + data.test_documents = {data['validation_documents'] + data['test_documents']}) "
            "and train on the rest; lower them or use a larger corpus"
        )
    if info["n_tokens"] < 2:
        key = "data.validation_documents and data.test_documents" if split == "train" else f"data.{split}_documents"
        raise DataError(f"the {split} split of data.dataset {data['dataset']!r} holds {info['n_tokens']} tokens "
                        f"({info['n_documents']} documents); at least 2 are needed: check {key}")
