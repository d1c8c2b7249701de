"""The shard output folder: one writer at a time (a lease, local and S3), no silent overwrite of
another run, and a manifest that never describes bytes that are not there."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mocha.config import ConfigError
from mocha.train.shards import verify_shard_files
from mocha.io import storage
from pipelines.output_lock import LOCK_NAME, OutputLock, OutputLockedError
from pipelines.shard import ShardJobConfig, build_shards
from pipelines.shard_output import MANIFEST_NAME, OutputNotEmptyError, prepare_output


def _lease(output: str, run_id: str, pid: int, age_s: float = 0.0, host: str | None = None) -> None:
    storage.write_bytes(storage.join_url(output, LOCK_NAME), json.dumps(
        {"run_id": run_id, "host": host or socket.gethostname(), "pid": pid, "renewed": time.time() - age_s}).encode())


@pytest.fixture
def live_pid():
    """The pid of a process that is alive for the test (another run's driver)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_fresh_foreign_lease_refuses_the_run_locally(tmp_path, live_pid):
    out = str(tmp_path / "out")
    _lease(out, "other-run", live_pid)
    with pytest.raises(OutputLockedError, match="other-run"):
        OutputLock(out).acquire()
    # build_shards refuses before touching anything (no Ray needed to get there).
    (tmp_path / "in.json").write_text("[]")
    with pytest.raises(OutputLockedError):
        build_shards(ShardJobConfig(input=str(tmp_path / "in.json"), images=str(tmp_path), output=out), progress=False)
    assert sorted(os.listdir(out)) == [LOCK_NAME]


def test_stale_or_dead_leases_are_taken_over_and_released(tmp_path, live_pid):
    out = str(tmp_path / "out")
    _lease(out, "old-run", live_pid, age_s=120, host="elsewhere")  # not renewed for 2 ttl: stale
    with OutputLock(out, ttl_s=60) as lock:
        assert json.loads(storage.read_bytes(lock.url))["run_id"] == lock.run_id
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lease(out, "killed-run", dead.pid)  # fresh, but its process on this host is gone (kill -9)
    with OutputLock(out):
        pass


def test_two_racing_acquires_one_wins(tmp_path):
    out = str(tmp_path / "out")
    first = OutputLock(out).acquire()
    try:
        with pytest.raises(OutputLockedError):
            OutputLock(out).acquire()
    finally:
        first.release()


def test_lease_is_renewed_while_held_and_loss_is_reported(tmp_path):
    out = str(tmp_path / "out")
    lock = OutputLock(out, ttl_s=0.4).acquire()
    try:
        before = json.loads(storage.read_bytes(lock.url))["renewed"]
        time.sleep(0.5)
        assert json.loads(storage.read_bytes(lock.url))["renewed"] > before
        _lease(out, "thief", os.getpid())  # someone took the lease over
        time.sleep(0.3)
        with pytest.raises(OutputLockedError, match="thief"):
            lock.check()
    finally:
        lock.release()
    assert json.loads(storage.read_bytes(lock.url))["run_id"] == "thief"  # not deleted: not ours


def test_s3_lease_refuses_a_second_run_and_is_released(s3_bucket):
    out = f"{s3_bucket}/shards"
    with OutputLock(out, settle_s=0.2) as held:
        with pytest.raises(OutputLockedError, match=held.run_id):
            OutputLock(out, settle_s=0.2).acquire()
    assert not storage.exists(f"{out}/{LOCK_NAME}")


def _identity(sha: str) -> dict:
    return {"format": "f", "input_sha256": sha, "images": "im", "samples_per_shard": 2, "max_image_pixels": 9}


def test_different_input_into_a_non_empty_output_is_refused_unless_overwrite(tmp_path):
    out = str(tmp_path / "out")
    prepare_output(out, _identity("a"), overwrite=False)
    storage.write_bytes(f"{out}/shard-000000.tar", b"old shard")
    storage.write_bytes(f"{out}/{MANIFEST_NAME}", b"{}")
    assert prepare_output(out, _identity("a"), overwrite=False) is False  # same job: resume
    assert not os.path.exists(f"{out}/{MANIFEST_NAME}")  # invalidated before any write
    with pytest.raises(OutputNotEmptyError, match="input_sha256"):
        prepare_output(out, _identity("b"), overwrite=False)
    assert os.path.exists(f"{out}/shard-000000.tar")
    storage.write_bytes(f"{out}/notes.txt", b"the user's file")
    assert prepare_output(out, _identity("b"), overwrite=True) is True
    assert sorted(os.listdir(out)) == ["_progress", "notes.txt"]  # only the earlier run's files went


def test_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(OutputNotEmptyError, match="not the output of a `mocha data shard` run"):
        prepare_output(str(tmp_path), _identity("a"), overwrite=False)
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_train_check_catches_a_manifest_that_does_not_describe_the_shards(tmp_path):
    data = b"shard bytes"
    (tmp_path / "shard-000000.tar").write_bytes(data)
    manifest = {"shards": [{"name": "shard-000000.tar", "count": 1, "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}]}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify_shard_files(str(tmp_path), checksums=True) == 1
    (tmp_path / "shard-000000.tar").write_bytes(b"shard bytez")  # same size, other bytes
    assert verify_shard_files(str(tmp_path), checksums=False) == 1
    with pytest.raises(ConfigError, match="different SHA-256"):
        verify_shard_files(str(tmp_path), checksums=True)
    (tmp_path / "shard-000000.tar").write_bytes(b"new")
    with pytest.raises(ConfigError, match="has 3 bytes"):
        verify_shard_files(str(tmp_path))
    (tmp_path / "shard-000000.tar").unlink()
    with pytest.raises(ConfigError, match="missing"):
        verify_shard_files(str(tmp_path))
