#!/usr/bin/env bash
# The prepared GPU check (about 5 minutes on one H100/H200): the device-parametrised tests on
# CUDA, then one ReFiT epoch on ML-1M and on Zhihu timed on the GPU beside the same work on that
# machine's CPU, written to benchmarks/results/gpu_check.md with the device's name.
#   REFIT_DATA_DIR=../shared/data bash benchmarks/gpu_check.sh
# The project must be installed in the Python that runs it (`pip install .`; on a machine
# without registries, carry its wheels). Without a GPU it is a dry run that says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no GPU found (torch.cuda.is_available() is False): dry run, nothing measured"
  exit 0
fi
"$PY" -m pytest -q tests/test_devices.py
"$PY" benchmarks/gpu_timing.py --batches 5
