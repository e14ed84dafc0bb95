"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workflow_runs import make_study, snakemake


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


# Tests of the study whose Snakemake runs one job at a time: last in the study's group (below).
ONE_CORE_STUDY_TESTS = {"test_parallel_and_serial_runs_give_identical_outputs"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of the shared study runs Snakemake (marker ``workflow``) and goes to the
    one xdist worker that runs the study (group ``tiny_study``), so it is run once.

    Under pytest-xdist (``-n``, see pyproject.toml) the ``workflow`` tests come first: each
    takes seconds to a minute, so started last they would leave one worker running alone
    at the end. Every worker sorts the same way (xdist requires identical collections).
    xdist hands out the largest groups first: the study's to one worker, the SLURM tests'
    (tests/test_slurm.py) to the other, which mostly waits on the cluster for a minute or
    two. The study's runs on every core fill that wait; its one-core run comes last.
    """
    for item in items:
        if "tiny_study" in item.fixturenames:
            item.add_marker(pytest.mark.workflow)
            item.add_marker(pytest.mark.xdist_group("tiny_study"))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: (item.get_closest_marker("workflow") is None,  # stable: else as collected
                                     getattr(item, "originalname", item.name) in ONE_CORE_STUDY_TESTS))


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """The ``.test`` folder of a finished run of .test/config/config.yaml: every output of
    rule ``all`` (models, perplexity, geometry, figures, comparisons, evolution), run once
    per test session: under pytest-xdist its tests form one group, so one worker runs it.

    Read it, never change it: a test that edits files works on ``copy_study(tiny_study, ...)``.
    """
    study = make_study(tmp_path_factory.mktemp("tiny_study"))
    snakemake(study)  # --cores 4 on any machine: all variants' jobs at once, as the serial test compares
    return study
