"""Prompts the model has read: geometry prompts that appear verbatim in the training text.

The geometry of text a model was trained on is that of memorized text, not of language
it meets for the first time, so a prompt found in the training text is named in one
warning line. The workflow checks when the config is read (tga.settings) whenever the
training text can be read then: the user's ``data.train``, or a corpus prepared by an
earlier run; the corpus job checks a first download (workflow/scripts/prepare_corpus.py).
Torch-free, and outside tga.data's imports, so editing a warning never re-prepares
the corpus (tga/fingerprint.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tga.corpus import CORPUS_METADATA, DataError, holdout_split

__all__ = ["prompts_in_text", "read_prompts", "seen_prompt_warnings", "training_text_warnings"]

_PREVIEW_CHARS = 40


def read_prompts(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``(line number, prompt)`` of every prompt in a prompts file (one per non-empty
    line, ``#`` lines are comments), lines numbered from 1 as editors do; a prompt's
    index in the list is its number in ``prompts.csv``. The caller checks the file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]


def prompts_in_text(prompts: Sequence[str], text: str) -> list[int]:
    """Indices of the prompts that occur verbatim in ``text``. A plain substring search
    per prompt: a few prompts against WikiText-2's 11 MB training split take well under
    a second, and nothing short of verbatim is claimed."""
    return [i for i, prompt in enumerate(prompts) if prompt and prompt in text]


def seen_prompt_warnings(prompts_path: str | os.PathLike[str], text: bytes | str, where: str) -> list[str]:
    """One line per prompt of ``prompts_path`` that ``text`` (the training text; ``where``
    says which, e.g. "data.train") contains verbatim: the model has read that prompt."""
    prompts = read_prompts(prompts_path)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    messages = []
    for i in prompts_in_text([p for _, p in prompts], text):
        line, prompt = prompts[i]
        preview = prompt if len(prompt) <= _PREVIEW_CHARS else prompt[:_PREVIEW_CHARS].rstrip() + " ..."
        messages.append(
            f'geometry.prompts: prompt {i} (line {line} of {prompts_path}: "{preview}") appears verbatim in the '
            f"training text ({where}); the model has read it"
        )
    return messages


def _prepared_train_text(data: Mapping[str, Any], corpus_dir: Path) -> bytes | None:
    """The training split of a corpus an earlier run prepared, if its ``splits.json``
    says it was made from the same source and holdout as ``data`` asks for now."""
    try:
        made = json.loads((corpus_dir / CORPUS_METADATA).read_text(encoding="utf-8"))
        same = made["source"] == data["source"] and made["validation_holdout"] == data.get("validation_holdout")
        return (corpus_dir / "train.txt").read_bytes() if same else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def training_text_warnings(
    data: Mapping[str, Any], prompts_path: str | os.PathLike[str], corpus_dir: str | os.PathLike[str] | None
) -> list[str]:
    """:func:`seen_prompt_warnings` against the training text the config's ``data`` block
    (``data``) trains on, where it can be read: ``data.train`` less any validation
    holdout, for ``source: text``; else ``corpus_dir``'s train.txt once a run has
    prepared it from this source (``corpus_dir`` None: not looked for). [] when the
    text cannot be read yet. Raises DataError when the holdout cannot be made."""
    holdout = data.get("validation_holdout")
    if data["source"] == "text":
        text = Path(data["train"]).read_bytes()
        where = "data.train"
        if holdout is not None:
            text = holdout_split(text, holdout, what=f"data.train ({data['train']})")[0]
            where += ", less its validation holdout"
    elif corpus_dir is not None:
        train = Path(corpus_dir) / "train.txt"
        text = _prepared_train_text(data, Path(corpus_dir))
        if text is None:
            return []
        where = f"{train}, the WikiText-2 train split" + (", less its validation holdout" if holdout is not None else "")
    else:
        return []
    return seen_prompt_warnings(prompts_path, text, where)
