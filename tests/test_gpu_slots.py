"""Device claims on a multi-GPU node (tga/gpu_slots.py, tga.device.job_device), on a CPU
with a fake device list: lock files in tmp_path stand in for the node's lock folder.

flock locks belong to an open file, so threads of one process contend exactly as jobs
(processes) do; one test kills a real holder process. No test measures time: waits
are on events and conditions, with generous timeouts only against a hang.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from tga import gpu_slots
from tga.device import job_device
from tga.gpu_slots import GpuSlotError, assigned_environment, claim_gpus

pytestmark = pytest.mark.skipif(gpu_slots.fcntl is None, reason="flock only (no fcntl on Windows)")
HANG = 60  # seconds before a test that should have moved on is declared hung
FAST = {"poll_seconds": 0.005}


def run_claimers(lock_dir: Path, visible: list[str], jobs_per_gpu: int, n_jobs: int) -> tuple[Counter, int, int]:
    """``n_jobs`` threads each claim one slot and hold it until every slot the node
    has is held at once and every other thread is waiting; then all let go. Returns
    (the most jobs seen on each device at once, the most jobs held at once, jobs done)."""
    capacity = len(visible) * jobs_per_gpu
    state = {"held": Counter(), "most": Counter(), "peak": 0, "waiting": 0, "done": 0}
    change = threading.Condition()
    release = threading.Event()

    def job() -> None:
        def waiting(_: str) -> None:
            with change:
                state["waiting"] += 1
                change.notify_all()

        with claim_gpus(1, lock_dir, visible, jobs_per_gpu, message_after=0, on_wait=waiting, **FAST) as (device,):
            with change:
                state["held"][device] += 1
                state["most"][device] = max(state["most"][device], state["held"][device])
                state["peak"] = max(state["peak"], sum(state["held"].values()))
                change.notify_all()
            release.wait(HANG)
            with change:
                state["held"][device] -= 1
        with change:
            state["done"] += 1
            change.notify_all()

    threads = [threading.Thread(target=job, daemon=True) for _ in range(n_jobs)]
    for thread in threads:
        thread.start()
    with change:  # every slot taken, every other job queued behind them
        change.wait_for(lambda: sum(state["held"].values()) >= capacity and state["waiting"] >= n_jobs - capacity
                        or state["peak"] > capacity, HANG)
    release.set()
    for thread in threads:
        thread.join(HANG)
    return state["most"], state["peak"], state["done"]


@pytest.mark.parametrize("jobs_per_gpu", [1, 2])
def test_concurrent_jobs_never_share_a_device_beyond_jobs_per_gpu(tmp_path, jobs_per_gpu):
    visible = ["0", "1", "2"]
    most, peak, done = run_claimers(tmp_path, visible, jobs_per_gpu, n_jobs=10)
    assert done == 10  # the queued jobs ran once slots freed
    assert peak == len(visible) * jobs_per_gpu  # the node was full at once ...
    assert dict(most) == {device: jobs_per_gpu for device in visible}  # ... and never over a device's share


def test_the_concurrency_check_catches_a_claim_that_does_not_lock(tmp_path, monkeypatch):
    """The check above fails when claims are not exclusive (a lock that always succeeds)."""

    def lock_anyway(path: Path):
        return open(path, "a+")

    monkeypatch.setattr(gpu_slots, "_try_lock", lock_anyway)
    most, peak, done = run_claimers(tmp_path, ["0", "1"], 1, n_jobs=6)
    assert peak > 2 and max(most.values()) > 1


def test_jobs_spread_over_idle_devices_before_doubling_up(tmp_path):
    with claim_gpus(1, tmp_path, ["a", "b"], jobs_per_gpu=2) as first, \
            claim_gpus(1, tmp_path, ["a", "b"], jobs_per_gpu=2) as second:
        assert first != second


def test_a_two_gpu_claim_gets_two_devices_and_holds_none_while_it_waits(tmp_path):
    visible = ["0", "1", "2"]
    with claim_gpus(2, tmp_path, visible, jobs_per_gpu=2) as pair:
        assert len(set(pair)) == 2  # two devices, not two slots of one
    with claim_gpus(2, tmp_path, visible) as pair:
        assert len(set(pair)) == 2 and set(pair) <= set(visible)
        waiting = threading.Event()
        got: list[list[str]] = []

        def second_pair() -> None:
            with claim_gpus(2, tmp_path, visible, message_after=0, on_wait=lambda _: waiting.set(), **FAST) as ids:
                got.append(ids)

        thread = threading.Thread(target=second_pair, daemon=True)
        thread.start()
        assert waiting.wait(HANG)  # one device is free: not enough for two
        # the waiting pair claim holds nothing: a one-GPU job takes the free device meanwhile
        (free,) = set(visible) - set(pair)
        single = gpu_slots._try_claim(1, tmp_path, [free], 1)  # does not wait: a bug fails, not hangs
        assert [device for device, _ in single] == [free]
        single[0][1].close()
    thread.join(HANG)
    assert got and len(set(got[0])) == 2


@pytest.mark.workflow  # starts a holder process
def test_a_crashed_holders_slot_frees(tmp_path):
    code = ("import sys, time\nfrom pathlib import Path\nfrom tga.gpu_slots import claim_gpus\n"
            "with claim_gpus(1, Path(sys.argv[1]), ['0']) as ids:\n"
            "    print(ids[0], flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        waiting = threading.Event()
        got: list[list[str]] = []

        def claimer() -> None:
            with claim_gpus(1, tmp_path, ["0"], message_after=0, on_wait=lambda _: waiting.set(), **FAST) as ids:
                got.append(ids)

        thread = threading.Thread(target=claimer, daemon=True)
        thread.start()
        assert waiting.wait(HANG)  # the holder has it
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the flock
        thread.join(HANG)
        assert got == [["0"]]
    finally:
        holder.kill()
        holder.wait()


def test_the_waiting_message_names_devices_holders_and_the_setting(tmp_path):
    messages: list[str] = []
    with claim_gpus(1, tmp_path, ["0", "1"]) as first, claim_gpus(1, tmp_path, ["0", "1"]) as second:
        assert sorted(first + second) == ["0", "1"]
        done = threading.Event()

        def third() -> None:
            with claim_gpus(1, tmp_path, ["0", "1"], message_after=0, on_wait=messages.append, **FAST):
                done.set()

        thread = threading.Thread(target=third, daemon=True)
        thread.start()
        while not messages and thread.is_alive():
            thread.join(0.01)
    thread.join(HANG)
    assert done.is_set() and len(messages) == 1  # said once, then ran when a device freed
    message = messages[0]
    assert "\n" not in message and "2 visible devices (0, 1)" in message
    assert "resources.jobs_per_gpu=1" in message and str(tmp_path) in message
    import os

    assert f"pid {os.getpid()}" in message  # who holds them, from the lock files


def test_the_message_names_only_current_holders(tmp_path):
    with claim_gpus(1, tmp_path, ["0"]):
        pass  # "0"'s lock file still names this process, but nobody holds it
    with claim_gpus(1, tmp_path, ["1"]):
        holders = gpu_slots._holders(tmp_path, ["0", "1"], 1)
    assert holders.startswith("1: pid ") and "0: " not in holders


def test_an_unusable_lock_folder_is_one_error_naming_the_variable(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(GpuSlotError, match=f"cannot keep GPU claims in {not_a_folder}.*{gpu_slots.LOCK_DIR_ENV}"):
        with claim_gpus(1, not_a_folder, ["0"]):
            pass


def test_impossible_claims_are_refused_with_the_key_to_change(tmp_path):
    with pytest.raises(GpuSlotError, match="asks for 3 GPUs but sees 2.*resources.train_gpus"):
        with claim_gpus(3, tmp_path, ["0", "1"]):
            pass
    with pytest.raises(GpuSlotError, match="jobs_per_gpu"):
        with claim_gpus(1, tmp_path, ["0"], jobs_per_gpu=0):
            pass


def test_visible_devices_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_slots.visible_devices() == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, GPU-ab12,7,9")
    assert gpu_slots.visible_devices() == ["5", "GPU-ab12", "7"]  # as many as CUDA counts
    env = assigned_environment(["5", "7"], {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "5,7", gpu_slots.ASSIGNED_ENV: "1"}


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """A process that sees four GPUs, with the node's lock folder in tmp_path."""
    monkeypatch.setattr("tga.device.resolve_device", lambda name: torch.device("cpu" if name == "cpu" else name
                                                                                 if name != "auto" else "cuda"))
    monkeypatch.setattr(gpu_slots, "visible_devices", lambda: ["0", "1", "2", "3"])
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv(gpu_slots.LOCK_DIR_ENV, str(tmp_path))
    for name in ("WORLD_SIZE", "LOCAL_RANK", gpu_slots.ASSIGNED_ENV, gpu_slots.JOBS_PER_GPU_ENV):
        monkeypatch.delenv(name, raising=False)
    gpu_slots.release_process_gpu()
    yield chosen
    gpu_slots.release_process_gpu()


def test_a_job_with_device_auto_gets_a_free_device_and_keeps_it(fake_gpus, tmp_path):
    with claim_gpus(2, tmp_path, ["0", "1", "2", "3"]) as others:  # two jobs already run
        device = job_device("auto")
        assert device.type == "cuda" and str(device.index) not in others
        assert job_device("cuda") == device  # the job's later models load on the same device
    assert fake_gpus == [device.index, device.index]
    assert gpu_slots._try_claim(1, tmp_path, [str(device.index)], 1) == []  # held for the job's life
    gpu_slots.release_process_gpu()
    assert gpu_slots._try_claim(1, tmp_path, [str(device.index)], 1) != []


def test_job_device_leaves_explicit_cpu_ranks_and_launched_jobs_alone(fake_gpus, monkeypatch, tmp_path):
    assert job_device("cuda:0") == torch.device("cuda:0")  # as the config says, no claim
    assert job_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert job_device("auto") == torch.device("cuda", 1)  # a torchrun rank: its launcher's devices
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv(gpu_slots.ASSIGNED_ENV, "1")
    assert job_device("auto") == torch.device("cuda")
    assert not list(tmp_path.glob("*.lock"))  # nobody claimed


def test_jobs_per_gpu_reaches_jobs_through_the_environment(fake_gpus, monkeypatch, tmp_path):
    monkeypatch.setenv(gpu_slots.JOBS_PER_GPU_ENV, "2")
    got: list[torch.device] = []
    with claim_gpus(4, tmp_path, ["0", "1", "2", "3"]):  # every device runs one job
        thread = threading.Thread(target=lambda: got.append(job_device("auto")), daemon=True)
        thread.start()
        thread.join(HANG)  # a second slot is free on each: no wait (a wrong share would hang here)
        assert got and got[0].type == "cuda"
    monkeypatch.setenv(gpu_slots.JOBS_PER_GPU_ENV, "0")
    with pytest.raises(GpuSlotError, match="resources.jobs_per_gpu"):
        gpu_slots.jobs_per_gpu_setting()


def test_a_multi_gpu_launcher_claims_its_devices_for_its_ranks(fake_gpus, tmp_path):
    """torchrun's ranks of a 2-GPU job on a 4-GPU node see two claimed devices, held
    while they run; a CPU job, an explicit device and an assigned launcher claim none."""
    with claim_gpus(1, tmp_path, ["0", "1", "2", "3"]) as (busy,):
        with gpu_slots.launcher_environment("auto", 2) as env:
            mine = env["CUDA_VISIBLE_DEVICES"].split(",")
            assert len(set(mine)) == 2 and busy not in mine and env[gpu_slots.ASSIGNED_ENV] == "1"
            assert gpu_slots._try_claim(1, tmp_path, mine, 1) == []  # held while the ranks run
    assert len(gpu_slots._try_claim(2, tmp_path, mine, 1)) == 2  # released after
    for setting in ("cpu", "cuda:1"):
        with gpu_slots.launcher_environment(setting, 2) as env:
            assert env is None


def test_launch_training_gives_torchrun_the_claimed_environment(fake_gpus, tmp_path, monkeypatch):
    """The launcher passes the claimed CUDA_VISIBLE_DEVICES to torchrun (here a stand-in
    that records its environment and fails, so no training runs)."""
    from tga import distributed

    seen = {}

    class Recorder:
        def __init__(self, command, env=None, **kwargs):
            seen["env"] = env
            self.stdout = iter(())

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait(self):
            return 1

    monkeypatch.setattr(distributed.subprocess, "Popen", Recorder)
    job = {"settings": {"training": {"device": "auto"}}, "out_dir": tmp_path / "run", "threads": 2}
    with pytest.raises(distributed.DistributedError):
        distributed.launch_training(job, gpus_per_node=2)
    assert seen["env"] is not None and len(seen["env"]["CUDA_VISIBLE_DEVICES"].split(",")) == 2


@pytest.mark.workflow
def test_analysis_jobs_on_cuda_declare_a_gpu_for_snakemake_to_count(tmp_path):
    """evaluate, geometry and evolution_geometry declare resources gpu=1 when their device
    is CUDA, so `--resources gpu=N` queues them with training; 0 with train_gpus: 0 (no
    GPU accounting) and on a CPU. Dry runs (a CPU machine can plan CUDA jobs)."""
    from workflow_runs import make_workdir, snakemake, tiny_config

    def gpus(config: dict) -> dict[str, str]:
        work = make_workdir(tmp_path / str(len(list(tmp_path.iterdir()))), config)
        out = snakemake(work, "--dry-run", "outputs/eval/llama-preln/seed0/perplexity.json",
                        "outputs/geometry/llama-preln/seed0/metrics.csv",
                        "outputs/evolution/llama-preln/seed0/metrics.csv").stdout
        blocks = {b.split(":", 1)[0].split()[-1]: b for b in out.split("\nrule ")[1:] + out.split("\nlocalrule ")[1:]}
        found = {rule: re.search(r"resources: .*", blocks[rule]).group(0)
                 for rule in ("evaluate", "geometry", "evolution_geometry")}
        return {rule: ("gpu=1" in line) for rule, line in found.items()}

    config = tiny_config()
    assert not any(gpus(config).values())  # the tiny config runs on the CPU
    config["evaluation"]["device"] = config["geometry"]["device"] = "cuda"
    config.setdefault("resources", {})["train_gpus"] = 1
    assert all(gpus(config).values())
    config["resources"]["train_gpus"] = 0
    assert not any(gpus(config).values())
