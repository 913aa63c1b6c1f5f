"""One rank of tests/test_deepspeed_learner.py's two-process run (not collected: no test_ prefix).

    torchrun --nproc_per_node 2 tests/ds_rank_worker.py --batches B.pt --out DIR --stages 0,2,3
    deepspeed --num_accelerators 2 tests/ds_rank_worker.py ...   # the same, DeepSpeed's launcher on a CPU
    ... --beta 0.04 --lora '{"rank": 4, "alpha": 16, "targets": ["q_proj"], "seed": 7}'   # LoRA, its reference

Rank 0 loads the batches the test sampled and scatters each one (``scatter_batch``);
every rank steps a DeepSpeedLearner on its shard, once per ZeRO stage (one launch: a
process start and DeepSpeed's setup cost seconds on two cores). Rank 0 writes
``DIR/metrics.json`` ({stage: [metrics of each step]}) and ``DIR/weights_<stage>.pt``
(``weights_for_generation`` after the last step; every rank calls it, as ZeRO-3 needs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlvr.trainer.algorithm.losses import make_loss_fn
from rlvr.trainer.engines import distributed, lora
from rlvr.trainer.engines.deepspeed_learner import DeepSpeedLearner
from rlvr.trainer.engines.models import TEST_SIZE, build_tiny_model, build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="0,2,3")
    parser.add_argument("--kwargs", default="{}", help="learner keywords as JSON")
    parser.add_argument("--beta", type=float, default=0.0, help="KL to the reference (LoRA: adapters off)")
    parser.add_argument("--lora", help="LoRA settings as JSON: rank, alpha, targets, seed (of the adapters' A)")
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher; unused (LOCAL_RANK too)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on two cores
    rank, world = distributed.init_distributed(torch.device("cpu"))
    assert world == 2, f"expected two ranks, got {world}"
    batches = torch.load(args.batches, weights_only=False) if rank == 0 else None
    count = distributed.broadcast_object(len(batches) if batches is not None else None)
    tokenizer = build_tokenizer()
    out = Path(args.out)
    metrics: dict[str, list[dict[str, float]]] = {}
    for stage in (int(s) for s in args.stages.split(",")):
        model = build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__)
        ref_model = None
        if args.lora:
            settings = json.loads(args.lora)
            torch.manual_seed(settings["seed"])
            lora.apply_lora(model, lora.LoraSettings(settings["rank"], settings["alpha"], 0.0, settings["targets"]))
            ref_model = lora.AdaptersOff(model) if args.beta > 0 else None
        learner = DeepSpeedLearner(
            model, make_loss_fn(beta=args.beta), ref_model=ref_model, zero_stage=stage, **json.loads(args.kwargs)
        )
        steps = []
        for i in range(count):
            shard = distributed.scatter_batch(batches[i] if batches is not None else None)
            steps.append(learner.step(shard))
        weights = learner.weights_for_generation()
        if rank == 0:
            metrics[str(stage)] = steps
            torch.save({k: v.detach().cpu().clone() for k, v in weights.items()}, out / f"weights_{stage}.pt")
        else:
            assert weights == {}, "only rank 0 keeps the weights"
        distributed.barrier()
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
