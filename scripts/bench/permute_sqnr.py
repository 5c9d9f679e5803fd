#!/usr/bin/env python3
"""Calibrated permutations (MassDiff, TokenMax) against none, by the down_proj's quantized SQNR.

usage: scripts/bench/permute_sqnr.py [BENCH_DIR] [--perqc target/release/perqc]
                                     [--blocks 16,32,64,128] [--methods massdiff,tokenmax]
                                     [--keep DIR]

For each block size b, each calibrated method of --methods (default massdiff) and
`--permute identity`, runs
`perqc inspect MODEL --sqnr --json` on SmolLM2 with the bench's calibration text (the
default recipe otherwise: full R1 and R2, online block Hadamard of b before every
down_proj) and prints, per b, the down_proj's output SQNR after all the transforms (W4
RTN per channel with MSE scales, A4 per token at clip 1, on sampled calibration rows:
docs/sqnr.md), as the mean over the 30 layers and the layers where each method is ahead
of no permutation. Unlike
perplexity, which a 4-bit model's rounding chaos moves by percents from any change, this
is the layer-local quantity the permutation acts on. With --keep the JSON reports are kept
in DIR and reused when present. BENCH_DIR defaults to $PERQC_BENCH_DIR, else
~/.cache/perqc-bench (scripts/bench-setup). Prints a markdown table.
"""
import argparse
import json
import os
import subprocess
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("bench", nargs="?", default=os.environ.get("PERQC_BENCH_DIR", os.path.expanduser("~/.cache/perqc-bench")))
ap.add_argument("--perqc", default="target/release/perqc")
ap.add_argument("--blocks", default="16,32,64,128")
ap.add_argument("--keep", default=None)
ap.add_argument("--methods", default="massdiff", help="calibrated methods to set against no permutation, comma-separated")
a = ap.parse_args()

model = os.path.join(a.bench, "smollm2", "model.onnx")
tok = os.path.join(a.bench, "smollm2", "hf", "tokenizer.json")
text = os.path.join(a.bench, "corpus", "handbook.txt")
out_dir = a.keep or tempfile.mkdtemp(prefix="perqc-permute-sqnr-")
os.makedirs(out_dir, exist_ok=True)


def down_proj(b, method):
    path = os.path.join(out_dir, f"sqnr_{b}_{method}.json")
    if not os.path.isfile(path):
        cmd = [a.perqc, "inspect", model, "--sqnr", "--calib-text", text, "--tokenizer", tok,
               "--block-size", str(b), "--permute", method, "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        with open(path, "w") as f:
            f.write(r.stdout)
    with open(path) as f:
        report = json.load(f)
    return [l["stages"][-1]["sqnr_db"] for l in report["linears"] if "down_proj" in l["name"]]


methods = a.methods.split(",")
print("| b | no permutation | " + " | ".join(f"{m} (difference, layers ahead)" for m in methods) + " |")
print("|---|---|" + "---|" * len(methods))
for b in [int(x) for x in a.blocks.split(",")]:
    ident = down_proj(b, "identity")
    i = sum(ident) / len(ident)
    cells = []
    for method in methods:
        md = down_proj(b, method)
        ahead = sum(x > y for x, y in zip(md, ident))
        m = sum(md) / len(md)
        cells.append(f"{m:.2f} dB ({m - i:+.2f}, {ahead} of {len(md)})")
    print(f"| {b} | {i:.2f} dB | " + " | ".join(cells) + " |")
