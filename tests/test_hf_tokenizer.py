"""The ``hf`` tokenizer (tga/tokenizers.py HFTokenizer): any Hugging Face tokenizer by local
folder or hub id, offline. Folders are built here: GPT-2's BPE from the shared files
(checked against tiktoken), a 128,256-id word-level vocabulary (Llama 3's size, for the
uint32 token files) and a tokenizer whose normalizer prepends a space to every text (so
chunked encoding must refuse to cut it)."""

from __future__ import annotations

import json
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as RustTokenizer  # noqa: E402
from tokenizers import models, normalizers, pre_tokenizers, processors  # noqa: E402

from tga import cli as tga_cli  # noqa: E402
from tga import tokenizers as tk  # noqa: E402
from tga.data import load_token_file, tokenize_to_file  # noqa: E402
from tga.geometry import encode_prompts, resolve_exclude_first_token, tokenizer_adds_bos  # noqa: E402
from tga.resources import vocab_size_for  # noqa: E402
from tga.settings import ConfigError, check_config  # noqa: E402
from tga.tokenizers import HFTokenizer, TokenizerError, build_tokenizer, create_tokenizer, load_tokenizer  # noqa: E402
from test_pretrained import cache_revision  # noqa: E402
from test_settings import base_config  # noqa: E402

LLAMA3_VOCAB = 128_256
HUB_ID = "tga-test/tiny-tokenizer"


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory, gpt2_files: dict[str, Path]) -> Path:
    """GPT-2's tokenizer as transformers saves it (encoder.json = vocab.json, vocab.bpe = merges)."""
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    transformers.GPT2Tokenizer(vocab=str(gpt2_files["encoder_json"]),
                               merges=str(gpt2_files["vocab_bpe"])).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_hf(gpt2_folder: Path) -> HFTokenizer:
    tok = create_tokenizer("hf", path=gpt2_folder)
    assert isinstance(tok, HFTokenizer)
    return tok


def word_level_folder(folder: Path, size: int, bos_template: bool = False) -> Path:
    """A word-level tokenizer of ``size`` ids: [UNK] 0, <s> 1, </s> 2, then w0, w1, ...;
    with ``bos_template`` its post-processor puts <s> first when special tokens are added."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(size - 3)}}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_template:
        rust.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="[UNK]", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama3_sized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return word_level_folder(tmp_path_factory.mktemp("hf") / "llama3-sized", LLAMA3_VOCAB)


def prepend_folder(folder: Path, alphabet: str) -> Path:
    """Llama-2-style normalizer: "▁" before every text and for every space, one id per
    character: encoding a text in two pieces gives one "▁" more than in one."""
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(alphabet) | {"▁"}))}}
    rust = RustTokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>").save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- ids


def test_hf_gpt2_gives_tiktoken_ids_without_special_tokens(gpt2_hf: HFTokenizer, gpt2_files: dict[str, Path]) -> None:
    tok = gpt2_hf
    assert tok.name == "hf" and tok.vocab_size == 50257 and tok.eot_token == 50256 and tok.adds_bos is False
    text = " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 <|endoftext|> \n"
    ids = tok.encode(text)
    assert ids == create_tokenizer("bpe", **gpt2_files).encode(text)  # another implementation agrees
    # "<|endoftext|>" in corpus text is text (as tiktoken's encode_ordinary has it), although
    # transformers' own call, made here first, makes it the special id and resets the switch.
    assert 50256 in tok.hf(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text) == ids and 50256 not in ids
    assert tok.decode(ids) == text
    assert tok.encode_array(text, dtype=np.uint16).dtype == np.uint16


def test_encode_adds_no_bos_so_geometry_keeps_position_0(tmp_path: Path) -> None:
    """A tokenizer whose post-processor adds <s> (as Llama's do): corpus and prompts are
    encoded without it, so exclude_first_token: auto keeps position 0."""
    tok = HFTokenizer.load(str(word_level_folder(tmp_path / "bos", 50, bos_template=True)))
    assert tok.hf("w0 w1")["input_ids"] == [1, 3, 4]  # transformers' default adds the BOS
    assert tok.encode("w0 w1") == [3, 4]
    ids, info = encode_prompts(["w0 w1 w2", "w5"], tok, block_size=2)
    assert ids == [[3, 4], [8]] and info[0]["truncated"]
    assert tokenizer_adds_bos(tok) is False and resolve_exclude_first_token("auto", tokenizer_adds_bos(tok)) is False


def test_chunked_encoding_equals_one_call(gpt2_hf: HFTokenizer, tmp_path: Path, shared_data_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    text = (shared_data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")[:120_000]
    monkeypatch.setattr(tk, "_HF_CHUNK_CHARS", 997)
    gpt2 = gpt2_hf
    assert len(gpt2.chunk_bounds(text)) > 100  # really cut, at the checked places
    one_call = gpt2.hf(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    assert gpt2.encode_array(text).tolist() == one_call

    # A normalizer that prepends "▁" to each text: every cut fails its check, none is made.
    sample = text[:20_000]
    prepend = HFTokenizer.load(str(prepend_folder(tmp_path / "prepend", sample)))
    assert prepend.chunk_bounds(sample) == [0, len(sample)]
    one_call = prepend.hf(sample, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert prepend.encode_array(sample).tolist() == one_call
    # Mutation: without the check the cuts change the ids, so the check is what keeps them.
    monkeypatch.setattr(HFTokenizer, "_cut_is_neutral", lambda self, text, cut: True)
    assert prepend.encode_array(sample).tolist() != one_call


# ----------------------------------------------------------------------------- uint32


def test_llama3_sized_vocabulary_writes_uint32_tokens(llama3_sized: Path, tmp_path: Path) -> None:
    tok = create_tokenizer("hf", path=llama3_sized)
    assert tok.vocab_size == LLAMA3_VOCAB and tok.eot_token == 2
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(3, LLAMA3_VOCAB, 4000), [LLAMA3_VOCAB - 1, 65535, 65536, 3]])
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"w{i - 3}" for i in ids) + "\n", encoding="utf-8")
    meta = tokenize_to_file(text, tok, tmp_path / "train.bin")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == LLAMA3_VOCAB and meta["n_tokens"] == ids.size
    stored = np.fromfile(tmp_path / "train.bin", dtype="<u4")
    assert (stored == ids).all() and int(stored.max()) == LLAMA3_VOCAB - 1  # a uint16 file would wrap these
    assert (np.asarray(load_token_file(tmp_path / "train.bin", verify_sha256=True)) == ids).all()
    assert tok.decode(stored.tolist()) == text.read_text(encoding="utf-8").strip()


def test_vocab_size_for_reads_the_hf_tokenizer(llama3_sized: Path) -> None:
    config = {"tokenizer": {"name": "hf", "path": str(llama3_sized), "revision": None},
              "data": {"source": "wikitext2"}}
    assert vocab_size_for(config, "no/such/tokenizer.json") == LLAMA3_VOCAB
    assert vocab_size_for({**config, "tokenizer": {"name": "gpt2"}}) == 50257


# ----------------------------------------------------------------------------- saved description


def test_saved_description_rebuilds_and_notices_changed_files(tmp_path: Path) -> None:
    folder = word_level_folder(tmp_path / "words", 40)
    spec = {"name": "hf", "path": str(folder), "revision": None, "encoder_json": None, "vocab_bpe": None}
    tok = build_tokenizer(spec, tmp_path / "unused-train.txt")
    saved = tmp_path / "tokens" / "tokenizer.json"
    tok.save(saved)
    d = json.loads(saved.read_text())
    assert d["type"] == "hf" and d["path"] == str(folder.resolve()) and d["revision"] is None
    assert set(d["files_sha256"]) == {"tokenizer.json", "tokenizer_config.json"} and len(d["content_sha256"]) == 64
    again = load_tokenizer(saved)
    assert isinstance(again, HFTokenizer) and again.encode("w3 w9 zz") == tok.encode("w3 w9 zz") == [6, 12, 0]
    assert tk.tokenizer_from(saved).vocab_size == 40 and tok.matches_file(saved)
    # The same files elsewhere are the same tokenizer; other files are another.
    assert HFTokenizer.load(str(shutil.copytree(folder, tmp_path / "copy"))).matches_file(saved)
    word_level_folder(folder, 41)
    assert not HFTokenizer.load(str(folder)).matches_file(saved)
    with pytest.raises(TokenizerError, match=r"has changed since .*tokenizer.json was written.*delete"):
        load_tokenizer(saved)


def test_hub_id_records_the_cached_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    folder = word_level_folder(tmp_path / "v1", 30)
    (folder / "config.json").write_text('{"model_type": "gpt2"}')  # a hub repo has one; AutoTokenizer reads it
    cache_revision(tmp_path / "home", HUB_ID, "v1", folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    tok = create_tokenizer("hf", path=HUB_ID, revision="v1")
    commit = (tmp_path / "home" / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "v1").read_text()
    d = tok.to_dict()
    assert (d["path"], d["revision"], d["commit"], tok.vocab_size) == (HUB_ID, "v1", commit, 30)
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").commit == commit


# ----------------------------------------------------------------------------- errors


def test_offline_hub_id_without_a_copy_says_how_to_use_a_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(TokenizerError) as e:
        create_tokenizer("hf", path="meta-llama/Llama-3.2-1B")
    message = str(e.value)
    assert message.startswith("tokenizer.path: cannot load the tokenizer 'meta-llama/Llama-3.2-1B'")
    assert "save_pretrained('DIR')" in message and "set tokenizer.path to that local folder" in message
    # The pretrained section loads through the same function and names its own key.
    with pytest.raises(TokenizerError, match=r"^pretrained.x \(org/x\): cannot .* set pretrained.x.model to that"):
        tk.load_hf_tokenizer("org/x", where="pretrained.x (org/x)", key="pretrained.x.model")
    with pytest.raises(TokenizerError, match="local tokenizer folder './missing' does not exist"):
        create_tokenizer("hf", path="./missing")


def test_missing_transformers_names_the_pip_command(gpt2_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(TokenizerError, match=r'tokenizer.path: .*not installed: pip install "tga\[hf\]"'):
        create_tokenizer("hf", path=gpt2_folder)


@pytest.mark.parametrize(("spec", "needle"), [
    ({"name": "hf"}, "tokenizer.name: hf needs tokenizer.path"),
    ({"name": "hf", "path": "gpt2", "encoder_json": "e.json"}, "tokenizer.encoder_json and tokenizer.vocab_bpe"),
    ({"name": "gpt2", "path": "gpt2"}, "tokenizer.path is read by tokenizer.name: hf only"),
    ({"name": "char", "revision": "main"}, "tokenizer.revision is read by tokenizer.name: hf only"),
])
def test_keys_that_do_not_go_together_are_named(spec: dict, needle: str) -> None:
    with pytest.raises(TokenizerError, match=needle):
        build_tokenizer(spec)


def test_config_check_names_the_tokenizer_key(llama3_sized: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    config = base_config(tmp_path)
    keys = {"encoder_json": None, "vocab_bpe": None, "revision": None}
    config["tokenizer"] = {**keys, "name": "hf", "path": str(llama3_sized)}
    check_config(config)  # loads the tokenizer for its vocabulary (resource estimates)
    with pytest.raises(ConfigError, match="tokenizer.path is read by tokenizer.name: hf only"):
        check_config({**config, "tokenizer": {**keys, "name": "gpt2", "path": "gpt2"}})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="^tokenizer.path: cannot load the tokenizer 'no-such/tokenizer'"):
        check_config({**config, "tokenizer": {**keys, "name": "hf", "path": "no-such/tokenizer"}})


# ----------------------------------------------------------------------------- cli


def test_cli_tokenizer_flags(tmp_path: Path) -> None:
    folder = word_level_folder(tmp_path / "words", 20)
    parser = tga_cli.build_parser()
    args = parser.parse_args(["train", "--tokenizer", "hf", "--tokenizer-path", str(folder),
                              "--data-dir", str(tmp_path)])
    tok = tga_cli._tokenizer(args)
    assert isinstance(tok, HFTokenizer) and tok.encode("w0 w1") == [3, 4]
    base = dict(vars(args))
    with pytest.raises(tga_cli.CLIError, match="--tokenizer hf needs --tokenizer-path"):
        tga_cli._tokenizer(Namespace(**{**base, "tokenizer_path": None}))
    with pytest.raises(tga_cli.CLIError, match="--tokenizer-revision is read by --tokenizer hf only"):
        tga_cli._tokenizer(Namespace(**{**base, "tokenizer": "char", "tokenizer_path": None,
                                       "tokenizer_revision": "main"}))
    with pytest.raises(TokenizerError, match="^--tokenizer-path: local tokenizer folder"):
        tga_cli._tokenizer(Namespace(**{**base, "tokenizer_path": str(tmp_path / "none") + "/"}))
