"""Corpus download, token files and batches.

* ``download_wikitext2`` / ``copy_text_splits`` put ``train.txt``, ``validation.txt``
  and ``test.txt`` (UTF-8) in a folder, verified and written atomically;
  ``prepare_corpus`` does so from the config's ``data`` block, holds a validation
  split out of the training text if asked (tga/corpus.py), and writes ``splits.json``
  saying where each split came from.
* ``tokenize_to_file`` encodes one split once into a raw ``uint16``/``uint32`` file
  plus a sidecar JSON (docs/design.md); ``load_token_file`` memory-maps it back.
  ``token_dtype_name``/``token_bytes`` are the one rule for ids on disk, shared with
  the sharded tokenization of ``data.source: hf`` corpora (tga/hf_corpus.py).
  ``cached_token_files`` keeps such files in a folder and reuses them while they are
  current (the command line's cache; the workflow leaves that to Snakemake).
* ``sample_batch`` draws random training windows on the tokens'
  device; ``non_overlapping_windows`` tiles a split so every token after the first
  is scored exactly once in evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tga.atomic import atomic_write_many
from tga.corpus import BOTH_VALIDATIONS, CORPUS_METADATA, DataError, holdout_split

if TYPE_CHECKING:  # torch is imported where batches are built: tokenizing and the corpus
    import torch  # need none of it, and its import is about 1 CPU-second per job

__all__ = [
    "CORPUS_METADATA",
    "DataError",
    "SPLITS",
    "WIKITEXT2_MEMBER_SHA256",
    "WIKITEXT2_URLS",
    "WIKITEXT2_ZIP_SHA256",
    "cached_token_files",
    "copy_text_splits",
    "corpus_origin",
    "download_wikitext2",
    "load_token_file",
    "non_overlapping_windows",
    "prepare_corpus",
    "read_token_metadata",
    "sample_batch",
    "token_bytes",
    "token_dtype_name",
    "token_file_is_current",
    "tokenize_to_file",
    "tokens_to_tensor",
]

SPLITS = ("train", "validation", "test")

WIKITEXT2_URLS = (
    "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
)
WIKITEXT2_ZIP_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
WIKITEXT2_ZIP_BYTES = 4_721_645
# Members of the original zip, by split; the HF copy is rebuilt and checked against these.
WIKITEXT2_MEMBERS = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
WIKITEXT2_MEMBER_SHA256: dict[str, str | None] = {
    "train": "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57",
    "validation": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    "test": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
}
HF_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")  # the canonical id of "wikitext"
HF_SPLITS = {"train": "train", "validation": "validation", "test": "test"}

_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
_TOKEN_META_KEYS = ("dtype", "n_tokens", "vocab_size", "tokenizer", "source", "n_bytes", "n_words", "sha256")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


# --------------------------------------------------------------------------- helpers


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_split_bytes(data: bytes, what: str) -> None:
    if not data.strip():
        raise DataError(f"{what} is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not valid UTF-8 ({e})") from None


# --------------------------------------------------------------------------- download


def _supply_hint() -> str:
    return (
        "Supply the files yourself instead: either set `data.source: text` with "
        "`data.train`, `data.validation` and `data.test` paths to UTF-8 text files in the config, "
        f"or download wikitext-2-raw-v1.zip ({WIKITEXT2_ZIP_BYTES:,} bytes, sha256 {WIKITEXT2_ZIP_SHA256}) "
        f"from {WIKITEXT2_URLS[0]} on a machine with network access and set `data.archive` to its path."
    )


def _verify_splits(texts: Mapping[str, bytes], member_sha256: Mapping[str, str | None], origin: str) -> None:
    for split in SPLITS:
        what = f"{split} split ({WIKITEXT2_MEMBERS[split]}) from {origin}"
        _check_split_bytes(texts[split], what)
        expected = member_sha256.get(split)
        if expected is not None:
            got = _sha256_bytes(texts[split])
            if got != expected:
                raise DataError(f"{what} has sha256 {got}, expected {expected} (the original raw file)")


def _splits_from_zip(
    path: Path, zip_sha256: str | None, member_sha256: Mapping[str, str | None]
) -> dict[str, bytes]:
    """Verify the archive, then read ``wiki.{train,valid,test}.raw`` from it."""
    if not path.is_file():
        raise DataError(f"WikiText-2 archive not found: {path}")
    if zip_sha256 is not None:
        got = sha256_file(path)
        if got != zip_sha256:
            raise DataError(
                f"WikiText-2 archive {path} has sha256 {got}, expected {zip_sha256}: "
                "it is corrupt, truncated or a different file; download it again"
            )
    try:
        with zipfile.ZipFile(path) as zf:
            by_base = {Path(n).name: n for n in zf.namelist() if not n.endswith("/")}
            texts: dict[str, bytes] = {}
            for split, member in WIKITEXT2_MEMBERS.items():
                if member not in by_base:
                    raise DataError(f"WikiText-2 archive {path} has no member {member}")
                texts[split] = zf.read(by_base[member])
    except zipfile.BadZipFile as e:
        raise DataError(f"WikiText-2 archive {path} is not a valid zip file ({e}); download it again") from None
    _verify_splits(texts, member_sha256, f"archive {path}")
    return texts


def _download(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` to ``dest`` (the caller removes it), refusing absurd sizes."""
    req = urllib.request.Request(url, headers={"User-Agent": "tga (token geometry analyzer)"})
    n = 0
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as f:
        while True:
            block = resp.read(1 << 20)
            if not block:
                break
            n += len(block)
            if n > _MAX_DOWNLOAD_BYTES:
                raise DataError(f"{url} sent more than {_MAX_DOWNLOAD_BYTES} bytes; not the WikiText-2 archive")
            f.write(block)
    if n == 0:
        raise DataError(f"{url} sent an empty response")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _proxy_configured() -> bool:
    names = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    return any(os.environ.get(v) for v in names)


def _hf_reachable(timeout: float) -> None:
    """Raise quickly when the hub cannot be reached: ``load_dataset`` itself retries
    for ~25 s before giving up, which would make every offline run slow. Behind a
    proxy a direct connection proves nothing, so no probe is made there."""
    if _proxy_configured():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or "huggingface.co"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            pass
    except OSError as e:
        raise OSError(f"cannot reach {host}:{port} ({e})") from None


def _splits_from_hf(member_sha256: Mapping[str, str | None], timeout: float, offline: bool = False) -> dict[str, bytes]:
    """WikiText-2 raw from the HF hub, rebuilt to equal the original raw files.

    HF rows are the raw file's lines with their trailing newline, except that blank
    lines (always " \\n" in WikiText) are stored as "": restore them and join.
    ``offline`` (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set): no reachability probe, and
    ``datasets`` itself, in its offline mode, loads the dataset from its own cache or fails
    at once.
    """
    if not offline:
        _hf_reachable(timeout)
    import datasets

    ds = datasets.load_dataset(*HF_DATASET)
    texts: dict[str, bytes] = {}
    for split, hf_split in HF_SPLITS.items():
        rows = ds[hf_split]["text"]
        texts[split] = "".join(row if row else " \n" for row in rows).encode("utf-8")
    _verify_splits(texts, member_sha256, f"Hugging Face dataset {'/'.join(HF_DATASET)}")
    return texts


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"


def _wikitext2_splits(
    scratch: Path,
    archive: Path | None,
    urls: Sequence[str],
    zip_sha256: str | None,
    member_sha256: Mapping[str, str | None],
    timeout: float,
    use_hf: bool,
) -> tuple[dict[str, bytes], str]:
    """The three WikiText-2 raw splits (verified) and where they came from; partial
    downloads go to ``scratch`` and are removed. See :func:`download_wikitext2`."""
    if archive is not None:
        return _splits_from_zip(archive, zip_sha256, member_sha256), f"archive {archive}"

    attempts: list[str] = []
    hf_name = f"Hugging Face dataset {'/'.join(HF_DATASET)}"
    if use_hf:
        offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
        try:
            return _splits_from_hf(member_sha256, timeout, offline=offline), hf_name
        except Exception as e:  # network, hub, cache or format trouble: fall back to the zip
            where = " (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so only the datasets cache was tried)"
            attempts.append(f"{hf_name}{where if offline else ''}: {_describe(e)}")

    for url in urls:
        tmp_zip = scratch / f".wikitext-2-raw-v1.zip.part{os.getpid()}"
        try:
            _download(url, tmp_zip, timeout)
            return _splits_from_zip(tmp_zip, zip_sha256, member_sha256), url
        except Exception as e:
            attempts.append(f"{url}: {_describe(e)}")
        finally:
            tmp_zip.unlink(missing_ok=True)

    tried = "\n".join(f"  - {a}" for a in attempts) or "  - (no source enabled)"
    raise DataError(f"Downloading WikiText-2 failed; tried:\n{tried}\n{_supply_hint()}")


def download_wikitext2(
    out_dir: str | os.PathLike[str],
    archive: str | os.PathLike[str] | None = None,
    *,
    urls: Sequence[str] = WIKITEXT2_URLS,
    zip_sha256: str | None = WIKITEXT2_ZIP_SHA256,
    member_sha256: Mapping[str, str | None] = WIKITEXT2_MEMBER_SHA256,
    timeout: float = 20.0,
    use_hf: bool = True,
) -> None:
    """Write WikiText-2 raw ``train.txt``, ``validation.txt``, ``test.txt`` to ``out_dir``.

    With ``archive`` the local zip is used and nothing is downloaded. Otherwise the HF
    hub is tried (with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, only the ``datasets``
    cache), then the original zip from each of ``urls``. Every route is checked against
    the original files' sha256, so all give byte-identical splits. The keyword arguments
    exist so tests can inject mirrors and hashes. Raises one ``DataError`` if all fail.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    archive_path = None if archive is None else Path(archive).expanduser()
    texts, _ = _wikitext2_splits(out, archive_path, urls, zip_sha256, member_sha256, timeout, use_hf)
    atomic_write_many({out / f"{split}.txt": texts[split] for split in SPLITS})


def _read_split_file(split: str, src: str | os.PathLike[str]) -> bytes:
    """A user-supplied split file's bytes, after checking it exists, is UTF-8 and is not empty."""
    src = Path(src).expanduser()
    key = f"data.{split}"
    if not src.exists():
        raise DataError(f"{split} split file not found: {src} (set `{key}` in the config to an existing text file)")
    if not src.is_file():
        raise DataError(f"{split} split path {src} is not a regular file (`{key}` must point to a text file)")
    try:
        data = src.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {split} split file {src}: {e}") from None
    _check_split_bytes(data, f"{split} split file {src} (`{key}`)")
    return data


def copy_text_splits(
    train: str | os.PathLike[str],
    validation: str | os.PathLike[str],
    test: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> None:
    """Copy user-supplied split files (``data.source: text``) byte-for-byte, after
    checking each exists, is UTF-8 and is not empty."""
    out = Path(out_dir)
    files = {out / f"{split}.txt": _read_split_file(split, src) for split, src in zip(SPLITS, (train, validation, test))}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_many(files)


def _origin(name: str, text: bytes, start: int = 0) -> dict[str, Any]:
    return {"from": name, "bytes": [start, start + len(text)], "sha256": _sha256_bytes(text)}


def prepare_corpus(data_config: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The config's ``data`` block -> ``{train,validation,test}.txt`` in ``out_dir``, and
    ``splits.json`` saying where each split came from; returns that metadata.

    ``source: wikitext2`` downloads (or unpacks ``archive``); ``source: text`` copies
    the user's ``train``/``validation``/``test`` files. With ``validation_holdout`` the
    validation split is instead the last articles of the training text
    (:func:`tga.corpus.holdout_split`), and training keeps the rest. Other keys
    (``label``) are not about the corpus and are ignored here.
    """
    source = data_config.get("source", "wikitext2")
    holdout = data_config.get("validation_holdout")
    out = Path(out_dir)
    if source == "wikitext2":
        archive = data_config.get("archive")
        out.mkdir(parents=True, exist_ok=True)
        texts, route = _wikitext2_splits(
            out, None if archive is None else Path(archive).expanduser(), WIKITEXT2_URLS, WIKITEXT2_ZIP_SHA256,
            WIKITEXT2_MEMBER_SHA256, 20.0, True,
        )
        names = {split: f"{WIKITEXT2_MEMBERS[split]} ({route})" for split in SPLITS}
    elif source == "text":
        needed = [s for s in SPLITS if not (s == "validation" and holdout is not None)]
        missing = [f"data.{s}" for s in needed if not data_config.get(s)]
        if missing:
            raise DataError(f"`data.source: text` needs paths for {', '.join(missing)} in the config")
        if holdout is not None and data_config.get("validation"):
            raise DataError(BOTH_VALIDATIONS)
        texts = {split: _read_split_file(split, data_config[split]) for split in needed}
        names = {split: str(data_config[split]) for split in needed}
    else:
        hf = " (source hf is tokenized straight from its dataset: tga.hf_corpus.prepare_hf_corpus)" * (source == "hf")
        raise DataError(f"unknown data.source {source!r} here; valid: wikitext2 (download), text (your own files){hf}")

    origins = {split: _origin(names[split], texts[split]) for split in texts}
    if holdout is not None:
        kept, held_out, info = holdout_split(texts["train"], holdout, what=f"training text {names['train']}")
        texts["train"], texts["validation"] = kept, held_out
        origins["train"] = _origin(names["train"], kept)
        origins["validation"] = {**_origin(names["train"], held_out, start=len(kept)), "held_out": info}
    metadata = {"source": source, "validation_holdout": holdout, "splits": {split: origins[split] for split in SPLITS}}

    files = {out / f"{split}.txt": texts[split] for split in SPLITS}
    files[out / CORPUS_METADATA] = (json.dumps(metadata, indent=1) + "\n").encode("utf-8")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_many(files)
    return metadata


def corpus_origin(metadata_path: str | os.PathLike[str], split: str) -> dict[str, Any]:
    """One split's entry of a corpus's ``splits.json`` (:func:`prepare_corpus`), for the
    token file's sidecar: where its text came from, and any holdout."""
    path = Path(metadata_path)
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["splits"][split])
    except FileNotFoundError:
        raise DataError(f"corpus metadata {path} not found; rerun the corpus step to re-create it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"corpus metadata {path} is unreadable or lacks split {split!r} ({_describe(e)}); "
                        "delete it and rerun the corpus step") from None


# --------------------------------------------------------------------------- token files


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def token_dtype_name(vocab_size: int) -> str:
    """``uint16`` while every id fits (half the bytes), ``uint32`` beyond 65,535 ids
    (Llama 3's 128K vocabulary): the one rule for every token file tga writes."""
    return "uint16" if int(vocab_size) <= 65535 else "uint32"


def token_bytes(ids: np.ndarray, tokenizer: Any) -> bytes:
    """``ids`` as a token file's raw little-endian bytes in the dtype of ``tokenizer``'s
    vocabulary, after checking each lies inside it (a wrong id would wrap silently)."""
    vocab_size = int(tokenizer.vocab_size)
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise DataError(
                f"tokenizer {tokenizer.name!r} produced ids in [{lo}, {hi}] outside its vocab of {vocab_size}"
            )
    return ids.astype(_DTYPES[token_dtype_name(vocab_size)]).tobytes()


def tokenize_to_file(
    text_path: str | os.PathLike[str],
    tokenizer: Any,
    out_path: str | os.PathLike[str],
    origin: Mapping[str, Any] | None = None,
) -> dict:
    """Encode a whole text file once into ``out_path`` (raw little-endian ids) plus the
    sidecar JSON; returns the metadata. Memory is O(corpus): ids, not windows.
    ``origin`` (the split's entry of the corpus's ``splits.json``: its source file, byte
    range and any validation holdout) is kept in the sidecar, so a token file says what
    text it holds."""
    text_path, out_path = Path(text_path), Path(out_path)
    try:
        raw = text_path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"text file to tokenize not found: {text_path}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {text_path} is not valid UTF-8 ({e})") from None

    vocab_size = int(tokenizer.vocab_size)
    dtype_name = token_dtype_name(vocab_size)
    encode_array = getattr(tokenizer, "encode_array", None)
    ids = np.asarray(encode_array(text, dtype=np.int64) if encode_array else tokenizer.encode(text), dtype=np.int64)
    if ids.ndim != 1 or ids.size < 2:
        raise DataError(f"{text_path} yields {ids.size} tokens; at least 2 are needed to predict anything")
    payload = token_bytes(ids, tokenizer)
    meta = {
        "dtype": dtype_name,
        "n_tokens": int(ids.size),
        "vocab_size": vocab_size,
        "tokenizer": str(tokenizer.name),
        "source": str(text_path),
        "n_bytes": len(raw),
        "n_words": len(text.split()),
        "sha256": _sha256_bytes(payload),
    }
    if origin is not None:
        meta["origin"] = dict(origin)
    atomic_write_many({out_path: payload, _sidecar(out_path): (json.dumps(meta, indent=1) + "\n").encode("utf-8")})
    return meta


def read_token_metadata(path: str | os.PathLike[str]) -> dict:
    """The sidecar metadata of a token file (``path`` may be the ``.bin`` or ``.json``)."""
    meta_path = _sidecar(Path(path))
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"token metadata {meta_path} not found; delete {Path(path).with_suffix('.bin')} and rerun to re-create it"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"token metadata {meta_path} is unreadable ({e}); delete it and its .bin and rerun") from None
    missing = [k for k in _TOKEN_META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"token metadata {meta_path} lacks {missing}; delete it and its .bin and rerun")
    if meta["dtype"] not in _DTYPES:
        raise DataError(f"token metadata {meta_path} has unsupported dtype {meta['dtype']!r} (uint16 or uint32)")
    return meta


def load_token_file(path: str | os.PathLike[str], verify_sha256: bool = False) -> np.memmap:
    """Memory-map a token ``.bin`` read-only, after checking it against its sidecar."""
    path = Path(path)
    meta = read_token_metadata(path)
    dtype = _DTYPES[meta["dtype"]]
    expected = int(meta["n_tokens"]) * dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(
            f"token file {path} not found (its metadata {_sidecar(path)} exists); delete the .json and rerun"
        ) from None
    if size != expected:
        raise DataError(
            f"token file {path} has {size} bytes but its metadata says {meta['n_tokens']} {meta['dtype']} tokens "
            f"({expected} bytes): it is truncated or stale. Delete {path} and {_sidecar(path)} and rerun."
        )
    if verify_sha256:
        got = sha256_file(path)
        if got != meta["sha256"]:
            raise DataError(f"token file {path} has sha256 {got}, metadata says {meta['sha256']}; delete it and rerun")
    return np.memmap(path, dtype=dtype, mode="r", shape=(int(meta["n_tokens"]),))


def token_file_is_current(path: str | os.PathLike[str], text_path: str | os.PathLike[str], tokenizer: Any) -> bool:
    """Whether ``path`` is a complete token file of ``text_path`` as the text is now, made
    by a tokenizer of ``tokenizer``'s name and vocabulary: its sidecar names this text
    and its size, and the file is not older than the text."""
    path, text_path = Path(path), Path(text_path)
    try:
        meta = read_token_metadata(path)
        load_token_file(path)  # size against the sidecar: catches truncated files
    except DataError:
        return False
    stat = text_path.stat()
    return (
        meta["tokenizer"] == tokenizer.name
        and int(meta["vocab_size"]) == tokenizer.vocab_size
        and Path(meta["source"]) == text_path
        and int(meta["n_bytes"]) == stat.st_size
        and path.stat().st_mtime >= stat.st_mtime
    )


def cached_token_files(
    tokenizer: Any,
    texts: Mapping[str, str | os.PathLike[str]],
    folder: str | os.PathLike[str],
    report: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Each text (split name -> text file) encoded once into ``<folder>/<split>.bin``, and
    reused while :func:`token_file_is_current` says so; ``report`` gets one line per file.

    ``<folder>/tokenizer.json`` names the tokenizer the folder's files were made with.
    When it is another one (a char vocabulary from other text ...), every token file
    there is removed first, so ids of two tokenizers never mix; it is written only after
    the files, so files without it are never trusted. ``tokenizer`` needs ``name``,
    ``vocab_size``, ``encode``, ``save`` and ``matches_file`` (tga.tokenizers.Tokenizer).
    """
    folder = Path(folder)
    stamp = folder / "tokenizer.json"
    if not tokenizer.matches_file(stamp):
        stamp.unlink(missing_ok=True)
        for old in folder.glob("*.bin"):
            old.unlink()
            _sidecar(old).unlink(missing_ok=True)
    files: dict[str, Path] = {}
    for split, text in texts.items():
        text, path = Path(text).resolve(), folder / f"{split}.bin"
        if token_file_is_current(path, text, tokenizer):
            line = f"reusing {path} (tokenizer {tokenizer.name}, unchanged text)"
        else:
            meta = tokenize_to_file(text, tokenizer, path)
            line = f"tokenized {text} -> {path} ({meta['n_tokens']:,} tokens, vocab {meta['vocab_size']:,})"
        if report is not None:
            report(line)
        files[split] = path
    if not stamp.is_file():
        tokenizer.save(stamp)
    return files


# --------------------------------------------------------------------------- batches


TOKEN_COPY_CHUNK = 1 << 26  # tokens converted on the host at a time (256 MB of int32)


def tokens_to_tensor(tokens: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """A 1-D int32 tensor on ``device``: uint16 memmaps have no direct torch dtype, and
    int32 halves the memory of int64; batches are widened to int64 when gathered.

    A large split is converted ``TOKEN_COPY_CHUNK`` tokens at a time into the tensor on
    ``device``, so the host never holds a whole int32 copy of it besides (a
    billions-token corpus, once per DDP rank); the tensor is the same either way."""
    import torch

    if len(tokens) <= TOKEN_COPY_CHUNK:
        return torch.from_numpy(np.asarray(tokens, dtype=np.int32)).to(device)
    out = torch.empty(len(tokens), dtype=torch.int32, device=device)
    for start in range(0, len(tokens), TOKEN_COPY_CHUNK):
        chunk = np.asarray(tokens[start:start + TOKEN_COPY_CHUNK], dtype=np.int32)
        out[start:start + len(chunk)].copy_(torch.from_numpy(chunk))
    return out


def sample_batch(
    tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows ``x`` (B, T) and next-token targets ``y = x`` shifted by one.

    Offsets are drawn with ``torch.randint`` on ``tokens.device`` and windows gathered
    by index arithmetic, so with tokens already on the GPU nothing syncs with the
    host. ``generator`` must live on the same device as ``tokens``.
    """
    import torch

    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n = tokens.numel()
    if n < block_size + 1:
        raise ValueError(f"need at least block_size + 1 = {block_size + 1} tokens, have {n}")
    offsets = torch.randint(0, n - block_size, (batch_size,), device=tokens.device, generator=generator)
    idx = offsets[:, None] + torch.arange(block_size + 1, device=tokens.device)
    windows = tokens[idx].long()
    return windows[:, :-1], windows[:, 1:]


class RareTokenRelabeler:
    """Training-time augmentation that makes copying from the context pay.

    With 2M training tokens drawn from a 250k-token split, every name recurs in
    epochs the model has already seen, so memorizing it always beats copying it from
    earlier in the window and no copying circuit forms (Hernandez et al. 2022); yet in
    held-out text rare words recur within an article. In a random ``probability``
    fraction of windows, every token that occurs at most ``max_count`` times in the
    training split is replaced through one random bijection of that rare pool, the
    same within a window (entity anonymization, Hermann et al. 2015; a consistent form
    of the data noising of Xie et al. 2017). A relabeled name cannot be recalled, only
    copied. Measured (README, Training recipe), it mostly stops the memorization: the
    gain is on tokens seen more than 10 times, the rarest still are not copied.
    Everything runs on the tokens' device with no host synchronisation.
    """

    def __init__(self, token_counts: torch.Tensor, vocab_size: int, max_count: int, probability: float) -> None:
        import torch

        counts = token_counts[:vocab_size]
        self.pool = torch.nonzero(counts <= max_count).flatten()
        self.rank = torch.full((token_counts.numel(),), -1, dtype=torch.long, device=token_counts.device)
        self.rank[self.pool] = torch.arange(self.pool.numel(), device=token_counts.device)
        self.probability = probability

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if self.probability <= 0 or self.pool.numel() < 2:
            return x, y  # draws nothing, so a run without relabeling samples as before
        windows = torch.cat([x, y[:, -1:]], dim=1)
        chosen = torch.rand(windows.size(0), device=windows.device, generator=generator) < self.probability
        bijection = self.pool[torch.randperm(self.pool.numel(), device=windows.device, generator=generator)]
        rank = self.rank[windows]
        relabel = (rank >= 0) & chosen[:, None]
        windows = torch.where(relabel, bijection[rank.clamp(min=0)], windows)
        return windows[:, :-1], windows[:, 1:]


def non_overlapping_windows(tokens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile a 1-D token tensor for evaluation so every token but the first is scored once.

    Window k feeds positions ``k*T .. k*T+T-1`` and predicts ``k*T+1 .. k*T+T``. The
    last window is padded with 0; ``mask`` (bool, (K, T)) marks the real targets.
    Padding only sits after real positions, so causal attention never sees it.
    """
    import torch

    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score anything, have {n}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n_windows = -(-(n - 1) // block_size)
    padded = torch.zeros(n_windows * block_size + 1, dtype=torch.long, device=tokens.device)
    padded[:n] = tokens.long()
    inputs = padded[:-1].view(n_windows, block_size)
    targets = padded[1:].view(n_windows, block_size)
    mask = (torch.arange(1, n_windows * block_size + 1, device=tokens.device) < n).view(n_windows, block_size)
    return inputs, targets, mask

