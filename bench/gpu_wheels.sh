#!/usr/bin/env bash
# The wheels a lent GPU machine lacks (it has torch, no registry: see /work/.library/device),
# into .whl/ (git-ignored), for `run(carry=[".whl"])`. About 4.5 MB. Then on the GPU:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    torchao==0.18.0 omegaconf==2.4.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20"
ls -la .whl
