//! Control flow: If, Loop and Scan run their body graphs through the executor.
//!
//! A body reads the enclosing graph's values by name (its captures); the executor's
//! [`SubgraphRunner`] binds them, so the kernels here only pass the body's own inputs and
//! collect its outputs.

use crate::kernel::{KernelCtx, KernelError, RtTensor, axis, opt, req};
use ndarray::{Axis, IxDyn};
use perqc_ir::AttrValue;

type In<'a, 'b> = &'a [Option<&'b RtTensor>];
type Out = Result<Vec<RtTensor>, KernelError>;

fn body<'a>(ctx: &KernelCtx<'a>, name: &str) -> Result<&'a perqc_ir::Graph, KernelError> {
    match ctx.node.attr(name) {
        Some(AttrValue::Graph(g)) => Ok(g),
        _ => Err(KernelError::Invalid(format!(
            "missing graph attribute `{name}`"
        ))),
    }
}

fn runner<'a>(ctx: &KernelCtx<'a>) -> Result<&'a dyn crate::kernel::SubgraphRunner, KernelError> {
    ctx.subgraphs
        .ok_or_else(|| KernelError::Invalid("subgraphs cannot run in this context".into()))
}

fn scalar_bool(t: &RtTensor, what: &str) -> Result<bool, KernelError> {
    match t {
        RtTensor::Bool(a) if a.len() == 1 => Ok(*a.iter().next().expect("one element")),
        other => Err(KernelError::Invalid(format!(
            "{what} must be a single bool, got {}{:?}",
            other.dtype(),
            other.shape()
        ))),
    }
}

/// If: runs `then_branch` or `else_branch`; its outputs are the node's.
pub fn if_(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let cond = scalar_bool(req(inputs, 0)?, "the condition")?;
    let g = body(ctx, if cond { "then_branch" } else { "else_branch" })?;
    runner(ctx)?.run(g, &[])
}

/// Stacks per-iteration tensors along a new axis 0 (all must share dtype and shape).
fn stack(parts: &[RtTensor]) -> Result<RtTensor, KernelError> {
    let lifted: Vec<RtTensor> = parts
        .iter()
        .map(|p| crate::rt_map!(p, a => a.clone().insert_axis(Axis(0))))
        .collect();
    let refs: Vec<&RtTensor> = lifted.iter().collect();
    super::movement::concatenate(&refs, 0)
}

/// Loop(M, cond, v...): body(i, cond, v...) -> (cond', v'..., scan...). Runs while
/// i < M (if given) and cond (if given); returns the final v and the scan outputs stacked
/// along a new first axis.
pub fn loop_(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let g = body(ctx, "body")?;
    let run = runner(ctx)?;
    let max_trips = match opt(inputs, 0) {
        Some(t) => Some(
            t.to_i64_vec()
                .and_then(|v| v.first().copied())
                .ok_or_else(|| {
                    KernelError::Invalid("trip count must be an integer scalar".into())
                })?,
        ),
        None => None,
    };
    let mut cond = match opt(inputs, 1) {
        Some(t) => scalar_bool(t, "the loop condition")?,
        None => true,
    };
    let mut state: Vec<RtTensor> = inputs
        .iter()
        .skip(2)
        .map(|t| {
            t.cloned()
                .ok_or(KernelError::Invalid("loop-carried value is missing".into()))
        })
        .collect::<Result<_, _>>()?;
    let n_state = state.len();
    let n_scan = g.outputs.len().checked_sub(1 + n_state).ok_or_else(|| {
        KernelError::Invalid(format!(
            "body has {} outputs, fewer than 1 + {n_state} loop-carried values",
            g.outputs.len()
        ))
    })?;
    let mut scans: Vec<Vec<RtTensor>> = vec![Vec::new(); n_scan];
    let mut i = 0i64;
    while cond && max_trips.is_none_or(|m| i < m) {
        let mut feeds = Vec::with_capacity(2 + n_state);
        feeds.push(RtTensor::I64(ndarray::arr0(i).into_dyn().into_shared()));
        feeds.push(RtTensor::Bool(ndarray::arr0(cond).into_dyn().into_shared()));
        feeds.extend(state.iter().cloned());
        let mut out = run.run(g, &feeds)?.into_iter();
        cond = scalar_bool(&out.next().expect("count checked"), "the body's condition")?;
        state = out.by_ref().take(n_state).collect();
        for (s, t) in scans.iter_mut().zip(out) {
            s.push(t);
        }
        i += 1;
    }
    for (k, s) in scans.iter().enumerate() {
        if s.is_empty() {
            return Err(KernelError::Invalid(format!(
                "scan output {k} of a loop that ran no iteration has no shape"
            )));
        }
    }
    let mut res = state;
    for s in &scans {
        res.push(stack(s)?);
    }
    Ok(res)
}

/// Scan (opset 9+): body(state..., slices...) -> (state'..., outs...). Each of the
/// `num_scan_inputs` last inputs is sliced along its scan axis (reversed if its direction
/// is 1); per-iteration outputs are stacked along their scan output axis.
pub fn scan(ctx: &KernelCtx<'_>, inputs: In) -> Out {
    let g = body(ctx, "body")?;
    let run = runner(ctx)?;
    let m = usize::try_from(ctx.int("num_scan_inputs", 0))
        .map_err(|_| KernelError::Invalid("num_scan_inputs must be non-negative".into()))?;
    let n = inputs.len().checked_sub(m).ok_or_else(|| {
        KernelError::Invalid(format!(
            "{} inputs, fewer than num_scan_inputs {m}",
            inputs.len()
        ))
    })?;
    let all: Vec<&RtTensor> = (0..inputs.len())
        .map(|i| req(inputs, i))
        .collect::<Result<_, _>>()?;
    let in_axes = ctx
        .ints("scan_input_axes")
        .map(<[i64]>::to_vec)
        .unwrap_or_else(|| vec![0; m]);
    let in_dirs = ctx
        .ints("scan_input_directions")
        .map(<[i64]>::to_vec)
        .unwrap_or_else(|| vec![0; m]);
    let mut axes = Vec::with_capacity(m);
    let mut len = None;
    for (j, t) in all[n..].iter().enumerate() {
        let a = axis(*in_axes.get(j).unwrap_or(&0), t.shape().len())?;
        let l = t.shape()[a];
        if len.is_some_and(|x| x != l) {
            return Err(KernelError::Invalid(format!(
                "scan inputs disagree in length ({} vs {l})",
                len.unwrap_or(0)
            )));
        }
        len = Some(l);
        axes.push(a);
    }
    let len = len.unwrap_or(0);
    let mut state: Vec<RtTensor> = all[..n].iter().map(|t| (*t).clone()).collect();
    let k = g.outputs.len().checked_sub(n).ok_or_else(|| {
        KernelError::Invalid(format!(
            "body has {} outputs, fewer than {n} state values",
            g.outputs.len()
        ))
    })?;
    let mut outs: Vec<Vec<RtTensor>> = vec![Vec::new(); k];
    for it in 0..len {
        let mut feeds = state.clone();
        for (j, t) in all[n..].iter().enumerate() {
            let idx = if in_dirs.get(j) == Some(&1) {
                len - 1 - it
            } else {
                it
            };
            feeds.push(
                crate::rt_map!(t, a => a.index_axis(Axis(axes[j]), idx).to_owned().into_shared()),
            );
        }
        let mut res = run.run(g, &feeds)?.into_iter();
        state = res.by_ref().take(n).collect();
        for (o, t) in outs.iter_mut().zip(res) {
            o.push(t);
        }
    }
    let out_axes = ctx
        .ints("scan_output_axes")
        .map(<[i64]>::to_vec)
        .unwrap_or_else(|| vec![0; k]);
    let out_dirs = ctx
        .ints("scan_output_directions")
        .map(<[i64]>::to_vec)
        .unwrap_or_else(|| vec![0; k]);
    let mut result = state;
    for (j, mut parts) in outs.into_iter().enumerate() {
        if out_dirs.get(j) == Some(&1) {
            parts.reverse();
        }
        let stacked = stack(&parts)?;
        let rank = stacked.shape().len();
        let a = axis(*out_axes.get(j).unwrap_or(&0), rank)?;
        // Stacked along axis 0; move it to the requested scan output axis.
        let mut perm: Vec<usize> = (1..rank).collect();
        perm.insert(a, 0);
        result.push(crate::rt_map!(stacked, x => x.permuted_axes(IxDyn(&perm))));
    }
    Ok(result)
}
