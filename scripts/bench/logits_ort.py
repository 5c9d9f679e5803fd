#!/usr/bin/env python3
"""How far a transformed model's logits are from the original's, under ONNX Runtime (CPU).

usage: logits_ort.py ORIGINAL.onnx TRANSFORMED.onnx TOKENIZER.json TEXT.txt
                     [--skip-chars N] [--seq 512] [--windows 4] [--threads T]

Both models run on the same windows of the text (the bench protocol's tokenization and
windows, see ppl_ort.py). Per window and overall it prints the relative error
max |a - b| / max |a| of the logits (a: original), and the perplexity of both over the
windows; `rel_err=<value>` last. An exact transform (perqc --no-quantize) must give a
relative error within float round-off (the issue's bound: 1e-4).
"""
import argparse
import math
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ppl_ort import cache_feeds, window_nll


def main():
    ap = argparse.ArgumentParser(description="logits of two models compared under ONNX Runtime")
    ap.add_argument("original")
    ap.add_argument("transformed")
    ap.add_argument("tokenizer")
    ap.add_argument("text")
    ap.add_argument("--skip-chars", type=int, default=0)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    ids = np.array(Tokenizer.from_file(a.tokenizer).encode(text[a.skip_chars:]).ids, dtype=np.int64)
    n = min(a.windows, len(ids) // a.seq)
    if n == 0:
        sys.exit(f"{a.text}: {len(ids)} tokens make no window of {a.seq}")
    opts = ort.SessionOptions()
    if a.threads:
        opts.intra_op_num_threads = a.threads
    sessions = []
    for path in (a.original, a.transformed):
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        sessions.append((s, s.get_inputs()[0].name, cache_feeds(s, path, a.seq)))
    err = top = 0.0
    nll = [0.0, 0.0]
    for w in range(n):
        x = ids[w * a.seq:(w + 1) * a.seq]
        out = [s.run(None, {feed: x[None, :], **extra})[0][0] for s, feed, extra in sessions]
        e = float(np.abs(out[0] - out[1]).max())
        m = float(np.abs(out[0]).max())
        err, top = max(err, e), max(top, m)
        for k in range(2):
            nll[k] += window_nll(out[k], x)
        print(f"window {w + 1}/{n}: max abs error {e:.3e}, relative {e / m:.3e}", flush=True)
    count = n * (a.seq - 1)
    print(f"ppl original={math.exp(nll[0] / count):.4f} transformed={math.exp(nll[1] / count):.4f}")
    print(f"rel_err={err / top:.3e}")


if __name__ == "__main__":
    main()
