//! `cat`: block concentration-alignment transforms (CAT, arXiv 2603.04359) on each mlp
//! region's sink input (the down_proj input), with the online block Hadamard after them.
//!
//! The SQNR of a quantized linear `y = x W` factors into the concentration of `x` and of
//! `W` (rotations improve it) and their alignment, which only a non-orthogonal map changes.
//! With `S_x = E[x xᵀ]` and `S_w = W Wᵀ` (ONNX layout `W [K, N]`: the Gram over the input
//! axis, summed over the sinks that read `x`), the map `x ↦ M x`, `W ↦ M⁻ᵀ W` is
//! alignment-optimal when `M S_x Mᵀ = M⁻ᵀ S_w M⁻¹`, i.e. `Mᵀ M = S_x⁻¹ # S_w` (the matrix
//! geometric mean; `M` its symmetric square root, [`perqc_quant::spd`]). Block CAT takes
//! `M = diag(M_1, ..)` from the diagonal `k x k` blocks of the damped `S_x` and `S_w`
//! (f64; a block that stays singular is an error naming it).
//!
//! Then the online Hadamard of the recipe: `T = diag(H_b, ..) M`, block-diagonal with
//! blocks of `max(k, b)` (one of `k` and `b` divides the other; `b` = the width for a full
//! rotation). `T` is not orthogonal and does not commute with SiLU, so it is the online
//! part of a channel transform: computed before down_proj (a block-wise `MatMul`), `T⁻ᵀ`
//! folded into down_proj. It replaces `online-hadamard` on the regions it applies to.
//!
//! Statistics: the calibration's per-block second moments (`block_moments = k`) of the
//! sink inputs, on the model as it is when the pass runs (after permutations and
//! rotations): the driver calibrates again after them.
//!
//! Options: `k=64`, `block=32|full|none` (the Hadamard after `M`), `damp=0.01` (relative
//! to the mean diagonal). Counters: `regions-transformed`, `nodes-inserted`.

use crate::calibration::Calibration;
use crate::probe::Probe;
use crate::regions::{Region, RegionKind, Regions};
use crate::smooth::Rotation;
use crate::transform::{self, ChannelOp, Placement};
use perqc_ir::{
    Graph, Model, OptionError, Pass, PassContext, PassError, PassOptions, PassOutcome, Tensor,
};
use perqc_quant::spd;

#[derive(Debug)]
pub struct Cat {
    k: usize,
    rotation: Rotation,
    damp: f64,
    /// The quantizers the down_proj's error is probed with, when rows were sampled.
    probe: Probe,
}

impl Cat {
    pub const NAME: &'static str = "cat";
    pub const DESCRIPTION: &'static str = "block concentration-alignment transform on each mlp region's sink input: M = (S_x^-1 # S_w)^1/2 per k x k block, then the block Hadamard, computed online with the inverse folded into the sink (exact); options k=64, block=32|full|none, damp=0.01, and for the probed error wbits=4, abits=4|none";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&["k", "block", "damp", "wbits", "abits"])?;
        let k = opts.parse_or("k", "a block size (positive integer)", 64usize)?;
        let rotation = match opts.get("block") {
            Some("full") => Rotation::Full,
            Some("none") => Rotation::None,
            _ => Rotation::Block(opts.parse_or("block", "a block size, full or none", 32usize)?),
        };
        let damp = opts.parse_or("damp", "a relative damping (non-negative number)", 0.01f64)?;
        let wbits = opts.parse_or("wbits", "2..8", 4u32)?;
        let abits = match opts.get("abits") {
            Some("none") => None,
            _ => Some(opts.parse_or("abits", "2..8 or none", 4u32)?),
        };
        let probe = crate::probe::Probe::w_int_a_int(wbits, abits);
        Ok(Box::new(Cat {
            k,
            rotation,
            damp,
            probe,
        }))
    }

    /// The block moments the calibration must collect for this pass.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// `S_w` blocks of size `k` along the sinks' reading axis: `Σ_sinks Σ_n W[i, n] W[j, n]`.
fn weight_gram_blocks(graph: &Graph, region: &Region, k: usize) -> Result<Vec<Vec<f64>>, String> {
    let nb = region.dim / k;
    let mut out = vec![vec![0f64; k * k]; nb];
    for e in &region.sinks {
        let t = graph
            .const_tensor(e.weight)
            .ok_or_else(|| format!("`{}` is not a constant", region.value_name(e.weight)))?;
        if t.dims.len() != 2 {
            return Err(format!("`{}` is not 2-d", region.value_name(e.weight)));
        }
        let w = t.to_f32().map_err(|e| e.to_string())?;
        let (r, c) = (t.dims[0] as usize, t.dims[1] as usize);
        // Element (channel i, output n).
        let at = |i: usize, n: usize| -> f64 {
            f64::from(if e.axis == 0 {
                w[i * c + n]
            } else {
                w[n * c + i]
            })
        };
        let outputs = if e.axis == 0 { c } else { r };
        for (b, blk) in out.iter_mut().enumerate() {
            for i in 0..k {
                for j in i..k {
                    let s: f64 = (0..outputs)
                        .map(|n| at(b * k + i, n) * at(b * k + j, n))
                        .sum();
                    blk[i * k + j] += s;
                    if i != j {
                        blk[j * k + i] += s;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The Hadamard block that follows CAT's blocks of `k` on a width of `dim` (`k` itself
/// without a rotation), if the shapes fit: `k` and the Hadamard's block divide the width
/// and one another.
fn hadamard_block(dim: usize, k: usize, rotation: Rotation) -> Result<usize, String> {
    if k == 0 || !dim.is_multiple_of(k) {
        return Err(format!("k = {k} does not divide the width {dim}"));
    }
    let b = match rotation {
        Rotation::None => return Ok(k),
        Rotation::Block(b) => b,
        Rotation::Full => dim,
    };
    ChannelOp::hadamard_fits(dim, b)?;
    if !(b.is_multiple_of(k) || k.is_multiple_of(b)) {
        return Err(format!(
            "the Hadamard block {b} and the CAT block {k} must divide one another"
        ));
    }
    Ok(b)
}

/// `T = diag(H_b, ..) · diag(M_1, ..)` as blocks of `max(k, b)`.
fn compose(m: &[Vec<f64>], k: usize, dim: usize, rotation: Rotation) -> Result<ChannelOp, String> {
    let b = hadamard_block(dim, k, rotation)?;
    let size = b.max(k);
    let per = size / k;
    let mut blocks = Vec::with_capacity(dim / size);
    for g in 0..dim / size {
        // diag(M_{g·per}, ..) of `size`.
        let mut t = vec![0f64; size * size];
        for (p, mb) in m[g * per..(g + 1) * per].iter().enumerate() {
            for i in 0..k {
                for j in 0..k {
                    t[(p * k + i) * size + p * k + j] = mb[i * k + j];
                }
            }
        }
        if rotation != Rotation::None {
            // Rows of the block mixed by diag(H_b, ..): the mechanism's own primitive.
            let h = ChannelOp::hadamard(size, b.min(size), None).map_err(|e| e.to_string())?;
            let dims = vec![size as i64, size as i64];
            let tt = Tensor::from_slice(dims, &t);
            t = h
                .apply(&tt, 0)?
                .to_vec::<f64>()
                .map_err(|e| e.to_string())?;
        }
        blocks.push(t);
    }
    Ok(ChannelOp::Blocks { size, blocks })
}

/// CAT's online map for one region from its calibration block moments.
pub fn region_map(
    graph: &Graph,
    region: &Region,
    calib: &Calibration,
    k: usize,
    rotation: Rotation,
    damp: f64,
) -> Result<ChannelOp, String> {
    hadamard_block(region.dim, k, rotation)?;
    let names = crate::permute::sink_activations(region);
    let [name] = names.as_slice() else {
        return Err(format!(
            "the sinks read {} activations; CAT needs one",
            names.len()
        ));
    };
    let stats = calib
        .get(name)
        .ok_or_else(|| format!("no calibration statistics for `{name}`"))?;
    let identity = region
        .sinks
        .iter()
        .all(|e| e.channels.iter().enumerate().all(|(i, &c)| c as usize == i));
    if !identity || stats.channels() != region.dim {
        return Err(format!(
            "`{name}` does not carry the channels in region order"
        ));
    }
    let rows = stats.rows().max(1) as f64;
    let sw = weight_gram_blocks(graph, region, k)?;
    let mut m = Vec::with_capacity(sw.len());
    for (b, w) in sw.iter().enumerate() {
        let sx = stats.block_moment(b).ok_or_else(|| {
            format!("the statistics of `{name}` have no {k} x {k} block moments (calibrate with block_moments = {k})")
        })?;
        let sx: Vec<f64> = sx.iter().map(|v| v / rows).collect();
        let (mb, _) =
            spd::alignment_transform(&spd::damped(&sx, k, damp), &spd::damped(w, k, damp), k)
                .map_err(|e| format!("block {b} (channels {}..{}): {e}", b * k, (b + 1) * k))?;
        m.push(mb);
    }
    compose(&m, k, region.dim, rotation)
}

impl Pass for Cat {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn check(&self, model: &Model, ctx: &mut PassContext) -> Result<(), PassError> {
        let regions = ctx.analysis::<Regions>(model)?;
        for (i, region) in regions.regions.iter().enumerate() {
            if region.kind == RegionKind::Mlp {
                hadamard_block(region.dim, self.k, self.rotation).map_err(|e| {
                    PassError::msg(format!("cat: region #{i} (mlp, d = {}): {e}", region.dim))
                })?;
            }
        }
        Ok(())
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        if transform::already_applied(model, ctx, Self::NAME) {
            return Ok(PassOutcome::from_changed(false));
        }
        let Some(calib) = ctx.take_resource::<Calibration>() else {
            return Err(PassError::msg(
                "cat: needs calibration statistics with block moments (--calib-text with --tokenizer, or --calib-ids)",
            ));
        };
        let regions = ctx.analysis::<Regions>(model)?;
        let (mut done, mut nodes) = (0u64, 0u64);
        // The probed down_proj error with the Hadamard alone and with CAT, summed.
        let mut probed: Vec<(f64, f64)> = Vec::new();
        for (i, region) in regions.regions.iter().enumerate() {
            if region.kind != RegionKind::Mlp {
                continue;
            }
            let what = format!("region #{i} (mlp, d = {})", region.dim);
            if !ctx.rewrite() {
                break;
            }
            let op = region_map(
                &model.graph,
                region,
                &calib,
                self.k,
                self.rotation,
                self.damp,
            )
            .map_err(|e| PassError::msg(format!("cat: {what}: {e}")))?;
            if let Ok(layers) = crate::probe::sink_samples(&model.graph, region, &calib) {
                let rotation = match self.rotation {
                    Rotation::None => Vec::new(),
                    Rotation::Block(b) => vec![ChannelOp::hadamard(region.dim, b, None)],
                    Rotation::Full => vec![ChannelOp::hadamard(region.dim, region.dim, None)],
                };
                let rotation: Vec<ChannelOp> = rotation
                    .into_iter()
                    .collect::<Result<_, _>>()
                    .map_err(|e| PassError::msg(format!("cat: {what}: {e}")))?;
                let err = |chain: &[ChannelOp]| {
                    self.probe
                        .region_error(&layers, chain)
                        .map_err(|e| PassError::msg(format!("cat: {what}: {e}")))
                };
                probed.push((
                    err(&rotation)?.relative(),
                    err(std::slice::from_ref(&op))?.relative(),
                ));
            }
            let a = transform::apply(&mut model.graph, region, &op, Placement::Online)
                .map_err(|e| PassError::msg(format!("cat: {what}: {e}")))?;
            done += 1;
            nodes += a.online_nodes as u64;
        }
        ctx.provide(calib);
        if done > 0 {
            transform::record_applied(model, Self::NAME);
        }
        if !probed.is_empty() {
            let n = probed.len() as f64;
            let (b, a) = probed
                .iter()
                .fold((0.0, 0.0), |(x, y), (p, q)| (x + p, y + q));
            ctx.note(format!(
                "down_proj quantized error on sampled rows (mean E / |xW|^2 over {} regions): {:.5} with the Hadamard alone, {:.5} with CAT ({:+.1}%)",
                probed.len(),
                b / n,
                a / n,
                100.0 * (a / b - 1.0)
            ));
        }
        Ok(PassOutcome::from_changed(done > 0)
            .with("regions-transformed", done)
            .with("nodes-inserted", nodes))
    }
}
