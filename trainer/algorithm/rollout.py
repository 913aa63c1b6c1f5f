"""Rollouts: play groups of episodes of any text environment with a Generator.

An episode is one token sequence that grows turn by turn:

    prompt | model turn 0 | env message 0 | model turn 1 | ... | model turn K

The model's turns are kept exactly as sampled (token ids and behaviour log-probabilities
from the generator) and are trained on (``loss_mask`` 1); the environment's messages
(test feedback, tool output) are rendered with the model's chat template and appended as
context only (``loss_mask`` 0). Re-encoding the whole conversation each turn would not do:
a tokenizer need not give back the ids the model sampled (``"1" "2"`` vs ``"12"``), and the
learner would then score tokens the policy never produced.

Rewards: every ``env.step`` returns a reward; the episode keeps them per turn
(``turn_rewards``) so that ``advantages.turn_advantages`` can credit each turn with its
reward-to-go. rlvr's multi-turn envs pay only on the final step, where that is the plain
episode return.

Any ``gymnasium.Env`` that keeps the text contract works (``rlvr.envs.base`` states it):
``reset(seed=..., options={"index": i})`` returns chat messages (a bare string is taken
as one user message), ``step(text)`` returns the new messages, the reward and the two
done flags. The G members of a group are G env instances reset to the same task; a group
whose members got different prompts is an error (the env ignores both the seed and the
``index`` option, and GRPO's baseline would be meaningless).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium

from rlvr.trainer.algorithm.chat import encode_chat, render_chat
from rlvr.trainer.algorithm.stopwatch import Stopwatch
from rlvr.trainer.protocols import Completion, Generator, SamplingParams

Messages = list[dict[str, str]]

# Placeholder turns used to find out how the chat template frames messages (see
# EnvMessageRenderer); any text that cannot collide with template markup works.
_PROBE_USER, _PROBE_ASSISTANT = "rlvr-probe-user", "rlvr-probe-assistant"


@dataclass
class Episode:
    """One episode: a prompt and everything after it, token by token."""

    group: int
    """Index of the group (prompt) within the step."""
    task_id: str
    """The env's ``info["task_id"]`` (or the task index when the env gives none)."""
    prompt_ids: list[int]
    """[P] the chat-encoded initial prompt."""
    token_ids: list[int] = field(default_factory=list)
    """[N] every token after the prompt: model turns and rendered env messages."""
    loss_mask: list[int] = field(default_factory=list)
    """[N] 1 on tokens the model generated, 0 on environment tokens."""
    logprobs: list[float] = field(default_factory=list)
    """[N] behaviour log-probabilities of the model's tokens; 0.0 on environment tokens."""
    turn_ids: list[int] = field(default_factory=list)
    """[N] the model turn each token belongs to (env tokens: the turn they answer)."""
    turn_rewards: list[float] = field(default_factory=list)
    """[num_turns] the reward of each ``env.step``."""
    completions: list[str] = field(default_factory=list)
    """[num_turns] the text of each model turn."""
    versions: list[int] = field(default_factory=list)
    """[num_turns] the policy version that sampled each turn."""
    reward_components: dict[str, float] = field(default_factory=dict)
    """The final step's ``info["reward_components"]`` (for logging)."""
    parsed: Any = None
    """The final step's ``info["parsed"]``: what the verifier read (maj@k votes on it; bookkeeping/evaluation.py)."""
    reason: str = ""
    """The final step's ``info["reason"]``: why the verifier scored it so (samples.jsonl)."""
    length_truncated: bool = False
    """Some model turn was cut at max_new_tokens."""
    context_truncated: bool = False
    """The episode was ended by the trainer because the context would overflow."""
    done: bool = False
    """The env terminated or truncated the episode (or the trainer ended it)."""

    @property
    def reward(self) -> float:
        """The episode return: the sum of its turn rewards."""
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    @property
    def num_model_tokens(self) -> int:
        return int(sum(self.loss_mask))


@dataclass
class Played:
    """Everything a player played for one batch, when that is more than the batch (dynamic sampling).

    Counts over every round, kept groups or not; plain numbers, so they travel pickled with
    the batch (the pipeline's pipe, Ray's object store) and add up over Ray's shards.
    """

    groups: int
    """Groups played, every round."""
    zero_spread: int
    """Of them, groups whose episode returns are all equal."""
    rounds: int
    """Extra rounds played after the first (over shards: the most any shard played)."""
    quota: int
    """Informative groups wanted: the groups the player plays per step (over shards: the sum)."""
    reward_sum: float
    """Sum of the returns of every episode played."""
    episodes: int
    """Episodes played, every round."""
    tokens: int
    """Model tokens generated, every round."""

    @staticmethod
    def merge(parts: Sequence[Played]) -> Played:
        """Return the shards' accounting as one step's: counts add up, ``rounds`` is the most any shard played."""
        return Played(
            groups=sum(p.groups for p in parts),
            zero_spread=sum(p.zero_spread for p in parts),
            rounds=max(p.rounds for p in parts),
            quota=sum(p.quota for p in parts),
            reward_sum=sum(p.reward_sum for p in parts),
            episodes=sum(p.episodes for p in parts),
            tokens=sum(p.tokens for p in parts),
        )


@dataclass
class RolloutBatch:
    """The episodes of one step, grouped, and where the time went."""

    groups: list[list[Episode]]
    """[num_groups][group_size] episodes; the members of a group share a task."""
    generation_seconds: float
    """Wall time inside ``Generator.generate`` (every round played for the batch)."""
    env_seconds: float
    """Wall time inside ``env.reset`` / ``env.step`` (the verifiers run there; every round)."""
    played: Played | None = None
    """With dynamic sampling: everything played for the batch (``algorithm/dynamic_sampling.py``); else None."""

    @property
    def episodes(self) -> list[Episode]:
        return [e for group in self.groups for e in group]

    @staticmethod
    def merge(shards: Sequence[RolloutBatch]) -> RolloutBatch:
        """One step's batch from its shards, in shard order (Ray's generators ran them side by side).

        The seconds are the slowest shard's (wall time of the step's generation), the
        ``played`` accounting adds up (``Played.merge``).
        """
        played = [s.played for s in shards if s.played is not None]
        return RolloutBatch(
            groups=[g for s in shards for g in s.groups],
            generation_seconds=max(s.generation_seconds for s in shards),
            env_seconds=max(s.env_seconds for s in shards),
            played=Played.merge(played) if played else None,
        )


class EnvMessageRenderer:
    r"""Token ids to append after a model turn so that the env's new messages follow it.

    Learned once from the chat template with probe messages: ``bridge`` is what the
    template writes after an assistant message's content (ChatML: ``<|im_end|>\n``), and a
    new-message block is the template's rendering of ``probe + new_messages`` minus that of
    ``probe``. When the model ended its turn with EOS itself, the EOS text is not repeated.
    Templates that rewrite earlier turns (e.g. stripping reasoning) render the probe the
    same either way, so the difference is still well defined; templates whose prefix
    changes when a message is appended are rejected with an error.
    """

    def __init__(self, tokenizer: Any, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        probe = self._probe()
        self._probe_text = render_chat(tokenizer, probe, add_generation_prompt=False)
        end = self._probe_text.rindex(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT)
        self.bridge = self._probe_text[end:]  # e.g. "<|im_end|>\n"
        self._eos_texts = [tokenizer.decode([i]) for i in sorted(eos_ids)]

    @staticmethod
    def _probe() -> Messages:
        return [
            {"role": "user", "content": _PROBE_USER},
            {"role": "assistant", "content": _PROBE_ASSISTANT},
        ]

    def render(self, completion_ids: Sequence[int], messages: Messages) -> list[int]:
        """Return the tokens to append after ``completion_ids`` for ``messages``.

        They end with the template's next assistant header, ready for generation.
        """
        full = render_chat(self.tokenizer, self._probe() + list(messages), add_generation_prompt=True)
        if not full.startswith(self._probe_text):
            raise ValueError(
                "the chat template renders earlier turns differently once a message is appended; "
                "multi-turn rollouts need a template whose prefix is stable"
            )
        bridge = self.bridge
        if completion_ids and completion_ids[-1] in self.eos_ids:
            for eos in self._eos_texts:
                if bridge.startswith(eos):
                    bridge = bridge[len(eos) :]
                    break
        text = bridge + full[len(self._probe_text) :]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def as_messages(observation: Any) -> Messages:
    """Return the env's observation as chat messages; a bare string is one user message."""
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    if isinstance(observation, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in observation
    ):
        return observation
    raise TypeError(
        "an environment observation must be a list of {'role', 'content'} chat messages "
        f"(or a str), got {type(observation).__name__}: {observation!r:.200}"
    )


@dataclass(frozen=True)
class TaskRef:
    """Which task a group plays: the ``index`` option and the reset seed."""

    index: int
    seed: int


def collect_rollouts(
    envs: Sequence[gymnasium.Env],
    generator: Generator,
    tokenizer: Any,
    renderer: EnvMessageRenderer,
    tasks: Sequence[TaskRef],
    group_size: int,
    params: SamplingParams,
    max_context_tokens: int,
) -> RolloutBatch:
    """Play ``len(tasks)`` groups of ``group_size`` episodes to the end and return them.

    ``envs`` holds one env per episode (``len(tasks) * group_size``), group-major. Turn 0
    samples all ``group_size`` completions of a prompt in one ``generate(n=group_size)``
    call; later turns sample one continuation per still-running episode. An episode whose
    next turn would not fit in ``max_context_tokens`` is ended (``context_truncated``).
    """
    if len(envs) != len(tasks) * group_size:
        raise ValueError(f"need {len(tasks) * group_size} envs for {len(tasks)} groups, got {len(envs)}")
    clock = Stopwatch()
    groups = _reset_groups(envs, tokenizer, tasks, group_size, clock)
    episodes = [e for g in groups for e in g]
    with clock.time("generation"):
        firsts = generator.generate([g[0].prompt_ids for g in groups], group_size, params)
    _apply_turn(envs, episodes, [c for group in firsts for c in group], renderer, clock)
    turn = 1
    while True:
        active = [i for i, e in enumerate(episodes) if not e.done]
        for i in active:
            if len(episodes[i].prompt_ids) + len(episodes[i].token_ids) + params.max_new_tokens > max_context_tokens:
                episodes[i].done = episodes[i].context_truncated = True
        active = [i for i in active if not episodes[i].done]
        if not active:
            break
        turn_params = params
        if params.seed is not None:  # a different, still reproducible draw each turn
            turn_params = dataclasses.replace(params, seed=params.seed + 7919 * turn)
        contexts = [episodes[i].prompt_ids + episodes[i].token_ids for i in active]
        with clock.time("generation"):
            outs = generator.generate(contexts, 1, turn_params)
        _apply_turn([envs[i] for i in active], [episodes[i] for i in active], [o[0] for o in outs], renderer, clock)
        turn += 1
    return RolloutBatch(groups=groups, generation_seconds=clock.seconds["generation"], env_seconds=clock.seconds["env"])


def _reset_groups(
    envs: Sequence[gymnasium.Env], tokenizer: Any, tasks: Sequence[TaskRef], group_size: int, clock: Stopwatch
) -> list[list[Episode]]:
    groups: list[list[Episode]] = []
    for g, task in enumerate(tasks):
        group: list[Episode] = []
        first: Messages | None = None
        for k in range(group_size):
            env = envs[g * group_size + k]
            with clock.time("env"):
                obs, info = env.reset(seed=task.seed, options={"index": task.index})
            messages = as_messages(obs)
            if first is None:
                first = messages
            elif messages != first:
                raise ValueError(
                    f"{type(env).__name__}.reset(seed={task.seed}, options={{'index': {task.index}}}) gave "
                    "different prompts to members of one group: it must pick the task from "
                    "options['index'] (or deterministically from the seed)"
                )
            task_id = str(info.get("task_id", task.index)) if isinstance(info, dict) else str(task.index)
            group.append(Episode(group=g, task_id=task_id, prompt_ids=[]))
        prompt_ids = encode_chat(tokenizer, first or [], add_generation_prompt=True)
        for episode in group:
            episode.prompt_ids = list(prompt_ids)
        groups.append(group)
    return groups


def _apply_turn(
    envs: Sequence[gymnasium.Env],
    episodes: Sequence[Episode],
    completions: Sequence[Completion],
    renderer: EnvMessageRenderer,
    clock: Stopwatch,
) -> None:
    """Append each sampled turn to its episode, step its env, and render the env's reply."""
    for env, episode, completion in zip(envs, episodes, completions):
        turn = episode.num_turns
        n = len(completion.token_ids)
        episode.token_ids += completion.token_ids
        episode.loss_mask += [1] * n
        episode.logprobs += list(completion.logprobs)
        episode.turn_ids += [turn] * n
        episode.completions.append(completion.text)
        episode.versions.append(completion.version)
        episode.length_truncated |= completion.finish_reason == "length"
        with clock.time("env"):
            obs, reward, terminated, truncated, info = env.step(completion.text)
        episode.turn_rewards.append(float(reward))
        if isinstance(info, dict) and "reward_components" in info:
            episode.reward_components = {k: float(v) for k, v in info["reward_components"].items()}
        if isinstance(info, dict):
            episode.parsed, episode.reason = info.get("parsed"), str(info.get("reason", ""))
        if terminated or truncated:
            episode.done = True
            continue
        env_ids = renderer.render(completion.token_ids, as_messages(obs))
        episode.token_ids += env_ids
        episode.loss_mask += [0] * len(env_ids)
        episode.logprobs += [0.0] * len(env_ids)
        episode.turn_ids += [turn] * len(env_ids)
