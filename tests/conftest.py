"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The offline copies of WikiText-2 and GPT-2 BPE at ../shared/data (see its README)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"offline data folder {path} is missing (see docs: ../shared/data)")
    return path


@pytest.fixture(scope="session")
def gpt2_files(shared_data_dir: Path) -> dict[str, Path]:
    """Paths of GPT-2's encoder.json and vocab.bpe in the offline data folder."""
    files = {
        "encoder_json": shared_data_dir / "gpt2" / "encoder.json",
        "vocab_bpe": shared_data_dir / "gpt2" / "vocab.bpe",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"GPT-2 BPE files missing: {', '.join(missing)}")
    return files
