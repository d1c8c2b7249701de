"""Generated LLaVA-style datasets for the pipeline tests: small PNG/JPEG images with PIL plus
one record of every bad-input kind the shard job must quarantine."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

#: Pixel limit the tests pass to the shard job; ``too_large`` images exceed it.
TEST_MAX_PIXELS = 128 * 128


def encode_image(rng: random.Random, fmt: str, size: tuple[int, int], noise: bool = False) -> bytes:
    """An image of ``size`` in ``fmt``: flat colour with a few rectangles, or (``noise``) random
    pixels, which do not compress, so the file size is about ``3 * width * height``."""
    if noise:
        im = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        return buf.getvalue()
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):  # a few rectangles so images differ and compress non-trivially
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        im.paste(tuple(rng.randrange(256) for _ in range(3)), (x0, y0, min(size[0], x0 + 8), min(size[1], y0 + 8)))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def good_record(sample_id: str, image: str | None, turns: int = 1) -> dict:
    convs = []
    for t in range(turns):
        question = f"What is in picture {sample_id}? (turn {t})"
        if t == 0 and image is not None:
            question = "<image>\n" + question
        convs += [{"from": "human", "value": question}, {"from": "gpt", "value": f"Answer {t} for {sample_id}."}]
    rec = {"id": sample_id, "conversations": convs}
    if image is not None:
        rec["image"] = image
    return rec


@dataclass
class GeneratedDataset:
    """A dataset on local disk: ``records`` in input order and what each should become."""

    root: Path
    images: Path
    records: list = field(default_factory=list)  # parsed records, or raw bytes lines for JSONL-only faults
    expected_reasons: dict[int, str] = field(default_factory=dict)  # input index -> quarantine reason
    image_bytes: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes
    late: set[int] = field(default_factory=set)  # accepted later copies of an id whose first copy was bad

    @property
    def accepted_indices(self) -> list[int]:
        """Accepted records in shard order: input order, except that a later copy of a duplicated
        id that wins (its earlier copy was rejected) is built after all the others."""
        first = [i for i in range(len(self.records)) if i not in self.expected_reasons and i not in self.late]
        return first + sorted(self.late)

    def task_rows(self) -> list[int]:
        """Input indices the shard job hands to its chunk tasks, in order (not the lines that fail
        to parse, not the later copies of an id, which wait for the first copy's verdict)."""
        seen, rows = set(), []
        for i, rec in enumerate(self.records):
            if isinstance(rec, bytes):
                continue
            sid = rec.get("id") if isinstance(rec, dict) else None
            if isinstance(sid, (str, int)) and not isinstance(sid, bool):
                if str(sid) in seen:
                    continue
                seen.add(str(sid))
            rows.append(i)
        return rows

    def expected_shard_counts(self, per_shard: int) -> list[int]:
        """Samples per shard: accepted records of each chunk of ``per_shard`` task rows (chunks
        with none make no shard), then the late winners' chunks."""
        rows, accepted = self.task_rows(), set(self.accepted_indices) - self.late
        counts = [sum(i in accepted for i in rows[k:k + per_shard]) for k in range(0, len(rows), per_shard)]
        late = sorted(self.late)
        counts += [len(late[k:k + per_shard]) for k in range(0, len(late), per_shard)]
        return [c for c in counts if c]

    def write_json(self, name: str = "data.json") -> Path:
        assert all(not isinstance(r, bytes) for r in self.records), "raw lines need JSON Lines"
        path = self.root / name
        path.write_text(json.dumps(self.records, indent=1, ensure_ascii=False))
        return path

    def write_jsonl(self, name: str = "data.jsonl") -> Path:
        path = self.root / name
        with open(path, "wb") as f:
            for r in self.records:
                f.write((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n")
        return path


def make_dataset(root: Path, num_good: int, bad: bool = True, seed: int = 0, jsonl_faults: bool = False,
                 image_size: tuple[int, int] = (24, 40), noise: bool = False) -> GeneratedDataset:
    """``num_good`` valid samples (PNG and JPEG, some text-only, some multi-turn, odd ids), and
    with ``bad`` one record per quarantine reason interleaved at fixed positions."""
    rng = random.Random(seed)
    images = root / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    ds = GeneratedDataset(root=root, images=images)

    def add_image(rel: str, data: bytes) -> str:
        (images / rel).write_bytes(data)
        ds.image_bytes[rel] = data
        return rel

    bad_records = _bad_records(rng, add_image, images, jsonl_faults) if bad else []
    slots = {int((k + 1) * num_good / (len(bad_records) + 1)): rec for k, rec in enumerate(bad_records)}
    assert len(slots) == len(bad_records) and min(slots, default=2) > 1, "num_good too small for every bad kind"
    for i in range(num_good):
        if i in slots:
            reason, rec = slots[i]
            if reason == "late_winner":  # a good copy of an id whose first copy was bad: accepted
                ds.late.add(len(ds.records))
            else:
                ds.expected_reasons[len(ds.records)] = reason
            ds.records.append(rec)
        sample_id = f"s{i}.v1/{rng.randrange(10**6)}" if i % 7 == 3 else f"sample-{i}"
        if i % 10 == 9:
            ds.records.append(good_record(sample_id, None))
            continue
        fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        size = (rng.randint(*image_size), rng.randint(*image_size))
        rel = add_image(f"sub/img_{i}.{ext}" if i % 3 else f"img_{i}.{ext}", encode_image(rng, fmt, size, noise))
        ds.records.append(good_record(sample_id, rel, turns=1 + i % 3))
    if (images / "inside_link.png").is_symlink():
        ds.image_bytes["inside_link.png"] = (images / "inside_link.png").read_bytes()
    return ds


def _bad_records(rng: random.Random, add_image, images: Path, jsonl_faults: bool) -> list[tuple[str, object]]:
    """(expected reason, record) of every bad-input kind; ``late_winner`` marks a record that is
    accepted although its id was used before (the earlier copy was rejected)."""
    png = encode_image(rng, "PNG", (32, 32))
    outside = images.parent / "outside"  # valid images next to the image root, reachable only by links
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes(png)
    (images / "link_out.png").symlink_to(outside / "secret.png")
    (images / "linked_dir").symlink_to(outside, target_is_directory=True)
    (images / "a_folder.png").mkdir()
    (images / "a_folder.png" / "inner.txt").write_text("a folder named like an image (an S3 key prefix once uploaded)")
    (images / "inside_link.png").symlink_to(images / "ok1.png")  # a link that stays inside: fine
    jpg = encode_image(rng, "JPEG", (32, 32))
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, format="BMP")
    big = encode_image(rng, "PNG", (200, 200))
    out = [
        ("missing_image", good_record("bad-missing", "nope/missing.png")),
        ("unreadable_image", good_record("bad-truncated-png", add_image("trunc.png", png[: len(png) // 2]))),
        ("unreadable_image", good_record("bad-truncated-jpg", add_image("trunc.jpg", jpg[: len(jpg) // 2]))),
        ("not_an_image", good_record("bad-text", add_image("text.jpg", b"this is not an image at all\n" * 10))),
        ("unsupported_image_format", good_record("bad-bmp", add_image("scan.bmp", bmp.getvalue()))),
        ("image_too_large", good_record("bad-big", add_image("big.png", big))),
        ("image_token_mismatch", {"id": "bad-no-token", "image": add_image("ok1.png", png),
                                  "conversations": [{"from": "human", "value": "Describe."},
                                                    {"from": "gpt", "value": "A square."}]}),
        ("image_token_mismatch", {"id": "bad-token-no-image",
                                  "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                    {"from": "gpt", "value": "A square."}]}),
        ("empty_conversation", {"id": "bad-empty", "conversations": []}),
        ("malformed_conversation", {"id": "bad-turn", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}),
        ("non_alternating_roles", {"id": "bad-roles", "conversations": [{"from": "gpt", "value": "hi"},
                                                                        {"from": "human", "value": "hello"}]}),
        ("duplicate_id", good_record("sample-1", None)),
        ("malformed_record", ["not", "an", "object"]),
        ("outside_root", good_record("bad-link-file", "link_out.png")),
        ("outside_root", good_record("bad-link-dir", "linked_dir/secret.png")),
        ("not_a_file", good_record("bad-folder", "a_folder.png")),
        ("invalid_path", good_record("bad-nul", "nul\x00byte.png")),
        ("invalid_path", good_record("bad-long", "x" * 300 + ".png")),
        ("missing_image", good_record("dup-first-bad", "nope/first-copy.png")),
        ("late_winner", good_record("dup-first-bad", "inside_link.png")),
        ("duplicate_id", good_record("dup-first-bad", None)),
    ]
    if jsonl_faults:
        out += [("invalid_utf8", b'{"id": "bad-\xff\xfe", "conversations": []}'),
                ("invalid_json", b'{"id": "bad-json", "conversations": [')]
    return out

