"""Build a tiny random-weight MoCHA model and run it once end to end, on the CPU, offline.

Trains a throwaway BPE tokenizer, builds the four tiny encoders, MoE connectors, HGA and a
tiny LLM, tokenises a two-turn conversation, runs forward + backward for stage 1 and stage 2
(checking that exactly the intended parameters get gradients), generates a few tokens,
and round-trips save_pretrained / from_pretrained. Prints what it did; exits non-zero on any
mismatch. A quick check that an installation works.
"""

from __future__ import annotations

import argparse
import tempfile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=["phi", "llama"], default="phi", help="tiny LLM family")
    parser.add_argument("--hga", choices=["graph", "attention", "off"], default="graph", help="HGA form")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from mocha.model.mocha import MochaModel
    from mocha.model.tiny import tiny_llm_config, tiny_model_config
    from mocha.text.conversation import tokenize_conversation, tokenize_prompt
    from mocha.text.tokenizer import train_bpe_tokenizer
    from mocha.train.data import Example, collate

    torch.manual_seed(args.seed)
    template = "phi" if args.family == "phi" else "vicuna_v1"
    cfg = tiny_model_config(llm=tiny_llm_config(args.family), template=template,
                            hga={"mode": args.hga, "num_heads": 4})
    conversation = [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
                    {"from": "gpt", "value": "The circle is red."},
                    {"from": "human", "value": "How many shapes are there?"},
                    {"from": "gpt", "value": "There are two shapes."}]
    with tempfile.TemporaryDirectory(prefix="mocha-smoke-") as tmp:
        corpus = [t["value"] for t in conversation] * 20
        tokenizer = train_bpe_tokenizer(corpus, f"{tmp}/tokenizer", vocab_size=400, family=args.family)
        model = MochaModel(cfg, vocab_size=len(tokenizer))
        counts = {part: sum(p.numel() for n, p in model.named_parameters() if n.startswith(part + "."))
                  for part in ("encoders", "connectors", "hga", "llm")}
        print(f"[smoke] built tiny MoCHA: {counts} parameters; {model.num_visual_tokens} visual tokens per image "
              f"({dict(model.encoder_tokens)})")

        rng = np.random.default_rng(args.seed)
        images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(2)]
        examples = []
        for i, image in enumerate(images):
            tok = tokenize_conversation(conversation, tokenizer, template, max_length=cfg.max_length,
                                        num_image_tokens=model.num_visual_tokens)
            if not tok.trainable:
                print(f"[smoke] FAIL: conversation tokenisation status {tok.status}: {tok.detail}")
                return 1
            examples.append(Example(f"s{i}", tok.input_ids, tok.labels, tok.status, image=image))
        batch = collate(examples, tokenizer.pad_token_id, model.preprocess)

        for stage in (1, 2):
            model.set_trainable(stage)
            model.zero_grad(set_to_none=True)
            out = model(**batch.model_inputs("cpu"))
            out.loss.backward()
            with_grad = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.grad is not None}
            expected = {"connectors"} | ({"hga"} if any(True for _ in model.hga.parameters()) else set())
            expected |= {"llm"} if stage == 2 else set()
            print(f"[smoke] stage {stage}: loss {out.loss.item():.4f} (lm {out.lm_loss.item():.4f}, "
                  f"balance {out.balance_loss.item():.4f}, z {out.z_loss.item():.4f}); gradients reach {sorted(with_grad)}")
            if with_grad != expected:
                print(f"[smoke] FAIL: expected gradients on {sorted(expected)}")
                return 1

        model.eval()
        prompt = torch.tensor([tokenize_prompt(conversation[:1], tokenizer, template)])
        pixels = {k: v.unsqueeze(0) for k, v in model.preprocess(images[0]).items()}
        new = model.generate(prompt, pixel_values=pixels, max_new_tokens=8,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        print(f"[smoke] generated {new.shape[1]} tokens (random weights): {tokenizer.decode(new[0])!r}")

        model.save_pretrained(f"{tmp}/saved")
        loaded = MochaModel.from_pretrained(f"{tmp}/saved").eval()
        again = loaded.generate(prompt, pixel_values=pixels, max_new_tokens=8,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if not torch.equal(new, again):
            print("[smoke] FAIL: save_pretrained -> from_pretrained changed the generated tokens")
            return 1
        print("[smoke] save_pretrained -> from_pretrained round trip: identical generation")
    print("[smoke] OK")
    return 0
