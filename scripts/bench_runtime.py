#!/usr/bin/env python3
"""Native runtime vs ONNX Runtime on one causal-LM forward pass, side by side.

usage: scripts/bench_runtime.py MODEL [--seq 512] [--reps 3] [--rounds 3] [--warmup 2] [--threads 2]
                               [--ort-model NAME=PATH ...] [--also-no-int] [--max-err 1e-3]
MODEL is an ONNX causal LM taking input_ids; docs/runtime.md uses the SmolLM2 exports that
scripts/bench-setup builds (BENCH_DIR/smollm2/model.onnx, BENCH_DIR/smollm2-dynamo/model.onnx).
Run it with the repository's .venv (scripts/setup-python) or the bench's venv.
Runs `bench_forward` (release build of the perqc-runtime example; build it first with
`cargo build --release -p perqc-runtime --example bench_forward`) with --save, then ONNX
Runtime (intra_op_num_threads = --threads, default graph optimizations) on the same
input_ids, alternating the two for --rounds rounds of --reps runs each, and prints both
medians and the relative error max|ort - native| / max|ort|.

For quantized models: `bench_forward` runs their 4-bit linears on the integer kernels;
`--also-no-int` times a second perqc process per round with `--no-int` (the float kernels on
the same graph), and each `--ort-model NAME=PATH` adds ONNX Runtime on another model (the
float32 original, a MatMulNBits export) to the same rounds, reported as perqc / NAME.
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--seq", type=int, default=512)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--warmup", type=int, default=2, help="untimed runs first, per perqc process and for the ORT session")
ap.add_argument("--ort-model", action="append", default=[], metavar="NAME=PATH",
                help="also time ONNX Runtime on this model (same input_ids)")
ap.add_argument("--also-no-int", action="store_true", help="also time perqc with --no-int")
ap.add_argument("--max-err", type=float, default=1e-3,
                help="fail when max|ort - perqc| / max|ort| on MODEL exceeds this")
a = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
exe = os.path.join(root, "target", "release", "examples", "bench_forward")
if not os.path.isfile(a.model):
    sys.exit(f"{a.model}: no such model (scripts/bench-setup builds the SmolLM2 exports)")
if not os.access(exe, os.X_OK):
    sys.exit(f"{exe} is missing: cargo build --release -p perqc-runtime --example bench_forward")
so = ort.SessionOptions()
so.intra_op_num_threads = a.threads
so.inter_op_num_threads = 1
sessions = {}
for name, path in [("ort", a.model)] + [tuple(x.split("=", 1)) for x in a.ort_model]:
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such model")
    t = time.perf_counter()
    sessions[name] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    print(f"{name}: {path}: session {time.perf_counter() - t:.3f}s, threads {a.threads}, ORT {ort.__version__}")

# Rounds alternate the runtimes (perqc --reps runs, then as many runs of each ORT session),
# so slow drifts of a shared machine's load hit all alike; medians are over all runs. Each
# perqc process (one per round) and each ORT session first make --warmup untimed runs: the
# first runs of a process grow the heap and fault in pages, which a long-lived session pays
# once.
variants = [("perqc", [])] + ([("perqc --no-int", ["--no-int"])] if a.also_no_int else [])
times = {name: [] for name, _ in variants}
times.update({name: [] for name in sessions})
ref = native = None
with tempfile.TemporaryDirectory() as d:
    for rnd in range(a.rounds):
        line = []
        for vname, extra in variants:
            save = ["--save", d] if rnd == 0 and vname == "perqc" else []
            out = subprocess.run(
                [exe, a.model, "--seq", str(a.seq), "--reps", str(a.reps + a.warmup), "--threads", str(a.threads),
                 "--seed", str(a.seed)] + extra + save,
                check=True, capture_output=True, text=True).stdout
            runs = [float(l.split(": ")[1].rstrip("s")) for l in out.splitlines() if l.startswith("run ")]
            runs = runs[a.warmup:]
            times[vname] += runs
            line.append(f"{vname} " + " ".join(f"{x:.3f}" for x in runs))
        if rnd == 0:
            ids = np.load(os.path.join(d, "input_ids.npy"))
            native = np.load(os.path.join(d, "logits.npy"))
            for sess in sessions.values():
                for _ in range(a.warmup):
                    sess.run(None, {"input_ids": ids})
        for name, sess in sessions.items():
            for r in range(a.reps):
                t = time.perf_counter()
                out = sess.run(None, {"input_ids": ids})[0]
                times[name].append(time.perf_counter() - t)
                if name == "ort":
                    ref = out
            line.append(f"{name} " + " ".join(f"{x:.3f}" for x in times[name][-a.reps:]))
        print(f"round {rnd}: " + " | ".join(line))
med = {k: statistics.median(v) for k, v in times.items()}
err = float(np.max(np.abs(ref.astype(np.float64) - native))) / float(np.max(np.abs(ref)))
print(f"medians of {len(times['perqc'])} runs: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()))
print("perqc / " + ", perqc / ".join(f"{k} = {med['perqc'] / v:.2f}" for k, v in med.items() if k != "perqc")
      + f"; rel err perqc vs ort on {os.path.basename(a.model)} {err:.3g}")
sys.exit(0 if err < a.max_err else 1)
