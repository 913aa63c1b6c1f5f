#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (run from the repo root on a GPU machine).
#
#   bash scripts/gpu_check.sh              # with rlvr and its dependencies installed
#   WHEELS=.whl bash scripts/gpu_check.sh  # a machine with torch and transformers but no index:
#                                          # install the pure-Python wheels in .whl first
#
# 1. the weight group over NCCL and gloo side by side (scripts/bench_weight_sync.py);
# 2. the GPU tests (pytest -m gpu): NCCL members bit for bit, or a clear error where two
#    members share one GPU;
# 3. the synchronous loop and the asynchronous pipeline on CUDA, a few steps each.
# Nothing here needs Ray, DeepSpeed or vLLM; each step has its own time limit.
set -uo pipefail
OUT=${OUT:-/tmp/rlvr_gpu_check}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/rlvr_site "$WHEELS"/*.whl
    # The source folders map to rlvr.* (pyproject's package-dir): a shim folder of links does the same.
    mkdir -p /tmp/rlvr_shim/rlvr
    for d in verifiers envs trainer datasets; do ln -sfn "$PWD/$d" /tmp/rlvr_shim/rlvr/$d; done
    export PYTHONPATH=/tmp/rlvr_shim:/tmp/rlvr_site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version(), 'transformers', transformers.__version__)"

echo "== 1. weight sync: gloo and NCCL, 1 GB versions"
timeout 180 python3 scripts/bench_weight_sync.py --mb 1024 --versions 3 --backends gloo nccl
echo "== 2. GPU tests"
timeout 120 python3 -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_weight_group.py
for mode in sync async; do
    echo "== 3. train.py on CUDA, $mode"
    extra=(); [ "$mode" = async ] && extra=(--max-staleness 1)
    time (timeout 120 python3 scripts/train.py --env arithmetic --device cuda --max-steps 20 --no-progress \
        --output-dir "$OUT/$mode" "${extra[@]}" 2>&1 | tail -n 15)
    python3 - "$OUT/$mode/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[:5], rows[-5:]
mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
print(f"steps {len(rows)}; reward_mean first 5 {mean(first, 'reward_mean'):.3f}, last 5 {mean(last, 'reward_mean'):.3f}; "
      f"time/step last 5 {mean(last, 'time/step'):.3f} s")
EOF
done
