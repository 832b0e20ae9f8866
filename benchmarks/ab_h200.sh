#!/bin/bash
# An A/B through loadgen on one GPU VM: each SPEC runs benchmarks/repeat_h200.py in a process of its own, in the
# order given, so a configuration's processes can alternate with another's (between VMs the spread is 2-4 %, more
# than the gains compared, so only runs on one VM compare; BENCHMARKS.md). Run from the repo root:
#   bash benchmarks/ab_h200.sh OUT_DIR NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS[:OPTIONS] [...]
# NAME: OUT_DIR/NAME.jsonl and .txt; RUN_DIR: under bench-runs/, its compile cache (the first process cold, later ones
# warm; another configuration's starts warm but for what it changes); SWITCHES: SCCSDXL_ variables, comma-separated,
# or empty; REPEATS: loadgen runs after one build; SECONDS: the process's limit (its rows so far are kept); OPTIONS:
# sccsdxl.quant options added to CONFIG's for this process, comma-separated. CONFIG (env): the dtype:options to
# run, default "bf16:$FP" (the fastest) from benchmarks/fastest_h200.env; BATCH: default 50.
# Example, the package's default against one switch, alternating:
#   bash benchmarks/ab_h200.sh OUT base:base::2:330 cross:base:SCCSDXL_FUSED_CROSS_ATTENTION=0:2:250 base2:base::2:200
set -u
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
out=$1
shift
for spec in "$@"; do  # check every spec before the first build, which takes minutes
  fields=$(awk -F: '{print NF}' <<< "$spec")
  IFS=: read -r name dir switches repeats limit options <<< "$spec"
  if [ "$fields" != 5 ] && [ "$fields" != 6 ] || ! [[ "$repeats" =~ ^[1-9][0-9]*$ && "$limit" =~ ^[1-9][0-9]*$ ]] \
      || [ -z "$name" ] || [ -z "$dir" ] || ! [[ "$options" =~ ^[a-z0-9_=,]*$ ]]; then
    echo "ab_h200.sh: '$spec' is not NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS[:OPTIONS] (SWITCHES may be empty," \
         "REPEATS and SECONDS whole numbers, OPTIONS option names), e.g. base:base::2:265" >&2
    exit 2
  fi
  for switch in ${switches//,/ }; do
    if ! [[ "$switch" =~ ^SCCSDXL_[A-Z0-9_]+=.*$ ]]; then
      echo "ab_h200.sh: switch '$switch' in '$spec' is not SCCSDXL_NAME=VALUE" >&2
      exit 2
    fi
  done
done
. benchmarks/fastest_h200.env
config=${CONFIG:-bf16:$FP}
mkdir -p "$out"
for spec in "$@"; do
  IFS=: read -r name dir switches repeats limit options <<< "$spec"
  started=$SECONDS
  env ${switches//,/ } timeout "$limit" python3 benchmarks/repeat_h200.py "$out/$name.jsonl" "bench-runs/$dir" \
    "${BATCH:-50}" "$repeats" "$config${options:+,$options}" > "$out/$name.txt" 2>&1
  echo "rc=$? secs=$((SECONDS - started)) switches=$switches options=$options" >> "$out/$name.txt"
done
python3 benchmarks/summarize_ab.py "$@" --out "$out"
