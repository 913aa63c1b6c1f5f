"""Checkpoint manifests: a truncated or corrupted checkpoint is refused by name, --resume auto falls back.

The unit tests save with a stand-in learner (a file of its own and a ``deepspeed/``
subfolder, as the DeepSpeed learner writes); the last one truncates a real training
run's checkpoint and resumes through scripts/train.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlvr.trainer.bookkeeping.checkpoint import (
    MANIFEST,
    CheckpointError,
    checkpoint_dir,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from rlvr.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


class _Learner:
    """Writes what a learner writes: weights at the top, sharded optimizer state in deepspeed/."""

    def save(self, path: str) -> None:
        (Path(path) / "deepspeed" / "global_step1").mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(os.urandom(4096))
        (Path(path) / "deepspeed" / "global_step1" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"x" * 1000)


class _Tokenizer:
    def save_pretrained(self, path: Path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


def _save(tmp_path: Path, *steps: int, keep: int = 3) -> list[Path]:
    config = TrainConfig(output_dir=str(tmp_path), keep_checkpoints=keep)
    return [save_checkpoint(tmp_path, s, _Learner(), _Tokenizer(), config) for s in steps]


def test_the_manifest_lists_every_file_with_size_and_sha256_deepspeed_folder_included(tmp_path):
    (path,) = _save(tmp_path, 1)
    files = json.loads((path / MANIFEST).read_text())["files"]
    expected = {"model.safetensors", "tokenizer.json", "trainer_state.json", "rng_state.pt", "config.yaml",
                "deepspeed/global_step1/zero_pp_rank_0_optim_states.pt"}  # fmt: skip
    assert set(files) == expected
    assert files["deepspeed/global_step1/zero_pp_rank_0_optim_states.pt"]["size"] == 1000
    assert all(len(f["sha256"]) == 64 for f in files.values())
    verify_checkpoint(path)  # whole: no error


def test_only_the_newest_k_are_kept(tmp_path):
    _save(tmp_path, 1, 2, 3, 4, 5, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000005"]
    _save(tmp_path / "all", 1, 2, 3, keep=0)
    assert len(list((tmp_path / "all" / "checkpoints").iterdir())) == 3


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])


def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[10] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, name, message",
    [
        (_truncate, "model.safetensors", "model.safetensors: truncated: 100 bytes, the manifest says 4096"),
        (_flip_a_byte, "model.safetensors", "model.safetensors: corrupted: its sha256 differs"),
        (Path.unlink, "deepspeed/global_step1/zero_pp_rank_0_optim_states.pt", "optim_states.pt: missing"),
        (Path.unlink, MANIFEST, f"no {MANIFEST}"),
    ],
    ids=["truncated", "flipped-byte", "missing-deepspeed-shard", "no-manifest"],
)
def test_a_damaged_checkpoint_is_refused_by_name_and_auto_takes_the_previous_one(
    tmp_path, caplog, damage, name, message
):
    first, second = _save(tmp_path, 1, 2)
    damage(second / name)
    with pytest.raises(CheckpointError, match="refusing a damaged checkpoint") as error:
        resolve_resume(str(second), tmp_path)
    assert message in str(error.value) and str(second) in str(error.value)
    with caplog.at_level(logging.WARNING, logger="rlvr"):
        assert resolve_resume("auto", tmp_path) == first == resolve_resume("latest", tmp_path)
    assert f"skipping checkpoint step_000002: {second}" in caplog.text and message in caplog.text


def test_auto_with_no_whole_checkpoint_says_so(tmp_path):
    (only,) = _save(tmp_path, 1)
    _truncate(only / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"1 found, none whole"):
        resolve_resume("auto", tmp_path)


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_a_truncated_training_checkpoint_is_refused_and_auto_resumes_from_the_one_before(tmp_path):
    small = ["--env", "gsm8k", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8",
             "--no-progress", "--output-dir", str(tmp_path)]  # fmt: skip
    proc = _train(*small, "--max-steps", "2", "--checkpoint-every", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step2 = checkpoint_dir(tmp_path, 2)
    weights = step2 / "model.safetensors"
    size = weights.stat().st_size
    _truncate(weights)
    refused = _train(*small, "--max-steps", "3", "--resume", str(step2))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{weights}: truncated: 100 bytes, the manifest says {size}" in refused.stderr
    resumed = _train(*small, "--max-steps", "3", "--resume", "auto", "--checkpoint-every", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint step_000002" in resumed.stderr and "truncated" in resumed.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # resumed after step 1, ran 2 and 3 again
    verify_checkpoint(checkpoint_dir(tmp_path, 3))
    verify_checkpoint(step2)  # rewritten whole by the resumed run
