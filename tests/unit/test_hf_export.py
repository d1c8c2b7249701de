"""`mocha export` as a transformers-native folder (issue 19).

The central test loads the exports in a child interpreter that cannot import mocha (``python -I
-S`` with only the closure of torch/transformers/safetensors/timm/pillow on its path, see
tests/isolated_env.py) and checks, token for token, that ``AutoModelForImageTextToText`` +
``AutoProcessor`` (chat template included) generate what ``mocha generate`` generates from the
same folder, for both chat templates (phi and vicuna_v1).
"""

from __future__ import annotations

import ast
import json
from importlib.util import find_spec
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mocha.cli import main
from mocha.config import ConfigError
from mocha.export.pretrained import load_pretrained
from mocha.export.chat_template import chat_template
from mocha.export.hf import HFExportOptions
from mocha.export.hf_processing import MochaProcessor
from mocha.export.remote_code import BundleError, _mocha_imports, bundle
from mocha.model.mocha import MochaModel
from mocha.text.conversation import build_prompt, tokenize_prompt
from tests.eval_models import build_tiny_model, write_images
from tests.isolated_env import build_isolated_site

QUESTION = "Is there a red circle in the image?"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> (run export dir, model, tokenizer); one image shared by all."""
    root = tmp_path_factory.mktemp("hf")
    image = root / "images" / write_images(root / "images", 1, seed=3)[0]
    out = {}
    for family in ("llama", "phi"):
        model, tokenizer = build_tiny_model(root / f"tok-{family}", seed=1, family=family)
        model.save_pretrained(root / f"run-{family}")
        tokenizer.save_pretrained(root / f"run-{family}")
        out[family] = (root / f"run-{family}", model, tokenizer)
    return root, image, out


@pytest.fixture(scope="module")
def exports(runs):
    """family -> export folder (fp32, several shards), written by the CLI."""
    root, _, families = runs
    folders = {}
    for family, (run_dir, _, _) in families.items():
        folders[family] = root / f"hf-{family}"
        assert main(["export", "--checkpoint", str(run_dir), "--out", str(folders[family]),
                     "--max-shard-size", "300KB"]) == 0
    return folders


def _mocha_tokens(folder, image_path) -> list[int]:
    """What `mocha generate` generates from ``folder`` (its model + tokenizer, greedy), as ids."""
    model, tokenizer = load_pretrained(folder)
    ids = torch.tensor([tokenize_prompt([{"from": "human", "value": "<image>\n" + QUESTION}], tokenizer,
                                        model.config.template)])
    with Image.open(image_path) as image:
        pixels = {k: v.unsqueeze(0) for k, v in model.preprocess(image.convert("RGB")).items()}
    return model.generate(ids, pixel_values=pixels, max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)[0].tolist()


CHILD = textwrap.dedent("""
    import json, sys
    site, jobs = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, site)
    try:
        import mocha
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("mocha is importable in the isolated child")
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    results = {}
    for job in jobs:
        folder = job["folder"]
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": job["question"]}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False)
        inputs = processor(images=Image.open(job["image"]), text=prompt)
        out = model.generate(**inputs, max_new_tokens=job["new_tokens"])
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        result = {"prompt": prompt, "tokens": new, "text": processor.decode(new, skip_special_tokens=True),
                  "dtype": str(model.dtype), "class": type(model).__name__,
                  "processor": type(processor).__name__,
                  "mocha_modules": sorted(m for m in sys.modules if m == "mocha" or m.startswith("mocha."))}
        if job.get("causal_lm"):
            causal = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            result["causal_lm_tokens"] = causal.generate(**inputs, max_new_tokens=job["new_tokens"])[0].tolist()
            result["full_tokens"] = out[0].tolist()
        results[folder] = result
    print("RESULTS " + json.dumps(results))
""")


def _run_isolated(tmp_path, jobs) -> dict:
    site = build_isolated_site(tmp_path / "site")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf-home"),
           "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-S", str(script), str(site), json.dumps(jobs)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_isolated_child_cannot_import_mocha(tmp_path):
    """The check itself can fail: the isolated interpreter really lacks mocha (and packages
    outside the export's requirements), while torch and transformers import."""
    site = build_isolated_site(tmp_path / "site")
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib.util as u; "
             "print([u.find_spec(m) is not None for m in ('mocha', 'pipelines', 'ray', 'deepspeed', 'torch', "
             "'transformers', 'safetensors', 'PIL')])")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(site)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([False, False, False, False, True, True, True, True])


def test_loads_without_mocha_and_generates_the_same_tokens(runs, exports, tmp_path, capsys):
    root, image, families = runs
    jobs = [{"folder": str(exports[f]), "image": str(image), "question": QUESTION, "new_tokens": NEW_TOKENS,
             "causal_lm": f == "llama"} for f in families]
    results = _run_isolated(tmp_path, jobs)
    for family, folder in exports.items():
        got = results[str(folder)]
        assert got["mocha_modules"] == []
        assert (got["class"], got["processor"], got["dtype"]) == ("MochaForConditionalGeneration", "MochaProcessor",
                                                                  "torch.float32")
        template = families[family][1].config.template
        assert got["prompt"] == build_prompt([{"from": "human", "value": "<image>\n" + QUESTION}], template)
        expected = _mocha_tokens(folder, image)
        assert len(expected) > 1
        assert got["tokens"] == expected, family
        # and `mocha generate` itself prints the text those tokens decode to
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(folder), "--image", str(image), "--prompt", QUESTION,
                     "--max-new-tokens", str(NEW_TOKENS)]) == 0
        assert capsys.readouterr().out.strip() == got["text"].strip()
    llama = results[str(exports["llama"])]
    assert llama["causal_lm_tokens"] == llama["full_tokens"]  # the AutoModelForCausalLM alias is the same model


def test_sharded_bf16_export_loads_back_into_mocha(runs, tmp_path):
    root, image, families = runs
    run_dir, model, _ = families["phi"]
    out = tmp_path / "bf16"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out), "--dtype", "bf16",
                 "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        assert all(index["weight_map"][name] == shard for name in tensors)
        assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        assert payload <= 100_000 or len(tensors) == 1  # a single tensor may exceed the limit
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    loaded = MochaModel.from_pretrained(out)  # further training starts from here (fp32 parameters)
    want = model.state_dict()
    for name, value in loaded.state_dict().items():
        expected = want[name].to(torch.bfloat16).to(value.dtype) if value.is_floating_point() else want[name]
        assert torch.equal(value, expected), name


def test_bf16_export_loads_as_bf16_without_mocha(runs, tmp_path):
    root, image, families = runs
    out = tmp_path / "bf16"
    assert main(["export", "--checkpoint", str(families["llama"][0]), "--out", str(out), "--dtype", "bf16"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    got = _run_isolated(tmp_path, [{"folder": str(out), "image": str(image), "question": QUESTION,
                                    "new_tokens": 3}])[str(out)]
    assert got["dtype"] == "torch.bfloat16" and len(got["tokens"]) >= 1


def test_folder_layout_and_tokenizer(exports, runs):
    _, _, families = runs
    folder = exports["llama"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mocha"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mocha.MochaForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_mocha.MochaConfig"
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_mocha.MochaProcessor"}
    model, tokenizer = load_pretrained(folder)
    original = families["llama"][2]
    assert {k: v for k, v in tokenizer.get_vocab().items() if k != "<image>"} == original.get_vocab()
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<image>")
    assert config["num_image_tokens"] == model.num_visual_tokens


def test_model_card_lists_architecture_data_and_scores(runs, tmp_path):
    _, _, families = runs
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"fingerprint": "f" * 64, "num_samples": 120,
                                                      "input": {"url": "s3://b/llava.json"}}))
    (tmp_path / "features.json").write_text(json.dumps({"source": {"fingerprint": "e" * 64, "url": str(shards)},
                                                        "config_hash": "abc123", "dtype": "bf16", "num_samples": 120}))
    scores = {"pope": {"adversarial": {"accuracy": 0.6821, "f1": 0.7}}, "mme": {"totals": {"perception": 137.5}}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(families["phi"][0]), "--out", str(out), "--manifest", str(shards),
                 "--manifest", str(tmp_path / "features.json"), "--scores", str(tmp_path / "scores.json")]) == 0
    card = (out / "README.md").read_text()
    config = families["phi"][1].config
    for expected in ["pipeline_tag: image-text-to-text", "f" * 64, "e" * 64, "abc123", "0.6821", "137.5",
                     f"{config.connector.num_experts} experts, top-{config.connector.top_k}",
                     f"(HGA): {config.hga.mode}", "`phi`"] + [f"| {e.kind} |" for e in config.encoders]:
        assert expected in card, expected
    assert main(["export", "--checkpoint", str(families["phi"][0]), "--out", str(tmp_path / "bare")]) == 0
    assert "Not recorded (export with `--scores`" in (tmp_path / "bare" / "README.md").read_text()


def test_bad_options_are_one_line_errors(runs, tmp_path, capsys):
    _, _, families = runs
    run_dir = str(families["phi"][0])
    assert main(["export", "--checkpoint", run_dir, "--out", str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", run_dir, "--out", str(tmp_path / "o"), "--scores", str(tmp_path)]) == 2
    assert "scores.json not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="--dtype"):
        HFExportOptions(dtype="int8")


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_chat_template_renders_the_training_prompt(runs, exports, family):
    """Multi-turn, string and list content, a system message: the same text as build_prompt; the
    processor's ids are mocha's with each placeholder expanded to the visual token slots."""
    from mocha.text.conversation import IMAGE_TOKEN_INDEX
    from mocha.text.tokenizer import load_tokenizer

    _, _, families = runs
    model = families[family][1]
    tokenizer = load_tokenizer(exports[family])
    template = model.config.template
    processor = MochaProcessor(tokenizer, chat_template=chat_template(template),
                               encoders=[e.model_dump() for e in model.config.encoders], template=template,
                               image_token="<image>", num_image_tokens=3)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "And its size?"}]
    conversation = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."},
                    {"from": "human", "value": "And its size?"}]
    prompt = processor.apply_chat_template(messages, tokenize=False)
    assert prompt == build_prompt(conversation, template)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    expected = [i for t in tokenize_prompt(conversation, tokenizer, template)
                for i in ([image_id] * 3 if t == IMAGE_TOKEN_INDEX else [t])]
    assert processor.encode(prompt) == expected
    rendered = processor.apply_chat_template([{"role": "system", "content": "Be brief."}] + messages, tokenize=False)
    assert rendered.startswith("Be brief. USER: <image>\nWhat is it? ASSISTANT: A red circle.")


def test_plain_chat_template_matches_build_prompt():
    from jinja2 import Environment

    text = Environment().from_string(chat_template("plain")).render(messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "ignored"}]},
        {"role": "assistant", "content": "A caption."}])
    assert text == "<image>A caption.\n"


def test_bundle_is_the_package_code_with_relative_imports():
    files = {f.module: f for f in bundle()}
    # the closure follows imports inside functions too (MochaModel imports moe_llm lazily)
    assert {"mocha.model.mocha", "mocha.model.moe_llm", "mocha.model.hga", "mocha.config",
            "mocha.text.conversation"} <= set(files)
    for module, item in files.items():
        tree = ast.parse(item.source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("mocha"), (module, node.module)
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("mocha") for a in node.names), module
        # everything but the mocha import lines is the package's source, line for line
        original = open(find_spec(module).origin, encoding="utf-8").read().splitlines()
        body = item.source.splitlines()[1:]  # after the "Generated by" header
        assert len(body) == len(original)
        rewritten = {n.lineno - 1 for n in ast.walk(ast.parse("\n".join(original)))
                     if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "mocha"}
        assert rewritten or not module.startswith("mocha.export")  # the entry modules import mocha code
        for i, (line, source_line) in enumerate(zip(body, original)):
            if i in rewritten:
                assert "from ." in line and line != source_line, (module, line)
            else:
                assert line == source_line, (module, i)


@pytest.mark.parametrize("source, message", [
    ("def f():\n    import deepspeed\n", "imports deepspeed"),
    ("from ray import train\n", "imports from ray"),
    ("import mocha.config\n", "`import mocha.config` cannot be bundled"),
    ("from mocha.text import conversation\n", "imports a module"),
])
def test_bundle_refuses_what_an_export_environment_lacks(source, message):
    with pytest.raises(BundleError, match=message):
        _mocha_imports("probe", ast.parse(source))


def test_bundle_accepts_the_export_requirements():
    source = "import torch\nfrom PIL import Image\nimport json\nfrom mocha.config import ModelConfig\n"
    found = _mocha_imports("probe", ast.parse(source))
    assert [module for _, module in found] == ["mocha.config"]


def test_model_trained_from_features_exports_with_its_encoders(runs, tmp_path):
    """A run trained from feature shards has no encoders in memory: the export builds them from
    the config (the same frozen weights) and takes the given (consolidated) state for the rest."""
    from mocha.export.hf import write_hf_folder

    _, _, families = runs
    _, model, tokenizer = families["phi"]
    headless = MochaModel(model.config, with_encoders=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoders.")}
    headless.load_state_dict(state)
    (tmp_path / "out").mkdir()
    write_hf_folder(tmp_path / "out", headless, tokenizer, state_dict=state)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["mocha"]
    assert all(e["pretrained"] is None and e["config"] for e in config["encoders"])  # self-contained
    loaded = MochaModel.from_pretrained(tmp_path / "out")
    want = model.state_dict()
    assert set(loaded.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def test_transformers_loading_is_strict_and_restores_buffers(runs, exports, tmp_path):
    """The model class (here imported from mocha, the same code the folder carries) refuses a
    folder with a weight missing, and after loading its non-persistent buffers (position ids,
    rotary frequencies, HGA layout), which transformers leaves uninitialised, are exact."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mocha.export.hf_modeling import MochaForConditionalGeneration

    folder = exports["phi"]
    model = MochaForConditionalGeneration.from_pretrained(folder)
    reference, _ = load_pretrained(folder)
    ours = dict(model.named_buffers())
    assert set(ours) == set(dict(reference.named_buffers()))
    assert all(torch.equal(ours[name], value) for name, value in reference.named_buffers())
    assert any("position_ids" in name for name in ours) and any("inv_freq" in name for name in ours)

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "connectors.clip.router.weight" if "connectors.clip.router.weight" in index["weight_map"] else \
        sorted(k for k in index["weight_map"] if k.startswith("connectors."))[0]
    shard = broken / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing_keys"):
        MochaForConditionalGeneration.from_pretrained(broken)
