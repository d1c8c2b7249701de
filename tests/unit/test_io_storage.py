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


def test_s3_reads_whole_objects_and_ranges_in_one_get_each(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/r/blob.bin"
    storage.write_bytes(url, bytes(range(256)) * 4)
    gets = []
    client = storage.s3_client()
    real_get = client.get_object
    monkeypatch.setattr(client, "get_object", lambda **kw: (gets.append(kw), real_get(**kw))[1])
    assert storage.read_bytes(url) == bytes(range(256)) * 4
    assert storage.read_range(url, 250, 10) == bytes(range(250, 256)) + bytes(range(4))
    assert storage.read_range(url, 0, 0) == b""
    assert [g.get("Range") for g in gets] == [None, "bytes=250-259"]
    with pytest.raises(OSError, match="truncated"):
        storage.read_range(url, 1020, 10)
    with pytest.raises(FileNotFoundError, match="r/missing.bin"):
        storage.read_bytes(f"{s3_bucket}/r/missing.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_range(f"{s3_bucket}/r/missing.bin", 0, 4)


def test_s3_root_reader_reads_ahead_in_order_with_the_plain_reads_outcomes(s3_bucket, monkeypatch):
    import threading
    import time

    for i in range(40):
        storage.write_bytes(f"{s3_bucket}/img/{i:02d}.jpg", f"image {i}".encode())
    storage.write_bytes(f"{s3_bucket}/img/folder/inner.jpg", b"x")
    active, peak, lock = [0], [0], threading.Lock()
    real = storage.RootReader._read_now

    def slow_read(self, relative):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.01)
            return real(self, relative)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(storage.RootReader, "_read_now", slow_read)
    announced = [f"{i:02d}.jpg" for i in range(40)] + ["missing.jpg", "folder"]
    with storage.RootReader(f"{s3_bucket}/img") as reader:
        reader.read_ahead(announced)
        # 03 and 04 are announced but never asked for (their records were rejected first): skipped.
        wanted = [f"{i:02d}.jpg" for i in range(40) if i not in (3, 4)]
        assert [reader.read(p) for p in wanted] == [f"image {int(p[:2])}".encode() for p in wanted]
        assert reader.read("07.jpg") == b"image 7"  # not announced (any more): a plain read
        with pytest.raises(FileNotFoundError):
            reader.read("missing.jpg")
        with pytest.raises(IsADirectoryError):
            reader.read("folder")
    assert 1 < peak[0] <= storage.READ_AHEAD


def test_local_root_reader_reads_whole_files_of_any_size(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "big").write_bytes(b"z" * (3 << 20))
    reader = storage.RootReader(str(tmp_path))
    reader.read_ahead(["big", "empty"])  # locally a no-op
    assert reader.read("empty") == b"" and reader.read("big") == b"z" * (3 << 20)
