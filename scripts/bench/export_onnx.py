#!/usr/bin/env python3
"""Export a float32 causal LM in Hugging Face layout to ONNX with torch.onnx.

usage: export_onnx.py HF_DIR OUT.onnx --exporter torchscript|dynamo [--opset 18] [--kv-cache | --half]
                      [--attn eager|sdpa]

The graph takes input_ids [batch, seq] int64 and returns logits [batch, seq, vocab]
(no KV cache, attention over all positions with the causal mask, eager attention unless
`--attn sdpa`, transformers' default, which torch decomposes differently).
`--kv-cache` (torchscript only) writes the interface optimum's deployment exports have:
inputs input_ids, attention_mask [batch, past + seq] and past_key_values.{i}.key/value
[batch, kv_heads, past, head_dim]; outputs logits and present.{i}.key/value (the cache with
this step's keys and values appended).
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


class WithCache(torch.nn.Module):
    """(input_ids, attention_mask, past key/value per layer...) -> (logits, present key/value
    per layer...), the cache passed as a transformers DynamicCache."""

    def __init__(self, lm, config):
        super().__init__()
        self.m = lm
        self.config = config
        self.layers = config.num_hidden_layers

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                     use_cache=True)
        present = []
        for layer in out.past_key_values.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_names(layers):
    """The past (input) and present (output) names, layer by layer, key before value."""
    past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    return past, present


def cache_example(config, vocab, batch, seq, past_len, gen):
    """Example inputs of a WithCache model: ids, an all-ones mask and random past keys/values."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    past = [torch.randn(batch, kv, past_len, hd, generator=gen)
            for _ in range(2 * config.num_hidden_layers)]
    return ids, mask, past


def export_with_cache(model, path, example, opset=18):
    """Exports a WithCache model with the torchscript exporter, batch, sequence, past and total
    lengths dynamic."""
    past_names, present_names = cache_names(model.layers)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    ids, mask, past = example
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask, *past), path, dynamo=False, opset_version=opset,
                          input_names=["input_ids", "attention_mask"] + past_names,
                          output_names=["logits"] + present_names, dynamic_axes=axes)


def cache_error(model, path, shapes, gen, vocab, half_inputs=False):
    """max over outputs of max|ort - torch| / max|torch| on (batch, seq, past) inputs;
    `half_inputs`: the ONNX file takes its cache in float16 (torch gets the same values)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    past_names, _ = cache_names(model.layers)
    worst = 0.0
    for batch, seq, past_len in shapes:
        ids, mask, past = cache_example(model.config, vocab, batch, seq, past_len, gen)
        if half_inputs:
            past = [p.half().float() for p in past]
        with torch.no_grad():
            ref = [t.numpy() for t in model(ids, mask, *past)]
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        feeds.update({n: (t.half() if half_inputs else t).numpy() for n, t in zip(past_names, past)})
        got = sess.run(None, feeds)
        rel = max(float(np.abs(g.astype(np.float32) - r).max() / np.abs(r).max())
                  for g, r in zip(got, ref))
        print(f"  ORT vs torch (batch {batch}, seq {seq}, past {past_len}): {rel:.2e}")
        worst = max(worst, rel)
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--exporter", choices=["torchscript", "dynamo"], required=True)
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--kv-cache", action="store_true")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                    help="the attention implementation traced (sdpa: transformers' default)")
    ap.add_argument("--half", action="store_true",
                    help="export the model in float16 (torchscript, no cache); checked against the float32 model")
    a = ap.parse_args()

    lm = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32, attn_implementation=a.attn)
    vocab = lm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    if a.kv_cache:
        if a.exporter != "torchscript":
            raise SystemExit("--kv-cache: torchscript exporter only")
        model = WithCache(lm, lm.config).eval()
        export_with_cache(model, a.out, cache_example(lm.config, vocab, 1, 5, 3, gen), a.opset)
        worst = cache_error(model, a.out, [(1, 9, 4), (2, 5, 0)], gen, vocab)
        if not worst < 1e-3:
            raise SystemExit(f"{a.out}: ONNX Runtime disagrees with torch ({worst:.2e})")
        return
    lm.config.use_cache = False
    model = Logits(lm).eval()
    example = torch.randint(0, vocab, (1, 11), generator=gen)
    if a.half:
        if a.exporter != "torchscript":
            raise SystemExit("--half: torchscript exporter only")
        reference = model  # the float32 model the half one is checked against
        model = Logits(AutoModelForCausalLM.from_pretrained(
            a.hf_dir, dtype=torch.float32, attn_implementation=a.attn).half()).eval()
        model.m.config.use_cache = False

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
            ref = (reference if a.half else model)(ids).numpy()
        got = sess.run(None, {"input_ids": ids.numpy()})[0].astype(np.float32)
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        print(f"  ORT vs torch on {shape[0]} x {shape[1]} tokens: max abs diff / max abs = {rel:.2e}")
        worst = max(worst, rel)
    # A half model's own rounding (11 significant bits per op, through 30 layers) is the
    # bound there.
    if not worst < (5e-2 if a.half else 1e-3):
        raise SystemExit(f"{a.out}: ONNX Runtime disagrees with torch ({worst:.2e})")


if __name__ == "__main__":
    main()
