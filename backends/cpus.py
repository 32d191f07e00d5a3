"""How many CPU threads an in-process model should use: the cores this process may actually run on.

llama-cpp-python's own default is half the machine's logical CPUs, which ignores CPU affinity, container
CPU quotas and whether hyper-threads exist. :func:`detect_cores` reads, in order: the affinity mask
(``os.sched_getaffinity``), the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``) and the CPU topology (``/sys/devices/system/cpu/cpuN/topology``, else the
``physical id`` / ``core id`` lines of ``/proc/cpuinfo``) to count physical cores among the allowed CPUs.
Every source is a parameter, so tests feed it fake inputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["CoreCount", "cgroup_cpu_quota", "detect_cores", "physical_cores"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreCount:
    """What :func:`detect_cores` found, and the thread count it recommends."""

    threads: int
    """Recommended threads: physical cores among the allowed CPUs, capped by the CPU quota rounded down (≥ 1)."""
    allowed_cpus: int
    """Logical CPUs in the affinity mask."""
    physical_cores: int | None
    """Physical cores among the allowed CPUs, or ``None`` when the topology could not be read."""
    quota_cpus: float | None
    """The cgroup CPU quota in CPUs (e.g. 1.5), or ``None`` when unlimited or unknown."""

    def describe(self) -> str:
        """One line saying where the number came from, for summaries and logs."""
        parts = [f"{self.allowed_cpus} allowed CPUs"]
        if self.physical_cores is not None:
            parts.append(f"{self.physical_cores} physical cores")
        if self.quota_cpus is not None:
            parts.append(f"cgroup quota {self.quota_cpus:g} CPUs")
        return f"{self.threads} threads ({', '.join(parts)})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), *, own_path: str | None = None) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or ``None`` when there is none (or it cannot be read).

    Looks at the process's own cgroup folder (``own_path``, from ``/proc/self/cgroup`` by default) and at the
    root of the mounted hierarchy (a container sees its own cgroup there). cgroup v2: ``cpu.max`` holds
    ``"<quota> <period>"`` or ``"max <period>"``; v1: ``cpu/cpu.cfs_quota_us`` (``-1`` = none) over
    ``cpu/cpu.cfs_period_us``. The smallest quota found wins.
    """
    if own_path is None:
        own_path = ""
        for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" or "cpu" in controllers.split(","):
                own_path = path
                break
    folders = {root, root / own_path.lstrip("/")}
    quotas: list[float] = []
    for folder in folders:
        v2 = _read(folder / "cpu.max")
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                quotas.append(int(quota) / int(period))
        for v1 in (folder / "cpu", folder / "cpu,cpuacct", folder):
            quota_us, period_us = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
            if quota_us and period_us and int(quota_us) > 0 and int(period_us) > 0:
                quotas.append(int(quota_us) / int(period_us))
    return min(quotas) if quotas else None


def physical_cores(
    cpus: Iterable[int], *, topology_root: Path = Path("/sys/devices/system/cpu"), cpuinfo: str | None = None
) -> int | None:
    """Distinct physical cores among logical ``cpus``: by ``(package, core id)`` from the sysfs topology, else
    from ``cpuinfo`` text (``/proc/cpuinfo`` when not given); ``None`` when neither says."""
    wanted = set(cpus)
    cores: set[tuple[str, str]] = set()
    for cpu in wanted:
        topology = topology_root / f"cpu{cpu}" / "topology"
        package, core = _read(topology / "physical_package_id"), _read(topology / "core_id")
        if package is None or core is None:
            cores.clear()
            break
        cores.add((package, core))
    if cores:
        return len(cores)
    text = cpuinfo if cpuinfo is not None else _read(Path("/proc/cpuinfo"))
    processor: int | None = None
    package = "0"
    for line in (text or "").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processor, package = int(value), "0"
        elif key == "physical id":
            package = value
        elif key == "core id" and processor in wanted:
            cores.add((package, value))
    return len(cores) or None


def detect_cores(
    *,
    affinity: Iterable[int] | None = None,
    quota_cpus: float | Literal["read"] | None = "read",
    topology_root: Path = Path("/sys/devices/system/cpu"),
    cpuinfo: str | None = None,
) -> CoreCount:
    """The cores this process may use. ``affinity``: the allowed CPU ids (default ``os.sched_getaffinity``);
    ``quota_cpus``: the cgroup quota in CPUs, ``None`` for none, ``"read"`` to read it (:func:`cgroup_cpu_quota`).
    A fractional quota rounds down (1.5 CPUs: 1 thread), since llama.cpp's threads spin and a throttled thread
    stalls every step."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # macOS, Windows
            affinity = range(os.cpu_count() or 1)
    allowed = sorted(set(affinity))
    quota = cgroup_cpu_quota() if quota_cpus == "read" else quota_cpus
    physical = physical_cores(allowed, topology_root=topology_root, cpuinfo=cpuinfo)
    threads = min(physical or len(allowed), len(allowed))
    if quota is not None:
        threads = min(threads, math.floor(quota))
    return CoreCount(threads=max(1, threads), allowed_cpus=len(allowed), physical_cores=physical, quota_cpus=quota)
