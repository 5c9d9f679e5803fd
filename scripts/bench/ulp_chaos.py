#!/usr/bin/env python3
"""How far ONNX Runtime disagrees with itself when one tensor moves by an ulp.

usage: scripts/bench/ulp_chaos.py MODEL TOKENIZER TEXT [--seeds 8] [--tensor NAME]
           [--fraction 1.0] [--skip-chars 200000] [--windows 16] [--threads 2]
           [--perqc BIN [--perqc-plans int,float,as-is]] [--spelling reciprocal-as-div,split-k]

Two equally valid float programs for the same graph (another summation order, another exp)
differ by round-off. At 4 bits such a difference moves a value across a rounding boundary now
and then, and the whole-step error that follows grows through the layers. This measures that
floor directly, with one scorer: copies of MODEL whose float tensor --tensor (default: the
token embedding table, the float data input of the Gather that reads the graph's first input)
has each element moved one ulp up or down at random (a --fraction of the elements), one copy
per seed, scored by the bench protocol (ppl_ort.py's windows and log-softmax). Seed 0 is the
file unchanged. The relative perplexity differences to seed 0 are what any two
implementations of the graph can be expected to differ by, before either has a bug.

With --spelling, each copy is also scored by ONNX Runtime after rewrites that change nothing but
round-off: the difference is what one runtime gives for two spellings of one graph.
- reciprocal-as-div: every Mul(x, Reciprocal(y)) becomes Div(x, y) (the RMS norms);
- split-k: every MatMul with a constant or dequantized 2-D weight of even K becomes the sum of
  the products of its two halves along K (another summation order in every linear).

With --perqc, each copy is also scored by `perqc eval`'s plans (--perqc-plans: int, the
integer plan; float, `--no-int`; as-is, `--as-is`, every op on its own kernel), so the spread of ONNX Runtime against itself sits beside perqc's against ONNX
Runtime on the same files.

Prints one line per seed, then the relative differences summarized (mean, mean |difference|,
standard deviation and its standard error, largest, how many within 0.5% and 1%): ONNX Runtime on
each copy against the file, and every other column against ONNX Runtime on the same copy.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ppl_ort import cache_feeds, window_nll  # noqa: E402


def embedding_name(m):
    """The float initializer a Gather reads with the graph's first input as its indices."""
    first = m.graph.input[0].name
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == first and n.input[0] in inits:
            if inits[n.input[0]].data_type == onnx.TensorProto.FLOAT:
                return n.input[0]
    sys.exit(f"no float Gather table indexed by the graph input {first!r}: name one with --tensor")


def perturbed(m, name, seed, fraction):
    """A copy of m whose initializer `name` has a `fraction` of its elements one ulp up or down."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    if seed == 0:
        return out
    rng = np.random.default_rng(seed)
    for i, t in enumerate(out.graph.initializer):
        if t.name != name:
            continue
        a = numpy_helper.to_array(t).astype(np.float32)
        up = rng.random(a.shape) < 0.5
        moved = rng.random(a.shape) < fraction
        b = np.where(up, np.nextafter(a, np.float32(np.inf)), np.nextafter(a, np.float32(-np.inf)))
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.where(moved, b, a).astype(np.float32), name))
        return out
    sys.exit(f"--tensor {name!r}: no such initializer")


def reciprocal_as_div(out):
    """Rewrites every Mul(x, Reciprocal(y)) (either operand order) of `out` as Div(x, y)."""
    prod = {o: n for n in out.graph.node for o in n.output}
    count = 0
    for n in out.graph.node:
        if n.op_type != "Mul":
            continue
        for k in (1, 0):
            r = prod.get(n.input[k])
            if r is not None and r.op_type == "Reciprocal":
                n.op_type = "Div"
                n.input[:] = [n.input[1 - k], r.input[0]]
                count += 1
                break
    # Reciprocals nobody reads any more are left for ONNX Runtime's dead-node elimination.
    return count


def weight_rows(name, prod, inits):
    """K of a 2-D weight: an initializer, or a DequantizeLinear of one (None otherwise)."""
    while name in prod and prod[name].op_type == "DequantizeLinear":
        name = prod[name].input[0]
    t = inits.get(name)
    return t.dims[0] if t is not None and len(t.dims) == 2 else None


def split_k(out):
    """Rewrites every MatMul(A, W) of `out` whose W is a 2-D weight with an even K as
    MatMul(A[..., :K/2], W[:K/2]) + MatMul(A[..., K/2:], W[K/2:])."""
    prod = {o: n for n in out.graph.node for o in n.output}
    inits = {t.name: t for t in out.graph.initializer}
    h = onnx.helper
    nodes, count = [], 0
    for n in out.graph.node:
        k = weight_rows(n.input[1], prod, inits) if n.op_type == "MatMul" else None
        if not k or k % 2:
            nodes.append(n)
            continue
        count += 1
        tag = f"split_k_{count}"
        consts = {"lo": [0], "mid": [k // 2], "hi": [k], "last": [-1], "first": [0]}
        for c, v in consts.items():
            out.graph.initializer.append(numpy_helper.from_array(np.array(v, dtype=np.int64), f"{tag}_{c}"))
        a, w, y = n.input[0], n.input[1], n.output[0]
        for half, (s0, s1) in (("a", ("lo", "mid")), ("b", ("mid", "hi"))):
            nodes.append(h.make_node("Slice", [a, f"{tag}_{s0}", f"{tag}_{s1}", f"{tag}_last"], [f"{tag}_x{half}"]))
            nodes.append(h.make_node("Slice", [w, f"{tag}_{s0}", f"{tag}_{s1}", f"{tag}_first"], [f"{tag}_w{half}"]))
            nodes.append(h.make_node("MatMul", [f"{tag}_x{half}", f"{tag}_w{half}"], [f"{tag}_y{half}"]))
        nodes.append(h.make_node("Add", [f"{tag}_ya", f"{tag}_yb"], [y], name=n.name))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return count


SPELLINGS = {"reciprocal-as-div": reciprocal_as_div, "split-k": split_k}


def respelled(m, names):
    """A copy of m with the rewrites `names` applied, and how many sites each changed."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    counts = {}
    for name in names:
        counts[name] = SPELLINGS[name](out)
        if counts[name] == 0:
            sys.exit(f"--spelling {name}: the graph has nothing to rewrite")
    return out, counts


def ort_ppl(model_bytes, path, ids, seq, windows, threads):
    """Bench-protocol perplexity of a serialized model; `path` is the file it was read from
    (a KV-cache graph's genai_config.json is looked up beside it)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    extra = cache_feeds(sess, path, seq)
    total, count = 0.0, 0
    for w in range(windows):
        x = ids[w * seq:(w + 1) * seq]
        logits = sess.run(None, {feed: x[None, :], **extra})[0][0]
        total += window_nll(logits, x)
        count += seq - 1
    return math.exp(total / count)


PLANS = {"int": [], "float": ["--no-int"], "as-is": ["--as-is"]}


def perqc_ppl(perqc, path, a, plan):
    cmd = [perqc, "eval", path, "-q", "--tokenizer", a.tokenizer, "--text", a.text,
           "--skip-chars", str(a.skip_chars), "--windows", str(a.windows), "--threads", str(a.threads)]
    cmd += PLANS[plan]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = re.findall(r"ppl[= ]+([0-9.]+)", r.stdout + r.stderr)
    if r.returncode != 0 or not found:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return float(found[-1])


def summary(label, rel):
    rel = np.array(rel) * 100
    sd = rel.std(ddof=1) if len(rel) > 1 else float("nan")
    print(f"{label}: mean {rel.mean():+.2f}%, mean |d| {np.abs(rel).mean():.2f}%, "
          f"sd {sd:.2f}% (SE {sd / math.sqrt(len(rel)):.2f}%), largest |d| {np.abs(rel).max():.2f}%, "
          f"within 0.5% / 1% on {int((np.abs(rel) <= 0.5).sum())} / {int((np.abs(rel) <= 1).sum())} of {len(rel)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("text")
    ap.add_argument("--seeds", type=int, default=8, help="perturbed copies (seed 0, the file itself, comes on top)")
    ap.add_argument("--tensor", help="float initializer to perturb (default: the token embedding table)")
    ap.add_argument("--fraction", type=float, default=1.0, help="share of its elements moved by one ulp")
    ap.add_argument("--skip-chars", type=int, default=200000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spelling", help="also score each copy after these round-off-only rewrites "
                    "(comma-separated): " + ", ".join(SPELLINGS))
    ap.add_argument("--perqc", help="also score every copy with this perqc binary")
    ap.add_argument("--perqc-plans", default="int,float",
                    help="perqc eval's plans to score with (comma-separated): " + ", ".join(PLANS))
    a = ap.parse_args()
    if a.seeds < 1 or not 0 < a.fraction <= 1:
        sys.exit("--seeds must be at least 1 and --fraction in (0, 1]")
    plans = a.perqc_plans.split(",") if a.perqc else []
    for p in plans:
        if p not in PLANS:
            sys.exit(f"--perqc-plans {p!r}: not one of {', '.join(PLANS)}")
    spellings = a.spelling.split(",") if a.spelling else []
    for s in spellings:
        if s not in SPELLINGS:
            sys.exit(f"--spelling {s!r}: not one of {', '.join(SPELLINGS)}")

    m = onnx.load(a.model)
    name = a.tensor or embedding_name(m)
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    ids = np.array(Tokenizer.from_file(a.tokenizer).encode(text[a.skip_chars:]).ids, dtype=np.int64)
    if len(ids) < a.windows * a.seq:
        sys.exit(f"{a.text}: {len(ids)} tokens from character {a.skip_chars} make fewer than {a.windows} windows")
    print(f"{a.model}: perturbing {name!r}, {a.fraction:g} of its elements by one ulp; "
          f"{a.windows} x {a.seq} tokens from character {a.skip_chars}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for seed in range(a.seeds + 1):
            p = perturbed(m, name, seed, a.fraction)
            blob = p.SerializeToString()
            row = {"ort": ort_ppl(blob, a.model, ids, a.seq, a.windows, a.threads)}
            if spellings:
                q, counts = respelled(p, spellings)
                if seed == 0:
                    print("--spelling: " + ", ".join(f"{k} at {v} sites" for k, v in counts.items()), flush=True)
                row["ort-respelled"] = ort_ppl(q.SerializeToString(), a.model, ids, a.seq, a.windows, a.threads)
            if a.perqc:
                path = os.path.join(d, "copy.onnx")
                with open(path, "wb") as f:
                    f.write(blob)
                for plan in plans:
                    row[plan] = perqc_ppl(a.perqc, path, a, plan)
            rows.append(row)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)

    base = rows[0]["ort"]
    print()
    summary("ORT, perturbed copy - the file", [r["ort"] / base - 1 for r in rows[1:]])
    if spellings:
        summary(f"ORT, respelled ({a.spelling}) - ORT on the same copy",
                [r["ort-respelled"] / r["ort"] - 1 for r in rows])
    for plan in plans:
        summary(f"perqc eval {' '.join(PLANS[plan]) or '(integer plan)'} - ORT on the same copy",
                [r[plan] / r["ort"] - 1 for r in rows])


if __name__ == "__main__":
    main()
