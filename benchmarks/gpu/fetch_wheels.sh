#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the pure-Python packages that tests/test_gpu.py and the GPU run of
# benchmarks/dp_overhead.py need beyond a CUDA PyTorch image (which brings torch, tokenizers, safetensors,
# accelerate, huggingface-hub, numpy, scipy, pyarrow, pandas, pytest). Versions are fedtune's pins; the
# wheels are for CPython $PYTHON_VERSION (default 3.12, the GPU image's). Run where the package index is reachable.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --dest .whl \
    transformers==5.24.0 peft==0.21.2 opacus==1.6.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
