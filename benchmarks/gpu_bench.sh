#!/usr/bin/env bash
# The prepared device run of issue 30: on one GPU, an id's seeds 1-3 (ReFiT-ML1M-v0 unless --env
# names another) pretrained on the GPU, then pretrained, ReFiT, DDPO, PPO, A2C, TRPO and
# `continue` (ReFiT's training seconds) for each seed with the id's cuda tables, the peers of its
# scenario beside them (every registered one: pop, itemknn, rp3beta, ease, dlae for CF; pop,
# markov, sasrec for sequential), as many runs at once as --jobs says, stopped cleanly at a
# deadline; then one bench table of what finished and a small archive of the runs' metrics.
#
#   bash benchmarks/gpu_bench.sh [--env ID] [--smoke] [--deadline-seconds S] [--jobs N] [--out DIR]
#
# --env (default ReFiT-ML1M-v0): the id; e.g. ReFiT-ML1MSeq-Concat-v0, the sequential ML-1M
#   bench of issue 29. Its data must be on the device: copy the dataset's folder under a folder
#   of the repository that .git/info/exclude ignores, name that folder in the device's carry,
#   and set REFIT_DATA_DIR to it (../shared does not travel).
# --deadline-seconds (default 540, 9 minutes, from the script's start): runs still going then
#   get SIGINT (a killed run keeps its resumable state; rerunning the script with the same --out
#   resumes them), and SIGKILL $GPU_BENCH_KILL_AFTER seconds later (default 30) if the SIGINT
#   is lost (e.g. a KeyboardInterrupt that Python drops inside a finaliser); the table holds
#   the algorithms that finished on every seed. The ReFiT
#   runs' FLOP count and its floor time at the GPU's peak rate are printed beside their
#   measured training seconds (benchmarks/flop_floor.py, OUT/flop_floor.md).
# --jobs (default 4): runs at once (four pipelines shared one H200 well, gpu_runs_*_H200.md).
# --out (default runs/gpu-bench/<env>, with --smoke runs/gpu-bench-smoke/<the id it smokes>):
#   bench's folder; results.md (and flop_floor.md, and a sequential id's chain_influence.md)
#   are also copied to benchmarks/results/gpu_bench_<env>[_flop_floor|_chain_influence].md
#   (not in --smoke), metrics.tar.gz is the archive.
# --smoke: the same script end to end on the CPU on the embedded data of --env's scenario
#   (ReFiT-Synthetic-v0, or ReFiT-SeqSynthetic-Concat-v0 for a sequential id), two seeds, tiny
#   sizes (a few minutes on 2 cores; tests/test_gpu_bench.py runs both), nothing installed.
#
# Install: with the project importable in $PYTHON (default python3) nothing is installed; else,
# on a machine without registries, carry wheels of gymnasium, stable-baselines3, sb3-contrib and
# farama-notifications in $WHEELS and the script runs, as benchmarks/gpu_check.sh documents,
#   pip install --no-index --no-deps --no-build-isolation $WHEELS/*.whl
#   pip install --no-index --no-deps --no-build-isolation -e .
# (editable: from the repository root a plain install is shadowed by the source folder).
set -uo pipefail
cd "$(dirname "$0")/.."
# A project installed from a wheel (as CI's .venv) would be shadowed here by the source folder,
# which lacks refit_gym.envs and refit_gym.agents: Python (3.11+) leaves the working directory
# off sys.path.
export PYTHONSAFEPATH=1
PY=${PYTHON:-python3}
SMOKE=0 DEADLINE=540 JOBS=4 OUT="" ENV=ReFiT-ML1M-v0
while [ $# -gt 0 ]; do
  case "$1" in
    --env) ENV=$2; shift ;;
    --smoke) SMOKE=1 ;;
    --deadline-seconds) DEADLINE=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "gpu_bench: unknown option $1; use --env ID, --smoke, --deadline-seconds S," \
         "--jobs N, --out DIR" >&2; exit 2 ;;
  esac
  shift
done
for value in "$DEADLINE" "$JOBS"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_bench: --deadline-seconds and --jobs take a positive integer, got $value" >&2
    exit 2
  fi
done

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_bench: $PY cannot import torch; use a Python that has torch (PYTHON=...)" >&2
  exit 1
fi
if ! "$PY" -c "import refit_gym, stable_baselines3, sb3_contrib" 2>/dev/null; then
  if [ "$SMOKE" = 1 ] || [ -z "${WHEELS:-}" ]; then
    echo "gpu_bench: the project is not importable in $PY; install it (pip install -e .) or" \
         "set WHEELS to a folder of carried wheels" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$WHEELS"/*.whl &&
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi

# The id's scenario (an unknown id fails here, before any work) and every peer registered for it.
SCENARIO=$("$PY" -c "import sys
from refit_gym.specs import SpecError, load_env_spec
from refit_gym.training.peers import PEERS
try:
    sequential = load_env_spec(sys.argv[1]).sequential
except SpecError as error:
    sys.exit(f'gpu_bench: --env: {error}')
print(int(sequential), ','.join(sorted(name for name, seq in PEERS if seq == sequential)))" "$ENV") ||
  exit 2
read -r SEQUENTIAL PEERS <<< "$SCENARIO"
if ! [[ "$SEQUENTIAL" =~ ^[01]$ && "$PEERS" =~ ^[a-z0-9,]+$ ]]; then
  echo "gpu_bench: could not read --env $ENV's scenario (got: $SCENARIO)" >&2
  exit 1
fi
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu SEEDS="1 2"
  # Tiny runs: one epoch each, a few users (ALGO.KEY=VALUE, as bench --set takes them).
  declare -A SETS=(
    [refit]="refit.epochs=1 refit.users_per_epoch=64"
    [ddpo]="ddpo.epochs=1 ddpo.users_per_epoch=32 ddpo.update_epochs=2 ddpo.minibatches=2"
    [ppo]="ppo.epochs=1 ppo.n_envs=8 ppo.users_per_epoch=5 ppo.batch_size=40"
    [a2c]="a2c.epochs=1 a2c.n_envs=8 a2c.users_per_epoch=5"
    [trpo]="trpo.epochs=1 trpo.n_envs=8 trpo.users_per_epoch=5 trpo.batch_size=40"
  )
  if [ "$SEQUENTIAL" = 1 ]; then
    # ADRec's first two stages take 7 epochs here; selection needs one of the last. TRPO
    # differentiates the Transformer twice per conjugate-gradient step: one update, 3 steps.
    ENV=ReFiT-SeqSynthetic-Concat-v0 PRETRAIN=(--pretrain-max-epochs 8)
    SETS[trpo]="trpo.epochs=1 trpo.n_envs=8 trpo.users_per_epoch=1 trpo.batch_size=256
                trpo.cg_max_steps=3"
  else
    ENV=ReFiT-Synthetic-v0 PEERS="pop,itemknn" PRETRAIN=(--pretrain-max-epochs 3)
  fi
else
  DEVICE=cuda SEEDS="1 2 3"
  PRETRAIN=()
  declare -A SETS=()  # the id's cuda tables as they are
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: no GPU found (torch.cuda.is_available() is False); --smoke runs the" \
         "script on a CPU" >&2
    exit 1
  fi
fi
# A smoke's tiny cells would be reused by a real run of the same id: they get their own folder.
[ "$SMOKE" = 1 ] && OUT=${OUT:-runs/gpu-bench-smoke/$ENV}
OUT=${OUT:-runs/gpu-bench/$ENV}
AGENTS="refit,continue ddpo ppo a2c trpo"
# A sequential chain that decides: its stop chosen on validation is the no-training row to beat.
[ "$SEQUENTIAL" = 1 ] && AGENTS="stop $AGENTS"
KILL_AFTER=${GPU_BENCH_KILL_AFTER:-30}
mkdir -p "$OUT"
STARTED=$SECONDS

# BENCH: the bench command over seeds $1 and algorithms $2, with the --set values of those
# algorithms.
bench_command() {
  local algo item
  BENCH=("$PY" -c "import sys; from refit_gym.cli import main; sys.exit(main())" bench
         --env "$ENV" --device "$DEVICE" --seeds "$1" --algos "$2" --out "$OUT" "${PRETRAIN[@]}")
  for algo in ${2//,/ }; do
    for item in ${SETS[$algo]:-}; do BENCH+=(--set "$item"); done
  done
  BENCH+=(--quiet)
}

# One bench over seeds $1 and algorithms $2, given what is left of the deadline, then SIGINT
# ($KILL_AFTER s later SIGKILL).
run() {
  local seeds=$1 algos=$2 left=$(( DEADLINE - (SECONDS - STARTED) ))
  if [ "$left" -le 0 ]; then
    echo "gpu_bench: deadline reached, not starting $algos for seeds $seeds"
    return 0
  fi
  local started=$SECONDS BENCH
  bench_command "$seeds" "$algos"
  timeout -s INT -k "$KILL_AFTER" "$left" "${BENCH[@]}" \
    > "$OUT/log-${seeds//,/_}-${algos//,/_}.txt" 2>&1
  local rc=$?
  echo "gpu_bench: seeds $seeds $algos: exit $rc after $(( SECONDS - started )) s"
}

# 1. The backbones, one per seed, side by side; a sequential id's chain influence on each
#    (benchmarks/chain_influence.py: does the chain's randomness move the reward?), before the
#    agents.
for seed in $SEEDS; do run "$seed" pretrained & done
wait
left=$(( DEADLINE - (SECONDS - STARTED) ))
if [ "$SEQUENTIAL" = 1 ] && [ "$left" -gt 0 ]; then  # again on a resumed run: seconds
  backbones=()
  for seed in $SEEDS; do  # finished pretrainings only (a stopped one keeps its best so far)
    [ -f "$OUT/seed$seed/pretrain/metrics.json" ] &&
      backbones+=(--run "$ENV=$OUT/seed$seed/pretrain/denoiser.pt")
  done
  # The script imports its folder's common.py, which PYTHONSAFEPATH would hide.
  [ ${#backbones[@]} -gt 0 ] && { timeout -s INT -k "$KILL_AFTER" "$left" \
    env -u PYTHONSAFEPATH "$PY" benchmarks/chain_influence.py "${backbones[@]}" --folder "$OUT" \
    > "$OUT/log-chain-influence.txt" 2>&1 ||
    echo "gpu_bench: the chain influence failed; see $OUT/log-chain-influence.txt" >&2; }
fi
# 2. Every (seed, algorithm group) as a job, at most $JOBS at once; `continue` runs after its
#    seed's ReFiT in the same job (it gets ReFiT's training seconds).
QUEUE=()
for group in $AGENTS "$PEERS"; do
  for seed in $SEEDS; do QUEUE+=("$seed $group"); done
done
for job in "${QUEUE[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  # shellcheck disable=SC2086  # "seed algos"
  run $job &
done
wait

# 3. One table of what finished on every seed (the cells are reused, nothing is recomputed).
done_seeds=() done_algos=()
for seed in $SEEDS; do
  [ -f "$OUT/seed$seed/pretrain/metrics.json" ] && done_seeds+=("$seed")
done
if [ ${#done_seeds[@]} -eq 0 ]; then
  echo "gpu_bench: no backbone finished before the deadline (or every pretraining failed:" \
       "$OUT/log-*-pretrained.txt say why); nothing to tabulate" >&2
  exit 1
fi
for algo in ${AGENTS//,/ } ${PEERS//,/ }; do
  finished=1
  for seed in "${done_seeds[@]}"; do
    [ -f "$OUT/seed$seed/$algo/metrics.json" ] || finished=0
  done
  [ "$finished" = 1 ] && done_algos+=("$algo")
done
# continue is tabulated beside the ReFiT runs whose seconds it got.
if [[ " ${done_algos[*]} " == *" continue "* && " ${done_algos[*]} " != *" refit "* ]]; then
  done_algos=("${done_algos[@]/continue}")
fi
table=$(IFS=,; echo "pretrained,${done_algos[*]}" | tr -s , | sed 's/,$//')
seeds=$(IFS=,; echo "${done_seeds[*]}")
bench_command "$seeds" "$table"
"${BENCH[@]}" > "$OUT/log-table.txt" 2>&1 || {
  echo "gpu_bench: the table failed; see $OUT/log-table.txt" >&2
  exit 1
}
# 4. The ReFiT runs' FLOP floor at the device's peak rate beside their training seconds
#    (benchmarks/flop_floor.py; printed and in flop_floor.md). A failure here costs no table.
if [[ ",$table," == *",refit,"* ]]; then
  "$PY" benchmarks/flop_floor.py "$OUT" 2> "$OUT/log-flop-floor.txt" ||
    echo "gpu_bench: the FLOP floor failed; see $OUT/log-flop-floor.txt" >&2
fi
# 5. The archive: every cell's metrics.json and the tables, a few MiB at most.
(cd "$OUT" && find . -name metrics.json -o -name 'results.*' -o -name 'log-*.txt' \
  -o -name flop_floor.md -o -name chain_influence.md | tar -czf metrics.tar.gz -T -)
if [ "$SMOKE" = 0 ]; then
  cp "$OUT/results.md" "benchmarks/results/gpu_bench_$ENV.md"
  for report in flop_floor chain_influence; do
    [ -f "$OUT/$report.md" ] && cp "$OUT/$report.md" "benchmarks/results/gpu_bench_${ENV}_$report.md"
  done
fi
echo "gpu_bench: $ENV seeds $seeds, $table in $OUT/results.md ($(( SECONDS - STARTED )) s);" \
     "archive $OUT/metrics.tar.gz ($(du -k "$OUT/metrics.tar.gz" | cut -f1) KiB)"
