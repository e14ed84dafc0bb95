"""Tokenizers: char vocab + <unk>, GPT-2 BPE via local files and via tiktoken's cache."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from tga import tokenizers as tk
from tga.tokenizers import (
    CharTokenizer,
    TokenizerError,
    TokenizerSpec,
    build_tokenizer,
    create_tokenizer,
    load_tokenizer,
    tokenizer_from,
)

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "wikitext-2-sample"


@pytest.fixture
def fresh_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken caches encodings per process; hide that cache so get_encoding really runs."""
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


@pytest.fixture
def tiktoken_cache(shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, fresh_tiktoken: None) -> Path:
    cache = shared_data_dir / "gpt2" / "tiktoken_cache"
    if not cache.is_dir():
        pytest.skip(f"{cache} missing")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def gpt2_local(shared_data_dir: Path, gpt2_files: dict[str, Path]) -> tk.GPT2Tokenizer:
    tok = create_tokenizer("bpe", **gpt2_files)
    assert isinstance(tok, tk.GPT2Tokenizer)
    return tok


# ----------------------------------------------------------------------------- char


def test_char_roundtrip_and_vocab() -> None:
    text = "hello, world!\nÉtude ☃ — done.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.name == "char" and tok.eot_token is None  # no document separator id
    assert tok.vocab_size == len(set(text)) + 1
    assert tok.chars == sorted(set(text))
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert min(ids) >= 1 and max(ids) == tok.vocab_size - 1
    assert tok.decode(ids) == text
    # ids follow the sorted vocabulary, so the mapping is independent of text order
    assert tok.encode(tok.chars[0] + tok.chars[-1]) == [1, tok.vocab_size - 1]


def test_char_unknown_characters_map_to_unk() -> None:
    tok = CharTokenizer.from_text("abc")
    assert tok.encode("a😀zb\x00") == [1, 0, 0, 2, 0]
    assert tok.decode([1, 0, 2]) == "a\ufffdb"
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([4])


def test_char_encode_array_matches_encode() -> None:
    text = SAMPLE.joinpath("test.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text[: len(text) // 2])
    arr = tok.encode_array(text, dtype=np.uint16)
    assert arr.dtype == np.uint16
    assert arr.tolist() == [tok._stoi.get(c, 0) for c in text]


def test_char_save_load_roundtrip(tmp_path: Path) -> None:
    text = 'quote " back\\slash \x00 nul \t tab é ☃ 𝄞\n'
    tok = CharTokenizer.from_text(text)
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["type"] == "char" and saved["vocab_size"] == tok.vocab_size and saved["chars"] == tok.chars
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    again = load_tokenizer(path)
    assert isinstance(again, CharTokenizer)
    assert again.chars == tok.chars
    assert again.encode(text + "?") == tok.encode(text + "?")
    assert again.decode(again.encode(text)) == text


def test_create_char_from_file(tmp_path: Path) -> None:
    src = tmp_path / "train.txt"
    src.write_text("abba\n", encoding="utf-8")
    tok = create_tokenizer("char", train_text_path=src)
    assert tok.vocab_size == 4
    with pytest.raises(TokenizerError, match="train_text_path"):
        create_tokenizer("char")
    with pytest.raises(TokenizerError, match="not found"):
        create_tokenizer("char", train_text_path=tmp_path / "missing.txt")


def test_unknown_tokenizer_name_lists_valid_names() -> None:
    with pytest.raises(TokenizerError) as e:
        create_tokenizer("wordpiece")
    for name in ("char", "gpt2", "bpe", "tiktoken"):
        assert name in str(e.value)


def test_load_tokenizer_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="delete it"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- gpt2


def test_gpt2_from_local_files(gpt2_local: tk.GPT2Tokenizer) -> None:
    tok = gpt2_local
    assert tok.name == "gpt2" and tok.vocab_size == 50257 and tok.source == "files"
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_token == 50256
    # corpus text is data: "<|endoftext|>" is not turned into the special id
    assert 50256 not in tok.encode("a <|endoftext|> b")
    text = " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 \n"
    assert tok.decode(tok.encode(text)) == text
    assert "".join(tok.decode_tokens(tok.encode(text))) == text


def test_gpt2_local_files_do_not_touch_tiktoken_cache(
    gpt2_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tok = create_tokenizer("gpt2", **gpt2_files)
    assert tok.encode("Hello world") == [15496, 995]
    assert list(cache.iterdir()) == []
    assert tk.os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)


@pytest.mark.parametrize("name", ["gpt2", "tiktoken"])
def test_gpt2_from_tiktoken_cache(name: str, tiktoken_cache: Path) -> None:
    tok = create_tokenizer(name)
    assert isinstance(tok, tk.GPT2Tokenizer) and tok.source == "tiktoken"
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]


def test_both_gpt2_routes_and_chunking_agree(
    gpt2_local: tk.GPT2Tokenizer, tiktoken_cache: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = create_tokenizer("tiktoken")
    text = (shared_data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    expected = ref.encoding.encode_ordinary(text)
    assert gpt2_local.encoding.encode_ordinary(text) == expected
    # small chunks force many cuts; ids must not change at any of them
    monkeypatch.setattr(tk, "_CHUNK_CHARS", 997)
    arr = gpt2_local.encode_array(text, dtype=np.uint16)
    assert arr.dtype == np.uint16 and arr.tolist() == expected


def test_gpt2_chunk_cuts_never_change_ids(gpt2_local: tk.GPT2Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adversarial whitespace runs ("\\n\\n", "  x", tabs) around every possible cut."""
    rng = random.Random(0)
    alphabet = ["a", "b", "Z", "7", ".", "'", "s", " ", " ", "\n", "\n", "\t", "é", "☃", ")"]
    text = "".join(rng.choice(alphabet) for _ in range(20000))
    monkeypatch.setattr(tk, "_CHUNK_CHARS", 5)
    assert len(list(tk._safe_chunks(text, 5))) > 1000
    assert "".join(tk._safe_chunks(text, 5)) == text
    assert gpt2_local.encode_array(text).tolist() == gpt2_local.encoding.encode_ordinary(text)


def test_gpt2_download_failure_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_tiktoken: None
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache

    def offline(blobpath: str) -> bytes:
        raise ConnectionError(f"no network for {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(TokenizerError) as e:
        create_tokenizer("tiktoken")
    msg = str(e.value)
    assert "could not be downloaded" in msg
    assert "tokenizer.encoder_json" in msg and "tokenizer.vocab_bpe" in msg
    assert "TIKTOKEN_CACHE_DIR" in msg


def test_gpt2_missing_and_corrupt_files_are_named(gpt2_files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "encoder.json"
    with pytest.raises(TokenizerError) as e:
        create_tokenizer("bpe", encoder_json=missing, vocab_bpe=gpt2_files["vocab_bpe"])
    assert str(missing) in str(e.value) and "encoder_json" in str(e.value)

    corrupt = tmp_path / "vocab.bpe"
    corrupt.write_bytes(gpt2_files["vocab_bpe"].read_bytes()[:-1000])
    with pytest.raises(TokenizerError) as e:
        create_tokenizer("bpe", encoder_json=gpt2_files["encoder_json"], vocab_bpe=corrupt)
    assert str(corrupt) in str(e.value) and "sha256" in str(e.value)


def test_gpt2_route_argument_errors(gpt2_files: dict[str, Path]) -> None:
    with pytest.raises(TokenizerError, match="encoder_json"):
        create_tokenizer("bpe")
    with pytest.raises(TokenizerError, match="tokenizer.vocab_bpe is missing"):
        create_tokenizer("gpt2", encoder_json=gpt2_files["encoder_json"])
    with pytest.raises(TokenizerError, match="'bpe'"):
        create_tokenizer("tiktoken", **gpt2_files)


def test_gpt2_save_load(
    gpt2_local: tk.GPT2Tokenizer, gpt2_files: dict[str, Path], tiktoken_cache: Path, tmp_path: Path
) -> None:
    path = tmp_path / "tokenizer.json"
    gpt2_local.save(path)
    again = load_tokenizer(path)
    assert isinstance(again, tk.GPT2Tokenizer) and again.source == "files"
    assert again.encode("Hello world") == [15496, 995]
    # saved paths gone (another machine): the tiktoken cache gives the same encoding
    d = json.loads(path.read_text())
    d["encoder_json"] = str(tmp_path / "gone.json")
    path.write_text(json.dumps(d))
    moved = load_tokenizer(path)
    assert moved.source == "tiktoken" and moved.encode("Hello world") == [15496, 995]
    # explicit paths win
    copied = {k: Path(shutil.copy(v, tmp_path / v.name)) for k, v in gpt2_files.items()}
    assert load_tokenizer(path, **copied).encoder_json == copied["encoder_json"].resolve()


def test_build_tokenizer_from_spec(gpt2_files: dict[str, Path], tmp_path: Path) -> None:
    spec = {"name": "bpe", "encoder_json": str(gpt2_files["encoder_json"]), "vocab_bpe": str(gpt2_files["vocab_bpe"])}
    assert build_tokenizer(spec).encode("Hello world") == [15496, 995]
    src = tmp_path / "t.txt"
    src.write_text("xyz", encoding="utf-8")
    assert build_tokenizer(TokenizerSpec("char"), train_text_path=src).vocab_size == 4
    assert build_tokenizer("char", train_text_path=src).vocab_size == 4
    with pytest.raises(TokenizerError, match="unknown tokenizer config keys"):
        build_tokenizer({"name": "char", "vocab": 3})


def test_tokenizer_from_a_name_or_a_saved_file(gpt2_local: tk.GPT2Tokenizer, tiktoken_cache: Path,
                                               tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_text("xyz", encoding="utf-8")
    char = tokenizer_from("char", train_text_path=src)
    assert char.vocab_size == 4
    char.save(tmp_path / "char.json")
    assert tokenizer_from(tmp_path / "char.json").encode("zy") == [3, 2]
    with pytest.raises(TokenizerError, match="is a directory"):
        tokenizer_from(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        tokenizer_from(tmp_path / "missing.json")
    # How GPT-2's files were found does not make another tokenizer; another vocabulary does.
    gpt2_local.save(tmp_path / "gpt2.json")
    assert tokenizer_from("tiktoken").matches_file(tmp_path / "gpt2.json")
    assert not char.matches_file(tmp_path / "gpt2.json") and not char.matches_file(tmp_path / "missing.json")

