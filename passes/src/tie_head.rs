//! `tie-head`: the LM head reads the token embedding table when its weight is a linear map
//! of that table, so the table is stored and held once.
//!
//! Identity: with the head `y = x H` (`H [K, V]`) and the embedding table `E [V, K]`, if
//! `H = M Eᵀ` for some `M [K, K]` then `y = (x M) Eᵀ`: the head becomes `Linear(x, M)` then
//! `Linear(·, E, transB=1)`, and `H` (`V K` floats: 113 MB for SmolLM2) is dropped for
//! `K²` (1.3 MB). Two cases reach this:
//!
//! - a model with tied embeddings whose export stored the table twice: `H = Eᵀ` bit for
//!   bit, `M = I`, and no extra node;
//! - the recipe's transforms, which untie a tied pair: folding the final norm's `γ` into the
//!   head and rotating the residual stream by `R` give `H = Rᵀ diag(γ) Eᵀ` while the table
//!   becomes `E R`, so `H = M (E R)ᵀ` with `M = Rᵀ diag(γ) R`.
//!
//! `M` is found, not assumed: least squares on a subset `S` of the vocabulary (about `4K`
//! entries, evenly spaced), `(E_Sᵀ E_S) Mᵀ = E_Sᵀ H_Sᵀ` in f64. Then it is checked on every
//! entry: the pass rewrites only where `‖H − M Eᵀ‖_F ≤ 1e-5 ‖H‖_F`, about the round-off
//! of the f32 folds that produced `H`. The outputs change by that round-off.
//!
//! The head is the one `quantize::sites` names (no linear after it, its result alone
//! reaching a graph output), with a constant f32 weight; run after quantization, a quantized
//! head is not matched. Counters: `heads-tied`, `weights-removed`.

use crate::quantize::sites::{self, Site, Table};
use crate::quantize::weights::drop_if_unread;
use ndarray::{Array2, ArrayView2};
use perqc_ir::{
    AttrValue, Graph, Model, NodeSpec, OptionError, Pass, PassContext, PassError, PassOptions,
    PassOutcome, Tensor,
};
use perqc_ops::kernels::linalg::matmul_2d;

/// Relative Frobenius residual below which `H = M Eᵀ` counts as exact.
const TOLERANCE: f64 = 1e-5;

#[derive(Debug, Default)]
pub struct TieHead;

impl TieHead {
    pub const NAME: &'static str = "tie-head";
    pub const DESCRIPTION: &'static str = "let the LM head read the embedding table when its weight is M E^T for a small M (a tied embedding stored twice, or untied by the norm fold and residual rotation): Linear(x, M) then Linear(E, transB=1), the head's own table dropped (exact to f32 round-off)";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(TieHead))
    }
}

/// The head's weight as `H [K, V]` (the `x H` layout).
fn head_weight(graph: &Graph, site: &Site) -> Option<Array2<f32>> {
    let t = graph.const_tensor(site.weight)?;
    let v = t.to_f32().ok()?;
    let stored = Array2::from_shape_vec((t.dims[0] as usize, t.dims[1] as usize), v).ok()?;
    Some(if site.trans {
        stored.t().as_standard_layout().into_owned()
    } else {
        stored
    })
}

/// `M` with `H = M Eᵀ` within [`TOLERANCE`] (`None` for `M = I` exactly), or why not.
fn solve_map(h: ArrayView2<f32>, e: ArrayView2<f32>) -> Result<Option<Array2<f32>>, String> {
    let (k, v) = h.dim();
    if e.t() == h {
        return Ok(None);
    }
    // Normal equations on every `step`-th entry: A = E_Sᵀ E_S, B = E_Sᵀ H_Sᵀ (both K x K).
    let step = (v / (4 * k)).max(1);
    let rows: Vec<usize> = (0..v).step_by(step).collect();
    if rows.len() < k {
        return Err(format!(
            "{v} table entries cannot determine a {k} x {k} map"
        ));
    }
    let es = Array2::from_shape_fn((rows.len(), k), |(r, i)| f64::from(e[[rows[r], i]]));
    let hs = Array2::from_shape_fn((rows.len(), k), |(r, i)| f64::from(h[[i, rows[r]]]));
    let a = es.t().dot(&es);
    let b = es.t().dot(&hs);
    let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
    let mt = perqc_quant::spd::solve_definite(
        a.as_slice().expect("standard"),
        k,
        b.as_slice().expect("standard"),
        k,
    )
    .map_err(|err| format!("the table's entries do not span its width: {err}"))?;
    // mt is Mᵀ: M[i][j] = mt[j][i].
    let m = Array2::from_shape_fn((k, k), |(i, j)| mt[j * k + i] as f32);
    let threads = rayon::current_num_threads();
    let approx = matmul_2d(m.view(), e.t(), threads);
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&x, &y) in h.iter().zip(approx.iter()) {
        diff += f64::from(x - y).powi(2);
        norm += f64::from(x).powi(2);
    }
    let rel = (diff / norm.max(f64::MIN_POSITIVE)).sqrt();
    if rel > TOLERANCE {
        return Err(format!(
            "the head is not a linear map of the table (relative residual {rel:.1e})"
        ));
    }
    Ok(Some(m))
}

/// Ties `site` to `table` through `m`: inserts `Linear(x, M)` before the head when there is
/// one, and points the head at the table with `transB = 1`. Returns whether the head's own
/// weight was dropped (nothing else read it).
fn tie(
    graph: &mut Graph,
    site: &Site,
    table: &Table,
    m: Option<Array2<f32>>,
) -> Result<bool, String> {
    let node = site.node;
    let mut x = site.x;
    if let Some(m) = m {
        let base = graph.value(site.x).name.clone();
        let k = m.nrows() as i64;
        let name = graph.fresh_name(&format!("{base}/head_map"));
        let w = graph
            .add_initializer(
                &name,
                Tensor::from_slice(vec![k, k], m.as_slice().expect("standard")),
            )
            .map_err(|e| e.to_string())?;
        let out = graph.fresh_name(&format!("{base}/head_mapped"));
        let mut spec = NodeSpec::new("Linear")
            .named(&graph.fresh_name(&format!("{base}/head_map")))
            .attr("transB", AttrValue::Int(0));
        spec.domain = perqc_ops::PERQC_DOMAIN.to_string();
        graph
            .insert_node_before(node, spec, &[Some(site.x), Some(w)], &[out.as_str()])
            .map_err(|e| e.to_string())?;
        x = graph.find(&out).expect("just defined");
    }
    let n = graph.node(node);
    let mut spec = NodeSpec::new("Linear").attr("transB", AttrValue::Int(1));
    spec.domain = n.domain.clone();
    for a in n.attrs.iter().filter(|a| a.name != "transB") {
        spec.attrs.push(a.clone());
    }
    let mut inputs: Vec<_> = n.inputs().to_vec();
    inputs[0] = Some(x);
    inputs[1] = Some(table.table);
    graph
        .set_op(node, spec, &inputs)
        .map_err(|e| e.to_string())?;
    let w = site.weight;
    let dropped = graph.value(w).uses().is_empty() && !graph.outputs.contains(&w);
    drop_if_unread(graph, w);
    Ok(dropped)
}

impl Pass for TieHead {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let heads: Vec<Site> = sites::linears(&model.graph)
            .into_iter()
            .filter(|s| s.head)
            .collect();
        let tables = sites::tables(&model.graph);
        let (mut tied, mut removed) = (0u64, 0u64);
        for site in &heads {
            let label = format!("head {}", site.name);
            let Some(table) = tables.iter().find(|t| t.rows == site.n && t.cols == site.k) else {
                ctx.note(format!(
                    "{label}: no embedding table of {} x {}",
                    site.n, site.k
                ));
                continue;
            };
            if table.table == site.weight {
                ctx.note(format!("{label}: already reads the embedding table"));
                continue;
            }
            if !ctx.rewrite() {
                break;
            }
            let g = &model.graph;
            let (Some(h), Some(e)) = (
                head_weight(g, site),
                g.const_tensor(table.table).and_then(|t| {
                    Array2::from_shape_vec((table.rows, table.cols), t.to_f32().ok()?).ok()
                }),
            ) else {
                ctx.note(format!(
                    "{label}: not tied: its weight or the table is not readable as f32"
                ));
                continue;
            };
            match solve_map(h.view(), e.view()) {
                Ok(m) => {
                    let how = if m.is_some() {
                        format!("through a {} x {} map", site.k, site.k)
                    } else {
                        "directly (the same table)".to_string()
                    };
                    let dropped = tie(&mut model.graph, site, table, m)
                        .map_err(|err| PassError::msg(format!("tie-head: {label}: {err}")))?;
                    removed += u64::from(dropped);
                    tied += 1;
                    ctx.note(format!("{label}: reads the embedding table {how}"));
                }
                Err(why) => ctx.note(format!("{label}: not tied: {why}")),
            }
        }
        Ok(PassOutcome::from_changed(tied > 0)
            .with("heads-tied", tied)
            .with("weights-removed", removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(v: usize, k: usize, seed: u64) -> Array2<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        Array2::from_shape_fn((v, k), |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
    }

    /// The same table gives no map; `M Eᵀ` gives `M` back to round-off; a head that is
    /// not a map of the table (one entry changed) and a table too short to fix `M` are
    /// refused with the reason.
    #[test]
    fn finds_the_map_or_says_why_not() {
        let (v, k) = (300, 8);
        let e = table(v, k, 1);
        assert!(solve_map(e.t(), e.view()).unwrap().is_none());
        let m = table(k, k, 2);
        let h = m.dot(&e.t());
        let got = solve_map(h.view(), e.view()).unwrap().expect("a map");
        let err = got
            .iter()
            .zip(&m)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(err < 1e-4, "{err}");
        let mut off = h.clone();
        off[[3, 17]] += 0.5;
        let why = solve_map(off.view(), e.view()).unwrap_err();
        assert!(why.contains("not a linear map of the table"), "{why}");
        let short = table(6, k, 3);
        let why = solve_map(m.dot(&short.t()).view(), short.view()).unwrap_err();
        assert!(why.contains("cannot determine"), "{why}");
    }
}
