#!/usr/bin/env python3
"""How many calibration sequences MassDiff's statistics need.

usage: scripts/bench/permute_seqs.py [BENCH_DIR] [--perqc target/release/perqc]
                                     [--seqs 16,8,4,2] [--blocks 16,32]

For each block size and each N in --seqs, runs `perqc MODEL --no-quantize --permute-seqs N`
on SmolLM2 with the bench's calibration text (16 sequences of 512 tokens) and
PERQC_DUMP_PERMUTATIONS set, so the permute pass writes each mlp region's channel masses
(mean |x| over the sequences it ran) and the permutation it chose. Every permutation is
then scored on the masses of all 16 sequences: the block spread, max over mean block mass
(1 is perfectly even), averaged over the 30 layers, against the spread before permuting
and the one the all-sequence permutation reaches; and the calibration pass's time as the
run printed it. BENCH_DIR defaults to $PERQC_BENCH_DIR, else ~/.cache/perqc-bench
(scripts/bench-setup). Prints a markdown table.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("bench", nargs="?", default=os.environ.get("PERQC_BENCH_DIR", os.path.expanduser("~/.cache/perqc-bench")))
ap.add_argument("--perqc", default="target/release/perqc")
ap.add_argument("--seqs", default="16,8,4,2")
ap.add_argument("--blocks", default="16,32")
a = ap.parse_args()

model = os.path.join(a.bench, "smollm2", "model.onnx")
tok = os.path.join(a.bench, "smollm2", "hf", "tokenizer.json")
text = os.path.join(a.bench, "corpus", "handbook.txt")
seqs = [int(s) for s in a.seqs.split(",")]
if 16 not in seqs:
    seqs = [16] + seqs


def spread(mass, b):
    sums = [sum(mass[i:i + b]) for i in range(0, len(mass), b)]
    return max(sums) / (sum(sums) / len(sums))


def run(n, b, tmp):
    dump = os.path.join(tmp, f"perm_{b}_{n}.jsonl")
    env = dict(os.environ, PERQC_DUMP_PERMUTATIONS=dump)
    cmd = [a.perqc, model, "-o", os.path.join(tmp, "out.onnx"), "--no-quantize",
           "--block-size", str(b), "--permute-seqs", str(n),
           "--calib-text", text, "--tokenizer", tok]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    secs = re.search(r"^calibration: ([0-9.]+)(m?s)$", r.stderr, re.M)
    t = float(secs.group(1)) / (1000 if secs.group(2) == "ms" else 1) if secs else float("nan")
    with open(dump) as f:
        return [json.loads(line) for line in f], t


print("| block | sequences | spread before | spread after (all-sequence masses) | worst layer / all-sequence permutation | calibration pass |")
print("|---|---|---|---|---|---|")
with tempfile.TemporaryDirectory() as tmp:
    for b in [int(x) for x in a.blocks.split(",")]:
        runs = {n: run(n, b, tmp) for n in seqs}
        full, _ = runs[16]
        before = sum(spread(r["mass"], b) for r in full) / len(full)
        best = [spread([r["mass"][i] for i in r["perm"]], b) for r in full]
        for n in seqs:
            regions, t = runs[n]
            assert [r["activation"] for r in regions] == [r["activation"] for r in full]
            after = [spread([f["mass"][i] for i in r["perm"]], b) for f, r in zip(full, regions)]
            worst = max(x / y for x, y in zip(after, best))
            print(f"| {b} | {n} | {before:.4f} | {sum(after) / len(after):.4f} | {worst:.4f} | {t:.1f} s |")
