"""One training job on several processes: torch.distributed's DDP, started by torchrun.

The design is data parallelism with one global batch (``training.batch_size``):

- Every rank draws the SAME global batch of window starts from the same seeded
  generator (and the same rare-token relabeling), then keeps its own contiguous slice
  (:func:`rank_slice`): no window is trained on by two ranks in one step, the batch
  generator's state is the same on every rank (so one copy of it resumes them all), and
  the global batch is the one a single process with the same seed draws.
- A rank's slice is cut into ``accumulation_steps`` micro-batches of
  ``training.micro_batch_size`` windows; each micro loss is scaled by
  ``1 / accumulation_steps`` and DDP averages the ranks' gradients, so the optimizer
  sees the gradient of the global batch's mean loss. DDP's ``no_sync`` skips the
  all-reduce on all but the last micro-step.
- Rank 0 writes every file; the per-step loss and validation sums are all-reduced, so
  every rank logs and detects divergence from the same numbers and all stop together.

``launch_training`` is what the workflow calls: one process (``train_gpus`` 0 or 1) runs
:func:`tga.train.train_from_settings` in place, today's path unchanged; more start
``torchrun --standalone`` (one node) or ``srun`` + ``torchrun`` with c10d rendezvous
(SLURM, ``train_nodes`` > 1), whose ranks run ``python -m tga.distributed JOB.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from tga.atomic import atomic_write_text
from tga.gpu_slots import launcher_environment
from tga.device import resolve_device
from tga.schema import TrainConfigError

# torchrun's c10d rendezvous port on the first node of a multi-node SLURM job.
RENDEZVOUS_PORT = 29500


class DistributedError(RuntimeError):
    """A distributed training job cannot start or did not finish."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job: ``rank`` of ``world_size`` processes, the
    ``local_rank``-th on its node (its GPU's index there)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Ranks":
        """From the variables torchrun sets for each process it starts (none: one process)."""
        try:
            ranks = cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
        except ValueError as exc:
            raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK are not integers ({exc}): start ranks with torchrun")
        if not 0 <= ranks.rank < ranks.world_size:
            raise DistributedError(f"RANK={ranks.rank} is outside WORLD_SIZE={ranks.world_size}")
        return ranks


SINGLE = Ranks()


def accumulation_steps(batch_size: int, micro_batch_size: int | None, world_size: int) -> int:
    """Forward/backward passes per optimizer step in each process: ``batch_size /
    (micro_batch_size * world_size)``; ``micro_batch_size`` None means one pass
    (``batch_size / world_size`` windows each). One error names the keys when it does
    not divide."""
    micro = batch_size // world_size if micro_batch_size is None else micro_batch_size
    if micro < 1 or batch_size % (micro * world_size):
        given = "null" if micro_batch_size is None else micro_batch_size
        divisors = [d for d in range(1, batch_size // world_size + 1) if batch_size % (d * world_size) == 0]
        hint = (f"set micro_batch_size to one of {divisors}" if divisors
                else f"raise batch_size to a multiple of {world_size}")
        raise TrainConfigError(
            f"training setting batch_size={batch_size} is not micro_batch_size={given} x {world_size} process(es) "
            f"x an integer number of accumulation steps: {hint}", "micro_batch_size")
    return batch_size // (micro * world_size)


def rank_slice(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous share of a global batch (its first dimension)."""
    if not ranks.distributed:
        return batch
    share = batch.shape[0] // ranks.world_size
    return batch[ranks.rank * share:(ranks.rank + 1) * share]


def start_process_group(ranks: Ranks, device: str) -> str:
    """Join the job's process group (NCCL on CUDA, gloo on CPU) and return the device
    this rank trains on: ``cuda:<local_rank>`` for a CUDA job (torchrun starts one
    process per GPU), else ``device`` unchanged. Rendezvous comes from torchrun's
    environment (MASTER_ADDR, MASTER_PORT)."""
    kind = resolve_device(device).type
    if kind == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        device = f"cuda:{ranks.local_rank}"
    elif kind != "cpu":
        raise DistributedError(f"distributed training runs on cuda or cpu, not {kind}: set training.device")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=ranks.rank, world_size=ranks.world_size)
    return device


def end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of ``value`` over the ranks (one all-reduce; no host sync on CUDA)."""
    if not ranks.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / ranks.world_size


def sum_over_ranks(values: Sequence[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Float64 sums of a few host numbers over the ranks (validation's loss and count)."""
    if not ranks.distributed:
        return list(values)
    total = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def all_ranks_agree(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (e.g. every rank restored a resume state)."""
    if not ranks.distributed:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_to_main(value: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank 0 (None on the others)."""
    if not ranks.distributed:
        return [value]
    gathered: list[Any] | None = [None] * ranks.world_size if ranks.main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def data_parallel(module: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``module`` wrapped in DDP for a distributed job (it broadcasts rank 0's weights
    and averages gradients); ``module`` itself for one process."""
    if not ranks.distributed:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap_data_parallel(module: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (``module`` itself when it is none)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's own random stream (dropout): derived from the run's seed
    and the rank through numpy's SeedSequence, so ranks never share a stream."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def gradient_sync(module: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's ``no_sync`` for a micro-step that must not all-reduce yet; a no-op otherwise."""
    if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def threads_per_rank(threads: int, processes_per_node: int) -> int:
    """A job's CPU threads shared among its processes on one node (at least 1 each)."""
    return max(1, threads // processes_per_node) if threads > 0 else 0


def first_slurm_node(env: Mapping[str, str] = os.environ) -> str:
    """The first host of the SLURM job: torchrun's c10d rendezvous runs there."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DistributedError("resources.train_nodes > 1 needs a SLURM job (SLURM_JOB_NODELIST is not set): "
                               "run with --workflow-profile slurm, or set train_nodes: 1")
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return result.stdout.split()[0]


def torchrun_command(job_file: Path, processes_per_node: int, nodes: int = 1,
                     env: Mapping[str, str] = os.environ) -> list[str]:
    """The command that starts a job's ranks, each running ``python -m tga.distributed
    job_file``. One node: ``torchrun --standalone``. Several (SLURM only): ``srun``
    starts one torchrun per node, which meet at c10d rendezvous on the first node.
    ``python -m torch.distributed.run`` is torchrun, run by this job's interpreter."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    ranks_run = ["-m", "tga.distributed", str(job_file)]
    if nodes <= 1:
        return [*torchrun, "--standalone", "--nnodes", "1", "--nproc_per_node", str(processes_per_node), *ranks_run]
    endpoint = f"{first_slurm_node(env)}:{RENDEZVOUS_PORT}"
    job_id = env.get("SLURM_JOB_ID", "tga")
    return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *torchrun, "--nnodes", str(nodes), "--nproc_per_node", str(processes_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", job_id, *ranks_run]


def launch_training(job: dict[str, Any], gpus_per_node: int, nodes: int = 1) -> dict[str, Any]:
    """Train one variant and seed (``job``: :func:`tga.train.train_from_settings`'s
    keyword arguments) on ``gpus_per_node`` x ``nodes`` processes.

    With one process it calls ``train_from_settings`` here (today's path). With more it
    writes ``job`` beside the run (a shared file system on SLURM), starts the ranks,
    relays their output to this process's stderr (the job's log) and reads the outcome
    from ``status.json``; a diverged run raises :class:`tga.train.TrainingDiverged` as
    the in-process path does."""
    from tga.status import DIVERGED, STATUS_FILE, read_status
    from tga.train import TrainingDiverged, train_from_settings

    per_node = max(1, gpus_per_node)
    if per_node * nodes == 1:
        return train_from_settings(**job)
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {**job, "threads": threads_per_rank(int(job.get("threads", 0)), per_node)}
    job_file = out_dir / ".distributed-job.json"
    atomic_write_text(job_file, json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in job.items()}))
    command = torchrun_command(job_file, per_node, nodes)
    # On one node with more GPUs than the job's, it claims its own (tga.gpu_slots); the
    # ranks see exactly those. On several nodes SLURM's allocation is the job's.
    claim = (launcher_environment(str(job["settings"]["training"].get("device", "auto")), per_node) if nodes == 1
             else nullcontext())
    try:
        with claim as env:
            if env is not None:
                print(f"tga train: on GPUs {env['CUDA_VISIBLE_DEVICES']} (claimed)", file=sys.stderr, flush=True)
            print(f"tga train: {' '.join(command)}", file=sys.stderr, flush=True)
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env) as proc:
                for line in proc.stdout:
                    sys.stderr.write(line)
                code = proc.wait()
    finally:
        job_file.unlink(missing_ok=True)
    if code != 0:
        raise DistributedError(f"the {per_node * nodes} training processes of {job.get('run_name', out_dir)} exited "
                               f"with code {code}; each rank's error is in the log above")
    status = read_status(out_dir / STATUS_FILE)
    if status["status"] == DIVERGED:
        raise TrainingDiverged(status["message"], status["run"], status["seed"], status["step"],
                               status["last_logged_step"])
    return {k: v for k, v in status.items() if k != "status"}


def run_rank(job_file: Path) -> None:
    """One rank of a job :func:`launch_training` started: train, then leave the group.
    A divergence is a result (rank 0 wrote ``status.json``), so it exits 0."""
    from tga.train import TrainingDiverged, train_from_settings

    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    try:
        train_from_settings(**job, ranks=Ranks.from_env())
    except TrainingDiverged:
        pass
    finally:
        end_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tga.distributed JOB.json (started by torchrun; see tga.distributed)")
    run_rank(Path(sys.argv[1]))
