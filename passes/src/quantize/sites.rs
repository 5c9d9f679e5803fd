//! Which linear layers get quantized: every canonical `ai.perqc::Linear` with a constant
//! f32 weight `[K, N]` (`[N, K]` with transB), except the head unless asked for, and the
//! ones a skip pattern names.
//!
//! The head is a linear with no other linear after it whose result reaches a graph output
//! on its own: through ops whose other operands are constants or depend on shapes only
//! (Reshape, Cast, a soft-cap's Div/Tanh/Mul, a Slice of the last position). That is the LM
//! head of a decoder and the classifier of an encoder. A linear writing into an encoder's
//! residual stream also reaches the output without another linear, but through residual
//! `Add`s and norms that mix it with other data, so it is not a head; nor is a key or value
//! projection whose result is also a graph output (a KV cache's `present`), since attention
//! feeds it to the output projection.

use perqc_ir::{Graph, NodeId, ValueDef, ValueId};
use perqc_ops::PERQC_DOMAIN;

/// One linear layer `y = x W (+ b)`.
#[derive(Clone, Debug)]
pub struct Site {
    pub node: NodeId,
    /// The node's name (or its result's, when the node has none): what reports show.
    pub name: String,
    /// The activation read (input 0).
    pub x: ValueId,
    /// The constant weight (input 1).
    pub weight: ValueId,
    /// The weight is stored `[N, K]` (read transposed).
    pub trans: bool,
    /// Input width (contracted).
    pub k: usize,
    /// Output width.
    pub n: usize,
    /// The model's head (see the module comment).
    pub head: bool,
}

/// Every canonical linear with a constant 2-d f32 weight, in node order. A square map whose
/// result only heads read (the map `tie-head` puts in front of a tied head) counts as part
/// of the head: quantizing it would quantize the head's input.
pub fn linears(graph: &Graph) -> Vec<Site> {
    let mut sites = all_linears(graph);
    let head_nodes: Vec<NodeId> = sites.iter().filter(|s| s.head).map(|s| s.node).collect();
    for s in sites.iter_mut().filter(|s| !s.head && s.k == s.n) {
        let Some(out) = graph.node(s.node).output(0) else {
            continue;
        };
        let uses = graph.value(out).uses();
        if !uses.is_empty() && uses.iter().all(|u| head_nodes.contains(&u.node)) {
            s.head = true;
        }
    }
    sites
}

fn all_linears(graph: &Graph) -> Vec<Site> {
    let alone = reaches_output_alone(graph);
    let below = feeds_a_linear(graph);
    graph
        .node_order()
        .iter()
        .filter_map(|&id| {
            let node = graph.node(id);
            if node.domain != PERQC_DOMAIN || node.op_type != "Linear" {
                return None;
            }
            let (x, w) = (node.input(0)?, node.input(1)?);
            let t = graph.const_tensor(w)?;
            if t.dtype != perqc_ir::DType::F32 || t.dims.len() != 2 {
                return None;
            }
            let trans = node.attr_int("transB").unwrap_or(0) != 0;
            let (d0, d1) = (t.dims[0] as usize, t.dims[1] as usize);
            let (k, n) = if trans { (d1, d0) } else { (d0, d1) };
            let out = node.output(0)?;
            let name = if node.name.is_empty() {
                graph.value(out).name.clone()
            } else {
                node.name.clone()
            };
            Some(Site {
                node: id,
                name,
                x,
                weight: w,
                trans,
                k,
                n,
                head: alone[out.index()] && !below[out.index()],
            })
        })
        .collect()
}

fn is_linear(node: &perqc_ir::Node) -> bool {
    node.domain == PERQC_DOMAIN && node.op_type == "Linear"
}

/// Per value: it depends on a graph input's data, not only on shapes (`Shape` and `Size`
/// read no data; constants and initializers depend on nothing).
fn data_dependent(graph: &Graph) -> Vec<bool> {
    let mut dep = vec![false; graph.value_capacity()];
    for &i in &graph.inputs {
        dep[i.index()] = graph.value(i).def() == ValueDef::Input;
    }
    for &id in graph.node_order() {
        let node = graph.node(id);
        let reads_data = !node.reads_shape_only();
        let d = reads_data
            && node
                .inputs()
                .iter()
                .flatten()
                .chain(node.captures())
                .any(|v| dep[v.index()]);
        for o in node.outputs().iter().flatten() {
            dep[o.index()] = d;
        }
    }
    dep
}

/// Per value: a graph output is computed from it alone, through non-linear ops whose every
/// other operand is independent of the data.
fn reaches_output_alone(graph: &Graph) -> Vec<bool> {
    let dep = data_dependent(graph);
    let mut alone = vec![false; graph.value_capacity()];
    for &o in &graph.outputs {
        alone[o.index()] = true;
    }
    for &id in graph.node_order().iter().rev() {
        let node = graph.node(id);
        if is_linear(node) || !node.outputs().iter().flatten().any(|o| alone[o.index()]) {
            continue;
        }
        let mut data = node.inputs().iter().flatten().filter(|v| dep[v.index()]);
        if let (Some(&only), None) = (data.next(), data.next())
            && node.captures().iter().all(|v| !dep[v.index()])
        {
            alone[only.index()] = true;
        }
    }
    alone
}

/// Per value: some linear reads it, or reads a value computed from it.
fn feeds_a_linear(graph: &Graph) -> Vec<bool> {
    let mut below = vec![false; graph.value_capacity()];
    for &id in graph.node_order().iter().rev() {
        let node = graph.node(id);
        let feeds = is_linear(node) || node.outputs().iter().flatten().any(|o| below[o.index()]);
        if feeds {
            for v in node.inputs().iter().flatten().chain(node.captures()) {
                below[v.index()] = true;
            }
        }
    }
    below
}

/// `pattern` matches `text` whole; `*` stands for any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // Classic two-pointer match with backtracking to the last `*`.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == t[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// A skip pattern names a site if it matches the node's name or its weight's name.
pub fn skipped(graph: &Graph, site: &Site, pattern: &str) -> bool {
    glob(pattern, &site.name) || glob(pattern, &graph.value(site.weight).name)
}

/// A skip pattern names a lookup table if it matches the Gather's name or the table's.
pub fn table_skipped(graph: &Graph, t: &Table, pattern: &str) -> bool {
    glob(pattern, &graph.node(t.node).name) || glob(pattern, &graph.value(t.table).name)
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        assert!(glob("*down_proj*", "/model/layers.3/mlp/down_proj/MatMul"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(glob("*", ""));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("*.0/*", "layers.0/q"));
    }
}

/// A lookup table: `Gather(T, ids)` on axis 0 of a constant f32 table `T [V, d]` (the token
/// embedding).
#[derive(Clone, Debug)]
pub struct Table {
    pub node: NodeId,
    pub table: ValueId,
    /// Entries (rows) and width.
    pub rows: usize,
    pub cols: usize,
}

/// Every Gather of a constant 2-d f32 table along axis 0, in node order.
pub fn tables(graph: &Graph) -> Vec<Table> {
    graph
        .node_order()
        .iter()
        .filter_map(|&id| {
            let node = graph.node(id);
            if !node.is_default_domain() || node.op_type != "Gather" {
                return None;
            }
            if node.attr_int("axis").unwrap_or(0) != 0 {
                return None;
            }
            let t = node.input(0)?;
            let tensor = graph.const_tensor(t)?;
            if tensor.dtype != perqc_ir::DType::F32 || tensor.dims.len() != 2 {
                return None;
            }
            Some(Table {
                node: id,
                table: t,
                rows: tensor.dims[0] as usize,
                cols: tensor.dims[1] as usize,
            })
        })
        .collect()
}
