#!/usr/bin/env bash
# The prepared GPU check (70 s on one H100, the study below aside): the device-parametrised
# tests on CUDA, then one ReFiT epoch on ML-1M and on Zhihu timed on the GPU beside the same work
# on that machine's CPU, written to benchmarks/results/gpu_check.md with the device's name.
#   REFIT_DATA_DIR=../shared/data bash benchmarks/gpu_check.sh
# With CF_STUDY_CHECKPOINTS="s1.pt s2.pt s3.pt" (`refit-gym pretrain --env ReFiT-ML1M-v0 --seed
# S` on a CPU, S = 1, 2, 3) it then runs benchmarks/cf_batch_study.py until CF_STUDY_SECONDS
# (default 600) after this script started, adding the runs its committed records lack, and
# rewrites its report.
# The project must be installed editable in the Python that runs it (`pip install -e .`: from
# the repository root a plain install is shadowed by the source folder, which has no
# refit_gym.envs); on a machine without registries carry the wheels of gymnasium,
# stable-baselines3, sb3-contrib and farama-notifications, and install with --no-index
# --no-deps --no-build-isolation. Without a GPU it is a dry run that says so.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch"; then
  echo "gpu_check: $PY cannot import torch; install the project into it first" >&2
  exit 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no GPU found (torch.cuda.is_available() is False): dry run, nothing measured"
  exit 0
fi
failed=0
# A failing test must not cost the timings: the lease is short, so each part runs regardless.
"$PY" -m pytest -q tests/test_devices.py || failed=1
"$PY" benchmarks/gpu_timing.py --batches 5 || failed=1
if [ -n "${CF_STUDY_CHECKPOINTS:-}" ]; then
  # shellcheck disable=SC2086  # a list of paths
  "$PY" benchmarks/cf_batch_study.py --device cuda --checkpoints $CF_STUDY_CHECKPOINTS \
    --work "${CF_STUDY_WORK:-/tmp/cf-batch-study}" \
    --records "${CF_STUDY_RECORDS:-benchmarks/results/cf_batch_study_ReFiT-ML1M-v0.jsonl}" \
    --deadline-seconds $(( ${CF_STUDY_SECONDS:-600} - SECONDS )) || failed=1
fi
exit $failed
