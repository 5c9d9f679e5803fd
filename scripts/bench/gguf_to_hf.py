#!/usr/bin/env python3
"""Dequantize a Llama-architecture GGUF file into a float32 model in Hugging Face layout.

usage: gguf_to_hf.py MODEL.gguf OUT_DIR

Reads every tensor with the `gguf` package, dequantizes it to float32, renames it from
llama.cpp's names to transformers' LlamaForCausalLM names and undoes the row interleaving
that llama.cpp applies to the query and key projections (its rotary embedding pairs
neighbouring rows; transformers' pairs the two halves of each head). Writes OUT_DIR/
config.json (from the GGUF metadata), model.safetensors and the tokenizer (tokenizer.json,
converted from the GGUF vocabulary by transformers).
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name):
    stem, kind = gguf_name.rsplit(".", 1)  # kind: weight or bias
    parts = stem.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{PER_LAYER[parts[2]]}.{kind}"
    return f"{GLOBAL[stem]}.{kind}"


def unpermute_rows(w, heads):
    """Inverse of llama.cpp's permute: within each head, rows (i, j) for i < d/2, j < 2
    were stored at position 2i + j; transformers wants them at j * d/2 + i."""
    d = w.shape[0] // heads
    return np.ascontiguousarray(w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    r = GGUFReader(src)
    arch = field(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"{src}: architecture {arch!r}, this converter handles llama only")
    heads = int(field(r, "llama.attention.head_count"))
    kv_heads = int(field(r, "llama.attention.head_count_kv", heads))
    hidden = int(field(r, "llama.embedding_length"))

    tensors = {}
    for t in r.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, kv_heads)
        tensors[name] = w
    tied = "lm_head.weight" not in tensors
    vocab = tensors["model.embed_tokens.weight"].shape[0]

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(field(r, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(r, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(field(r, "llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(field(r, "llama.context_length")),
        "rms_norm_eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(field(r, "llama.rope.freq_base", 10000.0))},
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
        "mlp_bias": "model.layers.0.mlp.up_proj.bias" in tensors,
        "tie_word_embeddings": tied,
        "bos_token_id": field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(r, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(r, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "use_cache": False,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    from transformers import AutoTokenizer  # the GGUF vocabulary -> tokenizer.json converter

    d, name = os.path.split(os.path.abspath(src))
    AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
    n = sum(w.size for w in tensors.values())
    print(f"{len(tensors)} tensors, {n:,} float32 parameters{' (lm_head tied to the embedding)' if tied else ''} -> {out}")


if __name__ == "__main__":
    main()
