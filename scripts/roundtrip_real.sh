#!/usr/bin/env bash
# Reproduces docs/roundtrip.md on the real SmolLM2 exports (built by scripts/bench-setup):
# round trips each variant with /usr/bin/time, then checks the outputs with onnx.checker and
# ONNX Runtime (bitwise) against the originals.
# usage: scripts/roundtrip_real.sh [BENCH_DIR] [OUT_DIR]
#   BENCH_DIR defaults to $PERQC_BENCH_DIR, else ~/.cache/perqc-bench (as for bench-setup).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-${PERQC_BENCH_DIR:-$HOME/.cache/perqc-bench}}
O=${2:-/tmp/perqc-roundtrip}
for f in "$B/smollm2/model.onnx" "$B/smollm2-dynamo/model.onnx"; do
  [ -f "$f" ] || { echo "roundtrip_real.sh: no $f; build the bench first: scripts/bench-setup $B" >&2; exit 1; }
done
mkdir -p "$O/cases"
cargo build -q --release --bin perqc
scripts/setup-python
run() { # name reference output [flags...]
  local name=$1 ref=$2 out=$3; shift 3
  /usr/bin/time -v target/release/perqc "$ref" -o "$out" "$@" 2>"$O/$name.time"
  printf '%-28s %s; peak RSS %s kB; wall %s\n' "$name" "$(grep '^wrote' "$O/$name.time")" \
    "$(awk '/Maximum resident/ {print $6}' "$O/$name.time")" \
    "$(awk '/Elapsed/ {print $8}' "$O/$name.time")"
  printf '{"cases": [{"name": "%s", "reference": "%s", "candidate": "%s", "check": true}]}\n' \
    "$name" "$ref" "$out" >"$O/cases/$name.json"
}
run ts-none "$B/smollm2/model.onnx" "$O/ts.onnx"
cmp -s "$B/smollm2/model.onnx" "$O/ts.onnx" && echo "ts-none: byte-identical to the input"
run ts-external "$B/smollm2/model.onnx" "$O/ts_ext.onnx" --external-data
run dynamo-none "$B/smollm2-dynamo/model.onnx" "$O/dyn.onnx"
run dynamo-inline "$B/smollm2-dynamo/model.onnx" "$O/dyn_inline.onnx" --inline-data
.venv/bin/python tests/conformance/ort_compare.py "$O/cases"
