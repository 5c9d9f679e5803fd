//! `center-stream`: turn a LayerNorm residual stream into an RMS-norm one, the SliceGPT
//! way, so that `fold-norms` and `rotate` (R1) apply to it.
//!
//! Identity: if every writer of the residual stream writes vectors whose mean over the
//! channels is zero, the stream is mean-zero, and then
//! `LayerNorm(x) = (x - mean) / sqrt(var + eps) ⊙ γ + β = x / rms(x) ⊙ γ + β`
//! (`mean(x) = 0` gives `var = mean(x²)`, same `eps`). Centering a writer is exact for the
//! model only when every reader of the stream reads it through a LayerNorm (which subtracts
//! the mean anyway) or through the residual `Add`s that feed only such norms, and the stream
//! is no graph output nor input. So, on a residual region whose norms are
//! `ai.perqc::LayerNormalization`:
//!
//! 1. the stream's values are traced back from the norms' inputs through the residual
//!    `Add`s (and Reshapes that keep the `d` channels last); every value's readers must be
//!    such an op or one of the norms (input 0), and no value is a graph input or output;
//! 2. each writer is centered, `W ← C W` with `C = I - 1 1ᵀ / d` along the axis it writes:
//!    a linear layer's output axis and its bias, an embedding table's rows, a constant
//!    added into the stream (in f64, rounded once; a weight another node also reads is
//!    copied first, so a tied embedding/lm_head is untied here);
//! 3. each norm becomes `ai.perqc::RMSNormalization(x, γ)` (same axis and epsilon), and β
//!    goes into every reader's bias: `(n ⊙ γ + β) W + b = (n ⊙ γ) W + (β W + b)` (the
//!    readers must be linear layers, directly or through channel-keeping Reshapes; a bias
//!    input is added where one has none). Constants left unread are removed.
//!
//! `C` is not invertible, so this is no channel transform of the one mechanism
//! ([`crate::transform::apply`]): its legality is the argument above, checked per region.
//! A region that fails a check is left as it is, with a note saying why (the encoder
//! fixture's stream is a graph input). The RMS norms' gammas then fold (`fold-norms`) and
//! the stream takes R1 (`rotate`) like a Llama's. Regions without LayerNorms (Llama,
//! SmolLM2) are not touched.
//!
//! Counters: `streams-centered`, `norms-converted`, `writers-centered`, `biases-folded`.

use crate::regions::{RegionKind, Regions};
use perqc_ir::{
    AttrValue, DType, Model, NodeId, OptionError, Pass, PassContext, PassError, PassOptions,
    PassOutcome, Tensor, ValueDef, ValueId,
};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Default)]
pub struct CenterStream;

impl CenterStream {
    pub const NAME: &'static str = "center-stream";
    pub const DESCRIPTION: &'static str = "center every writer of a LayerNorm residual stream and turn its LayerNorms into RMS norms with beta folded into the readers' biases (exact where the stream is read only through its norms), so that fold-norms and R1 apply";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(CenterStream))
    }
}

/// A constant to center along `axis`, read at input `input` of the writer `node`.
#[derive(Clone, Debug)]
struct Writer {
    node: NodeId,
    input: usize,
    value: ValueId,
    axis: usize,
}

/// A norm to convert: `(node, x, gamma, beta, epsilon)`.
struct Norm {
    node: NodeId,
    x: ValueId,
    gamma: ValueId,
    beta: Option<Vec<f32>>,
    /// The bias input, dropped with the LayerNorm.
    beta_value: Option<ValueId>,
    eps: f32,
}

/// What centering one stream does.
struct Plan {
    writers: Vec<Writer>,
    norms: Vec<Norm>,
}

fn is_perqc(model: &Model, n: NodeId, op: &str) -> bool {
    let node = model.graph.node(n);
    node.op_type == op && node.domain == perqc_ir::PERQC_DOMAIN
}

fn f32_const(model: &Model, v: ValueId) -> Option<&Tensor> {
    model
        .graph
        .const_tensor(v)
        .filter(|t| t.dtype == DType::F32)
}

impl Pass for CenterStream {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let regions = ctx.analysis::<Regions>(model)?;
        let shapes = ctx.analysis::<perqc_ops::ShapeMap>(model)?;
        let (mut streams, mut norms, mut writers, mut biases) = (0u64, 0u64, 0u64, 0u64);
        for (i, region) in regions.regions.iter().enumerate() {
            if region.kind != RegionKind::Residual {
                continue;
            }
            let mut lns: Vec<NodeId> = Vec::new();
            for e in &region.sources {
                if is_perqc(model, e.node, "LayerNormalization") && !lns.contains(&e.node) {
                    lns.push(e.node);
                }
            }
            if lns.is_empty() {
                continue;
            }
            let what = format!("region #{i} (residual, d = {})", region.dim);
            if let Some(b) = region.barriers.first() {
                let at = b.at.as_deref().map_or(String::new(), |a| format!("{a}: "));
                ctx.note(format!(
                    "{what}: LayerNorm stream not centered: {at}{}",
                    b.reason
                ));
                continue;
            }
            let plan = match plan(model, &shapes, &lns, region.dim) {
                Ok(p) => p,
                Err(why) => {
                    ctx.note(format!("{what}: LayerNorm stream not centered: {why}"));
                    continue;
                }
            };
            if !ctx.rewrite() {
                break;
            }
            let (w, b) = apply(model, &shapes, &plan)
                .map_err(|e| PassError::msg(format!("center-stream: {what}: {e}")))?;
            streams += 1;
            norms += plan.norms.len() as u64;
            writers += w;
            biases += b;
        }
        Ok(PassOutcome::from_changed(streams > 0)
            .with("streams-centered", streams)
            .with("norms-converted", norms)
            .with("writers-centered", writers)
            .with("biases-folded", biases))
    }
}

/// Whether `n` is a Reshape that keeps `d` channels on the last axis of its data and
/// result (centering along the channels commutes with it).
fn keeps_channels(model: &Model, shapes: &perqc_ops::ShapeMap, n: NodeId, d: usize) -> bool {
    let node = model.graph.node(n);
    let last = |v: Option<ValueId>| {
        v.and_then(|v| shapes.shape(v))
            .and_then(|s| s.last()?.known())
            == Some(d as i64)
    };
    node.op_type == "Reshape"
        && node.is_default_domain()
        && last(node.input(0))
        && last(node.output(0))
}

/// The linear layers reading `y`, directly or through channel-keeping Reshapes (`Shape` and
/// `Size` readers, which see no data, aside); `Err` names a reader that is none of these.
fn linear_readers(
    model: &Model,
    shapes: &perqc_ops::ShapeMap,
    y: ValueId,
    d: usize,
) -> Result<Vec<NodeId>, NodeId> {
    let g = &model.graph;
    let mut out = Vec::new();
    let mut stack = vec![y];
    while let Some(v) = stack.pop() {
        for u in g.value(v).uses() {
            if g.node(u.node).reads_shape_only() {
                continue;
            }
            let linear = is_perqc(model, u.node, "Linear")
                && u.operand == perqc_ir::Operand::Input(0)
                && g.node(u.node)
                    .input(1)
                    .is_some_and(|w| f32_const(model, w).is_some_and(|t| t.dims.len() == 2));
            if linear {
                if !out.contains(&u.node) {
                    out.push(u.node);
                }
            } else if keeps_channels(model, shapes, u.node, d)
                && u.operand == perqc_ir::Operand::Input(0)
                && g.node(u.node)
                    .output(0)
                    .is_some_and(|o| !g.outputs.contains(&o))
            {
                stack.extend(g.node(u.node).output(0));
            } else {
                return Err(u.node);
            }
        }
    }
    Ok(out)
}

/// Checks the stream read by the norms `lns` (see the module comment) and lists what to
/// rewrite.
fn plan(
    model: &Model,
    shapes: &perqc_ops::ShapeMap,
    lns: &[NodeId],
    d: usize,
) -> Result<Plan, String> {
    let g = &model.graph;
    let label = |n: NodeId| {
        let node = g.node(n);
        format!("{} `{}`", node.op_type, node.name)
    };
    let vname = |v: ValueId| g.value(v).name.clone();
    let vec_d = |v: ValueId| -> Option<Vec<f32>> {
        let t = f32_const(model, v)?;
        let n: i64 = t.dims.iter().product();
        (n == d as i64 && t.dims.last() == Some(&(d as i64)))
            .then(|| t.to_f32().ok())
            .flatten()
    };
    // The norms.
    let mut norms = Vec::new();
    for &n in lns {
        let node = g.node(n);
        let x = node.input(0).ok_or("a LayerNorm without input")?;
        let gamma = node.input(1).ok_or("a LayerNorm without scale")?;
        if vec_d(gamma).is_none() {
            return Err(format!("{}: its scale is not a constant of {d}", label(n)));
        }
        let beta = match node.input(2) {
            None => None,
            Some(b) => Some(
                vec_d(b)
                    .ok_or_else(|| format!("{}: its bias is not a constant of {d}", label(n)))?,
            ),
        };
        let rank = shapes.shape(x).map_or(0, <[_]>::len) as i64;
        let axis = node.attr_int("axis").unwrap_or(-1);
        if axis != -1 && !(rank > 0 && axis == rank - 1) {
            return Err(format!(
                "{}: normalizes over more than the last axis",
                label(n)
            ));
        }
        let eps = node.attr_float("epsilon").unwrap_or(1e-5);
        // β folds into the readers' biases: they must be linear layers reading the norm.
        let y = node.output(0).ok_or("a LayerNorm without result")?;
        let beta = beta.filter(|b| b.iter().any(|&v| v != 0.0));
        if beta.is_some() {
            if g.outputs.contains(&y) {
                return Err(format!(
                    "{}: its result is a graph output, and its bias cannot move into a reader",
                    label(n)
                ));
            }
            if let Err(r) = linear_readers(model, shapes, y, d) {
                return Err(format!(
                    "{}: read by {}, not a linear layer, so its bias cannot move into the reader's",
                    label(n),
                    label(r)
                ));
            }
        }
        norms.push(Norm {
            node: n,
            x,
            gamma,
            beta,
            beta_value: node.input(2),
            eps,
        });
    }
    // The stream: back from the norms' inputs through the residual Adds.
    let mut stream: Vec<ValueId> = Vec::new();
    let mut seen: HashSet<ValueId> = HashSet::new();
    let mut stack: Vec<ValueId> = norms.iter().map(|n| n.x).collect();
    let mut writers: Vec<Writer> = Vec::new();
    let mut constants: Vec<(NodeId, usize, ValueId)> = Vec::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        let val = g.value(v);
        match val.def() {
            ValueDef::Input => {
                return Err(format!(
                    "the stream enters as the graph input `{}`",
                    vname(v)
                ));
            }
            ValueDef::Node { node: p, .. } => {
                stream.push(v);
                let node = g.node(p);
                if node.op_type == "Add" && node.is_default_domain() {
                    for (slot, inp) in node.inputs().iter().enumerate() {
                        let inp = inp.ok_or("an Add without operand")?;
                        if g.const_tensor(inp).is_some() {
                            constants.push((p, slot, inp));
                        } else {
                            stack.push(inp);
                        }
                    }
                } else if keeps_channels(model, shapes, p, d) {
                    stack.push(node.input(0).ok_or("a Reshape without data")?);
                } else if is_perqc(model, p, "Linear") {
                    let w = node.input(1).ok_or("a Linear without weight")?;
                    let t = f32_const(model, w)
                        .filter(|t| t.dims.len() == 2)
                        .ok_or_else(|| {
                            format!(
                                "{} writes the stream with a weight that is not an f32 matrix",
                                label(p)
                            )
                        })?;
                    let axis = if node.attr_int("transB").unwrap_or(0) != 0 {
                        0
                    } else {
                        1
                    };
                    if t.dims[axis] != d as i64 {
                        return Err(format!(
                            "{} writes {} channels, not {d}",
                            label(p),
                            t.dims[axis]
                        ));
                    }
                    writers.push(Writer {
                        node: p,
                        input: 1,
                        value: w,
                        axis,
                    });
                    if let Some(b) = node.input(2) {
                        vec_d(b).ok_or_else(|| {
                            format!("{}: its bias is not a constant of {d}", label(p))
                        })?;
                        let rank = f32_const(model, b).map_or(1, |t| t.dims.len());
                        writers.push(Writer {
                            node: p,
                            input: 2,
                            value: b,
                            axis: rank - 1,
                        });
                    }
                } else if node.op_type == "Gather" && node.is_default_domain() {
                    let table = node.input(0).ok_or("a Gather without table")?;
                    let t = f32_const(model, table)
                        .filter(|t| t.dims.len() == 2)
                        .ok_or_else(|| {
                            format!(
                                "{} writes the stream from something other than an f32 table",
                                label(p)
                            )
                        })?;
                    if node.attr_int("axis").unwrap_or(0) != 0 || t.dims[1] != d as i64 {
                        return Err(format!("{} does not gather rows of {d} channels", label(p)));
                    }
                    writers.push(Writer {
                        node: p,
                        input: 0,
                        value: table,
                        axis: 1,
                    });
                } else {
                    return Err(format!(
                        "{} writes the stream, and centering its result is not implemented",
                        label(p)
                    ));
                }
            }
            _ => {
                // A constant feeding a norm directly: nothing else writes there.
                return Err(format!("the stream value `{}` is a constant", vname(v)));
            }
        }
    }
    for (node, slot, c) in constants {
        let t = f32_const(model, c)
            .ok_or_else(|| format!("`{}`, added into the stream, is not f32", vname(c)))?;
        if t.dims.last() != Some(&(d as i64)) {
            return Err(format!(
                "`{}`, added into the stream, does not have {d} channels on its last axis",
                vname(c)
            ));
        }
        writers.push(Writer {
            node,
            input: slot,
            value: c,
            axis: t.dims.len() - 1,
        });
    }
    // Every reader of the stream is a residual Add inside it, one of the norms, or reads
    // its shape only.
    let stream_set: HashSet<ValueId> = stream.iter().copied().collect();
    for &v in &stream {
        if g.outputs.contains(&v) {
            return Err(format!("the stream value `{}` is a graph output", vname(v)));
        }
        for u in g.value(v).uses() {
            let node = g.node(u.node);
            let by_add = ((node.op_type == "Add" && node.is_default_domain())
                || (keeps_channels(model, shapes, u.node, d)
                    && u.operand == perqc_ir::Operand::Input(0)))
                && node.output(0).is_some_and(|o| stream_set.contains(&o));
            let by_norm = lns.contains(&u.node) && u.operand == perqc_ir::Operand::Input(0);
            if !(by_add || by_norm || node.reads_shape_only()) {
                return Err(format!(
                    "the stream value `{}` is read by {}, not through a LayerNorm",
                    vname(v),
                    label(u.node)
                ));
            }
        }
    }
    Ok(Plan { writers, norms })
}

/// `t` with its mean along `axis` subtracted (f64, rounded once).
fn centered(t: &Tensor, axis: usize) -> Result<Tensor, String> {
    let x = t.to_f32().map_err(|e| e.to_string())?;
    let dims: Vec<usize> = t.dims.iter().map(|&n| n as usize).collect();
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let outer: usize = dims[..axis].iter().product();
    let mut y = x.clone();
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| o * n * inner + k * inner + i;
            let mean = (0..n).map(|k| f64::from(x[at(k)])).sum::<f64>() / n as f64;
            for k in 0..n {
                y[at(k)] = (f64::from(x[at(k)]) - mean) as f32;
            }
        }
    }
    Ok(Tensor::from_f32(t.dims.clone(), &y))
}

/// A constant and the axis to center it along.
type ConstAxis = (ValueId, usize);

/// Rewrites the model by `plan`: `(writers centered, biases folded)`.
fn apply(
    model: &mut Model,
    shapes: &perqc_ops::ShapeMap,
    plan: &Plan,
) -> Result<(u64, u64), String> {
    // Which (node, input) read each constant to center, by (value, axis).
    let mut groups: Vec<(ConstAxis, Vec<(NodeId, usize)>)> = Vec::new();
    for w in &plan.writers {
        match groups.iter_mut().find(|g| g.0 == (w.value, w.axis)) {
            Some(g) => {
                if !g.1.contains(&(w.node, w.input)) {
                    g.1.push((w.node, w.input));
                }
            }
            None => groups.push(((w.value, w.axis), vec![(w.node, w.input)])),
        }
    }
    let mut copies: HashMap<ValueId, usize> = HashMap::new();
    // Constants that may be left unread: removed at the end if they are.
    let mut dropped: Vec<ValueId> = Vec::new();
    for ((v, axis), readers) in &groups {
        *copies.entry(*v).or_default() += 1;
        let g = &mut model.graph;
        let t = g
            .const_tensor(*v)
            .ok_or("a writer's constant disappeared")?;
        let new = centered(t, *axis)?;
        let others = g.value(*v).uses().iter().any(|u| {
            !readers
                .iter()
                .any(|&(n, i)| u.node == n && u.operand == perqc_ir::Operand::Input(i as u32))
        }) || g.outputs.contains(v)
            || copies[v] > 1;
        if others {
            let name = g.fresh_name(&format!("{}_centered", g.value(*v).name));
            let id = g.add_initializer(&name, new).map_err(|e| e.to_string())?;
            for &(n, i) in readers {
                g.set_input(n, i, Some(id));
            }
            dropped.push(*v);
        } else {
            g.replace_initializer(*v, new).map_err(|e| e.to_string())?;
        }
    }
    let mut biases = 0u64;
    for norm in &plan.norms {
        let y = model
            .graph
            .node(norm.node)
            .output(0)
            .ok_or("a norm without result")?;
        if let Some(beta) = &norm.beta {
            let readers = linear_readers(model, shapes, y, beta.len())
                .map_err(|_| "a norm's reader changed")?;
            let g = &mut model.graph;
            for r in readers {
                let node = g.node(r);
                let w = node.input(1).ok_or("a Linear without weight")?;
                let t = g.const_tensor(w).ok_or("a Linear weight is not constant")?;
                let wt = t.to_f32().map_err(|e| e.to_string())?;
                let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
                let trans = node.attr_int("transB").unwrap_or(0) != 0;
                let (k, nout) = if trans { (cols, rows) } else { (rows, cols) };
                if k != beta.len() {
                    return Err(format!(
                        "`{}` reads {k} channels, not {}",
                        node.name,
                        beta.len()
                    ));
                }
                let mut out = vec![0f64; nout];
                for (j, o) in out.iter_mut().enumerate() {
                    *o = (0..k)
                        .map(|i| {
                            let wij = if trans {
                                wt[j * cols + i]
                            } else {
                                wt[i * cols + j]
                            };
                            f64::from(beta[i]) * f64::from(wij)
                        })
                        .sum();
                }
                let old_bias = node.input(2);
                if let Some(b) = old_bias {
                    let bt = g
                        .const_tensor(b)
                        .ok_or("a Linear bias is not constant")?
                        .to_f32()
                        .map_err(|e| e.to_string())?;
                    if bt.len() != nout {
                        return Err(format!(
                            "`{}`: its bias does not have {nout} entries",
                            node.name
                        ));
                    }
                    for (o, &bv) in out.iter_mut().zip(&bt) {
                        *o += f64::from(bv);
                    }
                }
                let vals: Vec<f32> = out.iter().map(|&o| o as f32).collect();
                let base = match old_bias {
                    Some(b) => format!("{}_beta", g.value(b).name),
                    None => format!("{}_bias", node.name),
                };
                let name = g.fresh_name(&base);
                let id = g
                    .add_initializer(&name, Tensor::from_f32(vec![nout as i64], &vals))
                    .map_err(|e| e.to_string())?;
                if let Some(b) = old_bias {
                    g.set_input(r, 2, Some(id));
                    dropped.push(b);
                } else {
                    let node = g.node(r);
                    let spec = perqc_ir::NodeSpec {
                        name: String::new(),
                        op_type: node.op_type.clone(),
                        domain: node.domain.clone(),
                        attrs: node.attrs.clone(),
                        extra: node.extra.clone(),
                    };
                    let inputs = [node.input(0), node.input(1), Some(id)];
                    g.set_op(r, spec, &inputs).map_err(|e| e.to_string())?;
                }
                biases += 1;
            }
        }
        let g = &mut model.graph;
        let spec = crate::canonicalize::canonical("RMSNormalization")
            .attr("axis", AttrValue::Int(-1))
            .attr("epsilon", AttrValue::Float(norm.eps));
        let spec = perqc_ir::NodeSpec {
            name: String::new(),
            ..spec
        };
        g.set_op(norm.node, spec, &[Some(norm.x), Some(norm.gamma)])
            .map_err(|e| e.to_string())?;
        dropped.extend(norm.beta_value);
    }
    let g = &mut model.graph;
    dropped.sort_unstable_by_key(|v| v.index());
    dropped.dedup();
    for v in dropped {
        crate::quantize::weights::drop_if_unread(g, v);
    }
    Ok((groups.len() as u64, biases))
}
