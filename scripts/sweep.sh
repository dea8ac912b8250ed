#!/usr/bin/env bash
# Reproduce Table 1 and the ablations of "Large Memory Layers with Product Keys" (Lample et al.,
# 2019): train every experiment of a group, evaluate it on the test split, then write the group's
# table and plots with the paper's numbers beside ours (scripts/make_table.py).
#
#   scripts/sweep.sh GROUP [--scale paper|small|tiny|cpu] [--gpus N] [--data DIR] [--runs DIR]
#                          [--out DIR] [--dry-run] [-- OVERRIDE ...]
#
#   GROUP     table1 | memsize | bn | position | heads | keys | headline   (the lists are below)
#   --scale   paper (default): the paper's settings, meant for 8-32 GPUs;
#             small: one GPU, a whole group in about an hour of an H100;
#             tiny: 2 CPU cores, a whole group in minutes (proves the machinery, not the findings);
#             cpu: the headline group only, ~2 hours on 2 CPU cores.
#             Each experiment NAME runs as +experiment=NAME (paper) or +experiment=SCALE/NAME;
#             configs/scale/SCALE.yaml says what the scale changes.
#   --gpus N  processes per run; N > 1 launches the trainer under torchrun (DDP).
#   --data    preprocessed dataset (default: the scale's data.dir; tiny and cpu make theirs).
#   --runs    where run directories go (default runs/SCALE); --out: results (default results/SCALE).
#   --dry-run print every command instead of running it.
#   -- ...    extra Hydra overrides for every training run, e.g. -- train.max_steps=10
#
# Rerunning is safe: the trainer resumes an unfinished run and does nothing for a finished one,
# and a run whose last training step already has a test evaluation is not evaluated again.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- The groups: experiment names of configs/experiment/ ------------------------------------
# Table 1: layers x memories at dim 1024 ("base") and 1600 ("wide"), memories spread evenly.
TABLE1=(12L_0mem 12L_1mem 12L_2mem 12L_3mem 16L_0mem 16L_1mem 16L_2mem 24L_0mem 24L_1mem
        12L_0mem_1600d 12L_1mem_1600d 16L_0mem_1600d 16L_1mem_1600d 24L_0mem_1600d)
# Ablations: the 6-layer model of configs/experiment/ablation.yaml, one thing changed at a time.
MEMSIZE=(memsize_16k memsize_65k memsize_262k memsize_1M)
BN=(bn_on_16k bn_off_16k bn_on_65k bn_off_65k bn_on_1M bn_off_1M)
POSITION=(position_1 position_2 position_3 position_4 position_5 position_6)
HEADS=(heads_1x64 heads_2x32 heads_4x16 heads_8x8 heads_4x32 heads_8x32 heads_4x64)
KEYS=(keys_product_16k keys_product_65k keys_product_262k keys_flat_16k keys_flat_65k keys_flat_262k)
# The headline finding trained long enough on a CPU to mean something (--scale cpu only):
# L layers + 1 memory vs 2L layers vs L layers, the same tokens each.
HEADLINE=(headline_2L headline_2L_1mem headline_4L)

usage() { sed -n '6,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# ---- Arguments ------------------------------------------------------------------------------
[[ $# -ge 1 ]] || usage
GROUP=$1; shift
case $GROUP in
  table1) EXPERIMENTS=("${TABLE1[@]}") ;;
  memsize) EXPERIMENTS=("${MEMSIZE[@]}") ;;
  bn) EXPERIMENTS=("${BN[@]}") ;;
  position) EXPERIMENTS=("${POSITION[@]}") ;;
  heads) EXPERIMENTS=("${HEADS[@]}") ;;
  keys) EXPERIMENTS=("${KEYS[@]}") ;;
  headline) EXPERIMENTS=("${HEADLINE[@]}") ;;
  *) echo "sweep.sh: GROUP=$GROUP is not a group; choose one of table1 memsize bn position heads keys headline" >&2
     exit 2 ;;
esac
SCALE=paper GPUS=1 DATA="" RUNS="" OUT="" DRY_RUN=0 OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --scale) SCALE=${2:?--scale needs a value}; shift 2 ;;
    --gpus) GPUS=${2:?--gpus needs a value}; shift 2 ;;
    --data) DATA=${2:?--data needs a value}; shift 2 ;;
    --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "sweep.sh: unknown argument $1" >&2; usage ;;
  esac
done
case $SCALE in
  paper) PREFIX="" ;;
  small|tiny|cpu) PREFIX="$SCALE/" ;;
  *) echo "sweep.sh: --scale=$SCALE is not a scale; choose one of paper small tiny cpu" >&2; exit 2 ;;
esac
if [[ $GROUP == headline && $SCALE != cpu ]] || [[ $GROUP != headline && $SCALE == cpu ]]; then
  echo "sweep.sh: the headline group runs at --scale cpu only, and --scale cpu runs only it" >&2
  exit 2
fi
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || { echo "sweep.sh: --gpus=$GPUS must be a positive integer" >&2; exit 2; }
RUNS=${RUNS:-runs/$SCALE}
OUT=${OUT:-results/$SCALE}
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
# Tiny models gain nothing from intra-op threads, and on a busy machine spin-waiting OpenMP
# threads made them 2-3x slower (measured on 2 shared cores): one thread per run.
if [[ $SCALE == tiny ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
if [[ $GPUS -gt 1 ]]; then
  TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m pkm_lm.train)
else
  TRAIN=("$PY" -m pkm_lm.train)
fi

# Print a command; run it unless --dry-run.
run() {
  printf '%q ' "$@"; echo
  [[ $DRY_RUN == 1 ]] || "$@"
}

# True when the run's metrics.jsonl has a test evaluation at its last training step.
has_test_eval() {
  [[ -f $1/metrics.jsonl ]] || return 1
  "$PY" - "$1" <<'EOF'
import sys
from pkm_lm.metrics import read_metrics
records = read_metrics(sys.argv[1])
last_step = max((r["step"] for r in records if r["kind"] == "train"), default=None)
tested = {r["step"] for r in records if r["kind"] == "eval" and r["split"] == "test"}
sys.exit(0 if last_step is not None and last_step in tested else 1)
EOF
}

# ---- Data -----------------------------------------------------------------------------------
# The CPU scales make their data from the books corpus of `make data`. cpu: the whole corpus
# with the preprocessing defaults (8,000 BPE codes). tiny: a slice of each split and 2,000 codes,
# so that a 24-layer model evaluates the whole split in seconds.
prepare_books_data() {
  [[ -f data/raw/books/train.txt ]] || run "$PY" -m pkm_lm.data.corpus books
  run "$PY" -m pkm_lm.preprocess raw_dir=data/raw/books out_dir=data/bin/books
}
TINY_RAW=data/raw/tiny TINY_BIN=data/bin/tiny
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
  run "$PY" -m pkm_lm.preprocess raw_dir="$TINY_RAW" out_dir="$TINY_BIN" bpe.n_codes=2000
}

if [[ -z $DATA ]]; then
  # The scale's own default (configs/scale/SCALE.yaml), read back here only to check it exists.
  DATA=$(sed -n 's/^  dir: *\([^ #]*\).*/\1/p' "configs/scale/$SCALE.yaml")
  if [[ $SCALE == tiny && ! -f $DATA/dataset.json ]]; then prepare_tiny_data; fi
  if [[ $SCALE == cpu && ! -f $DATA/dataset.json ]]; then prepare_books_data; fi
fi
if [[ $DRY_RUN == 0 && ! -f $DATA/dataset.json ]]; then
  echo "sweep.sh: no dataset at $DATA (no dataset.json). Prepare one with" >&2
  echo "  python -m pkm_lm.preprocess raw_dir=RAW_DIR out_dir=$DATA bpe.n_codes=60000" >&2
  echo "(RAW_DIR holding train.txt, valid.txt, test.txt; see docs/data.md), or pass --data DIR." >&2
  exit 1
fi

# ---- Train and evaluate every experiment of the group ----------------------------------------
for name in "${EXPERIMENTS[@]}"; do
  dir=$RUNS/$name
  echo "== $GROUP/$name ($SCALE scale) -> $dir"
  run "${TRAIN[@]}" "+experiment=$PREFIX$name" "run_dir=$dir" "data.dir=$DATA" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
  if [[ $DRY_RUN == 1 ]] || ! has_test_eval "$dir"; then
    run "$PY" -m pkm_lm.evaluate "run_dir=$dir" split=test
  fi
done

# ---- Tables and plots -----------------------------------------------------------------------
run "$PY" scripts/make_table.py "$GROUP" --scale "$SCALE" --runs "$RUNS" --out "$OUT"
