"""Text-level corpus work that needs no torch, so the workflow's config check
(tga.settings, run before the DAG is built) can use it as well as the data jobs.
Prompts found in the training text are tga/seen_prompts.py's.

* ``holdout_split`` holds the last articles of a training text out as its validation
  split (``data.validation_holdout``), deterministically, so no model is selected on
  the test split when only one other split exists (config/proxy.yaml).
* ``CORPUS_METADATA`` names the ``splits.json`` a prepared corpus keeps beside its
  splits (tga.data.prepare_corpus writes it).
* ``local_data_files`` resolves ``data.data_files`` of a ``source: hf`` corpus read from
  local files (tga/hf_corpus.py), so the config check can say a file is missing first.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["BOTH_VALIDATIONS", "CORPUS_METADATA", "DataError", "HF_ONLY_KEYS", "LOCAL_BUILDERS",
           "describe_hf_training_text", "holdout_split", "local_data_files"]

# WikiText's article titles: a level-1 heading line " = Title = " (sections are " = = Section = = ").
_ARTICLE_HEADING = re.compile(rb"^ = [^=\n][^\n]* = \r?$", re.M)
CORPUS_METADATA = "splits.json"
# datasets' packaged builders that read the user's own files (data.data_files).
LOCAL_BUILDERS = ("json", "parquet", "text", "csv", "arrow")
# The data keys that only source hf reads (tga.settings refuses them elsewhere).
HF_ONLY_KEYS = (
    "dataset", "dataset_config", "dataset_split", "data_files", "revision", "text_column", "streaming",
    "token_budget", "validation_documents", "test_documents", "num_proc", "shard_documents",
)

BOTH_VALIDATIONS = (
    "data.validation and data.validation_holdout are both set: the validation split is either that file or held "
    "out of data.train; remove one of them"
)


class DataError(ValueError):
    """Bad or missing data; the message names the culprit file and the fix."""


def _article_starts(text: bytes) -> list[int]:
    """Byte offsets where WikiText articles start: at the blank line above a title
    heading when there is one, so every part begins as the raw files do (" \\n = T = ")."""
    starts = []
    for match in _ARTICLE_HEADING.finditer(text):
        start = match.start()
        above = text.rfind(b"\n", 0, max(start - 1, 0)) + 1 if start > 0 else 0
        if start > 0 and not text[above:start].strip():
            start = above
        starts.append(start)
    return starts


def _line_starts(text: bytes) -> list[int]:
    return [0, *(m.end() for m in re.finditer(rb"\n", text) if m.end() < len(text))]


def holdout_split(text: bytes, fraction: Any, what: str = "data.train") -> tuple[bytes, bytes, dict[str, Any]]:
    """``(kept, held_out, info)``: the last articles of ``text``, about ``fraction`` of its
    bytes, held out; ``kept + held_out == text``.

    Why the end and whole articles: WikiText's files are articles in random order, so
    the last ones are as typical as any, and an article never straddles the two parts
    (its own words in the validation split would flatter the model). The cut is the
    article start nearest to ``(1 - fraction)`` of the bytes; text with fewer than two
    articles (no " = Title = " headings) is cut at the nearest line start instead.
    ``info`` records the unit, the cut and the fraction actually held out. Nothing is
    random, so every run and machine gets the same split. ``what`` names the text in
    errors (a config key or a path).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataError(
            f"data.validation_holdout must be a fraction strictly between 0 and 1 (e.g. 0.1 holds out the last "
            f"tenth of {what}), got {fraction!r}"
        )
    articles = _article_starts(text)
    unit, starts = ("article", articles) if len(articles) >= 2 else ("line", _line_starts(text))
    # Cuts that leave text on both sides, nearest to the target first (ties: the earlier cut).
    target = (1.0 - fraction) * len(text)
    cuts = [s for s in starts if text[:s].strip() and text[s:].strip()]
    if not cuts:
        raise DataError(
            f"{what} cannot be split for data.validation_holdout: it has no {unit} boundary with text on both "
            f"sides ({len(text):,} bytes); give a longer text, or a validation file as data.validation"
        )
    cut = min(cuts, key=lambda s: (abs(s - target), s))
    kept, held_out = text[:cut], text[cut:]
    info = {
        "fraction": float(fraction),
        "unit": unit,
        "cut_byte": cut,
        "held_out_bytes": len(held_out),
        "held_out_fraction": round(len(held_out) / len(text), 6),
        "articles_kept": sum(s < cut for s in articles),
        "articles_held_out": sum(s >= cut for s in articles),
    }
    return kept, held_out, info


def _patterns(data_files: Any) -> dict[str, list[str]]:
    """``data_files`` (str, list or mapping split -> str/list) as split -> patterns."""
    if data_files is None:
        return {}
    if isinstance(data_files, Mapping):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in data_files.items()}
    return {"train": [data_files] if isinstance(data_files, str) else list(data_files)}


def local_data_files(data_files: Any) -> dict[str, list[Path]]:
    """Split -> the local files ``data_files`` names (globs expanded, sorted), with one
    DataError naming ``data.data_files`` and the pattern that matches no file."""
    found: dict[str, list[Path]] = {}
    for split, patterns in _patterns(data_files).items():
        files: list[Path] = []
        for pattern in patterns:
            matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            matched = [m for m in matched if Path(m).is_file()]
            if not matched:
                raise DataError(
                    f"data.data_files: {pattern!r} matches no file (relative paths start at the directory the "
                    "workflow runs in); give existing json/parquet/text files, a glob, a list or a mapping "
                    "{train: ..., test: ...}"
                )
            files.extend(Path(m) for m in matched)
        found[split] = files
    return found


def describe_hf_training_text(data: Mapping[str, Any], corpus_train: str | os.PathLike[str]) -> str:
    """What the prompt warnings call the training text of a ``source: hf`` corpus."""
    name = data["dataset"] + (f" ({data['dataset_config']})" if data.get("dataset_config") else "")
    return f"{corpus_train}, the training documents of {name}"
