"""Resolving a variant's settings from the workflow config, and the checks a JSON
schema cannot express. Both run before any job starts, so a bad config never leaves
half-written outputs behind. Torch-free (the workflow imports this to build its DAG);
the schema itself, and the settings' dataclasses, are tga/schema.py's."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from tga.corpus import BOTH_VALIDATIONS, HF_ONLY_KEYS, LOCAL_BUILDERS, DataError, local_data_files
from tga.schema import ModelConfig, SettingError, TrainConfig, key_specs, load_schema, unknown_names_hint
from tga.prompt_windows import is_test_windows
from tga.seen_prompts import read_prompts, training_text_warnings
from tga.tokenizers import TokenizerError, TokenizerSpec

MODEL_KEYS = tuple(key_specs("model"))
TRAINING_KEYS = tuple(key_specs("training"))


class ConfigError(ValueError):
    """A config that validates against the schema but cannot run."""


def resolve_variant(config: dict[str, Any], variant: str) -> dict[str, dict[str, Any]]:
    """The variant's full model and training settings: shared settings, then the
    variant's own overrides. Rules take only this, so editing one variant never
    invalidates another's outputs."""
    if variant not in config["variants"]:
        raise ConfigError(f"unknown variant {variant!r}; configured: {sorted(config['variants'])}")
    overrides = config["variants"][variant] or {}
    unknown = sorted(set(overrides) - set(MODEL_KEYS) - set(TRAINING_KEYS))
    if unknown:
        raise ConfigError(f"variants.{variant}: unknown key(s) {unknown}; a variant may set model or training keys: "
                          f"{unknown_names_hint(unknown, MODEL_KEYS + TRAINING_KEYS)}")
    model = {k: v for k, v in config["model"].items() if k in MODEL_KEYS}
    training = {k: v for k, v in config["training"].items() if k in TRAINING_KEYS}
    model.update({k: v for k, v in overrides.items() if k in MODEL_KEYS})
    training.update({k: v for k, v in overrides.items() if k in TRAINING_KEYS})
    return {"model": model, "training": training}


def merged_config(paths: list[Path]) -> dict[str, Any]:
    """Config files merged left to right, nested mappings key by key, as Snakemake
    merges several ``--configfile``."""
    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both_dicts else value
        return out

    config: dict[str, Any] = {}
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
    return config


def check_file(path: str | Path | None, key: str, hint: str, utf8: bool = False) -> None:
    """One ConfigError naming ``key`` (a config key or a command-line flag) when ``path``
    is unset, missing, a directory, empty or, with ``utf8``, not UTF-8 text: said
    before any job reads the file, instead of a traceback from the reader."""
    if not path:
        raise ConfigError(f"{key} is not set: {hint}")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} is a directory, not a file: {hint}")
    if not p.is_file():
        raise ConfigError(f"{key}: file {str(path)!r} does not exist: {hint}")
    if p.stat().st_size == 0:
        raise ConfigError(f"{key}: file {str(path)!r} is empty: {hint}")
    if utf8:
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{key}: file {str(path)!r} is not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start}): save it as UTF-8 text"
            ) from None


def check_gpt2_files(files: dict[str, str | Path | None], allowed: bool, used_by: str, hint: str) -> None:
    """GPT-2's local BPE files, ``{config key or flag: path}`` (encoder.json's first): none,
    or, where ``allowed`` (``used_by`` names the tokenizer that takes them), both, each a
    file (:func:`check_file` with ``hint``). One ConfigError naming the key or flag at fault;
    the workflow's config and the command line check them here."""
    given = [key for key, path in files.items() if path]
    if given and not allowed:
        raise ConfigError(f"{given[0]} is only used by {used_by}")
    if len(given) == 1:
        missing = next(key for key in files if key not in given)
        raise ConfigError(f"{given[0]} is set but {missing} is not: give both GPT-2 files")
    for key in given:
        check_file(files[key], key, hint)


def check_config(
    config: dict[str, Any],
    this_machine: bool = True,
    warn: Callable[[str], None] | None = None,
    corpus_dir: str | Path | None = None,
) -> None:
    """Cross-key checks that the schema cannot make; raises one ConfigError naming
    the key at fault. A prompt that appears verbatim in the training text is passed to
    ``warn`` (default: a SeenPromptWarning): ``data.train``, or ``corpus_dir``'s
    train.txt where an earlier run downloaded it (tga/seen_prompts.py). Then every job's
    estimated memory (tga/resources.py): with ``this_machine`` (the jobs run here) a job
    that cannot fit in this machine's memory is refused now; a step estimated to be slow
    is passed to ``warn`` (default: a SlowJobWarning)."""
    resolved_variants = {variant: resolve_variant(config, variant) for variant in config["variants"]}
    for variant, resolved in resolved_variants.items():
        try:
            ModelConfig(**resolved["model"])
            TrainConfig(**resolved["training"])
        except SettingError as exc:
            raise ConfigError(f"variants.{variant}: {exc}") from None

    for index, pair in enumerate(config["comparisons"]):
        for name in pair:
            if name not in config["variants"] and name not in (config.get("pretrained") or {}):
                raise ConfigError(
                    f"comparisons[{index}] = {list(pair)} names unknown variant {name!r}; "
                    f"configured variants: {sorted(config['variants'])}"
                    + (f", pretrained: {sorted(config['pretrained'])}" if config.get("pretrained") else "")
                )
        if pair[0] == pair[1]:
            raise ConfigError(f"comparisons[{index}] compares {pair[0]!r} with itself: name two different variants")

    prompts = config["geometry"]["prompts"]
    windows = is_test_windows(prompts)
    if windows:
        _check_test_windows(prompts, resolved_variants, config)
    else:
        check_file(prompts, "geometry.prompts", "give a text file with one prompt per line", utf8=True)
        if not read_prompts(prompts):
            raise ConfigError(f"geometry.prompts: {prompts!r} holds no prompt (only blank or # lines): add one prompt per line")

    data = config["data"]
    holdout = data.get("validation_holdout")
    if holdout is not None and data.get("validation"):
        raise ConfigError(BOTH_VALIDATIONS)
    _check_hf_data(data, config["tokenizer"])
    if data["source"] == "text":
        for split in ("train", "validation", "test"):
            if not (split == "validation" and holdout is not None):
                hint = "with data.source: text, give a UTF-8 text file for each split" + (
                    " (or set data.validation_holdout to hold the validation split out of data.train)"
                    if split == "validation" else "")
                check_file(data[split], f"data.{split}", hint)
    elif data["archive"]:
        check_file(data["archive"], "data.archive", "give the path of wikitext-2-raw-v1.zip, or remove the key")
    try:
        # An hf corpus's training text exists only once tokenized, and test windows are read from
        # the token file a run makes: the check_prompts job checks both then.
        for line in [] if windows or data["source"] == "hf" else training_text_warnings(data, prompts, corpus_dir):
            _warn(line, SeenPromptWarning, warn, depth=2)
    except DataError as exc:
        raise ConfigError(str(exc)) from None

    tokenizer = config["tokenizer"]
    check_gpt2_files({f"tokenizer.{k}": tokenizer[k] for k in ("encoder_json", "vocab_bpe")},
                     tokenizer["name"] == "gpt2", f"tokenizer.name: gpt2 (got {tokenizer['name']!r})",
                     "give the GPT-2 BPE file, or remove the key to use tiktoken")
    try:
        TokenizerSpec.from_config(tokenizer)
    except TokenizerError as exc:
        raise ConfigError(str(exc)) from None

    depths = [resolved["model"]["n_layer"] for resolved in resolved_variants.values()]
    n_layer_max, n_layer_min = max(depths), min(depths)
    for layer in config["geometry"]["heatmap_layers"]:
        if not -(n_layer_min + 2) <= layer < n_layer_min + 2:
            raise ConfigError(
                f"geometry.heatmap_layers: layer {layer} is out of range; valid layers are "
                f"{-(n_layer_min + 2)}..{n_layer_min + 1} (0 = embedding, {n_layer_min + 1} or -1 = final norm)"
                + (f" for the shallowest variant (n_layer={n_layer_min})" if n_layer_max != n_layer_min else "")
            )

    try:
        _check_resources(config, resolved_variants, this_machine, warn)
    except TokenizerError as exc:  # an hf tokenizer is loaded for its vocabulary size
        raise ConfigError(str(exc)) from None


def _check_hf_data(data: dict[str, Any], tokenizer: dict[str, Any]) -> None:
    """The ``data`` keys of ``source: hf`` (tga/hf_corpus.py) against the others: one
    ConfigError naming the key at fault and the fix."""
    if data["source"] != "hf":
        defaults = {key: spec.get("default") for key, spec in key_specs("data").items()}
        changed = [key for key in HF_ONLY_KEYS if data.get(key, defaults[key]) != defaults[key]]
        if changed:
            raise ConfigError(f"data.{changed[0]} is only used with data.source: hf (got source "
                              f"{data['source']!r}); set data.source: hf, or remove data.{changed[0]}")
        return
    for key in ("archive", "train", "validation", "test", "validation_holdout"):
        if data.get(key) is not None:
            raise ConfigError(
                f"data.{key} is not used with data.source: hf; remove it (local files go in data.data_files with "
                "data.dataset: json, parquet or text; held-out splits are data.validation_documents and "
                "data.test_documents)")
    if not data.get("dataset"):
        raise ConfigError("data.source: hf needs data.dataset: a hub dataset id (e.g. HuggingFaceFW/fineweb-edu "
                          "with data.dataset_config: sample-10BT), or json, parquet or text with data.data_files")
    if data["dataset"] in LOCAL_BUILDERS:
        if not data.get("data_files"):
            raise ConfigError(f"data.dataset: {data['dataset']} reads local files: set data.data_files to them "
                              "(a path, a glob, a list, or a mapping {train: ..., test: ...})")
        try:
            local_data_files(data["data_files"])
        except DataError as exc:
            raise ConfigError(str(exc)) from None
    if tokenizer["name"] == "char":
        raise ConfigError(
            "tokenizer.name: char builds its vocabulary from the training text, which with data.source: hf exists "
            "only after tokenization; use tokenizer.name gpt2 (or a Hugging Face tokenizer), or data.source: text")


def _check_test_windows(prompts: dict[str, Any], resolved_variants: dict[str, dict[str, Any]],
                        config: dict[str, Any]) -> None:
    """``geometry.prompts: {test_windows, length, seed}``: every window must fit every
    variant's context, and the pretrained entries (which encode prompt text with their own
    tokenizers) take a prompts file only."""
    length = int(prompts["length"])
    for variant, resolved in resolved_variants.items():
        block = int(resolved["model"]["block_size"])
        if length > block:
            raise ConfigError(
                f"geometry.prompts: windows of length {length} do not fit variants.{variant}'s block_size={block}; "
                f"set length to at most {block}"
            )
    if config.get("pretrained"):
        raise ConfigError(
            f"geometry.prompts: test windows (a mapping) are tga's test-split token ids, which the pretrained "
            f"entries ({', '.join(sorted(config['pretrained']))}) cannot read: their tokenizers differ. Give a "
            "prompts file (e.g. config/prompts.txt) when the config has pretrained entries"
        )


class SlowJobWarning(UserWarning):
    """A job estimated to take very long per step; it still runs."""


class SeenPromptWarning(UserWarning):
    """A geometry prompt that the training text holds verbatim; the analysis still runs."""


def _warn(message: str, category: type[Warning], warn: Callable[[str], None] | None, depth: int) -> None:
    """``message`` to ``warn`` if given (the workflow prints it), else as a Python warning
    pointing ``depth`` frames up: at check_config's caller."""
    if warn is not None:
        warn(message)
    else:
        warnings.warn(message, category, stacklevel=depth + 1)


def _check_resources(
    config: dict[str, Any], resolved_variants: dict[str, dict[str, Any]], this_machine: bool,
    warn: Callable[[str], None] | None,
) -> None:
    """Refuse a variant whose job cannot fit in this machine's (or its GPU's) memory,
    before the DAG runs; warn about very slow steps."""
    from tga.resources import ResourceError, check_fits, estimate_variant_jobs, slow_step_warning, vocab_size_for

    vocab = vocab_size_for(config)
    for variant, resolved in resolved_variants.items():
        for estimate in estimate_variant_jobs(config, resolved, vocab, this_machine).values():
            where = f"variants.{variant}"
            if this_machine:
                try:
                    check_fits(estimate, what=where)
                except ResourceError as exc:
                    raise ConfigError(str(exc)) from None
            warning = slow_step_warning(estimate, what=where)
            if warning:
                _warn(warning, SlowJobWarning, warn, depth=3)



def schema_error_message(error: BaseException) -> str:
    """One line naming the config key that failed the JSON schema (tga/schema.py's),
    instead of the validator's dump of the whole schema."""
    candidates = [error.__cause__, error.__context__, *getattr(error, "args", ())]
    inner = next((c for c in candidates if hasattr(c, "absolute_path")), None)
    if inner is None:
        return str(error)
    key = ".".join(str(p) for p in inner.absolute_path) or "<top level>"
    message = inner.message
    if inner.validator in ("additionalProperties", "unevaluatedProperties"):
        defs = load_schema().get("$defs", {})
        allowed = set(inner.schema.get("properties", {}))
        for part in inner.schema.get("allOf", []):
            allowed |= set(defs.get(part.get("$ref", "").split("/")[-1], {}).get("properties", {}))
        message = re.sub(r"^(Unevaluated|Additional) properties are not allowed", "unknown key", message)
        unknown = sorted(set(inner.instance) - allowed) if isinstance(inner.instance, dict) else []
        message += f"; {_dotted_key_hint(unknown, inner.instance, allowed) or unknown_names_hint(unknown, allowed)}"
    elif inner.validator in ("oneOf", "anyOf") and inner.context:
        message = _alternatives_message(inner)
    return f"Invalid config: {key}: {message}"


_JSON_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool}


def _alternatives_message(error: Any) -> str:
    """A value that matches none of a key's forms (``geometry.prompts``: a path or a
    mapping): what is wrong with it in the form of its own type, and the key's help,
    instead of "is not valid under any of the given schemas"."""
    forms = error.schema.get(error.validator, [])
    same_type = [i for i, form in enumerate(forms)
                 if isinstance(error.instance, _JSON_TYPES.get(form.get("type"), ()))]
    why = sorted({(".".join(map(str, sub.relative_path)) + ": " if sub.relative_path else "") + sub.message
                  for sub in error.context if sub.schema_path and sub.schema_path[0] in same_type})
    expected = " or ".join(form.get("type", "?") for form in forms)
    message = f"{error.instance!r} is not valid: " + ("; ".join(why) if why else f"expected {expected}")
    hint = error.schema.get("errorMessage")  # the ajv-errors keyword; jsonschema ignores it
    return message + (f". {hint}" if hint else "")


def _dotted_key_hint(unknown: list[str], instance: Any, sections: set[str]) -> str | None:
    """For a top-level key like ``training.max_steps``: how a nested key is written
    (Snakemake's ``--config`` takes no dots either; it stops before the workflow runs)."""
    dotted = next((key for key in unknown if "." in key and key.split(".", 1)[0] in sections), None)
    if dotted is None:
        return None
    section, rest = dotted.split(".", 1)
    value = instance[dotted]
    return (f"nested keys are written as {section}: {{{rest}: {value}}} in a --configfile, or as "
            f"--config '{section}={{{rest}: {value}}}' on the command line")


_INTEGER = re.compile(r"^[+-]?\d+$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_BOOLEAN = {"true": True, "false": False}


def _resolve_schema(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """The schema with its ``$ref`` and ``allOf`` parts merged into one mapping, so the
    type a key asks for can be read in one place."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        schema = {**_resolve_schema(target, root), **{k: v for k, v in schema.items() if k != "$ref"}}
    for part in schema.get("allOf", []):
        resolved = _resolve_schema(part, root)
        merged = {**resolved.get("properties", {})}
        for key, sub in schema.get("properties", {}).items():
            merged[key] = {**merged.get(key, {}), **sub}
        schema = {**resolved, **schema, "properties": merged}
    return schema


def _coerce_scalar(value: str, types: list[str]) -> Any:
    text = value.strip()
    if "boolean" in types and text.lower() in _BOOLEAN:  # before "string": compile is auto, true or false
        return _BOOLEAN[text.lower()]
    if "string" in types:
        return value
    if "integer" in types and _INTEGER.match(text):
        return int(text)
    if "number" in types and _NUMBER.match(text):
        number = float(text)
        return int(number) if _INTEGER.match(text) else number
    if "null" in types and text.lower() in ("null", "none", "~"):
        return None
    return value


def coerce_config_types(value: Any, schema: dict[str, Any] | None = None, root: dict[str, Any] | None = None) -> Any:
    """``value`` with strings turned into the integer, number or boolean its schema asks
    for. ``snakemake --config 'seeds=[0,1,2]'`` hands over the strings '0', '1', '2';
    the schema, not the command line, decides what a key's type is. Strings that do not
    look like the type asked for are left alone, so validation still names them.
    ``schema`` defaults to the packaged one."""
    schema = load_schema() if schema is None else schema
    root = schema if root is None else root
    schema = _resolve_schema(schema, root)
    forms = [f for f in schema.get("oneOf", []) if isinstance(value, _JSON_TYPES.get(f.get("type"), ()))]
    if len(forms) == 1:  # a key of several forms (geometry.prompts): the one of the value's type
        schema = {**schema, **_resolve_schema(forms[0], root)}
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            out[key] = coerce_config_types(item, sub, root) if sub is not None else item
        return out
    if isinstance(value, list):
        items = schema.get("items")
        return [coerce_config_types(item, items, root) for item in value] if isinstance(items, dict) else value
    if isinstance(value, str):
        types = schema.get("type", [])
        types = [types] if isinstance(types, str) else list(types)
        return _coerce_scalar(value, types) if types else value
    return value
