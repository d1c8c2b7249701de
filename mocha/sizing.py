"""Real-size plan: parameters, memory per GPU and training time, computed from the model itself.

Nothing here is a typed-in parameter count. :func:`measure_model` builds the full MoCHA model of
a :class:`~mocha.config.ModelConfig` on the ``meta`` device (no memory, no download), counts
every part's parameters (:mod:`mocha.model.sizing` does the same for the encoders and the LLM
alone; this module adds connectors, HGA, FLOPs, memory and time), and measures the frozen encoders' and the LLM's forward FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` at the real input shapes. The rest is arithmetic on
those numbers under assumptions that are stated where they are made:

* Model states follow DeepSpeed's own ZeRO-2 accounting
  (``estimate_zero2_model_states_mem_needs``: 2 bytes of bf16 weights per parameter on every rank,
  plus 18 bytes per parameter sharded over the data-parallel ranks: bf16 + fp32 gradients, fp32
  master weights, Adam's two moments). Experts are expert-parallel: a rank holds ``E / ep_size``
  experts of each connector and their states are sharded over the ``world / ep_size`` ranks that
  hold the same experts. Frozen parameters cost their bf16 weights only.
* Activations are the tensors autograd keeps for backward, counted per token for the
  transformers implementations the model uses (eager norms and activation functions, SDPA with
  the flash backend on GPU, bf16), see :func:`llm_layer_activation_bytes`. Gradient
  checkpointing (one checkpoint per decoder layer) keeps each layer's input plus one layer's
  activations during its recomputation.
* Time = model FLOPs / (GPUs x peak bf16 FLOP/s x MFU). Model FLOPs per sample: frozen encoders
  forward (measured), connectors and graph-form HGA forward+backward (3x forward), the LLM
  forward+backward: 3x forward when it trains (stage 2), 2x when it is frozen but gradients flow
  through it to the connectors (stage 1: no weight gradients). Recomputation under gradient
  checkpointing is not model FLOPs (it lowers the MFU a given step time implies, not the FLOPs).

``python -m mocha.sizing infra/README.md`` rewrites the generated tables in the README;
``mocha plan JOB.yaml`` prints the plan for a job file.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Literal

GiB = 2**30

#: Samples in the LLaVA-1.5 training sets (stage 1 pretraining, stage 2 instruction tuning).
DATASETS: dict[str, int] = {"LLaVA-558K": 558_128, "LLaVA-665K": 665_298}
STAGE_DATASET: dict[int, str] = {1: "LLaVA-558K", 2: "LLaVA-665K"}

#: Text tokens per sample assumed when no job says otherwise. Stage 1 (``plain``): one short
#: BLIP caption plus the end token, 64 is an upper bound. Stage 2: fill up to ``max_length``
#: (2048 = Phi-2's context), an upper bound for LLaVA-665K conversations.
STAGE1_TEXT_TOKENS = 64

#: Global batch sizes of the LLaVA-1.5 recipe MoCHA follows.
STAGE_GLOBAL_BATCH: dict[int, int] = {1: 256, 2: 128}


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak, no sparsity


GPUS: dict[str, GPUSpec] = {
    "A100": GPUSpec("A100 80GB SXM", 80.0, 312.0),
    "H100": GPUSpec("H100 80GB SXM", 80.0, 989.4),
}

#: Share of GPU memory the plan lets training use (CUDA context, NCCL buffers, allocator
#: fragmentation and DeepSpeed's communication buckets take the rest).
USABLE_MEMORY_FRACTION = 0.9


# --------------------------------------------------------------------------- measuring the model


@dataclass(frozen=True)
class EncoderSize:
    kind: str
    params: int
    image_size: int
    tokens: int  # visual tokens per image this encoder contributes
    width: int  # feature width the connector sees
    forward_flops: int  # per image, measured


@dataclass(frozen=True)
class ConnectorSize:
    kind: str  # encoder kind it serves
    expert_params: int  # all experts (expert-parallel)
    dense_params: int  # router and anything else replicated
    num_experts: int
    top_k: int
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.expert_params + self.dense_params

    @property
    def forward_flops_per_token(self) -> int:
        """Router plus the ``top_k`` experts a token visits (2 FLOPs per multiply-add)."""
        per_expert = (self.expert_params // self.num_experts) if self.num_experts else 0
        active = self.dense_params + self.top_k * per_expert
        return 2 * active


@dataclass(frozen=True)
class LLMSize:
    family: str
    params: int
    embedding_params: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    max_positions: int
    norm: Literal["layernorm", "rmsnorm"]
    mlp: Literal["gelu_new", "swiglu"]
    parallel_block: bool  # attention and MLP read the same normed input (Phi)
    residual_dropout: bool


@dataclass(frozen=True)
class ModelSize:
    encoders: tuple[EncoderSize, ...]
    connectors: tuple[ConnectorSize, ...]
    hga_params: int
    hga_mode: str
    llm: LLMSize
    llm_forward_flops: dict[int, int]  # sequence length -> forward FLOPs of one sample, measured

    @property
    def visual_tokens(self) -> int:
        return sum(e.tokens for e in self.encoders)

    @property
    def encoder_params(self) -> int:
        return sum(e.params for e in self.encoders)

    @property
    def connector_params(self) -> int:
        return sum(c.params for c in self.connectors)

    @property
    def expert_params(self) -> int:
        return sum(c.expert_params for c in self.connectors)

    @property
    def total_params(self) -> int:
        return self.encoder_params + self.connector_params + self.hga_params + self.llm.params

    def trainable_params(self, stage: int) -> int:
        return self.connector_params + self.hga_params + (self.llm.params if stage == 2 else 0)


def forward_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call, counted by torch's FlopCounterMode (works on ``meta`` tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def measure_model(config, seq_lens_for: Callable[[int], Iterable[int]] = lambda visual_tokens: ()) -> ModelSize:
    """Build ``config`` (a :class:`mocha.config.ModelConfig`) on the meta device and measure it.

    ``seq_lens_for(visual_tokens)`` names the LLM sequence lengths (tokens per sample) whose
    forward FLOPs to measure; it gets the model's visual tokens per image, which fix them.
    ``pretrained`` checkpoints are not loaded: each encoder and the LLM are built from their
    registry's real architecture (the paper's checkpoints) updated with their ``config`` entries.
    """
    import torch

    from mocha.model.connector import build_connector
    from mocha.model.sizing import count_parameters
    from mocha.model.encoders import build_encoder
    from mocha.model.hga import build_hga
    from mocha.model.llm import build_llm, llm_hidden_size

    # The same builders MochaModel assembles, each on the meta device (MochaModel itself
    # initialises its connectors on the CPU first: 1.4 GB for Vicuna-7B's).
    config = config.model_copy(update={
        "llm": config.llm.model_copy(update={"pretrained": None}),
        "encoders": [e.model_copy(update={"pretrained": None}) for e in config.encoders],
    })
    llm = build_llm(config.llm, device="meta")
    hidden = llm_hidden_size(llm)
    encoders, connectors = [], []
    for cfg in config.encoders:
        enc = build_encoder(cfg, device="meta")
        pixels = torch.empty(1, 3, enc.image_size, enc.image_size, device="meta")
        encoders.append(EncoderSize(enc.kind, count_parameters(enc), enc.image_size, enc.num_tokens, enc.hidden_size,
                                    forward_flops(enc, pixels)))
        with torch.device("meta"):
            conn = build_connector(config.connector, enc.hidden_size, hidden)
        expert = sum(p.numel() for n, p in conn.named_parameters() if n.startswith("experts."))
        connectors.append(ConnectorSize(
            kind=enc.kind, expert_params=expert, dense_params=count_parameters(conn) - expert,
            num_experts=getattr(conn, "num_experts", 0), top_k=getattr(conn, "top_k", 0),
            in_features=enc.hidden_size, out_features=hidden,
        ))
    hga = build_hga(config.hga, hidden, [e.tokens for e in encoders])
    visual_tokens = sum(e.tokens for e in encoders)
    llm_flops = {}
    for seq in sorted(set(seq_lens_for(visual_tokens))):
        embeds = torch.empty(1, seq, hidden, device="meta", dtype=torch.bfloat16)
        llm_flops[seq] = forward_flops(llm, inputs_embeds=embeds)
    return ModelSize(tuple(encoders), tuple(connectors), count_parameters(hga), config.hga.mode,
                     _llm_size(config.llm.family, llm), llm_flops)


def _llm_size(family: str, llm) -> LLMSize:
    from mocha.model.sizing import count_parameters

    cfg = llm.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if cfg.model_type == "phi":
        norm, mlp, parallel = "layernorm", "gelu_new", True
        dropout = float(getattr(cfg, "resid_pdrop", 0.0)) > 0
    elif cfg.model_type == "llama":
        norm, mlp, parallel, dropout = "rmsnorm", "swiglu", False, False
    else:
        raise ValueError(f"sizing knows the activation layout of phi and llama models, not {cfg.model_type!r}")
    return LLMSize(
        family=family, params=count_parameters(llm), embedding_params=llm.get_input_embeddings().weight.numel(),
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
        kv_dim=kv_heads * head_dim, vocab=llm.get_output_embeddings().weight.shape[0],
        max_positions=cfg.max_position_embeddings, norm=norm, mlp=mlp, parallel_block=parallel,
        residual_dropout=dropout,
    )


# --------------------------------------------------------------------------- activations


def llm_layer_activation_bytes(llm: LLMSize) -> int:
    """Bytes autograd saves per token in one decoder layer (bf16, eager transformers code).

    Attention: the q/k/v projections' input, rotated q and k, v, the SDPA output (flash
    backend: O(1) per token besides these) and the output projection's input (a reshaped copy).
    Norms: LayerNorm saves its input; the eager RMSNorm saves its fp32 upcast and its bf16
    normalised output. MLP: ``gelu_new`` (tanh formula) saves x, tanh, 0.5x and 1+tanh, plus fc2's
    input; SwiGLU saves gate, silu(gate), up and their product. Phi's residual dropout keeps a
    1-byte mask of the attention and MLP outputs.
    """
    h, kv, inter = llm.hidden, llm.kv_dim, llm.intermediate
    norm = 2 * h if llm.norm == "layernorm" else 4 * h + 2 * h
    attention = 2 * h + 2 * h + 2 * kv + 2 * kv + 2 * h + 2 * h
    if llm.mlp == "gelu_new":
        mlp = 4 * 2 * inter + 2 * inter
    else:
        mlp = 4 * 2 * inter
    mlp_input = 0 if llm.parallel_block else 2 * h  # parallel block: the MLP reads the attention's input
    norms = norm if llm.parallel_block else 2 * norm
    dropout = 2 * h if llm.residual_dropout else 0
    return norms + attention + mlp_input + mlp + dropout


def llm_head_activation_bytes(llm: LLMSize) -> int:
    """Per token outside the decoder layers: spliced input embeddings, final norm, lm_head
    input, bf16 logits and the fp32 log-softmax the cross-entropy keeps."""
    h = llm.hidden
    norm = 2 * h if llm.norm == "layernorm" else 6 * h
    return 2 * h + norm + 2 * h + 2 * llm.vocab + 4 * llm.vocab


def visual_activation_bytes(size: ModelSize) -> int:
    """Per image: trainable connectors and the HGA. A connector keeps its input, the ``top_k``
    gathered copies of it, and each visited expert's hidden (GELU input and output); graph-form
    HGA keeps two fp32 [N, N] matrices (similarities, adjacency) and four fp32 [N, H] tensors."""
    total = 0
    for enc, conn in zip(size.encoders, size.connectors):
        k = max(conn.top_k, 1)
        total += enc.tokens * (2 * conn.in_features + k * (2 * conn.in_features + 4 * conn.out_features))
    n, hidden = size.visual_tokens, size.llm.hidden
    if size.hga_mode == "graph":
        total += 2 * 4 * n * n + 4 * 4 * n * hidden
    return total


# --------------------------------------------------------------------------- training plan


@dataclass(frozen=True)
class TrainSetup:
    stage: Literal[1, 2]
    seq_len: int  # LLM tokens per sample: visual + text
    global_batch: int
    micro_batch: int
    num_gpus: int
    ep_size: int
    gradient_checkpointing: bool
    encoders_online: bool  # False: training from precomputed feature shards
    offload_optimizer: bool = False

    def __post_init__(self):
        if self.num_gpus % self.ep_size:
            raise ValueError(f"ep_size ({self.ep_size}) must divide num_gpus ({self.num_gpus})")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU."""

    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer: int
    activations_per_sample: int
    micro_batch: int

    @property
    def model_states(self) -> int:
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.micro_batch * self.activations_per_sample

    def max_micro_batch(self, gpu: GPUSpec) -> int:
        free = gpu.memory_gib * GiB * USABLE_MEMORY_FRACTION - self.model_states
        return max(int(free // self.activations_per_sample), 0)


def zero2_state_bytes(params: int, shards: int, offload: bool = False) -> tuple[int, int, int]:
    """(bf16 weights, gradients, optimizer states) on one GPU for ``params`` trainable parameters
    sharded over ``shards`` data-parallel ranks, with DeepSpeed's ZeRO-2 multipliers."""
    weights = 2 * params
    if offload:
        return weights, 0, 0
    return weights, (2 + 4) * params // shards, (4 + 8) * params // shards


def memory_plan(size: ModelSize, setup: TrainSetup) -> MemoryPlan:
    llm = size.llm
    frozen = (size.encoder_params if setup.encoders_online else 0) + (llm.params if setup.stage == 1 else 0)
    dense_trainable = size.trainable_params(setup.stage) - size.expert_params
    dense = zero2_state_bytes(dense_trainable, setup.num_gpus, setup.offload_optimizer)
    experts = zero2_state_bytes(size.expert_params // setup.ep_size, setup.num_gpus // setup.ep_size,
                                setup.offload_optimizer)
    tokens = setup.seq_len
    layer = llm_layer_activation_bytes(llm)
    if setup.gradient_checkpointing:
        layers = llm.layers * 2 * llm.hidden * tokens + layer * tokens
    else:
        layers = llm.layers * layer * tokens
    activations = layers + llm_head_activation_bytes(llm) * tokens + visual_activation_bytes(size)
    return MemoryPlan(
        frozen_weights=2 * frozen,
        trainable_weights=dense[0] + experts[0],
        gradients=dense[1] + experts[1],
        optimizer=dense[2] + experts[2],
        activations_per_sample=activations,
        micro_batch=setup.micro_batch,
    )


@dataclass(frozen=True)
class TimePlan:
    flops_per_sample: int
    step_seconds: float
    steps_per_epoch: int
    epoch_hours: float
    gpu_hours: float


def checkpoint_bytes(size: ModelSize, stage: int) -> int:
    """One consolidated checkpoint (mocha.train.checkpoint): the trainable parameters in fp32 and
    AdamW's two fp32 moments; frozen weights are not saved."""
    return (4 + 4 + 4) * size.trainable_params(stage)


def flops_per_sample(size: ModelSize, setup: TrainSetup) -> int:
    encoders = sum(e.forward_flops for e in size.encoders) if setup.encoders_online else 0
    connectors = 3 * sum(e.tokens * c.forward_flops_per_token for e, c in zip(size.encoders, size.connectors))
    n = size.visual_tokens
    hga = 3 * 4 * n * n * size.llm.hidden if size.hga_mode == "graph" else 0
    llm_passes = 3 if setup.stage == 2 else 2
    llm = llm_passes * size.llm_forward_flops[setup.seq_len]
    return encoders + connectors + hga + llm


def time_plan(size: ModelSize, setup: TrainSetup, gpu: GPUSpec, mfu: float, samples: int) -> TimePlan:
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    per_sample = flops_per_sample(size, setup)
    flops_per_gpu_second = gpu.bf16_tflops * 1e12 * mfu
    step = setup.global_batch * per_sample / (setup.num_gpus * flops_per_gpu_second)
    steps = math.ceil(samples / setup.global_batch)
    gpu_hours = samples * per_sample / flops_per_gpu_second / 3600
    return TimePlan(per_sample, step, steps, steps * step / 3600, gpu_hours)


def _text_tokens(stage: int, visual_tokens: int, max_length: int) -> int:
    return STAGE1_TEXT_TOKENS if stage == 1 else max_length - visual_tokens


def stage_seq_len_for(visual_tokens: int, stage: int, max_length: int, text_tokens: int | None = None) -> int:
    """Tokens per sample: the visual tokens plus ``text_tokens`` (default: 64 for stage 1, up to
    ``max_length`` for stage 2), which must fit ``max_length``."""
    if text_tokens is None:
        text_tokens = _text_tokens(stage, visual_tokens, max_length)
    seq = visual_tokens + text_tokens
    if text_tokens < 1 or seq > max_length:
        raise ValueError(f"{visual_tokens} visual + {text_tokens} text tokens do not fit max_length {max_length}")
    return seq


def stage_seq_len(size: ModelSize, stage: int, max_length: int, text_tokens: int | None = None) -> int:
    return stage_seq_len_for(size.visual_tokens, stage, max_length, text_tokens)


# --------------------------------------------------------------------------- the README tables


@dataclass(frozen=True)
class Scenario:
    """One row of the sizing note: an LLM family, a stage and the cluster it runs on."""

    family: str
    stage: Literal[1, 2]
    num_gpus: int = 8
    ep_size: int = 4
    max_length: int = 2048


README_SCENARIOS: tuple[Scenario, ...] = tuple(Scenario(f, s) for f in ("phi", "llama") for s in (1, 2))
README_MFU = 0.40
LLM_NAMES = {"phi": "Phi-2", "llama": "Vicuna-7B"}


def _m(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def render_sizing_markdown(mfu: float = README_MFU) -> str:
    """The generated part of infra/README.md (deterministic: a test compares it to the file)."""
    from mocha.model.sizing import real_model_config

    sizes: dict[str, ModelSize] = {}
    setups: list[tuple[Scenario, TrainSetup]] = []
    for family in LLM_NAMES:
        scenarios = [s for s in README_SCENARIOS if s.family == family]
        size = measure_model(real_model_config(family), lambda visual: {
            stage_seq_len_for(visual, s.stage, s.max_length) for s in scenarios})
        sizes[family] = size
        for s in scenarios:
            setups.append((s, TrainSetup(
                stage=s.stage, seq_len=stage_seq_len(size, s.stage, s.max_length),
                global_batch=STAGE_GLOBAL_BATCH[s.stage], micro_batch=1, num_gpus=s.num_gpus, ep_size=s.ep_size,
                gradient_checkpointing=False, encoders_online=True,
            )))
    any_size = next(iter(sizes.values()))
    lines = ["### Vision encoders (frozen)", "",
             "| encoder | parameters | input px | tokens / image | feature width | forward GFLOP / image |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for e in any_size.encoders:
        lines.append(f"| {e.kind} | {_m(e.params)} | {e.image_size} | {e.tokens:,} | {e.width:,} | "
                     f"{e.forward_flops / 1e9:,.1f} |")
    lines.append(f"| **all four** | **{_m(any_size.encoder_params)}** | | **{any_size.visual_tokens:,}** | | "
                 f"**{sum(e.forward_flops for e in any_size.encoders) / 1e9:,.1f}** |")
    lines += ["", "### Language models and MoE connectors", "",
              "| LLM | LLM parameters | hidden | layers | connectors (4 x E=4, top-2) | of which experts | "
              "active connector GFLOP / image (fwd) | total model | trainable stage 1 | trainable stage 2 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for family, size in sizes.items():
        conn_flops = sum(e.tokens * c.forward_flops_per_token for e, c in zip(size.encoders, size.connectors))
        lines.append(f"| {LLM_NAMES[family]} | {_m(size.llm.params)} | {size.llm.hidden:,} | {size.llm.layers} | "
                     f"{_m(size.connector_params)} | {_m(size.expert_params)} | {conn_flops / 1e9:,.1f} | "
                     f"{_m(size.total_params)} | {_m(size.trainable_params(1))} | {_m(size.trainable_params(2))} |")
    lines += ["", f"### Memory per GPU (GiB), ZeRO-2, {README_SCENARIOS[0].num_gpus} GPUs, "
              f"expert parallel ep_size={README_SCENARIOS[0].ep_size}, bf16, encoders run online", "",
              "| LLM | stage | tokens / sample | frozen weights | trainable weights | gradients | Adam states | "
              "model states | activations / sample | activations / sample, grad. ckpt | max micro-batch on 80 GB | "
              "same, grad. ckpt | one checkpoint on S3 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s, setup in setups:
        size = sizes[s.family]
        plain = memory_plan(size, setup)
        ckpt = memory_plan(size, replace(setup, gradient_checkpointing=True))
        gpu = GPUS["H100"]
        lines.append(f"| {LLM_NAMES[s.family]} | {s.stage} | {setup.seq_len:,} | {_gib(plain.frozen_weights)} | "
                     f"{_gib(plain.trainable_weights)} | {_gib(plain.gradients)} | {_gib(plain.optimizer)} | "
                     f"{_gib(plain.model_states)} | {_gib(plain.activations_per_sample)} | "
                     f"{_gib(ckpt.activations_per_sample)} | {plain.max_micro_batch(gpu)} | {ckpt.max_micro_batch(gpu)} | "
                     f"{_gib(checkpoint_bytes(size, s.stage))} |")
    lines += ["", f"### Training time at {mfu:.0%} MFU ({README_SCENARIOS[0].num_gpus} GPUs, one epoch)", "",
              "| LLM | stage | data set | samples | global batch | TFLOP / sample | steps | "
              + " | ".join(f"{g} s / step | {g} hours | {g} GPU-hours" for g in GPUS) + " |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in GPUS) + " |"]
    for s, setup in setups:
        size = sizes[s.family]
        data = STAGE_DATASET[s.stage]
        plans = {g: time_plan(size, setup, gpu, mfu, DATASETS[data]) for g, gpu in GPUS.items()}
        first = next(iter(plans.values()))
        cells = " | ".join(f"{p.step_seconds:,.1f} | {p.epoch_hours:,.1f} | {p.gpu_hours:,.0f}" for p in plans.values())
        lines.append(f"| {LLM_NAMES[s.family]} | {s.stage} | {data} | {DATASETS[data]:,} | {setup.global_batch} | "
                     f"{first.flops_per_sample / 1e12:,.2f} | {first.steps_per_epoch:,} | {cells} |")
    return "\n".join(lines) + "\n"


BEGIN_MARK = "<!-- sizing:begin (generated by `python -m mocha.sizing infra/README.md`; do not edit) -->"
END_MARK = "<!-- sizing:end -->"


def readme_block(text: str) -> str:
    """The generated block of a README (between the markers, exclusive)."""
    match = re.search(re.escape(BEGIN_MARK) + r"\n(.*?)" + re.escape(END_MARK), text, flags=re.S)
    if not match:
        raise ValueError(f"README has no sizing block (expected {BEGIN_MARK!r} ... {END_MARK!r})")
    return match.group(1)


def write_readme(path: str | Path) -> None:
    path = Path(path)
    text = path.read_text()
    old = readme_block(text)
    path.write_text(text.replace(BEGIN_MARK + "\n" + old + END_MARK, BEGIN_MARK + "\n" + render_sizing_markdown() + END_MARK))


# --------------------------------------------------------------------------- `mocha plan JOB.yaml`


def setup_from_job(job, size: ModelSize, text_tokens: int | None = None) -> TrainSetup:
    """The :class:`TrainSetup` a :class:`mocha.train.job.JobConfig` describes (one GPU per worker)."""
    return TrainSetup(
        stage=job.stage,
        seq_len=stage_seq_len(size, job.stage, job.model.max_length, text_tokens),
        global_batch=job.schedule.global_batch_size,
        micro_batch=job.schedule.micro_batch_size,
        num_gpus=job.scaling.num_workers,
        ep_size=job.deepspeed.ep_size,
        gradient_checkpointing=job.schedule.gradient_checkpointing,
        encoders_online=job.data.features is None,
        offload_optimizer=job.deepspeed.offload_optimizer,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", type=Path, help="job YAML (jobs/stage1.yaml, jobs/stage2.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field, e.g. --set scaling.num_workers=32 (repeatable)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100", help="GPU model (default H100)")
    parser.add_argument("--mfu", type=float, default=README_MFU, help=f"model FLOPs utilisation (default {README_MFU})")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per epoch (default: LLaVA-558K for stage 1, LLaVA-665K for stage 2)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help=f"text tokens per sample (default: {STAGE1_TEXT_TOKENS} for stage 1, up to max_length for stage 2)")


def run(args: argparse.Namespace) -> int:
    """Print parameters, memory per GPU and time for a job file (nothing is downloaded or run)."""
    from mocha.config import ConfigError
    from mocha.train.job import load_job

    job = load_job(args.job, args.overrides)
    if job.moe_llm.enabled:
        print("note: moe_llm experts are not included in this plan", file=sys.stderr)
    try:
        size = measure_model(job.model, lambda visual: {
            stage_seq_len_for(visual, job.stage, job.model.max_length, args.text_tokens)})
        setup = setup_from_job(job, size, args.text_tokens)
    except ValueError as e:
        raise ConfigError(f"{args.job}: {e}") from None
    gpu = GPUS[args.gpu]
    samples = args.samples or DATASETS[STAGE_DATASET[job.stage]]
    mem = memory_plan(size, setup)
    plan = time_plan(size, setup, gpu, args.mfu, samples)
    usable = gpu.memory_gib * GiB * USABLE_MEMORY_FRACTION
    rows = [
        ("parameters: encoders / connectors / HGA / LLM",
         f"{_m(size.encoder_params)} / {_m(size.connector_params)} / {_m(size.hga_params)} / {_m(size.llm.params)}"),
        ("trainable parameters", _m(size.trainable_params(setup.stage))),
        ("tokens per sample (visual + text)", f"{setup.seq_len:,} ({size.visual_tokens:,} visual)"),
        ("GPUs / ep_size / micro-batch", f"{setup.num_gpus} / {setup.ep_size} / {setup.micro_batch}"),
        ("encoders on the trainers", "yes" if setup.encoders_online else "no (feature shards)"),
        ("GiB per GPU: frozen / trainable weights", f"{_gib(mem.frozen_weights)} / {_gib(mem.trainable_weights)}"),
        ("GiB per GPU: gradients / Adam states", f"{_gib(mem.gradients)} / {_gib(mem.optimizer)}"),
        ("GiB per GPU: activations (micro-batch)",
         f"{_gib(mem.micro_batch * mem.activations_per_sample)}"
         f" ({'with' if setup.gradient_checkpointing else 'no'} gradient checkpointing)"),
        (f"GiB per GPU: total / usable on {gpu.name}", f"{_gib(mem.total)} / {_gib(usable)}"),
        ("largest micro-batch that fits", str(mem.max_micro_batch(gpu))),
        ("TFLOP per sample", f"{plan.flops_per_sample / 1e12:,.2f}"),
        (f"step time at {args.mfu:.0%} MFU", f"{plan.step_seconds:,.2f} s x {plan.steps_per_epoch:,} steps/epoch"),
        (f"one epoch of {samples:,} samples", f"{plan.epoch_hours:,.1f} h, {plan.gpu_hours:,.0f} GPU-hours"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"plan for {args.job} (stage {job.stage}, {LLM_NAMES.get(size.llm.family, size.llm.family)})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if mem.total > usable:
        print(f"warning: {_gib(mem.total)} GiB per GPU exceeds the usable {_gib(usable)} GiB: lower "
              f"schedule.micro_batch_size to {mem.max_micro_batch(gpu)} or enable gradient checkpointing",
              file=sys.stderr)
    if setup.seq_len > size.llm.max_positions:
        print(f"warning: {setup.seq_len} tokens per sample exceed the LLM's {size.llm.max_positions} positions",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the sizing tables of a README.")
    parser.add_argument("readme", type=Path, help="file with the sizing markers, e.g. infra/README.md")
    args = parser.parse_args(argv)
    write_readme(args.readme)
    print(f"wrote sizing tables to {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
