"""Wall-clock seconds per label, for the step's phases (generation, environments, learning, ...).

Here, at the bottom of the layers, so that a rollout can time its own phases without
importing the run's metrics I/O (``bookkeeping/metrics.py``), which sits above it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator


class Stopwatch:
    """Accumulates wall-clock seconds per label: ``with watch.time("generation"): ...``."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def time(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] += time.perf_counter() - start
