#!/usr/bin/env python3
"""Native runtime vs ONNX Runtime on one causal-LM forward pass, side by side.

usage: scripts/bench_runtime.py MODEL [--seq 512] [--reps 3] [--rounds 3] [--warmup 2] [--threads 2]
MODEL is an ONNX causal LM taking input_ids; docs/runtime.md uses the SmolLM2 exports that
scripts/bench-setup builds (BENCH_DIR/smollm2/model.onnx, BENCH_DIR/smollm2-dynamo/model.onnx).
Run it with the repository's .venv (scripts/setup-python) or the bench's venv.
Runs `bench_forward` (release build of the perqc-runtime example; build it first with
`cargo build --release -p perqc-runtime --example bench_forward`) with --save, then ONNX
Runtime (intra_op_num_threads = --threads, default graph optimizations) on the same
input_ids, alternating the two for --rounds rounds of --reps runs each, and prints both
medians and the relative error max|ort - native| / max|ort|.
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
t = time.perf_counter()
sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
print(f"ort:   session {time.perf_counter() - t:.3f}s, threads {a.threads}, ORT {ort.__version__}")

# Rounds alternate the two runtimes (perqc --reps runs, then as many ORT runs), so slow
# drifts of a shared machine's load hit both alike; medians are over all runs. Each perqc
# process (one per round) and the ORT session first make --warmup untimed runs: the first
# runs of a process grow the heap and fault in pages, which a long-lived session pays once.
native_times, ort_times = [], []
with tempfile.TemporaryDirectory() as d:
    for rnd in range(a.rounds):
        out = subprocess.run(
            [exe, a.model, "--seq", str(a.seq), "--reps", str(a.reps + a.warmup), "--threads", str(a.threads),
             "--seed", str(a.seed)] + (["--save", d] if rnd == 0 else []),
            check=True, capture_output=True, text=True).stdout
        runs = [float(l.split(": ")[1].rstrip("s")) for l in out.splitlines() if l.startswith("run ")]
        runs = runs[a.warmup:]
        native_times += runs
        if rnd == 0:
            ids = np.load(os.path.join(d, "input_ids.npy"))
            native = np.load(os.path.join(d, "logits.npy"))
            for _ in range(a.warmup):
                sess.run(None, {"input_ids": ids})
        for r in range(a.reps):
            t = time.perf_counter()
            ref = sess.run(None, {"input_ids": ids})[0]
            ort_times.append(time.perf_counter() - t)
        print(f"round {rnd}: perqc " + " ".join(f"{x:.3f}" for x in runs)
              + " | ort " + " ".join(f"{x:.3f}" for x in ort_times[-a.reps:]))
native_median = statistics.median(native_times)
ort_median = statistics.median(ort_times)
err = float(np.max(np.abs(ref.astype(np.float64) - native))) / float(np.max(np.abs(ref)))
print(f"median of {len(native_times)}: perqc {native_median:.3f}s, ort {ort_median:.3f}s "
      f"(perqc / ort = {native_median / ort_median:.2f}); rel err {err:.3g}")
sys.exit(0 if err < 1e-3 else 1)
