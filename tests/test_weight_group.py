"""The weight group: a real process group (gloo here; NCCL on GPUs) between separate processes.

Rank 0 broadcasts a state of mixed dtypes in small buckets, so that a version is several
collectives; the receivers must get it bit for bit. A receiver that dies, or never comes,
must end rank 0's wait with an error, never a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

from rlvr.trainer.cluster.weight_routes import choose_route
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.weights.broadcast import Entry, Manifest, WeightGroup, WeightSyncAborted, open_store

HOST = "127.0.0.1"


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layer.0.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layer.0.bias": torch.randn(16, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(16, generator=g),
        "head.weight": torch.randn(50, 16, generator=g),
    }


def _device(cuda: bool, rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")


def _receiver(port: int, rank: int, world: int, versions: int, out: str, cuda: bool = False) -> None:
    torch.set_num_threads(1)
    try:
        group = WeightGroup(HOST, port, rank, world, _device(cuda, rank), generation=0, timeout=60,
                            bucket_bytes=4096)  # fmt: skip
        got = [{k: v.cpu() for k, v in group.recv().items()} for _ in range(versions)]
    except WeightSyncAborted as e:
        got = str(e)
    torch.save(got, out)


def test_buckets_keep_order_split_by_dtype_and_size():
    manifest = Manifest.of(_state(0))
    buckets = manifest.buckets(4096)
    assert [e for b in buckets for e in b] == list(manifest.entries)  # every tensor once, in order
    assert all(len({e.dtype for e in b}) == 1 for b in buckets)
    assert all(sum(e.nbytes for e in b) <= 4096 or len(b) == 1 for b in buckets)
    assert [[e.name for e in b] for b in buckets] == [
        ["embed.weight"],  # float32, then bf16: a new bucket
        ["layer.0.weight", "layer.0.bias"],
        ["norm.weight", "head.weight"],  # 64 + 3200 bytes
    ]
    assert [len(b) for b in manifest.buckets(3000)] == [1, 2, 1, 1]  # 64 + 3200 > 3000: split by size
    big = Manifest((Entry("a", (2048,), "float32"),))
    assert [len(b) for b in big.buckets(1024)] == [1]  # larger than a bucket: alone
    assert Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(ValueError, match="unknown dtype 'complex7'"):
        _ = Entry("x", (1,), "complex7").nbytes


def test_auto_broadcasts_only_where_every_member_has_a_gpu_of_its_own():
    def route(gpus: bool, **kw) -> str:
        return choose_route(TrainConfig(cluster="ray", **kw), gpus)

    assert route(False) == "object-store" and route(False, learner="deepspeed", learner_ranks=2) == "object-store"
    assert route(True, learner="deepspeed", learner_ranks=2) == "broadcast"  # rank 0: an actor with its own GPU
    assert route(True) == "object-store"  # the driver's learner may share a GPU with an actor
    assert route(False, weight_sync="broadcast") == "broadcast" and route(True, weight_sync="object-store") == (
        "object-store"
    )


def test_two_receivers_get_every_version_bit_for_bit(tmp_path):
    store = open_store(HOST, 3)
    ctx = mp.get_context("spawn")
    outs = [str(tmp_path / f"r{r}.pt") for r in (1, 2)]
    procs = [ctx.Process(target=_receiver, args=(store.port, r, 3, 2, outs[r - 1])) for r in (1, 2)]
    for p in procs:
        p.start()
    group = WeightGroup(HOST, store.port, 0, 3, torch.device("cpu"), generation=0, store=store, timeout=60,
                        bucket_bytes=4096)  # fmt: skip
    # The second version has another layout (dtypes, one tensor fewer: as a checkpoint's tied weights may).
    sent = [_state(1), {k: v.float() for k, v in _state(2).items() if k != "head.weight"}]
    manifest = Manifest.of(sent[0])
    assert group.send(sent[0]) == sum(e.nbytes for e in manifest.entries)
    group.send(sent[1])

    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for out in outs:
        got = torch.load(out)
        for want, have in zip(sent, got):
            assert want.keys() == have.keys()
            assert all(have[k].dtype == want[k].dtype and torch.equal(have[k], want[k]) for k in want)
    group.close()


def test_a_receiver_that_dies_ends_the_senders_wait(tmp_path):
    store = open_store(HOST, 2)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_receiver, args=(store.port, 1, 2, 1000, str(tmp_path / "never.pt")))
    proc.start()
    group = WeightGroup(HOST, store.port, 0, 2, torch.device("cpu"), generation=0, store=store, timeout=30,
                        bucket_bytes=4096)  # fmt: skip
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    start = time.monotonic()
    with pytest.raises(WeightSyncAborted):
        for _ in range(1000):  # the first may still go into the socket's buffer; a later one cannot
            group.send(_state(1))
    assert time.monotonic() - start < 30


def _silent_sender(port: int, world: int, hold: float) -> None:
    store = open_store(HOST, world)
    with open(port, "w") as f:  # port: a file name here, to hand the store's port back
        f.write(str(store.port))
    group = WeightGroup(HOST, store.port, 0, world, torch.device("cpu"), generation=0, store=store, timeout=60)
    time.sleep(hold)  # in the group, never sending
    group.close()


def test_abort_from_another_thread_ends_a_receivers_wait(tmp_path):
    port_file = str(tmp_path / "port")
    proc = mp.get_context("spawn").Process(target=_silent_sender, args=(port_file, 2, 30.0))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(port_file) and open(port_file).read()) and time.monotonic() < deadline:
            time.sleep(0.05)
        group = WeightGroup(HOST, int(open(port_file).read()), 1, 2, torch.device("cpu"), generation=0, timeout=60)
        threading.Timer(0.5, group.abort).start()
        start = time.monotonic()
        with pytest.raises(WeightSyncAborted, match="member 1 of 2: aborted"):
            group.recv()
        assert 0.4 < time.monotonic() - start < 10
        group.close()
    finally:
        proc.kill()
        proc.join()


def test_a_rendezvous_without_peers_times_out_with_a_clear_error():
    store = open_store(HOST, 2, timeout=2)
    start = time.monotonic()
    with pytest.raises(WeightSyncAborted):
        WeightGroup(HOST, store.port, 0, 2, torch.device("cpu"), generation=0, store=store, timeout=2)
    assert time.monotonic() - start < 20


def _two_members(tmp_path, cuda: bool) -> tuple[list[dict[str, torch.Tensor]], object]:
    """Rank 0 here sends two versions to rank 1 in a subprocess; return what was sent and what arrived."""
    store = open_store(HOST, 2)
    out = str(tmp_path / "r1.pt")
    proc = mp.get_context("spawn").Process(target=_receiver, args=(store.port, 1, 2, 2, out, cuda))
    proc.start()
    sent = [_state(1), _state(2)]
    try:
        group = WeightGroup(HOST, store.port, 0, 2, _device(cuda, 0), generation=0, store=store, timeout=60,
                            bucket_bytes=4096)  # fmt: skip
        for state in sent:
            group.send({k: v.to(_device(cuda, 0)) for k, v in state.items()})
    except WeightSyncAborted as e:
        proc.join(60)
        return sent, str(e)
    proc.join(60)
    assert proc.exitcode == 0
    return sent, torch.load(out)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per member: two GPUs")
def test_nccl_members_on_two_gpus_get_every_version_bit_for_bit(tmp_path):
    sent, got = _two_members(tmp_path, cuda=True)
    assert isinstance(got, list), got
    for want, have in zip(sent, got):
        assert all(have[k].dtype == want[k].dtype and torch.equal(have[k], want[k]) for k in want)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="the one-GPU case")
def test_nccl_members_sharing_one_gpu_arrive_intact_or_fail_with_the_hint(tmp_path):
    """NCCL refuses two ranks on one GPU ('Duplicate GPU'): the error must say what to do, never hang."""
    start = time.monotonic()
    sent, got = _two_members(tmp_path, cuda=True)
    assert time.monotonic() - start < 120
    if isinstance(got, str):
        assert "one member per GPU" in got and "--weight-sync object-store" in got, got
    else:
        for want, have in zip(sent, got):
            assert all(torch.equal(have[k], want[k]) for k in want)
