"""Corpus download/copy, token files and batching."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
import types
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tga import data
from tga.data import (
    DataError,
    RareTokenRelabeler,
    cached_token_files,
    copy_text_splits,
    corpus_origin,
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
from tga.corpus import holdout_split
from tga.seen_prompts import read_prompts, training_text_warnings, write_seen_prompts_table
from tga.settings import merged_config
from tga.tokenizers import CharTokenizer, create_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "wikitext-2-sample"

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


def _no_probe(timeout: float) -> None:
    raise AssertionError("offline, the hub must not be probed: datasets reads its own cache")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_download_offline_loads_the_datasets_cache(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """Offline, `datasets` is still asked (in its offline mode it answers from its cache),
    with no probe of the hub; no URL is tried once it has answered."""
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(data, "_hf_reachable", _no_probe)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({s: hf_rows(t) for s, t in FAKE_RAW.items()}))
    download_wikitext2(tmp_path, member_sha256=FAKE_SHA)  # urlopen fails (no_network): the cache it is
    for split, text in FAKE_RAW.items():
        assert (tmp_path / f"{split}.txt").read_bytes() == text.encode("utf-8")


def test_download_offline_without_the_cache_keeps_the_clear_error(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "_hf_reachable", _no_probe)
    # what datasets 5 raises offline for a dataset it has not cached
    missing = ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(missing))
    out = tmp_path / "corpus"
    with pytest.raises(DataError) as e:
        download_wikitext2(out)
    msg = str(e.value)
    assert "only the datasets cache was tried" in msg and "OfflineModeIsEnabled" in msg
    assert all(url in msg for url in data.WIKITEXT2_URLS)
    assert "data.archive" in msg and "data.source: text" in msg
    assert list(out.iterdir()) == []


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


# ----------------------------------------------------------------------------- validation holdout


def wikitext_like(n_articles: int, lines_each: int = 3) -> bytes:
    """Articles laid out as in the raw files: " \\n = Title = \\n \\n" then text and sections."""
    parts = []
    for a in range(n_articles):
        body = "".join(f" Article {a} line {i} , with words . \n \n" for i in range(lines_each + a % 3))
        parts.append(f" \n = Title {a} = \n \n{body} = = Section {a} = = \n \n More text {a} . \n")
    return "".join(parts).encode("utf-8")


def test_holdout_is_deterministic_disjoint_and_covers_the_text() -> None:
    text = wikitext_like(20)
    kept, held, info = holdout_split(text, 0.25)
    assert kept + held == text  # covers the input, nothing twice
    assert (kept, held, info) == holdout_split(text, 0.25)  # the same split every time
    assert held.startswith(b" \n = Title ") and info["unit"] == "article"
    # whole articles: no title on both sides, and the held-out ones are the last
    titles = lambda part: set(re.findall(rb" = (Title \d+) = ", part))  # noqa: E731
    assert not titles(kept) & titles(held)
    assert titles(held) == {f"Title {a}".encode() for a in range(20 - info["articles_held_out"], 20)}
    assert info["articles_kept"] + info["articles_held_out"] == 20 and info["cut_byte"] == len(kept)
    # the article start nearest the target: no other start is closer to 75% of the bytes
    starts = [m.start() - len(b" \n") for m in re.finditer(rb" = Title \d+ = ", text)]  # at the blank line above
    target = 0.75 * len(text)
    assert info["cut_byte"] in starts
    assert all(abs(info["cut_byte"] - target) <= abs(s - target) for s in starts if s > 0)
    assert abs(info["held_out_fraction"] - 0.25) < max(b - a for a, b in zip(starts, starts[1:] + [len(text)])) / len(text)


def test_holdout_of_text_without_headings_cuts_at_a_line() -> None:
    text = "".join(f"line {i:02d} of plain text\n" for i in range(40)).encode()
    kept, held, info = holdout_split(text, 0.1)
    assert info["unit"] == "line" and kept + held == text
    assert kept.endswith(b"\n") and held.startswith(b"line ") and held.count(b"\n") == 4


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.1", True, None, float("nan")])
def test_holdout_bad_fraction_is_one_clear_error(fraction: object) -> None:
    with pytest.raises(DataError) as e:
        holdout_split(wikitext_like(5), fraction, what="data.train (my.txt)")
    assert str(e.value).startswith("data.validation_holdout must be a fraction strictly between 0 and 1")
    assert "my.txt" in str(e.value) and repr(fraction) in str(e.value)


def test_holdout_of_a_one_line_text_names_it() -> None:
    with pytest.raises(DataError, match=r"data\.train \(tiny.txt\) cannot be split .* no line boundary"):
        holdout_split(b"just one line\n", 0.5, what="data.train (tiny.txt)")


def test_prepare_corpus_holds_validation_out_of_train_and_records_it(tmp_path: Path) -> None:
    train = tmp_path / "train.raw"
    train.write_bytes(wikitext_like(10))
    config = {"source": "text", "train": str(train), "test": str(SAMPLE / "test.txt"), "validation_holdout": 0.2}
    out = tmp_path / "corpus"
    meta = prepare_corpus(config, out)
    kept, held = (out / "train.txt").read_bytes(), (out / "validation.txt").read_bytes()
    assert kept + held == train.read_bytes() and held.startswith(b" \n = Title ")
    assert json.loads((out / "splits.json").read_text()) == meta
    assert meta["validation_holdout"] == 0.2
    assert meta["splits"]["train"] == {"from": str(train), "bytes": [0, len(kept)], "sha256": sha(kept)}
    validation = meta["splits"]["validation"]
    assert validation["from"] == str(train) and validation["bytes"] == [len(kept), len(kept) + len(held)]
    assert validation["sha256"] == sha(held) and validation["held_out"]["unit"] == "article"
    assert meta["splits"]["test"]["from"] == str(SAMPLE / "test.txt")

    # the token file's sidecar says what text it holds
    tokens = tokenize_to_file(out / "validation.txt", CharTokenizer.from_text(kept.decode()), out / "validation.bin",
                              origin=corpus_origin(out / "splits.json", "validation"))
    assert read_token_metadata(out / "validation.bin")["origin"] == validation == tokens["origin"]

    with pytest.raises(DataError, match="data.validation and data.validation_holdout are both set"):
        prepare_corpus({**config, "validation": str(SAMPLE / "validation.txt")}, tmp_path / "both")
    assert not (tmp_path / "both").exists()
    with pytest.raises(DataError, match="corpus metadata .*nowhere.json not found"):
        corpus_origin(tmp_path / "nowhere.json", "train")


def test_prepare_corpus_without_holdout_records_the_files(tmp_path: Path) -> None:
    splits = {s: str(SAMPLE / f"{s}.txt") for s in data.SPLITS}
    meta = prepare_corpus({"source": "text", **splits}, tmp_path)
    assert meta["validation_holdout"] is None
    for split in data.SPLITS:
        body = (SAMPLE / f"{split}.txt").read_bytes()
        assert meta["splits"][split] == {"from": splits[split], "bytes": [0, len(body)], "sha256": sha(body)}


def test_prepare_corpus_holds_out_of_a_downloaded_train_split(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = {**FAKE_RAW, "train": wikitext_like(8).decode()}
    monkeypatch.setattr(data, "WIKITEXT2_MEMBER_SHA256", {s: sha(t.encode()) for s, t in raw.items()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from the datasets cache
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({s: hf_rows(t) for s, t in raw.items()}))
    meta = prepare_corpus({"source": "wikitext2", "archive": None, "validation_holdout": 0.3}, tmp_path)
    train = (tmp_path / "train.txt").read_bytes()
    assert train + (tmp_path / "validation.txt").read_bytes() == raw["train"].encode()
    assert (tmp_path / "test.txt").read_text() == FAKE_RAW["test"]
    assert meta["splits"]["validation"]["from"].startswith("wiki.train.raw (Hugging Face dataset")


def test_proxy_holdout_of_wiki_valid(shared_data_dir: Path) -> None:
    """The figures config/proxy.yaml's comment quotes, from the real file."""
    proxy = yaml.safe_load((ROOT / "config" / "proxy.yaml").read_text())
    text = (shared_data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_bytes()
    kept, held, info = holdout_split(text, proxy["data"]["validation_holdout"])
    assert (len(text), info["held_out_bytes"], info["articles_held_out"], info["articles_kept"]) == (1_146_846, 126_939, 6, 54)
    assert held.startswith(b" \n = Where the Streets Have No Name = \n")
    assert "last 11%" in proxy["data"]["label"] and round(100 * info["held_out_fraction"]) == 11


# ----------------------------------------------------------------------------- prompts the model has read


def test_quick_config_prompts_are_not_in_its_training_text() -> None:
    config = merged_config([ROOT / "config" / "config.yaml", ROOT / "config" / "quick.yaml"])
    prompts = config["geometry"]["prompts"]
    assert prompts == "config/prompts-test.txt"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        train = Path(config["data"]["train"]).read_text(encoding="utf-8")
        assert training_text_warnings(config["data"], prompts, None) == []
        assert all(p not in train for _, p in read_prompts(prompts))
        # the char vocabulary built from train.txt covers every prompt: no <unk> in the figures
        assert set("".join(p for _, p in read_prompts(prompts))) <= set(train)
        # the check finds what it should: the old prompts, cut from wiki.valid.raw, include 4 the sample trains on
        old = training_text_warnings(config["data"], "config/prompts.txt", None)
    assert [line.split(" (line")[0] for line in old] == [f"geometry.prompts: prompt {i}" for i in range(4)]
    assert old[0] == ('geometry.prompts: prompt 0 (line 10 of config/prompts.txt: "Homarus gammarus , known as the '
                      'European ...") appears verbatim in the training text (data.train); the model has read it')


def test_prompt_files_are_cut_from_the_files_they_name(shared_data_dir: Path) -> None:
    """prompts-test.txt comes from wiki.test.raw (so neither the quick nor the proxy config
    trains on it); each prompt sits on the line its comment names."""
    raw = (shared_data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    lines = (ROOT / "config" / "prompts-test.txt").read_text(encoding="utf-8").splitlines()
    prompts = read_prompts(ROOT / "config" / "prompts-test.txt")
    assert len(prompts) == 16
    for number, prompt in prompts:
        where = int(re.search(r"\(line (\d+);", lines[number - 2]).group(1))
        assert raw[where - 1].strip().startswith(prompt)
    proxy = merged_config([ROOT / "config" / "config.yaml", ROOT / "config" / "proxy.yaml"])
    data_config = {**proxy["data"], "train": str(shared_data_dir / "wikitext-2-raw" / "wiki.valid.raw")}
    assert training_text_warnings(data_config, ROOT / proxy["geometry"]["prompts"], None) == []
    # proxy trained on 14 of config/prompts.txt's 16 (two lie in the held-out articles)
    assert len(training_text_warnings(data_config, ROOT / "config" / "prompts.txt", None)) == 14


def test_seen_prompts_table_flags_each_prompt(tmp_path: Path) -> None:
    """The workflow's record of which prompts the model read (check_prompts rule)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('# two prompts\nA prompt , "quoted" .\n\nNot in the text .\n')
    train = tmp_path / "train.txt"
    train.write_text(' = T = \n Before . A prompt , "quoted" . After .\n')
    lines = write_seen_prompts_table(prompts, train, tmp_path / "seen.csv", "data.train")
    table = list(csv.DictReader((tmp_path / "seen.csv").open()))
    assert [(r["prompt"], r["line"], r["in_training_text"], r["text"]) for r in table] == [
        ("0", "2", "True", 'A prompt , "quoted" .'), ("1", "4", "False", "Not in the text .")]
    assert lines == [f'geometry.prompts: prompt 0 (line 2 of {prompts}: "A prompt , "quoted" .") appears verbatim '
                     "in the training text (data.train); the model has read it"]


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


def test_a_large_split_is_copied_in_chunks_into_the_same_tensor(tmp_path, monkeypatch):
    """Past TOKEN_COPY_CHUNK tokens the split is converted chunk by chunk (no whole int32
    copy on the host); every token lands where one conversion puts it, the ragged last
    chunk included."""
    import tga.data as data

    ids = np.random.default_rng(0).integers(0, 65535, size=1000, dtype=np.uint16)
    whole = tokens_to_tensor(ids)
    monkeypatch.setattr(data, "TOKEN_COPY_CHUNK", 64)
    chunked = tokens_to_tensor(ids)
    assert chunked.dtype == torch.int32 and chunked.shape == (1000,)
    assert torch.equal(chunked, whole)
    assert torch.equal(chunked, torch.from_numpy(ids.astype(np.int64)).to(torch.int32))
