"""Corpus download/copy, token files and batching."""

from __future__ import annotations

import hashlib
import json
import sys
import types
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tga import data
from tga.data import (
    DataError,
    RareTokenRelabeler,
    cached_token_files,
    copy_text_splits,
    download_wikitext2,
    load_token_file,
    non_overlapping_windows,
    prepare_corpus,
    read_token_metadata,
    sample_batch,
    token_file_is_current,
    tokenize_to_file,
    tokens_to_tensor,
)
from tga.tokenizers import CharTokenizer, create_tokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "wikitext-2-sample"

# Small stand-ins for the three raw files, in WikiText's layout (blank lines are " \n").
FAKE_RAW = {
    "train": " \n = Train = \n \n Some train text , with words . \n \n",
    "validation": " \n = Valid = \n \n Valid text 2 . \n",
    "test": " \n = Test = \n \n Tést text ☃ . \n",
}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


FAKE_SHA = {s: sha(t.encode("utf-8")) for s, t in FAKE_RAW.items()}


def make_zip(path: Path, texts: dict[str, str] = FAKE_RAW) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for split, member in data.WIKITEXT2_MEMBERS.items():
            zf.writestr(f"wikitext-2-raw/{member}", texts[split].encode("utf-8"))
    return sha(path.read_bytes())


def fake_datasets(rows_by_split: dict[str, list[str]] | Exception) -> types.ModuleType:
    """A stand-in `datasets` module: importing the real one is slow and it needs the hub."""
    mod = types.ModuleType("datasets")

    def load_dataset(*args: object, **kwargs: object) -> dict:
        if isinstance(rows_by_split, Exception):
            raise rows_by_split
        assert args == data.HF_DATASET
        return {s: {"text": rows} for s, rows in rows_by_split.items()}

    mod.load_dataset = load_dataset  # type: ignore[attr-defined]
    return mod


def hf_rows(text: str) -> list[str]:
    """How the HF wikitext dataset stores a raw file: its lines, blank ones as ""."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub and urllib both fail, as on an offline machine."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "_hf_reachable", lambda timeout: None)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(ConnectionError("Couldn't reach the Hub")))

    def urlopen(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


# ----------------------------------------------------------------------------- download


def test_download_offline_gives_one_clear_error(tmp_path: Path, no_network: None) -> None:
    out = tmp_path / "corpus"
    with pytest.raises(DataError) as e:
        download_wikitext2(out)
    msg = str(e.value)
    assert "failed" in msg
    assert "Couldn't reach the Hub" in msg
    for url in data.WIKITEXT2_URLS:
        assert url in msg
    assert "data.source: text" in msg and "data.train" in msg
    assert "data.archive" in msg and data.WIKITEXT2_ZIP_SHA256 in msg
    assert list(out.iterdir()) == []


def test_download_skips_hf_when_offline_env_set(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(AssertionError("must not be called")))
    with pytest.raises(DataError, match="skipped"):
        download_wikitext2(tmp_path)


def test_download_from_hf_rebuilds_raw_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hf_reachable", lambda timeout: None)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({s: hf_rows(t) for s, t in FAKE_RAW.items()}))
    download_wikitext2(tmp_path, urls=[], member_sha256=FAKE_SHA)
    for split, text in FAKE_RAW.items():
        assert (tmp_path / f"{split}.txt").read_bytes() == text.encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.txt", "train.txt", "validation.txt"]


def test_hf_rebuild_matches_real_raw_hashes(shared_data_dir: Path) -> None:
    """The blank-line rule reproduces the real files, whose hashes are our defaults."""
    for split, member in (("validation", "wiki.valid.raw"), ("test", "wiki.test.raw")):
        raw = (shared_data_dir / "wikitext-2-raw" / member).read_bytes()
        assert sha(raw) == data.WIKITEXT2_MEMBER_SHA256[split]
        rows = hf_rows(raw.decode("utf-8"))
        assert "".join(r if r else " \n" for r in rows).encode("utf-8") == raw


def test_download_falls_back_to_zip_when_hf_text_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hf_reachable", lambda timeout: None)
    altered = {s: hf_rows(t + "extra line \n") for s, t in FAKE_RAW.items()}
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(altered))
    archive = tmp_path / "mirror" / "w.zip"
    archive.parent.mkdir()
    zsha = make_zip(archive)
    out = tmp_path / "out"
    download_wikitext2(out, urls=[archive.as_uri()], zip_sha256=zsha, member_sha256=FAKE_SHA)
    assert (out / "train.txt").read_text(encoding="utf-8") == FAKE_RAW["train"]


def test_download_zip_fallback(tmp_path: Path) -> None:
    archive = tmp_path / "mirror" / "wikitext-2-raw-v1.zip"
    archive.parent.mkdir()
    zsha = make_zip(archive)
    out = tmp_path / "out"
    dead = (tmp_path / "absent.zip").as_uri()  # first mirror fails, second works
    download_wikitext2(out, urls=[dead, archive.as_uri()], zip_sha256=zsha, member_sha256=FAKE_SHA, use_hf=False)
    for split, text in FAKE_RAW.items():
        assert (out / f"{split}.txt").read_bytes() == text.encode("utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["test.txt", "train.txt", "validation.txt"]


def test_download_zip_hash_mismatch_leaves_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "w.zip"
    make_zip(archive)
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        download_wikitext2(out, urls=[archive.as_uri()], member_sha256=FAKE_SHA, use_hf=False)
    assert "sha256" in str(e.value) and data.WIKITEXT2_ZIP_SHA256 in str(e.value)
    assert list(out.iterdir()) == []


def test_download_member_hash_mismatch(tmp_path: Path) -> None:
    archive = tmp_path / "w.zip"
    zsha = make_zip(archive)
    wrong = dict(FAKE_SHA, test="0" * 64)
    with pytest.raises(DataError, match="wiki.test.raw"):
        download_wikitext2(
            tmp_path / "out", urls=[archive.as_uri()], zip_sha256=zsha, member_sha256=wrong, use_hf=False
        )
    assert list((tmp_path / "out").iterdir()) == []


def test_download_from_local_archive_uses_no_network(tmp_path: Path, no_network: None) -> None:
    archive = tmp_path / "w.zip"
    zsha = make_zip(archive)
    out = tmp_path / "out"
    download_wikitext2(out, archive=archive, zip_sha256=zsha, member_sha256=FAKE_SHA)
    assert (out / "validation.txt").read_text(encoding="utf-8") == FAKE_RAW["validation"]
    with pytest.raises(DataError, match="not found"):
        download_wikitext2(out, archive=tmp_path / "missing.zip")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        download_wikitext2(out, archive=tmp_path / "bad.zip", zip_sha256=None)


# ----------------------------------------------------------------------------- sample corpus


def test_sample_is_cut_from_the_real_files(shared_data_dir: Path) -> None:
    valid = (shared_data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_bytes()
    test = (shared_data_dir / "wikitext-2-raw" / "wiki.test.raw").read_bytes()
    train_s = (SAMPLE / "train.txt").read_bytes()
    val_s = (SAMPLE / "validation.txt").read_bytes()
    assert train_s == valid[:120540]
    assert val_s == valid[120540:135870]
    assert (SAMPLE / "test.txt").read_bytes() == test[:20504]
    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    for name in ("train.txt", "validation.txt", "test.txt"):
        assert sha((SAMPLE / name).read_bytes()) in readme


# ----------------------------------------------------------------------------- copy splits


def test_copy_text_splits(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    copy_text_splits(SAMPLE / "train.txt", SAMPLE / "validation.txt", SAMPLE / "test.txt", out)
    for split in data.SPLITS:
        assert (out / f"{split}.txt").read_bytes() == (SAMPLE / f"{split}.txt").read_bytes()


@pytest.mark.parametrize(
    "content, match",
    [(None, "validation split file not found"), (b"", "empty"), (b" \n\n", "empty"), (b"caf\xe9\n", "UTF-8")],
)
def test_copy_text_splits_names_bad_file(tmp_path: Path, content: bytes | None, match: str) -> None:
    bad = tmp_path / "val.txt"
    if content is not None:
        bad.write_bytes(content)
    out = tmp_path / "corpus"
    with pytest.raises(DataError, match=match) as e:
        copy_text_splits(SAMPLE / "train.txt", bad, SAMPLE / "test.txt", out)
    assert str(bad) in str(e.value) and "validation" in str(e.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_prepare_corpus_dispatches_on_source(tmp_path: Path) -> None:
    splits = {s: str(SAMPLE / f"{s}.txt") for s in data.SPLITS}
    prepare_corpus({"source": "text", "label": "x", "archive": None, **splits}, tmp_path / "a")
    assert (tmp_path / "a" / "test.txt").read_bytes() == (SAMPLE / "test.txt").read_bytes()

    archive = tmp_path / "w.zip"
    make_zip(archive)
    with pytest.raises(DataError, match="sha256"):  # archive route, checked against the real hash
        prepare_corpus({"source": "wikitext2", "archive": str(archive)}, tmp_path / "b")
    with pytest.raises(DataError, match="data.validation"):
        prepare_corpus({"source": "text", "train": splits["train"], "test": splits["test"]}, tmp_path / "c")
    with pytest.raises(DataError, match="wikitext2"):
        prepare_corpus({"source": "ptb"}, tmp_path / "d")


# ----------------------------------------------------------------------------- token files


def test_tokenize_to_file_uint16_roundtrip(tmp_path: Path) -> None:
    src = SAMPLE / "test.txt"
    text = src.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    out = tmp_path / "tokens" / "test.bin"
    out.parent.mkdir()
    meta = tokenize_to_file(src, tok, out)
    assert list(meta) == ["dtype", "n_tokens", "vocab_size", "tokenizer", "source", "n_bytes", "n_words", "sha256"]
    assert meta["dtype"] == "uint16" and meta["n_tokens"] == len(text) and meta["tokenizer"] == "char"
    assert meta["n_bytes"] == len(text.encode("utf-8")) and meta["n_words"] == len(text.split())
    assert meta["sha256"] == sha(out.read_bytes())
    assert out.stat().st_size == 2 * len(text)
    assert json.loads(out.with_suffix(".json").read_text()) == meta == read_token_metadata(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["test.bin", "test.json"]
    arr = load_token_file(out, verify_sha256=True)
    assert isinstance(arr, np.memmap) and arr.dtype == np.dtype("<u2")
    assert tok.decode(arr.tolist()) == text


def test_tokenize_to_file_gpt2(gpt2_files: dict[str, Path], tmp_path: Path) -> None:
    tok = create_tokenizer("bpe", **gpt2_files)
    src = SAMPLE / "test.txt"
    meta = tokenize_to_file(src, tok, tmp_path / "test.bin")
    arr = load_token_file(tmp_path / "test.bin")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"
    assert arr.tolist() == tok.encode(src.read_text(encoding="utf-8"))


class BigVocabTokenizer:
    """A plain encode/decode object (no encode_array) with ids beyond uint16."""

    name = "bigvocab"
    vocab_size = 200_000

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 70_000 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 70_000) for i in ids)


def test_tokenize_to_file_uint32_for_big_vocab(tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_text("big vocab ☃\n", encoding="utf-8")
    out = tmp_path / "t.bin"
    meta = tokenize_to_file(src, BigVocabTokenizer(), out)
    assert meta["dtype"] == "uint32" and out.stat().st_size == 4 * meta["n_tokens"]
    arr = load_token_file(out)
    assert arr.dtype == np.dtype("<u4") and int(arr.max()) > 65535
    assert BigVocabTokenizer().decode(arr.tolist()) == "big vocab ☃\n"


def test_tokenize_to_file_needs_two_tokens(tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_text("a", encoding="utf-8")
    with pytest.raises(DataError, match="at least 2"):
        tokenize_to_file(src, CharTokenizer.from_text("a"), tmp_path / "t.bin")
    assert not (tmp_path / "t.bin").exists() and not (tmp_path / "t.json").exists()


def test_truncated_or_corrupt_token_file_detected(tmp_path: Path) -> None:
    src = SAMPLE / "validation.txt"
    out = tmp_path / "v.bin"
    tokenize_to_file(src, CharTokenizer.from_text(src.read_text(encoding="utf-8")), out)
    payload = out.read_bytes()

    flipped = bytearray(payload)
    flipped[10] ^= 0x01
    out.write_bytes(bytes(flipped))
    load_token_file(out)  # same size: only the hash can tell
    with pytest.raises(DataError, match="sha256"):
        load_token_file(out, verify_sha256=True)

    out.write_bytes(payload[:-2])
    with pytest.raises(DataError) as e:
        load_token_file(out)
    assert "truncated" in str(e.value) and "Delete" in str(e.value) and str(out) in str(e.value)

    out.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="metadata"):
        load_token_file(out)


# ----------------------------------------------------------------------------- batches


def test_sample_batch_shapes_shift_and_determinism() -> None:
    n, batch, block = 1000, 8, 16
    tokens = torch.arange(n, dtype=torch.int32)
    g = torch.Generator().manual_seed(123)
    x, y = sample_batch(tokens, batch, block, g)
    assert x.shape == y.shape == (batch, block) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # tokens are positions: y is x shifted by one
    assert torch.equal(x, x[:, :1] + torch.arange(block))  # contiguous windows
    assert int(y.max()) <= n - 1 and int(x.min()) >= 0

    x2, y2 = sample_batch(tokens, batch, block, torch.Generator().manual_seed(123))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = sample_batch(tokens, batch, block, torch.Generator().manual_seed(124))
    assert not torch.equal(x, x3)


def test_sample_batch_reaches_both_ends() -> None:
    block = 4
    tokens = torch.arange(block + 1)
    x, y = sample_batch(tokens, 3, block, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(block).expand(3, block)) and int(y[0, -1]) == block
    tokens = torch.arange(10)
    starts = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        xb, _ = sample_batch(tokens, 16, block, g)
        starts.update(xb[:, 0].tolist())
    assert starts == set(range(10 - block))
    with pytest.raises(ValueError, match="block_size"):
        sample_batch(torch.arange(block), 1, block, g)


def _relabel_fixture() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, set[int]]:
    """Vocabulary of 40: tokens 0-9 are frequent (5 occurrences each), 10-39 occur
    at most twice (20-39 never), so with max_count=2 the rare pool is 10-39."""
    counts = torch.tensor([5] * 10 + [2] * 5 + [1] * 5 + [0] * 20)
    x = torch.tensor([[0, 10, 1, 10, 11, 2, 11, 10], [3, 12, 12, 4, 13, 5, 14, 12]])
    y = torch.cat([x[:, 1:], torch.tensor([[10], [13]])], dim=1)
    return counts, x, y, set(range(10, 40))


def test_rare_relabeling_is_one_bijection_of_the_rare_pool_per_window() -> None:
    counts, x, y, pool = _relabel_fixture()
    relabel = RareTokenRelabeler(counts, 40, max_count=2, probability=1.0)
    seen_changes = 0
    for seed in range(20):
        new_x, new_y = relabel(x, y, torch.Generator().manual_seed(seed))
        assert torch.equal(new_y[:, :-1], new_x[:, 1:])  # still x shifted by one
        for old_row, new_row in zip(torch.cat([x, y[:, -1:]], 1), torch.cat([new_x, new_y[:, -1:]], 1)):
            mapping: dict[int, int] = {}
            for old, new in zip(old_row.tolist(), new_row.tolist()):
                if old in pool:
                    assert new in pool
                    assert mapping.setdefault(old, new) == new  # consistent within the window
                    seen_changes += old != new
                else:
                    assert new == old  # frequent tokens are never touched
            assert len(set(mapping.values())) == len(mapping)  # distinct names stay distinct
    assert seen_changes > 0


def test_rare_relabeling_probability_and_determinism() -> None:
    counts, x, y, _ = _relabel_fixture()
    off = RareTokenRelabeler(counts, 40, max_count=2, probability=0.0)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    same_x, same_y = off(x, y, g)
    assert same_x is x and same_y is y and torch.equal(g.get_state(), before)  # draws nothing when off
    half = RareTokenRelabeler(counts, 40, max_count=2, probability=0.5)
    big_x = x.repeat(200, 1)
    big_y = y.repeat(200, 1)
    new_x, _ = half(big_x, big_y, torch.Generator().manual_seed(1))
    changed = (new_x != big_x).any(dim=1).float().mean().item()
    assert 0.35 < changed < 0.65
    again, _ = half(big_x, big_y, torch.Generator().manual_seed(1))
    assert torch.equal(new_x, again)
    none_rare = RareTokenRelabeler(torch.full((40,), 5), 40, max_count=2, probability=1.0)
    same_x, same_y = none_rare(x, y, torch.Generator().manual_seed(0))
    assert same_x is x and same_y is y


def test_cached_token_files_reuse_current_files_and_never_mix_tokenizers(tmp_path: Path) -> None:
    texts = {}
    for split in ("train", "test"):
        texts[split] = tmp_path / f"{split}.txt"
        texts[split].write_text((SAMPLE / f"{split}.txt").read_text(encoding="utf-8"), encoding="utf-8")
    tokenizer = CharTokenizer.from_text(texts["train"].read_text(encoding="utf-8"))
    folder = tmp_path / "tokens"
    lines: list[str] = []
    files = cached_token_files(tokenizer, texts, folder, report=lines.append)
    assert files == {"train": folder / "train.bin", "test": folder / "test.bin"}
    assert [ln.split()[0] for ln in lines] == ["tokenized", "tokenized"]
    assert tokenizer.matches_file(folder / "tokenizer.json")
    assert all(token_file_is_current(files[s], texts[s].resolve(), tokenizer) for s in texts)

    lines.clear()
    cached_token_files(tokenizer, texts, folder, report=lines.append)
    assert [ln.split()[0] for ln in lines] == ["reusing", "reusing"]

    # A changed text is encoded again; a truncated token file is not trusted.
    with open(texts["test"], "a", encoding="utf-8") as handle:
        handle.write("more text\n")
    files["train"].write_bytes(files["train"].read_bytes()[:-2])
    assert not token_file_is_current(files["test"], texts["test"].resolve(), tokenizer)
    lines.clear()
    cached_token_files(tokenizer, texts, folder, report=lines.append)
    assert [ln.split()[0] for ln in lines] == ["tokenized", "tokenized"]

    # Another vocabulary (of the same size, so only the saved tokenizer can tell): every
    # old file goes, even of a split not asked for.
    other = CharTokenizer([c if c != "a" else "\u03a9" for c in tokenizer.chars])
    lines.clear()
    cached_token_files(other, {"test": texts["test"]}, folder, report=lines.append)
    assert lines[0].startswith("tokenized") and not (folder / "train.bin").exists()
    assert other.matches_file(folder / "tokenizer.json") and not tokenizer.matches_file(folder / "tokenizer.json")


def test_batches_from_a_memmapped_token_file(tmp_path: Path) -> None:
    src = SAMPLE / "validation.txt"
    tok = CharTokenizer.from_text(src.read_text(encoding="utf-8"))
    tokenize_to_file(src, tok, tmp_path / "v.bin")
    mm = load_token_file(tmp_path / "v.bin")
    a = sample_batch(tokens_to_tensor(mm), 4, 32, torch.Generator().manual_seed(7))
    b = sample_batch(tokens_to_tensor(mm), 4, 32, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    full = torch.from_numpy(np.asarray(mm, dtype=np.int64))
    ref = sample_batch(full, 4, 32, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], ref[0]) and torch.equal(a[1], ref[1])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])


@pytest.mark.parametrize("n, block", [(2, 1), (2, 5), (17, 4), (16, 4), (101, 7), (50, 49)])
def test_non_overlapping_windows_score_each_target_once(n: int, block: int) -> None:
    offset = 3  # token value = position + offset, so pad zeros never look like data
    tokens = torch.arange(n) + offset
    inputs, targets, mask = non_overlapping_windows(tokens, block)
    k = -(-(n - 1) // block)
    assert inputs.shape == targets.shape == mask.shape == (k, block) and mask.dtype == torch.bool
    scored = (targets[mask] - offset).tolist()
    assert sorted(scored) == list(range(1, n)) and len(scored) == n - 1
    assert torch.equal(inputs[mask], targets[mask] - 1)
    assert torch.equal(inputs[:, 0] - offset, torch.arange(k) * block)  # window k starts at k*T
    assert (targets[~mask] == 0).all()
    with pytest.raises(ValueError):
        non_overlapping_windows(torch.arange(1), block)
