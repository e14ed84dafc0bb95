"""Every setting written once: the packaged JSON schema ``tga/config.schema.yaml``.

The schema holds each model and training key's type, range, default and help text.
Snakemake's ``validate`` reads it (workflow/schemas/config.schema.yaml links to it),
and this module derives the rest from it: the defaults of :class:`ModelConfig` and
:class:`TrainConfig`, their range and type checks (one message format naming the key),
and the key list the command line turns into flags (tga/cli.py). Only the checks a
schema cannot express (one key against another) are written here in code.

No torch: the workflow imports this while Snakemake builds the DAG, and every module
that trains imports it, so it stays small (editing it reruns training).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from jsonschema import Draft202012Validator, validators

SCHEMA_PATH = Path(str(resources.files("tga").joinpath("config.schema.yaml")))
# Config section -> the $defs block that types its keys (variants may set either).
SECTIONS = {"model": "model_keys", "training": "training_keys"}
VOCAB_PAD_MULTIPLE = 64
# Tokens per chunk of the fused LM head and loss (tga.lm_head): at GPT-2's vocabulary a
# chunk's fp32 logits take 4096 x 50,304 x 4 bytes = 0.8 GB. Larger chunks gain little
# matmul efficiency on a GPU (the matmul is already 4096 x 384 x 50,304) and smaller ones
# add launches; a CPU batch of the default config (8 x 256 tokens) is one chunk.
LOSS_CHUNK_TOKENS = 4096


class SettingError(ValueError):
    """A setting that cannot be used; ``key`` names it, so a front end can say which
    of its own options (a config key, a command-line flag) set it."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class ModelConfigError(SettingError):
    """A model setting that cannot build a model."""


class TrainConfigError(SettingError):
    """A training setting that makes no sense."""


@lru_cache(maxsize=None)
def load_schema() -> dict[str, Any]:
    """The parsed schema (read once per process)."""
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def key_specs(section: str) -> dict[str, dict[str, Any]]:
    """``{key: spec}`` of a config section's keys in schema order: type, range,
    description and default (model and training keys are typed in ``$defs``, where
    variants share them)."""
    schema = load_schema()
    defaults = schema["properties"][section]["properties"]
    types = schema["$defs"][SECTIONS[section]]["properties"] if section in SECTIONS else defaults
    return {key: {**spec, **defaults.get(key, {})} for key, spec in types.items()}


def defaults(section: str) -> dict[str, Any]:
    """``{key: default}`` of a config section (``model``, ``training``, ``evaluation`` ...)."""
    return {key: spec["default"] for key, spec in key_specs(section).items()}


def _strict_integer(checker: Any, value: Any) -> bool:
    """An int, not a bool and not 2.0: the model's shapes must be true integers."""
    return isinstance(value, int) and not isinstance(value, bool)


_Validator = validators.extend(
    Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer)
)

_PHRASES: dict[str, Callable[[Any], str]] = {
    "minimum": lambda v: f"must be >= {v}",
    "exclusiveMinimum": lambda v: f"must be > {v}",
    "maximum": lambda v: f"must be <= {v}",
    "exclusiveMaximum": lambda v: f"must be < {v}",
    "enum": lambda v: f"must be one of {list(v)}",
    "type": lambda v: "must be " + " or ".join(
        {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string",
         "null": "null"}.get(t, t) for t in ([v] if isinstance(v, str) else v)),
}


def check_setting(key: str, value: Any, spec: dict[str, Any], what: str, error: type[SettingError]) -> None:
    """Raise ``error`` naming ``key`` when ``value`` breaks its schema ``spec``, in one
    format: ``<what> setting <key>=<value> must be ...``."""
    problem = next(iter(_Validator(spec).iter_errors(value)), None)
    if problem is None:
        return
    phrase = _PHRASES.get(problem.validator)
    reason = phrase(problem.validator_value) if phrase else f"is invalid ({problem.message})"
    if problem.validator == "pattern" and spec.get("description"):
        reason = f"must be {spec['description']}"
    raise error(f"{what} setting {key}={value!r} {reason}", key)


_T = TypeVar("_T")


def _from_schema(section: str, error: type[SettingError]) -> Callable[[type[_T]], type[_T]]:
    """Make a frozen dataclass whose fields named in the schema take the schema's
    defaults and are checked against its types and ranges on construction. The class
    lists the fields for readers and type checkers; a schema key it lacks (or a field
    without a default that the schema lacks) fails at import, not in a test."""

    def make(cls: type[_T]) -> type[_T]:
        specs = key_specs(section)
        annotated = cls.__dict__.get("__annotations__", {})
        missing = sorted(set(specs) - set(annotated))
        undefaulted = sorted(k for k in set(annotated) - set(specs) if k not in cls.__dict__)
        if missing or undefaulted:
            raise TypeError(f"{cls.__name__} and {SCHEMA_PATH} disagree: fields {missing} missing, "
                            f"{undefaulted} neither in the schema nor defaulted")
        for key, spec in specs.items():
            setattr(cls, key, spec["default"])
        checked = getattr(cls, "__post_init__", None)

        def __post_init__(self: Any) -> None:
            for key, spec in specs.items():
                check_setting(key, getattr(self, key), spec, section, error)
            if checked is not None:
                checked(self)

        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
        return dataclass(frozen=True)(cls)

    return make


def _from_dict(cls: type[_T], values: dict[str, Any], error: type[SettingError], what: str) -> _T:
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise error(f"unknown {what} setting(s) {unknown}: {unknown_names_hint(unknown, known)}", unknown[0])
    return cls(**values)


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name a misspelt ``name`` most likely meant (difflib's closest match
    above its 0.6 similarity cutoff), or None when none is close."""
    matches = difflib.get_close_matches(name, list(valid), n=1)
    return matches[0] if matches else None


def unknown_names_hint(unknown: Iterable[str], valid: Iterable[str], show: Callable[[str], str] = repr,
                       list_valid: bool = True) -> str:
    """What to say after "unknown key(s) ...": ``did you mean 'max_steps'?`` when every
    unknown name has a close valid one, else (with ``list_valid``) the valid names too:
    a list of 37 keys helps less than the one that was meant. ``show`` writes a name
    (a quoted key, a flag as it is)."""
    unknown, valid = list(unknown), sorted(valid)
    guesses = {name: closest(name, valid) for name in unknown}
    found = {name: guess for name, guess in guesses.items() if guess is not None}
    if len(unknown) == 1 and found:
        hint = f"did you mean {show(found[unknown[0]])}?"
    else:
        hint = ", ".join(f"{show(guess)} for {show(name)}" for name, guess in found.items())
        hint = f"did you mean {hint}?" if hint else ""
    if len(found) == len(unknown) or not list_valid:
        return hint
    listed = f"valid: {', '.join(show(name) for name in valid)}"
    return f"{hint} ({listed})" if hint else listed


def _positive_int(value: Any, key: str, what: str, error: type[SettingError]) -> None:
    if not _strict_integer(None, value) or value < 1:
        raise error(f"{what} setting {key}={value!r} must be a positive integer", key)


@_from_schema("model", ModelConfigError)
class ModelConfig:
    """A model's architecture. ``vocab_size`` is not a config key: the tokenizer sets it."""

    vocab_size: int = 50257
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    norm_position: str
    norm: str
    activation: str
    dropout: float
    bias: bool
    norm_eps: float
    residual: bool
    mlp: bool
    scale_embeddings: bool
    unigram_bias: bool
    position_encoding: str
    rope_base: float
    init: str
    mlp_hidden: int | None

    def __post_init__(self) -> None:
        """The checks between keys (types and ranges come from the schema)."""
        _positive_int(self.vocab_size, "vocab_size", "model", ModelConfigError)
        if self.n_embd % self.n_head:
            raise ModelConfigError(
                f"model setting n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                "choose n_embd as a multiple of n_head", "n_embd"
            )
        if self.position_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ModelConfigError(
                f"model setting position_encoding='rope' needs an even head size, "
                f"but n_embd/n_head = {self.n_embd // self.n_head}: change n_embd or n_head", "n_head"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Like the constructor, but an unknown key is a ModelConfigError naming it."""
        return _from_dict(cls, values, ModelConfigError, "model")

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up so the output matmul has tensor-core friendly shapes."""
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def mlp_width(self) -> int:
        """The FFN's hidden width: ``mlp_hidden`` when set, else 4*d for GELU and ReLU, and
        2/3 of that for SwiGLU (rounded up to a multiple of 8 for the matmuls), so that
        both MLPs hold about the same number of weights (SwiGLU has two input matrices)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.activation != "swiglu":
            return 4 * self.n_embd
        return math.ceil(8 * self.n_embd / 3 / 8) * 8


@_from_schema("training", TrainConfigError)
class TrainConfig:
    """One training run's settings. ``seed`` and ``threads`` are not training keys:
    the workflow sets them per job (config ``seeds``, ``resources.train_threads``)."""

    max_steps: int
    batch_size: int
    micro_batch_size: int | None  # per forward and process; tga.distributed.accumulation_steps
    learning_rate: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    token_adam_eps: float
    rare_relabel_probability: float
    rare_relabel_max_count: int
    grad_clip: float
    eval_interval: int
    eval_batches: int
    checkpoint_interval: int
    checkpoint_spacing: str  # log or linear, see checkpoint_steps
    seed: int = 0
    device: str
    precision: str
    compile: bool | str  # auto, true or false; tga.device.compile_decision resolves it
    compile_mode: str
    loss_head: str  # auto, chunked or full; tga.device.loss_head_choice resolves it
    threads: int = 0

    def __post_init__(self) -> None:
        """The checks between keys (types and ranges come from the schema)."""
        check_setting("seed", self.seed, load_schema()["properties"]["seeds"]["items"], "training", TrainConfigError)
        if not _strict_integer(None, self.threads) or self.threads < 0:
            raise TrainConfigError(f"training setting threads={self.threads!r} must be an integer >= 0 "
                                   "(0 = torch's default)", "threads")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise TrainConfigError(
                f"training setting micro_batch_size={self.micro_batch_size} must divide batch_size="
                f"{self.batch_size} (the global batch is micro_batch_size x processes x accumulation steps)",
                "micro_batch_size",
            )
        if not self.warmup_steps <= self.max_steps:
            raise TrainConfigError(
                f"training setting warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps}]",
                "warmup_steps",
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Like the constructor, but an unknown key is a TrainConfigError naming it."""
        return _from_dict(cls, values, TrainConfigError, "training")


def checkpoint_steps(config: TrainConfig) -> list[int]:
    """Steps (counted as completed optimizer steps) at which a checkpoint is kept; here,
    not in tga.train, because the workflow derives the evolution's stages from it.
    ``log``: the powers of two up to ``max_steps`` (1, 2, 4, ...), dense early where the
    geometry changes most, and as many for 1,000 steps (10) as a log axis can show;
    ``linear``: every ``checkpoint_interval`` steps."""
    if config.checkpoint_spacing == "log":
        return [2**k for k in range(config.max_steps.bit_length()) if 2**k <= config.max_steps]
    return list(range(config.checkpoint_interval, config.max_steps + 1, config.checkpoint_interval))
