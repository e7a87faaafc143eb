"""How many cores this process can keep busy, which sizes moekit's thread pools: the cores
it may run on (its CPU affinity: what ``taskset``, Slurm and ``numactl`` restrict), fewer
where a cgroup CPU quota gives it less time than that, as a container's CPU limit does
(Kubernetes' ``limits.cpu``, ``docker run --cpus``). A process that starts a thread per
affinity core under a quota of a few cores is throttled and holds memory for threads that
wait. Where there is no ``/proc/self/cgroup`` (not Linux), no quota is found. And how many
processes of a job share those cores (``sharing_processes``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

PROC_CGROUP = Path("/proc/self/cgroup")
"""The cgroups this process belongs to."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where the cgroup file systems are mounted."""
V1_CPU_MOUNTS = ("cpu,cpuacct", "cpu")
"""Where a cgroup v1 cpu controller is mounted under CGROUP_ROOT besides the folder named
as ``/proc/self/cgroup`` lists its controllers (which may read ``cpuacct,cpu`` where the
folder is ``cpu,cpuacct``; systemd and Docker link ``cpu`` to it)."""
_V1_QUOTA = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
"""A cgroup v1 cpu controller's quota and period files (a quota of -1: none)."""
LOCAL_PROCESS_COUNTS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
"""Environment variables that give how many processes of a job run on this machine
(torchrun's, Open MPI's), which share its cores when they load at once."""


def local_processes(environ: Mapping[str, str] = os.environ) -> int:
    """How many processes of this job run on this machine (``LOCAL_PROCESS_COUNTS``, the
    first that holds a positive number), 1 when none says."""
    for name in LOCAL_PROCESS_COUNTS:
        try:
            count = int(environ.get(name, ""))
        except ValueError:
            continue
        if count > 0:
            return count
    return 1


def sharing_processes() -> int:
    """How many processes share the cores this one may run on: the job's processes on this
    machine (``local_processes``), unless this one is bound to some of its cores
    (``bound_to_cores``), as a launcher that binds each process to cores of its own
    (``srun --cpu-bind=cores``) does: its cores are then its share. (Processes bound to
    cores they share, such as a socket each, start more threads than their share.)"""
    return 1 if bound_to_cores() else local_processes()


def affinity() -> int:
    """How many cores this process may run on (all of them where the platform cannot say)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bound_to_cores() -> bool:
    """True when this process may run on fewer cores than the machine has: a launcher or
    container bound it to some (``taskset``, ``srun --cpu-bind``, ``docker --cpuset-cpus``)."""
    return affinity() < (os.cpu_count() or 1)


def usable_cpus(proc_cgroup: Path | None = None, root: Path | None = None) -> int:
    """The cores this process may run on, at most its cgroups' CPU quota (rounded up): the
    tightest quota of its cgroup and every cgroup above it, v2 (``cpu.max``) or v1 (the
    cpu controller's ``cpu.cfs_quota_us``), as ``proc_cgroup`` (PROC_CGROUP) lists them
    under ``root`` (CGROUP_ROOT). A cgroup whose files cannot be read or parsed, and a
    ``proc_cgroup`` that cannot, set no limit."""
    cpus = affinity()
    quota = min(_quotas(proc_cgroup or PROC_CGROUP, root or CGROUP_ROOT), default=math.inf)
    return max(1, min(cpus, math.ceil(quota))) if quota < math.inf else cpus


def _quotas(proc_cgroup: Path, root: Path) -> list[float]:
    """The CPU quota, in cores, of each cgroup of this process and above it that has one."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except (OSError, ValueError):  # ValueError: a cgroup name that is not UTF-8
        return []
    quotas = []
    for line in lines:  # "hierarchy-id:controllers:path", controllers empty for v2
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[2].startswith("/") or ".." in fields[2].split("/"):
            continue  # ".." leads out of the mount: a cgroup outside this namespace
        _, controllers, path = fields
        if controllers == "":
            quotas += [_v2_quota(folder) for folder in _up(root, path)]
        elif "cpu" in controllers.split(","):
            mounts = dict.fromkeys((controllers, *V1_CPU_MOUNTS))
            quotas += [_v1_quota(folder)
                       for mount in mounts for folder in _up(root / mount, path)]
    return [quota for quota in quotas if quota is not None]


def _up(mount: Path, path: str) -> list[Path]:
    """The folders of cgroup ``path`` and of every cgroup above it, under ``mount``."""
    cgroup = PurePosixPath(path)
    return [mount / folder.relative_to("/") for folder in (cgroup, *cgroup.parents)]


def _v2_quota(folder: Path) -> float | None:
    """Cores that ``cpu.max`` (``"$MAX $PERIOD"``) allows in ``folder``; None where none."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else _cores(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    """Cores that a cgroup v1 cpu controller's quota allows in ``folder``; None where none."""
    try:
        quota, period = (int((folder / name).read_text()) for name in _V1_QUOTA)
        return None if quota < 0 else _cores(quota, period)
    except (OSError, ValueError):
        return None


def _cores(quota: int, period: int) -> float | None:
    """``quota`` microseconds of CPU time every ``period``, in cores; None if meaningless."""
    if quota <= 0 or period <= 0:
        return None
    try:
        return quota / period
    except OverflowError:  # more cores than a float holds: no limit
        return None
