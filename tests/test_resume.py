"""Resuming a killed training run, and the files a diverged run ends with.

The reference for every resumed run is an uninterrupted run with the same seed: the
resumed one must end with bitwise-equal weights and an equal loss history.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import tga.train
from tga.data import tokenize_to_file
from tga.model import ModelConfig, load_checkpoint
from tga.tokenizers import CharTokenizer
from tga.resume import RESUME_STATE, resume_dir_for
from tga.status import read_status
from tga.train import TrainConfig, TrainingDiverged, train_model

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the cat sat on the mat. the dog sat on the log. a bird flew over the old barn. " * 30
# Dropout draws from the global RNG at every step, so an unrestored RNG would show.
MODEL = ModelConfig(vocab_size=1, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
# Checkpoints (10, 20, 30, 40) and evaluations (15, 30, 40) interleave, so a state is
# also written mid-way between two log rows, with a partial loss sum to carry over.
TRAIN = dict(max_steps=40, batch_size=4, learning_rate=3e-3, warmup_steps=5, eval_interval=15,
             eval_batches=2, checkpoint_interval=10, checkpoint_spacing="linear", device="cpu", threads=1, seed=7)
LOSS_COLUMNS = ("step", "lr", "train_loss", "val_loss", "val_ppl")


class Interrupted(Exception):
    """Stands in for a crash in the in-process interrupted runs."""


@pytest.fixture()
def tokens(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "valid.txt").write_text(TEXT[:500])
    tokenizer = CharTokenizer.from_text(TEXT)
    tokenize_to_file(tmp_path / "train.txt", tokenizer, tmp_path / "train.bin")
    tokenize_to_file(tmp_path / "valid.txt", tokenizer, tmp_path / "valid.bin")
    return tmp_path / "train.bin", tmp_path / "valid.bin"


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{**TRAIN, **overrides})


def run(tokens, out: Path, resume: Path | None = None, **overrides) -> dict:
    return train_model(MODEL, config(**overrides), *tokens, out, run_name="v/seed7", show_progress=False,
                       resume_dir=resume)


def interrupt_after(monkeypatch, n_batches: int) -> None:
    """Make the next in-process run raise when drawing batch ``n_batches + 1``."""
    real = tga.train.sample_batch
    calls = {"n": 0}

    def sample_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_batches:
            raise Interrupted(f"stopped before batch {calls['n']}")
        return real(*args, **kwargs)

    monkeypatch.setattr(tga.train, "sample_batch", sample_batch)


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)[0].state_dict(), load_checkpoint(b)[0].state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{a.name}: {key} differs"


def assert_same_run(out: Path, ref: Path) -> None:
    """Equal weights in init, final and every kept checkpoint; equal loss columns."""
    assert_same_weights(out / "init.pt", ref / "init.pt")
    assert_same_weights(out / "final.pt", ref / "final.pt")
    names = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == names
    for name in names:
        assert_same_weights(out / "checkpoints" / name, ref / "checkpoints" / name)
    got, want = read_log(out / "train_log.csv"), read_log(ref / "train_log.csv")
    assert [[r[c] for c in LOSS_COLUMNS] for r in got] == [[r[c] for c in LOSS_COLUMNS] for r in want]
    assert load_checkpoint(out / "final.pt")[1] == load_checkpoint(ref / "final.pt")[1]


@pytest.fixture()
def reference(tokens, tmp_path) -> Path:
    """An uninterrupted run, itself with a resume dir, which it must leave removed."""
    out, resume = tmp_path / "reference", tmp_path / "reference-resume"
    run(tokens, out, resume)
    assert not resume.exists()
    assert [r["step"] for r in read_log(out / "train_log.csv")] == ["0", "15", "30", "40"]
    return out


CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import tga.train
    from tga.model import ModelConfig
    from tga.train import TrainConfig, train_model

    args = json.loads(sys.argv[1])
    real, calls = tga.train.sample_batch, {"n": 0}

    def sample_batch(*a, **k):
        # Park the run at a known point between two checkpoints, so the kill always
        # lands mid-way and not after a run that finished too fast to be killed.
        calls["n"] += 1
        if calls["n"] == args["pause_at_batch"]:
            Path(args["marker"]).write_text("paused")
            time.sleep(600)
        return real(*a, **k)

    tga.train.sample_batch = sample_batch
    train_model(ModelConfig(**args["model"]), TrainConfig(**args["train"]), Path(args["train_tokens"]),
                Path(args["val_tokens"]), Path(args["out"]), run_name="v/seed7", show_progress=False,
                resume_dir=Path(args["resume"]))
""")


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tokens, tmp_path, reference, capsys):
    out, resume, marker = tmp_path / "run", tmp_path / "resume", tmp_path / "paused"
    args = {"model": MODEL.__dict__, "train": TRAIN, "train_tokens": str(tokens[0]), "val_tokens": str(tokens[1]),
            "out": str(out), "resume": str(resume), "marker": str(marker),
            "pause_at_batch": 26}  # 5 steps past the state written at step 20
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, f"child exited early:\n{child.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "child never reached the pause point"
            time.sleep(0.02)
        assert (resume / RESUME_STATE).is_file()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert not (out / "final.pt").exists()
    assert [r["step"] for r in read_log(out / "train_log.csv")] == ["0", "15"]
    shutil.rmtree(out)  # what Snakemake does to a failed job's declared outputs
    (resume / f".{RESUME_STATE}.123.tmp").write_bytes(b"half-written by a kill during a save")

    summary = run(tokens, out, resume)

    assert "resuming v/seed7 from step 20 of 40" in capsys.readouterr().err
    assert_same_run(out, reference)
    assert summary["final_val_loss"] == load_checkpoint(reference / "final.pt")[1]["final_val_loss"]
    assert not resume.exists()  # the state (and the stray temp file) are gone after final.pt


@pytest.mark.parametrize("steps_done, resumed_from", [(5, None), (10, 10), (20, 20), (33, 30)])
def test_interrupted_at_any_step_resumes_from_the_last_state(
    tokens, tmp_path, reference, monkeypatch, capsys, steps_done, resumed_from
):
    out, resume = tmp_path / "run", tmp_path / "resume"
    interrupt_after(monkeypatch, steps_done)
    with pytest.raises(Interrupted):
        run(tokens, out, resume)
    monkeypatch.undo()
    shutil.rmtree(out)

    run(tokens, out, resume)

    err = capsys.readouterr().err
    if resumed_from is None:  # killed before the first checkpoint: nothing to resume, silently fresh
        assert err == ""
    else:
        assert f"resuming v/seed7 from step {resumed_from} of 40" in err
    assert_same_run(out, reference)
    assert not resume.exists()


def test_state_of_other_settings_is_ignored(tokens, tmp_path, monkeypatch, capsys):
    resume = tmp_path / "resume"
    interrupt_after(monkeypatch, 25)
    with pytest.raises(Interrupted):
        run(tokens, tmp_path / "old", resume)
    assert (resume / RESUME_STATE).is_file()
    monkeypatch.undo()

    run(tokens, tmp_path / "new", resume, learning_rate=2e-3)
    err = capsys.readouterr().err
    assert "other settings (training.learning_rate: 0.003 -> 0.002)" in err
    assert "starting fresh from step 0" in err and "resuming v/seed7" not in err
    run(tokens, tmp_path / "fresh", learning_rate=2e-3)
    assert_same_run(tmp_path / "new", tmp_path / "fresh")


def _truncate(state: Path) -> None:
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def _garbage(state: Path) -> None:
    state.write_bytes(os.urandom(4096))


def _drop_optimizer(state: Path) -> None:
    payload = torch.load(state, weights_only=True)
    del payload["optimizer"]
    torch.save(payload, state)


def _wrong_shape(state: Path) -> None:
    payload = torch.load(state, weights_only=True)
    key = next(iter(payload["model"]))
    payload["model"][key] = torch.zeros(3)
    torch.save(payload, state)


def _altered_checkpoint(state: Path) -> None:
    kept = state.parent / "checkpoints" / "step000010.pt"
    kept.write_bytes(kept.read_bytes()[:-10])


@pytest.mark.parametrize("damage, message", [
    (_truncate, "it is corrupt or truncated"),
    (_garbage, "it is corrupt or truncated"),
    (_drop_optimizer, "its entries ['optimizer'] are missing or malformed"),
    (_wrong_shape, "it cannot be restored (RuntimeError"),
    (_altered_checkpoint, "its copy of checkpoint step000010.pt is missing or altered"),
])
def test_damaged_state_means_a_clear_message_and_a_fresh_start(
    tokens, tmp_path, reference, monkeypatch, capsys, damage, message
):
    resume = tmp_path / "resume"
    interrupt_after(monkeypatch, 25)
    with pytest.raises(Interrupted):
        run(tokens, tmp_path / "killed", resume)
    monkeypatch.undo()
    damage(resume / RESUME_STATE)

    run(tokens, tmp_path / "run", resume)

    err = capsys.readouterr().err
    assert message in err and "starting fresh from step 0" in err and "resuming v/seed7" not in err
    assert_same_run(tmp_path / "run", reference)
    assert not resume.exists()


def test_run_killed_after_its_last_state_only_writes_final(tokens, tmp_path, reference, monkeypatch, capsys):
    resume = tmp_path / "resume"
    real = tga.train.save_checkpoint

    def save_checkpoint(path, *args, **kwargs):
        if Path(path).name == "final.pt":
            raise Interrupted("killed before final.pt")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tga.train, "save_checkpoint", save_checkpoint)
    with pytest.raises(Interrupted):
        run(tokens, tmp_path / "run", resume)
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "run")

    run(tokens, tmp_path / "run", resume)

    assert "resuming v/seed7 from step 40 of 40" in capsys.readouterr().err
    assert_same_run(tmp_path / "run", reference)


def test_divergence_ends_the_run_with_its_status_and_no_resume_state(tokens, tmp_path, monkeypatch):
    out, resume = tmp_path / "models" / "v" / "seed7", tmp_path / "resume"
    interrupt_after(monkeypatch, 12)  # a state at step 10 exists when the diverging run starts
    with pytest.raises(Interrupted):
        run(tokens, out, resume)
    monkeypatch.undo()
    shutil.rmtree(out)  # what Snakemake does to a failed job's declared outputs
    with pytest.raises(TrainingDiverged, match=r"v/seed7 diverged: .* at step \d+ \(seed 7\)") as info:
        run(tokens, out, resume, learning_rate=1e6, grad_clip=0.0)

    status = read_status(out / "status.json")
    assert {k: status[k] for k in ("status", "run", "seed", "step")} == {
        "status": "diverged", "run": "v/seed7", "seed": 7, "step": info.value.step}
    assert status["message"] == str(info.value)
    rows = read_log(out / "train_log.csv")
    assert rows[0]["step"] == "0" and int(rows[-1]["step"]) == status["last_logged_step"] < status["step"]
    # every file a workflow declares exists; final.pt says where and how the run stopped
    assert load_checkpoint(out / "final.pt")[1] == {**{k: status[k] for k in ("step", "seed", "run", "last_logged_step",
                                                                               "message")}, "status": "diverged"}
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert all(int(name[4:10]) < status["step"] for name in kept)  # never a checkpoint past the divergence
    assert not resume.exists()  # an ended run is never resumed, whatever its outcome

    run(tokens, out, resume)  # settings that train: the status becomes ok
    assert read_status(out / "status.json") == {"status": "ok", **load_checkpoint(out / "final.pt")[1]}


def test_resume_dir_lies_outside_the_declared_model_outputs():
    assert resume_dir_for(Path("outputs/models/llama-preln/seed3"), "llama-preln", 3) == Path(
        "outputs/.resume/llama-preln/seed3")
    assert resume_dir_for(Path("/w/out/models/a.b/seed0"), "a.b", 0) == Path("/w/out/.resume/a.b/seed0")
    # Another layout still gets a folder that is not inside the model directory.
    resume = resume_dir_for(Path("runs/x"), "v", 0)
    assert Path("runs/x") not in (resume, *resume.parents)


def test_fingerprint_records_processes_and_micro_batches_only_when_used(tokens):
    """A single-process run without micro_batch_size keeps the fingerprint it had before
    these settings existed (its states still resume); a distributed run's world size
    and a set micro_batch_size are part of it, so a state never crosses them."""
    from tga.data import read_token_metadata
    from tga.device import Runtime
    from tga.resume import run_settings, settings_fingerprint

    meta = read_token_metadata(tokens[0]), read_token_metadata(tokens[1])
    runtime = Runtime.resolve("cpu")
    plain = run_settings(MODEL, config(), runtime, *meta)
    assert "world_size" not in plain["training"] and "micro_batch_size" not in plain["training"]
    fingerprints = {settings_fingerprint(run_settings(MODEL, config(**c), runtime, *meta, world_size=w))
                    for c, w in (({}, 1), ({}, 2), ({"micro_batch_size": 2}, 1), ({"micro_batch_size": 2}, 2))}
    assert len(fingerprints) == 4
