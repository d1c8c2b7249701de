"""Evaluate a saved model on POPE and MME: answer every question, write the answers, score them.

    mocha eval --model RUN/export --pope data/pope_random.jsonl data/pope_popular.jsonl \\
               --mme data/mme --images data/images --out RUN/eval [--ray --concurrency 2]

LLaVA's evaluation files, as LLaVA's scripts/v1_5/eval/{pope,mme}.sh use them:

    mocha eval --model RUN/export --out RUN/eval \\
        --pope playground/data/eval/pope/llava_pope_test.jsonl playground/data/eval/pope/coco \\
        --pope-images playground/data/eval/pope/val2014 \\
        --mme playground/data/eval/MME/llava_mme.jsonl playground/data/eval/MME/MME_Benchmark_release_version

--model is a pretrained directory (``mocha export`` output, or a run's ``export/``).

--pope takes POPE question files and/or folders holding them (a folder contributes its
``*pope*.json``/``*pope*.jsonl``): mocha's files with labels (the split comes from each file name,
or from the questions' ``category``), or LLaVA's ``llava_pope_test.jsonl`` (no labels) together
with POPE's annotation files ``coco_pope_{adversarial,popular,random}.json`` or their folder;
labels are then paired with questions by position per category, as LLaVA's eval_pope.py does.

--mme takes a folder in MME's results layout (``<subtask>.txt``: image, question, answer per
line), a JSONL question file with ``category`` and ``label``, MME's
``MME_Benchmark_release_version`` folder alone (its own questions), or LLaVA's ``llava_mme.jsonl``
together with that folder (labels looked up as LLaVA's convert_answer_to_mme.py does).

Image paths in the question files are relative to --pope-images / --mme-images, else (MME) to the
MME benchmark folder when given one, else to --images.

Writes into --out: pope_<split>_answers.jsonl (mocha's POPE files) or pope_answers.jsonl (LLaVA's
test file, in its order), mme_answers.jsonl, mme_results/<subtask>.txt (MME's results layout)
and scores.json, and prints the score tables. Answer files are in LLaVA's answer format
(question_id, prompt, text, answer_id, model_id, metadata) with the input's question ids, so
LLaVA's scripts score them unchanged:

    python llava/eval/eval_pope.py --annotation-dir .../pope/coco \\
        --question-file .../pope/llava_pope_test.jsonl --result-file RUN/eval/pope_answers.jsonl
    cp RUN/eval/mme_answers.jsonl .../MME/answers/mocha.jsonl && cd .../MME && \\
        python convert_answer_to_mme.py --experiment mocha && \\
        cd eval_tool && python calculation.py --results_dir answers/mocha

Answers are appended as they are generated: rerunning the same command after an interruption
continues where it stopped (a different model or question set in --out is an error). --limit N
asks only the first N questions of every POPE split and MME subtask (whole images for MME).
--ray answers on Ray Data actors (the running cluster, else a local one) instead of in this
process.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def input_errors_reported() -> Iterator[None]:
    """Turn a bad input file or folder into a one-line CLI error (``ConfigError``, which
    ``mocha`` prints without a traceback)."""
    from mocha.config import ConfigError
    from mocha.eval.records import EvalDataError

    try:
        yield
    except (EvalDataError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def add_answer_arguments(parser: argparse.ArgumentParser, default_max_new_tokens: int) -> None:
    """Decoding options shared by ``mocha eval`` and ``mocha generate``."""
    parser.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens, help="answer length limit")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def default_device(requested: str | None) -> str:
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mocha.eval.runner import SHORT_ANSWER_SUFFIX

    parser.add_argument("--model", required=True, help="pretrained model directory (config + weights + tokenizer)")
    parser.add_argument("--pope", nargs="+", default=None, metavar="PATH",
                        help="POPE question files or folders; or llava_pope_test.jsonl + coco_pope_*.json (or their folder)")
    parser.add_argument("--mme", nargs="+", default=None, metavar="PATH",
                        help="MME folder (<subtask>.txt), JSONL questions, MME_Benchmark_release_version, "
                             "or llava_mme.jsonl + MME_Benchmark_release_version")
    parser.add_argument("--images", default=None, help="folder the questions' image paths are relative to")
    parser.add_argument("--pope-images", default=None, help="image folder for POPE (default: --images)")
    parser.add_argument("--mme-images", default=None,
                        help="image folder for MME (default: the MME benchmark folder when given one, else --images)")
    parser.add_argument("--out", required=True,
                        help="output folder for answers and scores.json (a rerun resumes the answers there)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="only the first N questions of every POPE split and MME subtask")
    parser.add_argument("--suffix", default=SHORT_ANSWER_SUFFIX,
                        help="appended to every question (default: LLaVA's short-answer instruction; '' for none)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call / Ray batch")
    parser.add_argument("--model-id", default=None, help="model_id written into answers (default: --model's name)")
    parser.add_argument("--ray", action="store_true", help="answer on Ray Data actors")
    parser.add_argument("--concurrency", type=int, default=1, help="Ray actors (each loads the model once)")
    parser.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per Ray actor")
    add_answer_arguments(parser, default_max_new_tokens=16)


def run_info(model_dir: str, model_id: str, options) -> dict:
    """What the answers depend on: the model's files (name, size, modification time) and the
    decoding settings. A rerun into the same --out resumes only when this is unchanged."""
    from dataclasses import asdict
    from pathlib import Path

    root = Path(model_dir).resolve()
    files = {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(root.rglob("*")) if p.is_file()}
    decoding = {k: v for k, v in asdict(options).items() if k not in ("batch_size", "model_id")}
    return {"model": str(root), "model_files": files, "model_id": model_id, "decoding": decoding}


def run(args: argparse.Namespace) -> int:
    with input_errors_reported():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mocha.config import ConfigError
    from mocha.eval.runner import AnswerOptions, VisualQuestionAnswerer, iter_answers_with_ray
    from mocha.eval.suite import load_suite, run_suite
    from mocha.report.tables import mme_table, pope_table

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if not args.pope and not args.mme:
        raise ConfigError("nothing to evaluate: give --pope and/or --mme")
    suite = load_suite(args.pope, args.mme, images=args.images, pope_images=args.pope_images,
                       mme_images=args.mme_images)
    for section in suite.sections:
        if section.image_root is None:
            flag = "--pope-images" if section.benchmark == "pope" else "--mme-images"
            raise ConfigError(f"{section.source}: where are its images? Give --images or {flag}")
    model_id = args.model_id or Path(args.model).resolve().name
    options = AnswerOptions(suffix=args.suffix, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                            model_id=model_id)
    print(f"[mocha] evaluating {args.model} on {len(suite)} questions "
          f"(POPE splits {sorted(suite.pope)}, {len(suite.mme)} MME questions)"
          + (f", at most {args.limit} per split / subtask" if args.limit else ""))
    if args.ray:
        from pipelines.ray_runtime import ensure_ray

        ensure_ray()

        def answer(questions):
            return iter_answers_with_ray(args.model, questions, "", options, concurrency=args.concurrency,
                                         num_gpus=args.gpus_per_actor)
    else:
        qa = VisualQuestionAnswerer.from_pretrained(args.model, options, device=default_device(args.device))

        def answer(questions):
            return qa.iter_answers(questions, "")

    scores = run_suite(suite, answer, args.out, limit=args.limit, model_id=model_id, resume=True,
                       run_info=run_info(args.model, model_id, options), progress=True)
    if "pope" in scores:
        print("\nPOPE\n" + pope_table(scores["pope"]))
    if "mme" in scores:
        print("MME\n" + mme_table(scores["mme"]))
    print(f"[mocha] answers and scores.json written to {args.out}")
    return 0
