"""Training data: a deterministic sample order that does not depend on the worker count, read with Ray Data.

Why not a dynamic split: ``streaming_split`` hands blocks to whichever worker asks first, so
which sample lands in which global batch changes from run to run. That breaks the two things
users rely on when the autoscaler replaces or resizes nodes: an exact resume (a restarted run
ends with the weights an uninterrupted run would have) and a resume on another worker count.

The order here: the shard set (from its manifest) is dealt to ``S`` fixed *streams*
(``data.num_streams``, fixed for a run), shard ``i`` of an epoch's (seeded) shard permutation
going to stream ``i % S``. Every optimizer step takes ``global_batch / S`` consecutive samples
from each stream, so the global batch of step ``t`` is the same set of samples for any worker
count ``W``. Worker ``r`` of ``W`` owns streams ``r, r + W, r + 2W, ...`` (:func:`rank_streams`:
``ceil((S - r) / W)`` streams, uneven when ``W`` does not divide ``S``) and splits its samples
into micro-batches of at most ``micro_batch`` in stream order. Every worker runs the same number
of micro-batches per step, :func:`micro_batches_per_step` ``= ceil(ceil(S / W) * (global_batch /
S) / micro_batch)`` -- DeepSpeed's ``gradient_accumulation_steps`` for ``W`` -- and a worker
with fewer samples pads with *empty* micro-batches (no samples, zero loss weight; see
``mocha.train.loop``): ZeRO reduces gradients collectively at every backward, so all ranks must
run the same number. When ``micro_batch`` divides ``global_batch / S`` every micro-batch holds
samples of one stream only, and the micro-batches themselves are the same for every ``W``.

A stream's position is ``t * global_batch / S`` samples, from which the shard and the offset
inside it are found without reading anything before it. Each worker reads only its own streams'
shards with ``ray.data.read_webdataset`` (order preserved); streams wrap into the next epoch
independently, so no sample is dropped at epoch ends. ``StepData.keys`` carries the sample ids
(``__key__``) of the step by stream, for the run's sample ledger (``mocha.train.ledger``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

import numpy as np
import torch

from mocha.text.conversation import IGNORE_INDEX, TRAINABLE_STATUSES, tokenize_conversation

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
T = TypeVar("T")


@dataclass(frozen=True)
class ShardRef:
    """One training shard: its sample count and where its samples' bytes live (the text/image
    shard, or the aligned feature shard when training from features)."""

    name: str
    url: str
    num_samples: int


@dataclass(frozen=True)
class StreamPosition:
    epoch: int
    shard_index: int  # index into the stream's shard list for that epoch
    offset: int  # samples to skip inside that shard


class StreamPlan:
    """Deals shards to streams per epoch and maps a stream's sample count to a position."""

    def __init__(self, shards: list[ShardRef], num_streams: int, seed: int = 0, shuffle: bool = True):
        if not shards:
            raise ValueError("the shard set is empty")
        if len(shards) < num_streams:
            raise ValueError(f"{len(shards)} shards cannot feed {num_streams} data streams: "
                             f"write smaller shards or lower data.num_streams")
        self.shards, self.num_streams, self.seed, self.shuffle = shards, num_streams, seed, shuffle
        self._cache: dict[int, list[list[ShardRef]]] = {}

    def epoch_streams(self, epoch: int) -> list[list[ShardRef]]:
        if epoch not in self._cache:
            order = list(self.shards)
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._cache[epoch] = [order[s::self.num_streams] for s in range(self.num_streams)]
        return self._cache[epoch]

    def stream_samples(self, stream: int, epoch: int) -> int:
        return sum(s.num_samples for s in self.epoch_streams(epoch)[stream])

    def samples_per_epoch(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def locate(self, stream: int, consumed: int) -> StreamPosition:
        epoch = 0
        while consumed >= (n := self.stream_samples(stream, epoch)):
            consumed -= n
            epoch += 1
        for index, shard in enumerate(self.epoch_streams(epoch)[stream]):
            if consumed < shard.num_samples:
                return StreamPosition(epoch, index, consumed)
            consumed -= shard.num_samples
        raise AssertionError("unreachable: position past the end of an epoch")


def read_rows(urls: list[str], filesystem) -> Iterator[dict[str, Any]]:
    """Rows of WebDataset shards in file order, raw member bytes (no decoding)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # one reader per stream per worker: bars would interleave
    ds = ray.data.read_webdataset(urls, decoder=None, filesystem=filesystem, shuffle=None,
                                  override_num_blocks=len(urls))
    yield from ds.iter_rows()


class StreamReader:
    """An endless iterator over one stream's samples, starting ``consumed`` samples in."""

    def __init__(self, plan: StreamPlan, stream: int, consumed: int, filesystem_for):
        self.plan, self.stream, self.filesystem_for = plan, stream, filesystem_for
        self.position = plan.locate(stream, consumed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pos = self.position
        epoch, start, skip = pos.epoch, pos.shard_index, pos.offset
        while True:
            shards = self.plan.epoch_streams(epoch)[self.stream][start:]
            if shards:
                fs, _ = self.filesystem_for(shards[0].url)
                rows = read_rows([self.filesystem_for(s.url)[1] for s in shards], fs)
                for i, row in enumerate(rows):
                    if i >= skip:
                        yield row
            epoch, start, skip = epoch + 1, 0, 0


@dataclass
class Example:
    key: str
    input_ids: list[int]
    labels: list[int]
    status: str
    features: dict[str, np.ndarray] | None = None
    image: Any = None  # PIL image when training with online encoders


def decode_row(row: dict[str, Any], tokenizer, template: str, max_length: int, num_image_tokens: int,
               encoder_kinds: tuple[str, ...], from_features: bool) -> Example:
    """Raw WebDataset row -> tokenised example with its image or its precomputed features."""
    key = row["__key__"]
    if "json" not in row:
        raise ValueError(f"sample {key!r} has no json member (conversation record)")
    record = json.loads(row["json"])
    has_image = bool(record.get("image"))
    tok = tokenize_conversation(record["conversations"], tokenizer, template, max_length=max_length, sample_id=key,
                                num_image_tokens=num_image_tokens if has_image else 0)
    ex = Example(key, tok.input_ids, tok.labels, tok.status)
    if not has_image:
        return ex
    if from_features:
        from pipelines.features import decode_features

        feats = decode_features(row)
        missing = [k for k in encoder_kinds if k not in feats]
        if missing:
            raise ValueError(f"sample {key!r}: feature shard has no features for encoders {missing}")
        ex.features = {k: feats[k] for k in encoder_kinds}
    else:
        from mocha.images import decode_rgb

        blob = next((row[s] for s in IMAGE_SUFFIXES if row.get(s) is not None), None)
        if blob is None:
            raise ValueError(f"sample {key!r} names an image but its shard holds no image member")
        ex.image = decode_rgb(blob)
    return ex


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    features: dict[str, torch.Tensor] | None
    pixel_values: dict[str, torch.Tensor] | None
    num_samples: int
    num_masked: int  # samples whose tokenisation did not line up (fully masked, counted)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def is_padding(self) -> bool:
        """An empty micro-batch that only keeps this rank's collectives in step with the others."""
        return self.num_samples == 0

    def model_inputs(self, device) -> dict[str, Any]:
        move = lambda d: None if d is None else {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return dict(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                    labels=self.labels.to(device), features=move(self.features),
                    pixel_values=move(self.pixel_values))


def collate(examples: list[Example], pad_token_id: int, preprocess=None) -> Batch:
    """Right-pad token ids/labels; stack features (or preprocessed pixels) of image samples.

    Samples whose tokenisation is not trainable (see ``TokenizedSample.trainable``: misaligned,
    image tokens would not fit) are left out and counted in ``statuses`` / ``num_masked``. A
    micro-batch left with nothing becomes one padding token with no label (zero loss), so every
    rank still runs the same number of forward/backward passes.
    """
    statuses: dict[str, int] = {}
    for e in examples:
        statuses[e.status] = statuses.get(e.status, 0) + 1
    kept = [e for e in examples if e.status in TRAINABLE_STATUSES]
    if not kept:
        kept = [Example("__empty__", [pad_token_id], [IGNORE_INDEX], "empty")]
    length = max(len(e.input_ids) for e in kept)
    ids = torch.full((len(kept), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(kept), length), dtype=torch.long)
    for i, e in enumerate(kept):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    with_feats = [e for e in kept if e.features is not None]
    features = ({k: torch.from_numpy(np.stack([e.features[k] for e in with_feats])).float()
                 for k in with_feats[0].features} if with_feats else None)
    with_images = [e for e in kept if e.image is not None]
    pixels = None
    if with_images:
        per_image = [preprocess(e.image) for e in with_images]
        pixels = {k: torch.stack([p[k] for p in per_image]) for k in per_image[0]}
    return Batch(ids, mask, labels, features, pixels, len(examples),
                 len(examples) - sum(1 for e in examples if e.status in TRAINABLE_STATUSES), statuses)


def rank_streams(rank: int, world_size: int, num_streams: int) -> list[int]:
    """The streams worker ``rank`` of ``world_size`` reads: ``rank, rank + W, rank + 2W, ...``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} workers")
    return list(range(rank, num_streams, world_size))


def samples_per_stream(global_batch: int, num_streams: int) -> int:
    """Samples every stream contributes to each optimizer step."""
    if global_batch % num_streams:
        raise ValueError(f"schedule.global_batch_size ({global_batch}) must be a multiple of "
                         f"data.num_streams ({num_streams})")
    return global_batch // num_streams


def micro_batches_per_step(world_size: int, num_streams: int, global_batch: int, micro_batch: int) -> int:
    """Micro-batches every worker runs per optimizer step at ``world_size`` workers (DeepSpeed's
    ``gradient_accumulation_steps``): what the worker with the most streams needs."""
    most_streams = math.ceil(num_streams / world_size)
    return max(1, math.ceil(most_streams * samples_per_stream(global_batch, num_streams) / micro_batch))


@dataclass
class StepData(Generic[T]):
    """One worker's share of an optimizer step: ``micro_batches`` (exactly
    :func:`micro_batches_per_step` of them, empty ones last) and the sample ids by stream."""

    micro_batches: list[list[T]]
    keys: dict[int, list[str]]


class RankData:
    """The micro-batches of each optimizer step for one worker (see the module docstring)."""

    def __init__(self, plan: StreamPlan, rank: int, world_size: int, global_batch: int, micro_batch: int,
                 start_step: int, filesystem_for, decode):
        streams = plan.num_streams
        self.per_stream = samples_per_stream(global_batch, streams)
        self.micro_batch = micro_batch
        self.num_micro_batches = micro_batches_per_step(world_size, streams, global_batch, micro_batch)
        self.streams = rank_streams(rank, world_size, streams)
        consumed = start_step * self.per_stream
        self.iters = [iter(StreamReader(plan, s, consumed, filesystem_for)) for s in self.streams]
        self.decode = decode

    def next_step(self) -> StepData:
        """This worker's examples for the next optimizer step, split into micro-batches and padded
        with empty ones to the step's micro-batch count."""
        rows = {s: [next(it) for _ in range(self.per_stream)] for s, it in zip(self.streams, self.iters)}
        examples = [self.decode(row) for s in self.streams for row in rows[s]]
        micro = [examples[i:i + self.micro_batch] for i in range(0, len(examples), self.micro_batch)]
        micro += [[] for _ in range(self.num_micro_batches - len(micro))]
        return StepData(micro, {s: [str(row["__key__"]) for row in rows[s]] for s in self.streams})
