#!/usr/bin/env python3
"""Checks models perqc emitted against a reference, with ONNX Runtime as the client.

usage: ort_compare.py DIR
Every DIR/*.json (written by the Rust test suite, one per case) lists cases:
  {"cases": [{"name": ..., "reference": path, "candidate": path, "mode": "bitwise" | "close",
              "rtol": 1e-4, "check": true, "run": true}]}
For each case: onnx.checker accepts the candidate (full_check, when "check"), and both models
run in ONNX Runtime on the same seeded inputs (two input sets: batch 1 and batch 2 where the
batch is symbolic) with outputs equal bit for bit ("bitwise") or within rtol of the max |ref|
("close"). Prints one line per case and exits non-zero if any fails.

Mode "native" checks perqc's native runtime against ONNX Runtime instead:
  {"name": ..., "mode": "native", "model": path, "inputs": {name: npy}, "outputs": {name: npy},
   "rtol": 1e-4}
runs "model" in ONNX Runtime on the saved inputs and requires, per output,
max |ort - native| / max |ort| <= rtol (exact equality for non-float outputs).
"""
import glob, json, os, sys
import numpy as np
import onnx
import onnxruntime as ort

NP = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def make_inputs(sess, seed, batch, seq):
    """Seeded inputs; symbolic dims named *batch* are `batch`, *past* 0 (an empty KV cache),
    others `seq`; an `attention_mask` is all ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        dims = []
        for d in i.shape:
            if isinstance(d, int):
                dims.append(d)
            elif d and "batch" in d.lower():
                dims.append(batch)
            elif d and "past" in d.lower():
                dims.append(0)
            else:
                dims.append(seq)
        if i.name == "attention_mask":
            feeds[i.name] = np.ones(dims, NP[i.type])
            continue
        if i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(dims[-1]), dims).astype(NP[i.type])
            continue
        dt = NP.get(i.type)
        if dt is None:
            raise SystemExit(f"input {i.name}: unsupported type {i.type}")
        if np.issubdtype(dt, np.integer):
            feeds[i.name] = rng.integers(0, 200, size=dims).astype(dt)
        elif dt == np.bool_:
            feeds[i.name] = rng.integers(0, 2, size=dims).astype(dt)
        else:
            feeds[i.name] = rng.standard_normal(dims).astype(dt)
    return feeds


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    # Graph optimizations may fuse differently for different (equivalent) spellings; compare
    # the models as written.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def rel_err(ref, got, what):
    """max |ref - got| / max |ref| over the finite entries; NaN and inf must sit at the same
    places with the same values (a NaN difference would otherwise compare as "not > tol")."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    fin = np.isfinite(ref64)
    same_nonfinite = np.array_equal(np.isnan(ref64), np.isnan(got64)) and np.array_equal(
        ref64[~fin & ~np.isnan(ref64)], got64[~fin & ~np.isnan(ref64)])
    if not same_nonfinite or not np.all(np.isfinite(got64[fin])):
        raise AssertionError(f"{what}: NaN/inf entries differ "
                             f"(ort {int(np.sum(~fin))}, native {int(np.sum(~np.isfinite(got64)))} non-finite)")
    if not fin.any():
        return 0.0
    scale = float(np.max(np.abs(ref64[fin]))) or 1.0
    return float(np.max(np.abs(ref64[fin] - got64[fin]))) / scale


def run_native(c):
    sess = session(c["model"])
    feeds = {k: np.load(v) for k, v in c["inputs"].items()}
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, feeds)))
    worst = 0.0
    for name, path in c["outputs"].items():
        a, b = np.asarray(got[name]), np.load(path)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(f"{name}: ort {a.dtype}{a.shape} vs native {b.dtype}{b.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            if not np.array_equal(a, b):
                raise AssertionError(f"{name}: integer outputs differ")
            continue
        err = rel_err(a, b, name)
        worst = max(worst, err)
        if err > c.get("rtol", 1e-4):
            raise AssertionError(f"{name}: relative error {err:.3g} > {c['rtol']}")
    return f"native vs ort max rel err {worst:.3g}"


def window_feeds(s, ids_name, seq):
    """What `perqc eval` feeds a KV-cache graph besides the ids: an all-ones attention_mask,
    position_ids 0..seq, and empty past key/values (symbolic batch 1, other symbolic dims 0)."""
    feeds = {}
    for i in s.get_inputs():
        if i.name == ids_name:
            continue
        if i.name == "attention_mask":
            feeds[i.name] = np.ones((1, seq), NP[i.type])
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(seq)[None, :].astype(NP[i.type])
        elif "past" in i.name:
            dims = [d if isinstance(d, int) else (1 if k == 0 else 0) for k, d in enumerate(i.shape)]
            feeds[i.name] = np.zeros(dims, NP[i.type])
        else:
            raise SystemExit(f"input {i.name}: no feed for perplexity")
    return feeds


def ppl_case(c):
    """Perplexity of `ids` windows under ONNX Runtime, as scripts/bench/ppl_ort.py scores them
    (plus an empty KV cache and an all-ones mask for graphs that take them)."""
    ids = np.load(c["ids"]).reshape(-1)
    s = session(c["model"])
    names = [i.name for i in s.get_inputs()]
    name = "input_ids" if "input_ids" in names else names[0]
    seq, nll, count = c["seq"], 0.0, 0
    for w in range(min(c["windows"], len(ids) // seq)):
        x = ids[w * seq:(w + 1) * seq].astype(np.int64)[None, :]
        logits = s.run(None, {name: x, **window_feeds(s, name, seq)})[0][0].astype(np.float64)[:-1]
        m = logits.max(-1, keepdims=True)
        lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= lp[np.arange(seq - 1), x[0, 1:]].sum()
        count += seq - 1
    ref = float(np.exp(nll / count))
    err = abs(ref - c["ppl"]) / ref
    if err > c["rtol"]:
        raise AssertionError(f"perqc ppl {c['ppl']} vs ONNX Runtime {ref:.6f} (rel err {err:.3g})")
    return f"ppl {c['ppl']} vs ONNX Runtime {ref:.4f}"


def run_case(c):
    if c.get("mode") == "ppl":
        return ppl_case(c)
    if c.get("mode") == "native":
        return run_native(c)
    if c.get("check", True):
        onnx.checker.check_model(c["candidate"], full_check=True)
    if not c.get("run", True):
        return "checked" if c.get("check", True) else "registered only (not checked, not run)"
    ref, cand = session(c["reference"]), session(c["candidate"])
    worst = 0.0
    for seed, (batch, seq) in enumerate([(1, 7), (2, 5)]):
        feeds = make_inputs(ref, seed, batch, seq)
        r = ref.run(None, feeds)
        o = cand.run(None, feeds)
        if len(r) != len(o):
            raise AssertionError(f"{len(r)} reference outputs, {len(o)} candidate outputs")
        for k, (a, b) in enumerate(zip(r, o)):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape or a.dtype != b.dtype:
                raise AssertionError(f"output {k}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
            if c.get("mode", "bitwise") == "bitwise":
                if a.tobytes() != b.tobytes():
                    raise AssertionError(f"output {k} differs bitwise (seed {seed})")
            else:
                err = rel_err(a, b, f"output {k}")
                worst = max(worst, err)
                if err > c.get("rtol", 1e-4):
                    raise AssertionError(f"output {k}: relative error {err:.3g} > {c['rtol']}")
    return "bitwise equal" if c.get("mode", "bitwise") == "bitwise" else f"max rel err {worst:.3g}"


def main():
    files = sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))
    cases = [c for f in files for c in json.load(open(f))["cases"]]
    if not cases:
        sys.exit(f"no conformance cases in {sys.argv[1]}: did the Rust tests run?")
    failed = 0
    for c in cases:
        try:
            print(f"ok   {c['name']}: {run_case(c)}", flush=True)
        except Exception as e:  # report every case, then fail
            failed += 1
            print(f"FAIL {c['name']}: {type(e).__name__}: {e}", flush=True)
    print(f"{len(cases) - failed}/{len(cases)} conformance cases passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
