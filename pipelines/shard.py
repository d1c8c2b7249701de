"""LLaVA JSON + images -> WebDataset tar shards, a manifest and a quarantine, in one pass on Ray.

The driver streams the input (:class:`~pipelines.records.InputReader`, one record at a time),
cuts it into *chunks* of ``samples_per_shard`` consecutive records and hands each chunk to a Ray
task (:func:`pipelines.shard_task.build_shard`, the chunk sent as one JSON document) that checks every record and image and writes
the accepted samples straight into shard ``shard-NNNNNN.tar`` (chunk ``N``): each image is
read, checked and written once. At most ``concurrency`` tasks are in flight (default: the
cluster's CPUs), so driver and object-store memory stay flat however large the input is.

Shard ``N`` holds the accepted samples of chunk ``N``, so a shard holds *at most*
``samples_per_shard`` samples (fewer where records were quarantined; an all-rejected chunk has
no shard). Which records form a chunk depends only on the input, so the output is
byte-identical for the same input on any cluster.

Duplicate ids: the first *good* copy of an id wins. The first copy of each id goes into the
chunks; later copies wait on the driver. When the pass is done, copies of an id whose earlier
copy was accepted are quarantined as ``duplicate_id``; for an id whose copy was rejected the
next copy is tried, in extra chunks numbered after the main ones, until every id is settled.

Output, all byte-identical for the same input: ``shard-NNNNNN.tar`` (members ``{key}.json``, the
record as given, original id included; ``{key}.jpg|png|gif|webp``, the original image bytes),
``quarantine.jsonl`` (one line per rejected record, input order) and ``manifest.json``. The
output folder is locked for the run (:mod:`pipelines.output_lock`), checked against the run's
identity and the old manifest removed before any shard is written
(:mod:`pipelines.shard_output`); the manifest is written last. A rerun of the same job (after
a crash or not) reuses every shard whose done-marker and bytes verify and rebuilds the rest.

With ``sequence_budget`` (``--model-config JOB.yaml``) the tasks also count the accepted samples
that job's ``model.max_length`` would cut (:mod:`pipelines.sequence_budget`); the manifest's
``sequence_budget`` holds the counts, and the run warns when more than 1% are over.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field

from mocha.config import StrictModel
from mocha.io import storage
from pipelines.output_lock import DEFAULT_SETTLE_S, DEFAULT_TTL_S, OutputLock
from pipelines.records import InputReader
from pipelines.sequence_budget import SequenceBudget, budget_report, manifest_entry
from mocha.io.layout import MANIFEST_NAME, PROGRESS_DIR, QUARANTINE_NAME
from pipelines.shard_output import prepare_output, read_identity
from pipelines.shard_task import FinishedShard, ShardResult, Verdict, build_shard_from_json, encode_rows
from pipelines.tar_shards import ShardInfo, marker_url, remove_markers, remove_stale_shards, sha256_of, shard_name
from pipelines.validation import DEFAULT_MAX_PIXELS, Reason

MANIFEST_FORMAT = "mocha-webdataset-shards/2"

__all__ = ["MANIFEST_NAME", "QUARANTINE_NAME", "MANIFEST_FORMAT", "ShardJobConfig", "ShardReport", "NoSamplesError",
           "SequenceBudget", "build_shards", "load_manifest"]


class ShardJobConfig(StrictModel):
    """Options of ``mocha data shard``."""

    input: str = Field(description="LLaVA JSON list or JSON Lines file (local path or s3:// URL)")
    images: str = Field(description="folder the records' 'image' paths are relative to (local or s3://)")
    output: str = Field(description="output folder for shards, manifest and quarantine (local or s3://)")
    samples_per_shard: int = Field(default=1000, gt=0, description="input records per chunk = most samples per shard")
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="width*height above which an image is quarantined")
    concurrency: int | None = Field(default=None, gt=0, description="shard tasks in flight; None = 2x the cluster's CPUs")
    overwrite: bool = Field(default=False, description="replace an earlier run with different input in the output")
    lock_ttl_s: float = Field(default=DEFAULT_TTL_S, gt=0, description="output lease goes stale after this long unrenewed")
    lock_settle_s: float = Field(default=DEFAULT_SETTLE_S, ge=0, description="wait before reading the lease back")
    sequence_budget: SequenceBudget | None = Field(
        default=None, description="count accepted samples that a training job's max_length would truncate")


class NoSamplesError(RuntimeError):
    """The input had no records, or none was accepted; the message has the counts."""


@dataclass
class ShardReport:
    """What a run did: the manifest it wrote plus run statistics (not part of the manifest)."""

    manifest: dict[str, Any]
    seconds: float
    shards_written: int
    shards_reused: int
    stale_removed: list[str] = field(default_factory=list)
    overwrote: bool = False

    def summary(self) -> str:
        m = self.manifest
        rate = m["num_input_records"] / self.seconds if self.seconds > 0 else float("inf")
        lines = [
            f"{m['num_samples']} samples in {m['num_shards']} shards ({self.shards_written} written, "
            f"{self.shards_reused} reused), {m['total_bytes']} bytes",
            f"{m['num_quarantined']} quarantined of {m['num_input_records']} input records",
        ]
        lines += [f"  {reason}: {count}" for reason, count in m["quarantine"].items()]
        if "sequence_budget" in m:
            lines.append(budget_report(m)[0])
        lines.append(f"{self.seconds:.1f} s, {rate:.1f} records/s")
        return "\n".join(lines)


def _quarantine_entry(index: int, sample_id: Any, reason: str, detail: str, image: str | None = None) -> dict[str, Any]:
    return {"index": index, "id": sample_id, "reason": reason, "detail": detail, "image": image}


def _claimable_id(value: Any) -> str | None:
    """The id a record claims (as check_record will read it), or None when it has no usable id
    (such a record is rejected by its task and claims nothing)."""
    raw = value.get("id") if isinstance(value, dict) else None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or str(raw).strip() == "":
        return None
    return str(raw)


_PENDING, _FAILED = -1, -2  # id claim states; a claim >= 0 is the input index of the accepted copy


class _Build:
    """Driver state of one run: chunks in flight, id claims, quarantine, finished shards."""

    def __init__(self, cfg: ShardJobConfig, lock: OutputLock, bar,
                 finished: tuple[dict[str, dict], dict[int, dict]] | None = None):
        import ray

        self.ray, self.cfg, self.lock, self.bar = ray, cfg, lock, bar
        self.task = ray.remote(build_shard_from_json).options(num_cpus=1)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # Two chunks per CPU in flight: a finished task's CPU gets the next chunk at once.
        self.window = cfg.concurrency or 2 * max(1, cpus)
        self.in_flight: dict[Any, int] = {}  # ObjectRef -> shard id
        self.next_shard = 0
        self.chunk: list[tuple[int, Any]] = []
        self.claims: dict[str, int] = {}
        self.deferred: list[tuple[int, Any, str]] = []  # later copies of claimed ids, input order
        self.quarantine: list[dict[str, Any]] = []
        self.results: dict[int, ShardResult] = {}
        self.finished = finished  # (manifest shards by name, quarantine by index) of a finished same job
        self.budget = cfg.sequence_budget.model_dump() if cfg.sequence_budget is not None else None

    # -- main pass ------------------------------------------------------------------------------
    def add(self, index: int, value: Any) -> None:
        sample_id = _claimable_id(value)
        if sample_id is not None:
            if sample_id in self.claims:
                self.deferred.append((index, value, sample_id))
                return
            self.claims[sample_id] = _PENDING
        self.chunk.append((index, value))
        if len(self.chunk) == self.cfg.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.chunk:
            return
        while len(self.in_flight) >= self.window:
            self._collect()
        hint = None
        if self.finished is not None:
            shards, rejected = self.finished
            hint = FinishedShard(shard=shards.get(shard_name(self.next_shard)),
                                 rejected={i: rejected[i] for i, _ in self.chunk if i in rejected})
        ref = self.task.remote(self.next_shard, encode_rows(self.chunk), self.cfg.images, self.cfg.output, self.cfg.max_image_pixels,
                               hint, self.budget)
        self.in_flight[ref] = self.next_shard
        self.next_shard += 1
        self.chunk = []

    def _collect(self) -> None:
        """Wait for the next finished task and take in its verdicts."""
        ready, _ = self.ray.wait(list(self.in_flight), num_returns=1)
        for ref in ready:
            self.in_flight.pop(ref)
            self._record(self.ray.get(ref))
        self.lock.check()

    def _record(self, result: ShardResult) -> None:
        self.results[result.shard_id] = result
        for v in result.verdicts:
            if v.reason:
                self.quarantine.append(_quarantine_entry(v.index, v.id, v.reason, v.detail, v.image))
                if v.id is not None and self.claims.get(v.id) == _PENDING:
                    self.claims[v.id] = _FAILED
            elif v.id is not None:
                self.claims[v.id] = v.index
        self.bar.set_postfix(shards=len(self.results), quarantined=len(self.quarantine), refresh=False)

    def abort(self) -> None:
        """Stop this run's tasks (on an error) so none writes after the lock is released."""
        refs = list(self.in_flight)
        for ref in refs:
            self.ray.cancel(ref, force=True)
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=60)
        self.in_flight.clear()

    def drain(self) -> None:
        self.flush()
        while self.in_flight:
            self._collect()

    # -- duplicates: the first good copy wins -------------------------------------------------------
    def settle_duplicates(self) -> None:
        """Quarantine later copies of accepted ids; try the next copy of ids whose copy failed."""
        while self.deferred:
            waiting, trying = [], set()
            for index, value, sample_id in self.deferred:
                claim = self.claims[sample_id]
                if claim >= 0:
                    self.quarantine.append(_quarantine_entry(
                        index, sample_id, Reason.DUPLICATE_ID.value,
                        f"id {sample_id!r} already accepted from input record {claim}", _image_field(value)))
                elif claim == _FAILED and sample_id not in trying:
                    trying.add(sample_id)
                    self.claims[sample_id] = _PENDING
                    self.chunk.append((index, value))
                    if len(self.chunk) == self.cfg.samples_per_shard:
                        self.flush()
                else:
                    waiting.append((index, value, sample_id))
            self.drain()
            self.deferred = waiting


def _image_field(value: Any) -> str | None:
    image = value.get("image") if isinstance(value, dict) else None
    return image if isinstance(image, str) else None


def _finished_build(output: str) -> tuple[dict[str, dict], dict[int, dict]] | None:
    """The shards and quarantine lines of a finished build in ``output`` (read before its
    manifest is removed), so that a rerun reuses its shards although its markers are gone."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join_url(output, MANIFEST_NAME)))
        lines = storage.read_bytes(storage.join_url(output, QUARANTINE_NAME)).splitlines()
        rejected = {int(q["index"]): q for q in map(json.loads, lines) if q.get("index") is not None}
        return {s["name"]: s for s in manifest["shards"]}, rejected
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _identity(cfg: ShardJobConfig, input_sha256: str) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "input_sha256": input_sha256, "images": cfg.images,
            "samples_per_shard": cfg.samples_per_shard, "max_image_pixels": cfg.max_image_pixels}


def build_shards(cfg: ShardJobConfig, progress: bool = True) -> ShardReport:
    """Run the shard job (Ray must be initialized, see :func:`pipelines.ray_runtime.ensure_ray`).

    Raises :class:`~pipelines.output_lock.OutputLockedError` when another run holds the output,
    :class:`~pipelines.shard_output.OutputNotEmptyError` when the output holds something else
    (without ``overwrite``), :class:`~pipelines.records.InputFormatError` for an unusable input
    file and :class:`NoSamplesError` (after writing ``quarantine.jsonl``) when nothing was accepted.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    if not storage.exists(cfg.input):
        raise FileNotFoundError(f"input file not found: {cfg.input}")
    if cfg.sequence_budget is not None:  # a tokenizer/template that cannot work fails here, not in a Ray task
        cfg.sequence_budget.check()
    input_sha256 = sha256_of(cfg.input)
    with OutputLock(cfg.output, ttl_s=cfg.lock_ttl_s, settle_s=cfg.lock_settle_s) as lock:
        identity = _identity(cfg, input_sha256)
        finished = _finished_build(cfg.output) if read_identity(cfg.output) == identity else None
        overwrote = prepare_output(cfg.output, identity, cfg.overwrite)
        reader = InputReader(cfg.input)
        num_records = 0
        with tqdm(desc="records", unit="rec", disable=not progress) as bar:
            build = _Build(cfg, lock, bar, finished)
            try:
                for rec in reader:
                    num_records += 1
                    bar.update()
                    if rec.error is not None:
                        build.quarantine.append(_quarantine_entry(rec.index, None, rec.error.reason.value,
                                                                  rec.error.detail))
                    else:
                        build.add(rec.index, rec.value)
                build.drain()
                build.settle_duplicates()
            except BaseException:
                build.abort()
                raise
        if reader.sha256 != input_sha256:
            raise RuntimeError(f"{cfg.input} changed while it was being read; rerun the job")
        return _finish(cfg, build, reader, num_records, lock, start, overwrote)


def _finish(cfg: ShardJobConfig, build: _Build, reader: InputReader, num_records: int, lock: OutputLock,
            start: float, overwrote: bool) -> ShardReport:
    results = [build.results[i] for i in sorted(build.results)]
    shards = [ShardInfo(**r.shard) for r in results if r.shard is not None]
    accepted = [v for r in results for v in r.verdicts if not v.reason]
    quarantine = sorted(build.quarantine, key=lambda q: q["index"])
    if len(accepted) + len(quarantine) != num_records or sum(s.count for s in shards) != len(accepted):
        raise RuntimeError(f"internal error: {len(accepted)} accepted + {len(quarantine)} quarantined "
                           f"!= {num_records} input records")
    lock.check()
    stale = remove_stale_shards(cfg.output, keep={s.name for s in shards})
    for url in storage.list_files(storage.join_url(cfg.output, PROGRESS_DIR), suffix=".tar.json"):
        name = storage.basename(url)[:-len(".json")]
        stem = name[len("shard-"):-len(".tar")]
        if stem.isdigit() and int(stem) >= build.next_shard:  # markers of chunks this input no longer has
            storage.delete(marker_url(cfg.output, name))
    storage.write_bytes(storage.join_url(cfg.output, QUARANTINE_NAME),
                        b"".join(json.dumps(q, sort_keys=True, ensure_ascii=False).encode() + b"\n" for q in quarantine))
    reasons = dict(sorted(Counter(q["reason"] for q in quarantine).items()))
    if not accepted:
        what = "the input has no records" if num_records == 0 else f"none of the {num_records} input records was accepted"
        counts = ", ".join(f"{r}: {n}" for r, n in reasons.items())
        raise NoSamplesError(f"{what} (0 accepted, {len(quarantine)} quarantined{': ' + counts if counts else ''}); "
                             f"see {storage.join_url(cfg.output, QUARANTINE_NAME)}. No manifest was written.")
    manifest = _manifest(cfg, reader, accepted, shards, quarantine, reasons, num_records)
    if cfg.sequence_budget is not None:
        statuses = sum((Counter(r.budget_statuses) for r in results), Counter())
        if sum(statuses.values()) != len(accepted):
            raise RuntimeError(f"internal error: {sum(statuses.values())} samples counted against the sequence "
                               f"budget != {len(accepted)} accepted")
        manifest["sequence_budget"] = manifest_entry(cfg.sequence_budget, statuses)
        line, warn = budget_report(manifest)
        if warn:
            print(line, file=sys.stderr, flush=True)
    lock.check()
    storage.write_bytes(storage.join_url(cfg.output, MANIFEST_NAME),
                        json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    remove_markers(cfg.output)  # the manifest and quarantine now record every shard and verdict
    reused = sum(r.reused and r.shard is not None for r in results)
    return ShardReport(manifest=manifest, seconds=time.perf_counter() - start, shards_written=len(shards) - reused,
                       shards_reused=reused, stale_removed=stale, overwrote=overwrote)


def _manifest(cfg: ShardJobConfig, reader: InputReader, accepted: list[Verdict], shards: list[ShardInfo],
              quarantine: list[dict[str, Any]], reasons: dict[str, int], num_records: int) -> dict[str, Any]:
    """The manifest. ``fingerprint`` covers the input file's bytes and, in shard order, every
    accepted sample's key and image SHA-256: equal fingerprints mean equal inputs."""
    digest = hashlib.sha256(f"{reader.sha256}\n".encode())
    for v in accepted:
        digest.update(f"{v.key}\t{v.sha256}\n".encode())
    return {
        "format": MANIFEST_FORMAT,
        "input": {"url": cfg.input, "sha256": reader.sha256, "bytes": reader.nbytes},
        "images": cfg.images,
        "fingerprint": digest.hexdigest(),
        "samples_per_shard": cfg.samples_per_shard,
        "max_image_pixels": cfg.max_image_pixels,
        "num_input_records": num_records,
        "num_samples": len(accepted),
        "num_quarantined": len(quarantine),
        "num_shards": len(shards),
        "total_bytes": sum(s.size for s in shards),
        "quarantine": reasons,
        "shards": [asdict(s) for s in shards],
    }


def load_manifest(output: str) -> dict[str, Any]:
    """Read a shard set's ``manifest.json``; raises naming the URL when it is missing."""
    url = storage.join_url(output, MANIFEST_NAME)
    if not storage.exists(url):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {output}: is it a finished `mocha data shard` output?")
    return json.loads(storage.read_bytes(url))
