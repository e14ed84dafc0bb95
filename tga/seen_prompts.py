"""Prompts the model has read: geometry prompts that appear verbatim in the training text.

The geometry of text a model was trained on is that of memorized text, not of language
it meets for the first time, so a prompt found in the training text is named in one
warning line. The workflow checks when the config is read (tga.settings) whenever the
training text can be read then: the user's ``data.train``, or a corpus prepared by an
earlier run; and its ``check_prompts`` rule writes which prompts the prepared training
split holds (``outputs/data/prompts_in_training_text.csv``), warning on the console for
a download the config check could not read yet. Torch-free (the config check runs before
the DAG), and outside tga.data's imports, so editing it never re-prepares the corpus.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tga.atomic import atomic_write_text
from tga.corpus import CORPUS_METADATA, holdout_split

__all__ = [
    "describe_training_text",
    "prompts_in_text",
    "read_prompts",
    "seen_prompt_warnings",
    "training_text_warnings",
    "write_seen_prompts_table",
]

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


def _warning_lines(prompts_path: str | os.PathLike[str], prompts: list[tuple[int, str]], seen: list[int],
                   where: str, unit: str = "line") -> list[str]:
    """One warning per seen prompt, locating it by ``unit`` ("line" of a prompts file,
    "test window at token" of a token file) and number."""
    messages = []
    for i in seen:
        line, prompt = prompts[i]
        flat = " ".join(prompt.splitlines())  # a window's newlines would break the one-line warning
        preview = flat if len(flat) <= _PREVIEW_CHARS else flat[:_PREVIEW_CHARS].rstrip() + " ..."
        messages.append(
            f'geometry.prompts: prompt {i} ({unit} {line} of {prompts_path}: "{preview}") appears verbatim in the '
            f"training text ({where}); the model has read it"
        )
    return messages


def _decoded(text: bytes | str) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def seen_prompt_warnings(prompts_path: str | os.PathLike[str], text: bytes | str, where: str) -> list[str]:
    """One line per prompt of ``prompts_path`` that ``text`` (the training text; ``where``
    says which, e.g. "data.train") contains verbatim: the model has read that prompt."""
    prompts = read_prompts(prompts_path)
    return _warning_lines(prompts_path, prompts, prompts_in_text([p for _, p in prompts], _decoded(text)), where)


def describe_training_text(data: Mapping[str, Any], corpus_train: str | os.PathLike[str]) -> str:
    """What the warnings call the training text: the config key for the user's own text,
    else the prepared corpus's file; and whether a validation holdout was cut from it."""
    holdout = ", less its validation holdout" if data.get("validation_holdout") is not None else ""
    return ("data.train" if data["source"] == "text" else f"{corpus_train}, the WikiText-2 train split") + holdout


def write_seen_prompts_table(
    prompts_path: str | os.PathLike[str],
    train_text: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    where: str,
    test_windows: Mapping[str, int] | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """``prompt,line,in_training_text,text`` for every prompt (``prompt`` numbered as in
    ``prompts.csv``) against the training split ``train_text``, written atomically to
    ``out_path``, so a geometry result can be read knowing which prompts the model had
    seen; returns the warning lines of the seen ones (``where`` names the text).

    With ``test_windows`` (``geometry.prompts`` as a mapping), ``prompts_path`` is the
    test split's token file, the prompts are its windows decoded by the tokenizer at
    ``tokenizer_path`` (tga/prompt_windows.py), and the ``line`` column becomes ``start``
    (the window's token offset)."""
    if test_windows is None:
        prompts, unit, column = read_prompts(prompts_path), "line", "line"
    else:
        from tga.prompt_windows import TEST_WINDOW_KEYS, read_test_windows, window_texts  # lazy: reads tokens
        from tga.tokenizers import load_tokenizer

        if tokenizer_path is None:
            raise ValueError("test windows are decoded by the tokenizer: give tokenizer_path")
        windows = read_test_windows(prompts_path, **{k: int(test_windows[k]) for k in TEST_WINDOW_KEYS})
        texts = window_texts(windows, load_tokenizer(tokenizer_path))
        prompts, unit, column = list(zip(windows.starts, texts)), "test window at token", "start"
    seen = prompts_in_text([p for _, p in prompts], _decoded(Path(train_text).read_bytes()))
    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")
    table.writerow(["prompt", column, "in_training_text", "text"])
    table.writerows([i, line, i in seen, prompt] for i, (line, prompt) in enumerate(prompts))
    atomic_write_text(out_path, buffer.getvalue())
    return _warning_lines(prompts_path, list(prompts), seen, where, unit)


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
    train: str | Path = "data.train"
    if data["source"] == "text":
        text = Path(data["train"]).read_bytes()
        if holdout is not None:
            text = holdout_split(text, holdout, what=f"data.train ({data['train']})")[0]
    elif corpus_dir is not None:
        train = Path(corpus_dir) / "train.txt"
        prepared = _prepared_train_text(data, Path(corpus_dir))
        if prepared is None:
            return []
        text = prepared
    else:
        return []
    return seen_prompt_warnings(prompts_path, text, describe_training_text(data, train))
