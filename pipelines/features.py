"""Frozen-encoder features for a shard set, precomputed with a Ray Data actor pool.

``mocha data features`` reads a finished shard set (its ``manifest.json``) and writes one
feature shard per input shard, same name, same samples in the same order
(``shard-000000.tar`` -> ``features/shard-000000.tar``). A feature shard carries, per sample,
the conversation record ``{key}.json`` (copied) and for image samples one
``{key}.{encoder}.npy`` per encoder, ``[num_tokens, hidden_size]`` in the declared dtype, so
training from features reads the feature shards alone.

Each actor of the pool builds the encoders once (on its GPU when the cluster has GPUs) and
encodes whole shards, ``batch_size`` images per forward pass. An image goes through exactly what
the model does online: ``pipelines.validation.open_rgb`` (``mocha.images.decode_rgb``: the RGB a
viewer shows), the shared pad to a square (``ModelConfig.pad_to_square``, ``MochaModel.preprocess``),
the encoder's ``preprocess``, its
``forward`` in the model's dtype; the stored array is that output cast to the declared dtype.
With ``float32`` it is bit-identical to the in-process encoder on the same batch (convolution
kernels may round differently for a different batch size, so "the same batch" matters).

The encoders are reproducible by construction: ``pretrained`` ones load fixed weights and
random-weight ones are built from ``EncoderConfig.init_seed`` (part of the config hash). Actors
build every encoder on the CPU and then move it to their GPU, so the weights are the ones any
CPU process (a trainer, an export) builds from the same config.

``manifest.json`` (written last) records the encoders (kind, checkpoint, image size, shape),
the dtype, ``ModelConfig.encoder_config_hash()`` and every shard's count, size and SHA-256.
Training loads it with :meth:`FeatureManifest.load` and calls :meth:`FeatureManifest.check_compatible`,
which refuses features made for another encoder config. Resuming works as for the shard job:
a shard whose done-marker matches its plan and whose bytes verify is not recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from mocha.config import EncoderConfig, ModelConfig, StrictModel
from mocha.io import storage
from mocha.io.layout import MANIFEST_NAME
from pipelines.shard import load_manifest
from pipelines.tar_shards import (ShardInfo, completed_shard, finished_shards, iter_tar_samples, remove_markers,
                                  remove_stale_shards, write_marker, write_tar_shard)
from pipelines.validation import image_member, open_rgb

FEATURES_FORMAT = "mocha-feature-shards/1"
FeatureDtype = Literal["float32", "float16"]


class FeatureJobConfig(StrictModel):
    """Options of ``mocha data features``."""

    shards: str = Field(description="a finished shard set (folder with manifest.json), local or s3://")
    output: str | None = Field(default=None, description="feature shard folder; default <shards>/features")
    model: ModelConfig = Field(description="the model whose encoders compute the features")
    dtype: FeatureDtype | None = Field(default=None, description="stored dtype; default float16 with GPUs, else float32")
    batch_size: int = Field(default=32, gt=0, description="images per encoder forward pass")
    concurrency: int = Field(default=1, gt=0, description="actors in the pool (each holds all encoders)")
    gpus_per_actor: float | None = Field(default=None, ge=0, description="default: 1 when the cluster has GPUs, else 0")

    @property
    def output_url(self) -> str:
        return self.output or storage.join_url(self.shards, "features")


class FeatureMismatchError(ValueError):
    """Feature shards were computed for a different encoder configuration than the model's."""


@dataclass(frozen=True)
class EncoderFeatureInfo:
    kind: str
    checkpoint: str
    image_size: int
    num_tokens: int
    hidden_size: int


class StaleFeaturesError(ValueError):
    """Feature shards were computed from another shard set than the one being trained on."""


@dataclass(frozen=True)
class FeatureManifest:
    """The manifest of a feature shard set (``<features>/manifest.json``)."""

    url: str
    config_hash: str
    dtype: str
    encoders: list[EncoderFeatureInfo]
    shards: list[ShardInfo]
    source: dict[str, Any]

    @classmethod
    def load(cls, url: str) -> "FeatureManifest":
        """Read ``<url>/manifest.json``; raises ``FileNotFoundError`` when the job has not finished."""
        manifest_url = storage.join_url(url, MANIFEST_NAME)
        if not storage.exists(manifest_url):
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {url}: run (or finish) `mocha data features`")
        data = json.loads(storage.read_bytes(manifest_url))
        if data.get("format") != FEATURES_FORMAT:
            raise ValueError(f"{manifest_url} is not a feature manifest (format {data.get('format')!r})")
        return cls(url=url, config_hash=data["config_hash"], dtype=data["dtype"],
                   encoders=[EncoderFeatureInfo(**e) for e in data["encoders"]],
                   shards=[ShardInfo(**s) for s in data["shards"]], source=data["source"])

    def check_source(self, shards_url: str, shards_manifest: Mapping[str, Any]) -> None:
        """Raise :class:`StaleFeaturesError` unless these features were computed from the shard set
        whose manifest is ``shards_manifest``: equal input fingerprints (which cover every accepted
        sample's key and image hash, in order). A copy of the same shards elsewhere passes; a
        rebuilt or another shard set, whose samples the features would silently misalign, fails."""
        made_from = self.source.get("fingerprint")
        current = shards_manifest.get("fingerprint")
        if made_from is None or made_from != current:
            raise StaleFeaturesError(
                f"features at {self.url} were computed from the shard set at {self.source.get('url')} "
                f"(fingerprint {made_from}) but the shards at {shards_url} have fingerprint {current}: the "
                f"shards were rebuilt or are another set; recompute the features with "
                f"`mocha data features --shards {shards_url}`")

    def check_compatible(self, model: ModelConfig) -> None:
        """Raise :class:`FeatureMismatchError` unless these features were computed by exactly
        ``model``'s encoders (same kinds, checkpoints, sizes and layers: the config hash)."""
        expected = model.encoder_config_hash()
        if expected != self.config_hash:
            kinds = [e.kind for e in self.encoders]
            raise FeatureMismatchError(
                f"features at {self.url} were computed for encoder config hash {self.config_hash} "
                f"(encoders {kinds}, checkpoints {[e.checkpoint for e in self.encoders]}) but the model's "
                f"encoders hash to {expected} (encoders {[e.kind for e in model.encoders]}); "
                f"recompute them with `mocha data features` for this model config")

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {e.kind: (e.num_tokens, e.hidden_size) for e in self.encoders}


def decode_features(sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A feature-shard sample (WebDataset row: ``{"__key__", "json", "<encoder>.npy", ...}``
    with raw bytes) -> ``{encoder: array [num_tokens, hidden_size]}``; empty for text-only.
    Non-bytes values are absent members (Ray Data fills a block's missing columns with NaN)."""
    return {name[:-len(".npy")]: np.load(io.BytesIO(data), allow_pickle=False)
            for name, data in sample.items() if name.endswith(".npy") and isinstance(data, (bytes, bytearray))}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def checkpoint_label(cfg: EncoderConfig) -> str:
    """Where an encoder's weights come from, for the manifest."""
    return cfg.pretrained if cfg.pretrained is not None else f"random-init(seed={cfg.init_seed})"


class FeatureEncoder:
    """Ray Data actor: builds the encoders once, then turns each shard-plan row into a feature shard."""

    def __init__(self, encoders: list[dict], dtype: str, batch_size: int, output: str, use_gpu: bool,
                 pad_to_square: bool = True):
        import torch

        from mocha.model.encoders import build_encoders

        self.torch = torch
        self.encoders = build_encoders([EncoderConfig.model_validate(e) for e in encoders], device="cpu")
        if use_gpu:
            self.encoders.to("cuda")
        self.dtype = np.dtype(dtype)
        self.batch_size = batch_size
        self.output = output
        self.pad_to_square = pad_to_square  # the model's shared preprocessing (MochaModel.preprocess)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            info = self.encode_shard(row["source"], storage.join_url(self.output, row["name"]))
            rows.append(asdict(write_marker(self.output, info, row["plan_sha256"])))
        return pa.Table.from_pylist(rows)

    def encode_shard(self, source: str, url: str) -> ShardInfo:
        with write_tar_shard(url) as out:
            pending: list[tuple[str, dict[str, bytes]]] = []
            images = 0
            for key, members in iter_tar_samples(source):
                pending.append((key, members))
                images += image_member(members, key) is not None
                if images == self.batch_size:
                    self._flush(pending, out)
                    pending, images = [], 0
            self._flush(pending, out)
        assert out.info is not None
        return out.info

    def _flush(self, pending: list[tuple[str, dict[str, bytes]]], out) -> None:
        """Encode the images among ``pending`` in one batch and write all samples in order."""
        from mocha.model.encoders import expand_to_square

        images = {key: blob for key, members in pending if (blob := image_member(members, key)) is not None}
        keys = list(images)
        pil = [open_rgb(blob, key) for key, blob in images.items()]
        if self.pad_to_square:
            pil = [expand_to_square(im) for im in pil]
        features: dict[str, np.ndarray] = {}
        for kind, encoder in self.encoders.items():
            if not pil:
                break
            pixel_values = self.torch.stack([encoder.preprocess(im) for im in pil])
            features[kind] = encoder(pixel_values).float().cpu().numpy().astype(self.dtype)
            if not np.isfinite(features[kind]).all():
                raise ValueError(f"{kind} features overflow {self.dtype} for samples {keys}; use --dtype float32")
        position = {key: i for i, key in enumerate(keys)}
        for key, members in pending:
            if "json" not in members:
                raise ValueError(f"sample {key!r} has no json member: is the input a `mocha data shard` output?")
            out.add(f"{key}.json", members["json"])
            for kind, array in features.items():
                if key in position:
                    out.add(f"{key}.{kind}.npy", _npy_bytes(array[position[key]]))


def _find_completed(batch: pa.Table, output: str, finished: dict[str, ShardInfo]) -> pa.Table:
    """Ray task: for each plan row, the verified finished shard's info, or an empty name."""
    rows = []
    for row in batch.to_pylist():
        info = completed_shard(output, row["name"], row["plan_sha256"], finished)
        rows.append(asdict(info) if info else {"name": "", "count": 0, "size": 0, "sha256": "", "plan_sha256": ""})
    return pa.Table.from_pylist(rows)


@dataclass
class FeatureReport:
    manifest: dict[str, Any]
    seconds: float
    shards_written: int
    shards_reused: int

    def summary(self) -> str:
        m = self.manifest
        rate = m["num_samples"] / self.seconds if self.seconds > 0 else float("inf")
        return (f"{m['num_samples']} samples in {len(m['shards'])} feature shards "
                f"({self.shards_written} written, {self.shards_reused} reused), dtype {m['dtype']}, "
                f"encoders {[e['kind'] for e in m['encoders']]}\n{self.seconds:.1f} s, {rate:.1f} samples/s")


def build_features(cfg: FeatureJobConfig, progress: bool = True) -> FeatureReport:
    """Run the feature job (Ray must be initialized, see :func:`pipelines.ray_runtime.ensure_ray`)."""
    import ray
    from tqdm import tqdm

    from mocha.model.encoders import encoder_geometry
    from pipelines.ray_runtime import ordered_execution

    start = time.perf_counter()
    encoder_cfgs = list(cfg.model.encoders)
    source = load_manifest(cfg.shards)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if has_gpus else 0.0)
    dtype = cfg.dtype or ("float16" if gpus > 0 else "float32")
    config_hash = cfg.model.encoder_config_hash()
    # Shapes from the encoder configs alone (the driver never builds an encoder nor reads weights).
    encoders = [encoder_geometry(e) for e in encoder_cfgs]
    encoder_info = [EncoderFeatureInfo(kind=e.kind, checkpoint=checkpoint_label(c), image_size=e.image_size,
                                       num_tokens=e.num_tokens, hidden_size=e.hidden_size)
                    for e, c in zip(encoders, encoder_cfgs)]

    plans = []
    for shard in source["shards"]:
        plan = {"source_sha256": shard["sha256"], "config_hash": config_hash, "dtype": dtype, "batch_size": cfg.batch_size}
        plans.append({"name": shard["name"], "source": storage.join_url(cfg.shards, shard["name"]),
                      "plan_sha256": hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()})

    shards: list[ShardInfo] = []
    with ordered_execution():
        # Verify finished shards with cheap tasks first: no actor (and no encoder) starts for them.
        if plans:
            done = ray.data.from_items(plans).map_batches(_find_completed, batch_format="pyarrow", batch_size=1,
                                                          fn_kwargs={"output": cfg.output_url,
                                                                     "finished": finished_shards(cfg.output_url)})
            shards = [ShardInfo(**row) for row in done.iter_rows() if row["name"]]
        finished = {s.name for s in shards}
        todo = [p for p in plans if p["name"] not in finished]
        if todo:
            results = ray.data.from_items(todo).map_batches(
                FeatureEncoder, batch_format="pyarrow", batch_size=1, num_gpus=gpus,
                compute=ray.data.ActorPoolStrategy(size=min(cfg.concurrency, len(todo))),
                fn_constructor_kwargs={"encoders": [e.model_dump() for e in encoder_cfgs], "dtype": dtype,
                                       "pad_to_square": cfg.model.pad_to_square,
                                       "batch_size": cfg.batch_size, "output": cfg.output_url, "use_gpu": gpus > 0})
            with tqdm(total=len(todo), desc="feature shards", unit="shard", disable=not progress) as bar:
                for row in results.iter_rows():
                    shards.append(ShardInfo(**row))
                    bar.update()
    reused = len(finished)
    shards.sort(key=lambda s: s.name)
    expected_counts = {s["name"]: s["count"] for s in source["shards"]}
    if {s.name: s.count for s in shards} != expected_counts:
        raise RuntimeError("internal error: feature shards do not match the source shards' sample counts")

    remove_stale_shards(cfg.output_url, keep={s.name for s in shards})
    manifest = {
        "format": FEATURES_FORMAT,
        "source": {"url": cfg.shards, "fingerprint": source["fingerprint"]},
        "config_hash": config_hash,
        "dtype": dtype,
        "batch_size": cfg.batch_size,
        "encoders": [asdict(e) for e in encoder_info],
        "num_samples": source["num_samples"],
        "total_bytes": sum(s.size for s in shards),
        "shards": [asdict(s) for s in shards],
    }
    storage.write_bytes(storage.join_url(cfg.output_url, MANIFEST_NAME),
                        json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
    remove_markers(cfg.output_url)  # the manifest now records every shard and its plan
    return FeatureReport(manifest=manifest, seconds=time.perf_counter() - start,
                         shards_written=len(shards) - reused, shards_reused=reused)
