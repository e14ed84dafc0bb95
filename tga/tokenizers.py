"""Text <-> token ids.

Two tokenizers are supported:

* ``char``: one id per Unicode character seen in the training text, plus ``<unk>``
  (id 0) for anything unseen. The vocabulary is stored in the tokenizer JSON so a
  run can be re-evaluated later with exactly the same ids.
* ``gpt2``: the real GPT-2 byte-pair encoding (50257 ids) via tiktoken, built either
  from local ``encoder.json``/``vocab.bpe`` files or from tiktoken's download cache.
  Aliases: ``bpe`` (local files, paths required) and ``tiktoken`` (cache/download).
  All three names give byte-identical ids, so the resulting tokenizer is always
  called ``gpt2``.
"""

from __future__ import annotations

import contextlib
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
    "Tokenizer",
    "TokenizerError",
    "TokenizerSpec",
    "VALID_TOKENIZERS",
    "build_tokenizer",
    "create_tokenizer",
    "load_tokenizer",
    "tokenizer_from",
]

VALID_TOKENIZERS = ("char", "gpt2", "bpe", "tiktoken")
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
# Keys of a GPT-2 tokenizer JSON that say how it was built, not which ids it gives
# (every route is hash-checked to give the same ids).
_ROUTE_KEYS = ("source", "encoder_json", "vocab_bpe")

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
    #: Whether ``encode`` puts a BOS token first. tga's char and GPT-2 tokenizers add no
    #: special token, so ``geometry.exclude_first_token: auto`` keeps position 0 for them.
    adds_bos: bool = False

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


def create_tokenizer(
    name: str,
    train_text_path: str | os.PathLike[str] | None = None,
    encoder_json: str | os.PathLike[str] | None = None,
    vocab_bpe: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Build a tokenizer by name; ``char`` needs ``train_text_path``, ``bpe`` the two files."""
    key = str(name).strip().lower()
    if key not in VALID_TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer {name!r}; valid names: {', '.join(VALID_TOKENIZERS)}")
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
    """The config's ``tokenizer`` block: a name plus optional GPT-2 file paths."""

    name: str
    encoder_json: str | None = None
    vocab_bpe: str | None = None

    @classmethod
    def from_config(cls, value: "str | Mapping[str, Any] | TokenizerSpec") -> "TokenizerSpec":
        if isinstance(value, TokenizerSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"name", "encoder_json", "vocab_bpe"}
            if unknown:
                raise TokenizerError(
                    f"unknown tokenizer config keys: {sorted(unknown)}; allowed: name, encoder_json, vocab_bpe"
                )
            if "name" not in value:
                raise TokenizerError("tokenizer config needs a `name` (one of: " + ", ".join(VALID_TOKENIZERS) + ")")
            return cls(
                name=str(value["name"]),
                encoder_json=None if value.get("encoder_json") is None else str(value["encoder_json"]),
                vocab_bpe=None if value.get("vocab_bpe") is None else str(value["vocab_bpe"]),
            )
        raise TokenizerError(f"cannot read a tokenizer spec from {value!r}")


def build_tokenizer(
    spec: "TokenizerSpec | Mapping[str, Any] | str", train_text_path: str | os.PathLike[str] | None = None
) -> Tokenizer:
    """``create_tokenizer`` driven by a spec / config mapping (design.md's entry point)."""
    spec = TokenizerSpec.from_config(spec)
    return create_tokenizer(spec.name, train_text_path, spec.encoder_json, spec.vocab_bpe)


def load_tokenizer(
    path: str | os.PathLike[str],
    encoder_json: str | os.PathLike[str] | None = None,
    vocab_bpe: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Rebuild a tokenizer from the JSON written by ``save``.

    GPT-2: explicit paths win; else the saved paths if they still exist; else the
    tiktoken cache. All routes are hash-checked to give the same ids.
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
    else:
        raise TokenizerError(f"tokenizer file {path} has unknown type {kind!r}")
    if "vocab_size" in d and int(d["vocab_size"]) != tok.vocab_size:
        raise TokenizerError(f"tokenizer file {path} says vocab_size {d['vocab_size']} but rebuilt {tok.vocab_size}")
    return tok


def tokenizer_from(
    value: str | os.PathLike[str],
    train_text_path: str | os.PathLike[str] | None = None,
    encoder_json: str | os.PathLike[str] | None = None,
    vocab_bpe: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """A tokenizer named by one string: the JSON file ``save`` wrote (:func:`load_tokenizer`)
    or, where no such file exists, a tokenizer name (:func:`create_tokenizer`)."""
    if str(value).strip().lower() in VALID_TOKENIZERS and not Path(value).is_file():
        return create_tokenizer(str(value), train_text_path, encoder_json, vocab_bpe)
    return load_tokenizer(value, encoder_json, vocab_bpe)
