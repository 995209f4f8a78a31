"""retriever.io.store on a local dir (path and file:// URL), memory:// and a real S3 server.

The S3 cases run against SeaweedFS (``s3_server``/``s3_env`` from tests/s3server.py) and
configure the store only through the standard ``AWS_*`` environment variables.
"""

from __future__ import annotations

import gzip
import json
import os
import uuid

import pyarrow as pa
import pytest

from retriever.io import store

ROOT_KINDS = ["path", "file-url", "memory", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=ROOT_KINDS)
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty store root of each kind."""
    kind = request.param
    if kind == "path":
        return str(tmp_path / "store")
    if kind == "file-url":
        return f"file://{tmp_path / 'store'}"
    if kind == "memory":
        url = f"memory://store-test-{uuid.uuid4().hex[:12]}"

        def cleanup() -> None:
            fs, path = store.filesystem(url)
            if fs.exists(path):
                fs.rm(path, recursive=True)

        request.addfinalizer(cleanup)
        return url
    return request.getfixturevalue("s3_env")


@pytest.fixture(params=["path", "file-url"])
def local_root(request: pytest.FixtureRequest, tmp_path) -> str:
    return str(tmp_path / "store") if request.param == "path" else f"file://{tmp_path / 'store'}"


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def sample_table() -> pa.Table:
    return pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "score": pa.array([0.5, -1.25, 3.0], pa.float32()),
            "text": ["alpha", "bêta", "γάμμα"],
            "vec": pa.array([[0.1, 0.2], [0.3, 0.4], []], pa.list_(pa.float32())),
        }
    )


# ------------------------------------------------------------------------------ every kind


def test_bytes_roundtrip_and_overwrite(root: str) -> None:
    url = store.join(root, "blob.bin")
    data = bytes(range(256)) * 4
    store.write_bytes(url, data)
    assert store.read_bytes(url) == data
    store.write_bytes(url, b"short")
    assert store.read_bytes(url) == b"short"


def test_text_roundtrip(root: str) -> None:
    url = store.join(root, "notes", "a.txt")
    text = "héllo ✓\nzweite Zeile\n"
    store.write_text(url, text)
    assert store.read_text(url) == text
    assert store.read_bytes(url) == text.encode("utf-8")
    # text modes of the file API are UTF-8 as well
    with store.open_write(url, "w") as handle:
        handle.write("ünïcode ✓\n")
    with store.open_read(url, "rt") as handle:
        assert handle.read() == "ünïcode ✓\n"


def test_json_roundtrip(root: str) -> None:
    url = store.join(root, "manifest.json")
    obj = {"name": "idx-ü", "dim": 384, "shards": [{"rows": 10, "path": "s0.parquet"}], "ok": True}
    store.write_json(url, obj)
    assert store.read_json(url) == obj
    assert store.read_text(url).endswith("\n")
    store.write_text(url, "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        store.read_json(url)


def test_parquet_roundtrip(root: str) -> None:
    url = store.join(root, "shards", "part-0.parquet")
    table = sample_table()
    store.write_parquet(table, url)
    back = store.read_parquet(url)
    assert back.schema.equals(table.schema)
    assert back.equals(table)


def test_exists_and_listdir(root: str) -> None:
    base = store.join(root, "dir")
    assert not store.exists(base)
    assert store.listdir(base) == []
    store.write_bytes(store.join(base, "b.bin"), b"b")
    store.write_json(store.join(base, "a.json"), {"a": 1})
    store.write_text(store.join(base, "sub", "c.txt"), "c")
    assert store.exists(base)
    assert store.exists(store.join(base, "a.json"))
    assert store.exists(store.join(base, "sub", "c.txt"))
    assert not store.exists(store.join(base, "nope.json"))
    assert store.listdir(base) == ["a.json", "b.bin", "sub"]
    assert store.listdir(store.join(base, "sub")) == ["c.txt"]
    assert store.listdir(store.join(root, "missing")) == []


def test_missing_object_raises_file_not_found(root: str) -> None:
    store.write_bytes(store.join(root, "present.bin"), b"x")  # the root itself exists
    missing = store.join(root, "absent")
    with pytest.raises(FileNotFoundError):
        store.read_bytes(f"{missing}.bin")
    with pytest.raises(FileNotFoundError):
        store.read_json(f"{missing}.json")
    with pytest.raises(FileNotFoundError):
        store.read_parquet(f"{missing}.parquet")
    with pytest.raises(FileNotFoundError):
        store.open_read(f"{missing}.txt.gz")


def test_open_read_infers_gzip(root: str) -> None:
    url = store.join(root, "corpus", "docs.jsonl.gz")
    text = "".join(json.dumps({"id": i, "text": f"doc {i} ✓"}, ensure_ascii=False) + "\n" for i in range(50))
    packed = gzip.compress(text.encode("utf-8"))
    store.write_bytes(url, packed)
    with store.open_read(url) as handle:  # rb, compression inferred from ".gz"
        assert handle.read() == text.encode("utf-8")
    with store.open_read(url, "rt") as handle:
        lines = handle.read().splitlines()
    assert len(lines) == 50 and json.loads(lines[7]) == {"id": 7, "text": "doc 7 ✓"}
    with store.open_read(url, compression=None) as handle:
        assert handle.read() == packed
    assert store.read_bytes(url) == packed  # read_bytes never decompresses


# ------------------------------------------------------------------------------ local only


def test_local_writes_create_parent_dirs(local_root: str) -> None:
    deep = store.join(local_root, "a", "b", "c")
    store.write_json(store.join(deep, "m.json"), {"k": 1})
    store.write_parquet(sample_table(), store.join(deep, "d", "t.parquet"))
    with store.open_write(store.join(deep, "e", "f.bin")) as handle:
        handle.write(b"x")
    assert os.path.isfile(os.path.join(local_path(deep), "m.json"))
    assert os.path.isfile(os.path.join(local_path(deep), "d", "t.parquet"))
    assert os.path.isfile(os.path.join(local_path(deep), "e", "f.bin"))
    assert store.read_json(store.join(deep, "m.json")) == {"k": 1}


def test_local_write_is_atomic(local_root: str) -> None:
    url = store.join(local_root, "idx", "manifest.json")
    directory = os.path.dirname(local_path(url))
    store.write_json(url, {"version": 1})
    with store.open_write(url) as handle:
        handle.write(b'{"version": 2}')
        # not visible until the block exits cleanly
        assert store.read_json(url) == {"version": 1}
    assert store.read_json(url) == {"version": 2}

    for mode, partial in (("wb", b'{"version": 3, "trunc'), ("w", '{"version": 3, "trunc')):
        with pytest.raises(RuntimeError, match="crash"):
            with store.open_write(url, mode) as handle:
                handle.write(partial)
                raise RuntimeError("crash while writing")
        assert store.read_json(url) == {"version": 2}
        assert os.listdir(directory) == ["manifest.json"]  # no temporary file left

    fresh = store.join(local_root, "idx", "new.bin")
    with pytest.raises(RuntimeError):
        with store.open_write(fresh) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash")
    assert not store.exists(fresh)
    assert os.listdir(directory) == ["manifest.json"]


# ------------------------------------------------------------------------------ S3 only


def _s3_key(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


@pytest.mark.s3
def test_s3_configured_from_environment_only(s3_env: str, s3_server) -> None:
    url = store.join(s3_env, "env", "obj.bin")
    fs, _ = store.filesystem(url)
    assert type(fs).__name__ == "S3FileSystem"
    assert not {"endpoint_url", "key", "secret", "client_kwargs"} & set(fs.storage_options)
    store.write_bytes(url, b"via env")
    # the object really is on our server (read back with an explicitly configured client)
    bucket, key = _s3_key(url)
    assert bucket == s3_server.bucket
    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == b"via env"


def _auth_error_codes(err: BaseException) -> set[str]:
    """Error codes of the botocore ClientErrors in ``err``'s cause/context chain."""
    from botocore.exceptions import ClientError

    codes, seen = set(), set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ClientError):
            codes.add(err.response.get("Error", {}).get("Code"))
            assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        err = err.__cause__ or err.__context__
    return codes


@pytest.mark.s3
@pytest.mark.parametrize("which", ["secret", "access-key"])
def test_s3_wrong_credentials_refused(which: str, s3_env: str, s3_server, monkeypatch) -> None:
    import s3fs

    url = store.join(s3_env, "denied.bin")
    store.write_bytes(store.join(s3_env, "existing.bin"), b"x")
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + uuid.uuid4().hex)
        expected = {"SignatureDoesNotMatch"}
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKUNKNOWN" + uuid.uuid4().hex[:11].upper())
        expected = {"InvalidAccessKeyId", "AccessDenied"}
    s3fs.S3FileSystem.clear_instance_cache()  # cached instances keep the old keys

    with pytest.raises(PermissionError) as write_err:
        store.write_bytes(url, b"should not land")
    assert _auth_error_codes(write_err.value) & expected, write_err.value
    with pytest.raises(PermissionError) as read_err:
        store.read_bytes(store.join(s3_env, "existing.bin"))
    # a read starts with HEAD, whose 403 has no body: botocore reports the code as "403"
    assert _auth_error_codes(read_err.value) & (expected | {"AccessDenied", "403"}), read_err.value

    bucket, key = _s3_key(url)
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=key)
    assert listing.get("KeyCount", 0) == 0  # nothing was written


@pytest.mark.s3
def test_s3_failed_write_keeps_previous_version(s3_env: str) -> None:
    url = store.join(s3_env, "manifest.json")
    store.write_json(url, {"version": 1})
    for mode, partial in (("wb", b'{"version": 2, "tru'), ("w", '{"version": 2, "tru')):
        with pytest.raises(RuntimeError, match="crash"):
            with store.open_write(url, mode) as handle:
                handle.write(partial)
                raise RuntimeError("crash while writing")
        assert store.read_json(url) == {"version": 1}
    fresh = store.join(s3_env, "never.json")
    with pytest.raises(RuntimeError):
        with store.open_write(fresh) as handle:
            handle.write(b"{")
            raise RuntimeError("crash")
    assert not store.exists(fresh)
    assert store.listdir(s3_env) == ["manifest.json"]


@pytest.mark.s3
def test_s3_sees_changes_by_other_writers(s3_env: str, s3_server) -> None:
    """Cached s3fs listings must not hide objects written or rewritten by another process."""
    client = s3_server.client()
    bucket, prefix = _s3_key(s3_env)
    store.write_bytes(store.join(s3_env, "a.txt"), b"one")
    assert store.listdir(s3_env) == ["a.txt"]  # s3fs caches this listing
    assert not store.exists(store.join(s3_env, "b.txt"))
    client.put_object(Bucket=bucket, Key=f"{prefix}/b.txt", Body=b"bee")
    client.put_object(Bucket=bucket, Key=f"{prefix}/a.txt", Body=b"one, rewritten")
    assert store.exists(store.join(s3_env, "b.txt"))
    assert store.listdir(s3_env) == ["a.txt", "b.txt"]
    assert store.read_bytes(store.join(s3_env, "a.txt")) == b"one, rewritten"
