//! Tests of the op table and shape inference on graphs built with the IR API.

use crate::*;
use perqc_ir::graph::{AttrValue, Graph, NodeSpec, ValueId};
use perqc_ir::{DType, Dim, Tensor, Type};

// ---- a tiny graph builder ----

/// `"batch"` -> Sym, `"64"` -> Known, `"?"` -> Unknown.
fn dim(s: &str) -> Dim {
    match s {
        "?" => Dim::Unknown,
        _ => s.parse().map_or_else(|_| Dim::Sym(s.into()), Dim::Known),
    }
}

fn shape(s: &[&str]) -> Vec<Dim> {
    s.iter().map(|d| dim(d)).collect()
}

struct B {
    g: Graph,
    opset: i64,
}

impl B {
    fn new() -> B {
        B::with_opset(18)
    }

    fn with_opset(opset: i64) -> B {
        B {
            g: Graph::new("test"),
            opset,
        }
    }

    fn input(&mut self, name: &str, dt: DType, dims: &[&str]) -> ValueId {
        self.g
            .add_input(name, Some(Type::tensor(dt, Some(shape(dims)))))
            .unwrap()
    }

    fn ints(&mut self, name: &str, dims: Vec<i64>, vals: &[i64]) -> ValueId {
        self.g
            .add_initializer(name, Tensor::from_i64(dims, vals))
            .unwrap()
    }

    fn weight(&mut self, name: &str, dims: &[i64]) -> ValueId {
        let n: i64 = dims.iter().product();
        let t = Tensor::from_f32(dims.to_vec(), &vec![0.5; n as usize]);
        self.g.add_initializer(name, t).unwrap()
    }

    fn node(&mut self, spec: NodeSpec, inputs: &[ValueId], out: &str) -> ValueId {
        let ins: Vec<Option<ValueId>> = inputs.iter().map(|&v| Some(v)).collect();
        let spec = if spec.name.is_empty() {
            let name = format!("{}_{out}", spec.op_type);
            spec.named(&name)
        } else {
            spec
        };
        self.g.add_node(spec, &ins, &[out]).unwrap();
        self.g.find(out).unwrap()
    }

    fn op(&mut self, op: &str, inputs: &[ValueId], out: &str) -> ValueId {
        self.node(NodeSpec::new(op), inputs, out)
    }

    fn infer(&self) -> Result<ShapeMap, InferError> {
        let v = self.opset;
        infer_graph(&self.g, &|d: &str| {
            if d.is_empty() { Some(v) } else { Some(1) }
        })
    }

    fn shape_of(&self, map: &ShapeMap, v: ValueId) -> Option<Vec<Dim>> {
        map.shape(v).map(<[Dim]>::to_vec)
    }
}

fn ints_attr(v: &[i64]) -> AttrValue {
    AttrValue::Ints(v.to_vec())
}

fn node_error(e: InferError) -> (String, String, ShapeError) {
    match e {
        InferError::Node { node, op, error } => (node, op, *error),
        other => panic!("expected a node error, got {other}"),
    }
}

// ---- the table ----

#[test]
fn table_ranges_do_not_overlap() {
    for (i, a) in OPS.iter().enumerate() {
        if let Some(u) = a.until {
            assert!(a.since_version < u, "{} has an empty range", a.op_type);
        }
        for b in &OPS[i + 1..] {
            if a.domain != b.domain || a.op_type != b.op_type {
                continue;
            }
            let overlap = (a.since_version..a.until.unwrap_or(i64::MAX)).contains(&b.since_version)
                || (b.since_version..b.until.unwrap_or(i64::MAX)).contains(&a.since_version);
            assert!(!overlap, "{} rows overlap", a.op_type);
        }
    }
}

#[test]
fn lookup_selects_range_and_domain() {
    let r13 = lookup("", "ReduceMean", 13).unwrap();
    let r18 = lookup("ai.onnx", "ReduceMean", 18).unwrap();
    assert_eq!((r13.since_version, r13.until), (1, Some(18)));
    assert_eq!((r18.since_version, r18.until), (18, None));
    assert!(!std::ptr::fn_addr_eq(r13.infer, r18.infer));
    assert_eq!(lookup("", "Gelu", 19).map(|d| d.since_version), None);
    assert_eq!(lookup("", "Gelu", 20).map(|d| d.since_version), Some(20));
    assert!(lookup("", "MatMulNBits", 21).is_none());
    assert!(lookup("com.microsoft", "MatMulNBits", 1).is_some());
    assert!(lookup("", "NoSuchOp", 18).is_none());
    assert_eq!(versions("", "Split").count(), 3);
}

// ---- shape kinds ----

#[test]
fn unary_and_broadcast_with_symbols() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let g = b.weight("g", &[64]);
    let m = b.input("mask", DType::F32, &["batch", "1", "1", "seq"]);
    let s = b.input("s", DType::F32, &["1", "4", "seq", "seq"]);
    let e = b.op("Erf", &[x], "e");
    let y = b.op("Mul", &[e, g], "y");
    let z = b.op("Add", &[m, s], "z");
    let c = b.op("Less", &[m, s], "c");
    let w = b.op("Where", &[c, m, s], "w");
    let map = b.infer().unwrap();
    assert_eq!(b.shape_of(&map, e), Some(shape(&["batch", "seq", "64"])));
    assert_eq!(b.shape_of(&map, y), Some(shape(&["batch", "seq", "64"])));
    assert_eq!(
        b.shape_of(&map, z),
        Some(shape(&["batch", "4", "seq", "seq"]))
    );
    assert_eq!(map.dtype(c), Some(DType::Bool));
    assert_eq!(map.dtype(w), Some(DType::F32));
    assert_eq!(
        b.shape_of(&map, w),
        Some(shape(&["batch", "4", "seq", "seq"]))
    );
}

#[test]
fn broadcast_mismatch_names_the_node() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "64"]);
    let w = b.weight("w", &[32]);
    b.node(NodeSpec::new("Add").named("bad_add"), &[x, w], "y");
    let err = b.infer().unwrap_err();
    let msg = err.to_string();
    assert_eq!(
        msg,
        "node `bad_add` (Add): shapes [batch, 64] and [32] do not broadcast"
    );
}

#[test]
fn dtype_mismatch_is_reported() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["4"]);
    let i = b.ints("i", vec![4], &[1, 2, 3, 4]);
    b.op("Sub", &[x, i], "y");
    let (_, _, e) = node_error(b.infer().unwrap_err());
    assert_eq!(
        e,
        ShapeError::DTypeMismatch {
            a: DType::F32,
            b: DType::I64
        }
    );
}

#[test]
fn matmul_rules() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let w = b.weight("w", &[64, 128]);
    let v = b.weight("v", &[64]);
    let y = b.op("MatMul", &[x, w], "y");
    let d = b.op("MatMul", &[x, v], "d"); // matrix @ vector
    let e = b.op("MatMul", &[v, w], "e"); // vector @ matrix
    let p = b.input("p", DType::F32, &["3", "1", "5", "64"]);
    let q = b.input("q", DType::F32, &["7", "64", "2"]);
    let r = b.op("MatMul", &[p, q], "r");
    let map = b.infer().unwrap();
    assert_eq!(b.shape_of(&map, y), Some(shape(&["batch", "seq", "128"])));
    assert_eq!(b.shape_of(&map, d), Some(shape(&["batch", "seq"])));
    assert_eq!(b.shape_of(&map, e), Some(shape(&["128"])));
    assert_eq!(b.shape_of(&map, r), Some(shape(&["3", "7", "5", "2"])));
}

#[test]
fn matmul_inner_mismatch_names_node_and_dims() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let w = b.weight("w", &[32, 16]);
    b.node(NodeSpec::new("MatMul").named("q_proj"), &[x, w], "y");
    let msg = b.infer().unwrap_err().to_string();
    assert!(
        msg.starts_with("node `q_proj` (MatMul): inner dimensions differ: 64 vs 32"),
        "{msg}"
    );
}

#[test]
fn gemm_transposes() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["n", "64"]);
    let w = b.weight("w", &[128, 64]);
    let bias = b.weight("bias", &[128]);
    let spec = NodeSpec::new("Gemm").attr("transB", AttrValue::Int(1));
    let y = b.node(spec, &[x, w, bias], "y");
    let map = b.infer().unwrap();
    assert_eq!(b.shape_of(&map, y), Some(shape(&["n", "128"])));
}

#[test]
fn reductions_by_opset() {
    // Opset 13: axes is an attribute.
    let mut b = B::with_opset(13);
    let x = b.input("x", DType::F32, &["batch", "seq", "576"]);
    let spec = NodeSpec::new("ReduceMean").attr("axes", ints_attr(&[-1]));
    let m = b.node(spec, &[x], "m");
    let spec = NodeSpec::new("ReduceSum")
        .attr("keepdims", AttrValue::Int(0))
        .attr("axes", ints_attr(&[1]));
    let s = b.node(spec, &[x], "s"); // ReduceSum-13 takes axes as an input: attr ignored
    let map = b.infer().unwrap();
    assert_eq!(b.shape_of(&map, m), Some(shape(&["batch", "seq", "1"])));
    assert_eq!(b.shape_of(&map, s), Some(Vec::new()));

    // Opset 18: axes is an input; the same attribute no longer counts.
    let mut b = B::with_opset(18);
    let x = b.input("x", DType::F32, &["batch", "seq", "576"]);
    let axes = b.ints("axes", vec![1], &[-1]);
    let m = b.op("ReduceMean", &[x, axes], "m");
    let spec = NodeSpec::new("ReduceMean").attr("axes", ints_attr(&[-1]));
    let all = b.node(spec, &[x], "all");
    let spec = NodeSpec::new("ReduceMax").attr("noop_with_empty_axes", AttrValue::Int(1));
    let noop = b.node(spec, &[x], "noop");
    let spec = NodeSpec::new("ArgMax")
        .attr("axis", AttrValue::Int(1))
        .attr("keepdims", AttrValue::Int(0));
    let am = b.node(spec, &[x], "am");
    let map = b.infer().unwrap();
    assert_eq!(b.shape_of(&map, m), Some(shape(&["batch", "seq", "1"])));
    assert_eq!(b.shape_of(&map, all), Some(shape(&["1", "1", "1"])));
    assert_eq!(
        b.shape_of(&map, noop),
        Some(shape(&["batch", "seq", "576"]))
    );
    assert_eq!(b.shape_of(&map, am), Some(shape(&["batch", "576"])));
    assert_eq!(map.dtype(am), Some(DType::I64));
}

#[test]
fn squeeze_unsqueeze_by_opset() {
    let mut b = B::with_opset(11);
    let x = b.input("x", DType::F32, &["batch", "seq"]);
    let u = b.node(
        NodeSpec::new("Unsqueeze").attr("axes", ints_attr(&[1, -1])),
        &[x],
        "u",
    );
    let s = b.node(
        NodeSpec::new("Squeeze").attr("axes", ints_attr(&[1])),
        &[u],
        "s",
    );
    let all = b.op("Squeeze", &[u], "all");
    let map = b.infer().unwrap();
    assert_eq!(
        b.shape_of(&map, u),
        Some(shape(&["batch", "1", "seq", "1"]))
    );
    assert_eq!(b.shape_of(&map, s), Some(shape(&["batch", "seq", "1"])));
    assert_eq!(b.shape_of(&map, all), Some(shape(&["batch", "seq"])));

    let mut b = B::with_opset(13);
    let x = b.input("x", DType::F32, &["batch", "seq"]);
    let axes = b.ints("axes", vec![2], &[0, 3]);
    let u = b.op("Unsqueeze", &[x, axes], "u");
    let map = b.infer().unwrap();
    assert_eq!(
        b.shape_of(&map, u),
        Some(shape(&["1", "batch", "seq", "1"]))
    );
}

// ---- value propagation: the exporters' shape arithmetic ----

/// torchscript: `x.view(x.size(0), x.size(1), 4, 16)` exported as
/// Shape -> Gather -> Unsqueeze -> Concat -> Reshape.
#[test]
fn torchscript_reshape_target_chain() {
    let mut b = B::with_opset(17);
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let i0 = b.ints("i0", vec![], &[0]);
    let i1 = b.ints("i1", vec![], &[1]);
    let ax = b.ints("ax", vec![1], &[0]);
    let four = b.ints("four", vec![1], &[4]);
    let sixteen = b.ints("sixteen", vec![1], &[16]);
    let s0 = b.op("Shape", &[x], "s0");
    let g0 = b.node(
        NodeSpec::new("Gather").attr("axis", AttrValue::Int(0)),
        &[s0, i0],
        "g0",
    );
    let s1 = b.op("Shape", &[x], "s1");
    let g1 = b.node(
        NodeSpec::new("Gather").attr("axis", AttrValue::Int(0)),
        &[s1, i1],
        "g1",
    );
    let u0 = b.op("Unsqueeze", &[g0, ax], "u0");
    let u1 = b.op("Unsqueeze", &[g1, ax], "u1");
    let cat = b.node(
        NodeSpec::new("Concat").attr("axis", AttrValue::Int(0)),
        &[u0, u1, four, sixteen],
        "cat",
    );
    let y = b.op("Reshape", &[x, cat], "y");
    let map = b.infer().unwrap();
    assert_eq!(
        map.get(s0).unwrap().value,
        Some(shape(&["batch", "seq", "64"]))
    );
    assert_eq!(map.get(g1).unwrap().value, Some(shape(&["seq"])));
    assert_eq!(b.shape_of(&map, g1), Some(Vec::new()));
    assert_eq!(
        map.get(cat).unwrap().value,
        Some(shape(&["batch", "seq", "4", "16"]))
    );
    assert_eq!(
        b.shape_of(&map, y),
        Some(shape(&["batch", "seq", "4", "16"]))
    );
    assert_eq!(map.dtype(y), Some(DType::F32));
}

#[test]
fn reshape_infers_minus_one_by_cancelling_symbols() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "9", "seq", "64"]);
    let t = b.input("t", DType::F32, &["batch", "seq", "9", "64"]);
    let s = b.op("Shape", &[x], "s");
    let i = b.ints("i", vec![2], &[0, 2]);
    let bs = b.op("Gather", &[s, i], "bs");
    let minus1 = b.ints("m1", vec![1], &[-1]);
    let tgt = b.node(
        NodeSpec::new("Concat").attr("axis", AttrValue::Int(0)),
        &[bs, minus1],
        "tgt",
    );
    let y = b.op("Reshape", &[t, tgt], "y");
    let zero = b.ints("z", vec![3], &[0, 0, -1]);
    let k = b.op("Reshape", &[t, zero], "k");
    let flat = b.ints("flat", vec![2], &[-1, 64]);
    let f = b.op("Reshape", &[t, flat], "f");
    let map = b.infer().unwrap();
    assert_eq!(b.shape_of(&map, y), Some(shape(&["batch", "seq", "576"])));
    assert_eq!(b.shape_of(&map, k), Some(shape(&["batch", "seq", "576"])));
    // batch * seq * 9 has no single name.
    assert_eq!(b.shape_of(&map, f), Some(shape(&["?", "64"])));
}

#[test]
fn reshape_element_count_mismatch() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["2", "3"]);
    let t = b.ints("t", vec![2], &[4, 2]);
    b.node(NodeSpec::new("Reshape").named("r"), &[x, t], "y");
    let msg = b.infer().unwrap_err().to_string();
    assert_eq!(
        msg,
        "node `r` (Reshape): cannot reshape [2, 3] (6 elements) to [4, 2] (8 elements)"
    );

    let mut b = B::new();
    let x = b.input("x", DType::F32, &["seq", "64"]);
    let t = b.ints("t", vec![3], &[0, 5, -1]);
    b.node(NodeSpec::new("Reshape").named("r"), &[x, t], "y");
    assert!(
        b.infer().is_ok(),
        "symbolic counts are not checked with -1 left"
    );

    let mut b = B::new();
    let x = b.input("x", DType::F32, &["seq", "64"]);
    let t = b.ints("t", vec![3], &[0, 4, 8]);
    b.node(NodeSpec::new("Reshape").named("r"), &[x, t], "y");
    let (_, _, e) = node_error(b.infer().unwrap_err());
    assert!(matches!(e, ShapeError::ElementCount { .. }), "{e}");
}

/// torchscript's repeat_kv: `Where(shape == -1, ones, shape)` feeding Expand.
#[test]
fn where_equal_expand_chain() {
    let mut b = B::new();
    let k = b.input("k", DType::F32, &["batch", "3", "1", "seq", "64"]);
    let tgt = b.input("like", DType::F32, &["batch", "3", "3", "seq", "64"]);
    let s = b.op("Shape", &[tgt], "s");
    let ss = b.op("Shape", &[s], "ss");
    let one = Tensor::from_i64(vec![1], &[1]);
    let ones = b.node(
        NodeSpec::new("ConstantOfShape").attr("value", AttrValue::Tensor(one)),
        &[ss],
        "ones",
    );
    let m1 = b.ints("m1", vec![], &[-1]);
    let neg = b.op("Mul", &[ones, m1], "neg");
    let eq = b.op("Equal", &[s, neg], "eq");
    let w = b.op("Where", &[eq, ones, s], "w");
    let e = b.op("Expand", &[k, w], "e");
    let map = b.infer().unwrap();
    assert_eq!(
        map.get(ones).unwrap().value,
        Some(shape(&["1", "1", "1", "1", "1"]))
    );
    assert_eq!(
        map.get(eq).unwrap().value,
        Some(shape(&["0", "0", "0", "0", "0"]))
    );
    assert_eq!(
        map.get(w).unwrap().value,
        Some(shape(&["batch", "3", "3", "seq", "64"]))
    );
    assert_eq!(
        b.shape_of(&map, e),
        Some(shape(&["batch", "3", "3", "seq", "64"]))
    );
}

/// dynamo: `Shape(start, end)` -> Squeeze -> Range, and the causal-mask broadcasts.
#[test]
fn dynamo_sym_size_range_and_mask() {
    let mut b = B::new();
    let ids = b.input("input_ids", DType::I64, &["batch", "seq"]);
    let sh = b.node(
        NodeSpec::new("Shape")
            .attr("start", AttrValue::Int(1))
            .attr("end", AttrValue::Int(2)),
        &[ids],
        "sh",
    );
    let n = b.op("Squeeze", &[sh], "n");
    let zero = b.ints("zero", vec![], &[0]);
    let one = b.ints("one", vec![], &[1]);
    let r = b.op("Range", &[zero, n, one], "r");
    let a0 = b.ints("a0", vec![1], &[0]);
    let a1 = b.ints("a1", vec![1], &[1]);
    let row = b.op("Unsqueeze", &[r, a1], "row");
    let col = b.op("Unsqueeze", &[r, a0], "col");
    let le = b.op("LessOrEqual", &[col, row], "le");
    let mx = b.op("Max", &[row, col], "mx");
    let map = b.infer().unwrap();
    assert_eq!(map.get(n).unwrap().value, Some(shape(&["seq"])));
    assert_eq!(b.shape_of(&map, r), Some(shape(&["seq"])));
    assert_eq!(b.shape_of(&map, le), Some(shape(&["seq", "seq"])));
    assert_eq!(map.dtype(le), Some(DType::Bool));
    assert_eq!(b.shape_of(&map, mx), Some(shape(&["seq", "seq"])));

    // Range takes scalars.
    let sizes = b.ints("sizes", vec![4], &[3, 4, 6, 5]);
    b.node(
        NodeSpec::new("Range").named("bad_range"),
        &[zero, sizes, one],
        "fixed",
    );
    let msg = b.infer().unwrap_err().to_string();
    assert_eq!(
        msg,
        "node `bad_range` (Range): input 1 has shape [4]; Range takes scalars"
    );
}

#[test]
fn gather_nd_and_gather_elements() {
    let mut b = B::new();
    let data = b.input("d", DType::Bool, &["batch", "seq"]);
    let idx = b.input("i", DType::I64, &["batch", "1", "1", "seq", "2"]);
    let g = b.op("GatherND", &[data, idx], "g");
    let e_idx = b.input("ei", DType::I64, &["batch", "5"]);
    let ge = b.op("GatherElements", &[data, e_idx], "ge");
    let emb = b.weight("emb", &[100, 576]);
    let tok = b.op("Gather", &[emb, data], "tok");
    let map = b.infer().unwrap();
    assert_eq!(
        b.shape_of(&map, g),
        Some(shape(&["batch", "1", "1", "seq"]))
    );
    assert_eq!(b.shape_of(&map, ge), Some(shape(&["batch", "5"])));
    assert_eq!(b.shape_of(&map, tok), Some(shape(&["batch", "seq", "576"])));
    assert_eq!(map.dtype(tok), Some(DType::F32));
}

#[test]
fn slices_of_rotary_halves() {
    let mut b = B::new();
    let q = b.input("q", DType::F32, &["batch", "9", "seq", "64"]);
    let s = b.op("Shape", &[q], "s");
    let i3 = b.ints("i3", vec![], &[3]);
    let hd = b.op("Gather", &[s, i3], "hd");
    let two = b.ints("two", vec![], &[2]);
    let half = b.op("Div", &[hd, two], "half");
    let a0 = b.ints("a0", vec![1], &[0]);
    let half1 = b.op("Unsqueeze", &[half, a0], "half1");
    let zero = b.ints("zero", vec![1], &[0]);
    let big = b.ints("big", vec![1], &[i64::MAX]);
    let ax = b.ints("ax", vec![1], &[3]);
    let step = b.ints("step", vec![1], &[1]);
    let lo = b.op("Slice", &[q, zero, half1, ax, step], "lo");
    let hi = b.op("Slice", &[q, half1, big, ax, step], "hi");
    let ax2 = b.ints("ax2", vec![1], &[2]);
    let all = b.op("Slice", &[q, zero, big, ax2, step], "all");
    let neg = b.ints("neg", vec![1], &[-1]);
    let rev = b.op(
        "Slice",
        &[q, neg, b.g.find("big").unwrap(), ax, neg],
        "rev_bad",
    );
    let cat = b.node(
        NodeSpec::new("Concat").attr("axis", AttrValue::Int(-1)),
        &[hi, lo],
        "cat",
    );
    let two1 = b.ints("two1", vec![1], &[2]);
    let sv = b.op("Slice", &[s, zero, two1], "sv"); // no axes / steps
    let map = b.infer().unwrap();
    assert_eq!(
        b.shape_of(&map, lo),
        Some(shape(&["batch", "9", "seq", "32"]))
    );
    assert_eq!(
        b.shape_of(&map, hi),
        Some(shape(&["batch", "9", "seq", "32"]))
    );
    assert_eq!(
        b.shape_of(&map, all),
        Some(shape(&["batch", "9", "seq", "64"]))
    );
    assert_eq!(
        b.shape_of(&map, rev),
        Some(shape(&["batch", "9", "seq", "0"]))
    );
    assert_eq!(
        b.shape_of(&map, cat),
        Some(shape(&["batch", "9", "seq", "64"]))
    );
    assert_eq!(map.get(sv).unwrap().value, Some(shape(&["batch", "9"])));
}

#[test]
fn small_attention_block() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let mask = b.input("mask", DType::F32, &["batch", "1", "seq", "seq"]);
    let heads = b.ints("heads", vec![4], &[0, 0, 4, 16]);
    let merge = b.ints("merge", vec![3], &[0, 0, -1]);
    let proj = |b: &mut B, name: &str| {
        let w = b.weight(&format!("w_{name}"), &[64, 64]);
        let p = b.op("MatMul", &[x, w], &format!("{name}_p"));
        let r = b.op("Reshape", &[p, heads], &format!("{name}_r"));
        let t = NodeSpec::new("Transpose").attr("perm", ints_attr(&[0, 2, 1, 3]));
        b.node(t, &[r], &format!("{name}_t"))
    };
    let q = proj(&mut b, "q");
    let k = proj(&mut b, "k");
    let v = proj(&mut b, "v");
    let kt = b.node(
        NodeSpec::new("Transpose").attr("perm", ints_attr(&[0, 1, 3, 2])),
        &[k],
        "kt",
    );
    let scores = b.op("MatMul", &[q, kt], "scores");
    let masked = b.op("Add", &[scores, mask], "masked");
    let probs = b.node(
        NodeSpec::new("Softmax").attr("axis", AttrValue::Int(-1)),
        &[masked],
        "probs",
    );
    let ctx = b.op("MatMul", &[probs, v], "ctx");
    let back = b.node(
        NodeSpec::new("Transpose").attr("perm", ints_attr(&[0, 2, 1, 3])),
        &[ctx],
        "back",
    );
    let out = b.op("Reshape", &[back, merge], "out");
    let map = b.infer().unwrap();
    assert_eq!(
        b.shape_of(&map, q),
        Some(shape(&["batch", "4", "seq", "16"]))
    );
    assert_eq!(
        b.shape_of(&map, kt),
        Some(shape(&["batch", "4", "16", "seq"]))
    );
    assert_eq!(
        b.shape_of(&map, scores),
        Some(shape(&["batch", "4", "seq", "seq"]))
    );
    assert_eq!(
        b.shape_of(&map, probs),
        Some(shape(&["batch", "4", "seq", "seq"]))
    );
    assert_eq!(
        b.shape_of(&map, ctx),
        Some(shape(&["batch", "4", "seq", "16"]))
    );
    assert_eq!(b.shape_of(&map, out), Some(shape(&["batch", "seq", "64"])));
}

#[test]
fn flatten_split_tile_pad_transpose() {
    let mut b = B::with_opset(18);
    let x = b.input("x", DType::F32, &["batch", "seq", "6"]);
    let f = b.node(
        NodeSpec::new("Flatten").attr("axis", AttrValue::Int(2)),
        &[x],
        "f",
    );
    let f0 = b.node(
        NodeSpec::new("Flatten").attr("axis", AttrValue::Int(0)),
        &[x],
        "f0",
    );
    let spec = NodeSpec::new("Split")
        .attr("axis", AttrValue::Int(-1))
        .named("sp");
    b.g.add_node(spec, &[Some(x)], &["s0", "s1", "s2"]).unwrap();
    let sizes = b.ints("sizes", vec![2], &[2, 4]);
    let spec = NodeSpec::new("Split")
        .attr("axis", AttrValue::Int(2))
        .named("sp2");
    b.g.add_node(spec, &[Some(x), Some(sizes)], &["t0", "t1"])
        .unwrap();
    let spec = NodeSpec::new("Split")
        .attr("axis", AttrValue::Int(2))
        .attr("num_outputs", AttrValue::Int(4))
        .named("sp3");
    b.g.add_node(spec, &[Some(x)], &["u0", "u1", "u2", "u3"])
        .unwrap();
    let reps = b.ints("reps", vec![3], &[1, 2, 3]);
    let t = b.op("Tile", &[x, reps], "t");
    let pads = b.ints("pads", vec![6], &[0, 0, 1, 0, 0, 2]);
    let p = b.op("Pad", &[x, pads], "p");
    let tr = b.op("Transpose", &[x], "tr");
    let map = b.infer().unwrap();
    let sh = |n: &str| b.shape_of(&map, b.g.find(n).unwrap());
    assert_eq!(b.shape_of(&map, f), Some(shape(&["?", "6"])));
    assert_eq!(b.shape_of(&map, f0), Some(shape(&["1", "?"])));
    assert_eq!(sh("s1"), Some(shape(&["batch", "seq", "2"])));
    assert_eq!(sh("t1"), Some(shape(&["batch", "seq", "4"])));
    assert_eq!(sh("u0"), Some(shape(&["batch", "seq", "2"])));
    assert_eq!(sh("u3"), Some(shape(&["batch", "seq", "0"])));
    assert_eq!(b.shape_of(&map, t), Some(shape(&["batch", "?", "18"])));
    assert_eq!(b.shape_of(&map, p), Some(shape(&["batch", "seq", "9"])));
    assert_eq!(b.shape_of(&map, tr), Some(shape(&["6", "seq", "batch"])));
}

#[test]
fn split_sizes_must_add_up() {
    let mut b = B::with_opset(13);
    let x = b.input("x", DType::F32, &["batch", "6"]);
    let sizes = b.ints("sizes", vec![2], &[2, 3]);
    let spec = NodeSpec::new("Split")
        .attr("axis", AttrValue::Int(1))
        .named("sp");
    b.g.add_node(spec, &[Some(x), Some(sizes)], &["a", "b"])
        .unwrap();
    let msg = b.infer().unwrap_err().to_string();
    assert!(
        msg.starts_with("node `sp` (Split): split sizes [2, 3] sum to 5"),
        "{msg}"
    );
}

#[test]
fn constants_casts_and_ranges() {
    let mut b = B::new();
    let c = b.node(
        NodeSpec::new("Constant").attr("value_ints", ints_attr(&[2, 3])),
        &[],
        "c",
    );
    let cf = b.node(
        NodeSpec::new("Constant").attr("value_float", AttrValue::Float(1e-5)),
        &[],
        "cf",
    );
    let t = Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let ct = b.node(
        NodeSpec::new("Constant").attr("value", AttrValue::Tensor(t)),
        &[],
        "ct",
    );
    let z = b.op("ConstantOfShape", &[c], "z");
    let cast = b.node(
        NodeSpec::new("Cast").attr("to", AttrValue::Int(1)),
        &[c],
        "cast",
    );
    let back = b.node(
        NodeSpec::new("Cast").attr("to", AttrValue::Int(7)),
        &[cast],
        "back",
    );
    let start = b.ints("start", vec![], &[2]);
    let lim = b.ints("lim", vec![], &[11]);
    let step = b.ints("step", vec![], &[3]);
    let r = b.op("Range", &[start, lim, step], "r");
    let like = b.op("CastLike", &[r, ct], "like");
    let sz = b.op("Size", &[z], "sz");
    let map = b.infer().unwrap();
    assert_eq!(map.get(c).unwrap().value, Some(shape(&["2", "3"])));
    assert_eq!(map.get(cf).unwrap().value, None); // 1e-5 is not an integer
    assert_eq!(b.shape_of(&map, cf), Some(Vec::new()));
    assert_eq!(
        map.get(ct).unwrap().value,
        Some(shape(&["1", "2", "3", "4"]))
    );
    assert_eq!(b.shape_of(&map, z), Some(shape(&["2", "3"])));
    assert_eq!(map.dtype(z), Some(DType::F32));
    assert_eq!(map.dtype(cast), Some(DType::F32));
    assert_eq!(map.get(back).unwrap().value, Some(shape(&["2", "3"])));
    assert_eq!(map.get(r).unwrap().value, Some(shape(&["2", "5", "8"])));
    assert_eq!(map.dtype(like), Some(DType::F32));
    assert_eq!(map.get(sz).unwrap().value, Some(shape(&["6"])));
}

#[test]
fn layer_norm_einsum_and_quant() {
    let mut b = B::with_opset(21);
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let g = b.weight("g", &[64]);
    let spec = NodeSpec::new("LayerNormalization").named("ln");
    b.g.add_node(spec, &[Some(x), Some(g)], &["y", "mean", "inv"])
        .unwrap();
    let w = b.weight("w", &[64, 32]);
    let spec = NodeSpec::new("Einsum").attr("equation", AttrValue::String("bsk,kn->bsn".into()));
    let e = b.node(spec, &[x, w], "e");
    let spec = NodeSpec::new("Einsum").attr("equation", AttrValue::String("...k,kn".into()));
    let e2 = b.node(spec, &[x, w], "e2");
    let scale = b.weight("scale", &[]);
    let zp =
        b.g.add_initializer("zp", Tensor::from_raw(DType::I4, vec![], vec![0u8].into()))
            .unwrap();
    let q = b.op("QuantizeLinear", &[x, scale, zp], "q");
    b.op("QuantizeLinear", &[x, scale], "q8");
    b.op("DequantizeLinear", &[q, scale, zp], "dq");
    b.g.add_node(
        NodeSpec::new("DynamicQuantizeLinear"),
        &[Some(x)],
        &["dy", "dys", "dyz"],
    )
    .unwrap();
    let wq =
        b.g.add_initializer(
            "wq",
            Tensor::from_raw(DType::I8, vec![64, 32], vec![0u8; 2048].into()),
        )
        .unwrap();
    let mi = b.op("MatMulInteger", &[b.g.find("dy").unwrap(), wq], "mi");
    let map = b.infer().unwrap();
    let sh = |n: &str| b.shape_of(&map, b.g.find(n).unwrap());
    let dt = |n: &str| map.dtype(b.g.find(n).unwrap());
    assert_eq!(sh("y"), Some(shape(&["batch", "seq", "64"])));
    assert_eq!(sh("mean"), Some(shape(&["batch", "seq", "1"])));
    assert_eq!(dt("inv"), Some(DType::F32));
    assert_eq!(b.shape_of(&map, e), Some(shape(&["batch", "seq", "32"])));
    assert_eq!(b.shape_of(&map, e2), Some(shape(&["batch", "seq", "32"])));
    assert_eq!(dt("q"), Some(DType::I4));
    assert_eq!(dt("q8"), Some(DType::U8));
    assert_eq!(dt("dq"), Some(DType::F32));
    assert_eq!(sh("dq"), Some(shape(&["batch", "seq", "64"])));
    assert_eq!(sh("dys"), Some(Vec::new()));
    assert_eq!(b.shape_of(&map, mi), Some(shape(&["batch", "seq", "32"])));
    assert_eq!(map.dtype(mi), Some(DType::I32));
}

#[test]
fn matmul_nbits_in_contrib_domain() {
    let mut b = B::new();
    let a = b.input("a", DType::F16, &["batch", "seq", "576"]);
    let w =
        b.g.add_initializer("w", Tensor::from_raw(DType::U8, vec![1], vec![0u8].into()))
            .unwrap();
    let mut spec = NodeSpec::new("MatMulNBits")
        .attr("K", AttrValue::Int(576))
        .attr("N", AttrValue::Int(1536));
    spec.domain = "com.microsoft".into();
    let y = b.node(spec, &[a, w], "y");
    let map = b.infer().unwrap();
    assert_eq!(b.shape_of(&map, y), Some(shape(&["batch", "seq", "1536"])));
    assert_eq!(map.dtype(y), Some(DType::F16));
}

// ---- unknown ops, declared types, apply ----

#[test]
fn unknown_ops_are_listed_and_use_declared_types() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let mut spec = NodeSpec::new("FancyNorm").named("fn0");
    spec.domain = "my.domain".into();
    let y = b.node(spec.clone(), &[x], "y");
    let y2 = b.node(spec.named("fn1"), &[y], "y2");
    b.g.value_mut(y2).ty = Some(Type::tensor(
        DType::F32,
        Some(shape(&["batch", "seq", "64"])),
    ));
    let z = b.op("Relu", &[y2], "z");
    let map = b.infer().unwrap();
    assert_eq!(map.get(y), Some(&Facts::default()));
    assert_eq!(b.shape_of(&map, z), Some(shape(&["batch", "seq", "64"])));
    assert_eq!(map.unknown_ops.len(), 1);
    let u = &map.unknown_ops[0];
    assert_eq!(
        (u.domain.as_str(), u.op_type.as_str(), u.count),
        ("my.domain", "FancyNorm", 2)
    );
    assert_eq!(u.first, "fn0");
}

#[test]
fn apply_sets_refines_and_reports_conflicts() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let w = b.weight("w", &[64, 32]);
    let y = b.op("MatMul", &[x, w], "y");
    let z = b.op("Relu", &[y], "z");
    b.g.value_mut(z).ty = Some(Type::tensor(DType::F32, Some(shape(&["batch", "?", "32"]))));
    let map = b.infer().unwrap();
    let stats = apply(&mut b.g, &map).unwrap();
    assert_eq!(stats, ApplyStats { set: 1, refined: 1 });
    assert_eq!(
        b.g.value(y).ty.as_ref().unwrap().to_string(),
        "f32[batch, seq, 32]"
    );
    assert_eq!(
        b.g.value(z).ty.as_ref().unwrap().to_string(),
        "f32[batch, seq, 32]"
    );
    assert_eq!(apply(&mut b.g, &map).unwrap(), ApplyStats::default());

    // A declaration that disagrees is reported and nothing is written.
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "seq", "64"]);
    let w = b.weight("w", &[64, 32]);
    let y = b.op("MatMul", &[x, w], "y");
    let z = b.op("Relu", &[y], "z");
    b.g.value_mut(z).ty = Some(Type::tensor(
        DType::F32,
        Some(shape(&["batch", "seq", "16"])),
    ));
    let map = b.infer().unwrap();
    let err = apply(&mut b.g, &map).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("value `z`: declared type f32[batch, seq, 16] conflicts with inferred f32[batch, seq, 32]"),
        "{err}"
    );
    assert!(b.g.value(y).ty.is_none());
}

#[test]
fn control_flow_infers_subgraphs() {
    let mut b = B::new();
    let c = b.input("c", DType::Bool, &[]);
    let x = b.input("x", DType::F32, &["batch", "4"]);
    // Branches read `x` from the enclosing graph; they agree on all but the last dim.
    let branch = |name: &str, op: &str, extra: Option<i64>| {
        let mut g = Graph::new(name);
        let xo = g.add_outer("x").unwrap();
        let out = format!("{name}_y");
        let y = match extra {
            None => {
                g.add_node(NodeSpec::new(op).named(name), &[Some(xo)], &[&out])
                    .unwrap();
                g.find(&out).unwrap()
            }
            Some(n) => {
                let p = g
                    .add_initializer("p", Tensor::from_i64(vec![4], &[0, 0, 0, n]))
                    .unwrap();
                g.add_node(NodeSpec::new(op).named(name), &[Some(xo), Some(p)], &[&out])
                    .unwrap();
                g.find(&out).unwrap()
            }
        };
        g.outputs.push(y);
        g
    };
    let spec = NodeSpec::new("If")
        .attr(
            "then_branch",
            AttrValue::Graph(Box::new(branch("t", "Neg", None))),
        )
        .attr(
            "else_branch",
            AttrValue::Graph(Box::new(branch("e", "Pad", Some(1)))),
        );
    let y = b.node(spec, &[c], "y");

    // Loop with 3 trips, no condition: one carried value and one scan output.
    let mut body = Graph::new("body");
    body.add_input("i", Some(Type::tensor(DType::I64, Some(vec![]))))
        .unwrap();
    body.add_input("cond", None).unwrap();
    let acc = body.add_input("acc", None).unwrap();
    let ax = body
        .add_initializer("ax", Tensor::from_i64(vec![1], &[1]))
        .unwrap();
    body.add_node(
        NodeSpec::new("Identity"),
        &[body.find("cond")],
        &["cond_out"],
    )
    .unwrap();
    body.add_node(NodeSpec::new("Sigmoid"), &[Some(acc)], &["acc_out"])
        .unwrap();
    body.add_node(
        NodeSpec::new("ReduceSum").attr("keepdims", AttrValue::Int(0)),
        &[body.find("acc_out"), Some(ax)],
        &["rows"],
    )
    .unwrap();
    body.outputs = vec![
        body.find("cond_out").unwrap(),
        body.find("acc_out").unwrap(),
        body.find("rows").unwrap(),
    ];
    let trips = b.ints("trips", vec![], &[3]);
    let spec = NodeSpec::new("Loop")
        .named("loop")
        .attr("body", AttrValue::Graph(Box::new(body)));
    b.g.add_node(
        spec,
        &[Some(trips), None, Some(x)],
        &["acc_final", "rows_stacked"],
    )
    .unwrap();

    // Scan over the rows of a [5, 4] input with a [4] state.
    let mut body = Graph::new("scan_body");
    let s = body.add_input("s", None).unwrap();
    let r = body.add_input("r", None).unwrap();
    body.add_node(NodeSpec::new("Add"), &[Some(s), Some(r)], &["s_out"])
        .unwrap();
    body.add_node(
        NodeSpec::new("Mul"),
        &[body.find("s_out"), Some(r)],
        &["y_row"],
    )
    .unwrap();
    body.outputs = vec![body.find("s_out").unwrap(), body.find("y_row").unwrap()];
    let init = b.input("init", DType::F32, &["4"]);
    let seq = b.input("seq", DType::F32, &["5", "4"]);
    let spec = NodeSpec::new("Scan")
        .named("scan")
        .attr("num_scan_inputs", AttrValue::Int(1))
        .attr("scan_output_axes", ints_attr(&[-1]))
        .attr("body", AttrValue::Graph(Box::new(body)));
    b.g.add_node(spec, &[Some(init), Some(seq)], &["s_final", "ys"])
        .unwrap();

    let map = b.infer().unwrap();
    let sh = |n: &str| b.shape_of(&map, b.g.find(n).unwrap());
    assert_eq!(b.shape_of(&map, y), Some(shape(&["batch", "?"])));
    assert_eq!(map.dtype(y), Some(DType::F32));
    assert_eq!(sh("acc_final"), Some(shape(&["batch", "4"])));
    assert_eq!(sh("rows_stacked"), Some(shape(&["3", "batch"])));
    assert_eq!(sh("s_final"), Some(shape(&["4"])));
    assert_eq!(sh("ys"), Some(shape(&["4", "5"])));
    assert!(map.unknown_ops.is_empty());
}

#[test]
fn subgraph_errors_name_the_inner_node() {
    let mut b = B::new();
    let c = b.input("c", DType::Bool, &[]);
    b.input("x", DType::F32, &["batch", "4"]);
    let mut g = Graph::new("then");
    let xo = g.add_outer("x").unwrap();
    let w = g
        .add_initializer("w", Tensor::from_f32(vec![3, 2], &[0.0; 6]))
        .unwrap();
    g.add_node(
        NodeSpec::new("MatMul").named("inner_mm"),
        &[Some(xo), Some(w)],
        &["o"],
    )
    .unwrap();
    g.outputs.push(g.find("o").unwrap());
    let spec = NodeSpec::new("If")
        .named("branchy")
        .attr("then_branch", AttrValue::Graph(Box::new(g.clone())))
        .attr("else_branch", AttrValue::Graph(Box::new(g)));
    b.node(spec, &[c], "y");
    let msg = b.infer().unwrap_err().to_string();
    assert!(
        msg.starts_with("node `branchy` (If): in subgraph `then`: node `inner_mm` (MatMul): inner dimensions differ: 4 vs 3"),
        "{msg}"
    );
}

#[test]
fn malformed_values_do_not_panic() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["-3", "5", "batch"]);
    let big = b.ints("big", vec![1], &[i64::MAX]);
    let min = b.ints("min", vec![1], &[i64::MIN]);
    let m1 = b.ints("m1", vec![1], &[-1]);
    let ax = b.ints("ax", vec![1], &[1]);
    b.op("Slice", &[x, min, big, ax, big], "s1");
    b.op("Slice", &[x, big, min, ax, min], "s2");
    let ax0 = b.ints("ax0", vec![1], &[0]);
    b.op("Slice", &[x, min, big, ax0, m1], "s3");
    b.op("Mod", &[min, m1], "md");
    b.op("Div", &[min, m1], "dv");
    b.op("Mul", &[big, big], "ml");
    b.op("Neg", &[min], "ng");
    b.op("Abs", &[min], "ab");
    b.op("Pow", &[big, big], "pw");
    let s0 = b.ints("s0", vec![], &[i64::MIN]);
    let s1 = b.ints("s1s", vec![], &[i64::MAX]);
    let one = b.ints("one", vec![], &[1]);
    b.op("Range", &[s0, s1, one], "r");
    let t = b.ints("t", vec![2], &[-1, 5]);
    b.op("Reshape", &[x, t], "rs");
    b.op("Flatten", &[x], "fl");
    let huge = b.input("huge", DType::I64, &["1000000000000"]);
    b.op("ConstantOfShape", &[huge], "cs");
    b.op("Unsqueeze", &[x, huge], "us");
    let spec = NodeSpec::new("Split")
        .attr("axis", AttrValue::Int(0))
        .named("sp");
    b.g.add_node(spec, &[Some(x)], &["a", "c"]).unwrap();
    // Errors are fine; panics are not.
    let _ = b.infer();
}

// ---- the channel-axis column ----

#[test]
fn every_row_with_a_kernel_declares_a_channel_rule() {
    let undeclared = channel::undeclared as ChannelFn as usize;
    let missing: Vec<String> = OPS
        .iter()
        .filter(|d| d.kernel.is_some() && d.channel as usize == undeclared)
        .map(|d| format!("{}::{} ({})", d.domain, d.op_type, d.since_version))
        .collect();
    assert!(
        missing.is_empty(),
        "rows with a kernel but no channel rule: {missing:?}"
    );
}

/// A decoder-layer slice: h [B, S, 8] -> RMS norm -> q = h W (W [8, 6]) -> reshape to
/// heads -> transpose; a residual Add; an embedding Gather.
#[test]
fn channels_follow_norms_linears_residuals_and_layouts() {
    use channel::{ChannelFlow as F, LINEAR, ORTHOGONAL, PERM, flow};
    let mut b = B::new();
    let h = b.input("h", DType::F32, &["B", "S", "8"]);
    let ids = b.input("ids", DType::I64, &["B", "S"]);
    let table = b.weight("table", &[16, 8]);
    let gamma = b.weight("gamma", &[8]);
    let w = b.weight("w", &[8, 6]);
    let heads = b.ints("heads", vec![4], &[0, 0, 2, 3]);
    let emb = b.node(
        NodeSpec::new("Gather").attr("axis", AttrValue::Int(0)),
        &[table, ids],
        "emb",
    );
    let res = b.op("Add", &[h, emb], "res");
    let n = b.node(
        NodeSpec::new("RMSNormalization").attr("axis", AttrValue::Int(-1)),
        &[res, gamma],
        "n",
    );
    let q = b.op("MatMul", &[n, w], "q");
    let qh = b.op("Reshape", &[q, heads], "qh");
    let qt = b.node(
        NodeSpec::new("Transpose").attr("perm", ints_attr(&[0, 2, 1, 3])),
        &[qh],
        "qt",
    );
    let sig = b.op("Sigmoid", &[q], "sig");
    b.opset = 23;
    let map = b.infer().unwrap();
    let opset = |d: &str| if d.is_empty() { Some(23) } else { None };
    let node_of = |v: ValueId| b.g.value(v).producer().unwrap().0;
    let at =
        |v: ValueId, input: usize, axis: usize| flow(&b.g, node_of(v), &map, &opset, input, axis);

    // The embedding's columns are the residual channels (a source).
    assert_eq!(
        at(emb, 0, 1),
        F::Through {
            outputs: vec![(0, 2)],
            commutes: LINEAR,
            with: vec![],
            uniform: vec![]
        }
    );
    assert!(matches!(at(emb, 0, 0), F::Barrier(_)));
    // Residual Add: both operands take the same transform.
    assert_eq!(
        at(res, 0, 2),
        F::Through {
            outputs: vec![(0, 2)],
            commutes: LINEAR,
            with: vec![(1, 2)],
            uniform: vec![]
        }
    );
    // RMS norm: orthogonal maps pass once gamma is uniform (folded).
    assert_eq!(
        at(n, 0, 2),
        F::Through {
            outputs: vec![(0, 2)],
            commutes: ORTHOGONAL,
            with: vec![],
            uniform: vec![(1, 0)]
        }
    );
    // The linear layer reads the channels (a sink) and writes new ones (a source).
    assert_eq!(
        at(q, 0, 2),
        F::Contracted {
            weight: 1,
            weight_axis: 0
        }
    );
    assert_eq!(
        at(q, 1, 1),
        F::Through {
            outputs: vec![(0, 2)],
            commutes: LINEAR,
            with: vec![],
            uniform: vec![]
        }
    );
    assert_eq!(
        at(q, 1, 0),
        F::Contracted {
            weight: 0,
            weight_axis: 2
        }
    );
    // [B, S, 6] -> [B, S, 2, 3] splits the channels into heads; rows pass.
    assert_eq!(at(qh, 0, 2), F::Regroup);
    assert_eq!(
        at(qh, 0, 1),
        F::Through {
            outputs: vec![(0, 1)],
            commutes: LINEAR,
            with: vec![],
            uniform: vec![]
        }
    );
    // Transpose moves the head-dim axis 3 to 3 and the sequence axis 1 to 2.
    assert_eq!(
        at(qt, 0, 1),
        F::Through {
            outputs: vec![(0, 2)],
            commutes: LINEAR,
            with: vec![],
            uniform: vec![]
        }
    );
    // A non-linear elementwise op: permutations only.
    assert_eq!(
        at(sig, 0, 2),
        F::Through {
            outputs: vec![(0, 2)],
            commutes: PERM,
            with: vec![],
            uniform: vec![]
        }
    );
}

#[test]
fn broadcast_operands_and_reductions() {
    use channel::{ChannelFlow as F, LINEAR, PERM, flow};
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["2", "8"]);
    let r = b.input("r", DType::F32, &["2", "1"]);
    let g = b.weight("g", &[8]);
    let axes = b.ints("axes", vec![1], &[-1]);
    let scaled = b.op("Mul", &[x, r], "scaled");
    let gained = b.op("Mul", &[x, g], "gained");
    let shifted = b.op("Add", &[x, r], "shifted");
    let mean = b.node(NodeSpec::new("ReduceMean"), &[x, axes], "mean");
    let map = b.infer().unwrap();
    let opset = |d: &str| if d.is_empty() { Some(18) } else { None };
    let node_of = |v: ValueId| b.g.value(v).producer().unwrap().0;
    let at =
        |v: ValueId, input: usize, axis: usize| flow(&b.g, node_of(v), &map, &opset, input, axis);
    // Times a per-row scalar: every linear map commutes.
    assert_eq!(
        at(scaled, 0, 1),
        F::Through {
            outputs: vec![(0, 1)],
            commutes: LINEAR,
            with: vec![],
            uniform: vec![]
        }
    );
    // Times a per-channel gain: only a permutation applied to both, or a scale applied to
    // one factor alone.
    assert_eq!(
        at(gained, 0, 1),
        F::Through {
            outputs: vec![(0, 1)],
            commutes: crate::channel::Commutes {
                factor: true,
                ..PERM
            },
            with: vec![(1, 0)],
            uniform: vec![]
        }
    );
    // Plus a per-row scalar: only permutations (a rotation would move the shift).
    assert_eq!(
        at(shifted, 0, 1),
        F::Through {
            outputs: vec![(0, 1)],
            commutes: PERM,
            with: vec![],
            uniform: vec![]
        }
    );
    // A mean over the channels does not see their order.
    assert_eq!(
        at(mean, 0, 1),
        F::Invariant {
            commutes: PERM,
            with: vec![]
        }
    );
    assert_eq!(
        at(mean, 0, 0),
        F::Through {
            outputs: vec![(0, 0)],
            commutes: LINEAR,
            with: vec![],
            uniform: vec![]
        }
    );
}

// ---- ai.perqc::Hadamard ----

fn hadamard_node(b: &mut B, name: &str, x: ValueId, h: ValueId) -> ValueId {
    let mut spec = NodeSpec::new("Hadamard").named(name);
    spec.domain = PERQC_DOMAIN.to_string();
    b.node(spec, &[x, h], &format!("{name}_y"))
}

#[test]
fn hadamard_shapes_and_errors() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["batch", "seq", "192"]);
    let s = b.input("s", DType::F32, &["n", "f"]);
    let h32 = b.weight("h32", &[32, 32]);
    let y = hadamard_node(&mut b, "rot", x, h32);
    // A symbolic last dim cannot be checked here (the kernel checks it).
    let z = hadamard_node(&mut b, "rot_sym", s, h32);
    let map = b.infer().unwrap();
    assert_eq!(b.shape_of(&map, y), Some(shape(&["batch", "seq", "192"])));
    assert_eq!(map.dtype(y), Some(DType::F32));
    assert_eq!(b.shape_of(&map, z), Some(shape(&["n", "f"])));

    let bad = |x_dims: &[&str], h_dims: &[i64]| {
        let mut b = B::new();
        let x = b.input("x", DType::F32, x_dims);
        let h = b.weight("h", h_dims);
        hadamard_node(&mut b, "down_rot", x, h);
        b.infer().unwrap_err().to_string()
    };
    assert_eq!(
        bad(&["2", "100"], &[32, 32]),
        "node `down_rot` (Hadamard): block size 32 (H [32, 32]) does not divide the last \
         dim 100 of x [2, 100]"
    );
    assert_eq!(
        bad(&["2", "64"], &[32, 16]),
        "node `down_rot` (Hadamard): H must be a non-empty square matrix, got [32, 16]"
    );
    assert_eq!(
        bad(&["2", "64"], &[4, 4, 4]),
        "node `down_rot` (Hadamard): H has rank 3, expected 2"
    );
    assert_eq!(
        bad(&[], &[1, 1]),
        "node `down_rot` (Hadamard): x has rank 0, expected >= 1"
    );
}

#[test]
fn hadamard_channels_pass_on_rows_only() {
    use channel::{ChannelFlow as F, LINEAR, flow};
    let mut b = B::new();
    let x = b.input("x", DType::F32, &["B", "S", "64"]);
    let h = b.weight("h", &[16, 16]);
    let y = hadamard_node(&mut b, "rot", x, h);
    let map = b.infer().unwrap();
    let opset = |d: &str| if d.is_empty() { Some(18) } else { Some(1) };
    let node = b.g.value(y).producer().unwrap().0;
    let at = |input: usize, axis: usize| flow(&b.g, node, &map, &opset, input, axis);
    for axis in [0, 1] {
        assert_eq!(
            at(0, axis),
            F::Through {
                outputs: vec![(0, axis)],
                commutes: LINEAR,
                with: vec![],
                uniform: vec![]
            }
        );
    }
    assert_eq!(at(0, 2), F::Barrier("mixes the channels of each block"));
    assert!(matches!(at(1, 0), F::Barrier(_)));
    assert!(matches!(at(1, 1), F::Barrier(_)));
}
