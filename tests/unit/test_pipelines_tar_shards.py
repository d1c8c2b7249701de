"""Deterministic tar shards, done-markers and resume verification."""

from __future__ import annotations

import hashlib
import tarfile

from mocha.io import storage
import json
from dataclasses import asdict

from pipelines.tar_shards import (completed_shard, finished_shards, iter_tar_samples, marker_url, remove_markers,
                                  remove_stale_shards, write_marker, write_tar_shard)

MEMBERS = [("k0.json", b'{"id": 0}'), ("k0.png", b"\x89PNG..."), ("k1.json", b'{"id": 1}')]


def _write(url: str):
    with write_tar_shard(url) as shard:
        for name, data in MEMBERS:
            shard.add(name, data)
    return shard.info


def test_same_members_give_identical_bytes_with_fixed_headers(tmp_path):
    a, b = _write(str(tmp_path / "a.tar")), _write(str(tmp_path / "b.tar"))
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()
    assert (a.count, a.size, a.sha256) == (2, len(data), hashlib.sha256(data).hexdigest())
    assert a.sha256 == b.sha256 and a.name == "a.tar"
    with tarfile.open(tmp_path / "a.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [n for n, _ in MEMBERS]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}
    assert list(iter_tar_samples(str(tmp_path / "a.tar"))) == [
        ("k0", {"json": b'{"id": 0}', "png": b"\x89PNG..."}), ("k1", {"json": b'{"id": 1}'})]


def test_completed_shard_requires_matching_plan_and_bytes(tmp_path):
    out = str(tmp_path)
    info = _write(storage.join_url(out, "shard-000000.tar"))
    assert completed_shard(out, "shard-000000.tar", "plan-a") is None  # no marker yet
    stamped = write_marker(out, info, "plan-a")
    assert stamped.plan_sha256 == "plan-a" and (stamped.name, stamped.sha256) == (info.name, info.sha256)
    assert completed_shard(out, "shard-000000.tar", "plan-a") == stamped
    assert completed_shard(out, "shard-000000.tar", "plan-b") is None
    data = bytearray((tmp_path / "shard-000000.tar").read_bytes())
    data[600] ^= 1  # same size, different bytes
    (tmp_path / "shard-000000.tar").write_bytes(bytes(data))
    assert completed_shard(out, "shard-000000.tar", "plan-a") is None
    (tmp_path / "shard-000000.tar").unlink()
    assert completed_shard(out, "shard-000000.tar", "plan-a") is None


def test_remove_stale_shards_and_crash_temporaries(tmp_path):
    out = str(tmp_path)
    for i in range(4):
        write_marker(out, _write(storage.join_url(out, f"shard-{i:06d}.tar")), "p")
    (tmp_path / ".shard-000001.tar.tmp-123-abcd").write_bytes(b"partial")
    (tmp_path / "manifest.json").write_bytes(b"{}")
    removed = remove_stale_shards(out, keep=2)
    assert sorted(removed) == [".shard-000001.tar.tmp-123-abcd", "shard-000002.tar", "shard-000003.tar"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar"]
    assert not storage.exists(marker_url(out, "shard-000002.tar")) and storage.exists(marker_url(out, "shard-000001.tar"))


def test_finished_build_keeps_no_markers_and_its_manifest_still_proves_completion(tmp_path):
    out = str(tmp_path)
    infos = [write_marker(out, _write(storage.join_url(out, f"shard-{i:06d}.tar")), f"plan-{i}") for i in range(2)]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [asdict(i) for i in infos]}))
    remove_markers(out)  # what a build does once its manifest is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    remove_markers(out)  # nothing left to remove: not an error

    finished = finished_shards(out)
    assert completed_shard(out, "shard-000001.tar", "plan-1") is None  # without the manifest: rebuilt
    assert completed_shard(out, "shard-000001.tar", "plan-1", finished) == infos[1]
    assert completed_shard(out, "shard-000001.tar", "plan-0", finished) is None  # another plan
    (tmp_path / "shard-000000.tar").write_bytes(b"damaged")
    assert completed_shard(out, "shard-000000.tar", "plan-0", finished) is None
    # a manifest written before plan digests were recorded proves nothing: those shards are rebuilt
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [
        {k: v for k, v in asdict(infos[1]).items() if k != "plan_sha256"}]}))
    assert completed_shard(out, "shard-000001.tar", "plan-1", finished_shards(out)) is None


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_shard_bytes_equal_what_tarfile_writes(tmp_path):
    """The direct header writer must give tarfile's USTAR bytes for every kind of member: short
    ASCII names (the fast path), names that need the prefix field or are not ASCII (tarfile's
    path), empty data, data of exact block multiples and of record-boundary sizes."""
    members = [("0000000001-a.json", b'{"id": 1}'), ("0000000001-a.jpg", bytes(range(256)) * 3),
               ("e.txt", b""), ("block", b"x" * 512), ("rec", b"y" * (10240 - 3 * 512)),
               ("d" * 100, b"100-byte name"), ("folder/" * 20 + "long-name.json", b"prefix field"),
               ("caf\u00e9.json", b"non-ascii")]
    for cut in range(1, len(members) + 1):
        url = str(tmp_path / f"s{cut}.tar")
        with write_tar_shard(url) as shard:
            for name, data in members[:cut]:
                shard.add(name, data)
        data = (tmp_path / f"s{cut}.tar").read_bytes()
        assert data == _tarfile_bytes(members[:cut]), members[cut - 1][0]
        assert shard.info.size == len(data) and shard.info.sha256 == hashlib.sha256(data).hexdigest()
