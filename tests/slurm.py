"""A real one-node SLURM cluster for tests (``apt-get install slurmctld slurmd munge slurm-client``): ``munged``,
``slurmctld`` and ``slurmd`` run as root in the foreground, children of the test process (SIGTERM should it die),
with their config, munge key and socket, state, spool, pid and log files in one folder; :meth:`Cluster.stop` ends
them, and anything a job left behind, by process id. Client commands find it through ``SLURM_CONF``."""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PROGRAMS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
# KillWait: seconds from SIGTERM to SIGKILL (default 30). MinJobAge: seconds a finished job stays visible (default
# 300); `sbatch --wait` polls every 2 s only below 6. config_overrides: ``cpus`` CPUs (tasks) even on a smaller machine.
# batch_sched_delay: a batch job (sbatch, or requeued) starts at once instead of up to 3 s later.
SETTINGS = """ClusterName=pytest SlurmctldHost=localhost SlurmctldPort={port1} SlurmdPort={port2} SlurmUser=root
AuthType=auth/munge CredType=cred/munge AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state SlurmdSpoolDir={root}/spool SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid SlurmctldLogFile={root}/slurmctld.log SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc TaskPlugin=task/none SelectType=select/cons_tres SelectTypeParameters=CR_CPU
MailProg=/bin/true ReturnToService=2 JobRequeue=1 KillWait=1 MinJobAge=4 SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0"""
NODE = """NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str | None:
    """Why no cluster can start here, or None."""
    absent = [name for name in PROGRAMS if shutil.which(name, path=SBIN) is None]
    if absent:
        return f"SLURM not installed ({', '.join(absent)}): apt-get install -y slurmctld slurmd munge slurm-client"
    return None if os.geteuid() == 0 else "the SLURM test cluster runs its daemons as root: run the tests as root"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(variable: str) -> list[int]:
    """The processes whose environment holds ``variable`` (``NAME=value``), wherever they were reparented."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with suppress(OSError):
            found += [int(environ.parent.name)] if variable.encode() in environ.read_bytes().split(b"\0") else []
    return found


def wait_until(ready, alive=lambda: True, why=lambda: "waited in vain", seconds: float = 120, every: float = 0.1):
    """``ready()``'s first true value, asked every ``every`` seconds; fails with ``why()`` should ``alive()`` turn
    false or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while not (found := ready()):
        assert alive() and time.monotonic() < deadline, why()
        time.sleep(every)
    return found


def kill(pids: list[int]) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Cluster:
    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root, self.conf, self.daemons = root, root / "slurm.conf", {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True)
        (root / "munge.key").write_bytes(os.urandom(1024))
        (root / "munge.key").chmod(0o600)
        ports = {"port1": free_port(), "port2": free_port()}
        self.conf.write_text(
            "\n".join([*SETTINGS.split(), NODE]).format(root=root, cpus=max(cpus, os.cpu_count()), **ports)
        )
        try:
            files = {"socket": "socket", "key-file": "key", "pid-file": "pid", "log-file": "log", "seed-file": "seed"}
            self.daemon("munged", "-F", "-f", *[f"--{option}={root}/munge.{ext}" for option, ext in files.items()])
            self.wait(lambda: (root / "munge.socket").exists(), "munged's socket")
            self.daemon("slurmctld", "-D", "-f", str(self.conf))
            self.daemon("slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
            self.wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", "an idle node")
        except BaseException:
            self.stop()
            raise

    def daemon(self, name: str, *args: str) -> None:
        with open(self.root / f"{name}.out", "wb") as out:
            self.daemons[name] = subprocess.Popen(
                [shutil.which(name, path=SBIN), *args],
                env=self.env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM),
            )

    def dead(self) -> list[str]:
        return [name for name, p in self.daemons.items() if p.poll() is not None]

    def wait(self, ready, what: str, timeout: float = 60) -> None:
        why = f"SLURM test cluster: no {what}"
        wait_until(ready, lambda: not self.dead(), lambda: f"{why} ({self.dead()} exited)\n{self.logs()}", timeout)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 or not check, f"{' '.join(command)}: {done.stderr}\n{self.logs()}"
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``: JobState, Restarts, ExitCode, ..."""
        fields = self.run("scontrol", "-o", "show", "job", job_id).stdout.split()
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        """Cancel the jobs left and let them end, then stop the daemons and what is left, by process id."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--partition=debug", check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        for process in reversed(self.daemons.values()):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        kill(processes_with(f"SLURM_CONF={self.conf}"))  # job steps left behind (slurmd's children are reparented)
