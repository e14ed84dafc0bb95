"""Any corpus through Hugging Face ``datasets`` (data.source: hf, tga/hf_corpus.py):
local parquet and json corpora written here, tokenized in shards by a byte tokenizer
whose ids the tests can compute by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tga import hf_corpus
from tga.corpus import DataError
from tga.data import load_token_file, read_token_metadata
from tga.schema import key_specs

SPLITS = ("train", "validation", "test")
N_DOCS, VALIDATION, TEST, SHARD = 43, 5, 4, 6
DOCS = [f"Document {i} \u00e9t\u00e9: " + "word " * (i % 9) + "x" * (i % 4) for i in range(N_DOCS)]


class ByteTokenizer:
    """One id per UTF-8 byte, shifted by ``offset``, and ``eot_token``: ids a test can
    compute itself. ``offset`` puts them above 65,535 for the uint32 path."""

    def __init__(self, vocab_size: int = 257, offset: int = 0, eot_token: int | None = 256) -> None:
        self.name, self.vocab_size, self.offset, self.eot_token = "bytes", vocab_size, offset, eot_token

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]


def expected_ids(docs: list[str], tok: ByteTokenizer) -> list[int]:
    return [i for doc in docs for i in tok.encode(doc) + [tok.eot_token]]


def data_config(**keys) -> dict:
    defaults = {key: spec.get("default") for key, spec in key_specs("data").items()}
    return {**defaults, "source": "hf", "validation_documents": VALIDATION, "test_documents": TEST,
            "shard_documents": SHARD, **keys}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The same documents as json lines and as parquet (with a second column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("corpus")
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)),
                                       encoding="utf-8")
    pq.write_table(pa.table({"id": list(range(N_DOCS)), "body": DOCS}), folder / "docs.parquet")
    return folder


def prepare(corpus: Path, out: Path, num_proc: int = 1, tok: ByteTokenizer | None = None, **keys) -> dict:
    keys.setdefault("dataset", "json")
    keys.setdefault("data_files", str(corpus / "docs.jsonl"))
    return hf_corpus.prepare_hf_corpus(data_config(**keys), tok or ByteTokenizer(), out / "tokens", out / "corpus",
                                       num_proc=num_proc, show_progress=False)


def split_bytes(out: Path) -> dict[str, bytes]:
    return {f"{split}.{ext}": (out / folder / f"{split}.{ext}").read_bytes()
            for split in SPLITS for folder, ext in (("tokens", "bin"), ("corpus", "txt"))}


@pytest.mark.workflow  # starts 4 processes
def test_parquet_with_1_process_equals_json_with_4_and_holds_the_documents_in_order(corpus, tmp_path):
    one = prepare(corpus, tmp_path / "one", 1, dataset="parquet", data_files=str(corpus / "docs.parquet"),
                  text_column="body")
    four = prepare(corpus, tmp_path / "four", 4)
    assert split_bytes(tmp_path / "one") == split_bytes(tmp_path / "four")
    assert one["splits"]["train"]["documents"] == four["splits"]["train"]["documents"] == [VALIDATION + TEST, N_DOCS]

    tok = ByteTokenizer()
    held_out = {"validation": DOCS[:VALIDATION], "test": DOCS[VALIDATION:VALIDATION + TEST],
                "train": DOCS[VALIDATION + TEST:]}
    for split, docs in held_out.items():
        tokens = load_token_file(tmp_path / "four" / "tokens" / f"{split}.bin", verify_sha256=True)
        assert tokens.dtype == np.uint16 and tokens.tolist() == expected_ids(docs, tok)
        text = (tmp_path / "four" / "corpus" / f"{split}.txt").read_text(encoding="utf-8")
        assert text == "".join(d + hf_corpus.DOCUMENT_SEPARATOR for d in docs)
        meta = read_token_metadata(tmp_path / "four" / "tokens" / f"{split}.bin")
        assert meta["separator"]["eot_token"] == 256 and meta["n_bytes"] == len(text.encode())
        assert meta["origin"]["held_out"] == (split != "train")
    # Shards are cut by document count: ceil(34 / 6) training shards, whatever num_proc was.
    assert len(list((tmp_path / "four" / "tokens" / "shards" / "train").glob("*.json"))) == 6
    recorded = json.loads((tmp_path / "four" / "corpus" / "splits.json").read_text())
    assert recorded["splits"]["validation"]["documents"] == [0, VALIDATION]
    assert recorded["splits"]["test"]["documents"] == [VALIDATION, VALIDATION + TEST]
    assert recorded["dataset"]["data_files"]["train"][0]["sha256"]


def test_a_killed_run_resumes_by_shard(corpus, tmp_path, monkeypatch):
    prepare(corpus, tmp_path / "a")
    first = split_bytes(tmp_path / "a")
    shards = tmp_path / "a" / "tokens" / "shards" / "train"
    corrupt = bytearray((shards / "000002.bin").read_bytes())
    corrupt[3] ^= 1
    (shards / "000002.bin").write_bytes(bytes(corrupt))  # a shard whose bytes no longer match its sidecar
    (shards / "000004.json").unlink()  # killed before its sidecar was written
    written: list[str] = []
    real = hf_corpus._write_shard
    monkeypatch.setattr(hf_corpus, "_write_shard", lambda stem, *a: written.append(stem.name) or real(stem, *a))
    for path in (tmp_path / "a" / "tokens").glob("*.bin"):
        path.unlink()
    prepare(corpus, tmp_path / "a")
    assert sorted(written) == ["000002", "000004"]
    assert split_bytes(tmp_path / "a") == first

    written.clear()  # another tokenizer: no shard of the old one is kept
    prepare(corpus, tmp_path / "a", tok=ByteTokenizer(vocab_size=300, eot_token=299))
    assert len(written) == 1 + 1 + 6  # every shard: validation, test, 6 of training


def test_streaming_local_files_gives_the_same_bytes(corpus, tmp_path):
    streamed = prepare(corpus, tmp_path / "s", streaming=True)
    loaded = prepare(corpus, tmp_path / "l")
    assert split_bytes(tmp_path / "s") == split_bytes(tmp_path / "l")
    for split in SPLITS:
        assert streamed["splits"][split]["documents"] == loaded["splits"][split]["documents"]


def test_token_budget_takes_whole_documents_until_it_is_reached(corpus, tmp_path):
    tok, budget = ByteTokenizer(), 500
    meta = prepare(corpus, tmp_path, token_budget=budget)["splits"]["train"]
    train = DOCS[VALIDATION + TEST:]
    lengths = np.cumsum([len(tok.encode(d)) + 1 for d in train])
    n_docs = int(np.searchsorted(lengths, budget)) + 1  # the first prefix holding >= budget tokens
    assert meta["n_documents"] == n_docs and meta["n_tokens"] == lengths[n_docs - 1] >= budget > lengths[n_docs - 2]
    assert load_token_file(tmp_path / "tokens" / "train.bin").tolist() == expected_ids(train[:n_docs], tok)
    assert meta["token_budget"] == budget
    assert len(list((tmp_path / "tokens" / "shards" / "train").glob("*.json"))) < 6  # stopped reading


def test_the_corpus_own_splits_are_used_and_too_few_documents_are_refused(corpus, tmp_path):
    own = {"train": str(corpus / "docs.jsonl"), "test": str(corpus / "docs.jsonl")}
    meta = prepare(corpus, tmp_path / "own", data_files=own)["splits"]
    assert meta["test"]["dataset_split"] == "test" and not meta["test"]["held_out"]
    assert meta["test"]["n_documents"] == N_DOCS  # the whole own split
    assert meta["validation"]["held_out"] and meta["train"]["documents"] == [VALIDATION, N_DOCS]
    with pytest.raises(DataError, match="too few to hold out"):
        prepare(corpus, tmp_path / "few", validation_documents=40, test_documents=10)


def test_a_hub_dataset_offline_says_how_to_use_local_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = data_config(dataset="someone/absent-corpus", dataset_config="sample-10BT")
    with pytest.raises(DataError, match=r"offline mode.*data\.dataset: parquet.*data\.data_files") as raised:
        hf_corpus.prepare_hf_corpus(data, ByteTokenizer(), tmp_path / "t", tmp_path / "c", show_progress=False)
    assert "someone/absent-corpus" in str(raised.value)

    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_corpus, "_hf_reachable", lambda timeout: (_ for _ in ()).throw(OSError("no route")))
    with pytest.raises(DataError, match=r"cannot be reached \(no route\).*data\.data_files"):
        hf_corpus.prepare_hf_corpus(data, ByteTokenizer(), tmp_path / "t", tmp_path / "c", show_progress=False)


def test_a_vocabulary_over_65535_is_written_as_uint32(corpus, tmp_path):
    tok = ByteTokenizer(vocab_size=128_256, offset=127_000, eot_token=128_001)  # Llama 3's vocabulary size
    prepare(corpus, tmp_path, tok=tok, num_proc=1)
    tokens = load_token_file(tmp_path / "tokens" / "validation.bin", verify_sha256=True)
    assert tokens.dtype == np.uint32 and tokens.tolist() == expected_ids(DOCS[:VALIDATION], tok)
    assert read_token_metadata(tmp_path / "tokens" / "train.bin")["dtype"] == "uint32"


def test_a_bad_text_column_names_the_key(corpus, tmp_path):
    with pytest.raises(DataError, match=r"data\.text_column 'body' is not a column.*\['id', 'text'\]"):
        prepare(corpus, tmp_path, text_column="body")


@pytest.mark.parametrize(("edit", "message"), [
    ({"dataset": None}, r"data\.source: hf needs data\.dataset"),
    ({"dataset": "json", "data_files": None}, r"data\.dataset: json reads local files: set data\.data_files"),
    ({"dataset": "json", "data_files": "absent/*.jsonl"}, r"data\.data_files: 'absent/\*\.jsonl' matches no file"),
    ({"validation_holdout": 0.1}, r"data\.validation_holdout is not used with data\.source: hf"),
    ({"source": "wikitext2", "dataset": None, "data_files": None, "token_budget": 10},
     r"data\.token_budget is only used with data\.source: hf"),
])
def test_config_check_names_the_hf_key_at_fault(corpus, edit, message):
    from tga.settings import ConfigError, _check_hf_data

    valid = data_config(dataset="json", data_files=str(corpus / "docs.jsonl"))
    _check_hf_data(valid, {"name": "gpt2"})  # passes without the fault
    with pytest.raises(ConfigError, match=message):
        _check_hf_data({**valid, **edit}, {"name": "gpt2"})
    with pytest.raises(ConfigError, match="tokenizer.name: char builds its vocabulary"):
        _check_hf_data(valid, {"name": "char"})


@pytest.mark.workflow
def test_the_workflow_tokenizes_an_hf_corpus_for_training(corpus, tmp_path, gpt2_files):
    from workflow_runs import make_workdir, snakemake, tiny_config

    config = tiny_config()
    config["data"] = {"source": "hf", "dataset": "json", "data_files": "docs.jsonl", "validation_documents": 5,
                      "test_documents": 4, "shard_documents": 10, "num_proc": 2, "label": "tiny hf corpus"}
    config["tokenizer"] = {"name": "gpt2", **{k: str(v) for k, v in gpt2_files.items()}}
    workdir = make_workdir(tmp_path / "wd", config)
    shutil.copy(corpus / "docs.jsonl", workdir / "docs.jsonl")
    targets = ("outputs/data/tokens/train.bin", "outputs/data/tokens/test.bin", "outputs/data/prompts_in_training_text.csv")
    snakemake(workdir, *targets, cores=2)
    train = load_token_file(workdir / "outputs" / "data" / "tokens" / "train.bin", verify_sha256=True)
    assert train[-1] == 50256 and int((train == 50256).sum()) == N_DOCS - 9  # one <|endoftext|> per document
    assert "tokenizing train" in (workdir / "outputs" / "logs" / "tokenize_corpus.log").read_text()
    assert (workdir / "outputs" / "data" / "prompts_in_training_text.csv").read_text().startswith("prompt,line,")
