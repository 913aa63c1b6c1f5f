"""Checks that a text environment keeps rlvr's contract, with messages that name the bug.

Gymnasium's ``check_env`` covers the generic API (spaces, seeding of ``np_random``,
determinism of a step). These checks cover what a text environment adds on top, in the
style of Gymnasium's checker: each failure says what was observed and the most likely
cause.

- ``check_text_env(env)``: the observation is chat messages inside the observation space;
  ``info`` has ``task_id`` and ``reference``; the same seed gives the same task and
  different seeds usually different ones; ``options={"index": i}`` picks a task; the
  step's reward is the weighted sum of ``info["reward_components"]``; a finished episode
  returns ``[]``; gold scores the maximum and garbage scores 0. Works on any
  ``gymnasium.Env`` keeping the text contract; the gold checks need the env to have
  ``gold_action()`` (``TextEnv`` does) and are skipped, and reported, otherwise.
- ``check_gold(env, limit=None)``: every task's gold completion, one ``GoldResult`` each
  (what ``scripts/verify.py`` reports).
- ``check_garbage(env)``: empty and nonsense completions score 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium

from rlvr.verifiers.types import Verdict

GARBAGE = ("", "   \n", "I don't know.", "lorem ipsum dolor sit amet", "\\boxed{}", "```python\n```")
"""Completions that must score 0 everywhere: none holds a number, an answer or a program."""

DEFAULT_INFINITE_LIMIT = 100
"""How many tasks ``check_gold`` checks on an environment with infinitely many."""

_REWARD_TOL = 1e-6


class TextEnvCheckError(AssertionError):
    """The environment breaks the text-environment contract; the message names the likely bug."""


@dataclass(frozen=True)
class GoldResult:
    """The outcome of stepping one task's gold completion."""

    task_id: str
    index: int
    reward: float
    """The episode's total reward."""
    max_reward: float
    """Sum of the positive reward weights: what a perfect completion earns."""
    verdict: Verdict
    """Normalised: ``score = reward / max_reward``, with the primary verifier's parsed and reason."""

    @property
    def ok(self) -> bool:
        return abs(self.reward - self.max_reward) <= _REWARD_TOL


def _fail(message: str) -> None:
    raise TextEnvCheckError(message)


def _name(env: gymnasium.Env) -> str:
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__


def _num_tasks(env: gymnasium.Env) -> int | None:
    return getattr(env.unwrapped, "num_tasks", None)


def _make(env_or_name: gymnasium.Env | str, env_kwargs: dict[str, Any]) -> gymnasium.Env:
    if isinstance(env_or_name, str):
        from rlvr.envs.registry import make_env

        return make_env(env_or_name, **env_kwargs)
    return env_or_name


# ---- observations and infos -------------------------------------------------------------


def check_messages(env: gymnasium.Env, obs: Any, where: str) -> None:
    """``obs`` is a list of ``{"role", "content"}`` dicts inside the observation space."""
    if not isinstance(obs, list):
        _fail(f"{where} returned an observation of type {type(obs).__name__}; the text contract wants "
              "a list of chat messages [{'role': ..., 'content': ...}] (most likely the prompt string "
              "was returned instead of wrapping it as a user message)")
    for m in obs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            _fail(f"{where} returned the message {m!r}; each message must be a dict with str 'role' "
                  "and 'content'")
    if obs not in env.observation_space:
        _fail(f"{where} returned an observation outside env.observation_space ({env.observation_space}); "
              "most likely the space is gymnasium's Text, whose default charset is alphanumeric only: "
              "use rlvr.envs.spaces.ChatMessages")


def _check_reset_info(info: Any, where: str) -> None:
    if not isinstance(info, dict):
        _fail(f"{where} returned info of type {type(info).__name__}, not a dict")
    for key in ("task_id", "reference"):
        if key not in info:
            _fail(f"{where} returned info without {key!r}; the trainer logs it and verify.py needs it "
                  f"(keys present: {sorted(info)})")


def _check_step_result(env: gymnasium.Env, result: Any, where: str) -> tuple[list, float, bool, bool, dict]:
    if not (isinstance(result, tuple) and len(result) == 5):
        _fail(f"{where} must return (observation, reward, terminated, truncated, info), got {result!r:.200}")
    obs, reward, terminated, truncated, info = result
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
        _fail(f"{where} returned reward {reward!r}; it must be a finite float")
    for flag, value in (("terminated", terminated), ("truncated", truncated)):
        if not isinstance(value, bool):
            _fail(f"{where} returned {flag}={value!r} of type {type(value).__name__}; it must be a bool")
    if not isinstance(info, dict):
        _fail(f"{where} returned info of type {type(info).__name__}, not a dict")
    for key in ("reward_components", "reward_weights", "parsed", "reason"):
        if key not in info:
            _fail(f"{where} returned info without {key!r}; training logs each reward component, so "
                  "step must report them (rlvr.envs.base.TextEnv does this for subclasses)")
    comps, weights = info["reward_components"], info["reward_weights"]
    if set(comps) != set(weights):
        _fail(f"{where}: info['reward_components'] keys {sorted(comps)} differ from "
              f"info['reward_weights'] keys {sorted(weights)}")
    done = terminated or truncated
    if done:
        expected = sum(weights[k] * comps[k] for k in comps)
        if abs(expected - reward) > _REWARD_TOL:
            _fail(f"{where} returned reward {reward} but the weighted sum of info['reward_components'] "
                  f"is {expected}; most likely a component or weight is missing from info")
        if obs != []:
            _fail(f"{where} ended the episode but returned observation {obs!r:.200}; the final "
                  "observation must be [] (there is no next message)")
    else:
        check_messages(env, obs, where)
        if not obs:
            _fail(f"{where} continued the episode (terminated and truncated both False) but returned no "
                  "new message; a multi-turn env must return the feedback as the next observation")
        if obs[0].get("role") == "system":
            _fail(f"{where} returned a system message mid-episode; return only the NEW messages "
                  "(e.g. the feedback as a user turn), not the whole conversation")
    return obs, float(reward), terminated, truncated, info


def run_episode(
    env: gymnasium.Env, actions: Sequence[str] | str, *, seed: int | None = None, index: int | None = None
) -> tuple[float, list[dict[str, Any]]]:
    """Reset (on task ``index`` if given) and step ``actions`` (the last repeats) until done.

    Returns the episode's total reward and every step's info; checks each step's shape.
    """
    options = {"index": index} if index is not None else None
    obs, info = env.reset(seed=seed, options=options)
    check_messages(env, obs, "reset()")
    _check_reset_info(info, "reset()")
    actions = [actions] if isinstance(actions, str) else list(actions)
    return _step_until_done(env, lambda turn: actions[min(turn, len(actions) - 1)], "step()")


def _step_until_done(
    env: gymnasium.Env, action_for_turn: Callable[[int], str], label: str
) -> tuple[float, list[dict[str, Any]]]:
    """Step an already reset env until it ends; checks each step and bounds the turns."""
    total, infos = 0.0, []
    limit = getattr(env.unwrapped, "max_turns", None) or 64
    for turn in range(limit):
        _, reward, terminated, truncated, info = _check_step_result(
            env, env.step(action_for_turn(turn)), f"{label} #{turn + 1}"
        )
        total += reward
        infos.append(info)
        if terminated or truncated:
            return total, infos
    _fail(f"the episode did not end after {limit} steps; a multi-turn env must truncate at max_turns")
    raise AssertionError("unreachable")


# ---- seeding and task choice --------------------------------------------------------------


def check_seeding(env: gymnasium.Env, seeds: Sequence[int] = tuple(range(8))) -> None:
    """Check: same seed -> same task; different seeds -> not all one task; index honoured."""
    obs_a, info_a = env.reset(seed=seeds[0])
    obs_b, info_b = env.reset(seed=seeds[0])
    if info_a["task_id"] != info_b["task_id"] or obs_a != obs_b:
        _fail(f"reset(seed={seeds[0]}) twice gave different tasks ({info_a['task_id']!r} then "
              f"{info_b['task_id']!r}); most likely the task is drawn from the global `random` module "
              "or a counter instead of self.np_random, or reset does not call super().reset(seed=seed)")
    n = _num_tasks(env)
    if n is None or n > 1:
        ids = {env.reset(seed=s)[1]["task_id"] for s in seeds}
        if len(ids) == 1:
            _fail(f"reset gave the same task {ids.pop()!r} for seeds {list(seeds)}; most likely reset "
                  "ignores the seed (the task index is not drawn from self.np_random) or get_task "
                  "ignores its index")
    if n is not None and n > 1:
        first = env.reset(seed=seeds[0], options={"index": 0})[1]["task_id"]
        again = env.reset(seed=seeds[1], options={"index": 0})[1]["task_id"]
        other = env.reset(seed=seeds[0], options={"index": 1})[1]["task_id"]
        if first != again:
            _fail("reset(options={'index': 0}) gave different tasks for different seeds; most likely "
                  "reset ignores options['index']")
        if first == other:
            _fail(f"options index 0 and 1 gave the same task_id {first!r}; task ids must be unique "
                  "or reset ignores options['index']")


# ---- gold and garbage -----------------------------------------------------------------------


def _indices(env: gymnasium.Env, limit: int | None) -> range:
    n = _num_tasks(env)
    if n is None:
        n = DEFAULT_INFINITE_LIMIT if limit is None else limit
    return range(n if limit is None else min(n, limit))


def check_gold(
    env_or_name: gymnasium.Env | str,
    limit: int | None = None,
    *,
    raise_on_failure: bool = False,
    **env_kwargs: Any,
) -> list[GoldResult]:
    """Step every task's gold completion (``env.gold_action()``) and report each outcome.

    Args:
        env_or_name: an environment, or a name/spec for ``make_env`` (``env_kwargs`` pass on).
        limit: check only the first ``limit`` tasks (procedural envs default to 100).
        raise_on_failure: raise ``TextEnvCheckError`` on the first task whose gold does not
            earn the maximum reward, instead of reporting it.
        **env_kwargs: constructor arguments when ``env_or_name`` is a name.
    """
    env = _make(env_or_name, env_kwargs)
    gold = getattr(env.unwrapped, "gold_action", None)
    if gold is None:
        raise TextEnvCheckError(f"{_name(env)} has no gold_action(); subclass rlvr.envs.base.TextEnv "
                                "or define gold_action() returning a completion that scores 1")
    results = []
    for index in _indices(env, limit):
        _, info = env.reset(seed=0, options={"index": index})
        reward, infos = _gold_episode(env, gold)
        last = infos[-1]
        max_reward = sum(w for w in last["reward_weights"].values() if w > 0)
        score = reward / max_reward if max_reward else 0.0
        result = GoldResult(
            task_id=info["task_id"],
            index=index,
            reward=reward,
            max_reward=max_reward,
            verdict=Verdict(score, last.get("parsed"), last.get("reason", "")),
        )
        if raise_on_failure and not result.ok:
            _fail(f"{_name(env)} task {index} ({result.task_id!r}): the gold completion scored {reward} "
                  f"of {max_reward} (reason {result.verdict.reason!r}, components "
                  f"{last['reward_components']}); most likely the gold answer is formatted differently "
                  "from what the verifier parses, or the reference itself is wrong")
        results.append(result)
    return results


def _gold_episode(env: gymnasium.Env, gold: Any) -> tuple[float, list[dict[str, Any]]]:
    # The env is already reset on the task; gold_action() needs that current task.
    action = gold()
    return _step_until_done(env, lambda turn: action, "gold step")


def check_garbage(env: gymnasium.Env, garbage: Sequence[str] = GARBAGE, indices: Sequence[int] = (0, 1)) -> None:
    """Every garbage completion earns an episode reward of 0 on the first tasks."""
    n = _num_tasks(env)
    for index in indices:
        if n is not None and index >= n:
            continue
        for text in garbage:
            total, infos = run_episode(env, text, index=index)
            if total != 0.0:
                _fail(f"{_name(env)} task {index}: the garbage completion {text!r} earned reward {total} "
                      f"(components {infos[-1]['reward_components']}, reason {infos[-1]['reason']!r}); "
                      "most likely the verifier gives partial credit to a missing answer")


def check_text_env(env: gymnasium.Env, *, seeds: Sequence[int] = tuple(range(8)), gold_tasks: int = 3) -> list[str]:
    """Run every text-contract check; returns the names of checks skipped (and why).

    Raises:
        TextEnvCheckError: the first broken rule, with the likely bug named.
    """
    if not isinstance(env, gymnasium.Env):
        _fail(f"{type(env).__name__} is not a gymnasium.Env; subclass gymnasium.Env or rlvr.envs.base.TextEnv")
    obs, info = env.reset(seed=seeds[0])
    check_messages(env, obs, "reset()")
    _check_reset_info(info, "reset()")
    if not obs or obs[-1]["role"] != "user":
        _fail(f"reset() returned {obs!r:.200}; the prompt must end with a user message")
    if env.action_space.sample() not in env.action_space or "a b\n$x$" not in env.action_space:
        _fail(f"env.action_space ({env.action_space}) does not contain arbitrary text; most likely it is "
              "gymnasium's Text with its alphanumeric charset: use rlvr.envs.spaces.AnyText")
    check_seeding(env, seeds)
    skipped = []
    if getattr(env.unwrapped, "gold_action", None) is None:
        skipped.append("gold/garbage: the env has no gold_action()")
    else:
        results = check_gold(env, limit=gold_tasks, raise_on_failure=True)
        if not results:
            _fail(f"{_name(env)} has no tasks to check")
        check_garbage(env)
    if (getattr(env.unwrapped, "max_turns", 1) or 1) > 1 and not skipped:
        _check_recovery(env)
    return skipped


def _check_recovery(env: gymnasium.Env) -> None:
    """Multi-turn: a wrong first attempt gets feedback, and the gold on turn 2 still scores the max."""
    env.reset(seed=0, options={"index": 0})
    gold = env.unwrapped.gold_action()
    obs, reward, terminated, truncated, info = _check_step_result(env, env.step(GARBAGE[2]), "step() #1")
    if terminated or truncated:
        _fail("a multi-turn env ended the episode after one wrong attempt; it should give feedback")
    if reward != 0.0:
        _fail(f"a wrong first attempt earned intermediate reward {reward}; intermediate rewards must be 0")
    total = 0.0
    for turn in range(2, env.unwrapped.max_turns + 1):
        _, reward, terminated, truncated, info = _check_step_result(env, env.step(gold), f"step() #{turn}")
        total += reward
        if terminated or truncated:
            break
    max_reward = sum(w for w in info["reward_weights"].values() if w > 0)
    if not terminated or abs(total - max_reward) > _REWARD_TOL:
        _fail(f"after a wrong first attempt the gold scored {total} of {max_reward} "
              f"(terminated={terminated}); most likely feedback or turn state leaks between attempts")
