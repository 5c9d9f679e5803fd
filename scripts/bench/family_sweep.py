#!/usr/bin/env python3
"""Run perqc's recipe over a directory of ONNX models (e.g. fixtures/hf from
fixtures/gen_hf_fixtures.py) and check each result against ONNX Runtime.

usage: family_sweep.py [MODEL_DIR] [--perqc BIN] [--work DIR] [--only a,b] [--json OUT]

Per model M.onnx (input `input_ids` [batch, seq] int64, and for a KV-cache decoder an
attention mask and past key/values, fed empty; first output logits or hidden states):
  a) perqc M -o T --no-quantize --verify <calib>: the exact transforms only; then T vs M in
     ONNX Runtime on random ids over the whole vocab (2 x 7 and 1 x 13): max|a-b|/max|a| < 1e-4.
     The notes perqc printed and the passes' counters are kept.
  b) perqc M -o Q <calib> (default W4A4): ORT loads/runs Q, Q's interface equals M's, Q vs M
     relative error; perplexity: `perqc eval` on M, T and Q (integer kernels and --no-int) and
     the same protocol in Python on ORT logits of M and Q (encoders skipped).
  c) perqc M -o W --preset w4a16 --target ort <calib>: ORT runs W; W vs M relative error.
Prints a table and the failures; --json writes every record.
"""
import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = os.path.join(ROOT, "fixtures", "tiny_text.txt")
TOK = os.path.join(ROOT, "fixtures", "tiny_tokenizer.json")
CALIB = ["--calib-text", TEXT, "--tokenizer", TOK, "--calib-seqs", "4", "--calib-len", "32",
         "--calib-threads", "2"]
EVAL_SEQ, EVAL_WIN = 64, 6
TOL = 1e-4
HALF_TOL = 5e-3


def sess(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(s, ids):
    """The first output for token ids [batch, seq]; a KV-cache model gets an empty cache, an
    all-ones mask and positions 0..seq-1."""
    batch, seq = ids.shape
    feeds = {s.get_inputs()[0].name: ids}
    for i in s.get_inputs()[1:]:
        if i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, seq), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.repeat(np.arange(seq, dtype=np.int64)[None], batch, 0)
        elif "past" in i.name:
            dims = [batch if k == 0 else (d if isinstance(d, int) else 0)
                    for k, d in enumerate(i.shape)]
            feeds[i.name] = np.zeros(dims, np.float16 if i.type == "tensor(float16)" else np.float32)
        else:
            raise SystemExit(f"input {i.name!r}: not ids, a mask, positions or a cache")
    return s.run(None, feeds)[0]


def rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(a).max())


def interface(path):
    g = onnx.load(path, load_external_data=False).graph
    inits = {i.name for i in g.initializer}

    def sig(vs):
        out = []
        for v in vs:
            t = v.type.tensor_type
            out.append((v.name, onnx.TensorProto.DataType.Name(t.elem_type), len(t.shape.dim)))
        return out
    return sig([i for i in g.input if i.name not in inits]), sig(g.output)


def perqc(bin_, args, timeout=600):
    p = subprocess.run([bin_] + args, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def notes_of(stderr):
    return [l.strip() for l in stderr.splitlines() if l.strip().startswith(("note:", "warning:"))]


def counters_of(stderr):
    """pass name -> counters string, from the pass table."""
    out = {}
    for l in stderr.splitlines():
        m = re.match(r"\s*\d+\s+(\S+)\s+[\d.]+ [mµu]?s\s+(yes|no)\s*(.*)$", l)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3).strip())
    return out


def ppl_ort(s, seq=EVAL_SEQ, windows=EVAL_WIN):
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(TOK).encode(open(TEXT, encoding="utf-8").read()).ids
    nll, n = 0.0, 0
    for w in range(min(windows, len(ids) // seq)):
        x = np.array(ids[w * seq:(w + 1) * seq], dtype=np.int64)
        z = run(s, x[None])[0][:-1].astype(np.float64)
        top = z.max(-1)
        lse = top + np.log(np.exp(z - top[:, None]).sum(-1))
        nll += float((lse - z[np.arange(len(z)), x[1:]]).sum())
        n += len(z)
    return math.exp(nll / n)


def ppl_perqc(bin_, model, extra=()):
    rc, out, err = perqc(bin_, ["eval", model, "--text", TEXT, "--tokenizer", TOK, "--seq", str(EVAL_SEQ),
                                "--windows", str(EVAL_WIN), "--threads", "2", "-q", *extra])
    m = re.findall(r"ppl=([0-9.eE+\-naif]+)", out + err)
    if rc != 0 or not m:
        return None, (err or out).strip()[-2000:]
    return float(m[-1]), None


def sweep_one(bin_, model, work, fam):
    r = {"family": fam, "failures": []}
    fail = r["failures"].append
    is_encoder = False
    try:
        m = sess(model)
        out0 = m.get_outputs()[0]
        is_encoder = "logits" not in out0.name
        r["encoder"] = is_encoder
    except Exception as e:
        fail(f"ORT cannot load the input model: {e}")
        return r
    rng = np.random.default_rng(0)
    vocab = None
    probe = run(m, np.zeros((1, 2), np.int64))
    vocab = probe.shape[-1] if not is_encoder else 256
    inputs = [rng.integers(0, vocab, (2, 7)).astype(np.int64), rng.integers(0, vocab, (1, 13)).astype(np.int64)]
    ref = [run(m, x) for x in inputs]
    iface = interface(model)

    # a) exact transforms
    T = os.path.join(work, f"{fam}.T.onnx")
    cmd = [model, "-o", T, "--no-quantize", "--verify", *CALIB]
    r["cmd_a"] = "perqc " + " ".join(cmd)
    rc, out, err = perqc(bin_, cmd)
    calib = CALIB
    if rc != 0:
        fail(f"a) perqc --no-quantize --verify exited {rc}: {err.strip()[-3000:]}")
        # retry without calibration data (no native run), so that the rest can still be checked
        calib = ["--permute", "random"]
        r["fallback"] = "no calibration data, --permute random"
        cmd = [model, "-o", T, "--no-quantize", *calib]
        r["cmd_a_fallback"] = "perqc " + " ".join(cmd)
        rc, out, err = perqc(bin_, cmd)
        if rc != 0:
            fail(f"a) fallback without calibration exited {rc}: {err.strip()[-3000:]}")
    r["notes_a"] = notes_of(err)
    r["counters_a"] = counters_of(err)
    r["rc_a"] = rc
    if rc == 0:
        silent_skips(r, is_encoder)
        try:
            t = sess(T)
            errs = [rel(a, run(t, x)) for a, x in zip(ref, inputs)]
            r["rel_T"] = max(errs)
            # A half model's own arithmetic (ONNX Runtime runs M in f16; perqc computes T in
            # f32) is off by about 1e-3: the bound is the f16 rounding of the output.
            tol = HALF_TOL if ref[0].dtype == np.float16 else TOL
            if not r["rel_T"] < tol:
                fail(f"a) transform-only ORT rel error {r['rel_T']:.3g} > {tol}")
            if interface(T) != iface:
                fail(f"a) interface changed: {interface(T)} vs {iface}")
        except Exception as e:
            fail(f"a) ORT on T failed: {type(e).__name__}: {str(e)[:1500]}")

    # b) default W4A4
    Q = os.path.join(work, f"{fam}.Q.onnx")
    cmd = [model, "-o", Q, *calib]
    r["cmd_b"] = "perqc " + " ".join(cmd)
    rc, out, err = perqc(bin_, cmd)
    r["notes_b"] = notes_of(err)
    r["counters_b"] = counters_of(err)
    r["quant_summary"] = [l.strip() for l in err.splitlines() if l.startswith("quantize:")]
    m_ = re.search(r"quantize: (\d+) linears", err)
    r["n_quantized"] = int(m_.group(1)) if m_ else None
    r["n_linears"] = count_linears(model)
    heads = [n for n in r["notes_b"] if n.startswith("note: tie-head: head")]
    if r["n_quantized"] is not None and r["n_quantized"] + len(heads) < r["n_linears"]:
        fail(f"b) only {r['n_quantized']} of {r['n_linears']} weight MatMul/Gemm quantized ({len(heads)} head(s) named)")
    if is_encoder and len(heads) > 0:
        fail(f"b) encoder: {len(heads)} linears treated as LM heads and left float: " + "; ".join(heads))
    r["rc_b"] = rc
    if rc != 0:
        fail(f"b) perqc W4A4 exited {rc}: {err.strip()[-3000:]}")
    else:
        try:
            q = sess(Q)
            outs = [run(q, x) for x in inputs]
            r["q_ort_runs"] = True
            r["rel_Q"] = max(rel(a, b) for a, b in zip(ref, outs))
            if not np.isfinite(r["rel_Q"]) or r["rel_Q"] > 1:
                fail(f"b) W4A4 rel error {r['rel_Q']:.3g} (NaN or > 1)")
            if interface(Q) != iface:
                fail(f"b) interface changed: {interface(Q)} vs {iface}")
        except Exception as e:
            r["q_ort_runs"] = False
            fail(f"b) ORT on Q failed: {type(e).__name__}: {str(e)[:1500]}")
        if not is_encoder and r.get("fallback"):
            fail("b) perplexity skipped: the model does not run natively (see a)")
        if not is_encoder and not r.get("fallback"):
            r["ppl"] = {}
            for tag, path, extra in [("M", model, ()), ("T", T, ()), ("Q", Q, ()), ("Q_noint", Q, ("--no-int",))]:
                if not os.path.exists(path):
                    continue
                v, e = ppl_perqc(bin_, path, extra)
                r["ppl"][tag] = v
                if e:
                    fail(f"b) perqc eval {tag} failed: {e}")
            try:
                r["ppl"]["M_ort"] = ppl_ort(m)
                if r.get("q_ort_runs"):
                    r["ppl"]["Q_ort"] = ppl_ort(sess(Q))
            except Exception as e:
                fail(f"b) ORT perplexity failed: {e}")
            p = r["ppl"]
            if p.get("M") and p.get("M_ort") and abs(p["M"] / p["M_ort"] - 1) > 1e-3:
                fail(f"b) perqc eval ppl of M {p['M']:.4f} != ORT {p['M_ort']:.4f}")
            if p.get("T") and p.get("M") and abs(p["T"] / p["M"] - 1) > 1e-3:
                fail(f"b) perqc eval ppl of T {p['T']:.4f} != M {p['M']:.4f}")
            if p.get("Q_noint") and p.get("Q_ort") and abs(p["Q_noint"] / p["Q_ort"] - 1) > 1e-2:
                fail(f"b) perqc eval --no-int ppl of Q {p['Q_noint']:.4f} != ORT {p['Q_ort']:.4f}")
            for k, v in p.items():
                if v is not None and not np.isfinite(v):
                    fail(f"b) ppl {k} is {v}")

    # c) w4a16, MatMulNBits
    W = os.path.join(work, f"{fam}.W.onnx")
    cmd = [model, "-o", W, "--preset", "w4a16", "--target", "ort", *calib]
    r["cmd_c"] = "perqc " + " ".join(cmd)
    rc, out, err = perqc(bin_, cmd)
    r["notes_c"] = notes_of(err)
    r["rc_c"] = rc
    if rc != 0:
        fail(f"c) perqc w4a16 exited {rc}: {err.strip()[-3000:]}")
    else:
        try:
            w = sess(W)
            r["rel_W"] = max(rel(a, run(w, x)) for a, x in zip(ref, inputs))
            r["w_ort_ok"] = True
            g = onnx.load(W, load_external_data=False).graph
            r["w_matmulnbits"] = sum(n.op_type == "MatMulNBits" for n in g.node)
            if not np.isfinite(r["rel_W"]) or r["rel_W"] > 1:
                fail(f"c) w4a16 rel error {r['rel_W']:.3g}")
            if interface(W) != iface:
                fail(f"c) interface changed: {interface(W)} vs {iface}")
        except Exception as e:
            r["w_ort_ok"] = False
            fail(f"c) ORT on W failed: {type(e).__name__}: {str(e)[:1500]}")
    return r


def count_linears(path):
    g = onnx.load(path, load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return sum(n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input[1:2]) for n in g.node)


def silent_skips(r, is_encoder):
    """A part of the recipe that did nothing, with no note from its pass saying why."""
    c = r["counters_a"]
    notes = " ".join(r["notes_a"])

    def val(pass_prefix, key):
        for k, (_, ctr) in c.items():
            if k.startswith(pass_prefix):
                m = re.search(key + r"=(\d+)", ctr)
                if m:
                    return int(m.group(1))
        return None
    checks = [("permute", "regions-permuted", "note: permute:", "mlp permutation"),
              ("online-hadamard", "regions-rotated", "note: online-hadamard:", "online Hadamard before down_proj"),
              ("rotate", "heads-rotated", "note: rotate:", "V/O head rotation"),
              ("rotate", "residual-rotated", "note: rotate:", "residual rotation")]
    for pas, key, note, what in checks:
        v = val(pas, key)
        if v == 0 and key != "residual-rotated" and not (key == "regions-permuted" and r.get("fallback")):
            # a note of the pass must name the reason; permute's summary note alone does not count
            reasons = [n for n in r["notes_a"] if n.startswith(note) and "massdiff: max / mean" not in n
                       and "residual" not in n]
            if not reasons:
                r["failures"].append(f"a) silent skip: {what} applied to 0 regions ({pas}: {key}=0) and no note says why")
        if v == 0 and key == "residual-rotated" and "note: rotate: region" not in notes:
            r["failures"].append(f"a) silent skip: {what} not applied and no note says why")


def fmt(v, f="{:.2e}"):
    return "-" if v is None else (f.format(v) if isinstance(v, float) else str(v))


def table(recs):
    rows = ["| family | T rel err (ORT) | transforms (counters) | W4A4 ORT runs | W4A4 rel err | ppl M / T / Q(int) / Q(no-int) / Q(ORT) | w4a16 ORT ok (rel err, #MatMulNBits) | linears quantized W4A4 | failures |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        c = r.get("counters_a", {})
        ctr = "; ".join(f"{k}:{v[1] or v[0]}" for k, v in c.items() if k != "tie-head")
        p = r.get("ppl") or {}
        ppl = "n/a (encoder)" if r.get("encoder") else " / ".join(fmt(p.get(k), "{:.3f}") for k in ("M", "T", "Q", "Q_noint", "Q_ort"))
        rows.append(f"| {r['family']} | {fmt(r.get('rel_T'))} | {ctr} | {fmt(r.get('q_ort_runs'))} | "
                    f"{fmt(r.get('rel_Q'), '{:.3f}')} | {ppl} | {fmt(r.get('w_ort_ok'))} ({fmt(r.get('rel_W'), '{:.3f}')}, {fmt(r.get('w_matmulnbits'))}) | {fmt(r.get('n_quantized'))}/{fmt(r.get('n_linears'))} | {len(r['failures'])} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", nargs="?", default=os.path.join(ROOT, "fixtures", "hf"))
    ap.add_argument("--perqc", default=os.path.join(ROOT, "target", "release", "perqc"))
    ap.add_argument("--work", default="/tmp/perqc_family_sweep")
    ap.add_argument("--only", default="")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    recs = []
    for model in sorted(glob.glob(os.path.join(a.model_dir, "*.onnx"))):
        fam = os.path.basename(model)[:-5]
        if a.only and fam not in a.only.split(","):
            continue
        print(f"== {fam}", file=sys.stderr, flush=True)
        try:
            r = sweep_one(a.perqc, model, a.work, fam)
        except Exception as e:
            r = {"family": fam, "failures": [f"sweep crashed: {type(e).__name__}: {e}"]}
        for f in r["failures"]:
            print(f"   FAIL {f[:400]}", file=sys.stderr)
        recs.append(r)
    print(table(recs))
    print()
    for r in recs:
        print(f"### {r['family']}")
        for k in ("notes_a", "notes_b", "notes_c"):
            for n in r.get(k, []):
                print(f"  {k[-1]}: {n}")
        for f in r["failures"]:
            print(f"  FAIL: {f}")
    if a.json:
        json.dump(recs, open(a.json, "w"), indent=1, default=str)
    sys.exit(1 if any(r["failures"] for r in recs) else 0)


if __name__ == "__main__":
    main()
