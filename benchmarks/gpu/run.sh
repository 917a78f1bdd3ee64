#!/usr/bin/env bash
# GPU checks in one go, on a machine with a CUDA GPU and a CUDA PyTorch but none of fedtune's other
# dependencies (fetch those first: benchmarks/gpu/fetch_wheels.sh). From the repository root:
#     OUT=/tmp/gpu bash benchmarks/gpu/run.sh
# 1. tests/test_gpu.py: training, evaluation and DP-SGD on the GPU against the CPU, bit-for-bit repeats;
# 2. benchmarks/dp_overhead.py on a random 1.1B Llama (bf16, LoRA r=16 on all linear layers, 512 tokens,
#    batch 8 and 32): step time with each DP engine over the step without DP.
# Everything it writes goes to $OUT (default benchmarks/results). DEVICE (default cuda), PYTHON and
# MODELS (default llama1b) change what runs, e.g. for a rehearsal on a CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results} PYTHON=${PYTHON:-python3} DEVICE=${DEVICE:-cuda} MODELS=${MODELS:-llama1b}
mkdir -p "$OUT"
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedtune-site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/fedtune-site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, transformers, peft, opacus; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'opacus', opacus.__version__)" | tee -a "$OUT/gpu.txt"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
"$PYTHON" benchmarks/dp_overhead.py --device "$DEVICE" --precision bf16 --models $MODELS --modes flat hooks ghost \
    --out "$OUT/dp_overhead_gpu.json" 2>&1 | tee "$OUT/dp_overhead_gpu.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
