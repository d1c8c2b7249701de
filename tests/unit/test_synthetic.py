"""The synthetic coloured-shapes demo dataset (mocha.demo.synthetic)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocha.demo.synthetic import (
    EXISTENCE_QUESTIONS,
    ALL_OBJECT_NAMES,
    BACKGROUND,
    COLOURS,
    MME_SUBTASKS,
    POPE_STRATEGIES,
    generate_shapes_dataset,
    iter_all_texts,
)
from mocha.text.conversation import IMAGE_TOKEN, VICUNA_SYSTEM, tokenize_conversation
from mocha.text.tokenizer import train_bpe_tokenizer

NUM_TRAIN, NUM_EVAL, IMAGE_SIZE = 40, 30, 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("shapes")
    paths = generate_shapes_dataset(out_dir, num_train=NUM_TRAIN, num_eval=NUM_EVAL, image_size=IMAGE_SIZE, seed=3)
    scenes = json.loads(paths.scenes.read_text())
    return paths, scenes


def names_in(scenes, image):
    return {f"{o['colour']} {o['shape']}" for o in scenes[image]["objects"]}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = generate_shapes_dataset(tmp_path / "a", num_train=12, num_eval=8, seed=5).root
    second = generate_shapes_dataset(tmp_path / "b", num_train=12, num_eval=8, seed=5).root
    other = generate_shapes_dataset(tmp_path / "c", num_train=12, num_eval=8, seed=6).root
    files = tree_bytes(first)
    assert len([f for f in files if f.endswith(".png")]) == 20
    assert files == tree_bytes(second)
    assert files["stage2.json"] != tree_bytes(other)["stage2.json"]


def test_images_decode_and_show_the_described_colours(dataset):
    paths, scenes = dataset
    assert len(scenes) == NUM_TRAIN + NUM_EVAL
    for image_name, scene in scenes.items():
        pixels = np.asarray(Image.open(paths.image_dir / image_name).convert("RGB"))
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["box"]
            region = pixels[y0 : y1 + 1, x0 : x1 + 1]
            share = np.all(region == COLOURS[obj["colour"]], axis=-1).mean()
            assert share > 0.4, f"{image_name}: {obj} covers only {share:.0%} of its box"
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[obj["colour"]]
            outside[y0 : y1 + 1, x0 : x1 + 1] = False
        assert np.all(pixels[outside] == BACKGROUND)
        absent = set(COLOURS) - {o["colour"] for o in scene["objects"]}
        for colour in absent:
            assert not np.any(np.all(pixels == COLOURS[colour], axis=-1)), f"{image_name}: {colour} drawn but not described"


def test_objects_do_not_overlap_and_counts_vary(dataset):
    _, scenes = dataset
    counts = Counter(len(s["objects"]) for s in scenes.values())
    assert set(counts) == {1, 2, 3}
    for scene in scenes.values():
        boxes = [o["box"] for o in scene["objects"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_stage1_captions_list_the_objects_left_to_right(dataset):
    paths, scenes = dataset
    records = json.loads(paths.stage1.read_text())
    assert len(records) == NUM_TRAIN
    for record in records:
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": IMAGE_TOKEN}
        objects = sorted(scenes[record["image"]]["objects"], key=lambda o: o["box"][0] + o["box"][2])
        mentioned = re.findall(r"\b(\w+) (circle|square|triangle|diamond)\b", gpt["value"])
        assert [f"{c.lower()} {s}" for c, s in mentioned] == [f"{o['colour']} {o['shape']}" for o in objects]


_MME_FORMS = {
    "existence": r"Is there a (\w+ (?:circle|square|triangle|diamond)) in this image\?",
    "count": r"(?:Is|Are) there (\d) shapes? in this image\?",
    "color": r"Is there a (\w+) object in this image\?",
    "position": r"Is the (\w+ \w+) on the (left|right) of the (\w+ \w+)\?",
}


def mme_form(question: str) -> str:
    (form,) = [name for name, pattern in _MME_FORMS.items() if re.fullmatch(pattern, question)]
    return form


def mme_truth(question: str, objects: list[dict]) -> bool:
    """Whether an MME-form yes/no question (suffix removed) is true of the scene's objects."""
    form = mme_form(question)
    m = re.fullmatch(_MME_FORMS[form], question)
    if form == "existence":
        return m[1] in {f"{o['colour']} {o['shape']}" for o in objects}
    if form == "count":
        return int(m[1]) == len(objects)
    if form == "color":
        return m[1] in {o["colour"] for o in objects}
    a, side, b = m.groups()
    box = {f"{o['colour']} {o['shape']}": o["box"] for o in objects}
    a_left_of_b = box[a][2] < box[b][0]
    assert a_left_of_b or box[b][2] < box[a][0]  # only clearly separated pairs are asked
    return a_left_of_b == (side == "left")


def check_answer(question: str, answer: str, objects: list[dict]) -> None:
    names = {f"{o['colour']} {o['shape']}" for o in objects}
    if question.endswith(" Please answer yes or no."):  # MME's forms, asked in the stage-2 mix too
        assert answer == ("Yes." if mme_truth(question.removesuffix(" Please answer yes or no."), objects) else "No.")
    elif m := re.fullmatch(r"Is there a (\w+ \w+) in the image\?", question):
        assert answer == ("Yes." if m[1] in names else "No.")
    elif question == "How many shapes are in the image?":
        n = len(objects)
        assert answer == ("There is 1 shape." if n == 1 else f"There are {n} shapes.")
    elif m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (obj,) = [o for o in objects if o["shape"] == m[1]]
        assert answer == obj["colour"].capitalize() + "."
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (obj,) = [o for o in objects if o["colour"] == m[1]]
        assert answer == f"A {obj['shape']}."
    else:
        raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("split_file", ["stage2", "stage2_eval"])
def test_instruction_answers_match_the_scene(dataset, split_file):
    paths, scenes = dataset
    records = json.loads(getattr(paths, split_file).read_text())
    assert len(records) == (NUM_TRAIN if split_file == "stage2" else NUM_EVAL)
    existence = Counter()
    for record in records:
        turns = record["conversations"]
        assert turns[0]["value"].startswith(IMAGE_TOKEN + "\n")
        assert sum(IMAGE_TOKEN in t["value"] for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) >= 6
        answers = Counter()
        for human, gpt in zip(turns[::2], turns[1::2]):
            check_answer(human["value"].removeprefix(IMAGE_TOKEN + "\n"), gpt["value"], scenes[record["image"]]["objects"])
            if re.fullmatch(r"Is there a \w+ \w+ in the image\?", human["value"].removeprefix(IMAGE_TOKEN + "\n")):
                answers[gpt["value"]] += 1
        assert sum(answers.values()) == EXISTENCE_QUESTIONS  # labels drawn one by one
        existence.update(answers)
    assert 0.4 <= existence["Yes."] / sum(existence.values()) <= 0.6, existence


@pytest.mark.parametrize("strategy", POPE_STRATEGIES)
def test_pope_files_are_balanced_and_correct(dataset, strategy):
    paths, scenes = dataset
    questions = read_jsonl(paths.pope[strategy])
    assert [q["question_id"] for q in questions] == list(range(len(questions)))
    assert all(set(q) == {"question_id", "image", "text", "label"} for q in questions)
    labels = Counter(q["label"] for q in questions)
    assert labels["yes"] == labels["no"] == sum(len(s["objects"]) for s in scenes.values() if s["split"] == "eval")
    eval_images = {name for name, s in scenes.items() if s["split"] == "eval"}
    frequency = Counter(n for image in eval_images for n in names_in(scenes, image))
    for image in eval_images:
        asked = [q for q in questions if q["image"] == image]
        objects = [re.fullmatch(r"Is there a (\w+ \w+) in the image\?", q["text"])[1] for q in asked]
        assert len(set(objects)) == len(objects)  # no question repeated for an image
        present = names_in(scenes, image)
        for q, name in zip(asked, objects):
            assert q["label"] == ("yes" if name in present else "no")
        negatives = [n for q, n in zip(asked, objects) if q["label"] == "no"]
        if strategy == "popular":
            absent = sorted((n for n in ALL_OBJECT_NAMES if n not in present), key=lambda n: (-frequency[n], n))
            assert negatives == absent[: len(negatives)]
        if strategy == "adversarial":
            def shares(name):
                colour, shape = name.split()
                return any(p.split()[0] == colour or p.split()[1] == shape for p in present)

            similar = [n for n in ALL_OBJECT_NAMES if n not in present and shares(n)]
            # every similar absent object is used before any other one
            assert sum(map(shares, negatives)) == min(len(negatives), len(similar)), (image, negatives)


def test_mme_pairs_one_yes_one_no_per_image_and_are_correct(dataset):
    paths, scenes = dataset
    eval_images = sorted(name for name, s in scenes.items() if s["split"] == "eval")
    for subtask in MME_SUBTASKS:
        rows = [line.split("\t") for line in (paths.mme_dir / f"{subtask}.txt").read_text().splitlines()]
        assert all(len(r) == 3 for r in rows)
        pairs = list(zip(rows[::2], rows[1::2]))
        assert all(yes[0] == no[0] and (yes[2], no[2]) == ("Yes", "No") for yes, no in pairs)
        images = [yes[0] for yes, _ in pairs]
        assert len(set(images)) == len(images)
        if subtask != "position":
            assert images == eval_images
        for image, question, answer in rows:
            question = question.removesuffix(" Please answer yes or no.")
            assert mme_form(question) == subtask, question
            truth = mme_truth(question, scenes[image]["objects"])
            assert answer == ("Yes" if truth else "No"), (subtask, image, question)
        if subtask == "position":  # the side word alone must not give the answer
            assert {re.search(r"on the (left|right)", yes[1])[1] for yes, _ in pairs} == {"left", "right"}


@pytest.mark.parametrize("family,template", [("phi", "phi"), ("llama", "vicuna_v1")])
def test_tokenizer_from_the_texts_tokenises_every_training_sample(dataset, tmp_path, family, template):
    paths, _ = dataset
    texts = list(iter_all_texts(paths, templates=[template, "plain"]))
    assert sum(VICUNA_SYSTEM in t for t in texts) == NUM_TRAIN * 2  # stage1 + stage2 rendered with the template
    assert not any(IMAGE_TOKEN in t for t in texts)
    tokenizer = train_bpe_tokenizer(texts, tmp_path, vocab_size=512, family=family)
    for stage_file, stage_template in ((paths.stage1, "plain"), (paths.stage2, template)):
        for record in json.loads(stage_file.read_text()):
            sample = tokenize_conversation(record["conversations"], tokenizer, stage_template, sample_id=record["id"])
            assert sample.status == "ok", sample.detail


def test_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="num_train and num_eval"):
        generate_shapes_dataset(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes_dataset(tmp_path, image_size=16)
