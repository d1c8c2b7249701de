"""Shard build (``mocha data shard``, one pass on Ray, 2 CPUs) vs a plain single-process loop,
from local disk and from ``s3://`` (a moto server), and its memory at 1x vs 10x data.

Baseline: the plain way a user would write it in one process -- read the LLaVA JSON, and for
each record read the image, ``PIL.Image.verify()`` it and append ``{key}.json`` (the record) and
``{key}.jpg`` (the image bytes) to numbered tars of ``samples_per_shard`` samples with the
standard ``tarfile`` module. No record checks, no pixel decode, no hashing, no atomic publish, no
manifest, no lock. Ours is ``pipelines.shard.build_shards`` on a private local Ray (2 CPUs)
that is already started, doing every check (record structure, image path under the root, full
decode, size limit), hashing, atomic publish, done-markers, quarantine and manifest. Before
timing, ours and the baseline's shards are checked to hold the same member names and bytes.
The images are small JPEGs (like LLaVA's COCO/LCS images scaled down), all distinct.

Goal (issue 17): ours >= 1.5x the loop's samples/s on 2 cores, from local disk; the same ratio
from S3 is reported beside it (there the moto server, a Python process on the same 2 cores,
serves both sides). Memory: the build runs in a fresh process at 1x and 10x the samples (same
images under new ids); the driver's peak RSS at 10x / 1x should stay near 1.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import BenchmarkResult, OutputMismatch, Timing, time_interleaved
from benchmarks.isolation import child_main, local_ray, run_child
from benchmarks.memory import mib, peak_rss_bytes

NAME = "shard_build"


@dataclass(frozen=True)
class ShardSize:
    samples: int  # the 1x dataset; the memory test also builds memory_scale x
    samples_per_shard: int
    image_size: int
    s3_samples: int
    memory_scale: int = 10


SIZES = {
    "tiny": ShardSize(samples=48, samples_per_shard=16, image_size=32, s3_samples=24, memory_scale=3),
    "small": ShardSize(samples=4000, samples_per_shard=250, image_size=96, s3_samples=1500),
    "full": ShardSize(samples=12000, samples_per_shard=500, image_size=128, s3_samples=4000),
}


def make_dataset(root: Path, samples: int, image_size: int, seed: int = 0) -> tuple[Path, Path]:
    """``samples`` distinct JPEGs (flat colour + rectangles, sizes around ``image_size``) and a
    LLaVA stage-1 JSON list over them: (JSON, image folder)."""
    from PIL import Image

    rng = random.Random(seed)
    images = root / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples):
        w, h = (rng.randint(image_size * 3 // 4, image_size * 5 // 4) for _ in range(2))
        im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(4):
            x, y = rng.randrange(w), rng.randrange(h)
            im.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(w, x + w // 4), min(h, y + h // 4)))
        rel = f"sub/{i:06d}.jpg"
        im.save(images / rel, format="JPEG", quality=90)
        records.append({"id": f"img-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": f"Shapes on a coloured background, number {i}."}]})
    input_json = root / "train.json"
    input_json.write_text(json.dumps(records))
    return input_json, images


def scaled_json(source: Path, scale: int, target: Path) -> Path:
    """``scale`` copies of every record of ``source`` (new ids, same images) in one JSON list."""
    records = json.loads(source.read_text())
    target.write_text(json.dumps([{**r, "id": f"{r['id']}-copy{c}"} for c in range(scale) for r in records]))
    return target


def plain_loop(input_url: str, images: str, output: Path, samples_per_shard: int) -> None:
    """The baseline: one process; open each image, PIL-verify it, append it to a tar."""
    from PIL import Image

    from mocha.io import storage
    from pipelines.tar_shards import shard_name
    from pipelines.validation import sample_key

    output.mkdir(parents=True, exist_ok=True)
    records = json.loads(storage.read_bytes(input_url))
    tar = None
    for i, record in enumerate(records):
        if i % samples_per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(output / shard_name(i // samples_per_shard), "w")
        key = sample_key(i, str(record["id"]))
        data = storage.read_bytes(storage.join_url(images, record["image"]))
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        for name, payload in ((f"{key}.json", json.dumps(record, ensure_ascii=False).encode()), (f"{key}.jpg", data)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    if tar is not None:
        tar.close()


def tar_contents(folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Shard name -> [(member name, bytes)] in order."""
    contents = {}
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            contents[path.name] = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    return contents


def _build(input_url: str, images: str, output: Path, samples_per_shard: int):
    from pipelines.shard import ShardJobConfig, build_shards

    cfg = ShardJobConfig(input=input_url, images=images, output=str(output), samples_per_shard=samples_per_shard)
    return build_shards(cfg, progress=False)


def child(input_url: str, images: str, samples_per_shard: int, repeats: int) -> dict:
    """In a fresh process: start Ray, build once (peak RSS), then time ours vs the plain loop."""
    from pipelines.ray_runtime import WORKER_NICENESS_ENV

    work = Path(tempfile.mkdtemp(prefix="mocha-bench-shard-"))
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")  # as `mocha data shard` starts its local Ray
    try:
        start = time.perf_counter()
        with local_ray(num_cpus=2):
            startup = time.perf_counter() - start
            report = _build(input_url, images, work / "first", samples_per_shard)
            driver_peak = peak_rss_bytes()
            if report.manifest["num_quarantined"]:
                raise RuntimeError(f"the benchmark dataset should be clean, got quarantine {report.manifest['quarantine']}")
            result = {"driver_peak_rss": driver_peak, "samples": report.manifest["num_samples"],
                      "shards": report.manifest["num_shards"], "bytes": report.manifest["total_bytes"],
                      "ray_startup_s": startup}
            if repeats == 0:
                return result
            plain_loop(input_url, images, work / "baseline", samples_per_shard)
            ours, base = tar_contents(work / "first"), tar_contents(work / "baseline")
            if ours != base:
                raise OutputMismatch(f"shards differ from the plain loop's: {sorted(ours)} vs {sorted(base)}")
            rounds = iter(range(10**6))
            timing = time_interleaved(
                {"ours": lambda: _build(input_url, images, work / f"ours{next(rounds)}", samples_per_shard),
                 "baseline": lambda: plain_loop(input_url, images, work / f"base{next(rounds)}", samples_per_shard)},
                repeats, warmup=0)
        return {**result, "runs": timing.runs}
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _MotoServer:
    """A local S3 (moto's threaded server) in this process; the child finds it through the
    standard AWS_* variables, set while the server runs."""

    ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}

    def __enter__(self) -> "_MotoServer":
        import socket

        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        self.saved = {k: os.environ.get(k) for k in (*self.ENV, "AWS_ENDPOINT_URL")}
        os.environ.update({**self.ENV, "AWS_ENDPOINT_URL": endpoint})
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="bench")
        return self

    def upload(self, local: Path, prefix: str) -> str:
        from mocha.io import storage

        for path in sorted(local.rglob("*")):
            if path.is_file():
                storage.write_bytes(f"s3://bench/{prefix}/{path.relative_to(local)}", path.read_bytes())
        return f"s3://bench/{prefix}"

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.server.stop()


def run(size: str, repeats: int) -> BenchmarkResult:
    s = SIZES[size]
    root = Path(tempfile.mkdtemp(prefix="mocha-bench-shard-data-"))
    try:
        base_json, images = make_dataset(root / "data", s.samples, s.image_size)
        big_json = scaled_json(base_json, s.memory_scale, root / "scaled.json")
        local, local_tree = run_child(__name__, {"input_url": str(base_json), "images": str(images),
                                                 "samples_per_shard": s.samples_per_shard, "repeats": repeats})
        big, big_tree = run_child(__name__, {"input_url": str(big_json), "images": str(images),
                                             "samples_per_shard": s.samples_per_shard, "repeats": 0})
        s3_json, s3_images = make_dataset(root / "s3data", s.s3_samples, s.image_size, seed=1)
        with _MotoServer() as moto:
            images_url = moto.upload(s3_images, "images")
            input_url = moto.upload(s3_json.parent, "input") + "/" + s3_json.name
            s3, _ = run_child(__name__, {"input_url": input_url, "images": images_url,
                                         "samples_per_shard": s.samples_per_shard, "repeats": repeats})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    timing, s3_timing = Timing(runs=local["runs"]), Timing(runs=s3["runs"])
    return BenchmarkResult(
        name=NAME,
        what="`mocha data shard` (pipelines.shard.build_shards, one pass, every check) samples/s, Ray (2 CPUs) "
             "already started, local disk",
        baseline="plain single-process loop: open each image, PIL verify, append it and its record to a tar",
        metric="our samples/s / the plain loop's samples/s (same run, same data, same shards)",
        ratio=timing.speedup, goal_op=">=", goal_value=1.5,
        sizes={**asdict(s), "bytes_1x": local["bytes"], "shards_1x": local["shards"]}, repeats=repeats,
        seconds={**timing.medians(), **{f"s3_{k}": v for k, v in s3_timing.medians().items()},
                 "ray_startup": local["ray_startup_s"]},
        extra={
            "s3_throughput_ratio": s3_timing.speedup,
            "samples_per_s_ours": s.samples / timing.median("ours"),
            "samples_per_s_plain_loop": s.samples / timing.median("baseline"),
            "s3_samples_per_s_ours": s.s3_samples / s3_timing.median("ours"),
            "s3_samples_per_s_plain_loop": s.s3_samples / s3_timing.median("baseline"),
            f"driver_peak_rss_growth_{s.memory_scale}x_over_1x": big["driver_peak_rss"] / local["driver_peak_rss"],
            "driver_peak_rss_mib": {"1x": mib(local["driver_peak_rss"]), f"{s.memory_scale}x": mib(big["driver_peak_rss"])},
            "process_tree_peak_rss_mib": {"1x": mib(local_tree), f"{s.memory_scale}x": mib(big_tree)},
            "process_tree_growth": big_tree / local_tree,
        },
        notes="Ray's workers run at niceness 0, as `mocha data shard` (pipelines.ray_runtime.ensure_ray) and "
              "`ray job submit` start them (Ray's default is 15). Per image in one process (process CPU time, "
              "4000 images, idle machine): ours 118-119 us, the plain loop 131-137 us, so our per-image work is "
              "already below the loop's although it also decodes every image (JPEG in draft mode: every "
              "coefficient entropy-decoded; ~30 us of ours here, and far more for camera-sized images), checks every "
              "record, resolves each path under the root, hashes and publishes atomically with done-markers. "
              "What separates the measured ratio from 2x is Ray on 2 cores: the same 16 shard tasks submitted "
              "directly take 0.32-0.36 s for work that costs 0.24 s of CPU, and the driver (streaming JSON parse, "
              "submits, lock, manifest) shares the two cores. History: 0.26x when issue 17 was filed (two Ray Data "
              "passes); 0.93x idle with the one-pass build; then tarfile's per-member TarInfo replaced by one "
              "prebuilt USTAR header per member (same bytes, tested), one os.read per image instead of a buffered "
              "file object, chunks sent to tasks as one JSON document (Ray serialised the parsed records ~10x "
              "slower): 1.42x. S3: images are read with one GET each (pyarrow sent a HEAD first) and 16 ahead per "
              "task; the moto server is a Python process in the benchmark process on the same 2 cores and bounds "
              "both sides (~250-330 images/s), so the S3 ratio measures how much of it each side keeps busy, not S3. "
              "Both sides write local shards. Tree RSS counts Ray's shared object-store pages in every process.",
    )


if __name__ == "__main__":
    child_main(child)
