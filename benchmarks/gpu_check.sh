#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine: the overhead
# benchmark (benchmarks/overhead/, MLP with its K x Phi grid), the Table 4
# analog (benchmarks/table4.py) and, when the
# Fashion-MNIST IDX files are at hand, the Fashion-MNIST example. Writes
# $OUT/overhead_gpu.md, $OUT/fashion_mnist.md and .png, and the logs. Run
# from the repository root:
#
#   FMNIST_DIR=.gpudata/fashion-mnist bash benchmarks/gpu_check.sh
#
# (~3 minutes for the benchmark and ~3 for Fashion-MNIST on one H200, the
# machine start aside). Copy the four *-ubyte.gz files of the Debian package
# dataset-fashion-mnist into an ignored folder of the checkout (30 MB) and
# carry it; without FMNIST_DIR only the benchmark runs. Each model's section
# of the benchmark is written as soon as it is done, so a run cut short by the
# time limit keeps what finished before it.
#
# JAX with CUDA. The lent H200 machines' image already holds jax, jaxlib,
# jax-cuda13-plugin, jax-cuda13-pjrt, optax and chex (KINDS.md, read
# 2026-11: jax 0.11.2), and this script uses them when they see a GPU.
# hidlr_optax itself comes from this checkout (PYTHONPATH), nothing to install.
# Only if that JAX is missing or sees no GPU, carry wheels in .whl/ (repo
# root, ignored by git: `echo /.whl/ >> .git/info/exclude`), fetched on a
# machine with internet by
#
#   python3 -m pip download --only-binary=:all: --python-version 3.12 \
#     --implementation cp --abi cp312 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl 'jax[cuda12]==0.10.2' 'optax==0.2.8' 'chex==0.1.91'
#
# (that resolves jax, jaxlib, jax-cuda12-plugin, jax-cuda12-pjrt and the
# nvidia-*-cu12 wheels: cublas, cuda-cupti, cuda-nvcc, cuda-runtime, cudnn,
# cufft, cusolver, cusparse, nccl, nvjitlink, nvshmem). Mind the device
# tool's 64 MiB limit on what travels: jaxlib and the nvidia wheels are far
# larger, so in this workplace the image's JAX is the way; the wheels are for
# machines without one. This script installs whatever is in .whl/ into
# /tmp/site and puts it first on PYTHONPATH.
set -euo pipefail
OUT="${OUT:-/tmp/overhead_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
# Child processes measure device peaks; the parent must not take 75% upfront.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv || true
"$PY" - <<'EOF'
import jax, optax
print("jax", jax.__version__, "optax", optax.__version__, jax.devices())
assert jax.default_backend() == "gpu", "JAX sees no GPU"
EOF
set -o pipefail
if [[ -n "${FMNIST_DIR:-}" ]]; then
  timeout 270 "$PY" examples/fashion_mnist.py --data-dir "$FMNIST_DIR" --out "$OUT" \
    2>&1 | tee "$OUT/fashion_mnist.log" || echo "fashion_mnist.py failed ($?)"
fi
timeout 300 "$PY" -m benchmarks.overhead --device-peaks mlp --models mlp --grid-models mlp --compile-reps 3 \
  --out "$OUT/overhead_gpu.md" 2>&1 | tee "$OUT/overhead_gpu.log"
# The analog of the paper's Table 4 (probe and secant, K = 2, Phi 1-8) on a
# transformer with millisecond steps.
timeout 240 "$PY" -m benchmarks.table4 --out "$OUT/table4_gpu.md" 2>&1 | tee "$OUT/table4_gpu.log"
