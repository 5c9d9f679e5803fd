//! `ai.perqc::Hadamard` through the op table: the fast Walsh-Hadamard path against an f64
//! reference and the dense product, every vector level the CPU runs, thread counts,
//! strided inputs, the dense path for other matrices, and errors.

mod common;

use common::{run_in, uniform};
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use perqc_ir::{Graph, NodeSpec};
use perqc_ops::kernels::hadamard::{Level, fwht, sylvester_scale};
use perqc_ops::{KernelCtx, PERQC_DOMAIN, RtTensor, lookup};
use std::mem::MaybeUninit;

fn f32t(shape: &[usize], v: Vec<f32>) -> RtTensor {
    RtTensor::f32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

fn vals(t: &RtTensor) -> Vec<f32> {
    t.as_f32().unwrap().iter().copied().collect()
}

fn bits(t: &RtTensor) -> Vec<u32> {
    t.as_f32().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// The natural-order Sylvester matrix `[b, b]` times `1/√b`, as the f32 PeRQ stores.
fn sylvester(b: usize) -> Vec<f32> {
    let c = 1.0 / (b as f32).sqrt();
    (0..b * b)
        .map(|k| {
            if ((k / b) & (k % b)).count_ones().is_multiple_of(2) {
                c
            } else {
                -c
            }
        })
        .collect()
}

/// The 12 x 12 Paley Hadamard matrix (q = 11) times `1/√12`: orthogonal, not Sylvester.
fn paley12() -> Vec<f32> {
    let residues = [1usize, 3, 4, 5, 9];
    let chi = |a: usize| match a % 11 {
        0 => 0i32,
        r if residues.contains(&r) => 1,
        _ => -1,
    };
    let c = 1.0 / 12f32.sqrt();
    let mut h = vec![0f32; 144];
    for r in 0..12 {
        for col in 0..12 {
            let s = match (r, col) {
                (0, 0) => 1,
                (0, _) => 1,
                (_, 0) => -1,
                (r, col) => chi(r + 11 - col) + (r == col) as i32,
            };
            h[r * 12 + col] = s as f32 * c;
        }
    }
    h
}

/// A rotation `[b, b]` that is not a Hadamard matrix: a product of Givens rotations.
fn givens(b: usize) -> Vec<f32> {
    let mut q = vec![0f64; b * b];
    for i in 0..b {
        q[i * b + i] = 1.0;
    }
    for (k, (i, j)) in (0..b)
        .flat_map(|i| (i + 1..b).map(move |j| (i, j)))
        .enumerate()
    {
        let t = 0.3 + 0.17 * k as f64;
        let (c, s) = (t.cos(), t.sin());
        for r in 0..b {
            let (a, d) = (q[r * b + i], q[r * b + j]);
            q[r * b + i] = c * a - s * d;
            q[r * b + j] = s * a + c * d;
        }
    }
    q.iter().map(|&v| v as f32).collect()
}

/// `y[.., k·b + i] = Σ_j x[.., k·b + j] · H[j, i]` in f64.
fn reference(x: &[f32], h: &[f32], b: usize) -> Vec<f64> {
    let mut y = vec![0f64; x.len()];
    for (blk, out) in x.chunks_exact(b).zip(y.chunks_exact_mut(b)) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = (0..b).map(|j| blk[j] as f64 * h[j * b + i] as f64).sum();
        }
    }
    y
}

/// Max |got - want| over max(1, max |want|).
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
        / scale
}

fn hadamard(x: &RtTensor, h: &RtTensor, threads: usize) -> RtTensor {
    run_in(
        PERQC_DOMAIN,
        "Hadamard",
        1,
        vec![],
        &[Some(x), Some(h)],
        threads,
    )
    .remove(0)
}

fn matmul(x: &RtTensor, h: &RtTensor, threads: usize) -> RtTensor {
    run_in("", "MatMul", 13, vec![], &[Some(x), Some(h)], threads).remove(0)
}

/// The op's error message on these inputs.
fn error(x: &RtTensor, h: &RtTensor) -> String {
    let mut g = Graph::new("t");
    let mut spec = NodeSpec::new("Hadamard").named("n");
    spec.domain = PERQC_DOMAIN.to_string();
    let id = g.add_node(spec, &[], &["y"]).unwrap();
    let k = lookup(PERQC_DOMAIN, "Hadamard", 1)
        .and_then(|d| d.kernel)
        .unwrap();
    let ctx = KernelCtx {
        node: g.node(id),
        opset: 1,
        threads: 1,
        subgraphs: None,
    };
    k(&ctx, &[Some(x), Some(h)]).unwrap_err().to_string()
}

#[test]
fn fast_path_matches_the_product_for_every_block_size() {
    // b = 1 .. 256; f one block and many blocks; odd row counts; rank 2 and 3.
    for b in [1usize, 2, 4, 8, 16, 32, 64, 128, 256] {
        let hv = sylvester(b);
        let h = f32t(&[b, b], hv.clone());
        let s = sylvester_scale(&hv, b).expect("Sylvester");
        for (shape, seed) in [
            (vec![3, b], 1u64),
            (vec![7, 6 * b], 2),
            (vec![3, 5, 3 * b], 3),
            (vec![1, 1, b], 4),
        ] {
            let n: usize = shape.iter().product();
            let xv = uniform(n, seed + b as u64, 2.0);
            let x = f32t(&shape, xv.clone());
            let y1 = hadamard(&x, &h, 1);
            let y2 = hadamard(&x, &h, 2);
            assert_eq!(y1.shape(), &shape[..]);
            assert_eq!(
                bits(&y1),
                bits(&y2),
                "b {b} {shape:?}: threads change the result"
            );
            // The fast path at the detected level, bit for bit.
            let mut fast = vec![MaybeUninit::uninit(); n];
            fwht(&xv, &mut fast, b, s, Level::detect());
            // Safety: `fwht` writes every element.
            let fast: Vec<u32> = fast
                .iter()
                .map(|v| unsafe { v.assume_init() }.to_bits())
                .collect();
            assert_eq!(bits(&y1), fast, "b {b} {shape:?}: not the transform");
            let err = rel_err(&vals(&y1), &reference(&xv, &hv, b));
            assert!(err < 2e-6, "b {b} {shape:?}: rel err {err} vs f64");
            // The dense product of the same H (MatMul on [.., f/b, b]) within round-off.
            let rows = f32t(&[n / b, b], xv.clone());
            let dense = vals(&matmul(&rows, &h, 1));
            let d64: Vec<f64> = dense.iter().map(|&v| v as f64).collect();
            let err = rel_err(&vals(&y1), &d64);
            assert!(err < 4e-6, "b {b} {shape:?}: rel err {err} vs MatMul");
        }
    }
}

#[test]
fn large_inputs_split_over_threads_deterministically() {
    // The MLP width of SmolLM2 with PeRQ's block of 32, above the parallel threshold.
    let (rows, f, b) = (513, 1536, 32);
    let hv = sylvester(b);
    let h = f32t(&[b, b], hv.clone());
    let xv = uniform(rows * f, 9, 3.0);
    let x = f32t(&[rows, f], xv.clone());
    let y1 = hadamard(&x, &h, 1);
    let y2 = hadamard(&x, &h, 2);
    assert_eq!(bits(&y1), bits(&y2));
    let err = rel_err(&vals(&y2), &reference(&xv, &hv, b));
    assert!(err < 1e-6, "rel err {err}");
}

#[test]
fn strided_inputs_give_the_row_major_result() {
    let b = 16;
    let h = f32t(&[b, b], sylvester(b));
    // A transposed view: [4b, 5] stored, read as [5, 4b].
    let stored = f32t(&[4 * b, 5], uniform(20 * b, 5, 1.0));
    let t = RtTensor::F32(stored.as_f32().unwrap().clone().reversed_axes());
    let dense_t = f32t(&[5, 4 * b], t.as_f32().unwrap().iter().copied().collect());
    assert_eq!(bits(&hadamard(&t, &h, 1)), bits(&hadamard(&dense_t, &h, 1)));
    // Every other row of a [7, 2b] tensor, and a slice of columns (whole blocks).
    let a = f32t(&[7, 2 * b], uniform(14 * b, 6, 1.0));
    let arr = a.as_f32().unwrap();
    for view in [
        arr.slice_axis(Axis(0), Slice::new(0, None, 2)).to_shared(),
        arr.slice_axis(Axis(1), Slice::from(b..2 * b)).to_shared(),
    ] {
        let owned = view.as_standard_layout().into_owned().into_shared();
        let v = RtTensor::F32(view);
        assert_eq!(
            bits(&hadamard(&v, &h, 1)),
            bits(&hadamard(&RtTensor::F32(owned), &h, 1))
        );
    }
}

#[test]
fn other_matrices_take_the_dense_product() {
    // A 12 x 12 Hadamard (Paley), a Givens rotation of 8, and a Sylvester matrix with one
    // entry an ulp off: each must be the product with that exact H.
    let mut off = sylvester(32);
    off[33] = f32::from_bits(off[33].to_bits() + 1);
    for (b, hv) in [(12, paley12()), (8, givens(8)), (32, off)] {
        assert_eq!(sylvester_scale(&hv, b), None);
        let h = f32t(&[b, b], hv.clone());
        for shape in [vec![5, 3 * b], vec![2, 3, b]] {
            let n: usize = shape.iter().product();
            let xv = uniform(n, b as u64, 1.0);
            let y = hadamard(&f32t(&shape, xv.clone()), &h, 2);
            assert_eq!(y.shape(), &shape[..]);
            let err = rel_err(&vals(&y), &reference(&xv, &hv, b));
            assert!(err < 1e-6, "b {b} {shape:?}: rel err {err}");
            // Exactly the MatMul kernel on the block rows.
            let rows = f32t(&[n / b, b], xv);
            assert_eq!(bits(&y), bits(&matmul(&rows, &h, 2)), "b {b}");
        }
    }
    // The Paley matrix is orthogonal: H Hᵀ = I.
    let p = paley12();
    for i in 0..12 {
        for j in 0..12 {
            let d: f32 = (0..12).map(|k| p[i * 12 + k] * p[j * 12 + k]).sum();
            assert!((d - (i == j) as i32 as f32).abs() < 1e-6);
        }
    }
}

#[test]
fn empty_rows_and_bad_operands() {
    let h = f32t(&[4, 4], sylvester(4));
    let y = hadamard(&f32t(&[0, 8], vec![]), &h, 2);
    assert_eq!(y.shape(), &[0, 8]);
    assert_eq!(
        error(&f32t(&[2, 6], vec![0.0; 12]), &h),
        "block size 4 does not divide the last dim 6 of x [2, 6]"
    );
    assert_eq!(
        error(&f32t(&[2, 8], vec![0.0; 16]), &f32t(&[4, 2], vec![0.0; 8])),
        "H must be a non-empty square matrix, got shape [4, 2]"
    );
    assert_eq!(
        error(&f32t(&[], vec![1.0]), &f32t(&[1, 1], vec![1.0])),
        "x must have a channel axis"
    );
    let ints = RtTensor::i64(ArrayD::zeros(IxDyn(&[2, 4])));
    assert_eq!(error(&ints, &h), "input 0: i64 is not supported here");
}
