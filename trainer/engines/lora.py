"""LoRA through ``peft``: low-rank adapters on the learner's model, and what travels and is saved.

    python scripts/train.py --env arithmetic --lora-rank 8 --lora-alpha 32 --learning-rate 2e-3

``apply_lora`` injects ``peft`` LoRA layers into a transformers causal LM *in place*
(``peft.get_peft_model``): every targeted linear layer ``W`` computes
``W x + (alpha / r) * B A x`` with ``A: [r, in]`` (random) and ``B: [out, r]`` (zero, so the
model starts as the base model), and only ``A`` and ``B`` require gradients. The learners
need no LoRA code of their own for training: they build their optimizer from the
parameters that require gradients (AdamW, or DeepSpeed's), so it holds only the adapters,
and the model object they score is the same transformers module, now with adapters.
What changes is around the step, and lives here:

- **The reference policy** (``--beta > 0``) is the same model with its adapters switched
  off (``AdaptersOff``: ``peft``'s ``disable_adapter()`` context around each call), so no
  second model is loaded: with ``B = 0`` at the start it is exactly the base model, and it
  stays the base model because the base weights never train.
- **Weight sync** sends the adapters only (``generation_weights``: their tensors by the
  injected model's parameter names, a few percent of the model or less). A generator that
  receives them has the same adapters injected (``prepare_generator`` in ``build.py``) and
  loads them in place (``receivable_state``). vLLM (engine built with ``enable_lora``)
  receives the same adapters and writes them as a peft folder in ``/dev/shm``
  (``write_adapter_folder``), one per version, which it samples with as a ``LoRARequest``
  (``engines/vllm_generator.py``). The learner-side merge (``merge_for_generation``: it
  sends ``W + (alpha / r) B A`` under the base model's names) remains for a generator
  that takes no adapters.
- **Checkpoints** hold the adapters in ``peft``'s own format (``save_pretrained`` of the
  peft model: ``adapter_config.json`` + ``adapter_model.safetensors``), so the folder loads
  with ``PeftModel.from_pretrained(base, folder)``, ``AutoPeftModelForCausalLM`` and, through
  transformers' peft integration, ``AutoModelForCausalLM.from_pretrained(folder)`` (which
  ``evaluate.py --model FOLDER`` uses). ``scripts/merge_lora.py`` writes a merged full model.

The peft wrapper (``PeftModel``) is kept on the transformers module (``_rlvr_lora``, set
without registering it as a submodule, which would make a cycle of modules), so code that
holds only the module (a learner, a DeepSpeed engine's ``module``) finds it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# peft is imported inside the functions that use it, so a run without LoRA never imports it
# (about 2.7 s on the dev VM, more than the rest of the trainer's imports).

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""peft's adapter file; with ``adapter_config.json`` it makes a checkpoint a LoRA checkpoint."""
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER = "default"  # peft's adapter name; one adapter per model here
_MARK = "lora_"  # peft's prefix of every adapter parameter (lora_A, lora_B)


@dataclass(frozen=True)
class LoraSettings:
    """What ``--lora-*`` asks for (``TrainConfig``'s LoRA fields), as peft takes it."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | str
    """Module names, or 'all-linear'."""

    @classmethod
    def of(cls, config: Any) -> LoraSettings | None:
        """Return the settings of a ``TrainConfig``; None when ``lora_rank`` is 0 (no LoRA)."""
        if config.lora_rank == 0:
            return None
        names = tuple(n.strip() for n in config.lora_target_modules.split(","))
        targets: tuple[str, ...] | str = "all-linear" if names == ("all-linear",) else names
        return cls(config.lora_rank, config.lora_alpha, config.lora_dropout, targets)

    def peft_config(self) -> LoraConfig:
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, bias="none"
        )


@dataclass
class _Lora:
    """What rides on an adapted module: its peft wrapper and what its learner publishes."""

    peft: PeftModel
    merge_for_generation: bool


def apply_lora(model: torch.nn.Module, settings: LoraSettings, *, merge_for_generation: bool = False) -> PeftModel:
    """Inject LoRA adapters into ``model`` in place; freeze everything else; return the peft wrapper.

    ``model`` keeps being the module to score and train (the learners call its body and head,
    ``algorithm/logprobs.py``). The adapters are drawn from torch's global RNG (``A``; ``B`` is
    0), so the run's seed fixes them. ``merge_for_generation``: ``generation_weights`` sends
    merged full weights rather than the adapters (for a generator that cannot take adapters).
    A target name that matches no module is peft's error, which names it.
    """
    from peft import get_peft_model

    if not isinstance(settings.target_modules, str):  # peft itself only refuses a list where none matches
        names = [n for n, _ in model.named_modules()]
        unmatched = [t for t in settings.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unmatched:
            raise ValueError(
                f"--lora-target-modules: {unmatched} name no module of {type(model).__name__} "
                f"(its linear layers: {sorted(_linear_names(model))})"
            )
    try:
        peft_model = get_peft_model(model, settings.peft_config())
    except ValueError as error:
        raise ValueError(f"--lora-target-modules {settings.target_modules}: {error}") from None
    object.__setattr__(model, "_rlvr_lora", _Lora(peft_model, merge_for_generation))
    logger.info("%s", describe(model))
    return peft_model


def describe(model: torch.nn.Module) -> str:
    """Say once what a LoRA run trains and what each weight sync sends (the run logs it at setup)."""
    lora = _lora(model)
    assert lora is not None
    adapters = {n: p for n, p in model.named_parameters() if is_adapter_key(n)}
    base = {id(p): p for n, p in model.named_parameters() if not is_adapter_key(n)}  # tied: once
    trained, total = sum(p.numel() for p in adapters.values()), sum(p.numel() for p in base.values())
    sent_adapters = sum(p.numel() * p.element_size() for p in adapters.values())
    sent_full = sum(p.numel() * p.element_size() for p in base.values())
    what = (
        f"merged full weights, {sent_full / 1e6:.2f} MB per sync (the generator takes no adapters; "
        f"the adapters alone would be {sent_adapters / 1e6:.3f} MB)"
        if lora.merge_for_generation
        else f"the adapters only, {sent_adapters / 1e6:.3f} MB per sync (full weights: {sent_full / 1e6:.2f} MB)"
    )
    return (
        f"LoRA: {len(adapters) // 2} adapted layers, {trained:,} trainable parameters "
        f"({100 * trained / total:.2f}% of {total:,}); weight sync sends {what}"
    )


def _linear_names(model: torch.nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _lora(model: torch.nn.Module) -> _Lora | None:
    return getattr(getattr(model, "module", model), "_rlvr_lora", None)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the module a DeepSpeed engine wraps) carries rlvr's LoRA adapters."""
    return _lora(model) is not None


def merges_for_generation(model: torch.nn.Module) -> bool:
    """Whether ``model``'s learner publishes merged full weights (``apply_lora``'s ``merge_for_generation``)."""
    state = _lora(model)
    return state is not None and state.merge_for_generation


def is_adapter_key(name: str) -> bool:
    return f".{_MARK}" in name


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Return the adapters' parameter names in ``model`` (``...q_proj.lora_A.default.weight``), in order."""
    return [n for n, _ in model.named_parameters() if is_adapter_key(n)]


# --- the reference policy: the same model, adapters off


class AdaptersOff:
    """The reference policy of a LoRA run: ``model`` with its adapters switched off.

    Given to a learner as its ``ref_model``: the learner scores it as it scores any
    reference (``algorithm/logprobs.py`` reads ``base_model``, ``get_output_embeddings()``
    and ``config``), and each module call runs inside peft's ``disable_adapter()``, so
    the numbers are the base model's without a second copy of it. ``eval`` and
    ``requires_grad_`` are no-ops: the learner freezes a reference with them, and these
    are the policy's own (trainable) adapters.
    """

    def __init__(self, model: torch.nn.Module):
        lora = _lora(model)
        if lora is None:
            raise ValueError("AdaptersOff needs a model with LoRA adapters (apply_lora)")
        self._model, self._peft = getattr(model, "module", model), lora.peft

    @property
    def config(self) -> Any:
        return self._model.config

    @property
    def base_model(self) -> _Off:
        return _Off(self._model.base_model, self._peft)

    def get_output_embeddings(self) -> _Off:
        return _Off(self._model.get_output_embeddings(), self._peft)

    def eval(self) -> AdaptersOff:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdaptersOff:
        return self


class _Off:
    """Calls ``module`` inside ``peft``'s ``disable_adapter()``."""

    def __init__(self, module: torch.nn.Module, peft_model: PeftModel):
        self.module, self.peft = module, peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft.disable_adapter():
            return self.module(*args, **kwargs)


# --- weight sync


def generation_weights(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Return what a learner publishes for its generators, from ``state`` (default: ``model``'s detached state dict).

    Without LoRA: ``state`` itself. With LoRA: the adapters only, by the injected module's
    names; or, with ``merge_for_generation``, the merged full weights by the base model's
    names. An empty ``state`` (a rank other than 0) stays empty.
    """
    if state is None:
        state = {k: v.detach() for k, v in model.state_dict().items()}
    lora = _lora(model)
    if lora is None or not state:
        return dict(state)
    if lora.merge_for_generation:
        return merged_state(getattr(model, "module", model), state)
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def receivable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the part of ``model``'s state dict a generator takes in ``update_weights``: a LoRA model's adapters."""
    own = model.state_dict()
    if _lora(model) is None:
        return own
    return {k: v for k, v in own.items() if is_adapter_key(k)}


def merged_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full weights by the base model's names, each adapted linear layer's ``W + scaling * B A`` merged in.

    Computed from ``state`` (the adapted module's state dict, gathered or not), without
    touching the module: its own adapters keep training.
    """
    from peft.tuners.lora import Linear as LoraLinear

    merged = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear) or _ADAPTER not in module.lora_A:
            continue
        if module.fan_in_fan_out:
            raise ValueError(f"{name}: LoRA on a fan-in-fan-out (Conv1D) layer cannot be merged here")
        a = state[f"{name}.lora_A.{_ADAPTER}.weight"].float()  # [r, in]
        b = state[f"{name}.lora_B.{_ADAPTER}.weight"].float()  # [out, r]
        base = state[f"{name}.base_layer.weight"]  # [out, in]
        merged[f"{name}.base_layer.weight"] = (base.float() + (b @ a) * module.scaling[_ADAPTER]).to(base.dtype)
    return {k.replace(".base_layer.", "."): v for k, v in merged.items()}


# --- checkpoints


def save_adapters(model: torch.nn.Module, folder: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write the adapters in peft's format (``adapter_config.json``, ``adapter_model.safetensors``) to ``folder``.

    ``state``: the adapted module's state dict when the module itself holds no whole
    tensors (DeepSpeed ZeRO-3 gathers them); by default the module's own.
    """
    lora = _lora(model)
    assert lora is not None, "save_adapters needs a LoRA model"
    kwargs: dict[str, Any] = {}
    if state is not None:  # peft reads the peft model's names: "base_model.model." + the module's
        kwargs["state_dict"] = {f"base_model.model.{k}": v for k, v in state.items() if is_adapter_key(k)}
    lora.peft.save_pretrained(str(folder), **kwargs)


def load_adapters(model: torch.nn.Module, folder: str | Path) -> None:
    """Load the adapters ``save_adapters`` wrote into ``model``'s own adapters, in place."""
    lora = _lora(model)
    assert lora is not None, "load_adapters needs a LoRA model"
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}; it was not saved by a LoRA run (--lora-rank 0?)")
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(lora.peft, load_file(path))
    missing = [k for k in result.missing_keys if is_adapter_key(k)]
    if missing or result.unexpected_keys:
        unexpected = result.unexpected_keys
        raise KeyError(f"{folder}: adapters do not match this model: missing {missing}, unexpected {unexpected}")


def peft_tensors(adapters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapters by the injected module's names -> peft's file names (``base_model.model.``, no adapter name)."""
    mark = f".{_ADAPTER}."
    return {f"base_model.model.{k}".replace(mark, "."): v.detach().contiguous() for k, v in adapters.items()}


def write_adapter_folder(
    settings: LoraSettings,
    adapters: Mapping[str, torch.Tensor],
    folder: str | Path,
    base_model: str,
    base_class: type | None = None,
) -> None:
    """Write ``adapters`` (``generation_weights`` of a LoRA learner) as peft's ``save_pretrained`` does.

    ``adapter_config.json`` (``settings``' ``LoraConfig``, in inference mode, with
    ``base_model``; ``auto_mapping`` from ``base_class``, the transformers model class, as peft
    records it) and ``adapter_model.safetensors`` (peft's tensor names), so that any peft
    reader (vLLM's LoRA loader) takes the folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = settings.peft_config()
    config.base_model_name_or_path, config.inference_mode = base_model, True
    if base_class is not None:
        config.auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    config.save_pretrained(str(folder))
    save_file(peft_tensors(adapters), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Return a merged copy of a LoRA model (plain transformers, no peft layers); ``model`` is unchanged."""
    lora = _lora(model)
    assert lora is not None, "merged_copy needs a LoRA model"
    return copy.deepcopy(lora.peft).merge_and_unload()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """``with`` block in which ``model`` computes as its base model (for tests and tools)."""
    lora = _lora(model)
    if lora is None:
        yield
        return
    with lora.peft.disable_adapter():
        yield
