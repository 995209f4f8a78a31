"""Shared paths for tests: the real collections live beside the checkout, never inside it;
``small_collection``: a slice of one of them, written as a BEIR folder; ``same_ranking``: two
rankings equal but for numeric noise; and ``served``: an ASGI app on a loopback port for the
browser tests."""

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def dataset(name: str) -> str:
    path = DATASETS / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the shared test collections must sit at "
                                f"{DATASETS}")
    return str(path)


def small_collection(folder: Path, name: str = "medline", docs: int = 120) -> str:
    """A BEIR folder under ``folder``: collection ``name``'s judged queries over ``docs`` of its
    documents, judged ones first (small: MiniLM encodes 120 in seconds); qrels keep the pairs
    whose document is kept."""
    import gzip
    import json

    from retriever.io.formats import load_dataset

    data = load_dataset(dataset(name))
    judged = {doc for pairs in data.qrels.values() for doc in pairs}
    keep = [i for i, doc in enumerate(data.corpus.ids) if doc in judged][:docs - docs // 6]
    taken = set(keep)
    keep += [i for i in range(len(data.corpus)) if i not in taken][:docs - len(keep)]
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as handle:
        for i in sorted(keep):
            handle.write(json.dumps({"_id": data.corpus.ids[i], "title": data.corpus.titles[i],
                                     "text": data.corpus.texts[i]}) + "\n")
    kept = {data.corpus.ids[i] for i in keep}
    with gzip.open(folder / "queries.jsonl.gz", "wt") as handle:
        for qid, text in data.judged_queries().items():
            handle.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, pairs in data.qrels.items()
                                             for d, g in pairs.items() if d in kept]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return str(folder)


def same_ranking(got: list[dict], want: list[tuple[str, float]], tol: float = 1e-5) -> None:
    """The same ranking but for numeric noise of size ``tol``: rank by rank the scores agree
    within ``tol``, so does each document's own score, and a document in one list but not the
    other sits within ``tol`` of the cut-off (two documents may swap only where their scores
    are that close). ``tol`` 1e-5:
    FAISS scores a batch with BLAS and one query with SIMD loops (the last bits differ), and
    queries are embedded in fp32 (``EncoderConfig.query_dtype``), so a query's vector alone and
    in a padded batch differ by ~1e-7 (they differed by ~1e-3 under bf16 autocast)."""
    assert len(got) == len(want)
    scores = [h["score"] for h in got]
    assert scores == pytest.approx([s for _, s in want], abs=tol)
    cut = min(scores[-1], want[-1][1]) if want else 0.0
    mine, theirs = {h["doc_id"]: h["score"] for h in got}, dict(want)
    for doc_id in set(mine) ^ set(theirs):
        assert mine.get(doc_id, theirs.get(doc_id)) <= cut + 2 * tol, doc_id
    for doc_id in set(mine) & set(theirs):  # moved only among scores within tol of its own
        assert mine[doc_id] == pytest.approx(theirs[doc_id], abs=tol), doc_id


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
