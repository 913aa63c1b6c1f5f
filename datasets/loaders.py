"""GSM8K and MATH loaders: Hugging Face hub, a local file, or a small bundled sample.

``source`` picks where the rows come from:

- a path: a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file, or a folder holding
  ``{split}.jsonl`` (or ``.parquet``); parquet needs ``pyarrow`` (``pip install 'rlvr[hub]'``).
  A file is one split: its name (``test.jsonl`` -> ``test``) is the split reported.
- ``"hub"`` or ``"hub:owner/name[:config]"``: the Hugging Face dataset, through the
  ``datasets`` library (the optional extra ``rlvr[hub]``); failures raise.
- ``"bundled"``: the sample written for this project (``datasets/data/*_sample.jsonl``,
  about 30 problems in the real sets' format, NOT copied from them). It has no splits:
  the one file serves every split.
- ``"auto"`` (default): the hub only when the ``datasets`` library is importable and the
  dataset is already in the local Hugging Face cache, so an offline machine never waits
  on a network timeout; otherwise the bundled sample. Set ``HF_HUB_OFFLINE=1`` to keep
  ``datasets`` from re-checking the hub even for a cached dataset.

The source actually used is logged at INFO (once per process and source; later loads of
the same source reuse the parsed rows and log at DEBUG) and kept in
``LoadedDataset.source``. A malformed row raises ``DataError`` naming the file, the
1-based row and the field.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
T = TypeVar("T")


class DataError(ValueError):
    """A malformed data row: ``message`` is ``"<file>:<row>: <what is wrong>"``."""

    def __init__(self, path: str | os.PathLike[str], row: int, problem: str):
        self.path, self.row, self.problem = str(path), row, problem
        super().__init__(f"{self.path}:{row}: {problem}")


class DataSourceError(RuntimeError):
    """The requested source cannot be read (hub unreachable, library missing, no file)."""


@dataclass(frozen=True)
class GSM8KExample:
    """One grade-school word problem."""

    task_id: str
    question: str
    solution: str
    """The worked solution, ending with ``#### <answer>``."""
    answer: str
    """The final number, as written after ``####`` (thousands separators removed)."""


@dataclass(frozen=True)
class MathExample:
    """One competition math problem (MATH format)."""

    task_id: str
    problem: str
    solution: str
    answer: str
    """The final answer in LaTeX, the content of the solution's last ``\\boxed{}``."""
    level: int | None = None
    subject: str = ""


@dataclass
class LoadedDataset(Generic[T]):
    """Loaded examples and where they came from."""

    name: str
    source: str
    """e.g. ``"bundled:gsm8k_sample.jsonl"``, ``"file:/data/test.jsonl"``, ``"hub:openai/gsm8k"``."""
    split: str
    items: list[T] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> T:
        return self.items[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)


@dataclass(frozen=True)
class _Spec:
    """What differs between datasets: names, hub defaults, and the row parser."""

    name: str
    bundled: str
    hub_repo: str
    hub_config: str | None
    parse: Callable[[dict[str, Any], str, int, str], Any]


# ---- reading rows --------------------------------------------------------------------------


def read_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_number, row)`` from a JSONL (optionally gzipped) or parquet file.

    Row numbers are 1-based (the line number for JSONL; blank lines are skipped but
    counted). Raises ``DataError`` for a line that is not a JSON object.
    """
    p = Path(path)
    if p.suffix == ".parquet":
        yield from _read_parquet(p)
        return
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(p, number, f"invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(p, number, f"row is a JSON {type(row).__name__}, not an object")
            yield number, row


def _read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow, which is not installed: pip install 'rlvr[hub]' "
            "(or convert the file to JSONL)"
        ) from None
    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def require_str(row: dict[str, Any], key: str, path: str, number: int) -> str:
    """``row[key]`` as a string, or a ``DataError`` naming the missing or mistyped field."""
    if key not in row or row[key] is None:
        raise DataError(path, number, f"missing field {key!r}")
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(path, number, f"field {key!r} must be a string, got {type(value).__name__}")
    return value


# ---- row parsers ----------------------------------------------------------------------------

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def _parse_gsm8k(row: dict[str, Any], path: str, number: int, split: str) -> GSM8KExample:
    question = require_str(row, "question", path, number)
    solution = require_str(row, "answer", path, number)
    match = _GSM8K_FINAL.search(solution)
    if match is None:
        raise DataError(path, number, "field 'answer' has no final '#### <number>' line")
    task_id = str(row.get("id") or f"gsm8k-{split}-{number}")
    answer = match.group(1).replace(",", "").strip()
    return GSM8KExample(task_id=task_id, question=question, solution=solution, answer=answer)


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _parse_level(value: Any) -> int | None:
    # MATH writes "Level 3"; MATH-500 writes 3; some rows say "Level ?".
    if isinstance(value, int):
        return value
    match = re.search(r"\d+", str(value or ""))
    return int(match.group()) if match else None


def _parse_math(row: dict[str, Any], path: str, number: int, split: str) -> MathExample:
    problem = require_str(row, "problem", path, number)
    solution = require_str(row, "solution", path, number) if "solution" in row else ""
    if row.get("answer") is not None:
        answer = require_str(row, "answer", path, number)
    else:
        # Original MATH rows have no answer field: it is the solution's last \boxed{}.
        boxed = last_boxed(solution)
        if boxed is None:
            raise DataError(path, number, "missing field 'answer' (and no \\boxed{} in 'solution')")
        answer = boxed
    task_id = str(row.get("id") or row.get("unique_id") or f"math-{split}-{number}")
    subject = str(row.get("type") or row.get("subject") or "")
    return MathExample(
        task_id=task_id,
        problem=problem,
        solution=solution,
        answer=answer,
        level=_parse_level(row.get("level")),
        subject=subject,
    )


GSM8K = _Spec("gsm8k", "gsm8k_sample.jsonl", "openai/gsm8k", "main", _parse_gsm8k)
MATH = _Spec("math", "math_sample.jsonl", "DigitalLearningGmbH/MATH-lighteval", None, _parse_math)


# ---- sources --------------------------------------------------------------------------------


def _hf_load_dataset() -> Callable[..., Any] | None:
    """``datasets.load_dataset`` from the Hugging Face library, or None when not installed.

    Run from the repo root, ``import datasets`` finds this very folder (a namespace
    package with no ``load_dataset``): that counts as "not installed".
    """
    try:
        spec = importlib.util.find_spec("datasets")
    except (ImportError, ValueError):
        return None
    # A namespace package has no origin: that is this folder, not the library. Checking
    # before importing keeps it out of sys.modules, where other libraries would see it.
    if spec is None or spec.origin is None:
        return None
    try:
        module = importlib.import_module("datasets")
    except ImportError:
        return None
    return getattr(module, "load_dataset", None)


def _hub_cache_dirs() -> list[Path]:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return [
        Path(os.environ.get("HF_HUB_CACHE", home / "hub")),
        Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")),
    ]


def is_cached(repo: str) -> bool:
    """Whether the hub dataset ``repo`` has a copy in the local Hugging Face caches."""
    owner_name = repo.split("/")
    hub_dir, datasets_dir = _hub_cache_dirs()
    return (hub_dir / ("datasets--" + "--".join(owner_name))).is_dir() or (
        datasets_dir / "___".join(owner_name)
    ).is_dir()


def _load_hub(spec: _Spec, source: str, split: str) -> tuple[str, list[tuple[int, dict]]]:
    repo, config = spec.hub_repo, spec.hub_config
    if source.startswith("hub:"):
        parts = source[4:].split(":")
        repo, config = parts[0], (parts[1] if len(parts) > 1 else None)
    load_dataset = _hf_load_dataset()
    if load_dataset is None:
        raise DataSourceError(
            f"source={source!r} needs the Hugging Face 'datasets' library: pip install 'rlvr[hub]'"
        )
    try:
        data = load_dataset(repo, config, split=split)
    except Exception as e:  # the library raises many types (connection, missing split, ...)
        raise DataSourceError(f"could not load {repo} (config={config}, split={split}): {e}") from e
    return f"hub:{repo}", [(i, dict(row)) for i, row in enumerate(data, start=1)]


def _resolve_path(source: str | os.PathLike[str], split: str) -> Path:
    path = Path(source)
    if path.is_dir():
        for suffix in (".jsonl", ".jsonl.gz", ".parquet"):
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
        raise DataSourceError(f"{path} holds no {split}.jsonl, {split}.jsonl.gz or {split}.parquet")
    if not path.is_file():
        raise DataSourceError(
            f"no such file: {path} (source must be 'auto', 'bundled', 'hub[:repo[:config]]' "
            "or a path to a .jsonl/.parquet file or a folder of them)"
        )
    return path


def load_rows(
    source: str | os.PathLike[str], split: str, bundled: str, hub: Callable[[], Any]
) -> tuple[str, str, list[tuple[int, dict[str, Any]]]]:
    """Resolve ``source`` to ``(source_label, file_label, rows)``; shared by all loaders."""
    if _is_hub(source):
        label, rows = hub()
        return label, label, rows
    if source == "bundled":
        path = DATA_DIR / bundled
        return f"bundled:{bundled}", str(path), list(read_rows(path))
    path = _resolve_path(source, split)
    return f"file:{path}", str(path), list(read_rows(path))


# Parsed rows by source, so the trainer's many env instances (one per group member) read
# and parse a file once per process. Keyed on (mtime, size) so an edited file is re-read.
_PARSED: dict[tuple[Any, ...], tuple[str, str, list[Any]]] = {}


def _is_hub(source: str | os.PathLike[str]) -> bool:
    return isinstance(source, str) and (source == "hub" or source.startswith("hub:"))


def _cache_key(name: str, source: str | os.PathLike[str], split: str) -> tuple[Any, ...]:
    if source == "bundled" or _is_hub(source):
        return (name, str(source), split)
    path = _resolve_path(source, split).resolve()
    stat = path.stat()
    return (name, str(path), stat.st_mtime_ns, stat.st_size)


def _parse_source(spec: _Spec, source: str | os.PathLike[str], split: str) -> tuple[str, str, list[Any]]:
    label, file_label, rows = load_rows(source, split, spec.bundled, lambda: _load_hub(spec, str(source), split))
    if label.startswith("file:"):
        # A file is one split whatever was asked; its name ("test.jsonl") says which.
        split = Path(file_label).name.split(".")[0]
    return label, split, [spec.parse(row, file_label, number, split) for number, row in rows]


def _load(
    spec: _Spec,
    source: str | os.PathLike[str],
    split: str,
    shuffle: bool,
    seed: int,
    limit: int | None,
) -> LoadedDataset[Any]:
    if source == "auto":
        use_hub = _hf_load_dataset() is not None and is_cached(spec.hub_repo)
        source = "hub" if use_hub else "bundled"
        reason = "cached on the hub" if use_hub else "the hub copy is not cached or 'datasets' is missing"
        log.info("%s: source=auto chose %s (%s)", spec.name, source, reason)
    key = _cache_key(spec.name, source, split)
    cached = key in _PARSED
    if not cached:
        _PARSED[key] = _parse_source(spec, source, split)
    label, split, parsed = _PARSED[key]
    items = select(parsed, shuffle=shuffle, seed=seed, limit=limit)
    note = " (the bundled sample has no splits; it serves every split)" if label.startswith("bundled") else ""
    log.log(
        logging.DEBUG if cached else logging.INFO,
        "%s: %s %d rows of split %r from %s%s",
        spec.name, "reused" if cached else "loaded", len(items), split, label, note,
    )
    return LoadedDataset(name=spec.name, source=label, split=split, items=items)


def select(items: Sequence[T], *, shuffle: bool, seed: int, limit: int | None) -> list[T]:
    """Shuffle with ``random.Random(seed)`` when asked, then keep the first ``limit``."""
    out = list(items)
    if shuffle:
        random.Random(seed).shuffle(out)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        out = out[:limit]
    return out


def load_gsm8k(
    source: str | os.PathLike[str] = "auto",
    *,
    split: str = "train",
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,
) -> LoadedDataset[GSM8KExample]:
    """Load GSM8K (``question``, ``answer`` = solution ending ``#### N``); see the module doc."""
    return _load(GSM8K, source, split, shuffle, seed, limit)


def load_math(
    source: str | os.PathLike[str] = "auto",
    *,
    split: str = "train",
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,
) -> LoadedDataset[MathExample]:
    r"""Load MATH-style problems (``problem``, ``solution``, ``answer``, ``level``, ``type``).

    Also reads MATH-500 rows (``subject`` instead of ``type``) and original MATH rows
    (no ``answer``: it is taken from the solution's last ``\boxed{}``).
    """
    return _load(MATH, source, split, shuffle, seed, limit)
