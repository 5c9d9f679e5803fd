//! Activation quantizers: one `ai.perqc::FakeQuantize` (per-token dynamic, see
//! `perqc_ops::quant`) per distinct activation the quantized linears read, placed before
//! the first of them; every such linear reads its output. Linears that share an input
//! (q, k, v; gate, up) share the quantizer, so they also share its clip ratio.
//!
//! Clip search: the ratio `c` shrinks each token's range before rounding. Chosen per
//! quantizer from candidates on sampled calibration rows X by the summed output error of
//! the linears it feeds, against the float layer:
//! `E(c) = Σ_l ||X W_l − Q_c(X) Ŵ_l||²_F` (Ŵ_l the quantized weight).

use super::sites::Site;
use ndarray::{Array2, ArrayView2};
use perqc_ir::{AttrValue, Graph, NodeId, NodeSpec, ValueId};
use perqc_ops::kernels::linalg::matmul_2d;
use perqc_ops::quant::{TokenQuant, fake_quantize_rows};
use std::collections::HashMap;

/// One activation quantizer.
#[derive(Clone, Debug)]
pub struct ActQuant {
    pub node: NodeId,
    /// What it quantizes (the linears' original input).
    pub input: ValueId,
    /// What the linears now read.
    pub output: ValueId,
    /// Indices of the sites reading it.
    pub sites: Vec<usize>,
    pub quant: TokenQuant,
}

/// The node spec of a quantizer.
fn spec(name: &str, q: TokenQuant) -> NodeSpec {
    let mut s = NodeSpec::new("FakeQuantize")
        .named(name)
        .attr("bits", AttrValue::Int(q.bits as i64))
        .attr("symmetric", AttrValue::Int(q.symmetric as i64))
        .attr("clip", AttrValue::Float(q.clip));
    s.domain = perqc_ops::PERQC_DOMAIN.to_string();
    s
}

/// The sites grouped by the activation they read (in order of first reader): each group
/// gets one quantizer.
pub fn groups(sites: &[Site]) -> Vec<Vec<usize>> {
    let mut by_input: HashMap<ValueId, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        match by_input.get(&s.x) {
            Some(&g) => groups[g].push(i),
            None => {
                by_input.insert(s.x, groups.len());
                groups.push(vec![i]);
            }
        }
    }
    groups
}

/// Inserts the quantizer of one group: before the first of its linears, on the activation
/// they read now (an exact transform applied since the grouping may have put a node in
/// front of them; they still share their input).
pub fn insert(
    graph: &mut Graph,
    sites: &[Site],
    group: &[usize],
    q: TokenQuant,
) -> Result<ActQuant, String> {
    let first = group
        .iter()
        .map(|&i| sites[i].node)
        .min_by_key(|&n| graph.order_position(n).unwrap_or(usize::MAX))
        .ok_or("an activation group without linears")?;
    let input = sites[group[0]].x;
    if let Some(&i) = group.iter().find(|&&i| sites[i].x != input) {
        return Err(format!(
            "{} and {} no longer read one activation",
            sites[group[0]].name, sites[i].name
        ));
    }
    let xname = graph.value(input).name.clone();
    let out = graph.fresh_name(&format!("{xname}.quantized"));
    let name = graph.fresh_name(&format!("{xname}/quantize"));
    let node = graph
        .insert_node_before(first, spec(&name, q), &[Some(input)], &[out.as_str()])
        .map_err(|e| e.to_string())?;
    let output = graph.find(&out).expect("just defined");
    for &i in group {
        graph.set_input(sites[i].node, 0, Some(output));
    }
    Ok(ActQuant {
        node,
        input,
        output,
        sites: group.to_vec(),
        quant: q,
    })
}

/// Sets quantizer `a`'s clip ratio.
pub fn set_clip(graph: &mut Graph, a: &mut ActQuant, clip: f32) -> Result<(), String> {
    a.quant.clip = clip;
    let node = graph.node(a.node);
    let name = node.name.clone();
    let input = node.input(0);
    graph
        .set_op(a.node, spec(&name, a.quant), &[input])
        .map_err(|e| e.to_string())
}

/// What the clip search found on the sampled rows.
#[derive(Clone, Debug)]
pub struct ClipChoice {
    /// The candidate with the least summed output error.
    pub ratio: f32,
    /// Per linear: SQNR (dB) of `Q_c(X) Ŵᵀ` against `X Wᵀ` at the chosen ratio.
    pub sqnr: Vec<f64>,
}

/// The candidate of `candidates` with the least summed output error `E(c)` (module doc) on
/// rows `x` (`[rows, K]`), for the linears given as (float `[N, K]`, quantized `[N, K]`)
/// weights. Products on the current rayon pool's threads; each reference product `X Wᵀ` is
/// computed once.
pub fn search_clip(
    x: ArrayView2<f32>,
    linears: &[(ArrayView2<f32>, ArrayView2<f32>)],
    base: TokenQuant,
    candidates: &[f32],
) -> ClipChoice {
    let threads = rayon::current_num_threads();
    let reference: Vec<Array2<f32>> = linears
        .iter()
        .map(|(w, _)| matmul_2d(x, w.t(), threads))
        .collect();
    let signal: Vec<f64> = reference
        .iter()
        .map(|y| sum_sq(y.iter().copied()))
        .collect();
    // [candidate][linear] squared output error.
    let per: Vec<Vec<f64>> = candidates
        .iter()
        .map(|&c| {
            let mut xq = x.to_owned();
            let width = xq.ncols();
            fake_quantize_rows(
                xq.as_slice_mut().expect("standard layout"),
                width,
                TokenQuant { clip: c, ..base },
            );
            linears
                .iter()
                .zip(&reference)
                .map(|((_, wq), y)| {
                    let yq = matmul_2d(xq.view(), wq.t(), threads);
                    sum_sq(y.iter().zip(yq.iter()).map(|(a, b)| a - b))
                })
                .collect()
        })
        .collect();
    let errors: Vec<f64> = per.iter().map(|e| e.iter().sum()).collect();
    let best = errors
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    let sqnr = signal
        .iter()
        .zip(per.get(best).map_or(&[][..], |e| &e[..]))
        .map(|(&s, &n)| {
            if n == 0.0 {
                f64::INFINITY
            } else {
                10.0 * (s / n).log10()
            }
        })
        .collect();
    ClipChoice {
        ratio: candidates.get(best).copied().unwrap_or(1.0),
        sqnr,
    }
}

/// `Σ v²` in f64.
fn sum_sq(v: impl Iterator<Item = f32>) -> f64 {
    v.map(|d| f64::from(d) * f64::from(d)).sum()
}
