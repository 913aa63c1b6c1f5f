"""The text-environment contract, checked on every registered env and on broken ones.

The checker's own tests are table-driven broken environments: each breaks one rule and
the test asserts that the message names the likely bug.
"""

from __future__ import annotations

import random
import warnings

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

from rlvr.envs.base import Task, TextEnv
from rlvr.envs.checker import (
    GARBAGE,
    TextEnvCheckError,
    check_gold,
    check_text_env,
    run_episode,
)
from rlvr.envs.registry import list_envs, make_env
from rlvr.envs.spaces import AnyText, ChatMessages
from rlvr.verifiers.types import Verdict

REGISTERED = [e.env_id for e in list_envs()]


@pytest.mark.parametrize("env_id", REGISTERED)
def test_registered_env_passes_gymnasium_and_text_checks(env_id):
    env = make_env(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    assert [str(w.message) for w in caught] == []
    assert check_text_env(env) == []  # nothing skipped: every built-in env has gold_action


@pytest.mark.parametrize("env_id", REGISTERED)
def test_validate_gold_scores_one_on_every_bundled_task(env_id):
    env = make_env(env_id)
    results = env.unwrapped.validate()
    assert results and all(r.ok and r.verdict.score == 1.0 for r in results)
    assert len({r.task_id for r in results}) == len(results)


def test_builtin_envs_are_all_registered():
    assert {e.short_name for e in list_envs()} >= {"gsm8k", "math", "code", "code-multiturn", "arithmetic"}


# ---- the arithmetic env is what the default model is trained on ------------------------------


def test_arithmetic_prompt_is_exactly_the_agreed_one():
    env = make_env("arithmetic", digits=2, operators="*", seed=3)
    obs, info = env.reset(options={"index": 7})
    from rlvr.datasets.arithmetic import ArithmeticConfig, make_problem

    problem = make_problem(3, 7, ArithmeticConfig(digits=2, operators="*"))
    assert obs == [
        {"role": "system", "content": "Answer with the final number only."},
        {"role": "user", "content": f"What is {problem.expression}?"},
    ]
    assert info["reference"] == str(problem.answer)


@pytest.mark.parametrize(
    ("completion", "reward", "reason"),
    [
        ("7", 1.0, "correct"),
        ("The answer is 7.", 1.0, "correct"),
        ("8", 0.0, "wrong answer"),
        ("", 0.0, "no number found"),
    ],
    ids=["bare", "sentence", "wrong", "empty"],
)
def test_arithmetic_reward_is_the_gsm8k_verdict(completion, reward, reason):
    env = make_env("arithmetic")
    env.reset(options={"index": 0})
    env.unwrapped._task = Task("t", "What is 3+4?", "7")  # a known task, to pin the numbers
    obs, r, terminated, truncated, info = env.step(completion)
    assert (obs, r, terminated, truncated) == ([], reward, True, False)
    assert info["reason"] == reason


# ---- the step/reset contract of the base class ------------------------------------------------


class ToyEnv(TextEnv):
    """A minimal correct subclass: repeat the word."""

    system_prompt = "Repeat the word."
    num_tasks = 50

    def get_task(self, index: int) -> Task:
        return Task(task_id=f"toy-{index}", prompt=f"word{index}", reference=f"word{index}")

    def verify(self, completion: str, task: Task) -> Verdict:
        ok = completion.strip() == task.reference
        return Verdict(float(ok), completion.strip(), "correct" if ok else "wrong answer")


class NoSuperInitEnv(ToyEnv):
    def __init__(self):
        self.word = "forgot super().__init__()"


def test_reset_returns_system_and_user_messages_and_info():
    obs, info = ToyEnv().reset(seed=0, options={"index": 4})
    assert obs == [{"role": "system", "content": "Repeat the word."}, {"role": "user", "content": "word4"}]
    assert info == {"task_id": "toy-4", "reference": "word4", "index": 4}


def test_step_info_holds_components_weights_parsed_and_reason():
    env = ToyEnv()
    env.reset(options={"index": 2})
    obs, reward, terminated, truncated, info = env.step(" word2 ")
    assert (obs, reward, terminated, truncated) == ([], 1.0, True, False)
    assert info["reward_components"] == {"correctness": 1.0}
    assert info["reward_weights"] == {"correctness": 1.0}
    assert (info["parsed"], info["reason"], info["turn"]) == ("word2", "correct", 1)


@pytest.mark.parametrize(
    ("completion", "components", "reward"),
    [
        ("<think>easy</think>\n<answer>word1</answer>", {"correctness": 0.0, "format": 1.0}, 0.25),
        ("word1", {"correctness": 1.0, "format": 0.0}, 1.0),
        ("<think>x</think><answer>nope</answer>", {"correctness": 0.0, "format": 1.0}, 0.25),
        ("", {"correctness": 0.0, "format": 0.0}, 0.0),
    ],
    ids=["format-only", "correct-no-format", "format-wrong-answer", "empty"],
)
def test_format_weight_adds_a_weighted_component(completion, components, reward):
    # ToyEnv's exact-match verifier sees the whole text, so a tagged answer is "wrong" for
    # correctness while right for format: the two components are independent.
    env = ToyEnv(format_weight=0.25)
    obs, _ = env.reset(options={"index": 1})
    assert "<think>" in obs[0]["content"]  # the model is told about the format
    _, r, _, _, info = env.step(completion)
    assert info["reward_components"] == components
    assert info["reward_weights"] == {"correctness": 1.0, "format": 0.25}
    assert r == pytest.approx(reward)


@pytest.mark.parametrize("name", ["gsm8k", "math", "code", "arithmetic"])
def test_format_weight_gold_earns_both_components(name):
    env = make_env(name, format_weight=0.1)
    results = check_gold(env, limit=3)
    assert all(r.reward == pytest.approx(1.1) and r.ok for r in results)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda e: e.step("x"), RuntimeError, "before reset"),
        (lambda e: (e.reset(), e.step("x"), e.step("x")), RuntimeError, "after the episode ended"),
        (lambda e: (e.reset(), e.step(42)), TypeError, "must be the model's text"),
        (lambda e: e.reset(options={"idx": 1}), ValueError, "unknown reset option"),
        (lambda e: e.reset(options={"index": 50}), ValueError, "out of range"),
        (lambda e: e.reset(options={"index": -1}), ValueError, "int >= 0"),
        (lambda e: ToyEnv(max_turns=0), ValueError, "max_turns"),
        (lambda e: NoSuperInitEnv().reset(), RuntimeError, r"must call super\(\).__init__"),
    ],
    ids=["step-before-reset", "step-after-end", "non-str-action", "unknown-option", "index-too-big",
         "negative-index", "zero-turns", "no-super-init"],
)
def test_misuse_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(ToyEnv())


def test_same_seed_same_task_and_different_seeds_differ():
    env = ToyEnv()
    first = [env.reset(seed=s)[1]["task_id"] for s in range(10)]
    again = [env.reset(seed=s)[1]["task_id"] for s in range(10)]
    assert first == again
    assert len(set(first)) > 5


def test_spaces_hold_any_text_and_chat_messages():
    text, chat = AnyText(), ChatMessages()
    assert "x = 1\n\t$\\frac{1}{2}$ 中文 😀" in text
    assert 3 not in text
    assert [] in chat and [{"role": "tool", "content": "out"}] in chat
    assert [{"role": "robot", "content": "x"}] not in chat
    assert [{"role": "user"}] not in chat and "user: hi" not in chat
    text.seed(0)
    chat.seed(0)
    assert all(text.sample() in text for _ in range(20))
    assert all(chat.sample() in chat for _ in range(20))
    # Gymnasium's default Text space is what these replace: it rejects a plain space.
    assert "a b" not in gymnasium.spaces.Text(10)


# ---- multi-turn code env -----------------------------------------------------------------------

WRONG_ADD_DIGITS = "```python\ndef add_digits(n):\n    return n\n```"


def test_multiturn_returns_failing_tests_then_accepts_a_fix():
    env = make_env("code-multiturn", max_turns=3)
    env.reset(options={"index": 0})  # add_digits
    obs, reward, terminated, truncated, info = env.step(WRONG_ADD_DIGITS)
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert [m["role"] for m in obs] == ["user"]
    assert "passed 2 of 4 tests" in obs[0]["content"]
    assert "assert add_digits(1234) == 10" in obs[0]["content"]
    assert info["reason"] == "tests failed: 2/4" and info["reward_components"] == {"correctness": 0.0}
    obs, reward, terminated, truncated, info = env.step(env.unwrapped.gold_action())
    assert (obs, reward, terminated, truncated, info["turn"]) == ([], 1.0, True, False, 2)


def test_multiturn_truncates_at_max_turns_with_the_last_attempt_as_reward():
    env = make_env("code-multiturn", max_turns=2)
    total, infos = run_episode(env, [WRONG_ADD_DIGITS, "no code here"], index=0)
    assert total == 0.0 and len(infos) == 2
    env.reset(options={"index": 0})
    env.step(WRONG_ADD_DIGITS)
    _, _, terminated, truncated, _ = env.step(WRONG_ADD_DIGITS)
    assert (terminated, truncated) == (False, True)


def test_multiturn_feedback_when_no_code_block():
    env = make_env("code-multiturn")
    env.reset(options={"index": 0})
    obs, *_ = env.step("```python\n```")
    assert "could not find a program" in obs[0]["content"] or "passed 0 of" in obs[0]["content"]


def test_single_turn_code_terminates_even_when_wrong():
    env = make_env("code")
    env.reset(options={"index": 0})
    obs, reward, terminated, truncated, _ = env.step(WRONG_ADD_DIGITS)
    assert (obs, reward, terminated, truncated) == ([], 0.0, True, False)


# ---- a plain gymnasium.Env (no rlvr base class) keeps the contract too --------------------------


class PlainEnv(gymnasium.Env):
    """Follows the text contract by hand: what a user with their own env would write."""

    def __init__(self):
        self.observation_space, self.action_space = ChatMessages(), AnyText()
        self.num_tasks, self.n = 20, None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.n = (options or {}).get("index", int(self.np_random.integers(self.num_tasks)))
        return [{"role": "user", "content": f"Say {self.n}"}], {"task_id": f"plain-{self.n}", "reference": self.n}

    def step(self, action):
        ok = float(action.strip() == str(self.n))
        info = {"task_id": f"plain-{self.n}", "reference": self.n, "reward_components": {"correctness": ok},
                "reward_weights": {"correctness": 1.0}, "parsed": action.strip(), "reason": "ok"}
        return [], ok, True, False, info

    def gold_action(self):
        return str(self.n)


def test_plain_gymnasium_env_passes_both_checkers():
    env = PlainEnv()
    check_env(env, skip_render_check=True)
    assert check_text_env(env) == []


def test_plain_env_without_gold_is_checked_and_reports_the_skip():
    class NoGold(PlainEnv):
        gold_action = None

    assert check_text_env(NoGold()) == ["gold/garbage: the env has no gold_action()"]


# ---- the checker names the bug -------------------------------------------------------------------


class GlobalRandomEnv(ToyEnv):
    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed, options=options or {"index": random.randrange(self.num_tasks)})


class IgnoresSeedEnv(ToyEnv):
    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed, options=options or {"index": 0})


class TextSpaceEnv(ToyEnv):
    def __init__(self):
        super().__init__()
        self.observation_space = gymnasium.spaces.Text(1000)


class PartialCreditEnv(ToyEnv):
    def verify(self, completion, task):
        return Verdict(1.0 if completion.strip() == task.reference else 0.5, None, "partial")


class WrongRewardEnv(ToyEnv):
    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward + 0.5, terminated, truncated, info


class PromptAgainEnv(ToyEnv):
    def step(self, action):
        _, reward, terminated, truncated, info = super().step(action)
        return [{"role": "user", "content": "again?"}], reward, terminated, truncated, info


class StringObsEnv(PlainEnv):
    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return obs[0]["content"], info


class BadGoldEnv(ToyEnv):
    def gold_completion(self, task):
        return task.reference.upper()


class NeverEndsEnv(PlainEnv):
    max_turns = 3

    def step(self, action):
        _, _, _, _, info = super().step(action)
        return [{"role": "user", "content": "more"}], 0.0, False, False, info


@pytest.mark.parametrize(
    ("env_cls", "message"),
    [
        (GlobalRandomEnv, "global `random` module"),
        (IgnoresSeedEnv, "ignores the seed"),
        (TextSpaceEnv, "use rlvr.envs.spaces.ChatMessages"),
        (PartialCreditEnv, "partial credit"),
        (WrongRewardEnv, "weighted sum of info['reward_components']"),
        (PromptAgainEnv, "final observation must be []"),
        (StringObsEnv, "list of chat messages"),
        (BadGoldEnv, "gold completion scored 0.0"),
        (NeverEndsEnv, "did not end after 3 steps"),
    ],
    ids=["global-random", "ignores-seed", "text-space", "partial-credit", "reward-not-sum",
         "final-obs-not-empty", "string-observation", "bad-gold", "never-ends"],
)
def test_checker_names_the_likely_bug(env_cls, message):
    with pytest.raises(TextEnvCheckError) as excinfo:
        check_text_env(env_cls())
    assert message in str(excinfo.value)


def test_garbage_list_holds_no_digits():
    # A digit in "garbage" could be some task's right answer and make the check flaky.
    assert not any(ch.isdigit() for g in GARBAGE for ch in g)
