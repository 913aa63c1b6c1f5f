#!/usr/bin/env python
"""The broadcast weight route, measured: one sender and R receivers in separate processes.

    python scripts/bench_weight_sync.py                          # gloo on CPU: 64 MB, 1 receiver
    python scripts/bench_weight_sync.py --mb 2048 --backends gloo nccl --receivers 1

Each row builds a ``WeightGroup`` (``trainer/weights/broadcast.py``) of ``1 + R`` processes
with one backend and broadcasts ``--versions`` versions of a synthetic state of ``--mb``
MB (bf16 matrices of 4096 x 4096 and a float32 norm per 'layer', the shape of a
transformer's weights), after one warm-up version. The time of a version is the
sender's, from the first bucket to the last broadcast completed; every receiver keeps
what it got and checks it afterwards against the sender's checksums (integer sums of
each tensor's bits), so a fast but wrong route fails. Rows side by side in one run:

- ``gloo``: the CPU route (what ``--weight-sync broadcast`` uses without GPUs);
- ``nccl``: the GPU route; every member needs a GPU of its own (NCCL refuses two ranks
  on one GPU: on a one-GPU machine the row says so instead of a figure).

Prints MB per version, seconds per version and GB/s; exit status 1 if a receiver saw a
wrong checksum.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import torch

from rlvr.trainer.weights.broadcast import WeightGroup, WeightSyncAborted, open_store

HOST = "127.0.0.1"


def synthetic_state(mb: int, seed: int) -> dict[str, torch.Tensor]:
    """About ``mb`` MB of bf16 4096x4096 'layers' (32 MB each) and small float32 norms."""
    g = torch.Generator().manual_seed(seed)
    layers = max(1, round(mb / 32))
    state = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
        state[f"layers.{i}.norm"] = torch.randn(4096, generator=g)
    return state


def checksums(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Exact per-tensor checksums of the bits (integer sums: independent of threads and order)."""
    out = {}
    for k, v in state.items():
        bits = v.detach().reshape(-1).view({2: torch.int16, 4: torch.int32}[v.element_size()]).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device) % 7 + 1  # a moved element changes this one
        out[k] = (int(bits.sum()), int((bits * weights).sum()))
    return out


def _device(backend: str, rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")


def receiver(backend: str, port: int, rank: int, world: int, versions: int, sums: list, results) -> None:
    torch.set_num_threads(1)
    try:
        group = WeightGroup(HOST, port, rank, world, _device(backend, rank), generation=0, timeout=120)
        got = [group.recv() for _ in range(versions + 1)][1:]  # after the warm-up; checked after the timing
        ok = all(checksums(state) == want for state, want in zip(got, sums))
        results.put((rank, ok, ""))
    except Exception as e:  # noqa: BLE001 - reported in the table
        results.put((rank, False, f"{type(e).__name__}: {e}"))


def run_backend(backend: str, mb: int, receivers: int, versions: int) -> tuple[str, float, float, str]:
    """Return (backend, MB per version, seconds per version, note)."""
    world = 1 + receivers
    states = [synthetic_state(mb, seed) for seed in range(versions + 1)]
    sums = [checksums(s) for s in states[1:]]
    device = _device(backend, 0)
    if device.type == "cuda":
        states = [{k: v.to(device) for k, v in s.items()} for s in states]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = open_store(HOST, world, timeout=120)
    procs = [ctx.Process(target=receiver, args=(backend, store.port, r, world, versions, sums, results))
             for r in range(1, world)]  # fmt: skip
    for p in procs:
        p.start()
    try:
        group = WeightGroup(HOST, store.port, 0, world, device, generation=0, store=store, timeout=120)
        nbytes = group.send(states[0])  # warm-up: connections, NCCL's communicator
        start = time.perf_counter()
        for s in states[1:]:
            group.send(s)
        seconds = (time.perf_counter() - start) / versions
    except WeightSyncAborted as e:
        for p in procs:
            p.kill()
        refused = "one member per GPU" in str(e)
        return backend, 0.0, 0.0, "refused: NCCL allows one member per GPU" if refused else f"failed: {e}"[:300]
    reports = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    bad = [f"rank {r}: {err or 'wrong checksum'}" for r, ok, err in reports if not ok]
    return backend, nbytes / 2**20, seconds, "; ".join(bad) or "checksums equal"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="size of one version (default 64)")
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["gloo"], choices=["gloo", "nccl"])
    args = parser.parse_args()
    if "nccl" in args.backends and not torch.cuda.is_available():
        parser.error("--backends nccl needs CUDA")
    where = torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}" if torch.cuda.is_available() else "CPU"
    print(f"weight sync: {args.receivers} receiver(s), {args.versions} versions, torch {torch.__version__}, {where}")
    print(f"{'backend':<8} {'MB':>8} {'s/version':>10} {'GB/s':>8}  note")
    failed = False
    for backend in args.backends:
        name, mb, seconds, note = run_backend(backend, args.mb, args.receivers, args.versions)
        rate = f"{mb / 1024 / seconds:8.2f}" if seconds > 0 else f"{'-':>8}"
        print(f"{name:<8} {mb:8.0f} {seconds:10.4f} {rate}  {note}", flush=True)
        failed |= "wrong checksum" in note
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
