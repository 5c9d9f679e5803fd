//! The textual IR: a readable, byte-stable dump of a model, for snapshot tests and
//! `--print-ir-after` (like rustc's MIR dumps).
//!
//! ```text
//! model ir=8 opsets=[ai.onnx:18] producer="pytorch 2.x"
//! graph main_graph(%input_ids: i64[batch, seq]) -> (%logits: f32[batch, seq, 256]) {
//!   const %onnx::MatMul_123: f32[64, 64] = <16384 B, fnv1a 1a2b3c4d5e6f7081>
//!   const %c0: i64[1] = [0]
//!   %x: f32[batch, seq, 64] = Gather(%embed, %input_ids) {axis = 0}  // /model/embed_tokens/Gather
//!   %y = If(%cond) captures(%x) {  // if_node
//!     then_branch = graph then() outer(%x) -> (%t) {
//!       %t = Identity(%x)
//!     }
//!   }
//! }
//! ```
//!
//! Rules: values print as `%name` (quoted, `%"a b"`, when the name has characters outside
//! `[A-Za-z0-9_.:/-]`), with their type where known; an omitted optional input or result is
//! `_`; ops outside the default domain print as `domain::Op`; attributes print in the order
//! the node holds them; tensors of at most [`SMALL_TENSOR`] elements (or
//! [`PrintOptions::small_tensor`], [`print_model_with`]) print their values,
//! larger ones their byte count and the FNV-1a 64 hash of their raw bytes, so a rewrite that
//! changes weights shows in a diff. Node names follow as a trailing `// name` comment.
//! Nothing depends on hash-map order or addresses: the same IR always prints the same bytes.
//! Doc strings, metadata and value_info are not printed.

use crate::graph::{AttrValue, Attribute, Graph, NodeId, ValueDef, ValueId};
use crate::{DType, Model, Tensor, TensorData, TypedData};
use std::fmt::Write;

/// Tensors with at most this many elements print their values.
pub const SMALL_TENSOR: u64 = 8;

/// The textual IR of a model.
pub fn print_model(model: &Model) -> String {
    print_model_with(model, &PrintOptions::default())
}

/// How [`print_model_with`] prints; the default is what [`print_model`] prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrintOptions {
    /// Tensors with at most this many elements print their values (default
    /// [`SMALL_TENSOR`]); larger ones print their byte count and hash. File tests of weight
    /// rewrites raise it so the diff shows the rewritten numbers.
    pub small_tensor: u64,
}

impl Default for PrintOptions {
    fn default() -> PrintOptions {
        PrintOptions {
            small_tensor: SMALL_TENSOR,
        }
    }
}

/// The textual IR of a model, printed as `opts` says.
pub fn print_model_with(model: &Model, opts: &PrintOptions) -> String {
    let mut p = Printer::new(opts);
    p.model(model);
    p.out
}

/// The textual IR of one graph (no model header).
pub fn print_graph(graph: &Graph) -> String {
    let mut p = Printer::new(&PrintOptions::default());
    p.graph(graph, "graph");
    p.out
}

/// FNV-1a 64 of `bytes`: the content hash shown for large tensors.
pub fn content_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

struct Printer {
    out: String,
    indent: usize,
    small_tensor: u64,
}

fn is_bare_name(s: &str) -> bool {
    !s.is_empty()
        && !s.ends_with(':')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-'))
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `"..."` with printable ASCII kept and everything else escaped.
pub(crate) fn quote(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    for &b in bytes {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s.push('"');
    s
}

/// Node names go in a trailing comment: escape only backslashes and control characters.
fn comment_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn ident(s: &str) -> String {
    if is_ident(s) {
        s.to_string()
    } else {
        quote(s.as_bytes())
    }
}

fn value_name(s: &str) -> String {
    if is_bare_name(s) {
        format!("%{s}")
    } else {
        format!("%{}", quote(s.as_bytes()))
    }
}

fn float(v: f64, dtype: DType) -> String {
    if dtype == DType::F64 {
        format!("{v:?}")
    } else {
        format!("{:?}", v as f32)
    }
}

fn tensor_type(t: &Tensor) -> String {
    let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
    format!("{}[{}]", t.dtype, dims.join(", "))
}

/// The elements of a small tensor, `None` if it is large or cannot be decoded.
fn small_values(t: &Tensor, limit: u64) -> Option<Vec<String>> {
    let numel = t.numel()?;
    if numel > limit || t.validate().is_err() {
        return None;
    }
    if let TensorData::Typed(TypedData::Str(v)) = &t.data {
        return Some(v.iter().map(|s| quote(s)).collect());
    }
    match t.dtype {
        DType::F64 => {
            let raw = t.raw_bytes().ok()?;
            Some(
                raw.chunks_exact(8)
                    .map(|c| float(f64::from_le_bytes(c.try_into().unwrap()), DType::F64))
                    .collect(),
            )
        }
        DType::U64 => {
            let raw = t.raw_bytes().ok()?;
            Some(
                raw.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()).to_string())
                    .collect(),
            )
        }
        DType::Bool => Some(
            t.to_i64()
                .ok()?
                .iter()
                .map(|&v| (v != 0).to_string())
                .collect(),
        ),
        d if d.is_float() => Some(
            t.to_f32()
                .ok()?
                .iter()
                .map(|&v| float(v as f64, d))
                .collect(),
        ),
        _ => Some(t.to_i64().ok()?.iter().map(|v| v.to_string()).collect()),
    }
}

/// A tensor's payload: `[1.0, 2.0]`, `3` (scalar), or `<16384 B, fnv1a ...>`.
fn tensor_payload(t: &Tensor, limit: u64) -> String {
    if let Some(vals) = small_values(t, limit) {
        return if t.dims.is_empty() && vals.len() == 1 {
            vals[0].clone()
        } else {
            format!("[{}]", vals.join(", "))
        };
    }
    let location = match &t.data {
        TensorData::External { entries, .. } => entries
            .iter()
            .find(|(k, _)| k == "location")
            .map(|(_, v)| format!(" external {}", quote(v.as_bytes())))
            .unwrap_or_else(|| " external".to_string()),
        _ => String::new(),
    };
    let (len, hash) = match (&t.data, t.raw_bytes()) {
        (_, Ok(raw)) => (raw.len(), content_hash(&raw)),
        (TensorData::Typed(TypedData::Str(v)), _) => {
            // Length-prefixed so ["ab", "c"] and ["a", "bc"] differ.
            let mut buf = Vec::new();
            for s in v {
                buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
                buf.extend_from_slice(s);
            }
            (buf.len(), content_hash(&buf))
        }
        (_, Err(_)) => (0, content_hash(&[])),
    };
    let invalid = if t.validate().is_err() {
        ", invalid"
    } else {
        ""
    };
    format!("<{len} B{location}, fnv1a {hash:016x}{invalid}>")
}

fn opaque(what: &str, b: &[u8]) -> String {
    format!("{what}<{} B, fnv1a {:016x}>", b.len(), content_hash(b))
}

fn list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    let parts: Vec<String> = items.iter().map(f).collect();
    format!("[{}]", parts.join(", "))
}

impl Printer {
    fn new(opts: &PrintOptions) -> Printer {
        Printer {
            out: String::new(),
            indent: 0,
            small_tensor: opts.small_tensor,
        }
    }

    fn line(&mut self, s: &str) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn model(&mut self, m: &Model) {
        let mut head = String::from("model");
        if let Some(ir) = m.ir_version {
            let _ = write!(head, " ir={ir}");
        }
        let opsets: Vec<String> = m
            .opset_imports
            .iter()
            .map(|o| {
                let d = match o.domain.as_deref() {
                    None | Some("") => "ai.onnx",
                    Some(d) => d,
                };
                match o.version {
                    Some(v) => format!("{d}:{v}"),
                    None => format!("{d}:?"),
                }
            })
            .collect();
        let _ = write!(head, " opsets=[{}]", opsets.join(", "));
        let producer = match (&m.producer_name, &m.producer_version) {
            (Some(n), Some(v)) => Some(format!("{n} {v}")),
            (Some(n), None) => Some(n.clone()),
            (None, Some(v)) => Some(v.clone()),
            (None, None) => None,
        };
        if let Some(p) = producer {
            let _ = write!(head, " producer={}", quote(p.as_bytes()));
        }
        if let Some(d) = &m.domain {
            let _ = write!(head, " domain={}", quote(d.as_bytes()));
        }
        if let Some(v) = m.model_version {
            let _ = write!(head, " version={v}");
        }
        for (what, n) in [
            ("functions", m.functions.len()),
            ("training_info", m.training_info.len()),
            ("configuration", m.configuration.len()),
        ] {
            if n > 0 {
                let _ = write!(head, " {what}={n}");
            }
        }
        self.line(&head);
        self.graph(&m.graph, "graph");
    }

    fn typed(&self, g: &Graph, v: ValueId) -> String {
        let val = g.value(v);
        match &val.ty {
            Some(t) => format!("{}: {t}", value_name(&val.name)),
            None => value_name(&val.name),
        }
    }

    fn operand(&self, g: &Graph, v: Option<ValueId>) -> String {
        match v {
            Some(v) => value_name(&g.value(v).name),
            None => "_".to_string(),
        }
    }

    /// `<prefix> name(inputs) outer(..) -> (outputs) {` ... `}`. The caller has written
    /// the indentation for the first line if `prefix` continues a line.
    fn graph_header(&self, g: &Graph, prefix: &str) -> String {
        let ins: Vec<String> = g.inputs.iter().map(|&v| self.typed(g, v)).collect();
        let outs: Vec<String> = g.outputs.iter().map(|&v| self.typed(g, v)).collect();
        let outer: Vec<String> = g
            .values()
            .filter(|(_, v)| v.def() == ValueDef::Outer)
            .map(|(id, _)| self.typed(g, id))
            .collect();
        let mut s = format!("{prefix} {}({})", ident(&g.name), ins.join(", "));
        if !outer.is_empty() {
            let _ = write!(s, " outer({})", outer.join(", "));
        }
        let _ = write!(s, " -> ({}) {{", outs.join(", "));
        s
    }

    fn graph(&mut self, g: &Graph, prefix: &str) {
        let head = self.graph_header(g, prefix);
        self.line(&head);
        self.graph_body(g);
        self.line("}");
    }

    fn graph_body(&mut self, g: &Graph) {
        self.indent += 1;
        for &v in &g.initializers {
            let val = g.value(v);
            let kw = if val.def() == ValueDef::Input {
                "default"
            } else {
                "const"
            };
            let s = match &val.tensor {
                Some(t) => format!(
                    "{kw} {}: {} = {}",
                    value_name(&val.name),
                    tensor_type(t),
                    tensor_payload(t, self.small_tensor)
                ),
                None => format!("{kw} {} = <missing tensor>", value_name(&val.name)),
            };
            self.line(&s);
        }
        for b in &g.sparse_initializers {
            self.line(&format!("sparse_initializer {}", opaque("", b)));
        }
        for &id in g.node_order() {
            self.node(g, id);
        }
        self.indent -= 1;
    }

    fn node(&mut self, g: &Graph, id: NodeId) {
        let Some(n) = g.try_node(id) else {
            self.line(&format!("<removed node {id}>"));
            return;
        };
        let outs: Vec<String> = n
            .outputs()
            .iter()
            .map(|o| match o {
                Some(v) => self.typed(g, *v),
                None => "_".to_string(),
            })
            .collect();
        let ins: Vec<String> = n.inputs().iter().map(|&v| self.operand(g, v)).collect();
        let mut s = String::new();
        if !outs.is_empty() {
            let _ = write!(s, "{} = ", outs.join(", "));
        }
        if !n.domain.is_empty() {
            let _ = write!(s, "{}::", n.domain);
        }
        let _ = write!(s, "{}({})", n.op_type, ins.join(", "));
        if !n.captures().is_empty() {
            let caps: Vec<String> = n
                .captures()
                .iter()
                .map(|&v| value_name(&g.value(v).name))
                .collect();
            let _ = write!(s, " captures({})", caps.join(", "));
        }
        let comment = if n.name.is_empty() {
            String::new()
        } else {
            format!("  // {}", comment_escape(&n.name))
        };
        let multiline = n
            .attrs
            .iter()
            .any(|a| matches!(a.value, AttrValue::Graph(_) | AttrValue::Graphs(_)));
        if !multiline {
            if !n.attrs.is_empty() {
                let attrs: Vec<String> = n.attrs.iter().map(|a| self.attr_inline(a)).collect();
                let _ = write!(s, " {{{}}}", attrs.join(", "));
            }
            s.push_str(&comment);
            self.line(&s);
            return;
        }
        let _ = write!(s, " {{{comment}");
        self.line(&s);
        self.indent += 1;
        for a in &n.attrs {
            match &a.value {
                AttrValue::Graph(sg) => {
                    self.graph(sg, &format!("{} = graph", ident(&a.name)));
                }
                AttrValue::Graphs(gs) => {
                    self.line(&format!("{} = [", ident(&a.name)));
                    self.indent += 1;
                    for sg in gs {
                        self.graph(sg, "graph");
                    }
                    self.indent -= 1;
                    self.line("]");
                }
                _ => {
                    let s = self.attr_inline(a);
                    self.line(&s);
                }
            }
        }
        self.indent -= 1;
        self.line("}");
    }

    fn attr_inline(&self, a: &Attribute) -> String {
        let v = if let Some(r) = &a.ref_attr_name {
            format!("@{}", ident(r))
        } else {
            match &a.value {
                AttrValue::Float(f) => format!("{f:?}"),
                AttrValue::Int(i) => i.to_string(),
                AttrValue::String(s) => quote(s),
                AttrValue::Tensor(t) => format!(
                    "{} {}",
                    tensor_type(t),
                    tensor_payload(t, self.small_tensor)
                ),
                AttrValue::Graph(g) => format!("graph {}", ident(&g.name)),
                AttrValue::SparseTensor(b) => opaque("sparse_tensor", b),
                AttrValue::TypeProto(b) => opaque("type_proto", b),
                AttrValue::Floats(v) => list(v, |f| format!("{f:?}")),
                AttrValue::Ints(v) => list(v, |i| i.to_string()),
                AttrValue::Strings(v) => list(v, |s| quote(s)),
                AttrValue::Tensors(v) => list(v, |t| {
                    format!(
                        "{} {}",
                        tensor_type(t),
                        tensor_payload(t, self.small_tensor)
                    )
                }),
                AttrValue::Graphs(v) => list(v, |g| format!("graph {}", ident(&g.name))),
                AttrValue::SparseTensors(v) => list(v, |b| opaque("sparse_tensor", b)),
                AttrValue::TypeProtos(v) => list(v, |b| opaque("type_proto", b)),
                AttrValue::Undefined => "undefined".to_string(),
            }
        };
        format!("{} = {v}", ident(&a.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::NodeSpec;
    use crate::{Dim, OpsetImport, Type};
    use bytes::Bytes;

    fn sym(dims: &[&str]) -> Option<Vec<Dim>> {
        Some(
            dims.iter()
                .map(|d| match d.parse::<i64>() {
                    Ok(n) => Dim::Known(n),
                    Err(_) => Dim::Sym(d.to_string()),
                })
                .collect(),
        )
    }

    fn model() -> Model {
        let mut g = Graph::new("main_graph");
        let ids = g
            .add_input(
                "input_ids",
                Some(Type::tensor(DType::I64, sym(&["batch", "seq"]))),
            )
            .unwrap();
        let cond = g
            .add_input("cond", Some(Type::tensor(DType::Bool, sym(&[]))))
            .unwrap();
        let big: Vec<f32> = (0..16 * 4).map(|i| i as f32 * 0.5).collect();
        let embed = g
            .add_initializer("onnx::Gather_7", Tensor::from_f32(vec![16, 4], &big))
            .unwrap();
        let c0 = g
            .add_initializer("c0", Tensor::from_i64(vec![1], &[0]))
            .unwrap();
        let gather = g
            .add_node(
                NodeSpec::new("Gather")
                    .named("/model/embed_tokens/Gather")
                    .attr("axis", AttrValue::Int(0)),
                &[Some(embed), Some(ids)],
                &["x"],
            )
            .unwrap();
        let x = g.node(gather).output(0).unwrap();
        g.value_mut(x).ty = Some(Type::tensor(DType::F32, sym(&["batch", "seq", "4"])));
        let mut ms = NodeSpec::new("SimplifiedLayerNormalization")
            .attr("epsilon", AttrValue::Float(1e-5))
            .attr("axes", AttrValue::Ints(vec![-1]))
            .attr("mode", AttrValue::String(Bytes::from_static(b"fast \"x\"")));
        ms.domain = "com.microsoft".into();
        let norm = g
            .add_node(ms, &[Some(x), None, Some(c0)], &["y", ""])
            .unwrap();
        let y = g.node(norm).output(0).unwrap();

        let mut then_g = Graph::new("then");
        let yo = then_g.add_outer("y").unwrap();
        then_g
            .add_node(NodeSpec::new("Identity"), &[Some(yo)], &["t"])
            .unwrap();
        then_g.outputs = vec![then_g.find("t").unwrap()];
        let mut else_g = Graph::new("else");
        let k = else_g
            .add_initializer(
                "k",
                Tensor::from_raw(DType::F16, vec![], Bytes::from_static(&[0x00, 0x3c])),
            )
            .unwrap();
        else_g
            .add_node(
                NodeSpec::new("Constant").attr(
                    "value",
                    AttrValue::Tensor(Tensor::from_f32(vec![2], &[1.5, -0.0])),
                ),
                &[],
                &["e0"],
            )
            .unwrap();
        let e0 = else_g.find("e0").unwrap();
        else_g
            .add_node(NodeSpec::new("Mul"), &[Some(e0), Some(k)], &["e"])
            .unwrap();
        else_g.outputs = vec![else_g.find("e").unwrap()];
        let if_node = g
            .add_node(
                NodeSpec::new("If")
                    .named("if")
                    .attr("then_branch", AttrValue::Graph(Box::new(then_g)))
                    .attr("else_branch", AttrValue::Graph(Box::new(else_g))),
                &[Some(cond)],
                &["logits"],
            )
            .unwrap();
        g.set_captures(if_node, vec![y]);
        g.outputs = vec![g.find("logits").unwrap()];
        Model {
            ir_version: Some(8),
            opset_imports: vec![
                OpsetImport {
                    domain: None,
                    version: Some(18),
                },
                OpsetImport {
                    domain: Some("com.microsoft".into()),
                    version: Some(1),
                },
            ],
            producer_name: Some("pytorch".into()),
            producer_version: Some("2.x".into()),
            graph: g,
            ..Default::default()
        }
    }

    #[test]
    fn printing_is_stable() {
        let m = model();
        crate::verify(&m).unwrap();
        let a = print_model(&m);
        let b = print_model(&m.clone());
        assert_eq!(a, b);
        insta::assert_snapshot!(a);
    }

    #[test]
    fn weight_changes_show() {
        let mut m = model();
        let before = print_model(&m);
        let w = m.graph.find("onnx::Gather_7").unwrap();
        let mut vals = m.graph.value(w).tensor.as_ref().unwrap().to_f32().unwrap();
        vals[63] += 1.0;
        m.graph.value_mut(w).tensor = Some(Tensor::from_f32(vec![16, 4], &vals));
        assert_ne!(before, print_model(&m));
    }

    /// A higher `small_tensor` prints the 64-element table's values, which parse back.
    #[test]
    fn larger_tensors_inline_on_request() {
        let m = model();
        let opts = PrintOptions { small_tensor: 64 };
        let text = print_model_with(&m, &opts);
        assert!(print_model(&m).contains("onnx::Gather_7: f32[16, 4] = <256 B, fnv1a"));
        assert!(text.contains("onnx::Gather_7: f32[16, 4] = [0.0, 0.5, 1.0,"));
        assert_eq!(
            print_model_with(&m, &PrintOptions::default()),
            print_model(&m)
        );
        let back = crate::parse_model(&text).unwrap();
        assert_eq!(print_model_with(&back, &opts), text);
    }

    #[test]
    fn names_quote_when_needed() {
        assert_eq!(value_name("onnx::MatMul_1"), "%onnx::MatMul_1");
        assert_eq!(value_name("/model/x_output_0"), "%/model/x_output_0");
        assert_eq!(value_name("a b"), "%\"a b\"");
        assert_eq!(value_name("x:"), "%\"x:\"");
        assert_eq!(quote(b"\xff\n"), "\"\\xff\\n\"");
    }

    #[test]
    fn fnv1a_reference_values() {
        assert_eq!(content_hash(b""), 0xcbf29ce484222325);
        assert_eq!(content_hash(b"a"), 0xaf63dc4c8601ec8c);
    }
}
