"""What a pipeline job pays before its work: the imports of its script.

Each Snakemake job is a fresh Python process, so a module that a job imports but does
not use costs every such job its import time (torch about a second of CPU, matplotlib
and pandas about half). These tests pin which heavy modules each kind of job may
load, by importing in a clean subprocess, and check benchmarks/demo_time.py, which
sums a run's benchmark files to measure what a change saves.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import demo_time  # noqa: E402

HEAVY = ("torch", "matplotlib", "pandas", "numpy", "scipy", "seaborn", "importlib.metadata")


def modules_added_by(code: str) -> set[str]:
    """The top-level names (and ``importlib.metadata``) that ``code`` adds to
    sys.modules in a fresh interpreter, beyond what start-up already loaded."""
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"{code}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True)
    added = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name.split(".")[0] for name in added} | ({"importlib.metadata"} & set(added))


def script_imports(script: Path) -> str:
    """A workflow script's module-level import statements, as code to run."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    return "\n".join(ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))


def test_probe_sees_a_heavy_import():
    """The probe itself: it must report what a module really pulls in."""
    assert "numpy" in modules_added_by("import numpy")
    assert "importlib.metadata" in modules_added_by("import importlib.metadata")


def test_the_package_and_the_job_helpers_import_nothing_heavy():
    """Every job and Snakemake's rule files import these; they must stay cheap."""
    assert not modules_added_by("import tga, tga.joblog, tga.fingerprint") & set(HEAVY)


def test_version_is_read_from_the_metadata_on_first_use(monkeypatch):
    import tga

    tga._version.cache_clear()
    try:
        expected = importlib.metadata.version("tga")
    except importlib.metadata.PackageNotFoundError:
        expected = "0+unknown"
    assert tga.__version__ == expected
    from tga import __version__

    assert __version__ == expected
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        tga.nonexistent  # noqa: B018

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    tga._version.cache_clear()
    try:
        assert tga.__version__ == "0+unknown"
    finally:
        tga._version.cache_clear()


# Every workflow script that draws: it imports one of the tga.figures_* modules.
FIGURE_SCRIPTS = sorted(
    path for path in (ROOT / "workflow" / "scripts").glob("*.py") if "tga.figures_" in script_imports(path)
)


def test_the_figure_scripts_are_found():
    """The selection above must not silently shrink to nothing after a rename."""
    for module in ("tga.figures_model", "tga.figures_evolution", "tga.figures_compare"):
        assert any(module in script_imports(path) for path in FIGURE_SCRIPTS), module


@pytest.mark.parametrize("script", FIGURE_SCRIPTS, ids=lambda p: p.name)
def test_figure_jobs_do_not_import_torch(script):
    """A figure reads CSV/NPZ files: torch would add about a second to each of the
    dozens of figure jobs of a run."""
    assert "torch" not in modules_added_by(script_imports(script))


@pytest.mark.parametrize("script", ["prepare_corpus.py", "tokenize_split.py"])
def test_data_jobs_do_not_import_torch(script):
    """Preparing the corpus and tokenizing a split handle text and numpy arrays: tga.data
    imports torch only inside the functions that build batches (about a second a job)."""
    added = modules_added_by(script_imports(ROOT / "workflow" / "scripts" / script))
    assert "numpy" in added  # the probe sees the job's real imports
    assert "torch" not in added


@pytest.mark.parametrize("script", ["evaluate.py", "geometry.py", "train.py"])
def test_model_jobs_do_not_import_plotting(script):
    """The jobs that run a model never draw: no matplotlib, seaborn or scipy."""
    added = modules_added_by(script_imports(ROOT / "workflow" / "scripts" / script))
    assert "torch" in added  # the probe sees the job's real imports
    assert not added & {"matplotlib", "seaborn", "scipy"}


# --------------------------------------------------------------------------- demo_time

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(path: Path, *rows: tuple[float, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{s}\t0:00:01\t1\t1\t1\t1\t0\t0\t0\t{cpu}\n" for s, cpu in rows)
    path.write_text(HEADER + body)


@pytest.fixture()
def run_benchmarks(tmp_path: Path) -> Path:
    folder = tmp_path / "benchmarks"
    bench(folder / "train" / "a" / "seed0.tsv", (30.0, 20.0))
    bench(folder / "train" / "a" / "seed1.tsv", (34.0, 22.0))
    bench(folder / "evaluate" / "a" / "seed0.tsv", (2.0, 1.5))
    bench(folder / "prepare_corpus.tsv", (1.0, "NA"))  # Snakemake writes NA when a job beat its sampler
    return folder


def test_demo_time_sums_wall_and_cpu_seconds_per_rule(run_benchmarks):
    rules = demo_time.read_benchmarks(run_benchmarks)
    assert list(rules) == ["evaluate", "prepare_corpus", "train"]
    assert rules["train"].count == 2 and sum(rules["train"].wall) == 64.0 and sum(rules["train"].cpu) == 42.0
    assert rules["prepare_corpus"].cpu == [0.0]
    lines = {line.split()[0]: line.split() for line in demo_time.table(rules).splitlines()[1:]}
    assert lines["train"] == ["train", "2", "64.0", "32.00", "42.0", "21.00"]
    assert lines["TOTAL"] == ["TOTAL", "4", "67.0", "16.75", "43.5", "10.88"]


def test_demo_time_compares_two_runs(run_benchmarks, tmp_path, capsys):
    after = tmp_path / "after"
    bench(after / "train" / "a" / "seed0.tsv", (20.0, 15.0))
    assert demo_time.main([str(after), "--compare", str(run_benchmarks)]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["train"][-2:] == ["-44.0", "-27.0"]  # 20 - (30 + 34), 15 - (20 + 22)
    assert lines["evaluate"][1] == "0" and lines["evaluate"][-2:] == ["-2.0", "-1.5"]


def test_demo_time_names_a_folder_it_cannot_read(tmp_path, capsys):
    assert demo_time.main([str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert demo_time.main([str(tmp_path)]) == 1
    assert "holds no benchmark files" in capsys.readouterr().err
    (tmp_path / "x.tsv").write_text("a\tb\n1\t2\n")
    assert demo_time.main([str(tmp_path)]) == 1
    assert "x.tsv has no 's' and 'cpu_time' columns" in capsys.readouterr().err
