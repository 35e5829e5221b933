"""A CPU quota is not a free core: ``children.cpu_count`` caps the affinity mask by the
cgroup's quota (v1 and v2), on fixture trees and on a real cgroup made for the test."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from downloader import children
from downloader.backends.hybrid import worker_count
from downloader.backends.pools import cpu_executor
from downloader.children import cpu_count, cpu_quota
from downloader.settings import HttpSettings, Settings

AFFINITY = len(os.sched_getaffinity(0))


def tree(root: Path, cgroup: str, files: dict[str, str]) -> Path:
    """A /proc/self/cgroup naming ``cgroup`` and files under /sys/fs/cgroup."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


V2 = "0::/user.slice/app.scope\n"
V1 = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"


@pytest.mark.parametrize(
    ("cgroup", "files", "quota"),
    [
        # v2: "quota period", rounded up; "max" is none
        (V2, {"cgroup.controllers": "cpu", "user.slice/app.scope/cpu.max": "150000 100000"}, 2),
        (V2, {"cgroup.controllers": "cpu", "user.slice/app.scope/cpu.max": "max 100000"}, None),
        (V2, {"cgroup.controllers": "cpu", "user.slice/app.scope/cpu.max": "100000 100000"}, 1),
        (V2, {"cgroup.controllers": "cpu", "user.slice/app.scope/cpu.max": "1000 100000"}, 1),
        # v2: an ancestor's quota binds its children too; the tightest counts
        (
            V2,
            {
                "cgroup.controllers": "cpu",
                "user.slice/cpu.max": "300000 100000",
                "user.slice/app.scope/cpu.max": "max 100000",
            },
            3,
        ),
        (
            V2,
            {
                "cgroup.controllers": "cpu",
                "user.slice/cpu.max": "800000 100000",
                "user.slice/app.scope/cpu.max": "400000 200000",
            },
            2,
        ),
        # v2 in a container: its own cgroup is the mount's root ("/", or a path the
        # namespace does not show)
        ("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "200000 100000"}, 2),
        ("0::/docker/abc\n", {"cgroup.controllers": "cpu", "cpu.max": "50000 100000"}, 1),
        # v1: cfs_quota_us / cfs_period_us, -1 is none, under cpu,cpuacct or cpu
        (
            V1,
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
            },
            3,
        ),
        (
            V1,
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
            },
            None,
        ),
        (
            "2:cpu:/batch\n",
            {"cpu/batch/cpu.cfs_quota_us": "20000", "cpu/batch/cpu.cfs_period_us": "10000"},
            2,
        ),
        (  # v1 seen from inside the container: the mount is its own cgroup
            V1,
            {"cpu,cpuacct/cpu.cfs_quota_us": "100000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            1,
        ),
        # hybrid: v1 controllers, and a v2 hierarchy without the cpu controller
        (
            "1:cpu:/\n0::/\n",
            {
                "cpu/cpu.cfs_quota_us": "300000",
                "cpu/cpu.cfs_period_us": "100000",
                "unified/cgroup.controllers": "",
            },
            3,
        ),
        # nothing to read, or nothing that makes sense
        ("0::/\n", {"cgroup.controllers": "cpu"}, None),
        ("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "lots 100000"}, None),
        ("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "100000 0"}, None),
        ("garbage\n", {}, None),
        ("", {}, None),
    ],
)
def test_the_quota_of_a_cgroup_tree(
    tmp_path: Path, cgroup: str, files: dict[str, str], quota: int | None
) -> None:
    root = tree(tmp_path, cgroup, files)
    assert cpu_quota(root) == quota
    assert cpu_count(root) == (AFFINITY if quota is None else min(AFFINITY, quota))


def test_without_proc_there_is_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path) is None
    assert cpu_count(tmp_path) == AFFINITY


def test_a_quota_never_adds_cores_beyond_the_affinity_mask(tmp_path: Path) -> None:
    root = tree(tmp_path, "0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "6400000 100000"})
    assert cpu_quota(root) == 64
    assert cpu_count(root) == AFFINITY


def test_every_one_per_core_default_follows_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(children, "cpu_quota", lambda root=None: 1)
    assert cpu_count() == 1
    assert worker_count(Settings(workers=0, http=HttpSettings(concurrency=64))) == 1
    with cpu_executor("thread") as pool:
        assert pool is not None and pool._max_workers == 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- a real cgroup


def _writable_cpu_hierarchy() -> tuple[str, Path] | str:
    """("v2" or "v1", where to make a child cgroup), or why this machine cannot."""
    if not sys.platform.startswith("linux"):
        return "cgroups are Linux's"
    if os.geteuid() != 0:
        return "making a cgroup needs root"
    base = Path("/sys/fs/cgroup")
    controllers = base / "cgroup.controllers"
    if controllers.exists():  # v2: a child of the root cgroup, with the cpu controller
        subtree = (base / "cgroup.subtree_control").read_text().split()
        if "cpu" in subtree and os.access(base, os.W_OK):
            return "v2", base
        return "cgroup v2 without the cpu controller enabled for children of the root"
    for name in ("cpu,cpuacct", "cpu"):
        mount = base / name
        if (mount / "cpu.cfs_quota_us").exists() and os.access(mount, os.W_OK):
            return "v1", mount
    return "no writable cgroup v1 cpu hierarchy, nor cgroup v2 with the cpu controller"


@pytest.fixture
def quota_cgroup() -> Iterator[tuple[str, Path]]:
    """A child cgroup limited to half a core (one, rounded up); removed afterwards.
    Skipped only where the machine cannot make one; where it can, any error fails."""
    found = _writable_cpu_hierarchy()
    if isinstance(found, str):
        pytest.skip(f"no cgroup for the test: {found}")
    if AFFINITY < 2:
        pytest.skip("one core only: a one-core quota would change nothing to see")
    version, parent = found
    group = parent / f"downloader-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        if version == "v2":
            (group / "cpu.max").write_text("50000 100000")
        else:
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("50000")
        yield version, group
    finally:
        group.rmdir()  # the child process has exited: the cgroup is empty


def test_a_process_in_a_real_quota_cgroup_counts_one_core(quota_cgroup: tuple[str, Path]) -> None:
    version, group = quota_cgroup
    script = (
        "import os, sys\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"  # into the cgroup, then count
        "from downloader.children import cpu_count, cpu_quota\n"
        "print(cpu_quota(), cpu_count(), len(os.sched_getaffinity(0)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(group / "cgroup.procs")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    quota, count, affinity = (int(x) for x in done.stdout.split())
    assert (quota, count) == (1, 1), f"cgroup {version} at {group}"
    assert affinity == AFFINITY  # the mask alone would have said more
