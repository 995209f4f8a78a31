"""Where an artefact came from: the code version, the time, and the machine that made it.

Every manifest the library writes (embeddings, indexes, evaluation matrices) stamps the same
two keys, ``code_version`` and ``created``, from here:

* :func:`code_version` -> the git commit of this checkout (short hash), else the installed
  package version, else ``"unknown"``; computed once per process;
* :func:`now` -> the current UTC time as ISO 8601 to the second, e.g. ``2026-11-30T04:45:02+00:00``;
* :func:`provenance` -> both, plus host, Python and Ray versions, as one dict.
"""

from __future__ import annotations

import datetime
import functools
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE = "llm-retriever"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this checkout, or the package version outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version_of(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def provenance() -> dict[str, str | None]:
    """``code_version``, ``created``, ``host``, ``python`` and ``ray`` (None if not installed)."""
    return {"code_version": code_version(), "created": now(), "host": socket.gethostname(),
            "python": platform.python_version(), "ray": _version_of("ray")}
