"""A memory limit for one process, from a memory cgroup (v1 ``memory`` or v2 with the memory
controller): how tests and benchmarks show that a memory-mapped shard is served in less memory
than its bytes.

The parent makes the cgroup (:func:`limited_cgroup`); the child, once started (imports done),
calls :func:`join` with the limit: from then on the pages it allocates, reads or maps are
charged to the cgroup, the kernel reclaims its page cache (mapped shard pages included) to stay
under the limit, and kills it when anonymous memory alone exceeds it (exit status -9).
:func:`peak` reads the largest charge. Needs root; :func:`writable_root` is None elsewhere.

Pages already in the page cache stay charged to whoever read them first, so the parent drops
the shard files' cached pages first (:func:`drop_cached_pages`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

V1_ROOT = "/sys/fs/cgroup/memory"
V2_ROOT = "/sys/fs/cgroup"


def writable_root() -> str | None:
    """The memory cgroup hierarchy this process may make cgroups in, or None."""
    if os.path.exists(os.path.join(V1_ROOT, "memory.limit_in_bytes")):
        return V1_ROOT if os.access(V1_ROOT, os.W_OK) else None
    controls = Path(V2_ROOT, "cgroup.subtree_control")
    if controls.exists() and "memory" in controls.read_text().split():
        return V2_ROOT if os.access(V2_ROOT, os.W_OK) else None
    return None


@contextlib.contextmanager
def limited_cgroup(name: str) -> Iterator[str]:
    """A fresh cgroup under :func:`writable_root` for one child process; removed after."""
    root = writable_root()
    if root is None:
        raise RuntimeError("no writable memory cgroup (needs root and a memory controller)")
    path = Path(root, f"{name}-{os.getpid()}")
    path.mkdir()
    try:
        yield str(path)
    finally:
        path.rmdir()


def _v1(cgroup: str) -> bool:
    return os.path.exists(os.path.join(cgroup, "memory.limit_in_bytes"))


def join(cgroup: str, limit: int) -> None:
    """Limit ``cgroup`` to ``limit`` bytes and move this process into it."""
    v1 = _v1(cgroup)
    Path(cgroup, "memory.limit_in_bytes" if v1 else "memory.max").write_text(str(limit))
    Path(cgroup, "tasks" if v1 else "cgroup.procs").write_text(str(os.getpid()))


def peak(cgroup: str) -> int:
    """The largest charge (bytes) the cgroup has had."""
    name = "memory.max_usage_in_bytes" if _v1(cgroup) else "memory.peak"
    return int(Path(cgroup, name).read_text())


def drop_cached_pages(paths: Iterable[Path]) -> None:
    """Evict the clean page-cache pages of every file under ``paths``
    (``POSIX_FADV_DONTNEED``), so a limited process reads, and is charged for, them anew."""
    for top in paths:
        for path in [top] if top.is_file() else top.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
