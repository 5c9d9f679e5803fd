//! `upcast-half`: a float16 (or bfloat16) model, computed in float32.
//!
//! The patterns, the transforms, calibration and the quantizers work on f32 (the native
//! runtime has no half kernels), so `canonicalize` runs this first on a model that holds
//! half values:
//! - every half initializer, and every half tensor attribute (`Constant`,
//!   `ConstantOfShape`), becomes f32 with the same values (exact: every f16 and bf16 value
//!   is an f32);
//! - a `Cast` to a half type (and any default-domain `dtype` attribute naming one) casts to
//!   f32 instead, and every other value's declared half type becomes f32;
//! - the interface stays: a half graph input is read through `Cast(to = f32)`, and a half
//!   graph output is written by `Cast(to = its type)` from an f32 copy of its producer,
//!   which the output's readers inside the graph read instead (a KV cache's `present`).
//!
//! The result computes the half model's formula in f32: not bit for bit what the half
//! model gives (that one rounds to 11 significant bits after every op), but no further
//! from the f32 model it was made from. Half values inside control-flow subgraphs are
//! refused with an error naming the node.

use perqc_ir::{
    AttrValue, DType, Graph, Model, NodeId, NodeSpec, Operand, OptionError, Pass, PassContext,
    PassError, PassOptions, PassOutcome, Tensor, Type, ValueDef, ValueId,
};

#[derive(Debug, Default)]
pub struct UpcastHalf;

impl UpcastHalf {
    pub const NAME: &'static str = "upcast-half";
    pub const DESCRIPTION: &'static str = "compute a float16/bfloat16 model in float32: half initializers and constants become f32, casts to half cast to f32, half graph inputs and outputs keep their type through Casts at the boundary";

    pub fn from_options(opts: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        opts.allow_only(&[])?;
        Ok(Box::new(UpcastHalf))
    }
}

fn is_half(dt: DType) -> bool {
    matches!(dt, DType::F16 | DType::BF16)
}

fn half_type(ty: &Option<Type>) -> bool {
    ty.as_ref().and_then(Type::elem).is_some_and(is_half)
}

/// `t` in f32 when it is half.
fn upcast_tensor(t: &Tensor) -> Result<Option<Tensor>, String> {
    if !is_half(t.dtype) {
        return Ok(None);
    }
    let values = t.to_f32().map_err(|e| format!("`{}`: {e}", t.name))?;
    let mut out = Tensor::from_f32(t.dims.clone(), &values);
    out.name = t.name.clone();
    Ok(Some(out))
}

/// An attribute value with half tensors in f32, if it has any.
fn upcast_attr(
    name: &str,
    v: &AttrValue,
    default_domain: bool,
) -> Result<Option<AttrValue>, String> {
    Ok(match v {
        AttrValue::Tensor(t) => upcast_tensor(t)?.map(AttrValue::Tensor),
        AttrValue::Tensors(ts) if ts.iter().any(|t| is_half(t.dtype)) => Some(AttrValue::Tensors(
            ts.iter()
                .map(|t| Ok(upcast_tensor(t)?.unwrap_or_else(|| t.clone())))
                .collect::<Result<_, String>>()?,
        )),
        AttrValue::Int(code)
            if default_domain
                && matches!(name, "to" | "dtype")
                && DType::from_code(*code as i32).is_some_and(is_half) =>
        {
            Some(AttrValue::Int(DType::F32.code() as i64))
        }
        _ => None,
    })
}

/// Whether `g` declares or stores a half value, or casts to half.
fn any_half(g: &Graph) -> bool {
    holds_half(g)
        || g.nodes().any(|(_, n)| {
            n.attrs.iter().any(|a| {
                upcast_attr(&a.name, &a.value, n.is_default_domain()).is_ok_and(|v| v.is_some())
            })
        })
}

/// Whether `g` (a subgraph) holds a half value anywhere.
fn holds_half(g: &Graph) -> bool {
    g.values()
        .any(|(_, v)| half_type(&v.ty) || v.tensor.as_ref().is_some_and(|t| is_half(t.dtype)))
        || g.nodes().any(|(_, n)| n.subgraphs().any(holds_half))
}

/// What [`upcast`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upcast {
    /// Initializers and tensor attributes made f32.
    pub tensors: usize,
    /// Casts (and `dtype` attributes) retargeted from half to f32.
    pub casts: usize,
    /// Half graph inputs now read through a Cast to f32.
    pub inputs: usize,
    /// Half graph outputs now written by a Cast from f32.
    pub outputs: usize,
}

impl Upcast {
    pub fn changed(&self) -> bool {
        *self != Upcast::default()
    }
}

/// Upcasts `model`'s main graph (see the module comment).
pub fn upcast(model: &mut Model) -> Result<Upcast, PassError> {
    let g = &mut model.graph;
    let mut done = Upcast::default();
    let err = |m: String| PassError::msg(format!("upcast-half: {m}"));
    for (_, n) in g.nodes() {
        if n.subgraphs().any(holds_half) {
            return Err(err(format!(
                "node `{}` ({}): float16 values inside a control-flow subgraph are not supported",
                n.name, n.op_type
            )));
        }
    }
    let interface: Vec<ValueId> = g.inputs.iter().chain(&g.outputs).copied().collect();
    // Half values come from somewhere the graph shows (an input's or value's declared type,
    // a stored tensor, a cast to half): without one there is nothing to do.
    if !any_half(g) {
        return Ok(done);
    }
    // The outputs' element types as the model has them: declared, else inferred (before
    // anything changes).
    let inferred = perqc_ops::infer_model(model).ok();
    let g = &mut model.graph;
    let output_types: Vec<Option<DType>> = g
        .outputs
        .iter()
        .map(|&o| {
            g.value(o)
                .ty
                .as_ref()
                .and_then(Type::elem)
                .or_else(|| inferred.as_ref()?.dtype(o))
        })
        .collect();

    // Initializers (a graph output keeps its declared type: left as it is).
    let inits: Vec<ValueId> = g
        .values()
        .filter(|(v, val)| {
            val.def() == ValueDef::Initializer
                && val.tensor.as_ref().is_some_and(|t| is_half(t.dtype))
                && !interface.contains(v)
        })
        .map(|(v, _)| v)
        .collect();
    for v in inits {
        let t = g.value(v).tensor.as_ref().expect("filtered");
        let up = upcast_tensor(t).map_err(err)?.expect("half");
        let val = g.value_mut(v);
        val.ty = Some(Type::tensor(
            DType::F32,
            val.ty.as_ref().and_then(Type::shape),
        ));
        val.tensor = Some(up);
        done.tensors += 1;
    }

    // Tensor attributes and cast targets.
    let order: Vec<NodeId> = g.node_order().to_vec();
    for &id in &order {
        let n = g.node(id);
        let default_domain = n.is_default_domain();
        let mut changes = Vec::new();
        for a in &n.attrs {
            if let Some(v) = upcast_attr(&a.name, &a.value, default_domain).map_err(err)? {
                match v {
                    AttrValue::Int(_) => done.casts += 1,
                    _ => done.tensors += 1,
                }
                changes.push((a.name.clone(), v));
            }
        }
        for (name, v) in changes {
            g.set_attr(id, &name, v);
        }
    }

    // Declared types inside the graph.
    let typed: Vec<ValueId> = g
        .values()
        .filter(|(v, val)| half_type(&val.ty) && !interface.contains(v))
        .map(|(v, _)| v)
        .collect();
    for v in typed {
        let val = g.value_mut(v);
        val.ty = Some(Type::tensor(
            DType::F32,
            val.ty.as_ref().and_then(Type::shape),
        ));
    }

    // Half graph inputs: read through a Cast to f32.
    for x in g.inputs.clone() {
        if !half_type(&g.value(x).ty) || g.value(x).uses().is_empty() {
            continue;
        }
        let uses: Vec<_> = g.value(x).uses().to_vec();
        let mut slots = Vec::new();
        for u in uses {
            match u.operand {
                Operand::Input(slot) => slots.push((u.node, slot as usize)),
                Operand::Capture(_) => {
                    return Err(err(format!(
                        "the float16 input `{}` is read inside a subgraph",
                        g.value(x).name
                    )));
                }
            }
        }
        let first = g.node_order()[0];
        let name = g.fresh_name(&format!("{}/f32", g.value(x).name));
        let spec = NodeSpec::new("Cast")
            .named(&name)
            .attr("to", AttrValue::Int(DType::F32.code() as i64));
        g.insert_node_before(first, spec, &[Some(x)], &[name.as_str()])
            .map_err(|e| err(e.to_string()))?;
        let y = g.find(&name).expect("just defined");
        for (node, slot) in slots {
            g.set_input(node, slot, Some(y));
        }
        done.inputs += 1;
    }

    // Half graph outputs: an f32 copy of the producer, and the producer itself becomes the
    // Cast back to the output's type (so the output keeps its name and its place).
    let mut seen: Vec<ValueId> = Vec::new();
    for (o, ty) in g.outputs.clone().into_iter().zip(output_types) {
        if !ty.is_some_and(is_half) || seen.contains(&o) {
            continue;
        }
        seen.push(o);
        let ValueDef::Node { node, slot } = g.value(o).def() else {
            continue; // an input or an initializer passed through: nothing computes it
        };
        let n = g.node(node);
        let oname = g.value(o).name.clone();
        if slot != 0 {
            return Err(err(format!(
                "the float16 output `{oname}` is result {slot} of node `{}` ({}), not its first",
                n.name, n.op_type
            )));
        }
        // The other results, by slot (an omitted optional result is `None`).
        let others: Vec<(usize, ValueId)> = n
            .outputs()
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(k, v)| Some((k, (*v)?)))
            .collect();
        if others.iter().any(|(_, v)| g.outputs.contains(v)) {
            return Err(err(format!(
                "node `{}` ({}) writes several graph outputs, `{oname}` in float16",
                n.name, n.op_type
            )));
        }
        let base = if n.name.is_empty() { &oname } else { &n.name };
        let copy = NodeSpec {
            name: g.fresh_name(&format!("{base}/f32")),
            op_type: n.op_type.clone(),
            domain: n.domain.clone(),
            attrs: n.attrs.clone(),
            extra: n.extra.clone(),
        };
        let inputs = n.inputs().to_vec();
        let outs: Vec<String> = n
            .outputs()
            .iter()
            .map(|v| {
                v.map_or(String::new(), |v| {
                    g.fresh_name(&format!("{}/f32", g.value(v).name))
                })
            })
            .collect();
        let names: Vec<&str> = outs.iter().map(String::as_str).collect();
        let c = g
            .insert_node_before(node, copy, &inputs, &names)
            .map_err(|e| err(e.to_string()))?;
        for &(k, v) in &others {
            let w = g.node(c).output(k).expect("the copy has the same results");
            g.replace_all_uses(v, w);
        }
        g.truncate_outputs(node, 1)
            .map_err(|e| err(e.to_string()))?;
        let y = g.node(c).output(0).expect("first result");
        let shape = g.value(o).ty.as_ref().and_then(Type::shape);
        g.value_mut(y).ty = Some(Type::tensor(DType::F32, shape.clone()));
        g.value_mut(o).ty = Some(Type::tensor(ty.expect("half"), shape));
        // Readers inside the graph (the attention reading `present.N.key`) take the f32 copy.
        for u in g.value(o).uses().to_vec() {
            match u.operand {
                Operand::Input(slot) => g.set_input(u.node, slot as usize, Some(y)),
                Operand::Capture(_) => {
                    return Err(err(format!(
                        "the float16 output `{oname}` is read inside a subgraph"
                    )));
                }
            }
        }
        let spec =
            NodeSpec::new("Cast").attr("to", AttrValue::Int(ty.expect("half").code() as i64));
        g.set_op(node, spec, &[Some(y)])
            .map_err(|e| err(e.to_string()))?;
        done.outputs += 1;
    }
    Ok(done)
}

/// After [`upcast`] (so after `canonicalize`): `model` with each half graph output replaced by the f32 value its
/// boundary Cast reads (what the model computes, before the interface rounds it to half),
/// or `None` when no output is written by such a Cast. For comparing two upcast models
/// within f32 round-off (`--verify`), which the half outputs would hide under their own
/// rounding.
pub fn with_f32_outputs(model: &Model) -> Option<Model> {
    let g = &model.graph;
    let f32_source = |o: ValueId| -> Option<ValueId> {
        let ValueDef::Node { node, .. } = g.value(o).def() else {
            return None;
        };
        let n = g.node(node);
        let to = n.attr_int("to").and_then(|c| DType::from_code(c as i32));
        // After `upcast` nothing inside the graph is half, so what it casts is f32.
        let x = n.input(0)?;
        (n.op_type == "Cast" && n.is_default_domain() && to.is_some_and(is_half)).then_some(x)
    };
    let outputs: Vec<Option<ValueId>> = g.outputs.iter().map(|&o| f32_source(o)).collect();
    if outputs.iter().all(Option::is_none) {
        return None;
    }
    let mut m = model.clone();
    for (o, x) in m.graph.outputs.iter_mut().zip(outputs) {
        if let Some(x) = x {
            *o = x;
        }
    }
    Some(m)
}

impl Pass for UpcastHalf {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn description(&self) -> &'static str {
        Self::DESCRIPTION
    }

    fn run(&mut self, model: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
        let done = upcast(model)?;
        if done.changed() {
            ctx.invalidate_analyses();
            ctx.note(format!(
                "float16/bfloat16 computed in float32: {} tensors upcast, {} casts to half retargeted; {} half inputs and {} half outputs keep their type through Casts",
                done.tensors, done.casts, done.inputs, done.outputs
            ));
        }
        Ok(PassOutcome::from_changed(done.changed())
            .with("tensors", done.tensors as u64)
            .with("casts", done.casts as u64)
            .with("inputs", done.inputs as u64)
            .with("outputs", done.outputs as u64))
    }
}
