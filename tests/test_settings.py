"""Config resolution, the schema's defaults, and the checks the schema cannot make."""

import json
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from tga.schema import SCHEMA_PATH, ModelConfig, SettingError, TrainConfig, key_specs
from tga.settings import ConfigError, SeenPromptWarning, check_config, resolve_variant

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())


def base_config(tmp_path: Path) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nthe first prompt\n")
    return {
        "data": {"source": "wikitext2", "archive": None, "train": None, "validation": None, "test": None, "label": "x"},
        "tokenizer": {"name": "char", "encoder_json": None, "vocab_bpe": None},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
        "training": {"max_steps": 10, "learning_rate": 1e-3, "warmup_steps": 2},
        "seeds": [0],
        "variants": {"a": {"norm_position": "pre"}, "b": {"norm_position": "post", "learning_rate": 5e-4}},
        "comparisons": [["a", "b"]],
        "evaluation": {"batch_size": 4, "device": "cpu"},
        "geometry": {"prompts": str(prompts), "heatmap_layers": [0, -1], "exclude_first_token": False,
                     "knn_k": 5, "device": "cpu"},
    }


def _out_of_range(spec: dict):
    """A value just outside the schema's choices or range for ``spec``, or None."""
    step = 1 if "integer" in str(spec.get("type")) else 0.5
    if "enum" in spec:
        return "not-a-choice"
    if "minimum" in spec:
        return spec["minimum"] - step
    if "exclusiveMinimum" in spec:
        return spec["exclusiveMinimum"]
    if "maximum" in spec:
        return spec["maximum"] + step
    return spec.get("exclusiveMaximum")


@pytest.mark.parametrize("section, config_class", [("model", ModelConfig), ("training", TrainConfig)])
def test_dataclasses_check_every_range_of_the_schema_naming_the_key(section, config_class):
    """The dataclasses' defaults and checks are the schema's: each key's range or
    choices, broken, gives one SettingError naming that key."""
    specs = key_specs(section)
    assert {f.name: f.default for f in fields(config_class) if f.name in specs} == {k: s["default"] for k, s in specs.items()}
    checked = 0
    for key, spec in specs.items():
        value = _out_of_range(spec)
        if value is None:
            continue
        with pytest.raises(SettingError) as info:
            config_class(**{key: value})
        assert info.value.key == key and str(info.value).startswith(f"{section} setting {key}={value!r} must be"), info.value
        checked += 1
    assert checked >= 10


def test_a_dataclass_that_lacks_a_schema_key_fails_at_import():
    from tga.schema import ModelConfigError, _from_schema

    with pytest.raises(TypeError, match=r"fields \['activation'"):
        @_from_schema("model", ModelConfigError)
        class Partial:
            n_layer: int


def test_reading_settings_and_building_the_dag_imports_no_torch():
    """The modules common.smk imports (read from it) load without torch, so `snakemake -n`
    needs none; tga.train, imported there only for the failure records that issue 14
    item 1 removes, is the one exception left."""
    import re
    import subprocess
    import sys

    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    modules = sorted(set(re.findall(r"^from (tga\.\w+) import", common, flags=re.M)) - {"tga.train"})
    assert {"tga.schema", "tga.settings", "tga.evolution", "tga.resources"} <= set(modules)
    code = f"import sys\nimport {', '.join(modules)}\nprint(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def test_variant_overrides_shared_settings_and_nothing_else(tmp_path):
    config = base_config(tmp_path)
    a, b = resolve_variant(config, "a"), resolve_variant(config, "b")
    assert a["model"]["norm_position"] == "pre" and b["model"]["norm_position"] == "post"
    assert a["training"]["learning_rate"] == 1e-3 and b["training"]["learning_rate"] == 5e-4
    assert a["model"]["n_embd"] == b["model"]["n_embd"] == 32
    assert "vocab_size" not in a["model"] and "seed" not in a["training"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["variants"]["b"].update(n_embd=30, n_head=4), r"variants\.b: .*n_embd=30 is not divisible by n_head=4"),
        (lambda c: c["variants"]["a"].update(warmup_steps=50), r"variants\.a: .*warmup_steps=50"),
        (lambda c: c["comparisons"].append(["a", "zz"]), r"comparisons\[1\] .* unknown variant 'zz'"),
        (lambda c: c["comparisons"].append(["a", "a"]), r"comparisons\[1\] compares 'a' with itself"),
        (lambda c: c["variants"]["a"].update(colour="red"), r"variants\.a: unknown key\(s\) \['colour'\]"),
        (lambda c: c["geometry"].update(prompts="/nonexistent/prompts.txt"), r"geometry\.prompts: file .* does not exist"),
        (lambda c: Path(c["geometry"]["prompts"]).write_text(""), r"geometry\.prompts: file .* is empty"),
        (lambda c: Path(c["geometry"]["prompts"]).write_text("# only a comment\n\n"), r"geometry\.prompts: .* holds no prompt"),
        (lambda c: c["geometry"].update(heatmap_layers=[4]), r"geometry\.heatmap_layers: layer 4 is out of range"),
        (lambda c: c["data"].update(source="text"), r"data\.train is not set"),
        (lambda c: c["tokenizer"].update(name="gpt2", encoder_json="x.json"), r"tokenizer\.encoder_json is set but tokenizer\.vocab_bpe is not"),
        (lambda c: c["data"].update(archive="/nonexistent.zip"), r"data\.archive: file '/nonexistent.zip' does not exist"),
    ],
)
def test_check_config_names_the_culprit(tmp_path, edit, message):
    config = base_config(tmp_path)
    edit(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_valid_config_passes(tmp_path):
    check_config(base_config(tmp_path))


def _resolved_default_config() -> dict:
    """config/config.yaml with the schema's defaults filled in, as the workflow sees it."""
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))  # the link Snakemake users find
    return config


def test_default_study_trains_the_named_architectures_on_the_corpus_as_it_is():
    """Faithful by default: nothing GPT-2/LLaMA-style training lacks, for any variant."""
    config = _resolved_default_config()
    assert config["seeds"] == [0, 1, 2]
    for variant in config["variants"]:
        resolved = resolve_variant(config, variant)
        assert resolved["model"]["unigram_bias"] is False, f"{variant}: the logit bias is on"
        assert resolved["training"]["rare_relabel_probability"] == 0.0, f"{variant}: token renaming is on"
        assert resolved["training"]["token_adam_eps"] == 1e-8, f"{variant}: the token Adam eps is not AdamW's"
        assert resolved["model"]["position_encoding"] == "rope", f"{variant}: positions differ across variants"


def test_small_data_recipe_is_an_overlay_that_turns_its_settings_on():
    overlay = yaml.safe_load((ROOT / "config" / "recipes" / "small-data.yaml").read_text())
    assert overlay["model"]["unigram_bias"] is True
    assert overlay["training"]["rare_relabel_probability"] > 0 and overlay["training"]["token_adam_eps"] > 1e-8
    from snakemake.utils import validate

    validate(overlay, str(SCHEMA_PATH))


def test_command_line_strings_take_the_schema_types():
    from tga.settings import coerce_config_types

    given = {
        "seeds": ["0", "1", "2"],
        "training": {"learning_rate": "5e-4", "max_steps": "10", "compile": "false", "device": "cpu"},
        "variants": {"v": {"n_layer": "2", "dropout": ".1", "norm": "rmsnorm"}},
        "geometry": {"heatmap_layers": ["0", "-1"], "prompts": "123"},
        "data": {"label": "7"},
        "comparisons": [["1", "2"]],
    }
    coerced = coerce_config_types(given, SCHEMA)
    assert coerced["seeds"] == [0, 1, 2] and all(type(s) is int for s in coerced["seeds"])
    assert coerced["training"] == {"learning_rate": 5e-4, "max_steps": 10, "compile": False, "device": "cpu"}
    assert coerced["variants"]["v"] == {"n_layer": 2, "dropout": 0.1, "norm": "rmsnorm"}
    assert coerced["geometry"]["heatmap_layers"] == [0, -1]
    # Strings stay strings where the schema asks for strings ...
    assert coerced["geometry"]["prompts"] == "123" and coerced["data"]["label"] == "7"
    assert coerced["comparisons"] == [["1", "2"]]
    # ... and a string that is not a number is left for validation to name.
    assert coerce_config_types({"seeds": ["one"]}, SCHEMA) == {"seeds": ["one"]}


def _text_source(config: dict, tmp_path: Path, train_text: str) -> dict:
    """``config`` with ``source: text``: ``train_text`` as data.train, small stand-ins for the rest."""
    for split, body in (("train", train_text), ("validation", "some validation text\n"), ("test", "some test text\n")):
        (tmp_path / f"{split}.txt").write_text(body)
        config["data"][split] = str(tmp_path / f"{split}.txt")
    config["data"]["source"] = "text"
    return config


def test_check_config_warns_once_per_prompt_the_training_text_holds(tmp_path):
    config = base_config(tmp_path)
    prompts = Path(config["geometry"]["prompts"])
    prompts.write_text("# comment\nthe first prompt\nan unseen prompt\n\nthe third prompt , read\n")
    _text_source(config, tmp_path, "Some text with the first prompt in it , and the third prompt , read too .\n")
    lines = []
    check_config(config, warn=lines.append)
    assert lines == [
        f'geometry.prompts: prompt 0 (line 2 of {prompts}: "the first prompt") appears verbatim in the training text '
        "(data.train); the model has read it",
        f'geometry.prompts: prompt 2 (line 5 of {prompts}: "the third prompt , read") appears verbatim in the '
        "training text (data.train); the model has read it",
    ]
    with pytest.warns(SeenPromptWarning) as caught:
        check_config(config)
    assert [str(w.message) for w in caught if w.category is SeenPromptWarning] == lines
    Path(config["data"]["train"]).write_text("Nothing of the prompts here .\n")
    lines.clear()
    check_config(config, warn=lines.append)
    assert lines == []


def test_check_config_reads_a_prepared_download_only_when_it_matches_the_config(tmp_path):
    """A wikitext2 source is checked in the corpus an earlier run prepared, and only
    when that corpus was made with the data settings asked for now."""
    config = base_config(tmp_path)
    corpus = tmp_path / "corpus"
    lines = []
    check_config(config, warn=lines.append, corpus_dir=corpus)  # not downloaded yet: nothing to read
    assert lines == []
    corpus.mkdir()
    (corpus / "train.txt").write_text(" = T = \n the first prompt , in the downloaded train split .\n")
    (corpus / "splits.json").write_text(json.dumps({"source": "wikitext2", "validation_holdout": None, "splits": {}}))
    check_config(config, warn=lines.append, corpus_dir=corpus)
    assert len(lines) == 1 and f"training text ({corpus / 'train.txt'}, the WikiText-2 train split)" in lines[0]
    lines.clear()
    config["data"]["validation_holdout"] = 0.1  # the prepared corpus has no holdout: stale, not read
    check_config(config, warn=lines.append, corpus_dir=corpus)
    assert lines == []


def test_validation_holdout_in_the_config_check(tmp_path):
    articles = "".join(f" = A{i} = \n the first prompt {i}\n" for i in range(8)) + " = A8 = \n only in the last article\n"
    config = _text_source(base_config(tmp_path), tmp_path, articles)
    Path(config["geometry"]["prompts"]).write_text("the first prompt\nonly in the last article\n")
    lines = []
    check_config(config, warn=lines.append)  # trained on every article: both prompts read
    assert [line.split(" (line")[0] for line in lines] == ["geometry.prompts: prompt 0", "geometry.prompts: prompt 1"]
    config["data"]["validation_holdout"] = 0.5
    with pytest.raises(ConfigError, match="data.validation and data.validation_holdout are both set"):
        check_config(config)
    config["data"]["validation"] = None  # held out of data.train instead: no file needed
    lines.clear()
    check_config(config, warn=lines.append)
    # the last articles are validation text now: only the first prompt is in the training text
    assert len(lines) == 1 and lines[0].startswith("geometry.prompts: prompt 0 ")
    assert "(data.train, less its validation holdout)" in lines[0]
    Path(config["data"]["train"]).write_text("a single line\n")
    with pytest.raises(ConfigError, match=r"data\.train \(.*train\.txt\) cannot be split for data\.validation_holdout"):
        check_config(config)
    config["data"]["validation_holdout"] = None  # without the holdout a validation file is needed
    with pytest.raises(ConfigError, match=r"data\.validation is not set: .*data\.validation_holdout"):
        check_config(config)
