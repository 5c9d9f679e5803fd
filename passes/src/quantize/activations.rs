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

/// Inserts a quantizer per distinct input of `sites` (in order of first reader).
pub fn insert(graph: &mut Graph, sites: &[Site], q: TokenQuant) -> Result<Vec<ActQuant>, String> {
    let mut by_input: HashMap<ValueId, usize> = HashMap::new();
    let mut acts: Vec<ActQuant> = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        match by_input.get(&s.x) {
            Some(&a) => acts[a].sites.push(i),
            None => {
                by_input.insert(s.x, acts.len());
                acts.push(ActQuant {
                    node: s.node, // replaced below
                    input: s.x,
                    output: s.x,
                    sites: vec![i],
                    quant: q,
                });
            }
        }
    }
    for a in &mut acts {
        let first = a
            .sites
            .iter()
            .map(|&i| sites[i].node)
            .min_by_key(|&n| graph.order_position(n).unwrap_or(usize::MAX))
            .expect("at least one site");
        let xname = graph.value(a.input).name.clone();
        let out = graph.fresh_name(&format!("{xname}.quantized"));
        let name = graph.fresh_name(&format!("{xname}/quantize"));
        a.node = graph
            .insert_node_before(first, spec(&name, q), &[Some(a.input)], &[out.as_str()])
            .map_err(|e| e.to_string())?;
        a.output = graph.find(&out).expect("just defined");
        for &i in &a.sites {
            graph.set_input(sites[i].node, 0, Some(a.output));
        }
    }
    Ok(acts)
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

/// The candidate of `candidates` with the least summed output error `E(c)` (module doc) on
/// rows `x` (`[rows, K]`), for the linears given as (float `[N, K]`, quantized `[N, K]`)
/// weights; returns it and each candidate's error (in candidate order).
pub fn search_clip(
    x: ArrayView2<f32>,
    linears: &[(ArrayView2<f32>, ArrayView2<f32>)],
    base: TokenQuant,
    candidates: &[f32],
) -> (f32, Vec<f64>) {
    let reference: Vec<Array2<f32>> = linears.iter().map(|(w, _)| x.dot(&w.t())).collect();
    let errors: Vec<f64> = candidates
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
                    let yq = xq.dot(&wq.t());
                    y.iter()
                        .zip(yq.iter())
                        .map(|(a, b)| {
                            let d = (a - b) as f64;
                            d * d
                        })
                        .sum::<f64>()
                })
                .sum()
        })
        .collect();
    let best = errors
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map_or(1.0, |(i, _)| candidates[i]);
    (best, errors)
}

/// SQNR (dB) of `Q(x) Ŵᵀ` against `x Wᵀ` (weights `[N, K]`, rows `x` `[rows, K]`).
pub fn output_sqnr(
    x: ArrayView2<f32>,
    w: ArrayView2<f32>,
    wq: ArrayView2<f32>,
    q: TokenQuant,
) -> f64 {
    let y = x.dot(&w.t());
    let mut xq = x.to_owned();
    let width = xq.ncols();
    fake_quantize_rows(xq.as_slice_mut().expect("standard layout"), width, q);
    let yq = xq.dot(&wq.t());
    perqc_quant::sqnr_db(
        y.as_standard_layout().as_slice().expect("standard"),
        yq.as_standard_layout().as_slice().expect("standard"),
    )
}
