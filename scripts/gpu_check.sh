#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (run from the repo root on a GPU machine).
#
#   bash scripts/gpu_check.sh              # with rlvr and its dependencies installed
#   WHEELS=.whl bash scripts/gpu_check.sh  # a machine with torch and transformers but no index:
#                                          # install the pure-Python wheels in .whl first
#   RAY_TAR=ray_site.tgz                   # and unpack a Ray site folder there (step 4)
#   STEPS="1 4"                            # only these steps (default: all)
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
[ -n "${RAY_TAR:-}" ] && mkdir -p /tmp/rlvr_site && tar xzf "$RAY_TAR" -C /tmp/rlvr_site
STEPS=${STEPS:-1 2 3 4}
step() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version(), 'transformers', transformers.__version__)"

if step 1; then
    echo "== 1. weight sync: gloo and NCCL, 1 GB versions"
    timeout 180 python3 scripts/bench_weight_sync.py --mb 1024 --versions 3 --backends gloo nccl
fi
if step 2; then
    echo "== 2. GPU tests"
    timeout 120 python3 -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_weight_group.py
fi
for mode in sync async; do
    step 3 || break
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

if step 4 && ! python3 -c "import ray"; then
    echo "== 4. skipped: ray does not import"
elif step 4; then
    # 4. the Ray pipeline on CUDA: the generator actor's bundle names a GPU. With one GPU the
    # driver's learner shares it with the actor: the object store route (auto) runs, and the
    # broadcast route must stop at once with NCCL's one-member-per-GPU error, not hang.
    export RAY_AUTH_MODE=disabled
    echo "== 4. train.py --cluster ray on CUDA, weight sync auto"
    time (timeout 180 python3 scripts/train.py --env arithmetic --device cuda --cluster ray --num-generators 1 \
        --max-staleness 1 --max-steps 10 --no-progress --output-dir "$OUT/ray" 2>&1 | grep -v "^ *$" | tail -n 12)
    python3 -c "import json; r=[json.loads(l) for l in open('$OUT/ray/metrics.jsonl')]; print('steps', len(r), 'weights/step ms', round(1e3*sum(x['time/weight_publish']+x['time/weight_receive'] for x in r[2:])/len(r[2:]),1))"
    echo "== 4b. train.py --cluster ray on CUDA, --weight-sync broadcast, one GPU"
    time (timeout 180 python3 scripts/train.py --env arithmetic --device cuda --cluster ray --num-generators 1 \
        --max-staleness 1 --max-steps 10 --no-progress --weight-sync broadcast --output-dir "$OUT/ray_bcast" 2>&1 \
        | grep -E "Error|NCCL allows|weight group|rlvr\]" | cut -c1-400 | tail -n 8)
    pgrep -fa "ray::|raylet|gcs_server" | head -5 || true
    echo "(no Ray process left above: nothing listed)"
fi
