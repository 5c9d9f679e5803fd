//! `fuse-int-linear` on weight-only linears: a MatMul by a grouped `DequantizeLinear` and a
//! MatMulNBits with a bias run as integer products on 8-bit per-token codes, and compute
//! what the graph with an 8-bit symmetric `FakeQuantize` in front of them computes; an
//! asymmetric MatMulNBits and `weight-only=false` keep the float path.

use perqc_ir::{
    AttrValue, DType, Dim, Graph, Model, NodeSpec, PassManager, RunOptions, Tensor, Type,
};
use perqc_ops::PERQC_DOMAIN;
use perqc_runtime::{RtTensor, Session};

const K: usize = 64;
const ROWS: usize = 5;

fn lcg(s: &mut u64) -> u32 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*s >> 33) as u32
}

fn ms(op: &str) -> NodeSpec {
    let mut spec = NodeSpec::new(op);
    spec.domain = "com.microsoft".into();
    spec
}

/// `com.microsoft::MatMulNBits(x, B, scales, zero_points?, -, bias?)`, 4 bits, blocks of 16,
/// random codes and scales; the zero points (when given) all `zp`.
fn nbits(
    g: &mut Graph,
    x: perqc_ir::ValueId,
    n: usize,
    zp: Option<u8>,
    bias: bool,
    seed: u64,
    out: &str,
) {
    let (bs, kb) = (16usize, K / 16);
    let mut s = seed;
    let b: Vec<u8> = (0..n * kb * bs / 2).map(|_| lcg(&mut s) as u8).collect();
    let scales: Vec<f32> = (0..n * kb)
        .map(|_| (lcg(&mut s) % 50 + 1) as f32 / 400.0)
        .collect();
    let b = g
        .add_initializer(
            &format!("{out}.b"),
            Tensor::from_slice(vec![n as i64, kb as i64, (bs / 2) as i64], &b),
        )
        .unwrap();
    let sc = g
        .add_initializer(
            &format!("{out}.scales"),
            Tensor::from_f32(vec![(n * kb) as i64], &scales),
        )
        .unwrap();
    let zp = zp.map(|z| {
        let bytes = vec![z | (z << 4); n * kb.div_ceil(2)];
        g.add_initializer(
            &format!("{out}.zp"),
            Tensor::from_slice(vec![bytes.len() as i64], &bytes),
        )
        .unwrap()
    });
    let mut inputs = vec![Some(x), Some(b), Some(sc), zp];
    if bias {
        let v: Vec<f32> = (0..n).map(|i| i as f32 / 10.0 - 1.0).collect();
        inputs.push(None);
        inputs.push(Some(
            g.add_initializer(&format!("{out}.bias"), Tensor::from_f32(vec![n as i64], &v))
                .unwrap(),
        ));
    }
    let spec = ms("MatMulNBits")
        .named(out)
        .attr("K", AttrValue::Int(K as i64))
        .attr("N", AttrValue::Int(n as i64))
        .attr("bits", AttrValue::Int(4))
        .attr("block_size", AttrValue::Int(bs as i64));
    let id = g.add_node(spec, &inputs, &[out]).unwrap();
    let y = g.node(id).output(0).unwrap();
    g.outputs.push(y);
}

/// x `[ROWS, K]` read by a MatMul of a DequantizeLinear (int8 codes in -8..=7, scales per
/// 16 rows), a symmetric MatMulNBits with a bias, and an asymmetric one (zero points 7).
fn weight_only_model() -> Model {
    let mut g = Graph::new("main");
    let x = g
        .add_input(
            "x",
            Some(Type::tensor(
                DType::F32,
                Some(vec![Dim::Known(ROWS as i64), Dim::Known(K as i64)]),
            )),
        )
        .unwrap();
    let n = 40usize;
    let mut s = 3u64;
    let codes: Vec<i8> = (0..K * n).map(|_| (lcg(&mut s) % 16) as i8 - 8).collect();
    let scales: Vec<f32> = (0..K / 16 * n)
        .map(|_| (lcg(&mut s) % 50 + 1) as f32 / 400.0)
        .collect();
    let w = g
        .add_initializer("w.q", Tensor::from_slice(vec![K as i64, n as i64], &codes))
        .unwrap();
    let t = g
        .add_initializer(
            "w.scale",
            Tensor::from_f32(vec![(K / 16) as i64, n as i64], &scales),
        )
        .unwrap();
    let dq = g
        .add_node(
            NodeSpec::new("DequantizeLinear")
                .named("dq")
                .attr("axis", AttrValue::Int(0))
                .attr("block_size", AttrValue::Int(16)),
            &[Some(w), Some(t)],
            &["w"],
        )
        .unwrap();
    let wv = g.node(dq).output(0).unwrap();
    let mm = g
        .add_node(
            NodeSpec::new("MatMul").named("mm"),
            &[Some(x), Some(wv)],
            &["y1"],
        )
        .unwrap();
    let y1 = g.node(mm).output(0).unwrap();
    g.outputs.push(y1);
    nbits(&mut g, x, 24, None, true, 5, "y2");
    nbits(&mut g, x, 8, Some(7), false, 9, "y3");
    Model {
        ir_version: Some(10),
        opset_imports: vec![
            perqc_ir::OpsetImport {
                domain: None,
                version: Some(21),
            },
            perqc_ir::OpsetImport {
                domain: Some("com.microsoft".into()),
                version: Some(1),
            },
            perqc_ir::OpsetImport {
                domain: Some(PERQC_DOMAIN.into()),
                version: Some(1),
            },
        ],
        graph: g,
        ..Default::default()
    }
}

fn outputs(model: &Model, x: &RtTensor) -> Vec<Vec<f32>> {
    let s = Session::new(model).expect("plans");
    s.run(&[("x", x.clone())])
        .expect("runs")
        .into_iter()
        .map(|(_, t)| t.as_f32().expect("f32").iter().copied().collect())
        .collect()
}

fn run(model: &mut Model, pipeline: &str) -> perqc_ir::Report {
    let mut p = perqc_passes::registry().build(pipeline).expect("pipeline");
    PassManager::new()
        .run(model, &mut p, &mut RunOptions::default())
        .expect("runs")
}

fn count(m: &Model, op: &str) -> usize {
    m.graph.nodes().filter(|(_, n)| n.op_type == op).count()
}

#[test]
fn weight_only_linears_run_on_8_bit_codes() {
    let original = weight_only_model();
    let mut s = 17u64;
    let xs: Vec<f32> = (0..ROWS * K)
        .map(|_| (lcg(&mut s) % 2001) as f32 / 100.0 - 10.0)
        .collect();
    let x = RtTensor::f32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[ROWS, K]), xs).unwrap());

    // The float spelling of the plan: FakeQuantize(8 bits, symmetric) in front of the two
    // fusable linears (not the asymmetric third).
    let mut spelled = original.clone();
    {
        let g = &mut spelled.graph;
        let xv = g.inputs[0];
        let mut fq = NodeSpec::new("FakeQuantize")
            .named("a8")
            .attr("bits", AttrValue::Int(8))
            .attr("symmetric", AttrValue::Int(1));
        fq.domain = PERQC_DOMAIN.into();
        let first = g.node_order()[0];
        let q = g
            .insert_node_before(first, fq, &[Some(xv)], &["xq"])
            .unwrap();
        let xq = g.node(q).output(0).unwrap();
        let ids: Vec<_> = g
            .nodes()
            .filter(|(_, n)| n.name == "mm" || n.name == "y2")
            .map(|(id, _)| id)
            .collect();
        for id in ids {
            g.set_input(id, 0, Some(xq));
        }
    }
    let want = outputs(&spelled, &x);

    let mut fused = original.clone();
    let report = run(&mut fused, "fuse-int-linear");
    let got = outputs(&fused, &x);
    let counter = |name: &str| report.counter("fuse-int-linear", name);
    assert_eq!((counter("fused"), counter("left-float")), (2, 1));
    assert_eq!(
        count(&fused, "QuantizeTokens"),
        1,
        "one quantizer for the shared x"
    );
    assert_eq!(count(&fused, "QuantizedLinear"), 2);
    assert_eq!(count(&fused, "MatMulNBits"), 1, "the asymmetric one stays");
    assert_eq!(count(&fused, "Add"), 1, "MatMulNBits' bias");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = g.iter().zip(w).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        assert!(err <= 1e-5 * scale, "output {i}: {err} of {scale}");
    }

    let mut kept = original.clone();
    let report = run(&mut kept, "fuse-int-linear(weight-only=false)");
    let counter = |name: &str| report.counter("fuse-int-linear", name);
    assert_eq!((counter("fused"), counter("left-float")), (0, 3));
    assert_eq!(count(&kept, "QuantizeTokens"), 0);
}
