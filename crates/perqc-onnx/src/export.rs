//! IR -> ONNX protobuf, written as a stream.
//!
//! The model is encoded through a fixed buffer straight into a temporary file in the
//! destination folder, which is renamed over the destination only once everything is
//! written: a failed save never leaves a partial file behind. Weight payloads are not copied
//! in memory: the protobuf structs hold `Bytes` slices of the source maps.

use crate::error::SaveError;
use crate::proto as pb;
use crate::stream::StreamBuf;
use bytes::Bytes;
use perqc_ir::{AttrValue, Attribute, Graph, Model, Tensor, TensorData, Type, TypedData, ValueId};
use prost::Message;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

/// A protobuf message may not exceed 2 GiB; stay clear of it (the non-tensor part of the
/// model needs room too).
pub const PROTOBUF_LIMIT: u64 = (2 << 30) - (64 << 20);

/// Which tensors go to the external data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExternalPolicy {
    /// Tensors that were external stay external; the rest stay inline.
    #[default]
    Keep,
    /// Every initializer of at least `SaveOptions::threshold` bytes goes external.
    All,
    /// Every tensor inline (unless the model would pass `SaveOptions::inline_limit`).
    Inline,
}

#[derive(Clone, Debug)]
pub struct SaveOptions {
    pub external: ExternalPolicy,
    /// Smallest initializer (bytes) moved to external data under [`ExternalPolicy::All`].
    pub threshold: u64,
    /// Largest total of inline tensor bytes; past it, `Keep` and `Inline` switch to `All`.
    /// Protobuf messages cannot pass 2 GiB, hence the default [`PROTOBUF_LIMIT`].
    pub inline_limit: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            external: ExternalPolicy::Keep,
            threshold: 1024,
            inline_limit: PROTOBUF_LIMIT,
        }
    }
}

/// What a save wrote.
#[derive(Debug)]
pub struct Saved {
    pub model_bytes: u64,
    /// The external data file and its size, if one was written.
    pub data: Option<(PathBuf, u64)>,
    /// True when external data was switched on because the model would pass 2 GiB.
    pub forced_external: bool,
}

/// Writes `model` to `path` (and `<path>.data` when tensors go external).
pub fn save(model: &Model, path: &Path, opts: &SaveOptions) -> Result<Saved, SaveError> {
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SaveError::Io { path: p, source }
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| SaveError::Invalid {
            path: path.to_path_buf(),
            detail: "output path has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let mut policy = opts.external;
    let mut threshold = opts.threshold;
    let forced_external =
        policy != ExternalPolicy::All && inline_bytes(&model.graph) > opts.inline_limit;
    if forced_external {
        policy = ExternalPolicy::All;
        threshold = threshold.min(1024);
    }
    let goes_external = |t: &Tensor| match policy {
        ExternalPolicy::Keep => matches!(t.data, TensorData::External { .. }),
        ExternalPolicy::All => t.byte_len() >= threshold,
        ExternalPolicy::Inline => false,
    };

    // The external data file is `<path>.data` beside `path` as named, so that loading
    // `path` finds it. Both are resolved before anything is written; the data file only if
    // one will be written.
    let data_name = format!("{file_name}.data");
    let data_path = folder_of(path).join(&data_name);
    let target = writable_target(path)?;
    let data_target = if writes_external(&model.graph, &goes_external) {
        writable_target(&data_path)?
    } else {
        data_path.clone()
    };
    let dir = folder_of(&target);
    let data_dir = folder_of(&data_target);
    for (named, resolved) in [(path, &target), (data_path.as_path(), &data_target)] {
        let folder = folder_of(resolved);
        if !folder.is_dir() {
            let via = if resolved.as_path() != named {
                format!(" (the symlink leads to `{}`)", resolved.display())
            } else {
                String::new()
            };
            return Err(SaveError::Invalid {
                path: named.to_path_buf(),
                detail: format!(
                    "cannot write: the folder `{}` does not exist{via}",
                    folder.display()
                ),
            });
        }
    }

    let mut data_file: Option<(tempfile::NamedTempFile, StreamBuf<BufWriter<std::fs::File>>)> =
        None;
    let mut write_external = |t: &Tensor| -> io::Result<Option<Vec<(String, String)>>> {
        if !goes_external(t) {
            return Ok(None);
        }
        if data_file.is_none() {
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{}.", file_name_of(&data_target)))
                .permissions(new_file_permissions())
                .tempfile_in(&data_dir)?;
            let w = BufWriter::new(tmp.as_file().try_clone()?);
            data_file = Some((tmp, StreamBuf::new(w)));
        }
        let (_, stream) = data_file.as_mut().unwrap();
        let raw = t.raw_bytes().map_err(io::Error::other)?;
        // Page-align big tensors so runtimes can map them directly.
        let align = if raw.len() >= 64 << 10 { 4096 } else { 64 };
        let pad = (align - stream.position() % align) % align;
        bytes::BufMut::put_bytes(stream, 0, pad as usize);
        let offset = stream.position();
        bytes::BufMut::put_slice(stream, &raw);
        Ok(Some(external_entries(
            t,
            &data_name,
            offset,
            raw.len() as u64,
        )))
    };

    let proto = model_proto(model, &mut write_external).map_err(io_err(&data_path))?;

    let data = match data_file {
        Some((tmp, stream)) => {
            let size = stream.position();
            stream.finish().map_err(io_err(&data_path))?;
            Some((tmp, size))
        }
        None => None,
    };

    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name_of(&target)))
        .permissions(new_file_permissions())
        .tempfile_in(&dir)
        .map_err(io_err(path))?;
    let mut stream = StreamBuf::new(BufWriter::new(
        tmp.as_file().try_clone().map_err(io_err(path))?,
    ));
    proto.encode(&mut stream).map_err(|e| SaveError::Invalid {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let model_bytes = stream.position();
    stream.finish().map_err(io_err(path))?;

    let data = match data {
        Some((tmp, size)) => {
            tmp.persist(&data_target).map_err(|e| SaveError::Io {
                path: data_path.clone(),
                source: e.error,
            })?;
            Some((data_path, size))
        }
        None => None,
    };
    tmp.persist(&target).map_err(|e| SaveError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(Saved {
        model_bytes,
        data,
        forced_external,
    })
}

/// The file a save of `path` replaces: `path` itself when it is absent or a regular file, the
/// file a symlink leads to (so the link stays a link; a dangling link's target is created
/// if its folder exists, as a shell redirection would). Anything else (a folder, device,
/// FIFO or socket) is refused: renaming a new file over it would destroy it.
fn writable_target(path: &Path) -> Result<PathBuf, SaveError> {
    use std::os::unix::fs::FileTypeExt;
    let mut target = path.to_path_buf();
    // As many links as Linux follows before ELOOP.
    for _ in 0..40 {
        let meta = match std::fs::symlink_metadata(&target) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(target),
            Err(source) => {
                return Err(SaveError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            let link = std::fs::read_link(&target).map_err(|source| SaveError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            target = folder_of(&target).join(link);
            continue;
        }
        if ft.is_file() {
            return Ok(target);
        }
        let kind = if ft.is_dir() {
            "a folder"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        let what = if target == path {
            format!("`{}` is {kind}", path.display())
        } else {
            format!(
                "`{}` is a symlink to `{}`, which is {kind}",
                path.display(),
                target.display()
            )
        };
        return Err(SaveError::Invalid {
            path: path.to_path_buf(),
            detail: format!("cannot write: {what}, not a regular file; give a file path"),
        });
    }
    Err(SaveError::Invalid {
        path: path.to_path_buf(),
        detail: "cannot write: too many levels of symlinks".into(),
    })
}

/// The folder `path` is in (`.` for a bare file name).
fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Temporary files are private (0600); the renamed result gets what a plain create would
/// (0666 less the umask, which `open` applies).
fn new_file_permissions() -> std::fs::Permissions {
    std::os::unix::fs::PermissionsExt::from_mode(0o666)
}

/// Encodes `model` in memory with every tensor inline (external ones included). For tests
/// and small models; [`save`] streams instead.
pub fn to_bytes(model: &Model) -> Vec<u8> {
    model_proto(model, &mut |_| Ok(None))
        .expect("no external writes, no I/O")
        .encode_to_vec()
}

/// `external_data` entries for `t` moved to `location` at `offset`: the original entries
/// with location/offset/length rewritten (other keys, like a checksum, kept), or fresh ones.
fn external_entries(t: &Tensor, location: &str, offset: u64, length: u64) -> Vec<(String, String)> {
    let mut entries = match &t.data {
        TensorData::External { entries, .. } => entries.clone(),
        _ => Vec::new(),
    };
    for (key, value) in [
        ("location", location.to_string()),
        ("offset", offset.to_string()),
        ("length", length.to_string()),
    ] {
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value,
            None if key == "offset" && offset == 0 => {}
            None => entries.push((key.to_string(), value)),
        }
    }
    entries
}

/// True if an initializer of `g` or of its subgraphs goes to the external data file.
fn writes_external(g: &Graph, goes_external: &dyn Fn(&Tensor) -> bool) -> bool {
    g.initializers
        .iter()
        .filter_map(|&v| g.value(v).tensor.as_ref())
        .any(goes_external)
        || g.nodes()
            .flat_map(|(_, n)| n.attrs.iter())
            .any(|a| match &a.value {
                AttrValue::Graph(sub) => writes_external(sub, goes_external),
                AttrValue::Graphs(subs) => subs.iter().any(|s| writes_external(s, goes_external)),
                _ => false,
            })
}

/// Bytes the tensors of `g` (and its subgraphs) would take inline.
fn inline_bytes(g: &Graph) -> u64 {
    let inits: u64 = g
        .initializers
        .iter()
        .filter_map(|&v| g.value(v).tensor.as_ref())
        .map(Tensor::byte_len)
        .sum();
    let attrs: u64 = g
        .nodes()
        .flat_map(|(_, n)| n.attrs.iter())
        .map(|a| match &a.value {
            AttrValue::Tensor(t) => t.byte_len(),
            AttrValue::Tensors(ts) => ts.iter().map(Tensor::byte_len).sum(),
            AttrValue::Graph(sub) => inline_bytes(sub),
            AttrValue::Graphs(subs) => subs.iter().map(inline_bytes).sum(),
            _ => 0,
        })
        .sum();
    inits + attrs
}

type ExternalWriter<'a> = dyn FnMut(&Tensor) -> io::Result<Option<Vec<(String, String)>>> + 'a;

fn model_proto(m: &Model, ext: &mut ExternalWriter) -> io::Result<pb::ModelProto> {
    Ok(pb::ModelProto {
        ir_version: m.ir_version,
        opset_import: m
            .opset_imports
            .iter()
            .map(|o| pb::OperatorSetIdProto {
                domain: o.domain.clone(),
                version: o.version,
            })
            .collect(),
        producer_name: m.producer_name.clone(),
        producer_version: m.producer_version.clone(),
        domain: m.domain.clone(),
        model_version: m.model_version,
        doc_string: m.doc_string.clone(),
        graph: Some(graph_proto(&m.graph, ext)?),
        metadata_props: entries(&m.metadata),
        training_info: decode_all(&m.training_info),
        functions: decode_all(&m.functions),
        configuration: decode_all(&m.configuration),
    })
}

fn entries(e: &[(String, String)]) -> Vec<pb::StringStringEntryProto> {
    e.iter()
        .map(|(k, v)| pb::StringStringEntryProto {
            key: Some(k.clone()),
            value: Some(v.clone()),
        })
        .collect()
}

/// Decodes bytes the importer encoded. They are our own encoding, so failure would be a
/// bug; an empty message is the harmless fallback.
fn decode<M: Message + Default>(b: &Bytes) -> M {
    M::decode(b.clone()).unwrap_or_default()
}

fn decode_all<M: Message + Default>(v: &[Bytes]) -> Vec<M> {
    v.iter().map(decode).collect()
}

fn opt_name(s: &str, present_if_empty: bool) -> Option<String> {
    (!s.is_empty() || present_if_empty).then(|| s.to_string())
}

fn graph_proto(g: &Graph, ext: &mut ExternalWriter) -> io::Result<pb::GraphProto> {
    let name_of = |v: &Option<ValueId>| v.map(|v| g.value(v).name.clone()).unwrap_or_default();
    let value_info = |v: ValueId| {
        let val = g.value(v);
        pb::ValueInfoProto {
            name: Some(val.name.clone()),
            r#type: val.ty.as_ref().map(type_proto),
            doc_string: val.info.doc_string.clone(),
            metadata_props: entries(&val.info.metadata),
        }
    };
    let mut nodes = Vec::with_capacity(g.node_count());
    for (_, n) in g.nodes() {
        nodes.push(pb::NodeProto {
            input: n.inputs().iter().map(name_of).collect(),
            output: n.outputs().iter().map(name_of).collect(),
            name: opt_name(&n.name, n.extra.empty_name_present),
            op_type: Some(n.op_type.clone()),
            domain: opt_name(&n.domain, n.extra.empty_domain_present),
            overload: n.extra.overload.clone(),
            attribute: n
                .attrs
                .iter()
                .map(|a| attribute_proto(a, ext))
                .collect::<io::Result<_>>()?,
            doc_string: n.extra.doc_string.clone(),
            metadata_props: entries(&n.extra.metadata),
            device_configurations: decode_all(&n.extra.device_configurations),
        });
    }
    let mut initializer = Vec::with_capacity(g.initializers.len());
    for &v in &g.initializers {
        let val = g.value(v);
        if let Some(t) = &val.tensor {
            let mut tp = tensor_proto(t, ext)?;
            tp.name = Some(val.name.clone());
            initializer.push(tp);
        }
    }
    Ok(pb::GraphProto {
        node: nodes,
        name: Some(g.name.clone()),
        initializer,
        sparse_initializer: decode_all(&g.sparse_initializers),
        doc_string: g.doc_string.clone(),
        input: g.inputs.iter().map(|&v| value_info(v)).collect(),
        output: g.outputs.iter().map(|&v| value_info(v)).collect(),
        value_info: g.value_info.iter().map(|&v| value_info(v)).collect(),
        quantization_annotation: decode_all(&g.quantization_annotation),
        metadata_props: entries(&g.metadata),
    })
}

fn attribute_proto(a: &Attribute, ext: &mut ExternalWriter) -> io::Result<pb::AttributeProto> {
    use pb::attribute_proto::AttributeType as T;
    let mut p = pb::AttributeProto {
        name: Some(a.name.clone()),
        ref_attr_name: a.ref_attr_name.clone(),
        doc_string: a.doc_string.clone(),
        ..Default::default()
    };
    let ty = match &a.value {
        AttrValue::Float(f) => {
            p.f = Some(*f);
            T::Float
        }
        AttrValue::Int(i) => {
            p.i = Some(*i);
            T::Int
        }
        AttrValue::String(s) => {
            p.s = Some(s.clone());
            T::String
        }
        AttrValue::Tensor(t) => {
            p.t = Some(tensor_proto(t, &mut |_| Ok(None))?);
            T::Tensor
        }
        AttrValue::Graph(g) => {
            p.g = Some(graph_proto(g, ext)?);
            T::Graph
        }
        AttrValue::SparseTensor(b) => {
            p.sparse_tensor = Some(decode(b));
            T::SparseTensor
        }
        AttrValue::TypeProto(b) => {
            p.tp = Some(decode(b));
            T::TypeProto
        }
        AttrValue::Floats(v) => {
            p.floats = v.clone();
            T::Floats
        }
        AttrValue::Ints(v) => {
            p.ints = v.clone();
            T::Ints
        }
        AttrValue::Strings(v) => {
            p.strings = v.clone();
            T::Strings
        }
        AttrValue::Tensors(v) => {
            p.tensors = v
                .iter()
                .map(|t| tensor_proto(t, &mut |_| Ok(None)))
                .collect::<io::Result<_>>()?;
            T::Tensors
        }
        AttrValue::Graphs(v) => {
            p.graphs = v
                .iter()
                .map(|g| graph_proto(g, ext))
                .collect::<io::Result<_>>()?;
            T::Graphs
        }
        AttrValue::SparseTensors(v) => {
            p.sparse_tensors = decode_all(v);
            T::SparseTensors
        }
        AttrValue::TypeProtos(v) => {
            p.type_protos = decode_all(v);
            T::TypeProtos
        }
        AttrValue::Undefined => T::Undefined,
    };
    p.r#type = Some(ty as i32);
    Ok(p)
}

fn tensor_proto(t: &Tensor, ext: &mut ExternalWriter) -> io::Result<pb::TensorProto> {
    let mut p = pb::TensorProto {
        dims: t.dims.clone(),
        data_type: Some(t.dtype.code()),
        segment: t.segment.as_ref().map(decode),
        name: opt_name(&t.name, false),
        doc_string: t.doc_string.clone(),
        metadata_props: entries(&t.metadata),
        ..Default::default()
    };
    if let Some(entries_out) = ext(t)? {
        p.external_data = entries(&entries_out);
        p.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        return Ok(p);
    }
    match &t.data {
        TensorData::Raw(b) | TensorData::External { bytes: b, .. } => p.raw_data = Some(b.clone()),
        TensorData::Typed(TypedData::F32(v)) => p.float_data = v.clone(),
        TensorData::Typed(TypedData::F64(v)) => p.double_data = v.clone(),
        TensorData::Typed(TypedData::I32(v)) => p.int32_data = v.clone(),
        TensorData::Typed(TypedData::I64(v)) => p.int64_data = v.clone(),
        TensorData::Typed(TypedData::U64(v)) => p.uint64_data = v.clone(),
        TensorData::Typed(TypedData::Str(v)) => p.string_data = v.clone(),
    }
    Ok(p)
}

fn type_proto(t: &Type) -> pb::TypeProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value as DV};
    match t {
        Type::Tensor {
            elem,
            shape,
            denotation,
        } => pb::TypeProto {
            denotation: denotation.clone(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem.map(|e| e.code()),
                shape: shape.as_ref().map(|dims| pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            denotation: d.denotation.clone(),
                            value: match &d.dim {
                                perqc_ir::Dim::Known(n) => Some(DV::DimValue(*n)),
                                perqc_ir::Dim::Sym(s) => Some(DV::DimParam(s.clone())),
                                perqc_ir::Dim::Unknown => None,
                            },
                        })
                        .collect(),
                }),
            })),
        },
        Type::Other(b) => decode(b),
    }
}
