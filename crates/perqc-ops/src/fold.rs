//! [`ValueFacts`] over inferred shapes: what rewrite patterns may know about a value.
//!
//! Shapes, element types and integer values come from [`ShapeMap`]; a constant that is
//! not an initializer or `Constant` (a `Cast`, `Sqrt`, `Div` ... of constants) is folded
//! on demand with the op table's kernels, for tensors of at most [`MAX_FOLD_ELEMS`]
//! elements and chains of at most [`MAX_FOLD_DEPTH`] ops.

use crate::kernel::{KernelCtx, RtTensor};
use crate::{ShapeMap, lookup};
use perqc_ir::{Analysis, DType, Dim, Graph, Model, PassError, Tensor, ValueFacts, ValueId};

/// Largest tensor folded for a matcher.
pub const MAX_FOLD_ELEMS: usize = 4096;
/// Longest chain of ops folded for a matcher.
pub const MAX_FOLD_DEPTH: usize = 8;

impl ValueFacts for ShapeMap {
    fn shape(&self, v: ValueId) -> Option<&[Dim]> {
        ShapeMap::shape(self, v)
    }

    fn dtype(&self, v: ValueId) -> Option<DType> {
        ShapeMap::dtype(self, v)
    }

    fn ints(&self, v: ValueId) -> Option<Vec<i64>> {
        self.get(v)?.known_ints()
    }

    fn dims(&self, v: ValueId) -> Option<Vec<Dim>> {
        self.get(v)?.dims_value()
    }

    fn default_opset(&self) -> Option<i64> {
        self.default_opset
    }

    fn constant(&self, graph: &Graph, v: ValueId) -> Option<Tensor> {
        fold(graph, v, self.default_opset?, MAX_FOLD_DEPTH)?
            .to_tensor()
            .ok()
    }
}

/// The value of `v` computed from constants alone, if it is small and every op on the way
/// is a default-domain op with a kernel and no subgraph.
fn fold(graph: &Graph, v: ValueId, opset: i64, depth: usize) -> Option<RtTensor> {
    if let Some(t) = graph.const_tensor(v) {
        let small = t.numel().is_some_and(|n| n as usize <= MAX_FOLD_ELEMS);
        return small.then(|| RtTensor::from_tensor(t).ok()).flatten();
    }
    let (id, slot) = graph.value(v).producer()?;
    let node = graph.node(id);
    if depth == 0 || !node.is_default_domain() || node.subgraphs().next().is_some() {
        return None;
    }
    let kernel = lookup("", &node.op_type, opset)?.kernel?;
    let inputs: Vec<Option<RtTensor>> = node
        .inputs()
        .iter()
        .map(|i| match i {
            Some(i) => fold(graph, *i, opset, depth - 1).map(Some),
            None => Some(None),
        })
        .collect::<Option<_>>()?;
    let refs: Vec<Option<&RtTensor>> = inputs.iter().map(Option::as_ref).collect();
    let ctx = KernelCtx {
        node,
        opset,
        threads: 1,
        subgraphs: None,
    };
    let out = kernel(&ctx, &refs).ok()?.into_iter().nth(slot as usize)?;
    (out.len() <= MAX_FOLD_ELEMS).then_some(out)
}

/// Inferred shapes as a cached analysis of the pass manager.
impl Analysis for ShapeMap {
    fn compute(model: &Model) -> Result<ShapeMap, PassError> {
        crate::infer_model(model).map_err(|e| PassError::msg(format!("shape inference: {e}")))
    }
}
