#!/usr/bin/env python3
"""MassDiff against no permutation, by the down_proj's quantized SQNR.

usage: scripts/bench/permute_sqnr.py [BENCH_DIR] [--perqc target/release/perqc]
                                     [--blocks 16,32,64,128] [--keep DIR]

For each block size b and each of `--permute massdiff` and `--permute identity`, runs
`perqc inspect MODEL --sqnr --json` on SmolLM2 with the bench's calibration text (the
default recipe otherwise: full R1 and R2, online block Hadamard of b before every
down_proj) and prints, per b, the down_proj's output SQNR after all the transforms (W4
RTN per channel with MSE scales, A4 per token at clip 1, on sampled calibration rows:
docs/sqnr.md), as the mean over the 30 layers and the layers where MassDiff is ahead. Unlike
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


print("| b | down_proj SQNR, MassDiff | no permutation | difference | layers MassDiff is ahead |")
print("|---|---|---|---|---|")
for b in [int(x) for x in a.blocks.split(",")]:
    md, ident = down_proj(b, "massdiff"), down_proj(b, "identity")
    ahead = sum(x > y for x, y in zip(md, ident))
    m, i = sum(md) / len(md), sum(ident) / len(ident)
    print(f"| {b} | {m:.2f} dB | {i:.2f} dB | {m - i:+.2f} dB | {ahead} of {len(md)} |")
