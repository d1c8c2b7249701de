"""Answer one prompt about one image with a saved model.

    mocha generate --checkpoint RUN/export --image cat.png --prompt "What colour is the circle?"

--checkpoint is a pretrained directory (``mocha export`` output or a run's ``export/``). The
prompt becomes one human turn, ``"<image>\\n" + prompt`` (a prompt that already holds
``<image>`` is used as is), rendered with the model's conversation template. Greedy decoding
unless --do-sample; --seed makes sampling repeatable.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mocha.eval.cli import add_answer_arguments

    parser.add_argument("--checkpoint", required=True, help="pretrained model directory (config + weights + tokenizer)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampling)")
    add_answer_arguments(parser, default_max_new_tokens=64)


def human_turn(prompt: str) -> str:
    from mocha.text.conversation import IMAGE_TOKEN

    return prompt if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt}"


def run(args: argparse.Namespace) -> int:
    from mocha.eval.cli import input_errors_reported

    with input_errors_reported():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from mocha.images import open_rgb

    from mocha.eval.cli import default_device
    from mocha.eval.runner import AnswerOptions, VisualQuestionAnswerer

    if not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image} not found")
    torch.manual_seed(args.seed)
    options = AnswerOptions(suffix="", max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p, batch_size=1)
    qa = VisualQuestionAnswerer.from_pretrained(args.checkpoint, options, device=default_device(args.device))
    answer = qa.answer_images([open_rgb(args.image)], [human_turn(args.prompt)])[0]
    print(answer)
    return 0
