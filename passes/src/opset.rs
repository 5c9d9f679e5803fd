//! Opset upgrade of the default ONNX domain, driven by the op table.
//!
//! Assumes nothing of the model beyond its opset imports.
//!
//! Guarantees: after [`upgrade`] the model imports the default domain at version `to` and
//! every default-domain node means what it meant before. A node moves from the model's
//! version `v` to `to` only if the op table resolves it to the same row at both versions:
//! rows are split exactly where an op's signature or meaning changed (see the header of
//! `perqc-ops/src/table.rs`), so versions inside one row differ only by additions (types,
//! optional attributes and inputs) and the node stays valid and equal. Any other node (its
//! row ends before `to`, or the table does not know it) is refused with an error naming
//! the node, the op and both versions, and the model is left unchanged. If/Loop/Scan
//! bodies are checked the same way. Nodes of other domains are not touched. The IR
//! version is raised to the first one that allows opset `to`, if it was lower.
//!
//! Identity: `node@v == node@to` whenever `lookup(op, v) == lookup(op, to)`.

use perqc_ir::{Graph, Model, OpsetImport};

/// Why an upgrade was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot upgrade the default opset from {from} to {to}: {what}")]
pub struct UpgradeError {
    pub from: i64,
    pub to: i64,
    pub what: String,
}

/// What an upgrade did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upgraded {
    /// The default-domain version before (the same as `to` when nothing was needed).
    pub from: i64,
    /// Default-domain nodes checked (subgraphs included).
    pub nodes: usize,
}

/// The first ONNX IR version that allows default opset `opset` (onnx's `VERSION_TABLE`).
pub fn min_ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19..=20 => 9,
        21..=22 => 10,
        23 => 11,
        24 => 12,
        25..=27 => 13,
        _ => 14,
    }
}

/// Moves the model's default domain to opset `to` (a no-op when it is already there or
/// newer: this never downgrades). A model importing no default domain gets the import.
pub fn upgrade(model: &mut Model, to: i64) -> Result<Upgraded, UpgradeError> {
    let from = model.opset("").unwrap_or(1);
    if from >= to {
        return Ok(Upgraded { from, nodes: 0 });
    }
    let mut nodes = 0;
    check_graph(&model.graph, from, to, &mut nodes, "")?;
    match model
        .opset_imports
        .iter_mut()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
    {
        Some(o) => o.version = Some(to),
        None => model.opset_imports.push(OpsetImport {
            domain: Some(String::new()),
            version: Some(to),
        }),
    }
    let ir = min_ir_version(to);
    if model.ir_version.is_none_or(|v| v < ir) {
        model.ir_version = Some(ir);
    }
    Ok(Upgraded { from, nodes })
}

fn check_graph(
    g: &Graph,
    from: i64,
    to: i64,
    nodes: &mut usize,
    path: &str,
) -> Result<(), UpgradeError> {
    for (_, n) in g.nodes() {
        if perqc_ops::canonical_domain(&n.domain).is_empty() {
            *nodes += 1;
            let (old, new) = (
                perqc_ops::lookup("", &n.op_type, from),
                perqc_ops::lookup("", &n.op_type, to),
            );
            let refuse = |why: String| UpgradeError {
                from,
                to,
                what: format!("{path}node `{}` ({}): {why}", n.name, n.op_type),
            };
            match (old, new) {
                (Some(a), Some(b)) if std::ptr::eq(a, b) => {}
                (Some(a), Some(b)) => {
                    return Err(refuse(format!(
                        "the op changed between opset {from} (row since {}) and opset {to} \
                         (row since {}); rewrite the node first",
                        a.since_version, b.since_version
                    )));
                }
                (Some(a), None) => {
                    return Err(refuse(format!(
                        "the op table has no row at opset {to} (its opset-{from} row ends \
                         at {})",
                        a.until.map_or("-".to_string(), |u| u.to_string())
                    )));
                }
                (None, _) => {
                    return Err(refuse(format!(
                        "the op table does not know the op at opset {from}, so it cannot \
                         tell whether opset {to} means the same"
                    )));
                }
            }
        }
        for sub in n.subgraphs() {
            let inner = format!("{path}in subgraph `{}` of `{}`: ", sub.name, n.name);
            check_graph(sub, from, to, nodes, &inner)?;
        }
    }
    Ok(())
}
