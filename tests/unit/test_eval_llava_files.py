"""`mocha eval` on LLaVA's POPE and MME files: labels found as LLaVA's scripts find them, answer
files LLaVA's scripts score to our numbers, --limit, and resuming an interrupted run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mocha.eval.records import EvalDataError, read_jsonl
from mocha.eval.suite import load_suite, run_suite
from tests.llava_eval_files import (calculation_reference, convert_answer_to_mme_reference, eval_pope_reference,
                                    write_llava_eval_files)

REPLIES = ["Yes", "No", "Yes, there is.", "No, there is not.", "I do not think so.", "yes", "Maybe.", "no."]


def scripted(questions):
    """A stand-in model: a reply chosen by the question and its image (which must exist)."""
    for q in questions:
        assert Path(q["image"]).is_file(), q["image"]
        digest = hashlib.sha256(f"{Path(q['image']).name}|{q['text']}".encode()).digest()
        yield {"text": REPLIES[digest[0] % len(REPLIES)]}


@pytest.fixture
def files(tmp_path):
    return write_llava_eval_files(tmp_path / "data")


def _suite(files, pope=True, mme=True):
    return load_suite([files.pope_questions, files.pope_annotations] if pope else None,
                      [files.mme_questions, files.mme_root] if mme else None, pope_images=files.pope_images)


def _check_pope_against_eval_pope(files, out, scores):
    reference = eval_pope_reference(files.pope_annotations, files.pope_questions, out / "pope_answers.jsonl")
    assert sorted(reference) == sorted(scores["pope"])
    for category, ref in reference.items():
        ours = scores["pope"][category]
        assert {k: ours[k] for k in ("tp", "fp", "tn", "fn")} == {k: ref[k] for k in ("tp", "fp", "tn", "fn")}
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            assert ours[k] == pytest.approx(ref[k]), (category, k)


def _check_mme_against_convert_and_calculation(root, answers_file, scores):
    converted = convert_answer_to_mme_reference(root, answers_file)
    reference = calculation_reference(converted)
    assert sorted(reference) == sorted(scores["mme"]["subtasks"])
    for subtask, score in reference.items():
        assert scores["mme"]["subtasks"][subtask]["score"] == pytest.approx(score), subtask
    return converted


def test_pope_pair_answers_score_as_llava_eval_pope_scores_them(files, tmp_path):
    out = tmp_path / "eval"
    scores = run_suite(_suite(files, mme=False), scripted, out, model_id="mocha-x")
    answers = read_jsonl(out / "pope_answers.jsonl")
    questions = read_jsonl(files.pope_questions)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]  # the input's ids, order
    assert [a["prompt"] for a in answers] == [q["text"] for q in questions]
    assert all(list(a) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"] for a in answers)
    assert {a["model_id"] for a in answers} == {"mocha-x"}
    # labels came from the annotation files, by position within each category
    labels = {c: [r["label"] for r in read_jsonl(files.pope_annotations / f"coco_pope_{c}.json")]
              for c in ("adversarial", "random", "popular")}
    assert [a["metadata"]["label"] for a in answers] == labels["adversarial"] + labels["random"] + labels["popular"]
    _check_pope_against_eval_pope(files, out, scores)
    assert len({s["accuracy"] for s in scores["pope"].values()}) > 1  # the replies are not degenerate


def test_mme_pair_answers_score_as_convert_and_calculation_score_them(files, tmp_path):
    out = tmp_path / "eval"
    scores = run_suite(_suite(files, pope=False), scripted, out, model_id="m")
    answers = read_jsonl(out / "mme_answers.jsonl")
    questions = read_jsonl(files.mme_questions)
    assert [(a["question_id"], a["prompt"]) for a in answers] == [(q["question_id"], q["text"]) for q in questions]
    converted = _check_mme_against_convert_and_calculation(files.mme_root, out / "mme_answers.jsonl", scores)
    # our MME results files hold the same questions, labels and answers as convert_answer_to_mme.py's
    for subtask, lines in converted.items():
        ours = (out / "mme_results" / f"{subtask}.txt").read_text().splitlines()
        assert [line.split("\t")[1:] for line in ours] == [line.rstrip("\n").split("\t")[1:] for line in lines]
    totals = scores["mme"]["totals"]
    assert set(totals) == {"perception", "cognition"}
    assert len({s["score"] for s in scores["mme"]["subtasks"].values()}) > 1


def test_mme_benchmark_folder_alone_gives_llava_ids(files, tmp_path):
    out = tmp_path / "eval"
    scores = run_suite(load_suite(mme=[files.mme_root]), scripted, out)
    answers = read_jsonl(out / "mme_answers.jsonl")
    assert answers[0]["question_id"] == "existence/000000006040.jpg"  # MME's order: perception first
    assert {a["question_id"] for a in answers} == {q["question_id"] for q in read_jsonl(files.mme_questions)}
    _check_mme_against_convert_and_calculation(files.mme_root, out / "mme_answers.jsonl", scores)


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_where_it_stopped(files, tmp_path):
    full = run_suite(_suite(files), scripted, tmp_path / "full", model_id="m")

    def dies_after(n):
        def answer(questions):
            for i, record in enumerate(scripted(questions)):
                if i == n:
                    raise Interrupted
                yield record
        return answer

    out = tmp_path / "eval"
    with pytest.raises(Interrupted):
        run_suite(_suite(files), dies_after(7), out, model_id="m", resume=True)
    assert len(read_jsonl(out / "pope_answers.jsonl")) == 7  # every answer was on disk before the interruption
    with open(out / "pope_answers.jsonl", "a") as f:  # and the next one was cut short while being written
        f.write('{"question_id": 10000002, "prompt": "Is th')

    asked = []

    def recording(questions):
        asked.extend(q["question_id"] for q in questions)
        return scripted(questions)

    resumed = run_suite(_suite(files), recording, out, model_id="m", resume=True)
    all_ids = [q["question_id"] for q in read_jsonl(files.pope_questions) + read_jsonl(files.mme_questions)]
    assert asked == all_ids[7:]
    assert resumed == full
    for name in ("pope_answers.jsonl", "mme_answers.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()

    asked.clear()  # a finished run asks nothing more
    assert run_suite(_suite(files), recording, out, model_id="m", resume=True) == full and asked == []
    with pytest.raises(EvalDataError, match="answers of model 'm'"):
        run_suite(_suite(files), scripted, out, model_id="another", resume=True)
    run_suite(_suite(files), recording, out, model_id="m", resume=True, run_info={"decoding": 1})
    with pytest.raises(EvalDataError, match="another model or settings \\(decoding differ"):
        run_suite(_suite(files), recording, out, model_id="m", resume=True, run_info={"decoding": 2})
    asked.clear()  # without resume, a run starts over
    assert run_suite(_suite(files), recording, out, model_id="m") == full and asked == all_ids


def test_limit_keeps_llava_scoring_exact_and_extends_on_rerun(files, tmp_path):
    out = tmp_path / "eval"
    scores = run_suite(_suite(files), scripted, out, limit=3, model_id="m")
    answers = read_jsonl(out / "pope_answers.jsonl")
    categories = [a["metadata"]["category"] for a in answers]
    assert {c: categories.count(c) for c in set(categories)} == {"adversarial": 3, "random": 3, "popular": 3}
    _check_pope_against_eval_pope(files, out, scores)  # eval_pope.py zips labels with a prefix: still exact
    mme = read_jsonl(out / "mme_answers.jsonl")
    per_subtask = [a["metadata"]["category"] for a in mme]
    assert {s: per_subtask.count(s) for s in set(per_subtask)} == {"code_reasoning": 4, "existence": 4, "artwork": 4}
    assert all(s["num_images"] == 2 for s in scores["mme"]["subtasks"].values())  # 3 rounded up to whole images

    scores = run_suite(_suite(files), scripted, out, model_id="m", resume=True)  # no limit: answers the rest
    assert scores == run_suite(_suite(files), scripted, tmp_path / "full", model_id="m")
    _check_pope_against_eval_pope(files, out, scores)
    _check_mme_against_convert_and_calculation(files.mme_root, out / "mme_answers.jsonl", scores)


def test_mismatched_inputs_are_named(files, tmp_path):
    annotation = files.pope_annotations / "coco_pope_random.json"
    original = annotation.read_text()
    rows = read_jsonl(annotation)
    rows[2]["image"] = "COCO_val2014_000000999999.jpg"
    (files.pope_annotations / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalDataError, match=r"question 10000003 \(number 3 of category 'random'.*is not line 3 of"):
        _suite(files, mme=False)
    (files.pope_annotations / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    with pytest.raises(EvalDataError, match="6 questions of category 'random', .*coco_pope_random.json has 5"):
        _suite(files, mme=False)
    with pytest.raises(EvalDataError, match="has no labels: give POPE's annotation files too"):
        load_suite([files.pope_questions])

    rows = read_jsonl(files.mme_questions)
    rows[1]["text"] = "Is a java code shown in the picture?"
    files.mme_questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalDataError, match="'code_reasoning/0020.png' 'Is a java code shown in the picture\\?' is not in"):
        _suite(files, pope=False)

    annotation.write_text(original)
    out = tmp_path / "eval"  # an answer file of another evaluation is not resumed
    out.mkdir()
    (out / "pope_answers.jsonl").write_text(json.dumps({"question_id": 77, "prompt": "Is it?", "text": "Yes"}) + "\n")
    with pytest.raises(EvalDataError, match="answers question 77 .* belongs to another evaluation"):
        run_suite(load_suite([files.pope_questions, files.pope_annotations], pope_images=files.pope_images),
                  scripted, out, resume=True)
