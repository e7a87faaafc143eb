"""The cores moekit's thread pools are sized by: the CPU affinity, capped by cgroup quotas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit import cores
from moekit.cores import bound_to_cores, usable_cpus


@pytest.fixture
def cores_64(monkeypatch):
    """A process that may run on 64 cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))


def cgroups(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup holding ``proc`` and a cgroup mount holding ``files``."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc").write_text(proc)
    return tmp_path / "proc", root


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "400000 100000\n"}, 4),
    ({"cpu.max": "250000 100000\n"}, 3),  # 2.5 cores: rounded up
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, 64),
    ({"cpu.max": "800000 100000\n", "kubepods/pod1/cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "200000 100000\n", "kubepods/pod1/cpu.max": "max 100000\n"}, 2),
    ({"kubepods/cpu.max": "600000 100000\n"}, 6),
    ({"cpu.max": "garbage\n"}, 64),
    ({"cpu.max": "0 100000\n"}, 64),
    ({}, 64)])
def test_a_cgroup_v2_quota_of_the_process_or_above_it_caps_the_cores(files, cpus, cores_64,
                                                                      tmp_path):
    assert usable_cpus(*cgroups(tmp_path, "0::/kubepods/pod1\n", files)) == cpus


@pytest.mark.parametrize("files, cpus", [
    ({"cpu,cpuacct/docker/c1/cpu.cfs_quota_us": "300000\n",
      "cpu,cpuacct/docker/c1/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "150000\n",  # a container's own cgroup, at the root
      "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2),
    ({"cpu,cpuacct/docker/c1/cpu.cfs_quota_us": "-1\n",
      "cpu,cpuacct/docker/c1/cpu.cfs_period_us": "100000\n"}, 64),
    ({"cpu,cpuacct/docker/c1/cpu.cfs_quota_us": "300000\n"}, 64)])  # no period: no quota
@pytest.mark.parametrize("listed", ["cpu,cpuacct", "cpuacct,cpu"])  # as CentOS 7 lists it
def test_a_cgroup_v1_cpu_quota_caps_the_cores(files, cpus, listed, cores_64, tmp_path):
    proc = f"12:memory:/docker/c1\n4:{listed}:/docker/c1\n0::/\n"
    assert usable_cpus(*cgroups(tmp_path, proc, files)) == cpus


def test_a_cgroup_v1_cpu_controller_mounted_alone_caps_the_cores(cores_64, tmp_path):
    files = {"cpu/cpu.cfs_quota_us": "500000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert usable_cpus(*cgroups(tmp_path, "3:cpu:/\n", files)) == 5


def test_a_quota_above_the_affinity_leaves_the_affinity(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert usable_cpus(*cgroups(tmp_path, "0::/\n", {"cpu.max": "800000 100000\n"})) == 3


def test_without_cgroup_files_the_cores_are_the_affinity(cores_64, tmp_path):
    assert usable_cpus(tmp_path / "missing", tmp_path) == 64
    proc, root = cgroups(tmp_path, "not a cgroup line\n2:cpu:relative\n", {})
    assert usable_cpus(proc, root) == 64


@pytest.mark.parametrize("proc, files", [
    (b"0::/caf\xe9\n", {"cpu.max": "100000 100000\n"}),  # a cgroup name not in UTF-8
    (b"0::/\n", {"cpu.max": "9" * 400 + " 1\n"}),  # more cores than a float holds
    (b"0::/../outside\n", {"../outside/cpu.max": "100000 100000\n"})])  # not in the mount
def test_cgroup_files_that_make_no_sense_set_no_limit(proc, files, cores_64, tmp_path):
    path, root = cgroups(tmp_path, "", files)
    path.write_bytes(proc)
    assert usable_cpus(path, root) == 64


def test_the_affinity_is_the_machines_cores_where_the_platform_has_none(monkeypatch,
                                                                          tmp_path):
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert usable_cpus(tmp_path / "missing", tmp_path) == 12
    assert not bound_to_cores()


@pytest.mark.parametrize("affinity, bound", [(64, False), (16, True)])
def test_a_process_allowed_fewer_cores_than_the_machine_has_is_bound(affinity, bound,
                                                                     monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    assert bound_to_cores() is bound


@pytest.mark.parametrize("environ, processes", [
    ({}, 1), ({"LOCAL_WORLD_SIZE": "4"}, 4), ({"OMPI_COMM_WORLD_LOCAL_SIZE": " 2 "}, 2),
    ({"LOCAL_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 8),
    ({"LOCAL_WORLD_SIZE": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 3),
    ({"LOCAL_WORLD_SIZE": "-2"}, 1), ({"LOCAL_WORLD_SIZE": "two"}, 1),
    ({"LOCAL_WORLD_SIZE": "\u00b2"}, 1), ({"LOCAL_WORLD_SIZE": ""}, 1)])
def test_the_processes_sharing_the_machine_are_read_from_the_launchers_variables(
        environ, processes):
    assert cores.local_processes(environ) == processes


def test_the_thread_pools_of_a_process_under_a_quota_are_sized_by_it(tmp_path):
    # As in a container limited to 3 cores on a 64-core machine.
    proc, root = cgroups(tmp_path, "0::/\n", {"cpu.max": "300000 100000\n"})
    script = ("import os; os.sched_getaffinity = lambda pid: set(range(64)); "
              "import moekit.cores as c; "
              f"c.PROC_CGROUP, c.CGROUP_ROOT = c.Path({str(proc)!r}), c.Path({str(root)!r}); "
              "from moekit.executors import device, streaming; "
              "print(streaming.BUILDERS, device.READERS)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["3", "1"]
