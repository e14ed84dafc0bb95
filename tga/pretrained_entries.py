"""The ``pretrained:`` config section before any job runs: which revisions an entry
loads, its evolution series, where its files are, and every check that can be made
without loading a model (unknown id or revision, missing folder, not a causal LM,
heatmap layers it lacks).

Torch-free and transformers-free at import: the workflow calls :func:`check_pretrained`
while it builds the DAG (``snakemake -n`` stays light). Loading and measuring the models
is :mod:`tga.pretrained`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "PretrainedError",
    "revision_step",
    "entry_revisions",
    "final_revision",
    "evolution_revisions",
    "is_local_path",
    "check_pretrained",
    "weights_mb",
    "n_layer_of",
]

_STEP = re.compile(r"(?:^|[-_])step(\d+)(?:$|[-_])")
_NOT_CAUSAL = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
               "ForMultipleChoice", "ForImageClassification", "ForSpeechSeq2Seq", "EncoderModel")


class PretrainedError(ValueError):
    """A pretrained entry that cannot be loaded or measured; the message names the entry."""


def revision_step(revision: str | None) -> int | None:
    """The training step a revision names (Pythia's ``step143000``, OLMo's
    ``stage1-step1000-tokens4B``), or None."""
    match = _STEP.search(revision or "")
    return int(match[1]) if match else None


def entry_revisions(entry: Mapping[str, Any]) -> list[str | None]:
    """Every revision an entry loads: its ``revisions`` list, or its one ``revision``
    (None = the default branch)."""
    return list(entry.get("revisions") or [entry.get("revision")])


def final_revision(entry: Mapping[str, Any]) -> str | None:
    """The entry's model as published: its one revision, or the latest step of its revisions."""
    revisions = entry_revisions(entry)
    return max(revisions, key=lambda r: revision_step(r) or 0) if entry.get("revisions") else revisions[0]


def evolution_revisions(entry: Mapping[str, Any]) -> dict[str, str]:
    """``{stage: revision}`` of an entry's evolution series, ordered by training step;
    stage ``step{N}``, as tga names its own checkpoints. Empty without ``revisions``."""
    revisions = entry.get("revisions") or []
    return {f"step{revision_step(r)}": r for r in sorted(revisions, key=lambda r: revision_step(r) or 0)}


def is_local_path(model: str) -> bool:
    """A local folder rather than a hub id: an existing directory, or a string shaped like
    a path (absolute, ``./``, ``../``, ``~``, or more than one ``/``), which hub ids never are."""
    return Path(model).expanduser().is_dir() or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_refs(model: str) -> list[str]:
    """Revisions of a hub model present in the local cache (HF_HOME), for error messages."""
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "refs"
    return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def _config_json(name: str, model: str, revision: str | None) -> dict[str, Any] | None:
    """The entry's ``config.json`` from its local folder or the hub cache; checks that the
    model and revision exist (offline: in the cache; online: asks the hub when the cache
    lacks them). None when it cannot be read without downloading."""
    where = f"pretrained.{name}"
    if is_local_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise PretrainedError(f"{where}: local model folder {model!r} does not exist")
        if revision is not None:
            raise PretrainedError(
                f"{where}: revision {revision!r} given for the local folder {model!r}; a folder holds one "
                "revision: give one entry per folder, or a hub id whose cache holds the revisions"
            )
        path = folder / "config.json"
        if not path.is_file():
            raise PretrainedError(f"{where}: local folder {model!r} has no config.json: it is not a saved model")
        return json.loads(path.read_text(encoding="utf-8"))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json", revision=revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    refs = _cached_refs(model)
    if _offline():
        if not refs:
            raise PretrainedError(
                f"{where}: model {model!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: unknown "
                "model id, or not downloaded yet (download it with network access, point HF_HOME at a cache "
                "that holds it, or give a local folder)"
            )
        raise PretrainedError(
            f"{where}: revision {revision or 'main'!r} of {model!r} does not exist in the Hugging Face cache "
            f"(HF_HUB_OFFLINE is set); cached revisions: {refs}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(model, revision=revision)
    except RevisionNotFoundError:
        raise PretrainedError(f"{where}: revision {revision!r} of {model!r} does not exist on the hub") from None
    except RepositoryNotFoundError:
        raise PretrainedError(f"{where}: model {model!r} does not exist on the Hugging Face hub") from None
    except (HfHubHTTPError, OSError):
        return None  # no network now: the job says what went wrong, naming the entry
    return None


def n_layer_of(cfg: Mapping[str, Any]) -> int | None:
    """The number of blocks a ``config.json`` declares, under any family's key."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    return None


def check_pretrained(config: Mapping[str, Any]) -> None:
    """Everything about the ``pretrained:`` section that can be known before a job runs;
    one PretrainedError naming the entry: a name shared with a variant, a missing local
    folder, an unknown model id or revision (offline: not in the cache), revisions that
    name no training step, a model that is not a causal LM, heatmap layers it lacks."""
    entries = config.get("pretrained") or {}
    for name, entry in entries.items():
        where = f"pretrained.{name}"
        if name in config.get("variants", {}):
            raise PretrainedError(f"{where}: the name is also a variant's; comparisons name models by name")
        if entry.get("revision") is not None and entry.get("revisions"):
            raise PretrainedError(f"{where}: give revision or revisions, not both")
        revisions = entry_revisions(entry)
        if entry.get("revisions"):
            steps = [revision_step(r) for r in revisions]
            nameless = [r for r, s in zip(revisions, steps) if s is None]
            if nameless:
                raise PretrainedError(
                    f"{where}.revisions: {nameless[0]!r} names no training step; the evolution series plots "
                    "revisions against the step they name (like Pythia's step1000)"
                )
            if len(set(steps)) != len(steps):
                raise PretrainedError(f"{where}.revisions: {revisions} name the same step twice")
        for revision in revisions:
            cfg = _config_json(name, str(entry["model"]), revision)
            if cfg is None:
                continue
            architectures = [str(a) for a in cfg.get("architectures") or []]
            if cfg.get("is_encoder_decoder") or (architectures and all(a.endswith(_NOT_CAUSAL) for a in architectures)):
                what = architectures or [cfg.get("model_type")]
                raise PretrainedError(
                    f"{where}: {entry['model']!r} is not a causal language model ({', '.join(map(str, what))}); "
                    "give a decoder-only model (AutoModelForCausalLM)"
                )
            n_layer = n_layer_of(cfg)
            if n_layer is not None:
                for layer in config.get("geometry", {}).get("heatmap_layers", []):
                    if not -(n_layer + 2) <= layer < n_layer + 2:
                        raise PretrainedError(
                            f"{where}: geometry.heatmap_layers: layer {layer} is out of range for its {n_layer} "
                            f"blocks; valid layers are {-(n_layer + 2)}..{n_layer + 1}"
                        )


def weights_mb(entry: Mapping[str, Any]) -> int | None:
    """Size in MB of an entry's weight files when they are on disk (local folder or the
    hub cache), for the jobs' ``mem_mb``; None when not downloaded yet."""
    model = str(entry["model"])
    if is_local_path(model):
        folder = Path(model).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=final_revision(entry))
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    files = [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
    return math.ceil(sum(p.stat().st_size for p in files) / 1e6) if files else None
