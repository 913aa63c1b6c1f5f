"""Score a JSONL file of model outputs with no model: the engine behind ``scripts/verify.py``.

Each input line is an object with ``id``, ``completion`` and, by verifier, ``answer``
(gsm8k, math) or ``tests`` (code); a line may name its own ``verifier``. The output has
one line per input line, in input order: ``id``, ``line``, ``verifier``, ``score``,
``parsed``, ``reason``.

Invariants:

- every input line yields exactly one output line, in input order, malformed or not;
- a malformed line stops nothing: it gets a zero verdict whose reason names the line
  number and what was wrong, and is counted in ``Summary.malformed``;
- lines are read, scored and written in chunks, so memory stays flat on huge files and
  what was scored before a crash is already on disk (the output is flushed per chunk).
"""

from __future__ import annotations

import gzip
import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rlvr.verifiers.registry import DEFAULT_TIMEOUTS, get_verifier
from rlvr.verifiers.types import Verdict

CHUNK_LINES = 256
"""Lines scored per batch: large enough to keep the worker pools busy, small enough that
the progress bar moves every second or so even for code."""


@dataclass
class Item:
    """One well-formed input line, ready to score."""

    index: int
    line: int
    id: Any
    verifier: str
    completion: str
    reference: Any


@dataclass
class Summary:
    """What a run did, for the table printed at the end."""

    count: int = 0
    score_sum: float = 0.0
    malformed: int = 0
    reasons: Counter = field(default_factory=Counter)
    by_verifier: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    sandbox: str = ""
    """The code sandbox's level and what it does not isolate, when code was scored."""

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.count if self.count else 0.0

    def add(self, verifier: str, verdict: Verdict) -> None:
        self.count += 1
        self.score_sum += verdict.score
        # "tests failed: 2/3" and "tests failed: 1/3" count as one reason.
        self.reasons[verdict.reason.split(":")[0]] += 1
        stats = self.by_verifier.setdefault(verifier, [0, 0.0])
        stats[0] += 1
        stats[1] += verdict.score

    def table(self) -> str:
        """Return a plain-text summary table."""
        rate = self.count / self.seconds if self.seconds > 0 else float("inf")
        rows = [
            f"{'lines':<24}{self.count:>12}",
            f"{'mean score':<24}{self.mean_score:>12.4f}",
            f"{'malformed lines':<24}{self.malformed:>12}",
            f"{'time (s)':<24}{self.seconds:>12.2f}",
            f"{'verdicts / second':<24}{rate:>12.1f}",
        ]
        for name, (n, s) in sorted(self.by_verifier.items()):
            rows.append(f"{'verifier ' + name:<24}{n:>12}   mean {s / n:.4f}")
        for reason, n in self.reasons.most_common():
            rows.append(f"{'reason ' + reason[:40]:<24}{n:>12}")
        if self.sandbox:
            rows.append(f"{'code sandbox':<24}{self.sandbox}")
        return "\n".join(rows)


class LineError(ValueError):
    """A line that cannot be scored; the message says what was expected."""


def _load_json(raw: bytes | str) -> Any:
    """Parse one line; LineError for every way it can fail (bytes, depth, digits, syntax)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LineError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise LineError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise LineError("JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer past sys.get_int_max_str_digits()
        raise LineError(f"invalid JSON ({str(e)[:120]})") from None


def parse_line(text: bytes | str, line: int, index: int, default_verifier: str | None) -> Item:
    """Turn one JSONL line into an Item, or raise LineError saying what is wrong."""
    obj = _load_json(text)
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    name = obj.get("verifier", default_verifier)
    if name is None:
        raise LineError("no verifier: the line has no 'verifier' field and --verifier was not given")
    try:
        spec = get_verifier(str(name))
    except KeyError as e:
        raise LineError(str(e.args[0])) from None
    completion = obj.get("completion")
    if not isinstance(completion, str):
        raise LineError(
            "missing field 'completion' (a string)"
            if completion is None
            else f"field 'completion' must be a string, got {type(completion).__name__}"
        )
    reference = None
    if spec.reference_field is not None:
        if spec.reference_field not in obj:
            raise LineError(f"missing field {spec.reference_field!r} (needed by verifier {spec.name!r})")
        reference = obj[spec.reference_field]
        _check_reference(spec.name, reference)
    return Item(index, line, obj.get("id", line), spec.name, completion, reference)


def _check_reference(verifier: str, reference: Any) -> None:
    if verifier == "code":
        if not isinstance(reference, list) or not reference:
            raise LineError("field 'tests' must be a non-empty list of assert strings or {input, output} objects")
        for i, t in enumerate(reference):
            ok = isinstance(t, str) or (isinstance(t, dict) and "input" in t and "output" in t)
            if not ok:
                raise LineError(f"tests[{i}] must be a string or an object with 'input' and 'output'")
            if isinstance(t, dict) and not all(isinstance(t[k], str) for k in ("input", "output")):
                raise LineError(f"tests[{i}]: 'input' and 'output' must be strings")
        if len({isinstance(t, str) for t in reference}) > 1:
            raise LineError("field 'tests' mixes assert strings and {input, output} objects")
    elif not isinstance(reference, (str, int, float)) or isinstance(reference, bool):
        raise LineError(f"field 'answer' must be a string or a number, got {type(reference).__name__}")


def open_text(path: Path) -> IO[bytes]:
    """Open a .jsonl or .jsonl.gz file for reading lines as bytes.

    Lines are decoded one by one, so that a line that is not UTF-8 is that line's fault.
    """
    if path.suffix == ".gz":
        return io.BufferedReader(gzip.open(path, "rb"))
    return path.open("rb")


def _chunks(lines: IO[bytes], size: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue  # blank lines are not items
        chunk.append((line_no, text))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_chunk(
    chunk: list[tuple[int, bytes | str]], default_verifier: str | None, timeout: float | None, workers: int | None
) -> list[dict[str, Any]]:
    """Score one chunk of raw lines; returns output records in the chunk's order."""
    out: list[dict[str, Any] | None] = [None] * len(chunk)
    groups: dict[str, list[Item]] = {}
    for i, (line_no, text) in enumerate(chunk):
        try:
            item = parse_line(text, line_no, i, default_verifier)
        except LineError as e:
            out[i] = {
                "id": _best_effort_id(text, line_no),
                "line": line_no,
                "verifier": None,
                "score": 0.0,
                "parsed": None,
                "reason": f"malformed: line {line_no}: {e}",
                "malformed": True,
            }
            continue
        groups.setdefault(item.verifier, []).append(item)
    for name, items in groups.items():
        spec = get_verifier(name)
        t = timeout if timeout is not None else DEFAULT_TIMEOUTS[name]
        try:
            verdicts = spec.batch([it.completion for it in items], [it.reference for it in items], t, workers)
        except Exception as e:  # noqa: BLE001 - a verifier's own bug must not stop the file
            verdicts = [Verdict(0.0, None, f"verifier error: {type(e).__name__}: {str(e)[:200]}")] * len(items)
        for it, v in zip(items, verdicts):
            out[it.index] = {"id": it.id, "line": it.line, "verifier": name, **v.to_dict()}
    return [o for o in out if o is not None]


def _best_effort_id(text: bytes | str, line_no: int) -> Any:
    try:
        obj = _load_json(text)
    except LineError:
        return line_no
    return obj.get("id", line_no) if isinstance(obj, dict) else line_no


def dump_record(record: dict[str, Any]) -> str:
    r"""Return one output line, whatever its strings hold.

    A lone surrogate (from a "\ud800" escape in the input) is written back as the same
    JSON escape rather than failing to encode as UTF-8.
    """
    text = json.dumps(record, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def count_lines(path: Path) -> int:
    with open_text(path) as f:
        return sum(1 for line in f if line.strip())


def verify_file(
    input_path: Path,
    output: IO[str] | None,
    *,
    verifier: str | None = None,
    timeout: float | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Summary:
    """Score every line of ``input_path``, writing one JSON line per input to ``output``."""
    from tqdm import tqdm

    summary = Summary()
    start = time.perf_counter()
    total = count_lines(input_path) if progress else None
    with (
        open_text(input_path) as lines,
        tqdm(total=total, disable=not progress, unit="line", desc="verify", mininterval=0.5) as bar,
    ):
        for chunk in _chunks(lines, CHUNK_LINES):
            for rec in score_chunk(chunk, verifier, timeout, workers):
                if rec.pop("malformed", False):
                    summary.malformed += 1
                summary.add(rec["verifier"] or "malformed", Verdict(rec["score"], rec["parsed"], rec["reason"]))
                if output is not None:
                    output.write(dump_record(rec) + "\n")
            if output is not None:
                output.flush()
            bar.update(len(chunk))
            bar.set_postfix(mean=f"{summary.mean_score:.3f}")
    summary.seconds = time.perf_counter() - start
    if "code" in summary.by_verifier:
        from rlvr.verifiers.sandbox import SandboxError, describe, isolation_level

        try:
            summary.sandbox = describe(isolation_level())
        except SandboxError as e:
            summary.sandbox = f"none ({str(e).splitlines()[0]})"
    return summary
