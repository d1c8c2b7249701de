"""Training from data shaped like real LLaVA mixtures, through `mocha train`.

The shard set is built by `mocha data shard` from records whose images are JPEG, PNG, GIF and
WebP files, beside text-only records. Its shards hold every combination of up to three of those
five sample kinds (property-style over the suffix combinations: each pair of kinds shares a
shard, so Ray Data's per-block column union NaN-fills every suffix next to every other), and
stage 1 with online encoders on 2 workers trains through a whole epoch of it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

KINDS = ("jpg", "png", "gif", "webp", "text")
FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP"}
PER_SHARD = 3
COMBINATIONS = [c for n in range(1, PER_SHARD + 1) for c in itertools.combinations(KINDS, n)]
GLOBAL_BATCH = 16
LONG_EVERY = 7


def _mixed_records(records: list[dict], image_dir: Path) -> tuple[list[dict], list[str]]:
    """Shard ``s`` holds the kinds of ``COMBINATIONS[s]`` (cycled to PER_SHARD samples): each
    image is re-saved in its kind's format, text-only samples lose image and placeholder."""
    out, kinds = [], []
    for s, combination in enumerate(COMBINATIONS):
        for j in range(PER_SHARD):
            kind = combination[j % len(combination)]
            record = json.loads(json.dumps(records[s * PER_SHARD + j]))
            if kind == "text":
                record.pop("image")
                long = len(out) % LONG_EVERY == 0  # a few answers longer than max_length: counted, text cut
                record["conversations"] = [{"from": "human", "value": "Name a colour."},
                                           {"from": "gpt", "value": " ".join(["red"] * 400) if long else "red"}]
            else:
                image = Image.open(image_dir / record["image"]).convert("RGB")
                name = f"{Path(record['image']).stem}.{kind}"
                image.save(image_dir / name, format=FORMATS[kind])
                record["image"] = name
            out.append(record)
            kinds.append(kind)
    return out, kinds


@pytest.fixture(scope="module")
def mixed(ray_cluster, tmp_path_factory):
    from mocha.demo.pipeline import DemoConfig, demo_model_config
    from mocha.demo.synthetic import generate_shapes_dataset, iter_all_texts
    from mocha.text.tokenizer import train_bpe_tokenizer
    from pipelines.shard import SequenceBudget, ShardJobConfig, build_shards

    root = tmp_path_factory.mktemp("mixed")
    paths = generate_shapes_dataset(root / "raw", num_train=len(COMBINATIONS) * PER_SHARD, num_eval=8)
    train_bpe_tokenizer(iter_all_texts(paths, templates=("plain", "phi")), root / "tokenizer", vocab_size=1024)
    records, kinds = _mixed_records(json.loads(paths.stage1.read_text()), paths.image_dir)
    source = root / "stage1_mixed.json"
    source.write_text(json.dumps(records))
    shards = root / "shards"
    budget = SequenceBudget.of_model(demo_model_config(DemoConfig(out=str(root), width=64), "plain"),
                                     str(root / "tokenizer"))
    build_shards(ShardJobConfig(input=str(source), images=str(paths.image_dir), output=str(shards),
                                samples_per_shard=PER_SHARD, sequence_budget=budget), progress=False)
    return root, shards, kinds


def test_shards_hold_every_kind_mix_and_ray_rows_carry_only_their_own_members(mixed):
    from mocha.train.data import read_rows
    from pipelines.tar_shards import iter_tar_samples

    _, shards, kinds = mixed
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_samples"] == len(kinds)  # nothing quarantined: every format is accepted
    long = sum(1 for i, kind in enumerate(kinds) if kind == "text" and i % LONG_EVERY == 0)
    assert long >= 2 and manifest["sequence_budget"]["over_budget"] == long  # counted by the shard build
    assert manifest["sequence_budget"]["statuses"] == {"ok": len(kinds) - long, "truncated": long}
    tars = [str(shards / s["name"]) for s in manifest["shards"]]
    written = [(key, members) for tar in tars for key, members in iter_tar_samples(tar)]
    suffixes = [next((k for k in members if k != "json"), "text") for _, members in written]
    assert suffixes == kinds
    rows = list(read_rows(tars, None))  # real Ray Data read_webdataset, blocks mixing suffixes
    assert [r["__key__"] for r in rows] == [key for key, _ in written]
    for row, (_, members) in zip(rows, written):
        assert {k: v for k, v in row.items() if k != "__key__"} == members


def test_stage1_with_online_encoders_trains_a_whole_epoch_of_mixed_formats(mixed):
    from mocha.cli import main
    from mocha.demo.pipeline import DemoConfig, demo_job

    root, shards, kinds = mixed
    cfg = DemoConfig(out=str(root), llm_pretrain_steps=0, global_batch_size=GLOBAL_BATCH, width=64)
    job = demo_job(cfg, 1, root).model_dump(mode="json")
    steps = -(-len(kinds) // GLOBAL_BATCH)  # ceil: every sample is read at least once
    job["data"].update(shards=str(shards), features=None)
    job["schedule"].update(max_steps=steps, log_every=1)
    job["checkpoint"].update(every_steps=steps)
    job["run"].update(name="mixed-s1")
    path = root / "stage1_mixed.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path)]) == 0

    records = [json.loads(line) for line in (root / "train" / "mixed-s1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert sum(r["samples"] for r in records) == steps * GLOBAL_BATCH >= len(kinds)
    assert all(r["masked_samples"] == 0 for r in records)  # every image and text-only sample trained
    long = sum(1 for i, kind in enumerate(kinds) if kind == "text" and i % LONG_EVERY == 0)
    # every long sample was read at least once; the reads past the epoch may repeat some
    assert long <= sum(r["over_budget_samples"] for r in records) <= long + steps * GLOBAL_BATCH - len(kinds)
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite, no NaN
    assert (root / "train" / "mixed-s1" / "export" / "model.safetensors").exists()
