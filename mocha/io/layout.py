"""Every on-disk name mocha reads or writes, defined once.

Folders are local paths or ``s3://`` URLs (``mocha.io.storage``). Each layout below is what the
module in brackets writes; readers import the names from here, never spell them again.

**Shard set** (``mocha data shard``; ``pipelines.shard``)::

    <shards>/shard-000000.tar ...    WebDataset tars (one sample = <key>.json + <key>.<image suffix>)
    <shards>/manifest.json           written last: the set is complete only when it exists
    <shards>/quarantine.jsonl        every rejected input record with its reason
    <shards>/_progress/              per-shard done-markers with every input record's verdict while a
                                     build runs (resume); removed once manifest.json (which lists each
                                     shard's plan digest) is written: a rerun then reuses shards from the
                                     manifest and quarantine.jsonl it reads before removing the manifest
    <shards>/_progress/job.json      the identity (input SHA-256, options) of the run that owns the folder
    <shards>/_lock.json              the lease of the run writing the folder (deleted when it ends)

**Feature set** (``mocha data features``; ``pipelines.features``)::

    <features>/features-000000.tar   one tar per source shard, same keys and order
    <features>/manifest.json         written last: encoders, shapes, source shard fingerprint
    <features>/_progress/            per-shard markers, only while the job runs

**Run directory** (``mocha train``; ``mocha.train``): ``<run.storage_path>/<run.name>/``::

    checkpoints/step-NNNNNNNN/       training checkpoints (``CHECKPOINT_*`` below)
    metrics.jsonl                    one JSON object per optimizer step, the whole run
    samples/step-00000500.jsonl      sample ledger: the sample ids each step consumed, one file per
                                     checkpoint interval (``mocha.train.ledger``)
    export/                          the trained model (``EXPORT_*`` below) at the end of a run

**Training checkpoint** (``mocha.train.checkpoint``): ``<run dir>/checkpoints/step-00000500/``,
trainable state only, sharded by the ranks that wrote it, named globally::

    shards/shard-00003-of-00016.safetensors   one per rank: its fragments of weights and moments
    index.json                       global shapes and which shard holds which range of each tensor
    rng.safetensors                  every rank's torch RNG state
    metrics.jsonl                    the metrics history up to this step
    state.json                       written last: marks the checkpoint complete

**Export / pretrained directory** (``MochaModel.save_pretrained``; ``mocha.export``)::

    mocha_config.json                the whole architecture
    model.safetensors                every weight, frozen ones included (EXPORT_WEIGHTS_NAME)
    trainable.safetensors            connectors + HGA alone: the stage-1 -> stage-2 hand-off
    tokenizer files                  (``tokenizer.save_pretrained``)

**Transformers-native export** (``mocha export``; ``mocha.export.hf``): loads with
``AutoModelForImageTextToText`` / ``AutoProcessor`` (``trust_remote_code=True``) without mocha, and
with ``MochaModel.from_pretrained``::

    config.json                      MochaConfig: model_type "mocha", the architecture under "mocha"
    model.safetensors                every weight, or, past --max-shard-size,
    model-0000i-of-0000n.safetensors   the shards and model.safetensors.index.json
    generation_config.json, processor_config.json, chat_template.jinja, README.md (model card)
    tokenizer files                  with "<image>" added as a special token
    configuration_mocha.py, modeling_mocha.py, processing_mocha.py, mocha_*.py   remote code

``state.json`` (only in checkpoints) vs ``mocha_config.json`` / a ``config.json`` of model_type
mocha (only in exports) tells the kinds of model folder apart on disk.
"""

from __future__ import annotations

# -- datasets -------------------------------------------------------------------------------------
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
PROGRESS_DIR = "_progress"
SHARD_JOB_NAME = "job.json"  # inside PROGRESS_DIR
OUTPUT_LOCK_NAME = "_lock.json"

# -- run directory --------------------------------------------------------------------------------
METRICS_NAME = "metrics.jsonl"
EXPORT_DIR = "export"
SAMPLES_DIR = "samples"
SAMPLES_FILE = "step-{step:08d}.jsonl"  # .format(step=<last step of the interval>)

# -- training checkpoint --------------------------------------------------------------------------
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_STATE_NAME = "state.json"
CHECKPOINT_INDEX_NAME = "index.json"
CHECKPOINT_SHARDS_DIR = "shards"
CHECKPOINT_RNG_NAME = "rng.safetensors"

# -- export / pretrained directory ----------------------------------------------------------------
EXPORT_CONFIG_NAME = "mocha_config.json"
EXPORT_WEIGHTS_NAME = "model.safetensors"
TRAINABLE_NAME = "trainable.safetensors"
EXPORT_HF_CONFIG_NAME = "config.json"
EXPORT_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
EXPORT_WEIGHTS_PATTERN = "model{suffix}.safetensors"
EXPORT_GENERATION_CONFIG_NAME = "generation_config.json"
EXPORT_PROCESSOR_CONFIG_NAME = "processor_config.json"
EXPORT_CHAT_TEMPLATE_NAME = "chat_template.jinja"
EXPORT_CARD_NAME = "README.md"
