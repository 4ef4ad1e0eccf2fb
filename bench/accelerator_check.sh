#!/usr/bin/env bash
# The device check: what the accelerator path does on one GPU (or TPU host), in under 8 minutes.
#
#   RESEARCH_DATA_DIR=../shared/data bash bench/accelerator_check.sh
#
# Prints the environment, then for the `small` scale (GPT-2 small shape, WikiText-2 with GPT-2
# BPE, bf16 compute): the time to build the model and compile the training step, step time,
# tokens/s, MFU and peak memory of baseline:scale=small and of moda:scale=small with its Pallas
# kernel; then what `research plan` says of the same config on one 8-GPU node. Needs the
# package's dependencies (grain and ml_collections included) and the corpora directory.
# Targets on one H100/H200 (issue "Accelerator path"): build under 30 s, baseline MFU >= 40%.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${RESEARCH_DATA_DIR:?set RESEARCH_DATA_DIR to the corpora directory (WikiText-2, GPT-2 BPE files)}"
export RESEARCH_DATA_DIR
STEPS=${STEPS:-20}

echo "== environment"
python - <<'PY'
import importlib.metadata as md, platform, jax
versions = {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")}
d = jax.devices()[0]
print(f"python {platform.python_version()}; " + "; ".join(f"{k} {v}" for k, v in versions.items()))
print(f"{jax.device_count()} x {d.device_kind} ({jax.default_backend()})")
PY
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== build and compile (baseline small, 12 layers)"
timeout 300 python bench/startup.py --spec baseline:scale=small --layers 12

echo "== training step: baseline small"
timeout 300 python bench/train_throughput.py --spec baseline:scale=small --steps "$STEPS" \
  --warmup 3 --repeats 2

echo "== training step: moda small, Pallas kernel"
timeout 300 python bench/train_throughput.py --spec moda:scale=small --steps "$STEPS" \
  --warmup 3 --repeats 2 --set model.attention.impl=auto

echo "== plan of baseline small on one node"
timeout 120 research plan baseline:scale=small --cluster h100x8 --cluster h200x8 --no_lower
