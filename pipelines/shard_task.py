"""One shard of ``mocha data shard``, built in one pass by one Ray task.

A task gets a *chunk*: up to ``samples_per_shard`` consecutive input records ``(input index,
parsed record)``. For each record it runs every check (:func:`~pipelines.validation.check_record`,
:func:`~pipelines.validation.read_image` under the image root,
:func:`~pipelines.validation.inspect_image`) and appends an accepted sample to the shard's tar
right away: each image is read once, checked and written from the same bytes, so nothing can
change between the check and the write. The tar is published atomically; then a done-marker
``_progress/<shard>.json`` records the shard's size and SHA-256, the digest of the chunk
(*plan*) and every record's verdict. A shard whose records were all rejected publishes no tar.

A rerun reuses a shard when its marker's plan digest matches, the tar still has the recorded
size and SHA-256, every accepted image still has the recorded SHA-256 and every rejected record
is rejected again for the same reason; anything else is rebuilt.

With a sequence budget (``mocha data shard --model-config``), the task also tokenises each
accepted record as that training job will and returns the status counts
(:mod:`pipelines.sequence_budget`); they are computed on every run, reused shard or not, and are
not part of the shard or its marker.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from collections.abc import Iterator
from typing import Any

from mocha.io import storage
from mocha.io.storage import RootReader
from pipelines.sequence_budget import budget_status
from pipelines.tar_shards import ShardInfo, iter_tar_members, marker_url, sha256_of, shard_name, write_tar_shard
from pipelines.validation import Rejection, check_record, inspect_image, read_image, sample_key

MARKER_VERSION = 2


@dataclass
class Verdict:
    """What became of one input record inside a shard task."""

    index: int
    id: str | None
    image: str | None
    reason: str = ""  # empty: accepted
    detail: str = ""
    key: str = ""
    sha256: str = ""  # of the image bytes, for an accepted image sample


@dataclass
class ShardResult:
    """A task's answer to the driver (and what its done-marker stores)."""

    shard_id: int
    shard: dict[str, Any] | None  # ShardInfo fields, or None when every record was rejected
    verdicts: list[Verdict] = field(default_factory=list)
    reused: bool = False
    budget_statuses: dict[str, int] = field(default_factory=dict)  # accepted samples by status; empty without a budget


def _scalar(value: Any, name: str) -> Any:
    raw = value.get(name) if isinstance(value, dict) else None
    return raw if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None


def plan_digest(rows: list[tuple[int, Any]], max_pixels: int) -> str:
    """Digest of a chunk: its records and the pixel limit. The image root is not in it (the same
    data read from a local copy or from S3 gives the same plan); reuse re-reads the images."""
    payload = json.dumps({"max_pixels": max_pixels, "rows": rows}, sort_keys=True,
                         ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def record_bytes(value: Any) -> bytes:
    """The ``{key}.json`` member: the record as given (original id included)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _check(index: int, value: Any, images: RootReader, max_pixels: int) -> tuple[Verdict, str, bytes | None]:
    """(verdict, image extension, image bytes) of one record; bytes only when accepted."""
    sample_id, image = _scalar(value, "id"), _scalar(value, "image")
    verdict = Verdict(index=index, id=None if sample_id is None else str(sample_id),
                      image=image if isinstance(image, str) else None)
    try:
        checked = check_record(value)
        verdict.key = sample_key(index, checked.sample_id)
        if checked.image is None:
            return verdict, "", None
        data = read_image(images, checked.image)
        ext = inspect_image(data, max_pixels).extension
        verdict.sha256 = hashlib.sha256(data).hexdigest()
        return verdict, ext, data
    except Rejection as r:
        verdict.reason, verdict.detail, verdict.key = r.reason.value, r.detail, ""
        return verdict, "", None


def _reusable(output: str, name: str, plan_sha256: str, rows: list[tuple[int, Any]], images: RootReader,
              max_pixels: int) -> ShardResult | None:
    url = marker_url(output, name)
    try:
        marker = json.loads(storage.read_bytes(url))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("version") != MARKER_VERSION or marker.get("plan_sha256") != plan_sha256:
        return None
    try:
        verdicts = [Verdict(**v) for v in marker["verdicts"]]
        shard = marker["shard"]
    except (KeyError, TypeError):
        return None
    if len(verdicts) != len(rows):
        return None
    shard_url = storage.join_url(output, name)
    if shard is not None and (storage.file_size(shard_url) != shard["size"] or sha256_of(shard_url) != shard["sha256"]):
        return None
    images.read_ahead(_image_fields(rows))
    for verdict, (index, value) in zip(verdicts, rows):
        if verdict.reason:  # still rejected for the same reason?
            again, _, _ = _check(index, value, images, max_pixels)
            if again.reason != verdict.reason:
                return None
        elif verdict.sha256:  # the accepted image is still the same bytes?
            try:
                data = read_image(images, verdict.image or "")
            except Rejection:
                return None
            if hashlib.sha256(data).hexdigest() != verdict.sha256:
                return None
    return ShardResult(shard_id=int(marker["shard_id"]), shard=shard, verdicts=verdicts, reused=True)


@dataclass
class FinishedShard:
    """What a finished earlier build of the same job recorded about one chunk: its manifest
    entry (None when it had no shard) and its rows' quarantine lines by input index."""

    shard: dict[str, Any] | None
    rejected: dict[int, dict[str, Any]]


def _reusable_from_manifest(output: str, shard_id: int, plan_sha256: str, rows: list[tuple[int, Any]],
                            reader: RootReader, max_pixels: int, finished: FinishedShard) -> ShardResult | None:
    """Reuse a shard of a finished build (whose markers are gone): the manifest entry names
    this plan, the tar has its recorded size and SHA-256, every record the earlier build
    quarantined is rejected again for the same reason, and every other record is in the tar
    with the same json bytes and the image bytes now under the root."""
    shard = finished.shard
    if shard is None or shard.get("plan_sha256") != plan_sha256:
        return None
    url = storage.join_url(output, shard_name(shard_id))
    if storage.file_size(url) != shard["size"] or sha256_of(url) != shard["sha256"]:
        return None
    members = {name: hashlib.sha256(data).hexdigest() for name, data in iter_tar_members(url)}
    reader.read_ahead(_image_fields(rows))
    verdicts = []
    for index, value in rows:
        verdict, _, data = _check_cheaply(index, value, reader, max_pixels, index in finished.rejected)
        if verdict is None:
            return None
        if index in finished.rejected:
            if verdict.reason != finished.rejected[index]["reason"]:
                return None
        elif verdict.reason or members.get(f"{verdict.key}.json") != hashlib.sha256(record_bytes(value)).hexdigest():
            return None
        elif data is not None:
            image = [n for n in members if n.startswith(f"{verdict.key}.") and n != f"{verdict.key}.json"]
            if len(image) != 1 or members[image[0]] != verdict.sha256:
                return None
        verdicts.append(verdict)
    if sum(not v.reason for v in verdicts) != shard["count"]:
        return None
    return ShardResult(shard_id=shard_id, shard=shard, verdicts=verdicts, reused=True)


def _check_cheaply(index: int, value: Any, reader: RootReader, max_pixels: int,
                   full: bool) -> tuple[Verdict | None, str, bytes | None]:
    """A rejected record is checked fully again; an accepted one only for its record and the
    image's bytes (the tar already holds what was decoded then)."""
    if full:
        return _check(index, value, reader, max_pixels)
    try:
        checked = check_record(value)
    except Rejection:
        return None, "", None
    verdict = Verdict(index=index, id=checked.sample_id, image=checked.image, key=sample_key(index, checked.sample_id))
    if checked.image is None:
        return verdict, "", None
    try:
        data = read_image(reader, checked.image)
    except Rejection:
        return None, "", None
    verdict.sha256 = hashlib.sha256(data).hexdigest()
    return verdict, "", data


def encode_rows(rows: list[tuple[int, Any]]) -> bytes:
    """A chunk as the driver sends it to its task: one JSON document. Ray passes bytes without
    walking them (a list of parsed records costs the driver ~10x more to serialize), and the
    records came from JSON, so they come back equal (NaN, lone surrogates and key order too)."""
    return json.dumps(rows).encode("ascii")


def build_shard_from_json(shard_id: int, rows_json: bytes, *args: Any) -> ShardResult:
    """The Ray task: :func:`build_shard` on a chunk encoded by :func:`encode_rows`."""
    return build_shard(shard_id, [(index, value) for index, value in json.loads(rows_json)], *args)


def build_shard(shard_id: int, rows: list[tuple[int, Any]], images: str, output: str, max_pixels: int,
                finished: FinishedShard | None = None, budget: dict[str, Any] | None = None) -> ShardResult:
    """Check ``rows`` and write (or verify and reuse) shard ``shard_id`` (runs as a Ray task).
    ``finished``: what the finished build in ``output`` (same job) recorded for this chunk;
    ``budget``: a :class:`~pipelines.sequence_budget.SequenceBudget` dump to count accepted
    samples against (``ShardResult.budget_statuses``)."""
    result = _build_or_reuse(shard_id, rows, images, output, max_pixels, finished)
    if budget is not None:
        result.budget_statuses = dict(Counter(
            budget_status(value, bool(value.get("image")), budget)
            for verdict, (_, value) in zip(result.verdicts, rows, strict=True) if not verdict.reason))
    return result


def _build_or_reuse(shard_id: int, rows: list[tuple[int, Any]], images: str, output: str, max_pixels: int,
                    finished: FinishedShard | None) -> ShardResult:
    name = shard_name(shard_id)
    plan_sha256 = plan_digest(rows, max_pixels)
    # One reader per task: folder real paths are cached for this chunk only; on S3 it reads the
    # chunk's images ahead (the paths records name; a record rejected first is skipped).
    with RootReader(images) as reader:
        reused = _reusable(output, name, plan_sha256, rows, reader, max_pixels)
        if reused is None and finished is not None:
            reused = _reusable_from_manifest(output, shard_id, plan_sha256, rows, reader, max_pixels, finished)
        if reused is not None and reused.shard_id == shard_id:
            return reused
        reader.read_ahead(_image_fields(rows))
        return _write_shard(shard_id, name, plan_sha256, rows, reader, output, max_pixels)


def _image_fields(rows: list[tuple[int, Any]]) -> Iterator[str]:
    for _, value in rows:
        if isinstance(image := _scalar(value, "image"), str):
            yield image


def _write_shard(shard_id: int, name: str, plan_sha256: str, rows: list[tuple[int, Any]], reader: RootReader,
                 output: str, max_pixels: int) -> ShardResult:
    url = storage.join_url(output, name)
    verdicts: list[Verdict] = []
    with write_tar_shard(url) as tar:
        for index, value in rows:
            verdict, ext, data = _check(index, value, reader, max_pixels)
            verdicts.append(verdict)
            if verdict.reason:
                continue
            members = [(f"{verdict.key}.json", record_bytes(value))]
            if data is not None:
                members.append((f"{verdict.key}.{ext}", data))
            tar.add_members(members)
    info: ShardInfo | None = tar.info
    if info is not None and info.count == 0:
        storage.delete(url)  # an all-rejected chunk publishes no (empty) shard
        info = None
    # The manifest lists each shard's plan digest too (what mocha.io.layout documents).
    shard = None if info is None else asdict(replace(info, plan_sha256=plan_sha256))
    result = ShardResult(shard_id=shard_id, shard=shard, verdicts=verdicts)
    marker = {"version": MARKER_VERSION, "plan_sha256": plan_sha256, "shard_id": shard_id, "shard": result.shard,
              "verdicts": [vars(v) for v in verdicts]}
    storage.write_bytes(marker_url(output, name), json.dumps(marker, sort_keys=True, ensure_ascii=False).encode())
    return result
