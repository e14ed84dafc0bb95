"""Text <-> token ids.

Three tokenizers are supported:

* ``char``: one id per Unicode character seen in the training text, plus ``<unk>``
  (id 0) for anything unseen. The vocabulary is stored in the tokenizer JSON so a
  run can be re-evaluated later with exactly the same ids.
* ``gpt2``: the real GPT-2 byte-pair encoding (50257 ids) via tiktoken, built either
  from local ``encoder.json``/``vocab.bpe`` files or from tiktoken's download cache.
  Aliases: ``bpe`` (local files, paths required) and ``tiktoken`` (cache/download).
  All three names give byte-identical ids, so the resulting tokenizer is always
  called ``gpt2``.
* ``hf``: any Hugging Face tokenizer, by hub id or local folder (``tokenizer.path``,
  ``tokenizer.revision``), through ``transformers``' ``AutoTokenizer`` (the optional
  ``hf`` extra), loaded as the ``pretrained:`` section loads a model's tokenizer
  (:func:`load_hf_tokenizer`). docs/tokenizers.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tga.atomic import atomic_write_text

__all__ = [
    "BPE_ALIASES",
    "CharTokenizer",
    "GPT2_ENCODER_JSON_SHA256",
    "GPT2_VOCAB_BPE_SHA256",
    "GPT2Tokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TokenizerSpec",
    "VALID_TOKENIZERS",
    "build_tokenizer",
    "create_tokenizer",
    "hf_vocab_size",
    "load_hf_tokenizer",
    "load_tokenizer",
    "tokenizer_from",
]

VALID_TOKENIZERS = ("char", "gpt2", "bpe", "tiktoken", "hf")
BPE_ALIASES = ("gpt2", "bpe", "tiktoken")

# The hashes tiktoken pins for the official OpenAI files; checking them means a
# tokenizer called "gpt2" really is GPT-2's, whichever route built it.
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_N_VOCAB = 50257
GPT2_ENDOFTEXT = "<|endoftext|>"
_GPT2_FILE_NAMES = {"encoder_json": "encoder.json", "vocab_bpe": "vocab.bpe"}
# GPT-2's original split pattern; the installed tiktoken's own (faster, equivalent)
# spelling is preferred when it exposes one, so both routes build the same Encoding.
_GPT2_PAT_STR_CLASSIC = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _gpt2_pat_str() -> str:
    try:
        from tiktoken_ext import openai_public

        return str(getattr(openai_public, "r50k_pat_str", _GPT2_PAT_STR_CLASSIC))
    except ImportError:
        return _GPT2_PAT_STR_CLASSIC

FORMAT_VERSION = 1
UNK_TOKEN = "<unk>"
# What an <unk> id decodes to: one character, so decoded token strings stay aligned.
UNK_DECODED = "\ufffd"
# Keys of a tokenizer JSON that say how it was built, not which ids it gives: every
# GPT-2 route is hash-checked to give the same ids, and an hf tokenizer's identity is
# the content hash of its files, wherever they were read from.
_ROUTE_KEYS = ("source", "encoder_json", "vocab_bpe", "path", "revision", "commit")

# Encoding huge strings in one call is fine for speed but builds one giant Python
# list; chunks keep peak memory near the size of the int array we keep.
_CHUNK_CHARS = 1 << 20
# A cut right after a (surely) non-whitespace character that is followed by a space or
# newline never changes GPT-2 pre-tokenization: no regex piece spans such a boundary
# and nothing left of it looks ahead past it. Cutting *after* a newline would not be
# safe ("\n\n" is one piece). ASCII-only classes avoid Unicode-\s disagreements
# between Python's re and tiktoken's Rust regex.
_SAFE_CUT = re.compile(r"[A-Za-z0-9.,;:!?'\")\]](?=[ \n])")


class TokenizerError(ValueError):
    """A tokenizer could not be built, loaded or used; the message says how to fix it."""


class Tokenizer:
    """Base class: ``name``, ``vocab_size``, ``encode``, ``decode``, ``save``."""

    name: str
    vocab_size: int
    #: Whether ``encode`` puts a BOS token first. tga's tokenizers add no special token,
    #: so ``geometry.exclude_first_token: auto`` keeps position 0 for them.
    adds_bos: bool = False
    #: The id appended after each document of a corpus (GPT-2's ``<|endoftext|>``, an hf
    #: tokenizer's EOS); None where the tokenizer has none (char).
    eot_token: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Encode straight into a numpy array (subclasses avoid Python-int lists)."""
        return np.asarray(self.encode(text), dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON description atomically (temp file + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=True) + "\n")

    def matches_file(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` holds the JSON of a tokenizer that gives this one's ids (a
        missing or unreadable file does not); how GPT-2's files were found does not count."""
        try:
            saved = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(saved, dict) and _identity(saved) == _identity(self.to_dict())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _identity(description: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in description.items() if k not in _ROUTE_KEYS}


class CharTokenizer(Tokenizer):
    """Character-level tokenizer: id 0 = ``<unk>``, ids 1.. = sorted characters."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if any(len(c) != 1 for c in chars):
            raise TokenizerError("CharTokenizer vocabulary entries must be single characters")
        if len(set(chars)) != len(chars):
            raise TokenizerError("CharTokenizer vocabulary contains duplicate characters")
        self.chars: list[str] = sorted(chars)
        self.name = "char"
        self.vocab_size = len(self.chars) + 1
        self._stoi = {c: i + 1 for i, c in enumerate(self.chars)}
        # Code point -> id table (last slot = <unk> for anything beyond the largest
        # code point): encode_array is then one vectorised gather. At most ~4 MB.
        top = max((ord(c) for c in self.chars), default=0)
        self._table = np.zeros(top + 2, dtype=np.int32)
        for c, i in self._stoi.items():
            self._table[ord(c)] = i

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise TokenizerError("cannot build a char vocabulary from empty text")
        return cls(sorted(set(text)))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "CharTokenizer":
        return cls.from_text(_read_text(Path(path), "training text for the char tokenizer"))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = self._table[np.minimum(cps, self._table.size - 1)]
        return ids.astype(dtype, copy=False)

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        n = len(self.chars)
        for i in ids:
            i = int(i)
            if i < 0 or i > n:
                raise TokenizerError(f"id {i} is outside the char vocabulary (0..{n})")
            out.append(UNK_DECODED if i == 0 else self.chars[i - 1])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "type": "char",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "unk_token": UNK_TOKEN,
            "unk_id": 0,
            # ensure_ascii in save() keeps control/odd characters safe in the JSON.
            "chars": self.chars,
        }


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-pair encoding through tiktoken (vocab 50257, ``<|endoftext|>`` = 50256)."""

    def __init__(self, encoding: Any, source: str, encoder_json: Path | None = None, vocab_bpe: Path | None = None):
        self.encoding = encoding
        self.name = "gpt2"
        self.vocab_size = int(encoding.n_vocab)
        self.source = source  # "files" or "tiktoken"
        self.encoder_json = encoder_json
        self.vocab_bpe = vocab_bpe

    @property
    def eot_token(self) -> int:
        return int(self.encoding.eot_token)

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: corpus text is data, "<|endoftext|>" in it is not special.
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        chunks = list(_safe_chunks(text, _CHUNK_CHARS))
        if not chunks:
            return np.zeros(0, dtype=dtype)
        parts: list[np.ndarray] = []
        # Batches of 8 chunks: threads speed up big corpora while the Python lists
        # alive at any time stay a few MB.
        for start in range(0, len(chunks), 8):
            batch = self.encoding.encode_ordinary_batch(chunks[start : start + 8], num_threads=8)
            parts.extend(np.asarray(ids, dtype=dtype) for ids in batch)
        return np.concatenate(parts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """One string per id (partial UTF-8 sequences shown with U+FFFD), for plots."""
        return [self.encoding.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace") for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "type": "gpt2",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "source": self.source,
            "encoder_json": str(self.encoder_json) if self.encoder_json else None,
            "vocab_bpe": str(self.vocab_bpe) if self.vocab_bpe else None,
            "encoder_json_sha256": GPT2_ENCODER_JSON_SHA256,
            "vocab_bpe_sha256": GPT2_VOCAB_BPE_SHA256,
        }


def _safe_chunks(text: str, size: int) -> Iterator[str]:
    """Split ``text`` into pieces of about ``size`` chars at BPE-neutral boundaries."""
    start = 0
    n = len(text)
    while start < n:
        if n - start <= size:
            yield text[start:]
            return
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            yield text[start:]
            return
        yield text[start : m.end()]
        start = m.end()


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{what} not found: {path}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read {what} {path}: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{what} {path} is not valid UTF-8: {e}") from None


def _check_gpt2_file(path: Path, key: str, expected_sha256: str) -> None:
    """Fail early, naming the file and config key, before tiktoken's bare asserts can."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"GPT-2 BPE file tokenizer.{key} not found: {path}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read GPT-2 BPE file tokenizer.{key} ({path}): {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise TokenizerError(
            f"GPT-2 BPE file tokenizer.{key} ({path}) is corrupt or not the official GPT-2 file: "
            f"sha256 {digest}, expected {expected_sha256}. Re-download it from "
            f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{_GPT2_FILE_NAMES[key]}"
        )


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    """Local BPE files must not be copied into (possibly read-only) TIKTOKEN_CACHE_DIR:
    an empty value makes tiktoken read the paths directly."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def gpt2_from_files(encoder_json: str | os.PathLike[str], vocab_bpe: str | os.PathLike[str]) -> GPT2Tokenizer:
    """Build GPT-2 BPE from local ``encoder.json`` + ``vocab.bpe`` (no network)."""
    import tiktoken
    import tiktoken.load

    encoder_json = Path(encoder_json).expanduser()
    vocab_bpe = Path(vocab_bpe).expanduser()
    _check_gpt2_file(encoder_json, "encoder_json", GPT2_ENCODER_JSON_SHA256)
    _check_gpt2_file(vocab_bpe, "vocab_bpe", GPT2_VOCAB_BPE_SHA256)
    with _tiktoken_cache_disabled():
        try:
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json)
            )
        except Exception as e:  # parse errors / tiktoken's consistency assert
            raise TokenizerError(
                f"cannot build GPT-2 BPE from {encoder_json} and {vocab_bpe}: {type(e).__name__}: {e}"
            ) from e
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=_gpt2_pat_str(),
        mergeable_ranks=ranks,
        special_tokens={GPT2_ENDOFTEXT: GPT2_N_VOCAB - 1},
        explicit_n_vocab=GPT2_N_VOCAB,
    )
    return GPT2Tokenizer(encoding, source="files", encoder_json=encoder_json.resolve(), vocab_bpe=vocab_bpe.resolve())


_GPT2_URLS = tuple(
    f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{n}" for n in ("vocab.bpe", "encoder.json")
)


def _probe_tiktoken_download(timeout: float = 10.0) -> None:
    """tiktoken downloads with no timeout, so a firewalled machine could hang for
    minutes. When the gpt2 files are neither loaded nor in tiktoken's cache (keyed by
    sha1 of the URL), check the host answers first. Skipped behind a proxy."""
    import tempfile

    import tiktoken.registry

    if "gpt2" in getattr(tiktoken.registry, "ENCODINGS", {}):
        return
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache is None:
        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache and all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in _GPT2_URLS):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = "openaipublic.blob.core.windows.net"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach {host}:443 ({e})") from None


def gpt2_from_tiktoken() -> GPT2Tokenizer:
    """``tiktoken.get_encoding("gpt2")``: downloads once, or reads TIKTOKEN_CACHE_DIR."""
    import tiktoken

    try:
        _probe_tiktoken_download()
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors, hash mismatch, unwritable cache ...
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = "TIKTOKEN_CACHE_DIR is not set" if cache is None else f"TIKTOKEN_CACHE_DIR={cache!r}"
        raise TokenizerError(
            "The GPT-2 BPE files could not be downloaded by tiktoken "
            f"({type(e).__name__}: {e}; {where}). Either give `tokenizer.encoder_json` and "
            "`tokenizer.vocab_bpe` (paths to GPT-2's encoder.json and vocab.bpe) in the config, "
            "or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache of the gpt2 files."
        ) from e
    if encoding.n_vocab != GPT2_N_VOCAB:
        raise TokenizerError(f"tiktoken's gpt2 encoding has {encoding.n_vocab} ids, expected {GPT2_N_VOCAB}")
    return GPT2Tokenizer(encoding, source="tiktoken")


# ----------------------------------------------------------------------------- hf

HF_INSTALL = 'pip install "tga[hf]"  (or: pip install "transformers>=5.0")'
# Names of the files a Hugging Face tokenizer is read from (transformers' and
# sentencepiece's); the content hash covers those present, and only those: a model's
# weights beside them never make a "changed tokenizer".
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
# Long texts are encoded in chunks of about this many characters, in batches (the Rust
# tokenizer encodes a batch on all cores): memory stays near the id array, not one
# Encoding object (offsets, strings) per token of the whole corpus.
_HF_CHUNK_CHARS = 1 << 18
_HF_BATCH = 16
# Where a chunk may end: before a space that starts a word, after a letter, digit or
# closing punctuation. Byte-level BPE (GPT-2, Llama 3), Metaspace/SentencePiece and
# whitespace pre-tokenizers all start a new piece there; each cut is still checked on
# its neighbourhood (:meth:`HFTokenizer._cut_is_neutral`), since a normalizer may, e.g.,
# prepend a space to every text it is given.
_HF_CUT = re.compile(r"(?<=[A-Za-z0-9.,;:!?'\")\]]) (?=[A-Za-z])")
_HF_CUT_CONTEXT = 256
# A tokenizer that fails this many checks is not cut at all (one call encodes the rest).
_HF_CUT_FAILURES = 4


def load_hf_tokenizer(path: str, revision: str | None = None, where: str = "tokenizer.path",
                      key: str | None = None) -> Any:
    """transformers' ``AutoTokenizer`` for a hub id or a local folder (an existing folder,
    or a string shaped like a path: tga.pretrained_entries.is_local_path) at ``revision``;
    transformers' cache, HF_HOME and HF_HUB_OFFLINE apply. The one loader of the ``hf``
    tokenizer and of the ``pretrained:`` models' tokenizers, so both read a name alike.
    Every failure is one TokenizerError that starts with ``where``; ``key`` (default
    ``where``) is the setting the offline hint says to point at a local folder."""
    from tga.pretrained_entries import is_local_path

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(
            f"{where}: Hugging Face tokenizers need the `transformers` package, which is not installed: {HF_INSTALL}"
        ) from None
    path = str(path)
    local = is_local_path(path)
    source = str(Path(path).expanduser()) if local else path
    if local and not Path(source).is_dir():
        raise TokenizerError(f"{where}: local tokenizer folder {path!r} does not exist")
    if local and revision is not None:
        raise TokenizerError(
            f"{where}: revision {revision!r} given for the local folder {path!r}; a folder holds one revision: "
            "remove the revision, or give a hub id"
        )
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(".")
        hint = "" if local else (
            f" If this machine is offline (or the hub is out of reach) and {path!r} is not in the Hugging Face "
            "cache (HF_HOME), save the tokenizer where the hub is reachable, "
            f"`python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{path}')"
            f".save_pretrained('DIR')\"`, copy DIR here and set {key or where} to that local folder."
        )
        at = f" at revision {revision!r}" if revision else ""
        raise TokenizerError(f"{where}: cannot load the tokenizer {path!r}{at}: {first}.{hint}") from None


def _hf_tokenizer_files(path: str, revision: str | None) -> dict[str, Path]:
    """The tokenizer files (:data:`HF_TOKENIZER_FILES`) a loaded tokenizer was read from: in
    its local folder, or in the hub cache's snapshot of ``revision`` (no network)."""
    from tga.pretrained_entries import is_local_path

    if is_local_path(path):
        folder = Path(path).expanduser()
        return {name: folder / name for name in HF_TOKENIZER_FILES if (folder / name).is_file()}
    from huggingface_hub import try_to_load_from_cache

    found: dict[str, Path] = {}
    for name in HF_TOKENIZER_FILES:
        cached = try_to_load_from_cache(path, name, revision=revision)
        if isinstance(cached, str):
            found[name] = Path(cached)
    return found


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (hub id or local folder) behind tga's Tokenizer.

    ``encode`` adds no special tokens (``add_special_tokens=False``): corpus text is
    data, tokenized once into one stream of token files that training cuts into windows
    anywhere, so a BOS put in front of every encoded text would land at arbitrary
    positions inside windows (and one per chunk of a long text); documents are separated
    by ``eot_token`` (the EOS) where the corpus does so. For the same reason a special
    token's string inside the text ("<|endoftext|>", "<s>") is encoded as the text it is
    (``split_special_tokens``), as tiktoken's ``encode_ordinary`` does for GPT-2: only tga
    puts special ids into token files. The geometry encodes its prompts
    the same way, so a prompt looks like the windows the model was trained on and
    ``geometry.exclude_first_token: auto`` keeps position 0 (``adds_bos`` is False).
    ``vocab_size`` is ``len(tokenizer)``: the whole vocabulary with added tokens, so every
    id it can give is a row of the model's embedding.
    """

    adds_bos = False

    def __init__(self, tokenizer: Any, path: str, revision: str | None = None,
                 files: Mapping[str, Path] | None = None) -> None:
        self.hf = tokenizer
        self.name = "hf"
        self.path = path
        self.revision = revision
        self.vocab_size = int(len(tokenizer))
        from tga.data import sha256_file

        files = dict(files or {})
        self.files_sha256 = {name: sha256_file(file) for name, file in sorted(files.items())}
        snapshot = {file.parent.name for file in files.values() if file.parent.parent.name == "snapshots"}
        #: The hub commit the files were read from (the cache's snapshot), None for a folder.
        self.commit = snapshot.pop() if len(snapshot) == 1 else None
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    @classmethod
    def load(cls, path: str, revision: str | None = None, where: str = "tokenizer.path") -> "HFTokenizer":
        """Load by hub id or local folder (:func:`load_hf_tokenizer`) and hash its files."""
        from tga.pretrained_entries import is_local_path

        tokenizer = load_hf_tokenizer(path, revision, where)
        path = str(Path(path).expanduser().resolve()) if is_local_path(str(path)) else str(path)
        files = _hf_tokenizer_files(path, revision)
        if not files:
            raise TokenizerError(
                f"{where}: none of the tokenizer files ({', '.join(HF_TOKENIZER_FILES)}) of {path!r} were found "
                "to record; save the tokenizer with save_pretrained into a folder and give that folder"
            )
        return cls(tokenizer, path, revision, files)

    @property
    def eot_token(self) -> int | None:  # type: ignore[override]
        eos = self.hf.eos_token_id
        return None if eos is None else int(eos)

    @property
    def content_sha256(self) -> str:
        """One hash of every tokenizer file's name and content."""
        return hashlib.sha256(json.dumps(self.files_sha256, sort_keys=True).encode()).hexdigest()

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:  # Rust, all cores, no offsets kept
            # split_special_tokens, set each time: any call of the transformers tokenizer resets it
            self._backend.encode_special_tokens = True
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        return list(self.hf(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"])

    def _cut_is_neutral(self, text: str, cut: int) -> bool:
        """Whether encoding the two sides of ``cut`` apart gives the ids of encoding them
        together, on :data:`_HF_CUT_CONTEXT` characters either side."""
        left, right = text[max(0, cut - _HF_CUT_CONTEXT) : cut], text[cut : cut + _HF_CUT_CONTEXT]
        whole, alone_left, alone_right = self._encode_batch([left + right, left, right])
        return whole == alone_left + alone_right

    def chunk_bounds(self, text: str) -> list[int]:
        """Where ``text`` is cut into chunks of about :data:`_HF_CHUNK_CHARS` characters:
        only at checked cuts, so the chunks' ids joined are the ids of the whole text."""
        bounds = [0]
        failures = 0
        position = _HF_CHUNK_CHARS
        while position < len(text) and failures < _HF_CUT_FAILURES:
            match = _HF_CUT.search(text, position)
            if match is None:
                break
            if self._cut_is_neutral(text, match.start()):
                bounds.append(match.start())
                position = match.start() + _HF_CHUNK_CHARS
            else:
                failures += 1
                position = match.end()
        return [*bounds, len(text)]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """The ids of one ``tokenizer(text, add_special_tokens=False)`` call, computed in
        batches of chunks (:meth:`chunk_bounds`), straight into an array."""
        bounds = self.chunk_bounds(text)
        chunks = [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        parts = [np.zeros(0, dtype=dtype)]
        for start in range(0, len(chunks), _HF_BATCH):
            parts.extend(np.asarray(ids, dtype=dtype) for ids in self._encode_batch(chunks[start : start + _HF_BATCH]))
        return np.concatenate(parts)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "type": "hf",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eot_token": self.eot_token,
            "path": self.path,
            "revision": self.revision,
            "commit": self.commit,
            "tokenizer_class": type(self.hf).__name__,
            "files_sha256": self.files_sha256,
            "content_sha256": self.content_sha256,
        }


@functools.lru_cache(maxsize=8)
def hf_vocab_size(path: str, revision: str | None = None) -> int:
    """``len(tokenizer)`` of an hf tokenizer, loaded once per process (resource estimates
    ask before the tokenizer is built)."""
    return int(len(load_hf_tokenizer(path, revision)))


def create_tokenizer(
    name: str,
    train_text_path: str | os.PathLike[str] | None = None,
    encoder_json: str | os.PathLike[str] | None = None,
    vocab_bpe: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
) -> Tokenizer:
    """Build a tokenizer by name; ``char`` needs ``train_text_path``, ``bpe`` the two files,
    ``hf`` a ``path`` (hub id or local folder) and optionally a ``revision``."""
    key = str(name).strip().lower()
    if key not in VALID_TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer {name!r}; valid names: {', '.join(VALID_TOKENIZERS)}")
    TokenizerSpec(key, *(None if v is None else str(v) for v in (encoder_json, vocab_bpe, path, revision))).check()
    if key == "hf":
        return HFTokenizer.load(str(path), revision)
    if key == "char":
        if train_text_path is None:
            raise TokenizerError("the char tokenizer needs the training text (train_text_path) to build its vocabulary")
        return CharTokenizer.from_file(train_text_path)
    have = [p is not None for p in (encoder_json, vocab_bpe)]
    if key == "tiktoken":
        if any(have):
            raise TokenizerError(
                "tokenizer 'tiktoken' uses tiktoken's download/cache and ignores local files; "
                "use 'bpe' (or 'gpt2') to build from tokenizer.encoder_json and tokenizer.vocab_bpe"
            )
        return gpt2_from_tiktoken()
    if any(have) and not all(have):
        missing = "tokenizer.vocab_bpe" if have[0] else "tokenizer.encoder_json"
        raise TokenizerError(
            "GPT-2 BPE from local files needs both tokenizer.encoder_json and tokenizer.vocab_bpe; "
            f"{missing} is missing"
        )
    if key == "bpe" and not all(have):
        raise TokenizerError(
            "tokenizer 'bpe' builds GPT-2 BPE from local files: give tokenizer.encoder_json and "
            "tokenizer.vocab_bpe (GPT-2's encoder.json and vocab.bpe), or use 'tiktoken'"
        )
    if all(have):
        return gpt2_from_files(encoder_json, vocab_bpe)  # type: ignore[arg-type]
    return gpt2_from_tiktoken()


@dataclass(frozen=True)
class TokenizerSpec:
    """The config's ``tokenizer`` block: a name plus optional GPT-2 file paths, or an hf
    tokenizer's ``path`` and ``revision``."""

    name: str
    encoder_json: str | None = None
    vocab_bpe: str | None = None
    path: str | None = None
    revision: str | None = None

    @classmethod
    def from_config(cls, value: "str | Mapping[str, Any] | TokenizerSpec") -> "TokenizerSpec":
        if isinstance(value, TokenizerSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, Mapping):
            allowed = ("name", "encoder_json", "vocab_bpe", "path", "revision")
            unknown = set(value) - set(allowed)
            if unknown:
                raise TokenizerError(f"unknown tokenizer config keys: {sorted(unknown)}; allowed: {', '.join(allowed)}")
            if "name" not in value:
                raise TokenizerError("tokenizer config needs a `name` (one of: " + ", ".join(VALID_TOKENIZERS) + ")")
            spec = cls(name=str(value["name"]), **{k: None if value.get(k) is None else str(value[k]) for k in allowed[1:]})
            spec.check()
            return spec
        raise TokenizerError(f"cannot read a tokenizer spec from {value!r}")

    def check(self) -> None:
        """The keys that go together: ``path``/``revision`` with ``hf`` only (which needs a
        ``path``), the GPT-2 files never with ``hf``; one TokenizerError names the key."""
        hf = self.name.strip().lower() == "hf"
        if hf and not self.path:
            raise TokenizerError("tokenizer.name: hf needs tokenizer.path: a Hugging Face hub id (e.g. gpt2, "
                                 "meta-llama/Llama-3.2-1B) or a local folder written by save_pretrained")
        if hf and (self.encoder_json or self.vocab_bpe):
            raise TokenizerError("tokenizer.encoder_json and tokenizer.vocab_bpe are GPT-2 BPE files; "
                                 "tokenizer.name: hf reads tokenizer.path: remove them")
        if not hf and (self.path is not None or self.revision is not None):
            key = "tokenizer.path" if self.path is not None else "tokenizer.revision"
            raise TokenizerError(f"{key} is read by tokenizer.name: hf only (got name {self.name!r}): "
                                 "remove it, or set tokenizer.name: hf")


def build_tokenizer(
    spec: "TokenizerSpec | Mapping[str, Any] | str", train_text_path: str | os.PathLike[str] | None = None
) -> Tokenizer:
    """``create_tokenizer`` driven by a spec / config mapping (design.md's entry point)."""
    spec = TokenizerSpec.from_config(spec)
    return create_tokenizer(spec.name, train_text_path, spec.encoder_json, spec.vocab_bpe, spec.path, spec.revision)


def load_tokenizer(
    path: str | os.PathLike[str],
    encoder_json: str | os.PathLike[str] | None = None,
    vocab_bpe: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Rebuild a tokenizer from the JSON written by ``save``.

    GPT-2: explicit paths win; else the saved paths if they still exist; else the
    tiktoken cache. All routes are hash-checked to give the same ids. hf: its saved path
    and revision, whose files must still hash as saved (else the ids may differ from
    those of the token files made with it).
    """
    path = Path(path)
    if path.is_dir():
        raise TokenizerError(f"tokenizer file {path} is a directory: give the tokenizer JSON file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"tokenizer file {path} is unreadable or not JSON ({e}); delete it and rerun") from None
    if not isinstance(d, dict) or "type" not in d:
        raise TokenizerError(f"tokenizer file {path} has no 'type'; delete it and rerun")
    kind = d["type"]
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, list):
            raise TokenizerError(f"tokenizer file {path} lacks the char vocabulary; delete it and rerun")
        tok: Tokenizer = CharTokenizer(chars)
    elif kind == "gpt2":
        if encoder_json is not None or vocab_bpe is not None:
            tok = create_tokenizer("gpt2", encoder_json=encoder_json, vocab_bpe=vocab_bpe)
        elif all(d.get(k) and Path(d[k]).is_file() for k in ("encoder_json", "vocab_bpe")):
            tok = gpt2_from_files(d["encoder_json"], d["vocab_bpe"])
        else:
            tok = gpt2_from_tiktoken()
    elif kind == "hf":
        tok = _hf_from_saved(d, path)
    else:
        raise TokenizerError(f"tokenizer file {path} has unknown type {kind!r}")
    if "vocab_size" in d and int(d["vocab_size"]) != tok.vocab_size:
        raise TokenizerError(f"tokenizer file {path} says vocab_size {d['vocab_size']} but rebuilt {tok.vocab_size}")
    return tok


def _hf_from_saved(saved: Mapping[str, Any], file: Path) -> HFTokenizer:
    """The hf tokenizer a saved JSON describes, refused when its files changed since."""
    if not isinstance(saved.get("path"), str) or not isinstance(saved.get("files_sha256"), dict):
        raise TokenizerError(f"tokenizer file {file} lacks the hf tokenizer's path or file hashes; delete it and rerun")
    tok = HFTokenizer.load(saved["path"], saved.get("revision"), where=f"tokenizer file {file}: path")
    if tok.files_sha256 != saved["files_sha256"]:
        changed = sorted(k for k in set(tok.files_sha256) | set(saved["files_sha256"])
                         if tok.files_sha256.get(k) != saved["files_sha256"].get(k))
        raise TokenizerError(
            f"the hf tokenizer {saved['path']!r} has changed since {file} was written ({', '.join(changed)} differ), "
            f"so its ids may not be those of the token files made with it: delete {file} to build the tokenizer "
            "and tokenize again (the workflow then reruns what depends on it), or restore the old files"
        )
    return tok


def tokenizer_from(
    value: str | os.PathLike[str],
    train_text_path: str | os.PathLike[str] | None = None,
    encoder_json: str | os.PathLike[str] | None = None,
    vocab_bpe: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
) -> Tokenizer:
    """A tokenizer named by one string: the JSON file ``save`` wrote (:func:`load_tokenizer`)
    or, where no such file exists, a tokenizer name (:func:`create_tokenizer`; ``hf``
    reads ``path`` and ``revision``)."""
    if str(value).strip().lower() in VALID_TOKENIZERS and not Path(value).is_file():
        return create_tokenizer(str(value), train_text_path, encoder_json, vocab_bpe, path, revision)
    return load_tokenizer(value, encoder_json, vocab_bpe)
