"""One training job over several processes (DDP, tga.distributed), checked on CPU.

Two gloo processes train the global batch one process trains, from the same seed; the
reference is that one process. The windows get a token each that is its position in
the split (a positional "tokenizer"), so a window's first input token names its start
and the test sees which windows each rank trained on.

Tolerance. With dropout 0 the two runs compute the same mean gradient, summed in
another order: per rank over its micro-batches, then across ranks in gloo's
all-reduce, instead of over one batch at once. float32 rounding (about 1e-7 relative
per operation) then differs, and Adam's step m / (sqrt(v) + eps) carries it on. Over
these 10 steps (CPU, torch 2.13, 2026-12-04) the weights differed by at most 5.8e-7
(2 ranks) and 2.7e-7 (2 accumulation steps), and the logged losses (6 significant
digits, about 6.4) by one unit of their last digit, 1e-5. The tolerances are 1e-5 on
weights and 1e-4 on logged losses: 17x and 10x those, room for other CPUs' SIMD.
With dropout the ranks draw other masks than one process, so runs agree in
distribution, not value; the equality tests therefore use dropout 0.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

import tga.distributed
import tga.resume
import tga.train
from tga.data import tokenize_to_file
from tga.distributed import Ranks, accumulation_steps, rank_slice, torchrun_command
from tga.model import ModelConfig, load_checkpoint
from tga.schema import TrainConfigError
from tga.train import TrainConfig, TrainingDiverged, train_model

N_TOKENS = 640
MODEL = ModelConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
TRAIN = dict(max_steps=10, batch_size=8, learning_rate=3e-3, warmup_steps=2, eval_interval=5, eval_batches=1,
             checkpoint_interval=4, checkpoint_spacing="linear", device="cpu", threads=1, seed=5)
# float32 rounding of another summation order, carried by 10 Adam steps (module docstring)
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-5
LOSS_COLUMNS = ("train_loss", "val_loss")


class PositionTokenizer:
    """Token i = position i (mod the vocabulary): every window of the split is told
    apart by its first token, and the successor rule is something to learn."""

    name = "position"
    vocab_size = N_TOKENS

    def encode(self, text: str) -> list[int]:
        return [i % N_TOKENS for i in range(len(text))]


class Interrupted(Exception):
    """Stands in for a crash in the interrupted distributed run."""


def write_tokens(folder: Path) -> tuple[Path, Path]:
    (folder / "train.txt").write_text("x" * N_TOKENS)
    (folder / "valid.txt").write_text("x" * (N_TOKENS // 2))
    tokenize_to_file(folder / "train.txt", PositionTokenizer(), folder / "train.bin")
    tokenize_to_file(folder / "valid.txt", PositionTokenizer(), folder / "valid.bin")
    return folder / "train.bin", folder / "valid.bin"


def record_windows(log: list[list[int]]) -> None:
    """Record the start (first token) of every window ``train_step`` trains on, per step."""
    real = tga.train.train_step

    def train_step(forward, model, optimizer, x, *args):
        log.append(x[:, 0].tolist())
        return real(forward, model, optimizer, x, *args)

    tga.train.train_step = train_step


def loss_rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "train_log.csv") as handle:
        return [{k: float(row[k]) for k in LOSS_COLUMNS if row[k]} for row in csv.DictReader(handle)]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a, "cpu")[0].state_dict(), load_checkpoint(b, "cpu")[0].state_dict()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _rank_main(rank: int, folder: str, ports: list[int]) -> None:
    """One of two gloo ranks: an uninterrupted run, a run interrupted after 6 batches
    and its resumed continuation, and a run that diverges on rank 1 only. Rank 1 fails
    if it writes any file. Each run is one process group on its own port: a rank that
    finishes first must not meet the previous group's rendezvous."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    next_port = iter(ports)

    def train_model(*args, **kwargs):
        os.environ["MASTER_PORT"] = str(next(next_port))
        return tga.train.train_model(*args, **kwargs)

    torch.set_num_threads(1)
    folder_path, ranks = Path(folder), Ranks(rank, 2, rank)
    tokens = (folder_path / "train.bin", folder_path / "valid.bin")
    if rank != 0:
        def no_write(*args, **kwargs):
            raise AssertionError(f"rank {rank} wrote a file: {args[:1]}")

        for module, name in ((tga.train, "save_checkpoint"), (tga.train, "atomic_write"), (tga.train, "write_status"),
                             (tga.resume, "atomic_write")):
            setattr(module, name, no_write)
    windows: list[list[int]] = []
    record_windows(windows)
    config = TrainConfig(**{**TRAIN, "micro_batch_size": 2})  # 2 per pass x 2 passes x 2 ranks = 8
    train_model(MODEL, config, *tokens, folder_path / "ddp", show_progress=False, ranks=ranks)
    (folder_path / f"windows{rank}.json").write_text(json.dumps(windows))

    real_sample, calls = tga.train.sample_batch, {"n": 0}

    def interrupting_sample(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise Interrupted
        return real_sample(*args, **kwargs)

    tga.train.sample_batch = interrupting_sample
    with pytest.raises(Interrupted):
        train_model(MODEL, config, *tokens, folder_path / "resumed", show_progress=False,
                    resume_dir=folder_path / "state", ranks=ranks)
    tga.train.sample_batch = real_sample
    train_model(MODEL, config, *tokens, folder_path / "resumed", show_progress=False,
                resume_dir=folder_path / "state", ranks=ranks)

    if rank == 1:  # only rank 1's loss becomes NaN, at step 3: both ranks must stop there
        real_step, steps = tga.train.train_step, {"n": 0}

        def nan_at_step_3(*args):
            steps["n"] += 1
            loss = real_step(*args)
            return loss * float("nan") if steps["n"] == 3 else loss

        tga.train.train_step = nan_at_step_3
    with pytest.raises(TrainingDiverged) as diverged:
        train_model(MODEL, config, *tokens, folder_path / "diverged", show_progress=False, ranks=ranks)
    assert diverged.value.step == 3


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (all bound at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.workflow
def test_two_gloo_processes_train_as_one_process_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same global batch and seed: the loss curve and weights of 2 gloo ranks (with 2
    accumulation steps each) equal 1 process's; the ranks split each global batch with
    no window on two ranks; rank 1 writes nothing; a killed DDP run resumes to the
    uninterrupted one's weights bit for bit; a NaN on one rank stops both."""
    tokens = write_tokens(tmp_path)
    single_windows: list[list[int]] = []
    monkeypatch.setattr(tga.train, "train_step", tga.train.train_step)  # undone after the test
    record_windows(single_windows)
    train_model(MODEL, TrainConfig(**TRAIN), *tokens, tmp_path / "single", show_progress=False)

    spawned = torch.multiprocessing.spawn(_rank_main, args=(str(tmp_path), free_ports(4)), nprocs=2, join=False)
    deadline = time.monotonic() + 180  # a hung collective fails the test instead of the CI run
    while not spawned.join(timeout=1):
        if time.monotonic() > deadline:
            for process in spawned.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 180 s (a hung collective)")

    rank_windows = [json.loads((tmp_path / f"windows{r}.json").read_text()) for r in (0, 1)]
    steps = TRAIN["max_steps"]
    # each rank: half the global batch per step (in 2 micro-batches); together: all of it, in order
    for step in range(steps):
        assert len(rank_windows[0][step]) == len(rank_windows[1][step]) == 4
        assert rank_windows[0][step] + rank_windows[1][step] == single_windows[step], step

    single, ddp = loss_rows(tmp_path / "single"), loss_rows(tmp_path / "ddp")
    assert len(single) == len(ddp) == 3
    worst = max(abs(a[k] - b[k]) for a, b in zip(single, ddp) for k in a)
    assert worst <= LOSS_TOLERANCE, f"loss curves differ by {worst}"
    assert single[-1]["train_loss"] < single[1]["train_loss"]  # it learned: the comparison means something
    weights = max_weight_difference(tmp_path / "single" / "final.pt", tmp_path / "ddp" / "final.pt")
    assert weights <= WEIGHT_TOLERANCE, f"weights differ by {weights}"

    assert json.loads((tmp_path / "ddp" / "status.json").read_text())["status"] == "ok"
    resumed = tmp_path / "resumed"
    for name in ("final.pt", "checkpoints/step000008.pt"):
        wa = load_checkpoint(tmp_path / "ddp" / name, "cpu")[0].state_dict()
        wb = load_checkpoint(resumed / name, "cpu")[0].state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert loss_rows(resumed) == loss_rows(tmp_path / "ddp")
    assert not (tmp_path / "state").exists()  # an ended run leaves no resume state
    status = json.loads((tmp_path / "diverged" / "status.json").read_text())
    assert status["status"] == "diverged" and status["step"] == 3  # rank 1's NaN stopped rank 0 too


def test_accumulation_matches_one_pass(tmp_path: Path) -> None:
    """One process, micro_batch_size = batch_size / 2 (2 accumulation steps), trains the
    same windows to the same losses as the whole batch in one pass, within the
    tolerance; an accumulation that forgot the 1/steps scaling would not."""
    tokens = write_tokens(tmp_path)
    whole = train_model(MODEL, TrainConfig(**TRAIN), *tokens, tmp_path / "whole", show_progress=False)
    halves = train_model(MODEL, TrainConfig(**{**TRAIN, "micro_batch_size": 4}), *tokens, tmp_path / "halves",
                         show_progress=False)
    a, b = loss_rows(tmp_path / "whole"), loss_rows(tmp_path / "halves")
    worst = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)
    assert worst <= LOSS_TOLERANCE, f"accumulated run's losses differ by {worst}"
    assert abs(whole["final_val_loss"] - halves["final_val_loss"]) <= LOSS_TOLERANCE
    assert max_weight_difference(tmp_path / "whole" / "final.pt", tmp_path / "halves" / "final.pt") <= WEIGHT_TOLERANCE


def test_accumulated_gradient_is_the_whole_batch_mean() -> None:
    """Adam hides a gradient's scale, so the scaling is checked on the gradient itself:
    one step of plain SGD (lr 1) over 2 micro-batches moves every weight as one pass
    over the whole batch does. Without the 1/steps scale the move would be twice as
    large; without the last micro-batch, a different one."""
    from contextlib import nullcontext

    from tga.model import Transformer

    torch.manual_seed(0)
    x = torch.randint(0, 50, (8, 16))
    y = torch.randint(0, 50, (8, 16))
    moves = []
    for accumulation in (1, 2, 4):
        torch.manual_seed(1)
        model = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
        before = [p.detach().clone() for p in model.parameters()]
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        tga.train.train_step(model, model, sgd, x, y, nullcontext(), 0.0, accumulation)
        moves.append(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]))
    scale = float(moves[0].abs().max())
    assert scale > 0
    for move in moves[1:]:
        assert float((move - moves[0]).abs().max()) <= 1e-5 * scale


def assert_partition(slices: list[torch.Tensor], batch: torch.Tensor) -> None:
    """Every index of the global batch on exactly one rank, in order."""
    assert torch.equal(torch.cat(slices), batch)
    sizes = {len(s) for s in slices}
    assert sizes == {len(batch) // len(slices)}


def test_rank_slices_partition_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """No index of a global batch goes to two ranks, none is left out, for 1-4 ranks;
    a slice that hands every rank the whole batch fails the same check."""
    batch = torch.arange(12)
    for world in (1, 2, 3, 4):
        assert_partition([rank_slice(batch, Ranks(r, world)) for r in range(world)], batch)
    monkeypatch.setattr(tga.distributed, "rank_slice", lambda b, ranks: b)
    with pytest.raises(AssertionError):
        assert_partition([tga.distributed.rank_slice(batch, Ranks(r, 2)) for r in range(2)], batch)


def test_accumulation_steps_and_the_error_when_they_do_not_divide() -> None:
    assert accumulation_steps(8, None, 1) == 1
    assert accumulation_steps(8, None, 2) == 1
    assert accumulation_steps(8, 2, 2) == 2
    assert accumulation_steps(64, 4, 4) == 4
    with pytest.raises(TrainConfigError, match=r"batch_size=8 is not micro_batch_size=4 x 4 process\(es\).*\[1, 2\]"):
        accumulation_steps(8, 4, 4)
    with pytest.raises(TrainConfigError, match=r"raise batch_size to a multiple of 4"):
        accumulation_steps(6, None, 4)
    with pytest.raises(TrainConfigError, match="micro_batch_size=3 must divide batch_size=8"):
        TrainConfig(batch_size=8, micro_batch_size=3)


def test_torchrun_commands_for_one_node_and_for_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = torchrun_command(tmp_path / "job.json", 4)
    assert one[1:] == ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "4",
                       "-m", "tga.distributed", str(tmp_path / "job.json")]
    with pytest.raises(tga.distributed.DistributedError, match="needs a SLURM job"):
        tga.distributed.first_slurm_node({})
    monkeypatch.setattr(tga.distributed, "first_slurm_node", lambda env: "node07")
    multi = torchrun_command(tmp_path / "job.json", 8, nodes=2, env={"SLURM_JOB_ID": "123"})
    assert multi[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert ["--rdzv_backend", "c10d"] == multi[multi.index("--rdzv_backend"):multi.index("--rdzv_backend") + 2]
    assert "node07:29500" in multi and "123" in multi and multi[multi.index("--nproc_per_node") + 1] == "8"
    assert Ranks.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1)
    assert Ranks.from_env({}) == Ranks()


def test_memory_estimate_is_that_of_one_micro_batch() -> None:
    """A global batch that does not fit trains in micro-batches, so the estimate (which
    refuses jobs) counts one micro-batch's activations and names micro_batch_size."""
    from tga.resources import estimate_training

    model = ModelConfig(vocab_size=50_257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    whole = estimate_training(model, {"batch_size": 64, "device": "cuda"}, "cuda")
    micro = estimate_training(model, {"batch_size": 64, "micro_batch_size": 8, "device": "cuda"}, "cuda")
    assert micro.parts["activations"] * 8 == whole.parts["activations"]
    assert micro.device_bytes < whole.device_bytes / 4
    assert micro.flops_per_step == whole.flops_per_step  # a step still trains the whole batch
    assert ("training.micro_batch_size", 8) in micro.culprits and ("training.batch_size", 64) in whole.culprits
