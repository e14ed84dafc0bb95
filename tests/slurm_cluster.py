"""A throw-away one-node SLURM cluster on loopback, for tests.

``one_node_cluster(folder)`` starts munged, slurmctld and slurmd on this machine, each
in the foreground under our own process (so each is stopped by its pid, whatever
happens), with every file they need in ``folder``: munge key and socket, slurm.conf,
gres.conf, state and spool directories, logs. Nothing is written outside it.

The node offers ``gpus`` fake GPUs (gres ``gpu`` backed by /dev/null): enough for
SLURM to schedule and account ``--gpus`` requests on a machine without one; nothing
can compute on them. A slurmd prolog writes ``<jobid> gpus=<SLURM_JOB_GPUS>`` for
every job to ``prolog.txt``, so a test can see which jobs SLURM gave a GPU; the
jobcomp/filetxt plugin writes one line per finished job to ``jobcomp.txt``.

Client commands (sbatch, squeue, ...) find the cluster through ``SLURM_CONF``:
use ``cluster.env``. Its PATH starts with a folder holding an ``srun`` wrapper that
sets SLURM_CONF again: snakemake-executor-plugin-slurm-jobstep removes every
``SLURM_*`` variable, SLURM_CONF included, before it calls srun inside a job, so on
a cluster whose slurm.conf is not at /etc/slurm/slurm.conf (or served configless)
that srun could not find its controller.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
DEBIAN_PACKAGES = "slurm-wlm munge"
MEMORY_MARGIN_MB = 1024  # left to the OS and the test itself


def missing_programs() -> list[str]:
    """The SLURM and munge programs this module needs that are not installed."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=search) is None]


def _program(name: str) -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian: apt-get install {DEBIAN_PACKAGES})")
    return path


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


@dataclass
class SlurmCluster:
    root: Path
    node: str
    partition: str
    cpus: int
    memory_mb: int
    gpus: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def jobcomp(self) -> Path:
        return self.root / "jobcomp.txt"

    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def finished_jobs(self) -> dict[str, dict[str, str]]:
        """jobcomp/filetxt records by job id: {'JobState': 'COMPLETED', 'Partition': ..., ...}."""
        if not self.jobcomp.exists():
            return {}
        records = {}
        for line in self.jobcomp.read_text().splitlines():
            record = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in record:
                records[record["JobId"]] = record
        return records

    def gpus_by_job(self) -> dict[str, str]:
        """GPU indices SLURM gave each started job ('' = none), from the slurmd prolog."""
        path = self.root / "prolog.txt"
        if not path.exists():
            return {}
        return dict(re.findall(r"^(\d+) gpus=(\S*)", path.read_text(), flags=re.M))

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted(self.root.glob("*.log")) + sorted((self.root / "munge").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(parts)


def _write_config(root: Path, node: str, cpus: int, memory_mb: int, gpus: int, partition: str) -> None:
    ctld_port, slurmd_port = _free_port(), _free_port()
    gres = f"Gres=gpu:{gpus} " if gpus else ""
    (root / "slurm.conf").write_text(f"""\
# One-node test cluster on loopback; written by tests/slurm_cluster.py.
ClusterName=tgatest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
Prolog={root}/prolog.sh
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
SchedulerParameters=sched_interval=2
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} {gres}State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File=/dev/null Count={gpus}\n" if gpus else "")
    prolog = root / "prolog.sh"
    prolog.write_text(f'#!/bin/sh\necho "$SLURM_JOB_ID gpus=${{SLURM_JOB_GPUS:-}}" >> {root}/prolog.txt\n')
    prolog.chmod(0o755)


def _start(cluster: SlurmCluster, name: str, *command: str) -> None:
    out = open(cluster.root / f"{name}.stdout.log", "w")
    cluster.processes[name] = subprocess.Popen(
        command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=cluster.env,
        start_new_session=True,  # a Ctrl-C of the test run is for pytest, not for the daemons
    )
    out.close()


def _wait(cluster: SlurmCluster, what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                   + cluster.log_tails())
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"no {what} after {timeout:.0f}s\n" + cluster.log_tails())


def _node_idle(cluster: SlurmCluster) -> bool:
    proc = cluster.run("sinfo", "--noheader", "--Node", "--format=%t", "--nodes", cluster.node, check=False)
    return proc.returncode == 0 and proc.stdout.strip() == "idle"


def _stop(cluster: SlurmCluster) -> None:
    """Cancel what is left of the jobs, then stop the daemons, newest first, by pid."""
    if "slurmctld" in cluster.processes and cluster.processes["slurmctld"].poll() is None:
        try:
            jobs = cluster.run("squeue", "--noheader", "--format=%i", check=False, timeout=10).stdout.split()
            if jobs:
                cluster.run("scancel", *jobs, check=False, timeout=10)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and cluster.run(
                        "squeue", "--noheader", "--states=PD,R,CG", "--format=%i", check=False, timeout=10).stdout.strip():
                    time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass
    for name in reversed(list(cluster.processes)):
        proc = cluster.processes[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@contextmanager
def one_node_cluster(root: Path, *, gpus: int = 1, partition: str = "debug",
                     ready_timeout: float = 60) -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd for this machine, all files under ``root``; stopped on exit."""
    if os.geteuid() != 0:
        raise PermissionError("slurmd must run as root to start jobs")
    root = Path(root).resolve()
    for sub in ("munge", "state", "spool", "bin"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = _total_memory_mb() - MEMORY_MARGIN_MB
    _write_config(root, node, cpus, memory_mb, gpus, partition)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    srun = root / "bin" / "srun"
    srun.write_text(f'#!/bin/sh\nSLURM_CONF={root}/slurm.conf exec {_program("srun")} "$@"\n')
    srun.chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"),
           "PATH": os.pathsep.join([str(root / "bin"), os.environ.get("PATH", ""), "/usr/sbin"])}
    for name in list(env):  # an outer SLURM job's or user's client defaults would leak in
        if name.startswith(("SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_")) or name in ("SLURM_JOB_ID", "SLURM_JOBID"):
            env.pop(name)
    cluster = SlurmCluster(root, node, partition, cpus, memory_mb, gpus, env)
    with ExitStack() as stack:
        stack.callback(_stop, cluster)
        munge = root / "munge"
        _start(cluster, "munged", _program("munged"), "--foreground", "--force",
               f"--key-file={key}", f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
               f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed")
        _wait(cluster, "munge socket", (munge / "munge.socket").exists, 20)
        _start(cluster, "slurmctld", _program("slurmctld"), "-D", "-f", str(cluster.conf))
        _start(cluster, "slurmd", _program("slurmd"), "-D", "-f", str(cluster.conf), "-N", node)
        _wait(cluster, f"idle node {node}", lambda: _node_idle(cluster), ready_timeout)
        yield cluster
