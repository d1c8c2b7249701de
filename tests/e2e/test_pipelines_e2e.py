"""End to end on a real local Ray cluster and a real S3 (moto_server): `mocha data shard` and
`mocha data features` over a few hundred generated samples, read back with stock `webdataset`
and `ray.data.read_webdataset`; reruns, a killed driver, quarantine accounting, flat memory."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import boto3
import numpy as np
import pytest
import webdataset as wds

from mocha.model.encoders import build_encoders
from mocha.model.tiny import tiny_model_config
from mocha.io import storage
from pipelines.features import FeatureJobConfig, FeatureManifest, build_features, decode_features
from mocha.cli import main
from mocha.config import ConfigError
from mocha.train.shards import verify_shard_files
from pipelines.output_lock import OutputLockedError
from pipelines.records import InputFormatError
from pipelines.shard import ShardJobConfig, build_shards
from pipelines.shard_output import OutputNotEmptyError
from pipelines.validation import Reason
from tests.pipelines_samples import TEST_MAX_PIXELS, GeneratedDataset, make_dataset

pytestmark = pytest.mark.slow

NUM_GOOD = 300
PER_SHARD = 64
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> GeneratedDataset:
    """300 valid samples plus one record of every bad-input kind, as JSON Lines."""
    ds = make_dataset(tmp_path_factory.mktemp("data"), NUM_GOOD, jsonl_faults=True)
    ds.input = ds.write_jsonl()
    return ds


def shard_config(ds: GeneratedDataset, input_url: str, images: str, output: str, **kw) -> ShardJobConfig:
    return ShardJobConfig(input=input_url, images=images, output=output, max_image_pixels=TEST_MAX_PIXELS,
                          **{"samples_per_shard": PER_SHARD, "lock_settle_s": 0.2, **kw})


@pytest.fixture(scope="module")
def local_run(ray_cluster, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    cfg = shard_config(dataset, str(dataset.input), str(dataset.images), str(out))
    return cfg, build_shards(cfg, progress=False)


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def expected_samples(ds: GeneratedDataset) -> list[tuple[str, dict, bytes | None]]:
    """(original id, record, image bytes) of every accepted record, in input order."""
    out = []
    for i in ds.accepted_indices:
        rec = ds.records[i]
        out.append((rec["id"], rec, ds.image_bytes[rec["image"]] if "image" in rec else None))
    return out


def check_samples(samples: list[dict], ds: GeneratedDataset) -> None:
    """Rows read back from shards (any reader, raw bytes) match the input exactly."""
    expected = expected_samples(ds)
    assert len(samples) == len(expected) == NUM_GOOD + len(ds.late)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and all("." not in k and "/" not in k for k in keys)
    for sample, (sample_id, record, image) in zip(samples, expected):
        assert json.loads(sample["json"]) == record and json.loads(sample["json"])["id"] == sample_id
        # (Ray Data fills a column absent from a sample with None/NaN; only bytes are members.)
        images = {ext: sample[ext] for ext in ("jpg", "png", "webp") if isinstance(sample.get(ext), bytes)}
        if image is None:
            assert images == {}
        else:
            ext = "png" if record["image"].endswith(".png") else "jpg"
            assert images == {ext: image}  # original bytes, never re-encoded


def test_local_shards_read_back_and_quarantine_adds_up(local_run, dataset):
    cfg, report = local_run
    m = report.manifest
    out = Path(cfg.output)
    counts = dataset.expected_shard_counts(PER_SHARD)
    names = [f"shard-{i:06d}.tar" for i in range(len(counts))]
    assert [s["name"] for s in m["shards"]] == names and sorted(p.name for p in out.glob("*.tar")) == names
    assert [s["count"] for s in m["shards"]] == counts and max(counts[:-1]) <= PER_SHARD
    assert counts[-1] == len(dataset.late) == 1  # the id whose first copy was bad: its good copy won
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert (s["size"], s["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert m["num_input_records"] == len(dataset.records) == m["num_samples"] + m["num_quarantined"]
    assert m["input"]["sha256"] == hashlib.sha256(dataset.input.read_bytes()).hexdigest()

    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert {q["index"]: q["reason"] for q in quarantine} == dataset.expected_reasons
    # Every kind is exercised (unreadable_file needs an unprivileged user: test_pipelines_hostile_inputs).
    assert {r.value for r in Reason} - {"unreadable_file"} == set(dataset.expected_reasons.values())
    assert [q["id"] for q in quarantine if q["reason"] == "duplicate_id"] == ["sample-1", "dup-first-bad"]
    assert m["quarantine"] == {r: list(dataset.expected_reasons.values()).count(r)
                               for r in sorted(set(dataset.expected_reasons.values()))}
    assert all(q["detail"] for q in quarantine)

    # Stock webdataset, raw bytes.
    urls = [str(out / n) for n in names]
    check_samples(list(wds.WebDataset(urls, shardshuffle=False)), dataset)
    # Ray Data, raw bytes.
    import ray

    rows = ray.data.read_webdataset(urls, decoder=None).take_all()
    rows.sort(key=lambda r: (r["__url__"], r["__key__"]))  # shard order, then key order within a shard
    check_samples(rows, dataset)


def test_rerun_is_byte_identical_and_reuses_every_shard(local_run):
    cfg, first = local_run
    assert sorted(p.name for p in Path(cfg.output).iterdir() if not p.name.startswith("shard-")) == [
        "manifest.json", "quarantine.jsonl"]  # a finished build keeps no progress markers
    before = tree_digest(Path(cfg.output))
    again = build_shards(cfg, progress=False)
    shards = first.manifest["num_shards"]
    assert (again.shards_written, again.shards_reused) == (0, shards)
    assert again.manifest == first.manifest and tree_digest(Path(cfg.output)) == before
    # A damaged shard is detected (sha256) and rebuilt to the same bytes.
    shard = Path(cfg.output) / "shard-000002.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(damaged))
    fixed = build_shards(cfg, progress=False)
    assert (fixed.shards_written, fixed.shards_reused) == (1, shards - 1) and tree_digest(Path(cfg.output)) == before


def test_features_local_bit_identical_aligned_and_resumable(local_run, dataset, tmp_path, request):
    cfg, _ = local_run
    model = tiny_model_config()
    fcfg = FeatureJobConfig(shards=cfg.output, output=str(tmp_path / "features"), model=model, batch_size=16)
    report = build_features(fcfg, progress=False)
    manifest = FeatureManifest.load(fcfg.output_url)
    manifest.check_compatible(model)
    encoders = build_encoders(model.encoders)
    assert manifest.shapes() == {k: (e.num_tokens, e.hidden_size) for k, e in encoders.items()}
    assert [(s.name, s.count) for s in manifest.shards] == [(s["name"], s["count"]) for s in
                                                             json.loads((Path(cfg.output) / "manifest.json").read_text())["shards"]]

    # Aligned one-to-one, every sample's features equal the in-process encoders on the same batch
    # with the same intra-op threads (the actor holds 1 CPU, so Ray gives it 1 thread; float sums
    # are ordered differently with another thread count). The images go through what the model
    # does online: the viewer-RGB decode, the shared pad to a square, each encoder's preprocess.
    import torch

    from mocha.model.encoders import expand_to_square
    from pipelines.validation import image_member, open_rgb

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    non_square = 0
    for shard in manifest.shards:
        src = list(wds.WebDataset(str(Path(cfg.output) / shard.name), shardshuffle=False))
        feats = list(wds.WebDataset(str(tmp_path / "features" / shard.name), shardshuffle=False))
        assert [s["__key__"] for s in src] == [s["__key__"] for s in feats]
        with_image = [(s, f) for s, f in zip(src, feats) if image_member(s) is not None]
        for start in range(0, len(with_image), 16):
            batch = with_image[start:start + 16]
            pil = [open_rgb(image_member(s)) for s, _ in batch]
            non_square += sum(im.width != im.height for im in pil)
            pil = [expand_to_square(im) for im in pil] if model.pad_to_square else pil
            for kind, enc in encoders.items():
                ref = enc(torch.stack([enc.preprocess(im) for im in pil])).numpy()
                for row, (_, f) in enumerate(batch):
                    assert np.array_equal(decode_features(f)[kind], ref[row]) and decode_features(f)[kind].dtype == np.float32
        assert all(s["json"] == f["json"] for s, f in zip(src, feats))
    assert model.pad_to_square and non_square > 0  # the shared pad to a square was exercised

    assert not (tmp_path / "features" / "_progress").exists()
    before = tree_digest(tmp_path / "features")
    (tmp_path / "features" / "shard-000001.tar").unlink()
    again = build_features(fcfg, progress=False)
    shards = len(manifest.shards)
    assert (report.shards_written, again.shards_written, again.shards_reused) == (shards, 1, shards - 1)
    assert tree_digest(tmp_path / "features") == before


def _upload_tree(local: Path, bucket_url: str, prefix: str) -> str:
    """Upload the files under ``local`` as S3 has them: links that stay inside become copies,
    links out of the folder are not uploaded (S3 has no links)."""
    s3 = boto3.client("s3")
    bucket = bucket_url[len("s3://"):]
    root = local.resolve()
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.resolve().is_relative_to(root):
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}")
    return f"{bucket_url}/{prefix}"


def test_s3_end_to_end_matches_local_bytes(local_run, dataset, s3_bucket, tmp_path):
    import ray

    cfg, local = local_run
    images = _upload_tree(dataset.images, s3_bucket, "raw/images")
    input_url = f"{s3_bucket}/raw/data.jsonl"
    storage.write_bytes(input_url, dataset.input.read_bytes())
    out = f"{s3_bucket}/shards"
    report = build_shards(shard_config(dataset, input_url, images, out), progress=False)
    assert report.manifest["shards"] == local.manifest["shards"]  # same bytes as the local run
    assert report.manifest["fingerprint"] == local.manifest["fingerprint"]
    s3_quarantine = [json.loads(line) for line in storage.read_bytes(f"{out}/quarantine.jsonl").splitlines()]
    local_quarantine = [json.loads(line) for line in (Path(cfg.output) / "quarantine.jsonl").read_text().splitlines()]
    # The links out of the root were never uploaded: on S3 those images are simply missing.
    as_on_s3 = {"outside_root": "missing_image"}
    assert [(q["index"], q["reason"]) for q in s3_quarantine] == \
        [(q["index"], as_on_s3.get(q["reason"], q["reason"])) for q in local_quarantine]

    # Stock webdataset over presigned HTTP URLs; Ray Data through pyarrow's S3 filesystem.
    s3 = boto3.client("s3")
    bucket = s3_bucket[len("s3://"):]
    names = [s["name"] for s in report.manifest["shards"]]
    urls = [s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": f"shards/{n}"}) for n in names]
    check_samples(list(wds.WebDataset(urls, shardshuffle=False)), dataset)
    fs, _ = storage.resolve_filesystem(out)
    rows = ray.data.read_webdataset([f"{bucket}/shards/{n}" for n in names], filesystem=fs, decoder=None).take_all()
    check_samples(sorted(rows, key=lambda r: (r["__url__"], r["__key__"])), dataset)

    # Features on S3, rerun reuses everything.
    fcfg = FeatureJobConfig(shards=out, model=tiny_model_config(), batch_size=16)
    features = build_features(fcfg, progress=False)
    manifest = FeatureManifest.load(f"{out}/features")
    assert [s.name for s in manifest.shards] == names and manifest.dtype == "float32"
    sample = next(iter(wds.WebDataset([s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "shards/features/shard-000000.tar"})], shardshuffle=False)))
    assert set(decode_features(sample)) == {e.kind for e in tiny_model_config().encoders}
    assert build_features(fcfg, progress=False).shards_reused == len(names) == features.shards_written


def test_killed_driver_then_rerun_completes_with_the_same_result(ray_cluster, dataset, tmp_path):
    import ray

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    small = {"samples_per_shard": 2, "concurrency": 1}
    cmd = [sys.executable, "-m", "mocha.cli", "data", "shard", "--input", str(dataset.input), "--images",
           str(dataset.images), "--output", str(killed), "--samples-per-shard", "2", "--concurrency", "1",
           "--max-image-pixels", str(TEST_MAX_PIXELS), "--no-progress",
           "--ray-address", ray.get_runtime_context().gcs_address]
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None and not list(killed.glob("_progress/shard-*.json")):  # a shard is done
            time.sleep(0.01)
        # A second run into the same output while the first one writes: refused, nothing touched.
        with pytest.raises(OutputLockedError, match="held by run"):
            build_shards(shard_config(dataset, str(dataset.input), str(dataset.images), str(killed), **small),
                         progress=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-2000:]
    partial = sorted(p.name for p in killed.glob("shard-*.tar"))
    assert partial and not (killed / "manifest.json").exists()  # killed midway

    resumed = build_shards(shard_config(dataset, str(dataset.input), str(dataset.images), str(killed), **small),
                           progress=False)
    build_shards(shard_config(dataset, str(dataset.input), str(dataset.images), str(reference), **small),
                 progress=False)
    assert resumed.shards_reused >= 1 and resumed.manifest["num_shards"] == len(dataset.expected_shard_counts(2))
    visible = lambda d: {k: v for k, v in tree_digest(d).items() if not Path(k).name.startswith(".")}  # noqa: E731
    assert visible(killed) == visible(reference)


def test_driver_memory_does_not_grow_with_dataset_size(ray_cluster, tmp_path):
    """Peak Python heap of the driver for 1x and 4x the data: flat, and far below the image bytes
    (images are read in Ray tasks, never on the driver; records go to Ray block by block)."""
    peaks, image_bytes = [], []
    for scale in (1, 4):
        ds = make_dataset(tmp_path / f"x{scale}", 60 * scale, bad=False, image_size=(150, 200), noise=True)
        cfg = ShardJobConfig(input=str(ds.write_json()), images=str(ds.images), output=str(tmp_path / f"out{scale}"),
                             samples_per_shard=16, concurrency=2)
        tracemalloc.start()
        report = build_shards(cfg, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert report.manifest["num_samples"] == 60 * scale
        image_bytes.append(sum(len(b) for b in ds.image_bytes.values()))
    assert peaks[1] < 1.3 * peaks[0], peaks
    assert peaks[1] < image_bytes[1] / 2, (peaks, image_bytes)


def test_different_input_is_refused_and_a_failed_overwrite_leaves_no_manifest(ray_cluster, tmp_path):
    """Run A finishes; run B (other input) is refused; B with --overwrite dies halfway through its
    input (a broken JSON list): no manifest is left to describe the mix, `mocha train --check`
    refuses the folder, and rerunning B completes."""
    a = make_dataset(tmp_path / "a", 40, bad=False, seed=1)
    b = make_dataset(tmp_path / "b", 40, bad=False, seed=2)
    out = str(tmp_path / "out")
    first = build_shards(shard_config(a, str(a.write_json()), str(a.images), out, samples_per_shard=8), progress=False)
    assert verify_shard_files(out, checksums=True) == first.manifest["num_shards"] == 5
    b_json = b.write_json()
    with pytest.raises(OutputNotEmptyError, match="input_sha256"):
        build_shards(shard_config(b, str(b_json), str(b.images), out, samples_per_shard=8), progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == first.manifest  # untouched

    broken = tmp_path / "b_broken.json"
    broken.write_bytes(b_json.read_bytes().rstrip()[:-1] + b", {oops")  # valid records, then garbage
    with pytest.raises(InputFormatError):
        build_shards(shard_config(b, str(broken), str(b.images), out, samples_per_shard=8, overwrite=True),
                     progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ConfigError, match="no manifest.json"):
        verify_shard_files(out)
    again = build_shards(shard_config(b, str(b_json), str(b.images), out, samples_per_shard=8, overwrite=True),
                         progress=False)
    assert again.manifest["num_samples"] == 40 and verify_shard_files(out, checksums=True) == 5


def test_empty_input_and_nothing_accepted_exit_3_with_counts(ray_cluster, tmp_path, capsys):
    (tmp_path / "empty.json").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"id": "x", "conversations": []}, {"id": "y", "image": "nope.png",
                                            "conversations": [{"from": "human", "value": "<image>\nq"},
                                                              {"from": "gpt", "value": "a"}]})) + "\n")
    base = ["data", "shard", "--images", str(tmp_path), "--no-progress"]
    assert main(base + ["--input", str(tmp_path / "empty.json"), "--output", str(tmp_path / "o1")]) == 3
    assert "the input has no records (0 accepted, 0 quarantined)" in capsys.readouterr().err
    assert main(base + ["--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o2")]) == 3
    err = capsys.readouterr().err
    assert "none of the 2 input records was accepted (0 accepted, 2 quarantined: empty_conversation: 1, " \
           "missing_image: 1)" in err
    assert (tmp_path / "o2" / "quarantine.jsonl").read_text().count("\n") == 2
    assert not (tmp_path / "o2" / "manifest.json").exists()
