"""Write a merged full model from a LoRA checkpoint (``train.py --lora-rank R``): W + (alpha / r) B A.

    python scripts/merge_lora.py runs/x/checkpoints/step_000100 runs/x/merged
    python scripts/evaluate.py --env arithmetic --model runs/x/merged --generator vllm

A LoRA run's checkpoints hold the adapters in peft's own format (``adapter_config.json``,
``adapter_model.safetensors``): they load as they are with ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` or ``AutoModelForCausalLM.from_pretrained(folder)``, and in
``evaluate.py --model FOLDER`` with the transformers generator. A merged model is for what
takes only plain weights: vLLM, export, another fine-tune. It is a script rather than a
training flag because merging needs a full copy of the model in memory and on disk, which a
run should not pay at its end unless asked, and because any checkpoint can be merged
afterwards (the final one or an earlier, better one). The tokenizer is copied along, so OUT
is a complete ``--model``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="merge a LoRA checkpoint's adapters into its base model")
    p.add_argument("checkpoint", type=Path, help="a LoRA run's checkpoint folder (holds adapter_config.json)")
    p.add_argument("output", type=Path, help="folder to write the merged model and tokenizer to")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.checkpoint / "adapter_config.json").is_file():
        print(f"merge_lora: {args.checkpoint} holds no adapter_config.json: not a LoRA checkpoint", file=sys.stderr)
        return 2
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(args.checkpoint), dtype=getattr(torch, args.dtype))
    merged = model.merge_and_unload()
    args.output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(str(args.checkpoint)).save_pretrained(args.output)
    print(f"merged {args.checkpoint} into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
