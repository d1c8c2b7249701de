"""Real-size plan: memory per GPU and training time of a job, from the measured model.

Nothing here is a typed-in parameter count: every size comes from
:func:`mocha.plan.params.measure_model` (the model built on the ``meta`` device, FLOPs counted). The rest is arithmetic on
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

``python -m mocha.plan.readme infra/README.md`` rewrites the generated tables in the README
(:mod:`mocha.plan.readme`); ``mocha plan JOB.yaml`` prints the plan for a job file (:mod:`mocha.plan.cli`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mocha.plan.params import LLMSize, ModelSize

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
    """One checkpoint (mocha.train.checkpoint), all shards together: the trainable parameters in
    fp32 and AdamW's two fp32 moments; frozen weights are not saved. Each of the N ranks writes
    about 1/N of it, in parallel."""
    return (4 + 4 + 4) * size.trainable_params(stage)


#: Write bandwidth one rank is assumed to reach to S3 (single stream, multipart): a conservative
#: figure for an 8-GPU node sharing a 25-100 Gbit/s NIC between its 8 writers.
CHECKPOINT_RANK_WRITE_BYTES_PER_S = 0.5e9


def checkpoint_save_seconds(size: ModelSize, setup: TrainSetup) -> float:
    """Seconds a save stalls training: every rank writes its 1/N share in parallel."""
    return checkpoint_bytes(size, setup.stage) / setup.num_gpus / CHECKPOINT_RANK_WRITE_BYTES_PER_S


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


def setup_from_job(job, size: ModelSize, text_tokens: int | None = None) -> TrainSetup:
    """The :class:`TrainSetup` a :class:`mocha.train.job.JobConfig` describes (one GPU per worker)."""
    return TrainSetup(
        stage=job.stage,
        seq_len=stage_seq_len(size, job.stage, job.model.max_length, text_tokens),
        global_batch=job.schedule.global_batch_size,
        micro_batch=job.schedule.micro_batch_size,
        # an elastic run is planned at its smallest size: the most state per GPU, the slowest steps
        num_gpus=job.scaling.min_workers,
        ep_size=job.ep_size_for(job.scaling.min_workers),
        gradient_checkpointing=job.schedule.gradient_checkpointing,
        encoders_online=job.data.features is None,
        offload_optimizer=job.deepspeed.offload_optimizer,
    )


# --------------------------------------------------------------------------- shared by the plan's outputs

README_MFU = 0.40
LLM_NAMES = {"phi": "Phi-2", "llama": "Vicuna-7B"}


def fmt_millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def fmt_gib(n: float) -> str:
    return f"{n / GiB:,.2f}"
