"""Verdicts per second for each verifier, measured side by side in one run.

    python scripts/bench_verifiers.py [--scale 1.0] [--workers N] [--only code,humaneval]
        [--data-dir ../shared/data]

Targets on a 2-core machine: gsm8k and format >= 20,000/s, math >= 500/s, code >= 30
trivial programs/s with full isolation, humaneval >= 30 verdicts/s (HumanEval's 164
canonical solutions against their real ``check(candidate)`` tests, every call of the
candidate crossing the sandbox channel; opt-in with ``--only``, skipped without the data).
``math`` is GRPO-shaped (a few references, each shared by many completions, as a group
shares its task); ``math-distinct`` gives every
item its own reference, the worst case for the workers' cache of parsed references.
Inputs are synthetic and mixed (right, wrong and unparseable answers) so no verifier is
timed only on its fast path. Prints a table and
exits 1 when a target is missed, so the script can gate a release.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rlvr.verifiers.registry import DEFAULT_TIMEOUTS, get_verifier

TARGETS = {"gsm8k": 20_000, "format": 20_000, "math": 500, "math-distinct": 500, "code": 30, "humaneval": 30}
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def gsm8k_items(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    comps, refs = [], []
    for _ in range(n):
        a = rng.randint(0, 10**6)
        shape = rng.randrange(3)
        if shape == 0:
            comps.append(f"She sells {rng.randint(1, 99)} eggs a day, so she makes ${a:,} in total.\n#### {a}")
        elif shape == 1:
            comps.append(f"First 3 + 4 = 7, then 7 * {a} = {7 * a}. The answer is {7 * a + 1}.")
        else:
            comps.append("I am not sure how to solve this problem.")
        refs.append(str(a if shape == 0 else 7 * a))
    return comps, refs


def format_items(n: int, rng: random.Random) -> tuple[list[str], list[None]]:
    shapes = [
        "<think>\nLet me add {a} and {b}.\nThat is {c}.\n</think>\n<answer>{c}</answer>",
        "<answer>{c}</answer><think>late thoughts</think>",
        "The answer is {c}.",
        "<think>a</think><think>b</think><answer>{c}</answer>",
    ]
    comps = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        comps.append(rng.choice(shapes).format(a=a, b=b, c=a + b))
    return comps, [None] * n


def math_items(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    pool = [
        ("So the answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),
        ("Thus $x = \\boxed{\\dfrac{3}{4}}$.", "\\frac{3}{4}"),
        ("We get $\\boxed{2\\sqrt{3}}$.", "\\sqrt{12}"),
        ("The roots are $\\boxed{(1, 2)}$.", "(1,2)"),
        ("The interval is $\\boxed{[0, 1)}$.", "[0,1)"),
        ("Simplifying, $\\boxed{x^2 + 2x + 1}$.", "(x+1)^2"),
        ("Hence $\\boxed{7}$.", "8"),
        ("I could not finish.", "3"),
    ]
    comps, refs = [], []
    for i in range(n):
        c, r = rng.choice(pool)
        # A distinct suffix per item defeats any cache keyed on the exact text.
        comps.append(f"Step {i}: we compute carefully. {c}")
        refs.append(r)
    return comps, refs


def math_distinct_items(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Every item has its own reference, so no worker-side cache of parsed references helps."""
    comps, refs = [], []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1000, 9999)
        right = rng.random() < 0.5
        comps.append(f"Dividing, we get $\\boxed{{\\frac{{{a}}}{{{b}}}}}$.")
        refs.append(f"\\frac{{{2 * a if right else 2 * a + 1}}}{{{2 * b}}}")
    return comps, refs


def code_items(n: int, rng: random.Random) -> tuple[list[str], list[list[str]]]:
    comps, tests = [], []
    for i in range(n):
        k = rng.randint(1, 9)
        comps.append(f"```python\ndef add_{i}(x):\n    return x + {k}\n```")
        tests.append([f"assert add_{i}(1) == {1 + k}", f"assert add_{i}(-1) == {k - 1}"])
    return comps, tests


def humaneval_items(n: int, rng: random.Random, data_dir: Path = DATA_DIR) -> tuple[list[str], list[list[str]]]:
    """The canonical solutions with their tests, cycled to ``n`` items; empty when absent."""
    path = data_dir / "humaneval" / "humaneval_verify.jsonl"
    if not path.is_file():
        return [], []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows = [rows[i % len(rows)] for i in range(n)]
    return [r["completion"] for r in rows], [r["tests"] for r in rows]


def bench(name: str, make: Callable, n: int, workers: int | None) -> tuple[int, float]:
    comps, refs = make(n, random.Random(0))
    if not comps:
        return 0, 0.0
    name = "code" if name == "humaneval" else name.split("-")[0]  # "math-distinct" is the math verifier on harder input
    spec = get_verifier(name)
    spec.batch(comps[:8], refs[:8], DEFAULT_TIMEOUTS[name], workers)  # warm pools and imports
    start = time.perf_counter()
    verdicts = spec.batch(comps, refs, DEFAULT_TIMEOUTS[name], workers)
    seconds = time.perf_counter() - start
    assert len(verdicts) == n
    return n, seconds


def main() -> int:
    p = argparse.ArgumentParser(description="verifier throughput, side by side")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the item counts")
    p.add_argument("--workers", type=int, default=None, help="worker processes/threads (default: per verifier)")
    p.add_argument("--only", default=None, help="comma-separated subset of the rows")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="holds humaneval/humaneval_verify.jsonl")
    args = p.parse_args()
    plan = [("gsm8k", gsm8k_items, 40_000), ("format", format_items, 40_000),
            ("math", math_items, 4_000), ("math-distinct", math_distinct_items, 2_000), ("code", code_items, 300),
            ("humaneval", functools.partial(humaneval_items, data_dir=args.data_dir), 164)]
    # humaneval is opt-in (needs the data set): the default table stays the synthetic five.
    only = args.only.split(",") if args.only else [row[0] for row in plan if row[0] != "humaneval"]
    plan = [row for row in plan if row[0] in only]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"cpu cores: {os.cpu_count()}, load average: {load}, workers: {args.workers or 'default'}")
    print(f"{'verifier':<14}{'items':>8}{'seconds':>10}{'per second':>14}{'target':>10}  ok")
    ok_all = True
    for name, make, n in plan:
        n = max(8, int(n * args.scale))
        count, seconds = bench(name, make, n, args.workers)
        if count == 0:
            print(f"{name:<14}  skipped (no data under {args.data_dir})")
            continue
        rate = count / seconds
        ok = rate >= TARGETS[name]
        ok_all &= ok
        print(f"{name:<14}{count:>8}{seconds:>10.2f}{rate:>14.1f}{TARGETS[name]:>10}  {'yes' if ok else 'NO'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
