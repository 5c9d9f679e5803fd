#!/usr/bin/env bash
# Builds SmolLM2 the way ONNX Runtime's own model builder writes LLMs (onnxruntime-genai:
# GroupQueryAttention with a KV cache and rotary, SkipSimplifiedLayerNormalization, packed
# QKV), float32 for CPU, from the Hugging Face folder scripts/bench-setup made:
#
#   BENCH_DIR/genai-venv/          Python with onnxruntime-genai's builder (pinned)
#   BENCH_DIR/smollm2-genai/       model.onnx + model.onnx.data, genai_config.json
#
# usage: scripts/bench/build_genai.sh [BENCH_DIR]   (run scripts/bench-setup first)
# Re-running skips finished steps; the model is written to a temporary folder and renamed.
set -euo pipefail
dest=${1:-${PERQC_BENCH_DIR:-$HOME/.cache/perqc-bench}}
hf=$dest/smollm2/hf
[ -f "$hf/config.json" ] || { echo "build_genai: $hf is missing; run scripts/bench-setup first" >&2; exit 1; }
python=${PYTHON:-python3}
if [ ! -x "$dest/genai-venv/bin/python" ]; then
  rm -rf "$dest/genai-venv.tmp"
  "$python" -m venv "$dest/genai-venv.tmp"
  "$dest/genai-venv.tmp/bin/pip" install -q onnxruntime-genai==0.18.0 onnx-ir==1.1.0 \
    onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2 numpy==2.4.6 safetensors==0.8.0 \
    torch==2.15.0 transformers==5.23.0
  mv "$dest/genai-venv.tmp" "$dest/genai-venv"
fi
out=$dest/smollm2-genai
if [ ! -f "$out/model.onnx" ]; then
  work=$(mktemp -d "$dest/genai-build.XXXXXX")
  # The dequantized weights are plain float32; the config still names the GGUF they came
  # from, which the builder would take for a quantized checkpoint.
  cp -r "$hf" "$work/hf"
  "$dest/genai-venv/bin/python" - "$work/hf/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.pop("quantization_config", None)
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PY
  "$dest/genai-venv/bin/python" -m onnxruntime_genai.models.builder -i "$work/hf" -o "$work/out" \
    -p fp32 -e cpu -c "$work/cache" > "$work/build.log" 2>&1 || { tail -20 "$work/build.log"; exit 1; }
  rm -rf "$out"
  mv "$work/out" "$out"
  rm -rf "$work"
fi
echo "built $out/model.onnx"
