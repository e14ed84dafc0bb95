"""One GPU per job on a node with several: devices claimed through lock files.

Snakemake's ``--resources gpu=8`` only counts jobs; it does not say which device a job
gets, so without this every job on an 8-GPU node trains on ``cuda:0``. Here a job
claims a *slot* of a device by taking an exclusive ``fcntl.flock`` on a file
``<device>.slot<k>.lock`` in a lock folder that all of the node's jobs share; a device
has ``jobs_per_gpu`` slots (``resources.jobs_per_gpu``, default 1: no two jobs on one
device). The operating system drops a flock when its holder exits, killed or crashed
included, so a slot can never stay taken by a job that is gone, and nothing needs
cleaning up.

The lock folder is node-local by default (the temporary folder, one per user), since a
GPU belongs to a node: jobs of two workflows on one node must not share a device
either, and jobs on two nodes that share a file system must not block each other (flock
on NFS is not reliable anyway). ``TGA_GPU_SLOTS_DIR`` names another folder.

Who claims: a job whose device setting is ``auto`` or ``cuda`` and that sees more than
one GPU (:func:`tga.device.job_device`). An explicit ``cuda:N`` is used as given, a
CPU job claims nothing, a job that sees one GPU (a SLURM allocation of one, or a
launcher's ``CUDA_VISIBLE_DEVICES``) has nothing to choose. A launcher that starts a
job in a subprocess (``torchrun`` for a multi-GPU training job) claims with
:func:`claim_gpus` and passes :func:`assigned_environment` to the child, whose ranks
then take ``cuda:LOCAL_RANK`` of what they see and claim nothing themselves.

Only the standard library is imported here, so the launcher stays light.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no flock; jobs are not kept apart there
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ASSIGNED_ENV",
    "JOBS_PER_GPU_ENV",
    "LOCK_DIR_ENV",
    "GpuSlotError",
    "assigned_environment",
    "claim_gpus",
    "claim_process_gpu",
    "default_lock_dir",
    "jobs_per_gpu_setting",
    "launcher_environment",
    "release_process_gpu",
    "visible_devices",
]

LOCK_DIR_ENV = "TGA_GPU_SLOTS_DIR"
JOBS_PER_GPU_ENV = "TGA_JOBS_PER_GPU"
# Set by a launcher in its child's environment: the devices the child sees were
# claimed for it, so it must not claim again (it would wait on its own launcher).
ASSIGNED_ENV = "TGA_GPUS_ASSIGNED"
# Seconds between tries while every slot is taken, and before the waiting message.
POLL_SECONDS = 1.0
MESSAGE_AFTER_SECONDS = 30.0


class GpuSlotError(RuntimeError):
    """A claim that can never be met (more GPUs asked for than the job sees)."""


def default_lock_dir() -> Path:
    """``TGA_GPU_SLOTS_DIR``, else ``<tmp>/tga-gpu-slots-<uid>`` on this node."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"tga-gpu-slots-{uid}"


def jobs_per_gpu_setting() -> int:
    """``resources.jobs_per_gpu`` as the workflow passes it to its jobs (the
    environment variable ``TGA_JOBS_PER_GPU``); 1 when unset."""
    text = os.environ.get(JOBS_PER_GPU_ENV, "1").strip() or "1"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise GpuSlotError(f"{JOBS_PER_GPU_ENV}={text!r} is not a whole number >= 1: it carries "
                           "resources.jobs_per_gpu (jobs allowed on one GPU); set that key to 1 or more")
    return value


def visible_devices() -> list[str]:
    """The GPUs this process may use, as the ids its parent would pass on in
    ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs): that variable's entries when it is
    set (as many as CUDA counts), else ``0 .. device_count-1``. Position ``i`` in
    the list is ``cuda:i`` in this process."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    entries = [entry.strip() for entry in listed.split(",") if entry.strip()]
    return entries[:count]


def _slot_path(lock_dir: Path, device: str, slot: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", device)
    return lock_dir / f"gpu-{safe}.slot{slot}.lock"


def _try_lock(path: Path, record: bool = True) -> IO[str] | None:
    """The open, exclusively locked file, or None when another holder has it. With
    ``record`` the file then says who holds it, for the jobs that queue behind."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    if not record:
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _try_claim(n: int, lock_dir: Path, visible: Sequence[str], jobs_per_gpu: int) -> list[tuple[str, IO[str]]]:
    """``n`` slots on ``n`` distinct devices, or none at all (a partial claim is let go
    at once: two jobs that each held one of two devices would wait for each other).
    Slot 0 of every device is tried before slot 1 of any, so jobs spread over idle
    devices before they double up on one."""
    taken: list[tuple[str, IO[str]]] = []
    for slot in range(jobs_per_gpu):
        for device in visible:
            if any(device == held for held, _ in taken):
                continue
            handle = _try_lock(_slot_path(lock_dir, device, slot))
            if handle is not None:
                taken.append((device, handle))
                if len(taken) == n:
                    return taken
    for _, handle in taken:
        handle.close()
    return []


def _holders(lock_dir: Path, visible: Sequence[str], jobs_per_gpu: int) -> str:
    """'0: pid 12 since ...; 1: ...' from the lock files of the slots held now (a free
    slot's file still names its last holder, so each is tried first; best effort)."""
    lines = []
    for device in visible:
        for slot in range(jobs_per_gpu):
            path = _slot_path(lock_dir, device, slot)
            try:
                text = path.read_text().strip()
                free = _try_lock(path, record=False)
            except OSError:
                continue
            if free is not None:
                free.close()
            elif text:
                lines.append(f"{device}: {text}")
    return "; ".join(lines) or "unknown holders"


def waiting_message(n: int, lock_dir: Path, visible: Sequence[str], jobs_per_gpu: int, waited: float) -> str:
    """What a job says while it waits: which devices, held by whom, and what to change."""
    busy = (f"each of the {len(visible)} visible devices ({', '.join(visible)}) already runs" if n == 1 else
            f"fewer than {n} of the {len(visible)} visible devices ({', '.join(visible)}) run less than")
    return (f"tga: waiting {waited:.0f} s for {n} free GPU{'s' if n > 1 else ''}: {busy} "
            f"resources.jobs_per_gpu={jobs_per_gpu} job{'s' if jobs_per_gpu > 1 else ''} "
            f"({_holders(lock_dir, visible, jobs_per_gpu)}; locks in {lock_dir}). This job starts when "
            f"{'one ends' if n == 1 else 'enough end'}. To run more jobs at once, raise resources.jobs_per_gpu; "
            "to queue them in Snakemake instead, lower snakemake --resources gpu=N")


@contextmanager
def claim_gpus(
    n: int,
    lock_dir: Path | None = None,
    visible: Sequence[str] | None = None,
    jobs_per_gpu: int = 1,
    poll_seconds: float = POLL_SECONDS,
    message_after: float = MESSAGE_AFTER_SECONDS,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[list[str]]:
    """Claim one slot on each of ``n`` distinct devices among ``visible`` (default:
    :func:`visible_devices`), waiting while fewer than ``n`` have a free slot; yield
    their ids (entries for ``CUDA_VISIBLE_DEVICES``) and let them go on exit. After
    ``message_after`` seconds of waiting, ``on_wait`` (default: print to stderr) gets
    one :func:`waiting_message`. ``lock_dir`` defaults to :func:`default_lock_dir`."""
    if n < 1:
        raise GpuSlotError(f"a GPU claim needs n >= 1, got {n}")
    if jobs_per_gpu < 1:
        raise GpuSlotError(f"resources.jobs_per_gpu must be 1 or more, got {jobs_per_gpu}")
    devices = list(visible_devices() if visible is None else visible)
    if n > len(devices):
        raise GpuSlotError(f"this job asks for {n} GPUs but sees {len(devices)} ({', '.join(devices) or 'none'}; "
                           "CUDA_VISIBLE_DEVICES): lower resources.train_gpus or run it where more are visible")
    if fcntl is None:
        yield devices[:n]
        return
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _slot_path(folder, devices[0], 0).touch()
    except OSError as exc:
        raise GpuSlotError(f"cannot keep GPU claims in {folder} ({exc.strerror or exc}): set {LOCK_DIR_ENV} to a "
                           "writable folder on this node that all of its jobs share") from None
    say = on_wait or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    said = False
    while True:
        taken = _try_claim(n, folder, devices, jobs_per_gpu)
        if taken:
            break
        waited = time.monotonic() - started
        if not said and waited >= message_after:
            say(waiting_message(n, folder, devices, jobs_per_gpu, waited))
            said = True
        time.sleep(poll_seconds)
    try:
        yield [device for device, _ in taken]
    finally:
        for _, handle in taken:
            handle.close()  # closing the last descriptor drops the flock


def assigned_environment(devices: Sequence[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a subprocess that runs on the claimed ``devices``: it sees
    exactly them (``CUDA_VISIBLE_DEVICES``) and knows not to claim again."""
    env = dict(os.environ if environ is None else environ)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    env[ASSIGNED_ENV] = "1"
    return env


@contextmanager
def launcher_environment(setting: str, n: int) -> Iterator[dict[str, str] | None]:
    """The environment for the ``n`` processes a launcher starts on this node (torchrun's
    ranks of a multi-GPU training job), held while the block runs: with a device setting
    of ``auto`` or ``cuda`` and several visible GPUs, ``n`` claimed devices
    (:func:`claim_gpus`, ``resources.jobs_per_gpu`` per device) as
    :func:`assigned_environment`; otherwise None (the children inherit this process's
    environment: a CPU job, an explicit ``cuda:N``, a node where the job sees only its
    own GPUs, or devices a launcher above already assigned)."""
    if setting not in ("auto", "cuda") or os.environ.get(ASSIGNED_ENV) == "1":
        yield None
        return
    visible = visible_devices()
    if len(visible) <= 1:
        yield None
        return
    with claim_gpus(n, visible=visible, jobs_per_gpu=jobs_per_gpu_setting()) as devices:
        yield assigned_environment(devices)


# One claim per process, held until it exits: a job's process is the job.
_process_claim: dict[str, object] = {}


def claim_process_gpu(
    visible: Sequence[str],
    lock_dir: Path | None = None,
    jobs_per_gpu: int | None = None,
    **options: object,
) -> int:
    """Claim one device for this process for the rest of its life (a workflow job's
    process is the job) and return its index in ``visible`` (``cuda:<index>`` here).
    Later calls return the same index, so a job that loads several models stays on
    one device. ``jobs_per_gpu`` defaults to :func:`jobs_per_gpu_setting`."""
    if "index" in _process_claim:
        return int(_process_claim["index"])  # type: ignore[call-overload]
    stack = ExitStack()
    per_gpu = jobs_per_gpu_setting() if jobs_per_gpu is None else jobs_per_gpu
    (device,) = stack.enter_context(claim_gpus(1, lock_dir, visible, per_gpu, **options))  # type: ignore[arg-type]
    _process_claim.update(index=list(visible).index(device), device=device, stack=stack)
    return int(_process_claim["index"])  # type: ignore[call-overload]


def release_process_gpu() -> None:
    """Let this process's claim go (it also goes when the process exits)."""
    stack = _process_claim.pop("stack", None)
    _process_claim.clear()
    if isinstance(stack, ExitStack):
        stack.close()


atexit.register(release_process_gpu)
