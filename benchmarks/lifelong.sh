#!/usr/bin/env bash
# Issue 31's lifelong runs for one model: 1,000 CounterFact and 1,000 zsRE edits applied in order, in batches of
# 10 and 100, for every editor that can run sequentially (FT on keys, FT on values, MEMIT, PMET, AlphaEdit; ROME one
# edit at a time), measured after every batch (docs/lifelong.md), then each folder's report and the CounterFact vs
# zsRE comparison. Resumable: run it again after a kill; every run continues from its last finished batch
# (state/<run>/chain.safetensors and the AlphaEdit history beside it).
# Usage: benchmarks/lifelong.sh [MODEL=smollm2-135m] [OUT=results/lifelong-MODEL] [N=1000] [-- BENCH_ARGS...]
#   e.g. OMP_NUM_THREADS=1 nohup benchmarks/lifelong.sh smollm2-135m results/lifelong-smollm2 > lifelong.log 2>&1 &
#        benchmarks/lifelong.sh gemma3-270m results/lifelong-gemma3 1000 -- --ray --workers 2
#        STAGES="cf:100" benchmarks/lifelong.sh   # one data set and batch size (cf|zsre : 1|10|100)
#        STAGES="cf:100" METHODS=alphaedit benchmarks/lifelong.sh   # one method of the stage (others later, same folder)
# Each (data set, batch size) is its own folder OUT/<cf|zsre>-x<B>: a sequential run edits one model in order, so
# runs in one folder go one after another; two invocations on different STAGES use two cores. --ray is passed
# through (runs that are not sequential go to the workers; sequential runs stay in the process, kvedit says so).
set -euo pipefail
source "$(dirname "$0")/script_setup.sh"
model=${1:-smollm2-135m}
out=${2:-results/lifelong-$model}
n=${3:-1000}
stages=${STAGES:-"cf:10 cf:100 zsre:10 zsre:100 cf:1 zsre:1"}
# The first N cases of each file (all 1,000 for N=1000): --known-only would leave fewer than 1,000 CounterFact cases
# (the unedited model prefers the true object on fewer than that), and retention measures the new objects, which no
# case starts out knowing. ROME edits one fact per call: batch size 1 only.
general=(--general-text "$shared/corpus/wikitext-2/test.txt" --general-tasks "$shared/tasks")
mkdir -p "$out"
for stage in $stages; do
  data=${stage%%:*}; batch=${stage##*:}
  case "$data" in
    cf) args=(--dataset "$shared/editing/counterfact/counterfact-edit-1k.json") ;;
    zsre) args=(--dataset "$shared/editing/zsre/zsre_mend_train-1k.json") ;;
    *) echo "stage $stage: data set must be cf or zsre" >&2; exit 2 ;;
  esac
  case "$batch" in
    1) methods=rome,alphaedit ;;  # ROME's batch; AlphaEdit one at a time as the reference's default
    10|100) methods=ft-keys,ft-values,memit,pmet,alphaedit ;;
    *) echo "stage $stage: batch size must be 1, 10 or 100" >&2; exit 2 ;;
  esac
  methods=${METHODS:-$methods}
  every=$((100 / batch))  # general ability every 100 edits (one probe costs minutes)
  checks=$((batch < 50 ? 50 / batch : 1))  # retention and specificity every 50 edits (≈ 1 min each); the new batch always
  folder="$out/$data-x$batch"
  step "$kvedit" bench --model "$model" "${args[@]}" --n "$n" --sequential --batch-size "$batch" \
    --methods "$methods" "${general[@]}" --general-every "$every" --retention-every "$checks" --out "$folder" \
    ${extra[@]+"${extra[@]}"}
  "$kvedit" report "$folder"
done
for batch in 10 100; do
  if [ -f "$out/cf-x$batch/sequence.jsonl" ] && [ -f "$out/zsre-x$batch/sequence.jsonl" ]; then
    "$kvedit" compare "$out/cf-x$batch" "$out/zsre-x$batch" --labels "CounterFact x$batch,zsRE x$batch" \
      --out "$out/compare-x$batch"
  fi
done
