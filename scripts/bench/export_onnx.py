#!/usr/bin/env python3
"""Export a float32 causal LM in Hugging Face layout to ONNX with torch.onnx.

usage: export_onnx.py HF_DIR OUT.onnx --exporter torchscript|dynamo [--opset 18]

The graph takes input_ids [batch, seq] int64 and returns logits [batch, seq, vocab]
(no KV cache, attention over all positions with the causal mask, eager attention).
`torchscript` is torch.onnx's tracing exporter (one file, weights inline); `dynamo` is the
torch.export-based one (named weights in OUT.onnx.data next to the graph). Afterwards the
model is run with ONNX Runtime on two inputs of other shapes than the one traced and compared
with torch; the script fails when max|ort - torch| / max|torch| exceeds 1e-3.
"""
import argparse
import collections
import warnings

import numpy as np
import torch
from transformers import AutoModelForCausalLM


class Logits(torch.nn.Module):
    """input_ids -> logits, with an all-ones attention mask passed explicitly (without one,
    transformers inserts a data-dependent check for packed sequences into the trace)."""

    def __init__(self, lm):
        super().__init__()
        self.m = lm  # the attribute name prefixes every node and weight name: /m/model/...

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids)
        return self.m(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--exporter", choices=["torchscript", "dynamo"], required=True)
    ap.add_argument("--opset", type=int, default=18)
    a = ap.parse_args()

    lm = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32, attn_implementation="eager")
    lm.config.use_cache = False
    model = Logits(lm).eval()
    vocab = lm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, vocab, (1, 11), generator=gen)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and deprecation warnings, expected
        if a.exporter == "torchscript":
            torch.onnx.export(
                model, (example,), a.out, dynamo=False, opset_version=a.opset,
                input_names=["input_ids"], output_names=["logits"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(
                model, (example,), a.out, dynamo=True, opset_version=a.opset,
                input_names=["input_ids"], output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}})

    import onnx
    import onnxruntime as ort

    g = onnx.load(a.out, load_external_data=False).graph
    ops = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in g.node)
    print(f"{a.out}: {len(g.node)} nodes, {len(g.initializer)} initializers; "
          + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)) + ", ...")
    sess = ort.InferenceSession(a.out, providers=["CPUExecutionProvider"])
    worst = 0.0
    for shape in [(1, 37), (2, 5)]:
        ids = torch.randint(0, vocab, shape, generator=gen)
        with torch.no_grad():
            ref = model(ids).numpy()
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        print(f"  ORT vs torch on {shape[0]} x {shape[1]} tokens: max abs diff / max abs = {rel:.2e}")
        worst = max(worst, rel)
    if not worst < 1e-3:
        raise SystemExit(f"{a.out}: ONNX Runtime disagrees with torch ({worst:.2e})")


if __name__ == "__main__":
    main()
