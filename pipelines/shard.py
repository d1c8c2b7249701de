"""LLaVA JSON + images -> WebDataset tar shards, a manifest and a quarantine, on Ray Data.

The job runs in three stages so that memory stays flat however large the input is:

1. **Records** (driver, streaming): the input is parsed one record at a time
   (:class:`~pipelines.records.InputReader`), each record is checked
   (:func:`~pipelines.validation.check_record`: structure, roles, ``<image>`` count, duplicate
   ids) and given its key; accepted records go to Ray's object store in blocks of
   ``chunk_records`` rows, so the driver holds one block at a time.
2. **Images** (Ray Data tasks): each record's image is read and inspected
   (:func:`~pipelines.validation.inspect_image`); only the verdict and the image's SHA-256 come
   back, in input order. The driver streams the verdicts, quarantines rejections and cuts the
   accepted samples into shard *plans* of exactly ``samples_per_shard`` samples (the last may be
   short): accepted sample ``i`` goes to shard ``i // samples_per_shard``.
3. **Shards** (Ray Data tasks, one per shard): each plan's images are read again, checked
   against the digest from stage 2 (an input that changes mid-build fails loudly), and written
   as a tar with fixed headers, published atomically, with a done-marker.

Output, all byte-identical for the same input: ``shard-NNNNNN.tar`` (members ``{key}.json``, the
record as given, original id included; ``{key}.jpg|png|gif|webp``, the original image bytes),
``quarantine.jsonl`` (one line per rejected record, input order) and ``manifest.json``
(written last). A rerun (after a crash or not) reuses every shard whose done-marker matches its
plan and whose bytes verify, and rebuilds the rest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import Field

from mocha.config import StrictModel
from mocha.io import storage
from pipelines.records import InputReader
from pipelines.tar_shards import (ShardInfo, completed_shard, finished_shards, remove_markers, remove_stale_shards,
                                  shard_name, write_marker,
                                  write_tar_shard)
from pipelines.validation import DEFAULT_MAX_PIXELS, Reason, Rejection, check_record, inspect_image, sample_key
from mocha.io.layout import MANIFEST_NAME, QUARANTINE_NAME

MANIFEST_FORMAT = "mocha-webdataset-shards/1"


class SequenceBudget(StrictModel):
    """What a training job will fit each sample into, so that the shard build can count the
    samples whose text ``max_length`` would cut (``--model-config``: a job or model YAML)."""

    tokenizer: str = Field(description="tokenizer folder or hub id (the job's tokenizer)")
    template: str = Field(description="conversation template of the job (plain, phi, vicuna_v1)")
    max_length: int = Field(gt=0, description="the job's model.max_length")
    num_image_tokens: int = Field(gt=0, description="visual tokens per image (sum over the encoders)")
    image_token_first: bool = Field(default=True, description="the job's model.image_token_first")

    @classmethod
    def of_model(cls, model, tokenizer: str | None = None) -> "SequenceBudget":
        """The budget of a :class:`~mocha.config.ModelConfig`: visual tokens from the encoder
        configs (no weights read); tokenizer from ``tokenizer``, else the LLM's."""
        from mocha.model.encoders import encoder_geometry

        path = tokenizer or model.llm.tokenizer or model.llm.pretrained
        if path is None:
            raise ValueError("the sequence budget needs a tokenizer: pass --tokenizer or set model.llm.tokenizer")
        return cls(tokenizer=path, template=model.template, max_length=model.max_length,
                   num_image_tokens=sum(encoder_geometry(e).num_tokens for e in model.encoders),
                   image_token_first=model.image_token_first)


class ShardJobConfig(StrictModel):
    """Options of ``mocha data shard``."""

    input: str = Field(description="LLaVA JSON list or JSON Lines file (local path or s3:// URL)")
    images: str = Field(description="folder the records' 'image' paths are relative to (local or s3://)")
    output: str = Field(description="output folder for shards, manifest and quarantine (local or s3://)")
    samples_per_shard: int = Field(default=1000, gt=0)
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="width*height above which an image is quarantined")
    batch_size: int = Field(default=64, gt=0, description="records per image-inspection batch")
    concurrency: int | None = Field(default=None, gt=0, description="max parallel Ray tasks per stage; None = Ray decides")
    chunk_records: int = Field(default=4096, gt=0, description="records per block the driver hands to Ray")
    sequence_budget: SequenceBudget | None = Field(
        default=None, description="count accepted samples that a training job's max_length would truncate")


class InputChangedError(RuntimeError):
    """An image's bytes changed between inspection and shard writing."""


@dataclass
class ShardReport:
    """What a run did: the manifest it wrote plus run statistics (not part of the manifest)."""

    manifest: dict[str, Any]
    seconds: float
    shards_written: int
    shards_reused: int
    stale_removed: list[str] = field(default_factory=list)

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


def _record_field(value: Any, name: str) -> Any:
    """A scalar field of a rejected record, for its quarantine line (None when unusable)."""
    raw = value.get(name) if isinstance(value, dict) else None
    return raw if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None


class _RecordBlock:
    """Columns of accepted records waiting to be handed to Ray as one block."""

    COLUMNS = ("index", "key", "id", "image", "record")

    def __init__(self) -> None:
        self.columns: dict[str, list] = {c: [] for c in self.COLUMNS}

    def __len__(self) -> int:
        return len(self.columns["index"])

    def append(self, **row: Any) -> None:
        for c in self.COLUMNS:
            self.columns[c].append(row[c])

    def table(self) -> pa.Table:
        return pa.table(self.columns)


def budget_report(manifest: dict[str, Any]) -> tuple[str, bool]:
    """The manifest's sequence-budget count as one line, and whether it is over the warning share."""
    from mocha.text.conversation import truncation_report

    budget = manifest["sequence_budget"]
    return truncation_report(budget["over_budget"], manifest["num_samples"], budget["max_length"],
                             f"sequence budget ({budget['num_image_tokens']} visual tokens, template {budget['template']})")


@functools.lru_cache(maxsize=2)
def _budget_tokenizer(path: str):
    from mocha.text.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _budget_status(record_json: str, image: str, budget: dict[str, Any]) -> str:
    """How a training job with ``budget`` would tokenise this record (``ok``, ``truncated``, ...)."""
    from mocha.text.conversation import tokenize_conversation

    record = json.loads(record_json)
    return tokenize_conversation(record["conversations"], _budget_tokenizer(budget["tokenizer"]), budget["template"],
                                 max_length=budget["max_length"], sample_id=str(record.get("id")),
                                 num_image_tokens=budget["num_image_tokens"] if image else 0,
                                 image_token_first=budget["image_token_first"]).status


def _inspect_images(batch: pa.Table, images: str, max_pixels: int, budget: dict[str, Any] | None = None) -> pa.Table:
    """Stage 2 (Ray task): add ``reason``, ``detail``, ``sha256``, ``ext`` to each record row, and
    ``budget_status`` (its tokenisation status under the sequence budget, empty without one)."""
    verdicts: dict[str, list[str]] = {"reason": [], "detail": [], "sha256": [], "ext": []}
    for image in batch.column("image").to_pylist():
        reason = detail = digest = ext = ""
        if image:
            try:
                data = storage.read_bytes(storage.join_url(images, image))
                ext = inspect_image(data, max_pixels).extension
                digest = hashlib.sha256(data).hexdigest()
            except FileNotFoundError:
                reason, detail = Reason.MISSING_IMAGE.value, f"no file {image!r} under the image root"
            except Rejection as r:
                reason, detail = r.reason.value, r.detail
        for name, value in zip(verdicts, (reason, detail, digest, ext)):
            verdicts[name].append(value)
    verdicts["budget_status"] = [_budget_status(record, image, budget) if budget else "" for record, image in
                                 zip(batch.column("record").to_pylist(), batch.column("image").to_pylist())]
    for name, values in verdicts.items():
        batch = batch.append_column(name, pa.array(values, pa.string()))
    return batch


def _write_shards(batch: pa.Table, images: str, output: str, finished: dict[str, ShardInfo]) -> pa.Table:
    """Stage 3 (Ray task): build (or verify and reuse) the shard of each plan row."""
    rows = []
    for shard_id, plan in zip(batch.column("shard_id").to_pylist(), batch.column("plan").to_pylist()):
        name = shard_name(shard_id)
        plan_sha256 = hashlib.sha256(plan).hexdigest()
        info = completed_shard(output, name, plan_sha256, finished)
        reused = info is not None
        if info is None:
            info = write_marker(output, _write_shard(storage.join_url(output, name), plan, images), plan_sha256)
        rows.append({**asdict(info), "reused": reused})
    return pa.Table.from_pylist(rows)


def _write_shard(url: str, plan: bytes, images: str) -> ShardInfo:
    with write_tar_shard(url) as shard:
        for line in plan.splitlines():
            item = json.loads(line)
            shard.add(f"{item['key']}.json", item["record"].encode())
            if item["image"]:
                image_url = storage.join_url(images, item["image"])
                data = storage.read_bytes(image_url)
                if hashlib.sha256(data).hexdigest() != item["sha256"]:
                    raise InputChangedError(f"{image_url} changed while the shards were being built; rerun the job")
                shard.add(f"{item['key']}.{item['ext']}", data)
    assert shard.info is not None
    return shard.info


class _ShardPlanner:
    """Cuts the ordered stream of accepted samples into shard plans of exactly ``size`` samples."""

    def __init__(self, size: int):
        import ray

        self._put = ray.put
        self.size = size
        self.lines: list[bytes] = []
        self.blocks: list = []  # ObjectRefs of one-row tables {shard_id, plan}
        self.samples = 0
        self.fingerprint = hashlib.sha256()

    def add(self, row: dict[str, Any]) -> None:
        item = {k: row[k] for k in ("key", "image", "sha256", "ext", "record")}
        self.lines.append(json.dumps(item, sort_keys=True, ensure_ascii=False).encode())
        self.fingerprint.update(f"{row['key']}\t{row['sha256']}\n".encode())
        self.samples += 1
        if len(self.lines) == self.size:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            plan = b"\n".join(self.lines)
            self.blocks.append(self._put(pa.table({"shard_id": [len(self.blocks)], "plan": [plan]})))
            self.lines = []


def _tasks(cfg: ShardJobConfig):
    import ray.data

    return ray.data.TaskPoolStrategy(size=cfg.concurrency)


def build_shards(cfg: ShardJobConfig, progress: bool = True) -> ShardReport:
    """Run the shard job (Ray must be initialized, see :func:`pipelines.ray_runtime.ensure_ray`)."""
    import ray
    from tqdm import tqdm

    from pipelines.ray_runtime import ordered_execution

    start = time.perf_counter()
    if cfg.sequence_budget is not None:  # a tokenizer/template that cannot work fails here, not in a Ray task
        probe = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]}
        try:
            _budget_status(json.dumps(probe), "", cfg.sequence_budget.model_dump())
        except (OSError, ValueError) as e:
            raise ValueError(f"sequence budget: cannot tokenise with {cfg.sequence_budget.tokenizer!r} and template "
                             f"{cfg.sequence_budget.template!r}: {e}") from None
    quarantine: list[dict[str, Any]] = []
    budget_statuses: Counter[str] = Counter()
    planner = _ShardPlanner(cfg.samples_per_shard)
    reader = InputReader(cfg.input)

    # Stage 1: stream and check records on the driver.
    record_blocks, block, seen_ids, num_records = [], _RecordBlock(), set(), 0
    with tqdm(desc="records", unit="rec", disable=not progress) as bar:
        for rec in reader:
            num_records += 1
            bar.update()
            if rec.error is not None:
                quarantine.append(_quarantine_entry(rec.index, None, rec.error.reason.value, rec.error.detail))
                continue
            try:
                checked = check_record(rec.value, seen_ids)
            except Rejection as r:
                quarantine.append(_quarantine_entry(rec.index, _record_field(rec.value, "id"), r.reason.value, r.detail,
                                                    _record_field(rec.value, "image")))
                continue
            block.append(index=rec.index, key=sample_key(rec.index, checked.sample_id), id=checked.sample_id,
                         image=checked.image or "", record=json.dumps(rec.value, ensure_ascii=False))
            if len(block) >= cfg.chunk_records:
                record_blocks.append(ray.put(block.table()))
                block = _RecordBlock()
    if len(block):
        record_blocks.append(ray.put(block.table()))
    candidates = num_records - len(quarantine)

    with ordered_execution():
        # Stage 2: inspect images in Ray tasks; plan shards from the ordered verdicts.
        if record_blocks:
            verdicts = ray.data.from_arrow_refs(record_blocks).map_batches(
                _inspect_images, batch_format="pyarrow", batch_size=cfg.batch_size, compute=_tasks(cfg),
                fn_kwargs={"images": cfg.images, "max_pixels": cfg.max_image_pixels,
                           "budget": cfg.sequence_budget.model_dump() if cfg.sequence_budget else None})
            with tqdm(total=candidates, desc="images", unit="img", disable=not progress) as bar:
                for batch in verdicts.iter_batches(batch_format="pyarrow", batch_size=None):
                    for row in batch.to_pylist():
                        if row["reason"]:
                            quarantine.append(_quarantine_entry(row["index"], row["id"], row["reason"], row["detail"],
                                                                row["image"]))
                        else:
                            planner.add(row)
                            budget_statuses[row["budget_status"]] += 1
                    bar.update(batch.num_rows)
            del verdicts, record_blocks
        planner.flush()

        # Stage 3: write (or reuse) every shard.
        shards: list[ShardInfo] = []
        reused = 0
        if planner.blocks:
            written = ray.data.from_arrow_refs(planner.blocks).map_batches(
                _write_shards, batch_format="pyarrow", batch_size=1, compute=_tasks(cfg),
                fn_kwargs={"images": cfg.images, "output": cfg.output, "finished": finished_shards(cfg.output)})
            with tqdm(total=len(planner.blocks), desc="shards", unit="shard", disable=not progress) as bar:
                for row in written.iter_rows():
                    shards.append(ShardInfo(name=row["name"], count=row["count"], size=row["size"], sha256=row["sha256"],
                                            plan_sha256=row["plan_sha256"]))
                    reused += bool(row["reused"])
                    bar.update()
    shards.sort(key=lambda s: s.name)
    if len(shards) != len(planner.blocks) or sum(s.count for s in shards) != planner.samples:
        raise RuntimeError(f"internal error: {len(shards)} shards for {len(planner.blocks)} plans")
    if planner.samples + len(quarantine) != num_records:
        raise RuntimeError(f"internal error: {planner.samples} accepted + {len(quarantine)} quarantined != {num_records} records")

    stale = remove_stale_shards(cfg.output, keep=len(shards))
    quarantine.sort(key=lambda q: q["index"])
    storage.write_bytes(storage.join_url(cfg.output, QUARANTINE_NAME),
                        b"".join(json.dumps(q, sort_keys=True, ensure_ascii=False).encode() + b"\n" for q in quarantine))
    manifest = _manifest(cfg, reader, planner, shards, quarantine, num_records)
    if cfg.sequence_budget is not None:
        from mocha.text.conversation import OVER_BUDGET_STATUSES

        manifest["sequence_budget"] = {
            **cfg.sequence_budget.model_dump(), "statuses": dict(sorted(budget_statuses.items())),
            "over_budget": sum(n for status, n in budget_statuses.items() if status in OVER_BUDGET_STATUSES)}
        line, warn = budget_report(manifest)
        if warn:
            print(line, file=sys.stderr, flush=True)
    storage.write_bytes(storage.join_url(cfg.output, MANIFEST_NAME),
                        json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    remove_markers(cfg.output)  # the manifest now records every shard and its plan
    return ShardReport(manifest=manifest, seconds=time.perf_counter() - start, shards_written=len(shards) - reused,
                       shards_reused=reused, stale_removed=stale)


def _manifest(cfg: ShardJobConfig, reader: InputReader, planner: _ShardPlanner, shards: list[ShardInfo],
              quarantine: list[dict[str, Any]], num_records: int) -> dict[str, Any]:
    """The manifest. ``fingerprint`` covers the input file's bytes and, in order, every
    accepted sample's key and image SHA-256: equal fingerprints mean equal inputs."""
    fingerprint = hashlib.sha256(f"{reader.sha256}\n".encode() + planner.fingerprint.digest()).hexdigest()
    reasons = Counter(q["reason"] for q in quarantine)
    return {
        "format": MANIFEST_FORMAT,
        "input": {"url": cfg.input, "sha256": reader.sha256, "bytes": reader.nbytes},
        "images": cfg.images,
        "fingerprint": fingerprint,
        "samples_per_shard": cfg.samples_per_shard,
        "max_image_pixels": cfg.max_image_pixels,
        "num_input_records": num_records,
        "num_samples": planner.samples,
        "num_quarantined": len(quarantine),
        "num_shards": len(shards),
        "total_bytes": sum(s.size for s in shards),
        "quarantine": dict(sorted(reasons.items())),
        "shards": [asdict(s) for s in shards],
    }


def load_manifest(output: str) -> dict[str, Any]:
    """Read a shard set's ``manifest.json``; raises naming the URL when it is missing."""
    url = storage.join_url(output, MANIFEST_NAME)
    if not storage.exists(url):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {output}: is it a finished `mocha data shard` output?")
    return json.loads(storage.read_bytes(url))
