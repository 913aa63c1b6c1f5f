"""The DeepSpeed Learner: ZeRO 0-3, optional optimizer offload, data parallel over ranks.

``DeepSpeedLearner`` runs the same step as ``TorchLearner`` (the algorithm lives once in
``learner.MicroBatchLearner``: pi_prox / pi_ref scoring, micro-batch accumulation, the
loss chosen at setup and overridable per ``step``, the metrics) on a
``deepspeed.initialize`` engine, with AdamW (``DeepSpeedCPUAdam`` when the optimizer
state is offloaded) and the same linear-warmup schedule. Two processes on a CPU::

    torchrun --nproc_per_node 2 scripts/train.py --learner deepspeed --zero-stage 2
    deepspeed --num_accelerators 2 --bind_cores_to_rank scripts/train.py ...   # or --num_gpus 2 on GPUs

**Data parallel.** Under a launcher with W ranks, each rank's ``step`` gets its shard of
the batch (``distributed.scatter_batch``), which keeps the whole batch's
``num_sequences`` / ``num_tokens``: the shards' losses add up to the batch loss. DeepSpeed
*averages* gradients over ranks, so each rank backpropagates ``W * loss`` and the
average is the whole batch's gradient -- the update a single process would take on the
whole batch. Metric sums are all-reduced before dividing (token-weighted means, max/min
for ``*_max`` / ``*_min``, the loss summed), so every rank returns the whole batch's
metrics.

**Where it departs from TorchLearner.**

- Gradient accumulation runs through ``engine.backward(loss, scale_wrt_gas=False)`` (the
  loss is already normalised by whole-batch counts) with the boundary set by hand on the
  last micro-batch (``set_gradient_accumulation_boundary``): the number of micro-batches
  may change between batches, so DeepSpeed's ``gradient_accumulation_steps`` stays 1 and
  never decides the boundary. ZeRO 2/3 reduce gradients at that boundary. With
  ``micro_batch_tokens`` the count also differs between the ranks' shards; the step takes
  the largest over ranks and splits micro-batches on the others to match
  (``algorithm/packing.py``), so every rank runs the same passes and collectives, and
  ``train_micro_batch_size_per_gpu`` (``micro_batch_size``) is then only DeepSpeed's
  bookkeeping, not the rows per pass.
- Clipping: at ZeRO 0 in fp32 the engine holds the plain torch optimizer and reports no
  norm, so the learner clips with ``torch.nn.utils.clip_grad_norm_`` exactly as
  TorchLearner does (after DeepSpeed's all-reduce). Otherwise DeepSpeed's
  ``gradient_clipping`` clips and ``get_global_grad_norm`` is the reported norm.
- bf16 by default on CUDA (fp32 master weights in the optimizer), fp32 on a CPU; fp16 is
  refused (loss scaling skips steps on overflow, which would break ``version``).
- ``weights_for_generation`` returns the weights on rank 0 only (``{}`` elsewhere).
- Checkpoints: DeepSpeed's own ``save_checkpoint`` (weights, optimizer shards, scheduler,
  ``version`` as client state) in ``path/deepspeed/``, plus the model written by rank 0
  with ``save_pretrained`` so the folder is a loadable ``--model``.

**Collective calls** (every rank, same order): the constructor, ``step``,
``weights_for_generation`` (at ZeRO-3), ``save`` and ``load``.

**ZeRO-3 gathering.** At ZeRO-3 each rank holds a slice of every parameter (the module's
``param.data`` is an empty placeholder between uses). Forward passes gather layers on
demand through DeepSpeed's module hooks (``algorithm/logprobs.py`` calls the model's modules, so
the hooks fire). For the full weights, ``deepspeed.zero.GatheredParameters`` gathers one
parameter at a time on every rank; rank 0 copies it to CPU and the slices are released
on leaving the context, so peak memory is the shards plus one whole parameter. Tied
parameters (the LM head sharing the embedding) are gathered once and returned under
every name ``state_dict`` gives them, as TorchLearner does.

**The user's DeepSpeed JSON** (``ds_config``) is used as is, except for the keys the
trainer owns, which it sets itself and which the file may only repeat with the same
value: ``train_micro_batch_size_per_gpu`` (``micro_batch_size``),
``gradient_accumulation_steps`` (1, see above), ``train_batch_size`` (micro x world),
``gradient_clipping`` (``max_grad_norm``), ``zero_optimization.stage`` (``zero_stage``),
``bf16.enabled`` (``bf16`` when given); the file may not contain ``optimizer`` or
``scheduler`` (the learner builds AdamW and the warmup from its own arguments: one source
of truth) nor enable ``fp16``. ``offload_optimizer=True`` adds
``zero_optimization.offload_optimizer = {"device": "cpu"}`` unless the file names an
offload device; a file's own offload section turns offload on too.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlvr.trainer.algorithm.losses import LossFn, Objective
from rlvr.trainer.engines import distributed, lora
from rlvr.trainer.engines.torch_learner import MicroBatchLearner, warmup_schedule

_DS_DIR = "deepspeed"
_TAG = "learner"
_VERSION_FILE = "learner_version.json"


class DeepSpeedLearner(MicroBatchLearner):
    """Implements the ``Learner`` protocol on a DeepSpeed engine (ZeRO 0-3, data parallel)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFn | Objective,
        *,
        learning_rate: float,
        ref_model: torch.nn.Module | None = None,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        warmup_steps: int = 0,
        num_iterations: int = 1,
        micro_batch_size: int = 16,
        temperature: float = 1.0,
        version: int = 0,
        zero_stage: int = 0,
        offload_optimizer: bool = False,
        ds_config: str | os.PathLike | dict | None = None,
        bf16: bool | None = None,
        micro_batch_tokens: int = 0,
    ):
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        device = next(model.parameters()).device
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
        import deepspeed

        self._setup_common(loss, ref_model, num_iterations, micro_batch_size, temperature, version, micro_batch_tokens)
        _ensure_process_group(device)
        self.world = distributed.world_size()
        self.zero_stage = zero_stage
        self.max_grad_norm = max_grad_norm
        config = build_config(
            *_read_user_config(ds_config),
            micro_batch_size=micro_batch_size,
            world=self.world,
            zero_stage=zero_stage,
            offload_optimizer=offload_optimizer,
            bf16=device.type == "cuda" if bf16 is None else bf16,
            bf16_given=bf16 is not None,
            max_grad_norm=max_grad_norm,
        )
        # ZeRO 0 in fp32 keeps the plain torch optimizer, which reports no norm: clip here.
        self._clip_here = zero_stage == 0 and not config["bf16"]["enabled"]
        if self._clip_here:
            config["gradient_clipping"] = 0.0
        self.ds_config = config
        params = [p for p in model.parameters() if p.requires_grad]
        offloaded = config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
        if offloaded:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=learning_rate, weight_decay=weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        schedule = warmup_schedule(warmup_steps)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=config,
        )
        self.model = self.engine.module
        self.device = self.engine.device

    # --- the Learner protocol ----------------------------------------------------------

    def weights_for_generation(self) -> dict[str, torch.Tensor]:
        """Return the full weights by name on rank 0, ``{}`` on other ranks (collective at ZeRO-3).

        Below ZeRO-3 every rank holds whole weights: rank 0 returns detached views (copy
        before mutating), like TorchLearner. At ZeRO-3 they are gathered one parameter at a
        time and rank 0 returns CPU copies. LoRA: the adapters only (``engines/lora.py``;
        at ZeRO-3 only they are gathered), or the merged weights for a generator that takes no adapters.
        """
        adapters = lora.is_lora(self.model) and not lora.merges_for_generation(self.model)
        return lora.generation_weights(self.model, self._state_dict(adapters_only=adapters))

    def _state_dict(self, adapters_only: bool = False) -> dict[str, torch.Tensor]:
        """Return the module's whole state dict on rank 0 (``{}`` elsewhere; collective at ZeRO-3)."""
        if self.zero_stage < 3:
            if not distributed.is_main():
                return {}
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        return _gather_state_dict(self.model, only=lora.is_adapter_key if adapters_only else None)

    def save(self, path: str) -> None:
        """Write DeepSpeed's checkpoint and a ``save_pretrained`` model to ``path`` (collective)."""
        out = Path(path)
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        adapters = lora.is_lora(self.model)  # LoRA: the frozen base weights are not saved again
        self.engine.save_checkpoint(
            str(out / _DS_DIR), tag=_TAG, client_state={"version": self.version}, exclude_frozen_parameters=adapters
        )
        state = self._state_dict(adapters_only=adapters)
        if distributed.is_main():
            if adapters:
                lora.save_adapters(self.model, out, state)
            else:
                self.model.save_pretrained(out, state_dict=state)
            (out / _VERSION_FILE).write_text(json.dumps({"version": self.version}))
        distributed.barrier()

    def load(self, path: str) -> None:
        """Restore weights, optimizer, scheduler and version from ``save``'s folder (collective)."""
        src = Path(path) / _DS_DIR
        if not (src / _TAG).is_dir():
            raise FileNotFoundError(
                f"{path}: no DeepSpeed checkpoint ({src / _TAG} is missing); "
                "a folder saved by the torch learner resumes only with --learner torch"
            )
        loaded, client = self.engine.load_checkpoint(
            str(src),
            tag=_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not lora.is_lora(self.model),  # LoRA: the checkpoint holds the adapters only
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {src}")
        self.version = int(client["version"])

    # --- hooks of MicroBatchLearner --------------------------------------------------------

    def _zero_grad(self) -> None:
        """Nothing to do: DeepSpeed clears gradients after every optimizer step it takes."""

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # The boundary is where ZeRO reduces gradients over ranks; DeepSpeed averages them,
        # so scale by the world size to get the sum of the shards' gradients.
        self.engine.set_gradient_accumulation_boundary(last)
        # algorithm/logprobs.py runs the model's modules, not ``engine.forward``, which would first
        # tell the ZeRO optimizer that a new micro-batch begins (ZeRO-3 then accumulates
        # into, instead of overwriting, the previous micro-batch's gradient partitions).
        # Nothing between that forward and this backward reads the flag, so do it here.
        if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
            self.engine.optimizer.clear_backward_seen_flag()
        self.engine.backward(loss * self.world if self.world > 1 else loss, scale_wrt_gas=False)

    def _optimizer_step(self) -> float:
        if self._clip_here:
            grad_norm = self._clip_gradients()
            self.engine.step()
            return grad_norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def _learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    def _all_reduce(self, sums: dict[str, float]) -> dict[str, float]:
        return distributed.all_reduce_metrics(sums)

    def _clip_gradients(self) -> float:
        """TorchLearner's clipping, on the (already all-reduced) gradients of ZeRO 0."""
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grads = [p for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(grads, limit))


def _ensure_process_group(device: torch.device) -> None:
    """Join the launcher's group, or make a one-rank group: ``deepspeed.initialize`` needs one.

    Alone, DeepSpeed would look for MPI; a one-rank gloo/NCCL group on an in-memory store
    needs no port (learners in side-by-side test processes cannot collide). DeepSpeed
    also asserts that ``LOCAL_RANK`` is set, which only launchers do: it is set to 0.
    """
    distributed.init_distributed(device)
    if dist.is_initialized():
        return
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(distributed.backend_for(device), store=dist.HashStore(), rank=0, world_size=1)


def _gather_state_dict(model: torch.nn.Module, only: Any = None) -> dict[str, torch.Tensor]:
    """Gather ZeRO-3 parameters one at a time (collective); rank 0 gets CPU copies by name.

    ``only(name)``: gather just the entries it accepts (a LoRA run's adapters).
    """
    import deepspeed

    main = distributed.is_main()
    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: one id, two names
        if only is not None and not only(name):
            continue
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    gathered: dict[str, torch.Tensor] = {}
    for key, p in params.items():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if main:
                copy_ = p.detach().to("cpu", copy=True)
                gathered.update(dict.fromkeys(names[key], copy_))
    if not main:
        return {}
    for name, buf in model.named_buffers():
        if only is None or only(name):
            gathered[name] = buf.detach().to("cpu", copy=True)
    return {k: gathered[k] for k in model.state_dict() if k in gathered}  # state_dict's names and order


def _read_user_config(ds_config: str | os.PathLike | dict | None) -> tuple[dict[str, Any], str]:
    """Return the user's DeepSpeed config and a name for it in error messages."""
    if ds_config is None:
        return {}, "the default DeepSpeed config"
    if isinstance(ds_config, dict):
        return copy.deepcopy(ds_config), "ds_config (a dict)"
    path = Path(ds_config)
    source = f"DeepSpeed config {path}"
    try:
        text = path.read_text()
    except OSError as err:
        raise FileNotFoundError(f"{source}: cannot read it ({err.strerror or err})") from None
    try:
        user = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(user, dict):
        raise ValueError(f"{source}: the top level must be a JSON object, not {type(user).__name__}")
    return user, source


def build_config(
    user: dict[str, Any],
    source: str,
    *,
    micro_batch_size: int,
    world: int,
    zero_stage: int,
    offload_optimizer: bool,
    bf16: bool,
    bf16_given: bool,
    max_grad_norm: float,
) -> dict[str, Any]:
    """Merge the trainer-owned keys into the user's config; raise, naming the key, on conflicts."""
    config = copy.deepcopy(user)

    def own(key: str, value: Any, knob: str) -> None:
        if key in config and config[key] != value:
            raise ValueError(
                f"{source}: {key!r} is {config[key]!r} but the trainer sets it to {value!r} "
                f"(from {knob}); remove it from the file or change {knob}"
            )
        config[key] = value

    own("train_micro_batch_size_per_gpu", micro_batch_size, "micro_batch_size")
    own("gradient_accumulation_steps", 1, "the learner: one boundary per batch, set by hand")
    own("train_batch_size", micro_batch_size * world, "micro_batch_size x world size")
    own("gradient_clipping", float(max_grad_norm), "max_grad_norm")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(
                f"{source}: {key!r} is set by the trainer (AdamW from learning_rate / weight_decay, "
                "linear warmup from warmup_steps); remove it from the file"
            )
    if _section(config, "fp16", source).get("enabled", False):
        raise ValueError(f"{source}: 'fp16.enabled' is not supported (loss scaling skips steps); use bf16")
    zero = _section(config, "zero_optimization", source)
    if zero.get("stage", zero_stage) != zero_stage:
        raise ValueError(
            f"{source}: 'zero_optimization.stage' is {zero['stage']!r} but zero_stage is {zero_stage}; "
            "remove it from the file or pass the same stage"
        )
    zero["stage"] = zero_stage
    if offload_optimizer:
        section = zero.setdefault("offload_optimizer", {"device": "cpu"})
        if not isinstance(section, dict) or section.get("device", "cpu") == "none":
            raise ValueError(f"{source}: 'zero_optimization.offload_optimizer' contradicts offload_optimizer=True")
        section.setdefault("device", "cpu")
    if zero.get("offload_optimizer", {}).get("device", "none") != "none" and zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (zero_stage is 0)")
    config["zero_optimization"] = zero
    half = _section(config, "bf16", source)
    if "enabled" in half and bf16_given and bool(half["enabled"]) != bf16:
        raise ValueError(f"{source}: 'bf16.enabled' is {half['enabled']!r} but bf16={bf16}; make them agree")
    half.setdefault("enabled", bf16)
    config["bf16"] = half
    config.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs its own metrics
    return config


def _section(config: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {key!r} must be a JSON object, not {type(value).__name__}")
    return value
