"""The workflow on a real one-node SLURM cluster, through profiles/slurm and
snakemake-executor-plugin-slurm.

The cluster (munged, slurmctld, slurmd on loopback, see tests/slurm_cluster.py) needs
Debian's slurm-wlm and munge and root. Without them the test is skipped, except under
CI (CI=true, as .ci/run sets), where it fails: CI has to prove it.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from slurm_cluster import DEBIAN_PACKAGES, SlurmCluster, missing_programs, one_node_cluster

from test_workflow import TINY  # the same tiny study the local end-to-end tests run
from workflow_runs import copy_workflow, make_workdir, run_snakemake

ROOT = Path(__file__).resolve().parents[1]
LOCAL_RULES = {"prepare_corpus", "all"}  # run by the submitting Snakemake, not as SLURM jobs

CONFIG = {
    **TINY,
    "data": {**TINY["data"], "label": "tiny SLURM test run"},
    # train_gpus stays at its default, 1: each training job asks SLURM for a GPU (a fake one here)
    "resources": {"train_threads": 1},
}
# Two variants, to keep it quick. Config files are merged key by key, so these replace
# the four of config/config.yaml in the workdir's copy of it rather than going in tiny.yaml.
VARIANTS = {"a": {"norm_position": "pre"}, "b": {"norm_position": "post"}}
# Tokenizer, the train and validation token files, and both trainings (each asking for a
# GPU): three levels, five SLURM jobs, each of which starts Snakemake twice (the batch
# script, then srun). The whole `all` (some 30 jobs) takes many minutes on 2 cores.
TARGETS = [f"outputs/models/{variant}/seed0/final.pt" for variant in VARIANTS]

# Only what this run needs that the profile leaves to the site: squeue (no slurmdbd here,
# so no sacct), quick first status checks, kept per-job logs, no account to guess.
TEST_OPTIONS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
                "--slurm-keep-successful-logs", "--slurm-no-account", "--latency-wait", "5"]


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason} (CI is set, so this must not be skipped)")
    pytest.skip(reason)


def _require_plugin() -> None:
    _require(importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None,
             "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")


def _make_workdir(path: Path, config: dict) -> Path:
    make_workdir(path, config)
    copy_workflow(path, names=("profiles",))
    main = yaml.safe_load((path / "config" / "config.yaml").read_text())
    main.update(variants=VARIANTS, comparisons=[list(VARIANTS)])
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(main, sort_keys=False))
    return path


def _snakemake(workdir: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_snakemake([*args, "--configfile", "tiny.yaml"], workdir, env=env, timeout=timeout)


def _planned_rules(workdir: Path, *targets: str) -> list[str]:
    """Rule of every job a local dry run would execute, local rules included."""
    proc = _snakemake(workdir, "--dry-run", "--workflow-profile", "none", "--cores", "1", *targets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", proc.stdout, flags=re.M)


def _parse_profile(path: Path, **environ: str) -> dict:
    from snakemake.profiles import ProfileConfigFileParser

    saved = {name: os.environ.get(name) for name in environ}
    os.environ.update(environ)
    try:
        with open(path) as stream:
            return ProfileConfigFileParser().parse(stream)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_slurm_profile_takes_partition_and_account_from_the_environment():
    pytest.importorskip("yte")
    profile = ROOT / "profiles" / "slurm" / "config.yaml"
    unset = _parse_profile(profile, TGA_SLURM_PARTITION="", TGA_SLURM_ACCOUNT="")
    assert unset["executor"] == "slurm"
    assert not [r for r in unset["default-resources"] if r.startswith(("slurm_partition=", "slurm_account="))]
    # no `gpu` here: rule train's own resources gpu = config resources.train_gpus must win
    assert not [r for r in unset.get("set-resources", []) if r.startswith("train:gpu")]
    named = _parse_profile(profile, TGA_SLURM_PARTITION="gpu-a100", TGA_SLURM_ACCOUNT="123")
    assert {"slurm_partition='gpu-a100'", "slurm_account='123'"} <= set(named["default-resources"])


def test_default_profile_queues_training_jobs_for_one_gpu():
    local = _parse_profile(ROOT / "profiles" / "default" / "config.yaml")
    assert local["resources"] == ["gpu=1"] and local["cores"] == "all"


@pytest.mark.workflow
def test_slurm_profile_is_accepted_by_snakemake_and_the_plugin(tmp_path):
    _require_plugin()
    workdir = _make_workdir(tmp_path / "workflow", CONFIG)
    proc = _snakemake(workdir, "--workflow-profile", "slurm", "--dry-run",
                      env={**os.environ, "TGA_SLURM_PARTITION": "debug"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "workflow specific profile profiles/slurm" in proc.stderr


def _require_cluster() -> None:
    _require_plugin()
    missing = missing_programs()
    _require(not missing, f"SLURM/munge programs missing: {', '.join(missing)} "
                          f"(apt-get install --no-install-recommends {DEBIAN_PACKAGES})")
    _require(os.geteuid() == 0, "the one-node SLURM cluster needs root (slurmd starts the jobs)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One cluster for this file's runs (starting one takes seconds): a node with one
    (fake) GPU, which the training jobs of the first run ask for and the second's do not."""
    _require_cluster()
    with one_node_cluster(tmp_path_factory.mktemp("slurm"), gpus=1) as running:
        yield running


@dataclass
class SlurmRun:
    workdir: Path
    expected: collections.Counter
    planned: list[str]
    log: str = ""
    returncode: int | None = None
    failure: str = ""  # why there is no result: the run timed out


@pytest.fixture(scope="module")
def slurm_run(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> SlurmRun:
    """The tiny workflow's TARGETS run as SLURM jobs: the test below checks it, and the
    failing-job test starts from its token files."""
    workdir = _make_workdir(tmp_path_factory.mktemp("slurm_run") / "workflow", CONFIG)
    planned = _planned_rules(workdir, *TARGETS)
    run = SlurmRun(workdir, collections.Counter(rule for rule in planned if rule not in LOCAL_RULES), planned)
    env = {**cluster.env, "TGA_SLURM_PARTITION": cluster.partition}
    started = time.monotonic()
    try:
        proc = _snakemake(workdir, "--workflow-profile", "slurm", *TEST_OPTIONS, *TARGETS, env=env, timeout=210)
    except subprocess.TimeoutExpired as error:
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                         for part in (error.stdout or "", error.stderr or ""))
        run.failure = f"snakemake on SLURM took over {error.timeout}s:\n{output[-5000:]}\n{cluster.log_tails()}"
        return run
    run.log, run.returncode = proc.stdout + proc.stderr, proc.returncode
    print(f"\nSLURM workflow run: {time.monotonic() - started:.1f}s wall time")
    return run


@pytest.mark.workflow
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")  # one cluster at a time on this machine
def test_tiny_workflow_runs_as_slurm_jobs(cluster, slurm_run):
    if slurm_run.failure:
        pytest.fail(slurm_run.failure)
    workdir, expected, log = slurm_run.workdir, slurm_run.expected, slurm_run.log
    assert expected["train"] == 2 and "prepare_corpus" in slurm_run.planned
    assert slurm_run.returncode == 0, f"snakemake failed:\n{log[-6000:]}\n{cluster.log_tails()}"
    finished = cluster.finished_jobs()
    gpus = cluster.gpus_by_job()

    # Every non-local job was one sbatch submission ...
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", log, flags=re.M)
    rules = collections.Counter(re.search(r"/rule_(\w+?)/", path).group(1) for _, path in submitted)
    assert rules == expected, log[-4000:]
    assert "localrule prepare_corpus" in log and "SLURM sbatch failed" not in log
    # ... that SLURM ran to completion on the node, in the partition the profile took from
    # the environment, and whose log the plugin kept.
    for job_id, path in submitted:
        record = finished.get(job_id)
        assert record, f"SLURM job {job_id} ({path}) missing from {cluster.jobcomp}"
        assert (record["JobState"], record["Partition"], record["NodeList"]) == (
            "COMPLETED", cluster.partition, cluster.node), record
        assert Path(path).is_file() and Path(path).parent.is_relative_to(workdir / ".snakemake" / "slurm_logs")
    # GPU requests: each training job (and only those) got the GPU, one after the other.
    train_ids = [job_id for job_id, path in submitted if "/rule_train/" in path]
    assert {job_id: gpus.get(job_id) for job_id in train_ids} == {job_id: "0" for job_id in train_ids}
    assert not {job_id for job_id, _ in submitted if gpus.get(job_id)} - set(train_ids)
    first, second = sorted((finished[j]["StartTime"], finished[j]["EndTime"]) for j in train_ids)
    assert second[0] >= first[1], f"training jobs overlapped on the one GPU: {first}, {second}"

    # The outputs the SLURM jobs wrote on the shared (here: local) file system.
    for variant in VARIANTS:
        model = workdir / "outputs" / "models" / variant / "seed0"
        assert (model / "final.pt").stat().st_size > 0 and (model / "init.pt").is_file()
        assert (model / "train_log.csv").read_text().splitlines()[-1].startswith("20,"), model
    for rule_log in (workdir / "outputs" / "logs").rglob("*.log"):
        assert "Traceback" not in rule_log.read_text(), rule_log
    print(f"\nSLURM workflow test: {len(submitted)} SLURM jobs")


@pytest.mark.workflow
@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")  # one cluster at a time on this machine
def test_a_failing_slurm_job_ends_the_run_with_its_error(cluster, slurm_run, tmp_path):
    """A training job that fails at once (its window is longer than the training text)
    must end the run with that job's error within a minute or two, on a cluster without
    accounting (no slurmdbd: sacct is installed but answers nothing), with the status
    command left to profiles/slurm."""
    config = {**CONFIG, "resources": {"train_threads": 1, "train_gpus": 0}}
    # A copy of the first run's folder: its tokenizer and token files are there, so the
    # one SLURM job is the failing one.
    workdir = Path(shutil.copytree(slurm_run.workdir, tmp_path / "workflow", symlinks=True))
    shutil.rmtree(workdir / ".snakemake" / "locks", ignore_errors=True)  # left by a run that timed out
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(config))
    main = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    train_chars = len((workdir / config["data"]["train"]).read_text(encoding="utf-8"))
    main["variants"]["a"] = {"norm_position": "pre", "block_size": train_chars + 1000, "batch_size": 1, "dropout": 0.0}
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(main, sort_keys=False))
    tokens = [f"outputs/data/tokens/{split}.bin" for split in ("train", "validation")]
    if not all((workdir / token).is_file() for token in tokens):  # the first run failed: make them here
        local = _snakemake(workdir, "--workflow-profile", "none", "--cores", "2", *tokens)
        assert local.returncode == 0, local.stderr[-3000:]

    accounting = cluster.run("sacct", "--noheader", "-X", check=False)
    assert accounting.returncode != 0 or not accounting.stdout.strip(), accounting  # sacct cannot help here
    profile = _parse_profile(ROOT / "profiles" / "slurm" / "config.yaml", SLURM_CONF=str(cluster.conf),
                             PATH=cluster.env["PATH"])
    assert profile["slurm-status-command"] == "squeue", profile  # chosen by the profile: no accounting here
    env = {**cluster.env, "TGA_SLURM_PARTITION": cluster.partition}
    started = time.monotonic()
    proc = _snakemake(workdir, "--workflow-profile", "slurm", "--slurm-init-seconds-before-status-checks", "1",
                      "--slurm-no-account", "--latency-wait", "5", "outputs/models/a/seed0/final.pt",
                      env=env, timeout=240)
    waited = time.monotonic() - started
    log = proc.stdout + proc.stderr
    finished = cluster.finished_jobs()

    assert proc.returncode != 0, log[-4000:]
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    assert len(submitted) == 1 and finished[submitted[0]]["JobState"] == "FAILED", (submitted, finished)
    assert "Error in rule train" in log
    # the job's own error, shown by the run (show-failed-logs), not only a pointer to a log file
    assert f"fewer than block_size+1={train_chars + 1001}" in log, log[-4000:]
    assert waited < 180, waited  # not left waiting for a status that never comes
    print(f"\nfailing SLURM job: the run ended {waited:.1f}s after it started")
