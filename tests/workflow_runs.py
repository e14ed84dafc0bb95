"""Runs of the real workflow in temporary folders, for the end-to-end tests.

Two layouts, both holding copies of the repository's workflow files (Snakefile,
workflow/, config/, resources/):

- a *study*: ``.test/config/`` beside them, run as the snakemake-workflows convention
  has it, ``snakemake --directory .test`` (its outputs land in ``<root>/.test/outputs``).
  Functions here take the ``.test`` folder itself. The session fixture ``tiny_study``
  (tests/conftest.py) runs the repository's ``.test/config/config.yaml`` once.
- a *workdir* made by ``make_workdir`` for a test's own config: ``tiny.yaml`` replaces
  config/config.yaml (the schema fills in the rest), so the variants are exactly the
  ones the test names.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEST_DIR = ".test"
TEST_CONFIG = ROOT / TEST_DIR / "config" / "config.yaml"
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "resources")


def copy_workflow(dest: Path, source_root: Path = ROOT, names: tuple[str, ...] = WORKFLOW_FILES) -> Path:
    """Copy the workflow files into ``dest`` (created if needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = source_root / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest / name)
    return dest


def tiny_config() -> dict:
    """The .test study's config for a ``make_workdir`` folder, where the data paths are
    relative to the workdir itself (not to .test/) and the prompts are tiny_prompts.txt."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    for split in ("train", "validation", "test"):
        config["data"][split] = config["data"][split].removeprefix("../")
    config["geometry"]["prompts"] = "tiny_prompts.txt"
    return config


def make_workdir(path: Path, config: dict, source_root: Path = ROOT) -> Path:
    """Workflow files, the .test prompts as tiny_prompts.txt, and ``config`` as tiny.yaml."""
    copy_workflow(path, source_root)
    shutil.copy(TEST_CONFIG.parent / "prompts.txt", path / "tiny_prompts.txt")
    (path / "tiny.yaml").write_text(yaml.safe_dump(config))
    return path


def make_study(root: Path) -> Path:
    """Workflow files and the repository's .test/config (not any outputs a developer's
    own run left in .test/) in ``root``; returns ``root/.test``, nothing run yet."""
    copy_workflow(root)
    shutil.copytree(TEST_CONFIG.parent, root / TEST_DIR / "config")
    return root / TEST_DIR


def copy_study(study: Path, root: Path) -> Path:
    """A copy of a study with its outputs and Snakemake's metadata (modification times
    kept), for a test that changes files: the shared study stays as it was."""
    shutil.copytree(study.parent, root, symlinks=True, dirs_exist_ok=True)
    return root / TEST_DIR


def snakemake(workdir: Path, *args: str, check: bool = True, cores: int = 4,
              env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``snakemake *args`` on a study (a ``.test`` folder) or a ``make_workdir`` folder."""
    if workdir.name == TEST_DIR:
        cwd, config_args = workdir.parent, ["--directory", TEST_DIR]
    else:
        # tiny.yaml replaces config/config.yaml: a merge would add the four default variants.
        cwd, config_args = workdir, ["--replace-workflow-config", "--configfile", "tiny.yaml"]
    proc = subprocess.run(
        # --configfile takes every word after it, so the targets come first
        [sys.executable, "-m", "snakemake", *args, "--cores", str(cores), *config_args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def listed_jobs(log: str) -> list[tuple[str, str]]:
    """(rule, variant-or-'') of every job block in Snakemake's output: a dry run's plan
    (stdout) or the jobs a real run executed (stderr)."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", log):
        rule = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block.strip())
        if rule:
            variant = re.search(r"wildcards:.*?variant=([\w.-]+)", block)
            jobs.append((rule.group(1), variant.group(1) if variant else ""))
    return jobs


def planned_jobs(workdir: Path, *targets: str, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(rule, variant-or-'') of every job a dry run would execute; ``targets`` may end
    with Snakemake options (``--config seeds=[0,1]``)."""
    return listed_jobs(snakemake(workdir, "--dry-run", *targets, env=env).stdout)
