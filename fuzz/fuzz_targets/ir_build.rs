//! Fuzzes the IR's own building API with structured input: graphs of arbitrary inputs,
//! initializers, nodes (names, ops, attributes, one level of subgraphs) and outputs, made
//! through `Graph::add_input`, `add_initializer` and `add_node`. Every call must give a value
//! or a `GraphError`, never a panic; a graph that verifies must print, parse back and print
//! to the same text, and re-encode to ONNX that loads and verifies.
#![cfg_attr(fuzzing, no_main)]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use perqc_ir::{
    AttrValue, DType, DeclaredDim, Dim, Graph, Model, NodeSpec, OpsetImport, Tensor, Type,
};
use std::path::Path;

/// A name: mostly from a small pool, so definitions collide and reads find them.
#[derive(Arbitrary, Debug)]
enum Name {
    Pool(u8),
    Free(String),
}

impl Name {
    fn get(&self) -> String {
        match self {
            Name::Pool(i) => ["x", "y", "z", "w", "out", "a b", "", "x.1"][*i as usize % 8].into(),
            Name::Free(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum DimIn {
    Known(u8),
    /// Symbolic dims are identifiers: others print bare and do not parse back.
    Sym(u8),
    Unknown,
}

#[derive(Arbitrary, Debug)]
struct Decl {
    name: Name,
    elem: Option<u8>,
    dims: Option<Vec<DimIn>>,
}

#[derive(Arbitrary, Debug)]
struct TensorIn {
    dtype: u8,
    dims: Vec<u8>,
    raw: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum AttrIn {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    Tensor(TensorIn),
    Graph(Box<GraphIn>),
}

/// An op name: one of a few real ones or a generated identifier. (Empty and non-identifier
/// op names print bare and do not parse back: see docs/fuzzing.md.)
#[derive(Arbitrary, Debug)]
enum Op {
    Pool(u8),
    Ident(u16),
}

impl Op {
    fn get(&self) -> String {
        match self {
            Op::Pool(i) => [
                "Relu", "Add", "Split", "Identity", "MatMul", "If", "Constant",
            ][*i as usize % 7]
                .into(),
            Op::Ident(n) => format!("Op{n}"),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct NodeIn {
    name: String,
    op: Op,
    /// "", "com.microsoft" or "custom.domain".
    domain: u8,
    inputs: Vec<Option<Name>>,
    outputs: Vec<Name>,
    /// Attribute names are identifiers (`a0`..): others print bare and do not parse back.
    attrs: Vec<(u8, AttrIn)>,
}

#[derive(Arbitrary, Debug)]
struct GraphIn {
    /// Graph names come from a pool: ones that are not identifiers do not round-trip.
    name: u8,
    inputs: Vec<Decl>,
    inits: Vec<(Name, TensorIn)>,
    nodes: Vec<NodeIn>,
    outputs: Vec<Name>,
}

fn tensor(t: &TensorIn) -> Option<Tensor> {
    // Common element types; the printer elides others' values (complex, float8, int4...).
    let codes = [1, 2, 3, 6, 7, 9, 10, 11, 16];
    let dtype = DType::from_code(codes[t.dtype as usize % codes.len()])?;
    // At most 2 x 2 x 2 elements: the textual IR prints (and so round-trips) only tensors
    // of up to `SMALL_TENSOR` = 8 elements; larger ones print as a hash.
    let dims: Vec<i64> = t.dims.iter().take(3).map(|&d| (d % 3) as i64).collect();
    // A payload of the right length (a wrong one prints elided, like a big tensor).
    let numel = dims.iter().product::<i64>() as u64;
    let mut raw = t.raw.clone();
    raw.resize(dtype.raw_len(numel)? as usize, 0);
    Some(Tensor::from_raw(dtype, dims, raw.into()))
}

fn ty(d: &Decl) -> Option<Type> {
    let elem = d.elem.map(|e| DType::from_code(e as i32 % 24))?;
    Some(Type::Tensor {
        elem,
        shape: d.dims.as_ref().map(|dims| {
            dims.iter()
                .take(4)
                .map(|x| DeclaredDim {
                    dim: match x {
                        DimIn::Known(n) => Dim::Known(*n as i64),
                        DimIn::Sym(n) => Dim::Sym(format!("d{n}")),
                        DimIn::Unknown => Dim::Unknown,
                    },
                    denotation: None,
                })
                .collect()
        }),
        denotation: None,
    })
}

/// Builds `gi` through the API; `None` where the API refuses (which is fine).
fn build(gi: &GraphIn, depth: usize) -> Option<Graph> {
    let mut g = Graph::new(["main", "body", "g_1"][gi.name as usize % 3]);
    for d in gi.inputs.iter().take(8) {
        g.add_input(&d.name.get(), ty(d)).ok()?;
    }
    for (name, t) in gi.inits.iter().take(8) {
        g.add_initializer(&name.get(), tensor(t)?).ok()?;
    }
    for n in gi.nodes.iter().take(16) {
        // Trimmed: the parser trims the `// name` comment (see docs/fuzzing.md).
        let mut spec = NodeSpec::new(&n.op.get()).named(n.name.trim());
        spec.domain = ["", "com.microsoft", "custom.domain"][n.domain as usize % 3].into();
        for (name, a) in n.attrs.iter().take(4) {
            let value = match a {
                AttrIn::Float(f) => AttrValue::Float(*f),
                AttrIn::Int(i) => AttrValue::Int(*i),
                AttrIn::String(s) => AttrValue::String(s.clone().into()),
                AttrIn::Floats(v) => AttrValue::Floats(v.clone()),
                AttrIn::Ints(v) => AttrValue::Ints(v.clone()),
                AttrIn::Strings(v) => {
                    AttrValue::Strings(v.iter().map(|s| s.clone().into()).collect())
                }
                AttrIn::Tensor(t) => AttrValue::Tensor(tensor(t)?),
                AttrIn::Graph(sub) if depth == 0 => {
                    AttrValue::Graph(Box::new(build(sub, depth + 1)?))
                }
                AttrIn::Graph(_) => continue,
            };
            spec = spec.attr(&format!("a{name}"), value);
        }
        let inputs: Vec<_> = n
            .inputs
            .iter()
            .take(6)
            .map(|i| i.as_ref().map(|name| g.value_named(&name.get())))
            .collect();
        let outputs: Vec<String> = n.outputs.iter().take(4).map(Name::get).collect();
        let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        g.add_node(spec, &inputs, &outputs).ok()?;
    }
    for o in gi.outputs.iter().take(4) {
        let id = g.find(&o.get())?;
        g.outputs.push(id);
    }
    Some(g)
}

fn check(gi: &GraphIn) {
    let Some(graph) = build(gi, 0) else {
        return;
    };
    let model = Model {
        ir_version: Some(10),
        opset_imports: vec![OpsetImport {
            domain: Some(String::new()),
            version: Some(21),
        }],
        graph,
        ..Default::default()
    };
    if perqc_ir::verify(&model).is_err() {
        return;
    }
    let text = perqc_ir::print_model(&model);
    let parsed = perqc_ir::parse_model(&text)
        .unwrap_or_else(|e| panic!("printed IR does not parse: {e}\n{text}"));
    perqc_ir::verify(&parsed).expect("parsed IR verifies");
    let again = perqc_ir::print_model(&parsed);
    assert!(
        again == text,
        "print -> parse -> print is not a fixed point:\n{text}\n---\n{again}"
    );
    let bytes = perqc_onnx::to_bytes(&model);
    let base = Path::new("/nonexistent-perqc-fuzz");
    let loaded = perqc_onnx::load_bytes(bytes.into(), Path::new("fuzz.onnx"), base)
        .unwrap_or_else(|e| panic!("encoded model does not load: {e}\n{text}"));
    perqc_ir::verify(&loaded.model).expect("reloaded model verifies");
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|gi: GraphIn| check(&gi));

/// Without cargo-fuzz's `--cfg fuzzing` this builds as a plain program that runs each file
/// given (or every file of each folder given) through the same check, a replay and triage
/// harness: it reports each failing file and its message, and exits non-zero if any failed.
#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    use arbitrary::Unstructured;
    let mut files = Vec::new();
    for arg in std::env::args_os().skip(1) {
        let p = std::path::PathBuf::from(arg);
        match std::fs::read_dir(&p) {
            Ok(dir) => files.extend(dir.flatten().map(|e| e.path())),
            Err(_) => files.push(p),
        }
    }
    files.sort();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = 0;
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let Ok(gi) = GraphIn::arbitrary_take_rest(Unstructured::new(&data)) else {
            continue;
        };
        if let Err(e) = std::panic::catch_unwind(|| check(&gi)) {
            failed += 1;
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            // One line per file; the whole message when replaying a single file.
            let shown = if files.len() == 1 {
                msg.as_str()
            } else {
                msg.lines().next().unwrap_or("")
            };
            println!("{}: {shown}", f.display());
        }
    }
    println!("{} inputs checked, {failed} failed", files.len());
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
