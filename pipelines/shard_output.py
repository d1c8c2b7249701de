"""What a shard output folder may already hold, and getting it ready for a run (under its lock).

A run's *identity* is what decides its output bytes: the input file's SHA-256, the image root,
``samples_per_shard``, ``max_image_pixels`` and the output format. It is stored in
``_progress/job.json`` before the first shard is written.

* An empty folder, or one whose ``job.json`` has the same identity (a rerun: resume), is used.
* A non-empty folder with another identity -- different input, or files that are not a shard
  output at all -- is refused with :class:`OutputNotEmptyError` unless ``overwrite``; with it,
  the previous run's files (shards, markers, manifest, quarantine) are deleted first. Other
  files in the folder are left alone.
* In every case ``manifest.json`` is deleted before anything else is written (and written again
  only at the very end), so a run that fails halfway never leaves a manifest describing shards
  that have changed under it.
"""

from __future__ import annotations

import json
from typing import Any

from mocha.io import storage
from mocha.io.layout import MANIFEST_NAME, PROGRESS_DIR, QUARANTINE_NAME, SHARD_JOB_NAME
from pipelines.output_lock import LOCK_NAME
from pipelines.tar_shards import is_shard_name

JOB_NAME = SHARD_JOB_NAME  # inside PROGRESS_DIR: the identity of the run that owns the folder


class OutputNotEmptyError(RuntimeError):
    """The output folder holds something else than a previous run of this same job."""


def job_url(output: str) -> str:
    return storage.join_url(output, PROGRESS_DIR, JOB_NAME)


def read_identity(output: str) -> dict[str, Any] | None:
    """The identity in ``_progress/job.json``, or else the one a finished manifest records."""
    try:
        value = json.loads(storage.read_bytes(job_url(output)))
        return value if isinstance(value, dict) else None
    except (FileNotFoundError, ValueError):
        pass
    try:
        m = json.loads(storage.read_bytes(storage.join_url(output, MANIFEST_NAME)))
        return {"format": m["format"], "input_sha256": m["input"]["sha256"], "images": m["images"],
                "samples_per_shard": m["samples_per_shard"], "max_image_pixels": m["max_image_pixels"]}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _own_files(output: str) -> list[str]:
    """URLs of files a shard run writes (shards, manifest, quarantine, markers, temporaries)."""
    names = {MANIFEST_NAME, QUARANTINE_NAME}
    top = [u for u in storage.list_files(output)
           if storage.basename(u) in names or is_shard_name(storage.basename(u)) or storage.is_temporary(storage.basename(u))]
    return top + storage.list_files(storage.join_url(output, PROGRESS_DIR))


def _describe_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if old is None:
        return "it holds files that are not the output of a `mocha data shard` run of this version"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "it holds a run with different " + ", ".join(
        f"{k} ({old.get(k)!r} there, {new.get(k)!r} now)" for k in changed)


def prepare_output(output: str, identity: dict[str, Any], overwrite: bool) -> bool:
    """Make ``output`` ready for a run of ``identity`` (the caller holds the output lock);
    returns whether an earlier run's files were deleted (``overwrite``)."""
    previous = read_identity(output)
    foreign = [u for u in storage.list_files(output) if storage.basename(u) != LOCK_NAME]
    occupied = bool(foreign) or bool(storage.list_files(storage.join_url(output, PROGRESS_DIR)))
    cleared = False
    if occupied and previous != identity:
        if not overwrite:
            raise OutputNotEmptyError(
                f"refusing to write into {output}: {_describe_difference(previous, identity)}. Choose an empty "
                f"output folder, or pass --overwrite to replace the earlier run's shards.")
        for url in _own_files(output):
            storage.delete(url)
        cleared = True
    storage.delete(storage.join_url(output, MANIFEST_NAME))  # invalidated first, written last
    storage.write_bytes(job_url(output), json.dumps(identity, sort_keys=True).encode())
    return cleared
