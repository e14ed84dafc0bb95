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

A test that needs a run beside the study's (more seeds, another variant) works on
``copy_study(tiny_study, ...)``: Snakemake then runs only the jobs the change adds.
Every call goes through ``run_snakemake`` (below), which skips Snakemake's start-up.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
    # --configfile takes every word after it, so the targets come first
    proc = run_snakemake([*args, "--cores", str(cores), *config_args], cwd, env=env, timeout=timeout)
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


# ----------------------------------------------------------------------------- Snakemake without its start-up
#
# ``python -m snakemake`` spends about 1.3 s of CPU on starting Python and importing
# Snakemake before it reads the Snakefile, as much as a whole dry run of the tiny study
# after it. The suite starts Snakemake some forty times, so each test process keeps one
# server (this file run with --serve) that has imported Snakemake once and forks a child
# per call. The child is a fresh ``python -m snakemake``, as far as the workflow can tell:
# its own session, working folder, environment, sys.path from PYTHONPATH (tga itself is
# never imported by the server), sys.argv, stdin, stdout and stderr.

_SERVER: subprocess.Popen | None = None


def run_snakemake(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m snakemake *args`` in ``cwd``, as ``subprocess.run(..., capture_output=True,
    text=True)`` would run it (TimeoutExpired after ``timeout`` s, the whole process group
    killed), started by the fork server."""
    global _SERVER
    if _SERVER is None or _SERVER.poll() is not None:
        _SERVER = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, cwd=ROOT)
    command = [sys.executable, "-m", "snakemake", *args]
    with tempfile.TemporaryDirectory(prefix="snakemake-call-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        request = {"args": list(args), "cwd": str(cwd), "env": dict(os.environ if env is None else env),
                   "stdout": str(out), "stderr": str(err)}
        _SERVER.stdin.write(json.dumps(request) + "\n")
        _SERVER.stdin.flush()
        pid = _answer()["pid"]
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(pid, signal.SIGKILL)  # the child leads its own session: Snakemake and its jobs
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            returncode = _answer()["returncode"]
        finally:
            timer.cancel()
        stdout, stderr = (path.read_text(errors="replace") for path in (out, err))
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)


@atexit.register
def _stop_server() -> None:
    """End the server with this process (it would see its stdin close anyway) and reap it."""
    if _SERVER is not None and _SERVER.poll() is None:
        _SERVER.stdin.close()
        try:
            _SERVER.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _SERVER.kill()


def _answer() -> dict:
    line = _SERVER.stdout.readline()
    if not line:
        raise RuntimeError(f"the Snakemake fork server ({__file__} --serve) exited with {_SERVER.wait()}")
    return json.loads(line)


def _serve() -> None:
    """The fork server: one JSON request per line on stdin; answers the child's pid, then
    its exit code (negative: killed by that signal), as subprocess does."""
    import snakemake.cli  # noqa: F401  (what the children no longer import)

    startup = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    base_path = [entry for entry in sys.path[1:] if entry not in startup]  # without this file's folder
    main_file = str(Path(snakemake.__file__).with_name("__main__.py"))
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, base_path, main_file)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(request: dict, base_path: list[str], main_file: str) -> None:
    """Become ``python -m snakemake <args>`` as started from ``request``; never returns."""
    code = 1
    try:
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        python_path = list(filter(None, request["env"].get("PYTHONPATH", "").split(os.pathsep)))
        sys.path[:] = [os.getcwd(), *python_path, *base_path]  # as -m sets it up
        sys.argv = [main_file, *request["args"]]
        for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
            opened = os.open(name, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        from snakemake.cli import main

        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)  # as the interpreter does with sys.exit("message")
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 (exiting anyway)
                pass
        os._exit(code)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
