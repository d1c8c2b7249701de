"""Shard build (``mocha data shard`` on Ray Data) vs plain ``tarfile``, and its memory at 1x vs 10x data.

Baseline: a loop that reads the LLaVA JSON and writes the same members (``{key}.json``, the
record; ``{key}.{ext}``, the image bytes) into tars of the same ``samples_per_shard`` with the
standard ``tarfile`` module -- no validation, no image inspection, no manifest, no atomic
publish, no parallelism. Ours is ``pipelines.shard.build_shards`` on a private local Ray
(2 CPUs) that is already started; Ray's start-up is reported separately. Before timing, every
shard's member names and bytes are checked equal to the baseline's.

Memory: the build runs in a fresh process at 1x and at 10x the samples (same images repeated
under new ids); the driver's peak RSS (``VmHWM``) and the peak summed RSS of the driver and all
its Ray processes are compared. Streaming means the 10x / 1x ratio stays near 1 (goal < 1.2).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import BenchmarkResult, OutputMismatch, time_interleaved
from benchmarks.isolation import child_main, local_ray, run_child
from benchmarks.memory import mib, peak_rss_bytes

NAME = "shard_build"


@dataclass(frozen=True)
class ShardSize:
    samples: int  # the 1x dataset; the memory test also builds 10x
    samples_per_shard: int
    image_size: int
    memory_scale: int = 10


SIZES = {
    "tiny": ShardSize(samples=24, samples_per_shard=8, image_size=32, memory_scale=3),
    "small": ShardSize(samples=400, samples_per_shard=100, image_size=96),
    "full": ShardSize(samples=2000, samples_per_shard=500, image_size=224),
}


def make_dataset(root: Path, samples: int, image_size: int) -> tuple[Path, Path]:
    """A LLaVA stage-1 JSON of ``samples`` records over the coloured-shapes images: (JSON, image folder)."""
    from mocha.demo.synthetic import generate_shapes_dataset

    paths = generate_shapes_dataset(root, num_train=samples, num_eval=1, image_size=image_size)
    return paths.stage1, paths.image_dir


def scaled_json(source: Path, scale: int, target: Path) -> Path:
    """``scale`` copies of every record of ``source`` (new ids, same images) in one JSON list."""
    records = json.loads(source.read_text())
    scaled = [{**r, "id": f"{r['id']}-copy{c}"} for c in range(scale) for r in records]
    target.write_text(json.dumps(scaled))
    return target


def tarfile_baseline(input_json: Path, images: Path, output: Path, samples_per_shard: int) -> None:
    """The plain way: read the JSON, write each record and its image into numbered tars."""
    from pipelines.tar_shards import shard_name
    from pipelines.validation import sample_key

    output.mkdir(parents=True, exist_ok=True)
    records = json.loads(input_json.read_text())
    tar = None
    for i, record in enumerate(records):
        if i % samples_per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(output / shard_name(i // samples_per_shard), "w")
        key = sample_key(i, record["id"])
        members = [(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())]
        if record.get("image"):
            members.append((f"{key}{Path(record['image']).suffix}", (images / record["image"]).read_bytes()))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if tar is not None:
        tar.close()


def tar_contents(folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Shard name -> [(member name, bytes)] in order."""
    contents = {}
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            contents[path.name] = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    return contents


def _build(input_json: Path, images: Path, output: Path, samples_per_shard: int):
    from pipelines.shard import ShardJobConfig, build_shards

    cfg = ShardJobConfig(input=str(input_json), images=str(images), output=str(output),
                         samples_per_shard=samples_per_shard)
    return build_shards(cfg, progress=False)


def child(input_json: str, images: str, samples_per_shard: int, repeats: int) -> dict:
    """In a fresh process: start Ray, build once (peak RSS), then time ours vs tarfile."""
    input_path, image_dir = Path(input_json), Path(images)
    work = Path(tempfile.mkdtemp(prefix="mocha-bench-shard-"))
    try:
        start = time.perf_counter()
        with local_ray(num_cpus=2):
            startup = time.perf_counter() - start
            rss_after_start = peak_rss_bytes()
            report = _build(input_path, image_dir, work / "first", samples_per_shard)
            driver_peak = peak_rss_bytes()
            if report.manifest["num_quarantined"]:
                raise RuntimeError(f"the benchmark dataset should be clean, got quarantine {report.manifest['quarantine']}")
            if repeats == 0:
                return {"driver_peak_rss": driver_peak, "driver_rss_after_ray_init": rss_after_start,
                        "samples": report.manifest["num_samples"]}
            tarfile_baseline(input_path, image_dir, work / "baseline", samples_per_shard)
            ours, base = tar_contents(work / "first"), tar_contents(work / "baseline")
            if ours != base:
                raise OutputMismatch(f"shards differ from the tarfile baseline's: {sorted(ours)} vs {sorted(base)}")
            rounds = iter(range(10**6))
            timing = time_interleaved(
                {"ours": lambda: _build(input_path, image_dir, work / f"ours{next(rounds)}", samples_per_shard),
                 "baseline": lambda: tarfile_baseline(input_path, image_dir, work / f"base{next(rounds)}",
                                                       samples_per_shard)},
                repeats, warmup=0)
        return {"driver_peak_rss": driver_peak, "driver_rss_after_ray_init": rss_after_start,
                "ray_startup_s": startup, "samples": report.manifest["num_samples"],
                "shards": report.manifest["num_shards"], "bytes": report.manifest["total_bytes"],
                "runs": timing.runs}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(size: str, repeats: int) -> BenchmarkResult:
    from benchmarks.harness import Timing

    s = SIZES[size]
    root = Path(tempfile.mkdtemp(prefix="mocha-bench-shard-data-"))
    try:
        base_json, images = make_dataset(root / "data", s.samples, s.image_size)
        big_json = scaled_json(base_json, s.memory_scale, root / "scaled.json")
        small, small_tree = run_child(__name__, {"input_json": str(base_json), "images": str(images),
                                                 "samples_per_shard": s.samples_per_shard, "repeats": repeats})
        big, big_tree = run_child(__name__, {"input_json": str(big_json), "images": str(images),
                                             "samples_per_shard": s.samples_per_shard, "repeats": 0})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    timing = Timing(runs=small["runs"])
    driver_growth = big["driver_peak_rss"] / small["driver_peak_rss"]
    return BenchmarkResult(
        name=NAME,
        what="`mocha data shard` (pipelines.shard.build_shards) throughput, Ray already started",
        baseline="plain tarfile loop writing the same members into the same shards (no checks, one process)",
        metric=f"peak driver RSS at {s.memory_scale}x / 1x samples (goal); throughput ratio in extra",
        ratio=driver_growth, goal_op="<", goal_value=1.2,
        sizes={**asdict(s), "bytes_1x": small["bytes"], "shards_1x": small["shards"]}, repeats=repeats,
        seconds={**timing.medians(), "ray_startup": small["ray_startup_s"]},
        extra={
            "throughput_ratio_ours_over_tarfile": timing.median("baseline") / timing.median("ours"),
            "samples_per_s_ours": small["samples"] / timing.median("ours"),
            "samples_per_s_tarfile": small["samples"] / timing.median("baseline"),
            "driver_peak_rss_mib": {"1x": mib(small["driver_peak_rss"]), f"{s.memory_scale}x": mib(big["driver_peak_rss"])},
            "driver_rss_after_ray_init_mib": {"1x": mib(small["driver_rss_after_ray_init"]),
                                              f"{s.memory_scale}x": mib(big["driver_rss_after_ray_init"])},
            "process_tree_peak_rss_mib": {"1x": mib(small_tree), f"{s.memory_scale}x": mib(big_tree)},
            "process_tree_growth": big_tree / small_tree,
        },
        notes="ours also validates every record, decodes every image header, hashes, writes atomically and a manifest; "
              "tree RSS counts Ray's shared object-store pages in every process that maps them.",
    )


if __name__ == "__main__":
    child_main(child)
