#!/usr/bin/env python3
"""A weight-only file with its activations spelled as 8-bit per-token quantizers.

usage: scripts/bench/weight_only_act8.py IN.onnx OUT.onnx [--asymmetric]

Puts an `ai.perqc::FakeQuantize(bits = 8, symmetric = 1)` (or asymmetric) in front of every
MatMul whose weight is a DequantizeLinear output, one per activation (q/k/v share one), and
writes OUT.onnx. `perqc eval OUT.onnx --no-int` then scores, in float, the activation codes
`fuse-int-linear` gives weight-only linears (symmetric) or the asymmetric alternative:
docs/runtime.md "Weight-only linears" compares the two on the w4a16 preset's file. Only perqc
runs the result (ONNX Runtime has no ai.perqc ops). Run with the repository's .venv
(scripts/setup-python) or the bench's venv (scripts/bench-setup).
"""
import argparse

import onnx
from onnx import helper

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("dst")
ap.add_argument("--asymmetric", action="store_true")
a = ap.parse_args()

m = onnx.load(a.src)
dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
nodes, made = [], {}
for n in m.graph.node:
    if n.op_type == "MatMul" and n.input[1] in dq:
        x = n.input[0]
        if x not in made:
            y = x + ".a8"
            nodes.append(helper.make_node("FakeQuantize", [x], [y], name=y, domain="ai.perqc",
                                          bits=8, symmetric=0 if a.asymmetric else 1))
            made[x] = y
        n.input[0] = made[x]
    nodes.append(n)
del m.graph.node[:]
m.graph.node.extend(nodes)
if not any(o.domain == "ai.perqc" for o in m.opset_import):
    m.opset_import.append(helper.make_opsetid("ai.perqc", 1))
onnx.save(m, a.dst)
print(f"{a.dst}: {len(made)} activations quantized to 8 bits "
      f"({'asymmetric' if a.asymmetric else 'symmetric'})")
