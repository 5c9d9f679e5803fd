#!/usr/bin/env python3
"""Perplexity of an ONNX causal LM under ONNX Runtime (CPU), by the bench protocol.

usage: ppl_ort.py MODEL.onnx TOKENIZER.json TEXT.txt [--skip-chars N] [--seq 512] [--windows 16] [--threads T]

The protocol (docs/eval.md; `perqc eval` implements the same): the text from character
--skip-chars on is tokenized in one piece with the `tokenizers` package (Tokenizer.encode,
special tokens as the tokenizer's post-processor adds them) and cut into consecutive,
non-overlapping windows of --seq tokens; the first --windows complete windows are scored.
Each window is one forward pass (input_ids [1, seq] int64 -> logits [1, seq, vocab]; a graph
that takes a KV cache, as ONNX Runtime's model builder writes them, gets an empty past, an
all-ones attention_mask and position_ids 0..seq-1, as `perqc eval` feeds it); the
logits at positions 0..seq-2 score the tokens at 1..seq-1 with a float64 log-softmax.
ppl = exp(total negative log-likelihood / number of scored tokens). Prints one line per
window, then `tokens=... seconds=...` and `ppl=<value>` last.
"""
import argparse
import math
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def window_nll(logits, ids):
    """Sum over positions t < len-1 of -log softmax(logits[t])[ids[t+1]], in float64."""
    z = logits[:-1].astype(np.float64)
    top = z.max(axis=-1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=-1))
    picked = z[np.arange(len(z)), ids[1:]]
    return float((log_norm - picked).sum())


def cache_feeds(sess, model, seq):
    """Inputs besides input_ids for a KV-cache graph: past key/values empty ([1, heads, 0,
    head_size]), attention_mask all ones, position_ids 0..seq-1. A symbolic head size is read
    from the genai_config.json the model builder writes beside the model."""
    feeds = {}
    for i in sess.get_inputs()[1:]:
        if "past" in i.name:
            dims = list(i.shape)
            if not isinstance(dims[-1], int):
                import json, os
                cfg = os.path.join(os.path.dirname(os.path.abspath(model)), "genai_config.json")
                if not os.path.exists(cfg):
                    sys.exit(f"{i.name}: symbolic head size {dims[-1]!r} and no {cfg}")
                with open(cfg) as f:
                    dims[-1] = json.load(f)["model"]["decoder"]["head_size"]
            shape = [1, dims[1], 0, dims[-1]]
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, seq), dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(seq, dtype=np.int64)[None, :]
        else:
            sys.exit(f"input {i.name!r}: not input_ids, attention_mask, position_ids or a past key/value")
    return feeds


def main():
    ap = argparse.ArgumentParser(description="perplexity with ONNX Runtime (bench protocol)")
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("text")
    ap.add_argument("--skip-chars", type=int, default=0)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--opt-level", choices=["disable", "basic", "extended", "all"], default="all",
                    help="ORT graph optimization level (default: all, ORT's default)")
    a = ap.parse_args()
    if a.seq < 2 or a.windows < 1:
        sys.exit("--seq must be at least 2 and --windows at least 1")

    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    if a.skip_chars >= len(text):
        sys.exit(f"{a.text}: --skip-chars {a.skip_chars} is past the end ({len(text)} characters)")
    ids = np.array(Tokenizer.from_file(a.tokenizer).encode(text[a.skip_chars:]).ids, dtype=np.int64)
    n = min(a.windows, len(ids) // a.seq)
    if n == 0:
        sys.exit(f"{a.text}: {len(ids)} tokens make no window of {a.seq}")
    if n < a.windows:
        print(f"note: only {n} complete windows of {a.seq} tokens in {len(ids)} tokens", file=sys.stderr)

    opts = ort.SessionOptions()
    if a.threads:
        opts.intra_op_num_threads = a.threads
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[a.opt_level]
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    extra = cache_feeds(sess, a.model, a.seq)

    total, count, start = 0.0, 0, time.perf_counter()
    for w in range(n):
        x = ids[w * a.seq:(w + 1) * a.seq]
        logits = sess.run(None, {feed: x[None, :], **extra})[0][0]
        total += window_nll(logits, x)
        count += a.seq - 1
        print(f"window {w + 1}/{n}: running ppl {math.exp(total / count):.4f}", flush=True)
    print(f"tokens={count} seconds={time.perf_counter() - start:.1f}")
    print(f"ppl={math.exp(total / count):.4f}")


if __name__ == "__main__":
    main()
