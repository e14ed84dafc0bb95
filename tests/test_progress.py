"""Progress displays (tga/progress.py): plain lines in log files, bars on a terminal,
and the long loops that show them (training steps, evaluation windows)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from tga.data import tokenize_to_file
from tga.evaluate import evaluate_checkpoint
from tga.model import ModelConfig
from tga.progress import LineProgress, progress
from tga.schema import TrainConfig
from tga.tokenizers import CharTokenizer
from tga.train import train_model

LINE = re.compile(r"^(?P<desc>.+): +(?P<pct>\d+)% \((?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+)\)")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def percents(text: str) -> list[int]:
    return [int(LINE.match(line)["pct"]) for line in text.splitlines()]


def test_a_log_file_gets_one_plain_line_per_ten_percent() -> None:
    log = io.StringIO()
    bar = progress(total=1000, desc="llama-preln/seed0", unit="steps", file=log)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    assert percents(text) == list(range(0, 101, 10))  # the start, every 10%, nothing twice at the end
    last = LINE.match(text.splitlines()[-1])
    assert (last["desc"], last["n"], last["total"], last["unit"]) == ("llama-preln/seed0", "1000", "1000", "steps")


def test_granularity_follows_every_percent_also_in_uneven_updates() -> None:
    log = io.StringIO()
    bar = LineProgress(total=400, desc="windows", file=log, every_percent=25)
    for step in (30, 30, 80, 60, 100, 99, 1):  # 30, 60, 140, 200, 300, 399, 400
        bar.update(step)
    bar.close()
    # One line for each quarter crossed, however the updates fall: 60->140 crosses 25%,
    # 140->200 reaches 50%, 300 is 75%, 399 crosses nothing, 400 is 100%.
    assert percents(log.getvalue()) == [0, 35, 50, 75, 100]


def test_a_slow_loop_still_writes_a_line_every_few_seconds() -> None:
    log, clock = io.StringIO(), Clock()
    bar = LineProgress(total=10_000, desc="revisions", unit="steps", file=log, every_seconds=60, clock=clock)
    for _ in range(5):  # 0.05% per step, 31 s per step: time, not percent, makes the lines
        clock.now += 31
        bar.update(1)
    assert [int(LINE.match(ln)["n"]) for ln in log.getvalue().splitlines()] == [0, 2, 4]
    assert "2m04s elapsed" in log.getvalue().splitlines()[-1]


def test_lines_say_time_left_figures_and_where_a_loop_stopped() -> None:
    log, clock = io.StringIO(), Clock()
    bar = LineProgress(total=100, desc="run", unit="steps", file=log, clock=clock)
    for step in range(55):
        clock.now += 1.0
        bar.update(1)
        if step == 19:
            bar.set_postfix(train_loss="3.412", val_ppl="30.5")
    bar.close()  # e.g. a diverged run stops early: its last line says where
    lines = log.getvalue().splitlines()
    assert lines[2] == "run:  20% (20/100 steps), 20s elapsed, ~1m20s left"
    assert lines[3] == "run:  30% (30/100 steps), 30s elapsed, ~1m10s left, train_loss=3.412, val_ppl=30.5"
    assert lines[-1].startswith("run:  55% (55/100 steps)")
    bar.close()
    assert len(log.getvalue().splitlines()) == len(lines)  # closing twice writes nothing more


def test_iterating_counts_the_items_and_disabled_shows_nothing() -> None:
    log = io.StringIO()
    assert list(progress(["a", "b", "c", "d"], desc="stages", unit="stages", file=log)) == ["a", "b", "c", "d"]
    assert percents(log.getvalue()) == [0, 25, 50, 75, 100]
    quiet = io.StringIO()
    bar = progress(total=10, desc="x", file=quiet, enabled=False)
    bar.update(10)
    bar.close()
    assert list(progress([1, 2], file=Terminal(), enabled=False)) == [1, 2]
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar() -> None:
    from tqdm import tqdm

    screen = Terminal()
    bar = progress(total=4, desc="evaluate", unit="windows", file=screen)
    assert isinstance(bar, tqdm)
    bar.update(4)
    bar.close()
    assert "\r" in screen.getvalue() and "4/4" in screen.getvalue()  # redrawn in place, as a bar is


@pytest.fixture()
def tiny_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    text = "the cat sat on the mat. the dog sat on the log. " * 40
    tokenizer = CharTokenizer.from_text(text)
    for name, part in (("train", text), ("valid", text[:400])):
        (tmp_path / f"{name}.txt").write_text(part)
        tokenize_to_file(tmp_path / f"{name}.txt", tokenizer, tmp_path / f"{name}.bin")
    return tmp_path / "train.bin", tmp_path / "valid.bin", tmp_path / "run"


def test_training_and_evaluation_write_progress_lines_into_a_log(tiny_run, monkeypatch) -> None:
    """What a Snakemake job's log file gets (tga.joblog points stderr at it)."""
    train, valid, out = tiny_run
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    model = ModelConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16)
    config = TrainConfig(max_steps=20, batch_size=4, learning_rate=3e-3, warmup_steps=2, eval_interval=10,
                         eval_batches=1, checkpoint_interval=10, device="cpu", threads=1)
    train_model(model, config, train, valid, out, run_name="tiny/seed0")
    evaluate_checkpoint(out / "final.pt", valid, out / "ppl.json", batch_size=2, threads=1)
    text = log.getvalue()
    assert "\r" not in text
    steps = [ln for ln in text.splitlines() if ln.startswith("tiny/seed0:")]
    assert percents("\n".join(steps)) == list(range(0, 101, 10))
    assert "val_ppl=" in steps[-1]
    windows = [LINE.match(ln) for ln in text.splitlines() if ln.startswith("perplexity of ")]
    # 400 characters in windows of 16 tokens: 25 windows, 2 a batch; the last line has them all.
    assert windows[-1]["unit"] == "windows" and windows[-1]["n"] == windows[-1]["total"] == "25"


def test_geometry_reports_checkpoints_and_labelled_prompts(tiny_run, monkeypatch, tmp_path) -> None:
    """Evolution's loop over checkpoints, and a pretrained model's prompts, write lines too."""
    from tga.geometry import analyze_checkpoints, analyze_model
    from tga.model import Transformer, save_checkpoint

    train, _, _ = tiny_run
    tokenizer = CharTokenizer.from_text("the cat sat on the mat. the dog sat on the log. ")
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    ckpts = {}
    for stage in ("init", "step10", "final"):
        ckpts[stage] = tmp_path / f"{stage}.pt"
        save_checkpoint(ckpts[stage], model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the mat.\nthe dog sat on the log.\n")
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    analyze_checkpoints(ckpts, prompts, tokenizer, tmp_path / "geo", heatmap_layers=[0])
    lines = [ln for ln in log.getvalue().splitlines() if ln.startswith("geometry into")]
    assert "\r" not in log.getvalue()
    assert LINE.match(lines[-1])["n"] == LINE.match(lines[-1])["total"] == "3"

    ids = [tokenizer.encode("the cat sat."), tokenizer.encode("the dog sat.")]
    log.truncate(0), log.seek(0)
    analyze_model(model, ids, "init", 0, [], progress_label="entry init: prompts")
    labelled = [ln for ln in log.getvalue().splitlines() if ln.startswith("entry init: prompts")]
    assert LINE.match(labelled[-1])["total"] == "2"
    log.truncate(0), log.seek(0)
    analyze_model(model, ids, "init", 0, [])  # no label: silent, as the workflow's own geometry jobs
    assert log.getvalue() == ""
