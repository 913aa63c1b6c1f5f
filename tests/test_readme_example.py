"""The README's "Adding an environment" example runs exactly as written.

The section is read from README.md (RLVR_README may name another markdown file). A
missing heading fails: the README must carry the section.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from gymnasium.utils.env_checker import check_env

from rlvr.envs.checker import check_gold, check_text_env
from rlvr.envs.registry import make_env, unregister

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Adding an environment"


def _section() -> str:
    path = REPO / os.environ.get("RLVR_README", "README.md")  # an absolute value replaces REPO
    text = path.read_text(encoding="utf-8")
    start = text.find(f"\n{HEADING}\n")
    if start < 0 and not text.startswith(f"{HEADING}\n"):
        pytest.fail(f"{path} has no '{HEADING}' section ")
    start = max(start, 0)
    end = text.find("\n## ", start + len(HEADING) + 1)
    return text[start : end if end > 0 else len(text)]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section(), flags=re.S)


@pytest.fixture
def example_file(tmp_path, monkeypatch):
    """The first python block, written as my_envs.py in a fresh folder that is the cwd."""
    path = tmp_path / "my_envs.py"
    path.write_text(_python_blocks()[0], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop("my_envs", None)


def test_example_class_is_complete_and_short():
    code = _python_blocks()[0]
    assert len(code.strip().splitlines()) < 40
    assert re.search(r"^class (\w+)\(TextEnv\):", code, flags=re.M)


def test_example_loads_by_path_and_its_gold_scores_one(example_file):
    name = re.search(r"^class (\w+)\(", example_file.read_text(), flags=re.M).group(1)
    env = make_env(f"{example_file}:{name}")
    obs, info = env.reset(seed=0)
    assert [m["role"] for m in obs] == ["system", "user"]
    _, reward, terminated, truncated, step_info = env.step(env.gold_action())
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert step_info["reward_components"] == {"correctness": 1.0}
    env.reset(seed=0)
    assert env.step("definitely not it")[1] == 0.0
    check_env(env, skip_render_check=True)
    assert check_text_env(env) == []
    assert all(r.ok for r in check_gold(env, limit=50))


def test_every_other_readme_block_runs_as_written(example_file):
    blocks = _python_blocks()[1:]
    assert blocks, "the section should show how to check and register the example"
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README text
        assert make_env("reverse").reset(seed=1)[0][-1]["content"].startswith("Reverse the word")
    finally:
        if "register(" in "".join(blocks):
            unregister("myproject/Reverse-v0")
