"""Table-driven: every kind of bad input gives one clear error that names the culprit
(and, where something is written, leaves no partial output). The README's
troubleshooting section lists the same cases."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from tga.data import DataError, copy_text_splits, download_wikitext2, load_token_file, tokenize_to_file
from tga.geometry import load_prompts, resolve_layer_indices
from tga.metrics import GeometryError
from tga.model import CheckpointError, ModelConfig, Transformer, load_checkpoint, save_checkpoint
from tga.settings import ConfigError, check_config, schema_error_message
from tga.tokenizers import CharTokenizer, TokenizerError, create_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"  # links to tga/config.schema.yaml
BASE = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def config_error(edit: Callable[[dict], None], tmp_path: Path) -> str:
    """Validate an edited copy of config/config.yaml as the workflow does; return the message."""
    config = copy.deepcopy(BASE)
    config["geometry"]["prompts"] = str(ROOT / "config" / "prompts.txt")
    edit(config)
    try:
        validate(config, str(SCHEMA))
    except WorkflowError as error:
        return schema_error_message(error)
    with pytest.raises(ConfigError) as info:
        check_config(config)
    return str(info.value)


def setter(*path_and_value):
    *path, value = path_and_value

    def edit(config: dict) -> None:
        node = config
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return edit


CONFIG_CASES = [
    ("unknown top-level key", setter("colour", "red"), "<top level>: unknown key ('colour'"),
    ("unknown model key", setter("model", "n_layers", 6), "model: unknown key ('n_layers'"),
    ("wrong type", setter("model", "n_layer", "six"), "model.n_layer: 'six' is not of type 'integer'"),
    ("out of range", setter("training", "learning_rate", 0), "training.learning_rate: 0 is less than or equal"),
    ("dropout range", setter("model", "dropout", 1.0), "model.dropout: 1.0 is greater than or equal"),
    ("token eps range", setter("training", "token_adam_eps", 0), "training.token_adam_eps: 0 is less than or equal"),
    ("relabel probability range", setter("training", "rare_relabel_probability", 1.5),
     "training.rare_relabel_probability: 1.5 is greater than the maximum of 1"),
    ("relabel count type", setter("variants", "llama-preln", {"rare_relabel_max_count": -1}),
     "variants.llama-preln.rare_relabel_max_count: -1 is less than the minimum of 0"),
    ("unigram bias type", setter("model", "unigram_bias", "yes"), "model.unigram_bias: 'yes' is not of type 'boolean'"),
    ("bad enum", setter("model", "norm_position", "middle"), "model.norm_position: 'middle' is not one of"),
    ("unknown position encoding", setter("model", "position_encoding", "alibi"), "model.position_encoding: 'alibi' is not one of"),
    ("rope with odd head size", setter("variants", "llama-preln", {"position_encoding": "rope", "n_embd": 390, "n_head": 30}),
     "variants.llama-preln: model setting position_encoding='rope' needs an even head size, but n_embd/n_head = 13"),
    ("bad variant name", setter("variants", "my variant", {}), "variants: 'my variant' does not match"),
    ("unknown variant key", setter("variants", "llama-preln", {"lr": 1e-3}), "variants.llama-preln: unknown key ('lr'"),
    ("variant wrong type", setter("variants", "llama-preln", {"n_head": 2.5}), "variants.llama-preln.n_head: 2.5 is not of type 'integer'"),
    ("comparison unknown variant", setter("comparisons", [["llama-preln", "gpt5"]]), "names unknown variant 'gpt5'"),
    ("comparison of one", setter("comparisons", [["llama-preln"]]), "comparisons.0: ['llama-preln'] is too short"),
    ("comparison with itself", setter("comparisons", [["llama-preln", "llama-preln"]]), "compares 'llama-preln' with itself"),
    ("no seeds", setter("seeds", []), "seeds: [] should be non-empty"),
    ("duplicate seeds", setter("seeds", [0, 0]), "seeds: [0, 0] has non-unique elements"),
    ("heads do not divide width", setter("variants", "llama-preln", {"n_head": 5}), "variants.llama-preln: model setting n_embd=384 is not divisible by n_head=5"),
    ("warmup longer than training", setter("training", "warmup_steps", 5000), "warmup_steps=5000 must be in [0, max_steps=1000]"),
    ("heatmap layer out of range", setter("geometry", "heatmap_layers", [9]), "geometry.heatmap_layers: layer 9 is out of range"),
    ("unknown tokenizer", setter("tokenizer", "name", "sentencepiece"), "tokenizer.name: 'sentencepiece' is not one of"),
    ("half of the GPT-2 files", setter("tokenizer", "encoder_json", str(ROOT / "README.md")), "tokenizer.encoder_json is set but tokenizer.vocab_bpe is not"),
    ("missing prompts file", setter("geometry", "prompts", "nowhere/prompts.txt"), "geometry.prompts: file 'nowhere/prompts.txt' does not exist"),
    ("text source without files", setter("data", "source", "text"), "data.train is not set"),
    ("missing data file", lambda c: c["data"].update(source="text", train="a.txt", validation="b.txt", test="c.txt"), "data.train: file 'a.txt' does not exist"),
    ("missing archive", setter("data", "archive", "nowhere.zip"), "data.archive: file 'nowhere.zip' does not exist"),
    ("holdout of nothing", setter("data", "validation_holdout", 0), "data.validation_holdout: 0 is less than or equal to the minimum of 0"),
    ("holdout of everything", setter("data", "validation_holdout", 1), "data.validation_holdout: 1 is greater than or equal to the maximum of 1"),
    ("holdout not a number", setter("data", "validation_holdout", "10%"), "data.validation_holdout: '10%' is not of type 'number', 'null'"),
    ("holdout and a validation file", lambda c: c["data"].update(validation="v.txt", validation_holdout=0.1),
     "data.validation and data.validation_holdout are both set"),
    ("unknown init", setter("model", "init", "kaiming"), "model.init: 'kaiming' is not one of"),
    ("unknown activation", setter("variants", "llama-preln", {"activation": "tanh"}), "variants.llama-preln.activation: 'tanh' is not one of"),
    ("FFN width zero", setter("model", "mlp_hidden", 0), "model.mlp_hidden: 0 is less than the minimum of 1"),
    ("FFN width not an integer", setter("variants", "llama-preln", {"mlp_hidden": 1.5}), "variants.llama-preln.mlp_hidden: 1.5 is not of type"),
    # Estimated from the settings (tga/resources.py) against this machine's memory, before any job:
    # the logits alone are 20 PB and 0.6 TB.
    ("batch that cannot fit in memory", setter("training", "batch_size", 100000),
     "training needs an estimated"),
    ("batch too large names its key", setter("training", "batch_size", 100000), "lower training.batch_size (100000)"),
    ("window that cannot fit in memory", setter("model", "block_size", 100000), "model.block_size (100000)"),
    ("prompts file is a directory", setter("geometry", "prompts", str(ROOT / "config")), "is a directory, not a file"),
    ("data file is a directory", lambda c: c["data"].update(source="text", train=str(ROOT / "config"), validation="b.txt",
                                                             test="c.txt"), "data.train: '" + str(ROOT / "config") + "' is a directory"),
    ("archive is a directory", setter("data", "archive", str(ROOT / "config")), "data.archive: '" + str(ROOT / "config") + "' is a directory"),
]


@pytest.mark.parametrize("name, edit, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, name, edit, message):
    assert message in config_error(edit, tmp_path)


def test_empty_and_comment_only_prompts_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "geometry.prompts: file" in config_error(setter("geometry", "prompts", str(empty)), tmp_path)
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing but a comment\n\n")
    assert "holds no prompt" in config_error(setter("geometry", "prompts", str(comments)), tmp_path)
    with pytest.raises(GeometryError, match="contains only comments"):
        load_prompts(comments)


def _files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_bad_data_files_leave_nothing_behind(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    out = tmp_path / "corpus"
    for bad, message in [(tmp_path / "missing.txt", "missing.txt"), (empty, "empty"), (latin1, "UTF-8")]:
        with pytest.raises(DataError, match=message):
            copy_text_splits(good, good, bad, out)
        assert _files_in(out) == []


def test_corrupt_archive_is_refused(tmp_path):
    archive = tmp_path / "wikitext-2-raw-v1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("wikitext-2-raw/wiki.train.raw", "not the real thing\n")
    out = tmp_path / "corpus"
    with pytest.raises(DataError, match="sha256"):
        download_wikitext2(out, archive=archive)
    assert _files_in(out) == []


def test_bad_tokenizer_files(tmp_path, gpt2_files):
    broken = tmp_path / "encoder.json"
    broken.write_text(json.dumps({"a": 0}))
    with pytest.raises(TokenizerError, match="encoder.json"):
        create_tokenizer("bpe", encoder_json=broken, vocab_bpe=gpt2_files["vocab_bpe"])
    with pytest.raises(TokenizerError, match="vocab.bpe"):
        create_tokenizer("bpe", encoder_json=gpt2_files["encoder_json"], vocab_bpe=tmp_path / "vocab.bpe")
    with pytest.raises(TokenizerError, match="encoder_json"):
        create_tokenizer("bpe")


def test_truncated_or_orphaned_token_files(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    tokenize_to_file(text, CharTokenizer.from_text(text.read_text()), tmp_path / "t.bin")
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.bin"):
        load_token_file(tmp_path / "t.bin")
    (tmp_path / "t.json").unlink()
    with pytest.raises(DataError, match="t.json"):
        load_token_file(tmp_path / "t.bin")


def test_bad_checkpoints(tmp_path):
    config = ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8)
    save_checkpoint(tmp_path / "good.pt", Transformer(config))
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    cases = [
        (tmp_path / "missing.pt", {}, "does not exist"),
        (tmp_path / "truncated.pt", {}, "corrupt or truncated"),
        (tmp_path / "foreign.pt", {}, "not a tga checkpoint"),
        (tmp_path / "good.pt", {"expected_config": ModelConfig(**{**config.__dict__, "n_layer": 2})},
         "another architecture: n_layer=1 (expected 2)"),
    ]
    for path, kwargs, message in cases:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, **kwargs)
        assert message in str(info.value) and path.name in str(info.value)


def test_layer_index_out_of_range():
    with pytest.raises(GeometryError, match="layer index 7 is out of range"):
        resolve_layer_indices([7], 4)


CLI_CASES = [
    ("train: heads do not divide width", ["train", "--n-embd", "30", "--n-head", "4"], "n_embd=30 is not divisible by n_head=4"),
    ("train: bpe without its files", ["train", "--tokenizer", "bpe", "--data-dir", "{tmp}/data"], "--encoder-json"),
    ("train: missing data dir", ["train", "--tokenizer", "char", "--data-dir", "{tmp}/nowhere"], "nowhere"),
    ("evaluate: missing model", ["evaluate", "--model", "{tmp}/no-model"], "no-model"),
    ("analyze: missing prompts", ["analyze", "--prompts", "{tmp}/none.txt", "--trained-model", "{tmp}/m.pt",
                                  "--tokenizer", "char", "--output-dir", "{tmp}/out"], "none.txt"),
    ("download: half of the text splits", ["download", "--data-dir", "{tmp}/d", "--text-train", "{tmp}/a.txt"], "--text-validation"),
    ("analyze: prompts is a directory", ["analyze", "--prompts", "{tmp}/data", "--trained-model", "{tmp}/m.pt",
                                         "--tokenizer", "char", "--output-dir", "{tmp}/out"], "/data' is a directory, not a file"),
    ("download: text split is a directory", ["download", "--data-dir", "{tmp}/d", "--text-train", "{tmp}/data",
                                             "--text-validation", "{tmp}/a.txt", "--text-test", "{tmp}/a.txt"],
     "/data' is a directory, not a file"),
    ("download: archive is a directory", ["download", "--data-dir", "{tmp}/d", "--archive", "{tmp}/data"],
     "/data' is a directory, not a file"),
    ("train: data dir is a file", ["train", "--tokenizer", "char", "--data-dir", "{tmp}/a.txt"], "is a file, not a folder"),
]


@pytest.mark.parametrize("name, argv, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_flags(tmp_path, capsys, name, argv, message):
    from tga.cli import main

    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "data").mkdir()
    for split in ("train", "validation", "test"):
        (tmp_path / "data" / f"{split}.txt").write_text("some text for a split\n")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tga: error:") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "d").exists()


def test_latin1_prompts_file_is_refused_by_the_workflow_and_the_cli(tmp_path, capsys):
    from tga.cli import main

    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert f"geometry.prompts: file '{latin1}' is not valid UTF-8 (byte 0xe9 at offset 3)" in config_error(
        setter("geometry", "prompts", str(latin1)), tmp_path)
    code = main(["analyze", "--prompts", str(latin1), "--trained-model", str(tmp_path / "m.pt"), "--tokenizer", "char",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tga: error: --prompts: file") and "not valid UTF-8" in err, err
    assert len(err.strip().splitlines()) == 1
