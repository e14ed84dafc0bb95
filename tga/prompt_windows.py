"""Geometry prompts sampled from the test split: ``geometry.prompts: {test_windows: N,
length: L, seed: S}``.

Why: sixteen hand-written prompts give the pooled metrics (``twonn_pooled``,
``cross_prompt_cosine``, the common direction) a few hundred tokens. Windows of the test
split's token file give them as many as the split holds, on text the model never trained
on, with no tokenization step in between: a window *is* the ids the model reads, and its
text in ``prompts.csv`` is their decoding.

**Which windows.** ``N`` windows of ``L`` tokens, chosen by ``numpy.random.default_rng(S)``
and sorted by start, so the same split and setting always give the same windows. When the
split holds ``N * L`` tokens, they do not overlap: the ``n - N*L`` tokens left over are
split into ``N + 1`` gaps by ``N`` sorted uniform draws. Otherwise ``N`` distinct starts
are drawn without replacement and windows overlap (a warning says so). A split with
fewer than ``N`` distinct windows is one error. Windows may cross document boundaries
(an end-of-text id is a token like any other).

Torch-free: the config check and the ``check_prompts`` job import it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "TEST_WINDOW_KEYS",
    "TestWindows",
    "TestWindowsError",
    "OverlappingWindowsWarning",
    "is_test_windows",
    "window_starts",
    "read_test_windows",
    "window_texts",
]

TEST_WINDOW_KEYS = ("test_windows", "length", "seed")
"""The keys of ``geometry.prompts`` as a mapping (tga/config.schema.yaml)."""


class TestWindowsError(ValueError):
    """Test windows that cannot be drawn: a split too short for them."""

    __test__ = False  # not a pytest test class, despite its name


class OverlappingWindowsWarning(UserWarning):
    """The split is too short for non-overlapping windows; they overlap."""

    __test__ = False


class _Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TestWindows:
    """The windows drawn from one token file: ``starts`` (token offsets, ascending), the
    windows' ``ids``, and what they came from (``source``, its ``split_sha256`` from the
    sidecar, its ``n_tokens``), for ``prompts.csv``."""

    __test__ = False

    starts: tuple[int, ...]
    ids: tuple[tuple[int, ...], ...]
    length: int
    seed: int
    source: str
    split_sha256: str
    n_tokens: int
    overlapping: bool

    def as_lists(self) -> list[list[int]]:
        """The windows as the lists of ids the geometry analysis takes."""
        return [list(w) for w in self.ids]


def is_test_windows(setting: Any) -> bool:
    """Whether ``geometry.prompts`` asks for test windows (a mapping) rather than a file."""
    return isinstance(setting, Mapping)


def window_starts(n_tokens: int, n_windows: int, length: int, seed: int, what: str = "the test split"
                  ) -> tuple[np.ndarray, bool]:
    """``(starts, overlapping)``: ``n_windows`` sorted start offsets of windows of ``length``
    tokens in ``n_tokens`` tokens, drawn with ``seed`` (module docstring). Raises
    TestWindowsError naming ``what`` when it holds fewer than ``n_windows`` distinct windows."""
    if n_windows < 1 or length < 1:
        raise TestWindowsError(f"geometry.prompts: test_windows ({n_windows}) and length ({length}) must be >= 1")
    positions = n_tokens - length + 1
    if positions < n_windows:
        room = f"room for {max(positions, 0)} distinct window(s)" if positions > 0 else "not one window"
        raise TestWindowsError(
            f"geometry.prompts: {what} holds {n_tokens} tokens, {room} of length {length}, fewer than "
            f"test_windows={n_windows}; lower test_windows or length, or use a larger test split"
        )
    rng = np.random.default_rng(seed)
    slack = n_tokens - n_windows * length
    if slack >= 0:
        gaps = np.sort(rng.integers(0, slack + 1, size=n_windows))
        return gaps + np.arange(n_windows, dtype=np.int64) * length, False
    return np.sort(rng.choice(positions, size=n_windows, replace=False)).astype(np.int64), True


def read_test_windows(token_path: str | os.PathLike[str], test_windows: int, length: int, seed: int) -> TestWindows:
    """The windows ``geometry.prompts: {test_windows, length, seed}`` names, read from the
    test split's token file ``token_path`` (tga/data.py format, sha256 checked against
    its sidecar). Warns (OverlappingWindowsWarning) when they must overlap."""
    from tga.data import load_token_file, read_token_metadata  # lazy: tga.data imports torch

    meta = read_token_metadata(token_path)
    tokens = load_token_file(token_path, verify_sha256=True)
    starts, overlapping = window_starts(int(tokens.shape[0]), int(test_windows), int(length), int(seed),
                                        what=f"the test split {token_path}")
    if overlapping:
        warnings.warn(
            f"geometry.prompts: {test_windows} windows of {length} tokens need {test_windows * length} tokens but "
            f"the test split {token_path} holds {tokens.shape[0]}: the windows overlap (each start is distinct)",
            OverlappingWindowsWarning, stacklevel=2,
        )
    ids = tuple(tuple(int(t) for t in tokens[s:s + length]) for s in starts.tolist())
    return TestWindows(starts=tuple(int(s) for s in starts), ids=ids, length=int(length), seed=int(seed),
                       source=str(token_path), split_sha256=str(meta["sha256"]), n_tokens=int(tokens.shape[0]),
                       overlapping=overlapping)


def window_texts(windows: TestWindows | Sequence[Sequence[int]], tokenizer: _Decoder) -> list[str]:
    """Each window's ids decoded: the prompt text ``prompts.csv`` shows."""
    ids = windows.ids if isinstance(windows, TestWindows) else windows
    return [tokenizer.decode(list(w)) for w in ids]


DEVICE_BATCH_SIZE = 32  # prompts per forward pass on a GPU when geometry.batch_size is null


def prompt_batch_size(setting: int | None, device_type: str) -> int:
    """``geometry.batch_size``: null = 1 prompt per forward on a CPU (the default study's
    outputs bit for bit), :data:`DEVICE_BATCH_SIZE` on a GPU; a number as given. Here,
    torch-free, so that the workflow's resource estimates resolve it as the job does."""
    if setting is not None:
        return int(setting)
    return 1 if device_type == "cpu" else DEVICE_BATCH_SIZE
