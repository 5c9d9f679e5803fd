#!/usr/bin/env python3
"""Where three runs of one quantized model part ways: the hidden state after every layer.

usage: scripts/bench/hidden_divergence.py MODEL [--pattern REGEX] [--seq 512] [--threads 2]

Adds every node output whose name matches --pattern (default: the residual stream after each
decoder layer of the torchscript SmolLM2 export, `/layers.N/Add_1_output_0`, which perqc's
output files keep) as a graph output, then runs one window of --seq token ids (bench_forward's
seeded ids) three ways: perqc's integer plan (`bench_forward`), perqc's float kernels
(`bench_forward --no-int`) and ONNX Runtime. Prints, per layer, the mean |difference| of each
pair and the mean |h| of ONNX Runtime's value. Build the example first:
`cargo build --release -p perqc-runtime --example bench_forward`; run with the repository's
.venv (scripts/setup-python) or the bench's venv (onnx, onnxruntime, numpy).
"""
import argparse, os, re, subprocess, sys, tempfile
import numpy as np
import onnx
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--pattern", default=r"/layers\.(\d+)/Add_1_output_0$")
ap.add_argument("--seq", type=int, default=512)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
exe = os.path.join(root, "target", "release", "examples", "bench_forward")
if not os.access(exe, os.X_OK):
    sys.exit(f"{exe} is missing: cargo build --release -p perqc-runtime --example bench_forward")

m = onnx.load(a.model)
pat = re.compile(a.pattern)
# Only float values are compared (a pattern may also match shapes and integer codes).
types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(m).graph.value_info}
taps = [o for n in m.graph.node for o in n.output
        if pat.search(o) and types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
if not taps:
    sys.exit(f"{a.model}: no float node output matches {a.pattern!r}")
for t in taps:
    m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))

with tempfile.TemporaryDirectory() as d:
    tapped = os.path.join(d, "taps.onnx")
    onnx.save(m, tapped)
    del m
    runs = {}
    for name, extra in [("int", []), ("float", ["--no-int"])]:
        out = os.path.join(d, name)
        subprocess.run([exe, tapped, "--seq", str(a.seq), "--reps", "1", "--threads", str(a.threads),
                        "--save", out] + extra, check=True, capture_output=True)
        # bench_forward writes `/` in names as `_`.
        runs[name] = {t: np.load(os.path.join(out, t.replace("/", "_") + ".npy")) for t in taps}
    ids = np.load(os.path.join(d, "int", "input_ids.npy"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(tapped, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    vals = sess.run(None, {"input_ids": ids})
    runs["ort"] = {n: v for n, v in zip(names, vals) if n in taps}

mean = lambda x, y: float(np.mean(np.abs(x.astype(np.float64) - y)))
print(f"{'value':>40} {'int - ort':>10} {'float - ort':>12} {'int - float':>12} {'mean |h|':>9}")
for t in taps:
    i, f, o = runs["int"][t], runs["float"][t], runs["ort"][t]
    print(f"{t[-40:]:>40} {mean(i, o):10.3g} {mean(f, o):12.3g} {mean(i, f):12.3g} "
          f"{float(np.mean(np.abs(o))):9.3g}")
