"""Check the verifiers against real public sets, through ``scripts/verify.py``.

    python scripts/check_real_data.py --data-dir ../shared/data [--only gsm8k,humaneval,math500,mathverify]

The sets are not part of the repo; each check is skipped (and says so) when its file is
absent. What is checked:

- GSM8K test: every reference solution scores 1 against its own answer, 0 against a wrong one;
- HumanEval: every canonical solution passes its tests, every ``return None`` body fails;
- MATH-500: every solution scores 1 against its answer;
- Math-Verify's own test cases with default or near-default options: agreement >= 95%.

Exit 0 when every check that ran passed, 1 otherwise. Prints one row per check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

VERIFY = Path(__file__).resolve().parent / "verify.py"
MATHVERIFY_MIN_AGREEMENT = 0.95


@dataclass
class CheckResult:
    name: str
    total: int
    agreeing: int
    required: float
    """Fraction of items that must agree with the expectation for the check to pass."""
    examples: list[str]

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.agreeing / self.total >= self.required


def run_verify(rows: list[dict], workdir: Path, name: str) -> list[dict]:
    """Write rows as JSONL, run scripts/verify.py on them, return the verdict records."""
    src, dst = workdir / f"{name}.jsonl", workdir / f"{name}.verdicts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(VERIFY), "--input", str(src), "--output", str(dst), "--no-progress"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"verify.py failed on {name} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]


def agreement(name: str, verdicts: list[dict], expected: list[bool], required: float = 1.0) -> CheckResult:
    agree, examples = 0, []
    for v, want in zip(verdicts, expected):
        if (v["score"] == 1.0) == want:
            agree += 1
        elif len(examples) < 5:
            examples.append(f"id={v['id']} expected {'1' if want else '0'}, got {v['score']} ({v['reason']})")
    return CheckResult(name, len(expected), agree, required, examples)


def check_gsm8k(data: Path, work: Path) -> CheckResult | None:
    path = data / "gsm8k" / "test.jsonl"
    if not path.is_file():
        return None
    rows, expected = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        obj = json.loads(line)
        answer = obj["answer"].split("####")[-1].strip().replace(",", "")
        rows.append({"id": f"{i}-own", "verifier": "gsm8k", "completion": obj["answer"], "answer": answer})
        wrong = str(Decimal(answer) + 1)
        rows.append({"id": f"{i}-wrong", "verifier": "gsm8k", "completion": obj["answer"], "answer": wrong})
        expected += [True, False]
    return agreement("gsm8k test: own 1, wrong 0", run_verify(rows, work, "gsm8k"), expected)


def check_humaneval(data: Path, work: Path) -> CheckResult | None:
    good, bad = data / "humaneval" / "humaneval_verify.jsonl", data / "humaneval" / "humaneval_wrong.jsonl"
    if not (good.is_file() and bad.is_file()):
        return None
    good_rows = [json.loads(x) for x in good.read_text(encoding="utf-8").splitlines()]
    rows = good_rows + [json.loads(x) for x in bad.read_text(encoding="utf-8").splitlines()]
    n_good = len(good_rows)
    for i, r in enumerate(rows):
        r["id"] = f"{r['id']}-{'canonical' if i < n_good else 'return-None'}"
    expected = [i < n_good for i in range(len(rows))]
    return agreement("humaneval: canonical 1, None 0", run_verify(rows, work, "humaneval"), expected)


def check_math500(data: Path, work: Path) -> CheckResult | None:
    path = data / "math500" / "test.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        rows.append({"id": obj.get("unique_id"), "verifier": "math", "completion": obj["solution"],
                     "answer": obj["answer"]})
    return agreement("math500: solution 1", run_verify(rows, work, "math500"), [True] * len(rows))


def check_mathverify(data: Path, work: Path) -> CheckResult | None:
    path = data / "mathverify" / "cases.jsonl"
    if not path.is_file():
        return None
    cases = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    cases = [c for c in cases if c.get("default_options") or c.get("near_default")]
    rows = [{"id": c["source"], "verifier": "math", "completion": c["pred"], "answer": c["gold"]} for c in cases]
    expected = [bool(c["expected"]) for c in cases]
    return agreement("math-verify cases (default/near)", run_verify(rows, work, "mathverify"), expected,
                     MATHVERIFY_MIN_AGREEMENT)


CHECKS = {"gsm8k": check_gsm8k, "humaneval": check_humaneval, "math500": check_math500,
          "mathverify": check_mathverify}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="verifiers against real public sets")
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    p.add_argument("--only", default=",".join(CHECKS), help="comma-separated subset of: " + ", ".join(CHECKS))
    args = p.parse_args(argv)
    failed = False
    print(f"{'check':<36}{'items':>7}{'agree':>8}{'rate':>9}{'need':>7}  result")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            result = CHECKS[name](args.data_dir, Path(tmp))
            if result is None:
                print(f"{name:<36}{'':>7}{'':>8}{'':>9}{'':>7}  skipped (data absent under {args.data_dir})")
                continue
            rate = result.agreeing / max(result.total, 1)
            print(f"{result.name:<36}{result.total:>7}{result.agreeing:>8}{rate:>9.2%}{result.required:>7.0%}"
                  f"  {'ok' if result.ok else 'FAILED'}")
            for ex in result.examples:
                print(f"    {ex}")
            failed |= not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
