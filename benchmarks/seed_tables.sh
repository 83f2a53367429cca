#!/usr/bin/env bash
# Issue 13's tables for one model and dataset: every editor one edit at a time (FT on keys and values, ROME,
# MEMIT, PMET and its three ablations), then MEMIT and PMET with 100 edits per call, then the report.
# The PMET ablations that keep PMET's targets reuse them, and so do the ×100 calls (every batch starts from the
# unedited weights, and a request's targets never depend on its batch): --reuse-targets; times still count the
# optimisation as first measured (one request at a time), which table.md says.
# CounterFact: the report split (known cases after the tuning split select_presets.py chose presets on);
# zsRE: its first 200 valid records. Resumable: run it again after a kill. Uses the presets chosen for the model
# (it stops if an editor has none); table.md and summary.json name the settings each run used.
# Usage: benchmarks/seed_tables.sh MODEL cf|zsre OUT [TUNING_CASES=50] [N=200] [-- BENCH_ARGS...]
#   METHODS=kn,t-patcher: only these editors (rows added to an existing folder; ×100 calls for MEMIT/PMET among them)
#   e.g. OMP_NUM_THREADS=1 benchmarks/seed_tables.sh smollm2-135m cf results/tables-smollm2 &
#        OMP_NUM_THREADS=1 benchmarks/seed_tables.sh smollm2-135m zsre results/tables-smollm2 &
#        benchmarks/seed_tables.sh gemma3-270m zsre results/tables-gemma3 50 200 -- --ray --workers 2   # 2 cores, 1 folder
set -euo pipefail
source "$(dirname "$0")/script_setup.sh"  # after --: passed to both bench calls, e.g. --ray --workers 2
model=${1:?usage: seed_tables.sh MODEL cf|zsre OUT [TUNING_CASES] [N]}
dataset=${2:?cf or zsre}
out=${3:?output folder}
skip=${4:-50}
n=${5:-200}
data="$shared/editing"
one_at_a_time=${METHODS:-ft-keys,ft-values,rome,memit,pmet,pmet-no-attn-delta,pmet-update-attn,pmet-even-spread}
batched=$(tr , '\n' <<< "$one_at_a_time" | grep -x -E 'memit|pmet' | paste -sd, || true)  # ×100 calls: those of the list
case "$dataset" in
  cf) args=(--dataset "$data/counterfact/counterfact-edit-1k.json" --known-only --skip "$skip" --n "$n") ;;
  zsre) args=(--dataset "$data/zsre/zsre_mend_train-1k.json" --n "$n") ;;
  *) echo "dataset must be cf or zsre, got $dataset" >&2; exit 2 ;;
esac
# The table compares editors at presets chosen for this model; refuse to run on family fallbacks by accident
"$python" - "$model" "$one_at_a_time" <<'EOF'
import sys
from kvedit import load_model
from kvedit.editing.registry import chosen_for_model
lm = load_model(sys.argv[1])
missing = [m for m in sys.argv[2].split(",") if not chosen_for_model(lm, m)]
if missing:
    sys.exit(f"{lm.name} has no presets of its own for {', '.join(missing)} (they would fall back to the family's "
             "rows): run benchmarks/select_presets.py and add its choices to the preset tables first")
EOF
# timing.log: one line per step and invocation (a resumed table adds lines; its cost is their sum)
step() { local start=$SECONDS; "$@"; echo "$(date -u +%FT%TZ) $((SECONDS - start)) s: ${*:2}" >> "$out/$dataset/timing.log"; }
mkdir -p "$out/$dataset"
step "$kvedit" bench --model "$model" "${args[@]}" --methods "$one_at_a_time" --reuse-targets --out "$out/$dataset" ${extra[@]+"${extra[@]}"}
if [ -n "$batched" ]; then
  step "$kvedit" bench --model "$model" "${args[@]}" --methods "$batched" --batch-size 100 --reuse-targets --out "$out/$dataset" ${extra[@]+"${extra[@]}"}
fi
"$kvedit" report "$out/$dataset"
