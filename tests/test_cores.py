"""The cores moekit's thread pools are sized by: the CPU affinity, capped by cgroup quotas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cores import usable_cpus


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
def test_a_cgroup_v1_cpu_quota_caps_the_cores(files, cpus, cores_64, tmp_path):
    proc = "12:memory:/docker/c1\n4:cpu,cpuacct:/docker/c1\n0::/\n"
    assert usable_cpus(*cgroups(tmp_path, proc, files)) == cpus


def test_a_quota_above_the_affinity_leaves_the_affinity(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert usable_cpus(*cgroups(tmp_path, "0::/\n", {"cpu.max": "800000 100000\n"})) == 3


def test_without_cgroup_files_the_cores_are_the_affinity(cores_64, tmp_path):
    assert usable_cpus(tmp_path / "missing", tmp_path) == 64
    proc, root = cgroups(tmp_path, "not a cgroup line\n2:cpu:relative\n", {})
    assert usable_cpus(proc, root) == 64


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
