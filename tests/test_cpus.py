"""Thread defaults for in-process models: affinity, cgroup quota and physical cores, on fake sysfs trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.cpus import cgroup_cpu_quota, detect_cores, physical_cores


def _topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """A fake /sys/devices/system/cpu: logical cpu -> (package, core id)."""
    for cpu, (package, core) in cores.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


# 8 logical CPUs, 4 physical cores with two hyper-threads each (cpu N and N+4 share a core)
SMT = {cpu: (0, cpu % 4) for cpu in range(8)}


def test_hyperthreads_count_once(tmp_path: Path) -> None:
    topo = _topology(tmp_path, SMT)
    found = detect_cores(affinity=range(8), quota_cpus=None, topology_root=topo)
    assert (found.threads, found.allowed_cpus, found.physical_cores) == (4, 8, 4)
    assert found.describe() == "4 threads (8 allowed CPUs, 4 physical cores)"


def test_affinity_limits_the_cores(tmp_path: Path) -> None:
    topo = _topology(tmp_path, SMT)
    # cpus 0 and 4 are one core: two logical CPUs, one physical core
    assert detect_cores(affinity={0, 4}, quota_cpus=None, topology_root=topo).threads == 1
    assert detect_cores(affinity={0, 1, 2}, quota_cpus=None, topology_root=topo).threads == 3


def test_quota_caps_and_rounds_down(tmp_path: Path) -> None:
    topo = _topology(tmp_path, SMT)
    assert detect_cores(affinity=range(8), quota_cpus=2.5, topology_root=topo).threads == 2
    assert detect_cores(affinity=range(8), quota_cpus=0.5, topology_root=topo).threads == 1  # never 0


def test_two_sockets_are_distinct_cores(tmp_path: Path) -> None:
    topo = _topology(tmp_path, {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)})  # core ids repeat per package
    assert physical_cores(range(4), topology_root=topo) == 4


def test_cpuinfo_when_sysfs_is_missing(tmp_path: Path) -> None:
    cpuinfo = "".join(f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\n\n" for cpu in range(4))
    assert physical_cores(range(4), topology_root=tmp_path / "none", cpuinfo=cpuinfo) == 2
    assert physical_cores([0], topology_root=tmp_path / "none", cpuinfo=cpuinfo) == 1
    # nothing known (e.g. ARM cpuinfo without core ids): fall back to the allowed CPUs
    found = detect_cores(affinity=range(6), quota_cpus=None, topology_root=tmp_path / "none", cpuinfo="processor: 0\n")
    assert (found.threads, found.physical_cores) == (6, None)


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path, own_path="/") == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path, own_path="/") is None


def test_cgroup_v2_own_group_is_read(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    own = tmp_path / "user.slice" / "job"
    own.mkdir(parents=True)
    (own / "cpu.max").write_text("300000 100000\n")
    assert cgroup_cpu_quota(tmp_path, own_path="/user.slice/job") == 3.0


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path, own_path="/") is None
    (cpu / "cpu.cfs_quota_us").write_text("200000\n")
    assert cgroup_cpu_quota(tmp_path, own_path="/") == 2.0


def test_this_machine_gives_a_usable_count() -> None:
    found = detect_cores()
    assert 1 <= found.threads <= found.allowed_cpus


def test_endpoint_options_override_the_default_and_summaries_say_so() -> None:
    pytest.importorskip("llama_cpp")
    from backends import BackendSettings, create_backend

    chosen = create_backend("llamacpp", BackendSettings(endpoint="x", options={"n_threads": 3, "n_threads_batch": 5}))
    info = chosen.summary()  # type: ignore[attr-defined]
    assert (info["n_threads"], info["n_threads_batch"], info["threads_from"]) == (3, 5, "endpoint option n_threads")
    default = create_backend("llamacpp", BackendSettings(endpoint="y", max_concurrency=4)).summary()  # type: ignore[attr-defined]
    assert default["n_threads"] == default["n_threads_batch"] == detect_cores().threads
    assert default["threads_from"] == detect_cores().describe() and default["batching"] == "4 sequences"  # default
    assert default["flash_attn"] is True
    alone = create_backend("llamacpp", BackendSettings(endpoint="z", max_concurrency=4, options={"batching": False}))
    assert alone.summary()["batching"] == "off" and alone.summary()["flash_attn"] is False  # type: ignore[attr-defined]
