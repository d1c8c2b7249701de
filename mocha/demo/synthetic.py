"""The demo dataset: coloured shapes, with captions, instructions and POPE/MME evaluation files.

Every image shows 1-3 non-overlapping objects on a light background; an object is one of
:data:`ALL_OBJECT_NAMES` (8 kinds: a shape of :data:`SHAPES` in its own colour), drawn without anti-aliasing so each
object's pixels have exactly its colour. Positions and sizes vary. Whether a red circle is in
the image is only answerable by looking at it, so a model that beats chance on the evaluation
files has learned to use its visual tokens.

Layout written under ``out_dir`` (all ``image`` fields are file names inside ``images/``, the
image folder LLaVA's loaders take separately)::

    images/train_00000.png ...   training images
    images/eval_00000.png ...    held-out images (evaluation files only refer to these)
    scenes.json     ground truth: {"train_00000.png": {"split": "train", "objects":
                    [{"shape": "circle", "colour": "red", "box": [x0, y0, x1, y1]}, ...]}, ...}
                    (box: inclusive pixel corners of the object's square bounding box)
    stage1.json     LLaVA JSON list, one caption per training image (``plain`` template):
                    {"id": "train_00000", "image": "train_00000.png", "conversations":
                     [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red circle and a blue square."}]}
    stage2.json     LLaVA JSON list, multi-turn instructions per training image: colour, shape,
                    count and yes/no existence questions (at least one "Yes." and one "No."
                    existence question per image); the first human value starts "<image>\\n".
    stage2_eval.json the same for the held-out images (held-out loss, generation examples).
    pope_random.jsonl, pope_popular.jsonl, pope_adversarial.jsonl
                    POPE question files (official format), one JSON object per line:
                    {"question_id": 0, "image": "eval_00000.png", "text": "Is there a red circle in the image?", "label": "yes"}
                    For each object in an image: one "yes" question about it and one "no"
                    question about an absent object, so yes/no are exactly balanced. Absent
                    objects are sampled: random — uniformly; popular — the most frequent
                    objects of the held-out split; adversarial — objects sharing a colour or a
                    shape with a present one, most often co-occurring with the present ones first.
    mme/<subtask>.txt   MME's ground-truth layout, one file per subtask (existence, count,
                    color, position), tab-separated ``image<TAB>question<TAB>answer`` lines; each
                    image has two consecutive lines, answer "Yes" then "No" (the layout MME's
                    ``calculation.py`` scores once a prediction column is appended). Position
                    questions only for images with two horizontally separated objects.
    corpus.txt      training text, one caption / question / answer per line (tokenizer training).

Generation is deterministic for a seed: each image draws from its own generator seeded by
(seed, split, index), the evaluation files from generators seeded by (seed, file); the files
are byte-identical across runs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mocha.text.conversation import IMAGE_TOKEN, render_conversation

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
    "cyan": (20, 190, 200),
    "black": (20, 20, 20),
}
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
POPE_STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")
MME_SUBTASKS: tuple[str, ...] = ("existence", "count", "color", "position")

_SPLIT_IDS = {"train": 0, "eval": 1}
_MIN_SIZE, _MAX_SIZE = 0.22, 0.34  # object size as a fraction of the image side
_GAP = 2  # pixels between object boxes
_MAX_PLACEMENT_TRIES = 1000


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    image: str  # file name in images/
    split: str
    objects: tuple[SceneObject, ...]

    @property
    def names(self) -> set[str]:
        return {o.name for o in self.objects}


@dataclass(frozen=True)
class DatasetPaths:
    """Where :func:`generate_shapes_dataset` wrote each file (see module docstring)."""

    root: Path
    image_dir: Path
    scenes: Path
    stage1: Path
    stage2: Path
    stage2_eval: Path
    pope: dict[str, Path]  # strategy -> question file
    mme_dir: Path
    corpus: Path

    @classmethod
    def under(cls, root: str | Path) -> "DatasetPaths":
        root = Path(root)
        return cls(
            root=root,
            image_dir=root / "images",
            scenes=root / "scenes.json",
            stage1=root / "stage1.json",
            stage2=root / "stage2.json",
            stage2_eval=root / "stage2_eval.json",
            pope={s: root / f"pope_{s}.jsonl" for s in POPE_STRATEGIES},
            mme_dir=root / "mme",
            corpus=root / "corpus.txt",
        )


#: The object kinds: every colour belongs to exactly one shape (each shape has two colours), so
#: colour alone identifies an object: frozen *random* encoders carry colour in their features
#: (a linear probe finds it) but hardly the outline of a 10-pixel shape. Adversarial negatives
#: still share the shape of a present object. (This alone does not make existence learnable in
#: the demo's budget: the from-scratch LLM does not learn the question-dependent look-up, see
#: the README's "What the demo shows today".)
ALL_OBJECT_NAMES: tuple[str, ...] = tuple(f"{c} {SHAPES[i % len(SHAPES)]}" for i, c in enumerate(COLOURS))


# ----------------------------------------------------------------------------- scenes


def sample_scene(rng: np.random.Generator, image_size: int, max_objects: int = 3) -> tuple[SceneObject, ...]:
    """1..max_objects objects of distinct (colour, shape), non-overlapping, at random places."""
    count = int(rng.integers(1, max_objects + 1))
    kinds = rng.choice(len(ALL_OBJECT_NAMES), size=count, replace=False)
    objects: list[SceneObject] = []
    for kind in kinds:
        colour, shape = ALL_OBJECT_NAMES[kind].split()
        for _ in range(_MAX_PLACEMENT_TRIES):
            size = int(rng.integers(round(_MIN_SIZE * image_size), round(_MAX_SIZE * image_size) + 1))
            x0 = int(rng.integers(0, image_size - size + 1))
            y0 = int(rng.integers(0, image_size - size + 1))
            box = (x0, y0, x0 + size - 1, y0 + size - 1)
            if all(not _boxes_touch(box, other.box) for other in objects):
                objects.append(SceneObject(shape, colour, box))
                break
        else:
            raise RuntimeError(f"could not place {count} objects without overlap in a {image_size}px image")
    return tuple(objects)


def _boxes_touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (a[2] + _GAP < b[0] or b[2] + _GAP < a[0] or a[3] + _GAP < b[1] or b[3] + _GAP < a[1])


def draw_scene(objects: Iterable[SceneObject], image_size: int) -> Image.Image:
    """Render objects as flat-filled shapes (no anti-aliasing: exact colours)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


# ----------------------------------------------------------------------------- text


def join_objects(names: Sequence[str]) -> str:
    """"a red circle", "a red circle and a blue square", "a red circle, a blue square and ..."."""
    phrases = [f"a {n}" for n in names]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Objects from left to right, e.g. "A red circle and a blue square."."""
    listed = join_objects([o.name for o in sorted(scene.objects, key=lambda o: o.centre_x)])
    pattern = ("{}.", "An image with {}.", "There is {} in the image.")[int(rng.integers(3))]
    text = pattern.format(listed)
    return text[0].upper() + text[1:]


def existence_question(name: str) -> str:
    return f"Is there a {name} in the image?"


def _absent_object(scene: Scene, rng: np.random.Generator) -> str:
    """An absent object; half the time one sharing a colour or shape with a present one."""
    absent = [n for n in ALL_OBJECT_NAMES if n not in scene.names]
    similar = [n for n in absent if _shares_attribute(n, scene)]
    pool = similar if similar and rng.random() < 0.5 else absent
    return pool[int(rng.integers(len(pool)))]


def _shares_attribute(name: str, scene: Scene) -> bool:
    colour, shape = name.split()
    return any(o.colour == colour or o.shape == shape for o in scene.objects)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


#: Existence questions per stage-2 conversation (:func:`instruction_turns`).
EXISTENCE_QUESTIONS = 3

#: Yes/no questions in MME's forms per stage-2 conversation (distinct forms).
YES_NO_QUESTIONS = 1

#: The suffix MME puts on its yes/no questions (and the demo's stage-2 data on its own).
YES_NO_SUFFIX = " Please answer yes or no."


def _yes_no_forms(scene: Scene, rng: np.random.Generator, positional: bool) -> list[tuple[str, str]]:
    """One yes/no question in each of MME's forms the scene allows (existence, count, colour and,
    with ``positional``, left/right), its label drawn at random, the suffix included."""
    yes = rng.random() < 0.5
    present = scene.objects[int(rng.integers(len(scene.objects)))]
    forms = [f"Is there a {present.name if yes else _absent_object(scene, rng)} in this image?"]
    count = len(scene.objects)
    forms.append(_count_question(count if yes else [n for n in range(1, 5) if n != count][int(rng.integers(3))]))
    colours = sorted({o.colour for o in scene.objects})
    pool = colours if yes else [c for c in COLOURS if c not in colours]
    forms.append(f"Is there a {pool[int(rng.integers(len(pool)))]} object in this image?")
    by_x = sorted(scene.objects, key=lambda o: o.centre_x)
    if positional and len(by_x) > 1 and by_x[0].box[2] < by_x[-1].box[0]:
        left, right = by_x[0], by_x[-1]
        subject, other, side = (left, right, "left") if rng.random() < 0.5 else (right, left, "right")
        if not yes:
            side = "right" if side == "left" else "left"
        forms.append(f"Is the {subject.name} on the {side} of the {other.name}?")
    answer = "Yes." if yes else "No."
    return [(f + YES_NO_SUFFIX, answer) for f in forms]


def instruction_turns(scene: Scene, rng: np.random.Generator, positional: bool = True) -> list[dict[str, str]]:
    """A multi-turn LLaVA conversation about the scene (first human value starts "<image>\\n"),
    a small LLaVA-665K-like mix of question kinds, in random order:

    - :data:`EXISTENCE_QUESTIONS` existence questions ("Is there a red circle in the image?"), each
      about a present object ("Yes.") or an absent one ("No.", half the time one sharing a colour or
      shape with a present one) with probability 1/2 on its own, so that no answer can be inferred
      from the others (with a fixed yes/no count per conversation a tiny model learns to answer the
      last one from the earlier answers instead of from the image); no object is asked twice;
    - one or two open questions: colour of a shape that occurs once, shape of a colour that occurs
      once, object count;
    - one yes/no question in one of MME's forms (existence, count, colour, left/right; the last
      only with ``positional``), suffixed "Please answer yes or no." like MME's.

    ``positional=False`` leaves out what depends on where objects are (the text pre-training's
    scenes are written as an unordered list).
    """
    pairs = []
    unasked = [o.name for o in scene.objects]
    for _ in range(EXISTENCE_QUESTIONS):
        if unasked and rng.random() < 0.5:  # each label drawn on its own: the others do not give it away
            pairs.append((existence_question(unasked.pop(int(rng.integers(len(unasked))))), "Yes."))
        else:
            name = _absent_object(scene, rng)
            while any(existence_question(name) == q for q, _ in pairs):
                name = _absent_object(scene, rng)
            pairs.append((existence_question(name), "No."))
    shapes = Counter(o.shape for o in scene.objects)
    colours = Counter(o.colour for o in scene.objects)
    count = len(scene.objects)
    extras = [("How many shapes are in the image?", f"There {'is' if count == 1 else 'are'} {_plural(count, 'shape')}.")]
    extras += [(f"What colour is the {o.shape}?", f"{o.colour.capitalize()}.") for o in scene.objects if shapes[o.shape] == 1]
    extras += [(f"What shape is the {o.colour} object?", f"A {o.shape}.") for o in scene.objects if colours[o.colour] == 1]
    picked = rng.choice(len(extras), size=min(len(extras), int(rng.integers(1, 3))), replace=False)
    pairs += [extras[i] for i in picked]
    forms = _yes_no_forms(scene, rng, positional)
    pairs += [forms[i] for i in rng.choice(len(forms), size=min(len(forms), YES_NO_QUESTIONS), replace=False)]
    order = rng.permutation(len(pairs))
    turns: list[dict[str, str]] = []
    for position, i in enumerate(order):
        question, answer = pairs[i]
        prefix = f"{IMAGE_TOKEN}\n" if position == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


# ----------------------------------------------------------------------------- evaluation files


def _pope_negatives(
    scene: Scene, strategy: str, frequency: Counter[str], co_occurrence: Counter[tuple[str, str]], rng: np.random.Generator
) -> list[str]:
    """One distinct absent object per present one, chosen by the POPE ``strategy``."""
    absent = [n for n in ALL_OBJECT_NAMES if n not in scene.names]
    wanted = len(scene.objects)
    if strategy == "random":
        return [absent[i] for i in rng.choice(len(absent), size=wanted, replace=False)]
    if strategy == "popular":
        return sorted(absent, key=lambda n: (-frequency[n], n))[:wanted]
    co_occurring = {n: sum(co_occurrence[(p, n)] for p in scene.names) for n in absent}
    # objects sharing a colour or shape with a present one first (most co-occurring first); when
    # there are fewer of those than present objects, the most co-occurring others fill up
    ranked = sorted(absent, key=lambda n: (not _shares_attribute(n, scene), -co_occurring[n], -frequency[n], n))
    return ranked[:wanted]


def pope_questions(scenes: Sequence[Scene], strategy: str, rng: np.random.Generator) -> list[dict]:
    """POPE questions: per present object a "yes" one and a "no" one about a distinct absent
    object chosen by ``strategy`` (random / popular / adversarial, see module docstring)."""
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"POPE strategy must be one of {POPE_STRATEGIES}, got {strategy!r}")
    frequency = Counter(o.name for s in scenes for o in s.objects)
    co_occurrence = Counter((a.name, b.name) for s in scenes for a in s.objects for b in s.objects if a is not b)
    questions: list[dict] = []
    for scene in scenes:
        negatives = _pope_negatives(scene, strategy, frequency, co_occurrence, rng)
        for obj, negative in zip(scene.objects, negatives, strict=True):
            for name, label in ((obj.name, "yes"), (negative, "no")):
                question = {"question_id": len(questions), "image": scene.image, "text": existence_question(name)}
                questions.append(question | {"label": label})
    return questions


def _count_question(n: int) -> str:
    return f"{'Is' if n == 1 else 'Are'} there {_plural(n, 'shape')} in this image?"


def mme_questions(scenes: Sequence[Scene], rng: np.random.Generator) -> dict[str, list[tuple[str, str, str]]]:
    """MME-style paired questions per subtask: for each image (image, question, "Yes") then
    (image, question, "No")."""
    suffix = YES_NO_SUFFIX
    subtasks: dict[str, list[tuple[str, str, str]]] = {name: [] for name in MME_SUBTASKS}
    for scene in scenes:
        def pair(subtask: str, yes: str, no: str) -> None:
            subtasks[subtask] += [(scene.image, yes + suffix, "Yes"), (scene.image, no + suffix, "No")]

        present = scene.objects[int(rng.integers(len(scene.objects)))]
        pair("existence", f"Is there a {present.name} in this image?", f"Is there a {_absent_object(scene, rng)} in this image?")
        count = len(scene.objects)
        wrong = [n for n in range(1, 5) if n != count][int(rng.integers(3))]
        pair("count", _count_question(count), _count_question(wrong))
        colours_present = sorted({o.colour for o in scene.objects})
        colours_absent = [c for c in COLOURS if c not in colours_present]
        yes_colour = colours_present[int(rng.integers(len(colours_present)))]
        no_colour = colours_absent[int(rng.integers(len(colours_absent)))]
        pair("color", f"Is there a {yes_colour} object in this image?", f"Is there a {no_colour} object in this image?")
        by_x = sorted(scene.objects, key=lambda o: o.centre_x)
        left, right = by_x[0], by_x[-1]
        if len(by_x) > 1 and left.box[2] < right.box[0]:  # strictly separated horizontally
            # either object can be the subject, so the side word alone does not give the answer
            subject, other, side, wrong = ((left, right, "left", "right") if rng.random() < 0.5
                                           else (right, left, "right", "left"))
            pair("position", f"Is the {subject.name} on the {side} of the {other.name}?",
                 f"Is the {subject.name} on the {wrong} of the {other.name}?")
    return subtasks


# ----------------------------------------------------------------------------- writing


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _make_split(
    split: str, count: int, image_size: int, seed: int, image_dir: Path, progress: bool
) -> list[tuple[Scene, np.random.Generator]]:
    """Draw and save ``count`` scenes; each comes with its own generator for its text."""
    scenes = []
    for index in tqdm(range(count), desc=f"drawing {split} images", disable=not progress):
        rng = _scene_rng(seed, split, index)
        scene = Scene(image=f"{split}_{index:05d}.png", split=split, objects=sample_scene(rng, image_size))
        draw_scene(scene.objects, image_size).save(image_dir / scene.image, format="PNG", optimize=False)
        scenes.append((scene, rng))
    return scenes


def _llava_record(scene: Scene, conversations: list[dict[str, str]]) -> dict:
    return {"id": Path(scene.image).stem, "image": scene.image, "conversations": conversations}


def generate_shapes_dataset(
    out_dir: str | Path,
    num_train: int = 512,
    num_eval: int = 64,
    image_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> DatasetPaths:
    """Write the coloured-shapes dataset (layout in the module docstring) and return its paths."""
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train and num_eval must be >= 1, got {num_train}, {num_eval}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels to fit three objects, got {image_size}")
    paths = DatasetPaths.under(out_dir)
    paths.image_dir.mkdir(parents=True, exist_ok=True)
    paths.mme_dir.mkdir(exist_ok=True)

    train = _make_split("train", num_train, image_size, seed, paths.image_dir, progress)
    held_out = _make_split("eval", num_eval, image_size, seed, paths.image_dir, progress)
    _write_json(
        paths.scenes,
        {s.image: {"split": s.split, "objects": [asdict(o) for o in s.objects]} for s, _ in train + held_out},
    )

    stage1 = [
        _llava_record(s, [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption(s, rng)}])
        for s, rng in train
    ]
    stage2 = [_llava_record(s, instruction_turns(s, rng)) for s, rng in train]
    _write_json(paths.stage1, stage1)
    _write_json(paths.stage2, stage2)
    _write_json(paths.stage2_eval, [_llava_record(s, instruction_turns(s, rng)) for s, rng in held_out])

    eval_scenes = [s for s, _ in held_out]
    for i, strategy in enumerate(POPE_STRATEGIES):
        _write_jsonl(paths.pope[strategy], pope_questions(eval_scenes, strategy, np.random.default_rng([seed, 2, i])))
    for subtask, rows in mme_questions(eval_scenes, np.random.default_rng([seed, 3])).items():
        (paths.mme_dir / f"{subtask}.txt").write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")

    texts = [t["value"].replace(IMAGE_TOKEN, "").strip() for record in stage1 + stage2 for t in record["conversations"]]
    paths.corpus.write_text("".join(t + "\n" for t in texts if t), encoding="utf-8")
    return paths


def iter_all_texts(paths: DatasetPaths, templates: Sequence[str] = ()) -> Iterator[str]:
    """Training text for the tokenizer: every line of ``corpus.txt``, then every training
    conversation rendered with each of ``templates`` (image placeholders removed), so that the
    template's system prompt and role names get merges too. Held-out files are not read."""
    with open(paths.corpus, encoding="utf-8") as corpus:
        yield from (line.rstrip("\n") for line in corpus)
    for template in templates:
        for path in (paths.stage1, paths.stage2):
            for record in json.loads(path.read_text(encoding="utf-8")):
                text = render_conversation(record["conversations"], template, sample_id=record["id"])
                yield text.replace(IMAGE_TOKEN, "")
