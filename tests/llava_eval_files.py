"""Small POPE and MME inputs in exactly LLaVA's layouts, and minimal scorers written from the
published behaviour of LLaVA's ``llava/eval/eval_pope.py`` and of LLaVA's
``convert_answer_to_mme.py`` + MME's ``eval_tool/calculation.py``, independent of mocha's code.

Layouts (as LLaVA's scripts/v1_5/eval/{pope,mme}.sh use them)::

    pope/llava_pope_test.jsonl     {"question_id", "image", "text" + "\\nAnswer the question ...", "category"}
    pope/coco/coco_pope_<c>.json   {"question_id": 1.., "image", "text", "label"} (JSON Lines)
    pope/val2014/COCO_val2014_*.jpg
    MME/llava_mme.jsonl            {"question_id": "<subtask>/<path>", "image", "text", "category"}
    MME/MME_Benchmark_release_version/<subtask>/{<n>.png, <n>.txt}
    MME/MME_Benchmark_release_version/<subtask>/{images/<n>.jpg, questions_answers_YN/<n>.txt}
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

INSTRUCTION = "Answer the question using a single word or phrase."
POPE_OBJECTS = ["person", "car", "dog", "chair", "cup", "bus", "umbrella"]
# LLaVA's test file numbers each category from its own offset; the annotation files from 1.
POPE_ID_OFFSET = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}


@dataclass
class LlavaEvalFiles:
    pope_questions: Path
    pope_annotations: Path
    pope_images: Path
    mme_questions: Path
    mme_root: Path


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_llava_eval_files(root: Path, pope_per_category: int = 6) -> LlavaEvalFiles:
    root = Path(root)
    pope = root / "pope"
    test_rows = []
    for c, category in enumerate(("adversarial", "random", "popular")):
        rows = []
        for i in range(pope_per_category):
            image = f"COCO_val2014_{(i // 3) * 7 + 100:012d}.jpg"
            obj = POPE_OBJECTS[(i + c) % len(POPE_OBJECTS)]
            article = "an" if obj[0] in "aeiou" else "a"
            text = f"Is there {article} {obj} in the image?" if article == "a" else f"Is there an {obj} in the imange?"
            rows.append({"question_id": i + 1, "image": image, "text": text, "label": "yes" if (i + c) % 2 else "no"})
            test_rows.append({"question_id": POPE_ID_OFFSET[category] + i + 1, "image": image,
                              "text": f"{text}\n{INSTRUCTION}", "category": category})
        _jsonl(pope / "coco" / f"coco_pope_{category}.json", rows)
    for n, image in enumerate(sorted({r["image"] for r in test_rows})):
        _image(pope / "val2014" / image, n)
    _jsonl(pope / "llava_pope_test.jsonl", test_rows)

    mme = root / "MME"
    bench = mme / "MME_Benchmark_release_version"
    # subtask -> [(image path relative to its folder, qa file relative to its folder, [(question, answer)])]
    layout = {
        "code_reasoning": [("0020.png", "0020.txt", [("Is a python code shown in the picture? Please answer yes or no.", "Yes"),
                                                     ("Is a c++ code shown in the picture? Please answer yes or no.", "No")]),
                           ("0014.png", "0014.txt", [("The image shows a python code. Is the output of the code '7'?  Please answer yes or no.", "No"),  # two spaces, as in some MME files
                                                     ("The image shows a python code. Is the output of the code '1'? Please answer yes or no.", "Yes")])],
        "existence": [("000000006040.jpg", "000000006040.txt", [("Is there a train in this image? Please answer yes or no.", "Yes"),
                                                                 ("Is there a bed in this image? Please answer yes or no.", "No")]),
                      ("000000018150.jpg", "000000018150.txt", [("Is there a bus in this image? Please answer yes or no.", "No"),
                                                                 ("Is there a dog in this image? Please answer yes or no.", "Yes")])],
        "artwork": [("images/14777.jpg", "questions_answers_YN/14777.txt",
                     [("Does this artwork belong to the type of religious? Please answer yes or no.", "Yes"),
                      ("Does this artwork belong to the type of historical? Please answer yes or no.", "No")]),
                    ("images/9405.jpg", "questions_answers_YN/9405.txt",
                     [("Is this artwork created by courbet, gustave? Please answer yes or no.", "Yes"),
                      ("Is this artwork created by milani, aureliano? Please answer yes or no.", "No")])],
    }
    mme_rows = []
    for s, (subtask, images) in enumerate(layout.items()):
        for n, (image, qa, pairs) in enumerate(images):
            _image(bench / subtask / image, 100 + 10 * s + n)
            (bench / subtask / qa).parent.mkdir(parents=True, exist_ok=True)
            (bench / subtask / qa).write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
            for question, _ in pairs:
                asked = question.replace("Please answer yes or no.", "").strip()
                mme_rows.append({"question_id": f"{subtask}/{image}", "image": f"{subtask}/{image}",
                                 "text": f"{asked}\n{INSTRUCTION}", "category": subtask})
    (bench / "existence" / "readme.md").write_text("not a question file\n")
    return LlavaEvalFiles(pope / "llava_pope_test.jsonl", pope / "coco", pope / "val2014",
                          _jsonl(mme / "llava_mme.jsonl", mme_rows), bench)


# ----------------------------------------------------------------------------- reference scorers


def eval_pope_reference(annotation_dir: Path, question_file: Path, result_file: Path) -> dict[str, dict]:
    """What LLaVA's eval_pope.py prints, per annotation file: answers of the file's category
    (result-file order) zipped with the file's labels; first sentence, commas dropped, split on
    spaces; "no" if a word is No/not/no."""
    questions = {}
    for line in open(question_file):
        q = json.loads(line)
        questions[q["question_id"]] = q
    answers = [json.loads(line) for line in open(result_file)]
    out = {}
    for name in os.listdir(annotation_dir):
        assert name.startswith("coco_pope_") and name.endswith(".json")
        category = name[len("coco_pope_"):-len(".json")]
        labels = [json.loads(line)["label"] for line in open(Path(annotation_dir) / name)]
        preds = []
        for a in answers:
            if questions[a["question_id"]]["category"] != category:
                continue
            text = a["text"]
            if "." in text:
                text = text.split(".")[0]
            words = text.replace(",", "").split(" ")
            preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
        gold = [0 if label == "no" else 1 for label in labels]
        tp = sum(p == 1 and g == 1 for p, g in zip(preds, gold))
        fp = sum(p == 1 and g == 0 for p, g in zip(preds, gold))
        tn = sum(p == 0 and g == 0 for p, g in zip(preds, gold))
        fn = sum(p == 0 and g == 1 for p, g in zip(preds, gold))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out[category] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": (tp + tn) / (tp + tn + fp + fn),
                         "precision": precision, "recall": recall,
                         "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                         "yes_ratio": preds.count(1) / len(preds)}
    return out


def convert_answer_to_mme_reference(benchmark: Path, answer_file: Path) -> dict[str, list[str]]:
    """The lines LLaVA's convert_answer_to_mme.py writes per subtask (file, prompt, gt, answer)."""
    gt = {}
    for category in os.listdir(benchmark):
        cdir = Path(benchmark) / category
        if not cdir.is_dir():
            continue
        qa_dir = cdir / "questions_answers_YN" if (cdir / "images").exists() else cdir
        for name in os.listdir(qa_dir):
            if name.endswith(".txt"):
                for line in open(qa_dir / name):
                    question, answer = line.strip().split("\t")
                    gt[(category, name, question)] = answer
    results = defaultdict(list)
    for line in open(answer_file):
        a = json.loads(line)
        category = a["question_id"].split("/")[0]
        file = a["question_id"].split("/")[-1].split(".")[0] + ".txt"
        prompt = a["prompt"]
        if INSTRUCTION in prompt:
            prompt = prompt.replace(INSTRUCTION, "").strip()
        if "Please answer yes or no." not in prompt:
            prompt = prompt + " Please answer yes or no."
            if (category, file, prompt) not in gt:
                prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
        results[category].append("\t".join((file, prompt, gt[category, file, prompt], a["text"])) + "\n")
    return dict(results)


def calculation_reference(lines_by_subtask: dict[str, list[str]]) -> dict[str, float]:
    """MME calculation.py's score per subtask: (accuracy + accuracy+) x 100, the prediction
    parsed from the raw line (trailing newline included) as calculation.py does."""
    scores = {}
    for subtask, lines in lines_by_subtask.items():
        correct, images_right = [], 0
        for first in range(0, len(lines), 2):
            pair = lines[first:first + 2]
            assert len(pair) == 2
            right = 0
            for line in pair:
                _, _, gt, pred = line.split("\t")
                gt, pred = gt.lower(), pred.lower()
                if pred not in ("yes", "no"):
                    pred = "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"
                correct.append(gt == pred)
                right += gt == pred
            images_right += right == 2
        scores[subtask] = (sum(correct) / len(correct) + images_right / (len(lines) // 2)) * 100
    return scores
