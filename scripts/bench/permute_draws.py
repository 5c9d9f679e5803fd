#!/usr/bin/env python3
"""Permutation methods by perplexity over several draws of the rounding chaos.

usage: scripts/bench/permute_draws.py [BENCH_DIR] [--perqc target/release/perqc]
                                      [--methods massdiff,tokenmax] [--blocks 16,32]
                                      [--seqs 4,8,16] [--python PY] [--keep DIR]
                                      [--args "EXTRA PERQC ARGS"] [--offsets 0,8192,...]
                                      [--model ONNX]

A W4A4 model's perplexity moves by percents with any change to its rounding (docs/
quantization.md: a flipped 4-bit code propagates through every later layer), so one
compile per method orders two close methods by chance. This compiles SmolLM2 with the
default recipe (GPTQ and the clip search) at each block size of --blocks, with each method
of --methods, once per value of --permute-seqs in --seqs (how many of the 16 calibration
sequences the permutation's statistics read: each value is a different, equally valid
draw), scores every file with ONNX Runtime on the bench protocol (scripts/bench/ppl_ort.py,
16 windows of 512 tokens) and prints, per block size and method, every draw and their
geometric mean. --python is the interpreter with onnxruntime and tokenizers (default: the
bench's venv). --args adds perqc arguments to every compile (say "--permute-stats
quantized"); they are part of the cache key. --offsets draws by calibration data instead of
by --permute-seqs (which has no effect with --permute-stats quantized): each offset is a
draw that calibrates on the 16 x 512 tokens starting at that token of the protocol's
calibration text (characters [0, 200000): about 44k tokens, so 0, 8192, 16384, 24576 and
32768 are five disjoint draws), passed as --calib-ids. With --keep the perplexities are cached in DIR/draws.json and reused.
--model compiles another export of SmolLM2 (say the KV-cache one, docs/quantization.md) instead
of BENCH_DIR/smollm2/model.onnx; the cache key does not name it, so give it its own --keep.
--native also scores every file with `perqc eval` (the integer plan) and `perqc eval --no-int`
(perqc's float kernels on the same graph), same protocol, and prints a second table: per
draw the three perplexities and each perqc plan's difference from ONNX Runtime, then the
mean signed and mean absolute differences over all draws (how far the rounding chaos moves
equally valid summation orders apart, docs/runtime.md).
BENCH_DIR defaults to $PERQC_BENCH_DIR, else ~/.cache/perqc-bench (scripts/bench-setup).
Prints a markdown table.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("bench", nargs="?", default=os.environ.get("PERQC_BENCH_DIR", os.path.expanduser("~/.cache/perqc-bench")))
ap.add_argument("--perqc", default="target/release/perqc")
ap.add_argument("--methods", default="massdiff,tokenmax")
ap.add_argument("--blocks", default="16,32")
ap.add_argument("--seqs", default="4,8,16")
ap.add_argument("--python", default=None)
ap.add_argument("--keep", default=None)
ap.add_argument("--args", default="")
ap.add_argument("--offsets", default=None)
ap.add_argument("--model", default=None)
ap.add_argument("--native", action="store_true",
                help="also score each file with perqc eval, integer plan and --no-int")
a = ap.parse_args()

model = a.model or os.path.join(a.bench, "smollm2", "model.onnx")
tok = os.path.join(a.bench, "smollm2", "hf", "tokenizer.json")
text = os.path.join(a.bench, "corpus", "handbook.txt")
python = a.python or os.path.join(a.bench, "venv", "bin", "python")
ppl_ort = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppl_ort.py")
work = a.keep or tempfile.mkdtemp(prefix="perqc-permute-draws-")
os.makedirs(work, exist_ok=True)
cache_path = os.path.join(work, "draws.json")
cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}


def calib_ids(offset):
    """A .npy of the 16 x 512 calibration tokens from `offset` of the protocol's text."""
    path = os.path.join(work, f"calib-{offset}.npy")
    if not os.path.isfile(path):
        code = ("import sys, numpy; from tokenizers import Tokenizer; "
                "ids = Tokenizer.from_file(sys.argv[1]).encode(open(sys.argv[2], encoding='utf-8')"
                ".read()[:200000]).ids[int(sys.argv[3]):int(sys.argv[3]) + 16 * 512]; "
                "assert len(ids) == 16 * 512, len(ids); "
                "numpy.save(sys.argv[4], numpy.array(ids, dtype=numpy.int64))")
        subprocess.run([python, "-c", code, tok, text, str(offset), path], check=True)
    return path


def key_of(b, method, draw):
    """The cache key of one compile's ONNX Runtime perplexity."""
    d = f"offset{draw[1]}" if isinstance(draw, tuple) else f"{draw}"
    return f"{b}/{method}/{d}" + (f"/{a.args}" if a.args else "")


def ppl(b, method, draw):
    """ppl of one compile; `draw` is a --permute-seqs value, or ("offset", N)."""
    if isinstance(draw, tuple):
        calib = ["--calib-ids", calib_ids(draw[1])]
    else:
        calib = ["--calib-text", text, "--tokenizer", tok, "--permute-seqs", str(draw)]
    key = key_of(b, method, draw)
    native = [key + "/perqc-int", key + "/perqc-float"] if a.native else []
    if any(k not in cache for k in [key] + native):
        out = os.path.join(work, "draw.onnx")
        subprocess.run([a.perqc, model, "-o", out] + calib +
                       ["--block-size", str(b), "--permute", method] + a.args.split(),
                       check=True, capture_output=True)
        r = subprocess.run([python, ppl_ort, out, tok, text, "--skip-chars", "200000",
                            "--windows", "16", "--threads", "2"],
                           check=True, capture_output=True, text=True)
        cache[key] = float(r.stdout.strip().splitlines()[-1].split("=")[1])
        for k, extra in zip(native, [[], ["--no-int"]]):
            r = subprocess.run([a.perqc, "eval", out, "--tokenizer", tok, "--text", text,
                                "--skip-chars", "200000", "--windows", "16"] + extra,
                               check=True, capture_output=True, text=True)
            line = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("ppl=")][-1]
            cache[k] = float(line.split("=")[1])
        os.remove(out)
        with open(cache_path + ".tmp", "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(cache_path + ".tmp", cache_path)
    return cache[key]


if a.offsets:
    draws_of = [("offset", int(s)) for s in a.offsets.split(",")]
    heads = [f"calibration from token {d[1]}" for d in draws_of]
else:
    draws_of = [int(s) for s in a.seqs.split(",")]
    heads = [f"--permute-seqs {s}" for s in draws_of]
print("| b | method | " + " | ".join(heads) + " | geometric mean |")
print("|---|---|" + "---|" * (len(draws_of) + 1))
for b in a.blocks.split(","):  # sizes, or "full" (one Hadamard; no permutation)
    for method in a.methods.split(","):
        draws = [ppl(b, method, d) for d in draws_of]
        mean = math.exp(sum(math.log(p) for p in draws) / len(draws))
        print(f"| {b} | {method} | " + " | ".join(f"{p:.2f}" for p in draws) + f" | {mean:.2f} |",
              flush=True)

if a.native:
    print()
    print("| b | method | draw | ONNX Runtime | perqc integer plan | perqc --no-int |")
    print("|---|---|---|---|---|---|")
    pairs = {"perqc int plan against ONNX Runtime": [],
             "perqc float plan against ONNX Runtime": [],
             "perqc int plan against perqc float plan": []}
    means = []
    for b in a.blocks.split(","):
        for method in a.methods.split(","):
            cols = []
            for d, head in zip(draws_of, heads):
                key = key_of(b, method, d)
                o, i, f = cache[key], cache[key + "/perqc-int"], cache[key + "/perqc-float"]
                cols.append((o, i, f))
                for ds, r in zip(pairs.values(), [i / o, f / o, i / f]):
                    ds.append(r - 1)
                print(f"| {b} | {method} | {head} | {o:.4f} | {i:.4f} ({100 * (i / o - 1):+.2f}%) "
                      f"| {f:.4f} ({100 * (f / o - 1):+.2f}%) |")
            g = [math.exp(sum(math.log(c[j]) for c in cols) / len(cols)) for j in range(3)]
            means.append(f"| {b} | {method} | geometric mean | {g[0]:.2f} | {g[1]:.2f} "
                         f"({100 * (g[1] / g[0] - 1):+.2f}%) | {g[2]:.2f} ({100 * (g[2] / g[0] - 1):+.2f}%; "
                         f"int plan {100 * (g[1] / g[2] - 1):+.2f}% from it) |")
    for line in means:
        print(line)
    for name, ds in pairs.items():
        print(f"{name} over {len(ds)} files: mean "
              f"{100 * sum(ds) / len(ds):+.2f}%, mean |difference| "
              f"{100 * sum(abs(x) for x in ds) / len(ds):.2f}%, standard deviation "
              f"{100 * statistics.stdev(ds):.2f}% (standard error of the mean "
              f"{100 * statistics.stdev(ds) / math.sqrt(len(ds)):.2f}%), largest "
              f"{100 * max(ds, key=abs):+.2f}%, within 1%: {sum(abs(x) <= 0.01 for x in ds)}, "
              f"within 0.5%: {sum(abs(x) <= 0.005 for x in ds)}")
