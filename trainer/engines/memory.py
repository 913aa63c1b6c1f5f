"""Peak memory of one learner step, for the step's metrics (out-of-memory is the first complaint).

``StepMemory(device).start()`` at the top of a step, ``.peaks()`` at its end gives:

- ``memory/peak_rss_gb``: the largest resident set of this process during the step, in GB
  (1e9 bytes). Linux keeps a per-process high-water mark of resident memory (``VmHWM`` in
  ``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
  resident set (Linux >= 4.0, allowed on one's own process without privileges). So the
  number is an exact peak over the step, not a sample, but of the whole process: whatever
  other threads of it allocate meanwhile counts too (in the synchronous loop nothing else
  runs during the learner's step; a threaded Ray actor may share the process). The reset
  also resets ``getrusage``'s ``ru_maxrss``, which is the same counter; nothing in rlvr
  reads that one. Where the reset is refused or there is no ``/proc`` (macOS), only the
  process-lifetime peak exists; it is then reported as ``memory/lifetime_peak_rss_gb``
  instead, under a name that says so, rather than passed off as the step's.
- ``memory/gpu_allocated_gb`` / ``memory/gpu_reserved_gb`` on a CUDA device: the peaks of
  torch's caching allocator over the step (``max_memory_allocated`` / ``max_memory_reserved``
  after ``reset_peak_memory_stats``): tensors alive at once, and what the allocator held
  from the driver (what ``nvidia-smi`` shows, less the CUDA context).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_GB = 1e9
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class StepMemory:
    """Resets the peak counters at ``start`` and reads them at ``peaks``; one per learner."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.per_step = False

    def start(self) -> None:
        """Reset the resident-set high-water mark (if Linux allows) and the CUDA allocator's peaks."""
        self.per_step = _reset_rss_peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> dict[str, float]:
        """Peaks since ``start``, in GB: the metrics the module docstring lists."""
        rss = _rss_peak_bytes() if self.per_step else None
        if rss is not None:
            out = {"memory/peak_rss_gb": rss / _GB}
        else:
            out = {"memory/lifetime_peak_rss_gb": _lifetime_peak() / _GB}
        if self.cuda:
            out["memory/gpu_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / _GB
            out["memory/gpu_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / _GB
        return out


def _reset_rss_peak() -> bool:
    """Write 5 to clear_refs (reset VmHWM to the current RSS); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _rss_peak_bytes() is not None


def _rss_peak_bytes() -> int | None:
    """``VmHWM`` of this process in bytes (the kernel writes it in kB), or None without /proc."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _lifetime_peak() -> int:
    """Return the process's largest resident set since it started, in bytes (kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
