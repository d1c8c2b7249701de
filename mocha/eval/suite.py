"""An evaluation run: POPE and MME questions answered in one pass, appended to answer files as
they come, then scored.

Inputs (:func:`load_suite`):

- POPE: mocha's question files with labels (one per split, or one file whose questions carry
  ``category``), or LLaVA's ``llava_pope_test.jsonl`` (no labels) together with POPE's
  annotation files ``coco_pope_<split>.json`` (files or their folder).
- MME: a folder of ``<subtask>.txt`` question files (image, question, answer), a JSONL question
  file with ``category`` and ``label``, MME's ``MME_Benchmark_release_version`` folder alone, or
  LLaVA's ``llava_mme.jsonl`` together with that folder.

Output folder::

    pope_<split>_answers.jsonl   answers per POPE split (mocha's question files)
    pope_answers.jsonl           answers to LLaVA's llava_pope_test.jsonl, in its order
                                 (the --result-file of LLaVA's eval_pope.py)
    mme_answers.jsonl            answers to every MME question, in input order
                                 (MME/answers/<experiment>.jsonl for LLaVA's convert_answer_to_mme.py)
    mme_results/<subtask>.txt    the same in MME's results layout (MME's calculation.py reads it)
    scores.json                  {"pope": {split: PopeScores}, "mme": MMEScores}
    eval_run.json                the model and decoding settings the answers were made with

Answer files are in LLaVA's answer format with the input's question ids (:mod:`mocha.eval.records`).
Each answer is appended and flushed as soon as it is generated; a resumed run into the same
folder skips the questions already answered there and continues (a line cut short by the
interruption is dropped), provided the model and decoding settings are the same. Answers in the same order as the input, per POPE split and per MME subtask, are
what LLaVA's scripts need: they pair answers with labels by position.

``limit`` takes the first N questions of every POPE split and of every MME subtask (for MME
rounded up to whole images, whose two questions are scored together). Scores cover every
answer in the answer files, which after a run with a limit is the limited set.

All questions to answer go through the answer function at once, so a Ray pool starts once per run.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mocha.eval.llava_inputs import MMEBenchmark, is_mme_benchmark, pope_labels_by_position, strip_short_answer
from mocha.eval.mme import MMEQuestion, mme_to_questions, read_mme_dir, score_mme, write_mme_results
from mocha.eval.pope import load_pope_splits, parse_pope_answer, pope_files, pope_label, score_pope, split_name
from mocha.eval.records import AnswerFile, EvalDataError, QuestionKey, answer_record, load_questions, question_keys

#: Answers a list of question records (``image`` resolved against the section's image folder),
#: returning or yielding one record per question, in order, whose ``text`` is the answer.
AnswerFn = Callable[[list[dict]], Iterable[dict]]

POPE_ANSWERS = "pope_answers.jsonl"
MME_ANSWERS = "mme_answers.jsonl"
MME_RESULTS_DIR = "mme_results"
SCORES_FILE = "scores.json"
RUN_INFO_FILE = "eval_run.json"


@dataclass(frozen=True)
class EvalQuestion:
    """A question as read (``record``: question_id, image, text, ...), with its POPE split or
    MME subtask, its ground truth and the wording of the benchmark's label file."""

    record: dict
    group: str
    label: str
    reference: str


@dataclass
class EvalSection:
    """The questions whose answers go to one answer file."""

    benchmark: str  # "pope" | "mme"
    answers_file: str
    questions: list[EvalQuestion]
    source: str
    image_root: Path | None = None  # None: the answer function resolves image paths itself

    def keys(self) -> list[QuestionKey]:
        return question_keys((q.record["question_id"], q.record["text"]) for q in self.questions)


@dataclass
class EvalSuite:
    """The questions of one evaluation run."""

    sections: list[EvalSection] = field(default_factory=list)

    @property
    def pope(self) -> dict[str, list[dict]]:
        """POPE question records by split."""
        splits: dict[str, list[dict]] = {}
        for s in self.sections:
            if s.benchmark == "pope":
                for q in s.questions:
                    splits.setdefault(q.group, []).append(q.record)
        return splits

    @property
    def mme(self) -> list[dict]:
        return [q.record for s in self.sections if s.benchmark == "mme" for q in s.questions]

    def __len__(self) -> int:
        return sum(len(s.questions) for s in self.sections)


# ----------------------------------------------------------------------------- loading


def _root(path: str | Path | None) -> Path | None:
    return Path(path).resolve() if path is not None else None


def _has_labels(questions: list[dict]) -> bool:
    return any("label" in q for q in questions)


def load_pope_sections(paths: list[str | Path], image_root: str | Path | None = None) -> list[EvalSection]:
    """POPE sections: one per split for mocha's labelled question files; one for LLaVA's
    ``llava_pope_test.jsonl``, labelled from the annotation files given beside it."""
    files = {f: load_questions(f) for f in pope_files(paths)}
    unlabelled = [f for f, qs in files.items() if not _has_labels(qs)]
    if not unlabelled:
        return [EvalSection("pope", f"pope_{split}_answers.jsonl",
                            [EvalQuestion(q, split, pope_label(q, split), q["text"]) for q in qs],
                            source=f"POPE split {split}", image_root=_root(image_root))
                for split, qs in load_pope_splits(list(files)).items()]
    if len(unlabelled) > 1:
        raise EvalDataError(f"POPE question files without labels: {[str(f) for f in unlabelled]}; give one "
                            f"(LLaVA's llava_pope_test.jsonl) with its annotation files")
    test_file = unlabelled[0]
    annotations: dict[str, tuple[str, list[dict]]] = {}
    for f, records in files.items():
        if f == test_file:
            continue
        for r in records:
            pope_label(r, str(f))
        split = split_name(f)
        if split in annotations:
            raise EvalDataError(f"two POPE annotation files for category {split!r}: {annotations[split][0]} and {f}")
        annotations[split] = (str(f), records)
    if not annotations:
        raise EvalDataError(f"{test_file} has no labels: give POPE's annotation files too, e.g. "
                            f"--pope {test_file} coco/ (with coco_pope_adversarial.json, coco_pope_popular.json, "
                            f"coco_pope_random.json)")
    questions = files[test_file]
    labels = pope_labels_by_position(questions, annotations, str(test_file))
    return [EvalSection("pope", POPE_ANSWERS,
                        [EvalQuestion(q, q["category"], label, strip_short_answer(q["text"]))
                         for q, label in zip(questions, labels)],
                        source=str(test_file), image_root=_root(image_root))]


def _mme_question(q: dict, source: str) -> EvalQuestion:
    missing = [k for k in ("category", "label") if k not in q]
    if missing:
        raise EvalDataError(f"{source}: MME question {q['question_id']!r} lacks {missing}")
    return EvalQuestion(q, str(q["category"]), str(q["label"]), q["text"])


def load_mme_section(paths: str | Path | list[str | Path], image_root: str | Path | None = None,
                     fallback_root: str | Path | None = None) -> EvalSection:
    """The MME section from one of the accepted inputs (see the module docstring). Images are
    under ``image_root``, else under MME's benchmark folder when given one, else under
    ``fallback_root``."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"MME input not found: {p}")
    benchmarks = [p for p in paths if is_mme_benchmark(p)]
    others = [p for p in paths if p not in benchmarks]
    if len(benchmarks) > 1 or len(others) > 1:
        raise EvalDataError(f"--mme takes one question file or folder and at most one MME benchmark folder, got "
                            f"{[str(p) for p in paths]}")
    if benchmarks:
        bench = MMEBenchmark(benchmarks[0])
        root = _root(image_root) or bench.root.resolve()  # MME's images live in its benchmark folder
        if not others:  # the benchmark folder alone: its own questions, ids as LLaVA's
            questions = [EvalQuestion({"question_id": i.image, "image": i.image, "text": i.question,
                                       "category": i.subtask}, i.subtask, i.label, i.question) for i in bench.items]
            return EvalSection("mme", MME_ANSWERS, questions, source=str(bench.root), image_root=root)
        source = others[0]
        if source.is_dir():
            raise EvalDataError(f"{source}: with an MME benchmark folder, --mme takes LLaVA's llava_mme.jsonl")
        records = load_questions(source)
        questions = []
        for q in records:
            label, wording = bench.label(q, str(source))
            questions.append(EvalQuestion(q, str(q["question_id"]).split("/")[0], label, wording))
        return EvalSection("mme", MME_ANSWERS, questions, source=str(source), image_root=root)
    source = others[0]
    if source.is_dir():
        records = mme_to_questions(read_mme_dir(source))
    else:
        records = load_questions(source)
        if not _has_labels(records):
            raise EvalDataError(f"{source} has no labels: give the MME benchmark folder too, e.g. "
                                f"--mme {source} MME_Benchmark_release_version")
    return EvalSection("mme", MME_ANSWERS, [_mme_question(q, str(source)) for q in records], source=str(source),
                       image_root=_root(image_root or fallback_root))


def load_suite(pope: list[str | Path] | None = None, mme: str | Path | list[str | Path] | None = None, *,
               images: str | Path | None = None, pope_images: str | Path | None = None,
               mme_images: str | Path | None = None) -> EvalSuite:
    """The questions of a run. ``pope_images``/``mme_images``: folders the questions' image
    paths are relative to, else ``images`` (MME: else its benchmark folder when given one, then
    ``images``); None everywhere leaves the paths to the answer function."""
    if not pope and not mme:
        raise ValueError("nothing to evaluate: give POPE question files and/or MME questions")
    sections = load_pope_sections(list(pope), pope_images or images) if pope else []
    if mme:
        sections.append(load_mme_section(mme, mme_images, fallback_root=images))
    return EvalSuite(sections)


# ----------------------------------------------------------------------------- running


def select(section: EvalSection, limit: int | None) -> list[int]:
    """Indices of the questions a run with ``limit`` asks: the first ``limit`` of every group,
    and for MME the second question of an image whose first one is the last kept."""
    if limit is None:
        return list(range(len(section.questions)))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    kept: list[int] = []
    counts: Counter = Counter()
    for i, q in enumerate(section.questions):
        n = counts[q.group]
        pair_open = section.benchmark == "mme" and n % 2 == 1
        if n < limit or (pair_open and n == limit):
            kept.append(i)
            counts[q.group] += 1
    return kept


def _with_image_path(question: EvalQuestion, root: Path | None) -> dict:
    if root is None:
        return question.record
    return {**question.record, "image": str(root / question.record["image"])}


def _check_resumable(section: EvalSection, answers: list[dict], path: Path, model_id: str | None) -> set:
    known = set(section.keys())
    done = question_keys((a["question_id"], a.get("prompt")) for a in answers)
    for a, key in zip(answers, done):
        if key not in known:
            raise EvalDataError(f"{path} answers question {a['question_id']!r} ({a.get('prompt')!r}), which is not "
                                f"among {section.source}'s questions: it belongs to another evaluation "
                                f"(use another --out)")
        if model_id is not None and a.get("model_id") != model_id:
            raise EvalDataError(f"{path} holds answers of model {a.get('model_id')!r}, this run's model is "
                                f"{model_id!r} (use another --out)")
    return set(done)


def score_section(section: EvalSection, answers: list[dict], out_dir: Path) -> dict:
    """Scores of one section's answers (``{"pope": {split: ...}}`` or ``{"mme": ...}``);
    writes MME's results layout for an MME section."""
    by_key = dict(zip(section.keys(), section.questions))
    keys = question_keys((a["question_id"], a.get("prompt")) for a in answers)
    pairs = [(by_key[k], a) for k, a in zip(keys, answers)]
    if section.benchmark == "pope":
        groups: dict[str, list[tuple[EvalQuestion, dict]]] = {}
        for q, a in pairs:
            groups.setdefault(q.group, []).append((q, a))
        return {"pope": {g: score_pope([parse_pope_answer(str(a["text"])) for _, a in qa],
                                       [q.label for q, _ in qa]).as_dict() for g, qa in groups.items()}}
    rows = [MMEQuestion(q.group, q.record["image"], q.reference, q.label, str(a["text"])) for q, a in pairs]
    write_mme_results(rows, out_dir / MME_RESULTS_DIR)
    return {"mme": score_mme(rows).as_dict()}


def _start(suite: EvalSuite, out_dir: Path, resume: bool, run_info: dict | None) -> None:
    """Prepare ``out_dir``: without ``resume`` remove earlier answers; with it, refuse answers
    that an earlier run made with another model or settings (``run_info`` differs)."""
    info_path = out_dir / RUN_INFO_FILE
    if not resume:
        for section in suite.sections:
            (out_dir / section.answers_file).unlink(missing_ok=True)
        info_path.unlink(missing_ok=True)
    elif run_info is not None and info_path.exists():
        before = json.loads(info_path.read_text())
        changed = sorted(k for k in set(before) | set(run_info) if before.get(k) != run_info.get(k))
        if changed:
            raise EvalDataError(f"{out_dir} holds answers made with another model or settings ({', '.join(changed)} "
                                f"differ; see {info_path}): use another --out, or delete it to start over")
    if run_info is not None:
        info_path.write_text(json.dumps(run_info, indent=1, sort_keys=True) + "\n")


def run_suite(suite: EvalSuite, answer: AnswerFn, out_dir: str | Path, *, limit: int | None = None,
              model_id: str | None = None, resume: bool = False, run_info: dict | None = None,
              progress: bool = False) -> dict:
    """Answer the questions, appending each answer to its file as it comes, then write
    ``scores.json``; returns the scores (``{"pope": {split: {...}}, "mme": {"subtasks": ...,
    "totals": ...}}``).

    With ``resume``, questions already answered in ``out_dir`` are not asked again; without it,
    earlier answer files there are replaced. ``run_info`` (model and decoding settings) is kept
    in ``out_dir`` and must equal the earlier run's to resume it. ``model_id`` goes into every
    answer (default: the answer function's records' ``model_id``) and must match the answers
    already there."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _start(suite, out_dir, resume, run_info)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(AnswerFile(out_dir / s.answers_file)) for s in suite.sections]
        todo: list[tuple[int, EvalQuestion]] = []
        for n, (section, file) in enumerate(zip(suite.sections, files)):
            if file.repaired:
                print(f"[mocha] {file.path}: dropped a last line cut short by an interruption")
            done = _check_resumable(section, file.answers, file.path, model_id)
            keys = section.keys()
            todo += [(n, section.questions[i]) for i in select(section, limit) if keys[i] not in done]
        answered_before = sum(len(f.answers) for f in files)
        if answered_before:
            print(f"[mocha] resuming: {answered_before} answers already in {out_dir}, {len(todo)} questions to go")
        questions = [_with_image_path(q, suite.sections[n].image_root) for n, q in todo]
        count = 0
        with tqdm(total=len(todo), desc="answering", unit=" questions", disable=not progress) as bar:
            for record in (answer(questions) if todo else ()):
                if count == len(todo):
                    raise RuntimeError(f"the answer function returned more than {len(todo)} answers")
                n, q = todo[count]
                files[n].append(answer_record(q.record, str(record["text"]),
                                              model_id or record.get("model_id") or "mocha", label=q.label))
                count += 1
                bar.update()
        if count != len(todo):
            raise RuntimeError(f"{count} answers for {len(todo)} questions")

    scores: dict = {}
    for section, file in zip(suite.sections, files):
        for benchmark, value in score_section(section, file.answers, out_dir).items():
            if benchmark == "pope":
                scores.setdefault("pope", {}).update(value)
            else:
                scores[benchmark] = value
    (out_dir / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
    return scores
