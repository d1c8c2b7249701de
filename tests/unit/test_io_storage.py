"""Local and S3 storage helpers: resolution, atomic writes, listing."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from mocha.io import storage


def test_local_atomic_write_publishes_only_complete_files(tmp_path):
    url = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(url, b"one")
    assert storage.read_bytes(url) == b"one"
    with pytest.raises(RuntimeError), storage.atomic_writer(url) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert storage.read_bytes(url) == b"one"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]  # no temporary left


def test_listing_exists_size_delete(tmp_path):
    for name in ("b.tar", "a.tar", "c.json"):
        storage.write_bytes(str(tmp_path / name), name.encode())
    assert storage.list_files(str(tmp_path), ".tar") == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert storage.list_files(str(tmp_path / "missing")) == []
    assert storage.file_size(str(tmp_path / "c.json")) == 6 and storage.file_size(str(tmp_path / "x")) is None
    storage.delete(str(tmp_path / "c.json"))
    storage.delete(str(tmp_path / "c.json"))
    assert not storage.exists(str(tmp_path / "c.json"))
    with pytest.raises(FileNotFoundError, match="c.json"):
        storage.read_bytes(str(tmp_path / "c.json"))


def test_resolve_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="gs://"):
        storage.resolve_filesystem("gs://bucket/x")
    with pytest.raises(ValueError, match="s3://bucket/key"):
        storage.resolve_filesystem("s3://")
    fs, path = storage.resolve_filesystem("file:///tmp/x/../y")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/y"


def test_s3_roundtrip_through_the_standard_endpoint_variable(s3_bucket):
    fs, path = storage.resolve_filesystem(f"{s3_bucket}/p/q.bin")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket[5:]}/p/q.bin"
    storage.write_bytes(f"{s3_bucket}/p/q.bin", b"x" * 1000)
    storage.write_bytes(f"{s3_bucket}/p/r.bin", b"y")
    assert storage.read_bytes(f"{s3_bucket}/p/q.bin") == b"x" * 1000
    assert storage.list_files(f"{s3_bucket}/p") == [f"{s3_bucket}/p/q.bin", f"{s3_bucket}/p/r.bin"]
    with pytest.raises(RuntimeError), storage.atomic_writer(f"{s3_bucket}/p/never.bin") as f:
        f.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert not storage.exists(f"{s3_bucket}/p/never.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_bucket}/p/never.bin")
