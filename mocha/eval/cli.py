"""Evaluate a saved model on POPE and MME: answer every question, write the answers, score them.

    mocha eval --model RUN/export --pope data/pope_random.jsonl data/pope_popular.jsonl \\
               --mme data/mme --images data/images --out RUN/eval [--ray --concurrency 2]

--model is a pretrained directory (``mocha export`` output, or a run's ``export/``).
--pope takes POPE question files and/or folders holding them (the split comes from each
file name, or from the questions' ``category``). --mme takes a folder in MME's layout
(``<subtask>.txt``: image, question, answer per line) or a JSONL question file with
``category`` and ``label``. Image paths in the question files are relative to --images.

Writes pope_<split>_answers.jsonl, mme_answers.jsonl, mme_results/<subtask>.txt (for MME's own
calculation.py) and scores.json into --out, and prints the score tables. --ray answers on Ray
Data actors (the running cluster, else a local one) instead of in this process.
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
    parser.add_argument("--pope", nargs="+", default=None, metavar="PATH", help="POPE question files or folders")
    parser.add_argument("--mme", default=None, metavar="PATH", help="MME folder (<subtask>.txt) or JSONL questions")
    parser.add_argument("--images", required=True, help="folder the questions' image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder for answers and scores.json")
    parser.add_argument("--suffix", default=SHORT_ANSWER_SUFFIX,
                        help="appended to every question (default: LLaVA's short-answer instruction; '' for none)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate call / Ray batch")
    parser.add_argument("--model-id", default=None, help="model_id written into answers (default: --model's name)")
    parser.add_argument("--ray", action="store_true", help="answer on Ray Data actors")
    parser.add_argument("--concurrency", type=int, default=1, help="Ray actors (each loads the model once)")
    parser.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per Ray actor")
    add_answer_arguments(parser, default_max_new_tokens=16)


def run(args: argparse.Namespace) -> int:
    with input_errors_reported():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mocha.eval.runner import AnswerOptions, VisualQuestionAnswerer, answer_with_ray
    from mocha.eval.suite import load_suite, run_suite
    from mocha.report.tables import mme_table, pope_table

    suite = load_suite(args.pope, args.mme)
    options = AnswerOptions(suffix=args.suffix, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                            model_id=args.model_id or Path(args.model).resolve().name)
    print(f"[mocha] evaluating {args.model} on {len(suite)} questions "
          f"(POPE splits {sorted(suite.pope)}, {len(suite.mme)} MME questions)")
    if args.ray:
        from pipelines.ray_runtime import ensure_ray

        ensure_ray()

        def answer(questions):
            return answer_with_ray(args.model, questions, args.images, options, concurrency=args.concurrency,
                                   num_gpus=args.gpus_per_actor, progress=True)
    else:
        qa = VisualQuestionAnswerer.from_pretrained(args.model, options, device=default_device(args.device))

        def answer(questions):
            return qa.answer(questions, args.images, progress=True)

    scores = run_suite(suite, answer, args.out)
    if "pope" in scores:
        print("\nPOPE\n" + pope_table(scores["pope"]))
    if "mme" in scores:
        print("MME\n" + mme_table(scores["mme"]))
    print(f"[mocha] answers and scores.json written to {args.out}")
    return 0
