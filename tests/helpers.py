"""Shared paths for tests: the real collections live beside the checkout, never inside it;
and ``served``: an ASGI app on a loopback port for the browser tests."""

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def dataset(name: str) -> str:
    path = DATASETS / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the shared test collections must sit at "
                                f"{DATASETS}")
    return str(path)


@contextmanager
def served(api) -> Iterator[str]:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port in a thread: its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
