#!/usr/bin/env bash
# Create .venv with moekit (editable) and what its demo and tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# The exact torch of these machines (a CPU build); the package itself declares a range.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# NeMo AutoModel's state-dict adapters are the reference of the nemo layout tests. The
# package pins transformers 5.18 and GPU libraries its adapters never import, so it is
# installed without its dependencies: the adapters need torch, transformers and pydantic
# (which transformers brings).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "nemo_automodel==0.7.0"
# torchtitan 0.3's own Qwen3 MoE model is the reference of the torchtitan layout tests.
# Its declared dependencies serve its trainer (datasets, tokenizers, tensorboard, ...), so
# it is installed without them; its model modules import tyro (the test extra),
# spmd_types, and triton (its expert-parallel kernels module, imported by models/common/moe.py
# even on the CPU), which have no dependencies of their own.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "torchtitan==0.3.0" \
    "spmd_types==0.3.1" "triton==3.9.0"
