//! ONNX protobuf -> IR.
//!
//! The model file is memory-mapped and decoded from the map, so `raw_data` payloads are
//! `Bytes` slices of it; external data files are mapped once each and sliced the same way.
//! A payload spanning whole pages owns its slice of the map ([`MappedPayload`]): when the
//! last `Bytes` of it is dropped (a pass replaced the tensor, the model was dropped), its
//! pages are given back, so a rewritten weight does not keep its original resident.
//! Nothing the IR does not interpret is dropped: it is kept verbatim (as encoded protobuf
//! where the IR has no type for it) and re-emitted by [`crate::export`].

use crate::error::LoadError;
use crate::proto as pb;
use crate::wire;
use bytes::Bytes;
use perqc_ir::{
    AttrValue, Attribute, DType, DeclaredDim, Dim, Graph, GraphError, InfoExtra, Model, NodeExtra,
    NodeSpec, OpsetImport, Tensor, TensorData, Type, TypedData, ValueDef, ValueId,
};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// The newest ONNX IR version the vendored schema describes. Newer models may carry fields
/// prost would silently drop, so loading them warns.
pub const MAX_IR_VERSION: i64 = pb::Version::IrVersion as i64;

/// A loaded model plus what the loader noticed but did not refuse.
pub struct Loaded {
    pub model: Model,
    pub warnings: Vec<String>,
    /// The file maps the model's payloads slice (model file and external data files).
    pub files: FileMaps,
}

impl Loaded {
    /// [`FileMaps::release`] on this model's maps.
    pub fn release(&self, tensor: &Tensor) {
        self.files.release(tensor);
    }
}

/// The read-only file maps a loaded model's payloads slice. Holding it keeps the maps
/// (not their pages) alive, so payload ranges can be read back after their tensors are
/// gone, and pages given back explicitly.
pub struct FileMaps {
    maps: Vec<Arc<memmap2::Mmap>>,
}

impl FileMaps {
    /// Drops the resident pages under a tensor's payload once its consumer has copied it (a
    /// runtime converting weights): a read-only file map re-reads them from the file if
    /// they are touched again, so this only lowers peak memory. Payloads not in a map of
    /// this model (typed fields, rewritten tensors) are left alone.
    pub fn release(&self, tensor: &Tensor) {
        let (TensorData::Raw(b) | TensorData::External { bytes: b, .. }) = &tensor.data else {
            return;
        };
        let (start, end) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len());
        for map in &self.maps {
            let base = map.as_ptr() as usize;
            if start < base || end > base + map.len() {
                continue;
            }
            release_pages(map, start - base, end - base);
            return;
        }
    }

    /// Where `tensor`'s payload lies in this model's file maps, if it does (raw or external
    /// data not replaced since loading): a handle that [`FileMaps::mapped_bytes`] reads back
    /// after the tensor itself is gone, as long as `self` lives.
    pub fn locate(&self, tensor: &Tensor) -> Option<MappedRange> {
        let (TensorData::Raw(b) | TensorData::External { bytes: b, .. }) = &tensor.data else {
            return None;
        };
        let start = b.as_ptr() as usize;
        self.maps.iter().enumerate().find_map(|(i, map)| {
            let base = map.as_ptr() as usize;
            (start >= base && start + b.len() <= base + map.len()).then(|| MappedRange {
                map: i,
                offset: start - base,
                len: b.len(),
            })
        })
    }

    /// The bytes at `range` (from [`FileMaps::locate`] on these maps); `None` for a range of
    /// other maps. Reading them faults the pages back in; [`FileMaps::release_range`]
    /// gives them back.
    pub fn mapped_bytes(&self, range: MappedRange) -> Option<&[u8]> {
        self.maps
            .get(range.map)?
            .get(range.offset..range.offset.checked_add(range.len)?)
    }

    /// Asks the kernel to read the mapped files into the page cache ahead of use
    /// (`MADV_WILLNEED`, asynchronous): for a caller that gave pages back
    /// ([`FileMaps::release`]) and is about to read most payloads again, one sequential
    /// read-ahead instead of a fault per page should the page cache have dropped them
    /// meanwhile. Maps no pages into the process (resident memory is unchanged); advice the
    /// kernel refuses is ignored.
    pub fn will_need(&self) {
        for map in &self.maps {
            let _ = map.advise(memmap2::Advice::WillNeed);
        }
    }

    /// Moves the payloads of `model`'s initializers that live on the heap (rewritten after
    /// loading: half weights upcast to f32) and hold at least `min_bytes` into one unlinked
    /// temporary file in `dir` (on disk: a tmpfs would keep them in memory), mapped
    /// read-only and added to these maps, so that
    /// [`FileMaps::release`] gives their pages back as it does the model file's (a
    /// calibration session copies the weights it runs on; without this the heap copy and
    /// the session's stay resident together). The values are the same bytes. Returns how
    /// many bytes moved.
    pub fn spill(
        &mut self,
        model: &mut Model,
        min_bytes: usize,
        dir: &Path,
    ) -> std::io::Result<usize> {
        use std::io::Write;
        let g = &mut model.graph;
        let heap: Vec<ValueId> = g
            .values()
            .filter(|(_, v)| v.def() == ValueDef::Initializer)
            .filter_map(|(id, v)| {
                let t = v.tensor.as_ref()?;
                let TensorData::Raw(b) = &t.data else {
                    return None;
                };
                (b.len() >= min_bytes && self.locate(t).is_none()).then_some(id)
            })
            .collect();
        if heap.is_empty() {
            return Ok(0);
        }
        // Each payload starts on a page, so releasing one never touches another.
        let mut file = std::io::BufWriter::new(tempfile::tempfile_in(dir)?);
        let mut spans = Vec::with_capacity(heap.len());
        let mut at = 0usize;
        for &v in &heap {
            let TensorData::Raw(b) = &g.value(v).tensor.as_ref().expect("filtered").data else {
                unreachable!("filtered");
            };
            let start = at.div_ceil(PAGE) * PAGE;
            file.write_all(&vec![0u8; start - at])?;
            file.write_all(b)?;
            spans.push((start, start + b.len()));
            at = start + b.len();
        }
        let file = file.into_inner().map_err(|e| e.into_error())?;
        // SAFETY: a private, unlinked file nobody else writes; read-only map.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file)? });
        for (&v, &(start, end)) in heap.iter().zip(&spans) {
            let payload = Bytes::from_owner(MappedPayload {
                map: map.clone(),
                start,
                end,
            });
            g.value_mut(v).tensor.as_mut().expect("filtered").data = TensorData::Raw(payload);
        }
        self.maps.push(map);
        Ok(spans.iter().map(|(s, e)| e - s).sum())
    }

    /// Drops the resident pages wholly inside `range` (see [`FileMaps::release`]).
    pub fn release_range(&self, range: MappedRange) {
        if let Some(map) = self.maps.get(range.map)
            && range.offset.saturating_add(range.len) <= map.len()
        {
            release_pages(map, range.offset, range.offset + range.len);
        }
    }
}

/// A payload's place in one of a loaded model's [`FileMaps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRange {
    map: usize,
    offset: usize,
    len: usize,
}

impl MappedRange {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Consecutive sub-ranges covering `self`, cut at multiples of `size` (rounded up to
    /// whole pages) from the map's start, so that every page wholly inside `self` lies
    /// wholly inside one piece: reading a large payload piece by piece, releasing each
    /// after use ([`FileMaps::release_range`]), keeps one piece resident at a time.
    pub fn pieces(self, size: usize) -> impl Iterator<Item = MappedRange> {
        let size = size.max(1).div_ceil(PAGE) * PAGE;
        let end = self.offset + self.len;
        let mut at = self.offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let next = ((at / size + 1) * size).min(end);
            let piece = MappedRange {
                map: self.map,
                offset: at,
                len: next - at,
            };
            at = next;
            Some(piece)
        })
    }
}

const PAGE: usize = 4096;

/// `MADV_DONTNEED` on the pages of `map` wholly inside bytes `start..end` (neighbouring
/// payloads may share the partial pages at either end).
fn release_pages(map: &memmap2::Mmap, start: usize, end: usize) {
    let first = start.div_ceil(PAGE) * PAGE;
    let last = end / PAGE * PAGE;
    if last > first {
        // SAFETY: the map is read-only and file-backed, so MADV_DONTNEED discards clean
        // pages that later accesses fault back in from the file unchanged; any `Bytes`
        // still reading them (another tensor on the same range) sees the same contents.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
        };
    }
}

/// One payload's slice of a file map, as the owner of that payload's `Bytes`: dropped with
/// the last `Bytes` of the payload, it gives the slice's whole pages back
/// ([`release_pages`]). Only payloads holding a whole page get one; smaller ones stay
/// plain slices of the file's `Bytes`.
struct MappedPayload {
    map: Arc<memmap2::Mmap>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MappedPayload {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

impl Drop for MappedPayload {
    fn drop(&mut self) {
        release_pages(&self.map, self.start, self.end);
    }
}

/// `bytes` as a [`MappedPayload`] of the map holding it, if one does and it spans a whole
/// page; else unchanged.
fn own_payload(maps: &[Arc<memmap2::Mmap>], bytes: Bytes) -> Bytes {
    if bytes.len() < 2 * PAGE {
        return bytes;
    }
    let start = bytes.as_ptr() as usize;
    for map in maps {
        let base = map.as_ptr() as usize;
        if start >= base && start + bytes.len() <= base + map.len() {
            return Bytes::from_owner(MappedPayload {
                map: map.clone(),
                start: start - base,
                end: start - base + bytes.len(),
            });
        }
    }
    bytes
}

/// A file map shared by the `Bytes` slices of it and by [`Loaded`].
struct SharedMap(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Loads `path` (and any external data next to it).
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let (bytes, map) = map_file(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    import(bytes, map.into_iter().collect(), path, &base)
}

/// Loads a model from `bytes`; `path` is only used in messages and `base_dir` resolves
/// external data locations.
pub fn load_bytes(bytes: Bytes, path: &Path, base_dir: &Path) -> Result<Loaded, LoadError> {
    import(bytes, Vec::new(), path, base_dir)
}

/// Decodes `bytes`, which `maps` (the model file's map, if any) hold.
fn import(
    bytes: Bytes,
    maps: Vec<Arc<memmap2::Mmap>>,
    path: &Path,
    base_dir: &Path,
) -> Result<Loaded, LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
        });
    }
    let proto = pb::ModelProto::decode(bytes.clone()).map_err(|e| {
        let place = match wire::first_fault(&bytes, &[7]) {
            Some((offset, what)) => format!(" at byte offset {offset}: {what}"),
            None => String::new(),
        };
        // Plain words first; the decoder's wire-format detail after.
        let e = e.to_string();
        let e = e
            .strip_prefix("failed to decode Protobuf message: ")
            .unwrap_or(&e);
        LoadError::Decode {
            path: path.to_path_buf(),
            detail: format!("the bytes do not decode as protobuf ({e}{place})"),
        }
    })?;
    let mut cx = Importer {
        path: path.to_path_buf(),
        base_dir: base_dir.to_path_buf(),
        files: HashMap::new(),
        maps,
        warnings: Vec::new(),
    };
    let model = cx.model(proto)?;
    Ok(Loaded {
        model,
        warnings: cx.warnings,
        files: FileMaps { maps: cx.maps },
    })
}

/// The file's bytes as a slice of a read-only map, and the map (`None` for an empty file).
fn map_file(path: &Path) -> std::io::Result<(Bytes, Option<Arc<memmap2::Mmap>>)> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok((Bytes::new(), None));
    }
    // SAFETY: the map is read-only; like every mmap-based loader we assume the file is not
    // truncated by another process while the model is in use.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let map = Arc::new(map);
    Ok((Bytes::from_owner(SharedMap(map.clone())), Some(map)))
}

struct Importer {
    path: PathBuf,
    base_dir: PathBuf,
    /// External data files, mapped once each.
    files: HashMap<PathBuf, Bytes>,
    maps: Vec<Arc<memmap2::Mmap>>,
    warnings: Vec<String>,
}

fn entries(v: Vec<pb::StringStringEntryProto>) -> Vec<(String, String)> {
    v.into_iter()
        .map(|e| (e.key.unwrap_or_default(), e.value.unwrap_or_default()))
        .collect()
}

fn encoded<M: Message>(m: &M) -> Bytes {
    m.encode_to_vec().into()
}

impl Importer {
    fn invalid(&self, place: impl Into<String>, detail: impl Into<String>) -> LoadError {
        LoadError::Invalid {
            path: self.path.clone(),
            place: place.into(),
            detail: detail.into(),
        }
    }

    fn graph_error(&self, graph: &str, e: GraphError) -> LoadError {
        self.invalid(format!("graph {graph}"), e.to_string())
    }

    fn model(&mut self, p: pb::ModelProto) -> Result<Model, LoadError> {
        if let Some(v) = p.ir_version
            && v > MAX_IR_VERSION
        {
            self.warnings.push(format!(
                "{}: IR version {v} is newer than the supported {MAX_IR_VERSION}; fields added since may be dropped",
                self.path.display()
            ));
        }
        let Some(graph) = p.graph else {
            return Err(LoadError::Decode {
                path: self.path.clone(),
                detail: "the file decodes as protobuf but holds no graph".into(),
            });
        };
        let graph = self.graph(graph, &HashSet::new())?.0;
        Ok(Model {
            ir_version: p.ir_version,
            opset_imports: p
                .opset_import
                .into_iter()
                .map(|o| OpsetImport {
                    domain: o.domain,
                    version: o.version,
                })
                .collect(),
            producer_name: p.producer_name,
            producer_version: p.producer_version,
            domain: p.domain,
            model_version: p.model_version,
            doc_string: p.doc_string,
            metadata: entries(p.metadata_props),
            graph,
            training_info: p.training_info.iter().map(encoded).collect(),
            functions: p.functions.iter().map(encoded).collect(),
            configuration: p.configuration.iter().map(encoded).collect(),
        })
    }

    /// Imports a graph. `outer` holds the names visible from enclosing graphs. Returns the
    /// graph and the outer names it reads (its captures, also declared as `Outer` values).
    fn graph(
        &mut self,
        p: pb::GraphProto,
        outer: &HashSet<String>,
    ) -> Result<(Graph, Vec<String>), LoadError> {
        let gname = p.name.clone().unwrap_or_default();
        let mut g = Graph::new(&gname);
        g.doc_string = p.doc_string;
        g.metadata = entries(p.metadata_props);
        g.sparse_initializers = p.sparse_initializer.iter().map(encoded).collect();
        g.quantization_annotation = p.quantization_annotation.iter().map(encoded).collect();

        // Every name this graph defines; a name read but not defined here is a capture.
        let mut local: HashSet<String> = HashSet::new();
        local.extend(p.input.iter().filter_map(|v| v.name.clone()));
        local.extend(p.initializer.iter().filter_map(|t| t.name.clone()));
        for n in &p.node {
            local.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
        }
        let mut visible = outer.clone();
        visible.extend(local.iter().cloned());

        for vi in p.input {
            let name = vi.name.clone().unwrap_or_default();
            let place = format!("graph {gname}, input {name}");
            let ty = self.value_type(vi.r#type.as_ref(), &place)?;
            let id = g
                .add_input(&name, ty)
                .map_err(|e| self.graph_error(&gname, e))?;
            g.value_mut(id).info = info(vi.doc_string, vi.metadata_props);
        }
        for t in p.initializer {
            let name = t.name.clone().unwrap_or_default();
            let tensor = self.tensor(t, &format!("graph {gname}, initializer {name}"))?;
            g.add_initializer(&name, tensor)
                .map_err(|e| self.graph_error(&gname, e))?;
        }

        let mut captures: Vec<String> = Vec::new();
        let capture = |g: &mut Graph, name: &str, captures: &mut Vec<String>| -> Option<ValueId> {
            if local.contains(name) {
                return Some(g.value_named(name));
            }
            if !outer.contains(name) {
                return None;
            }
            if g.find(name).is_none() {
                captures.push(name.to_string());
                g.add_outer(name).expect("name is not defined locally");
            }
            g.find(name)
        };

        for n in p.node {
            let op = n.op_type.clone().unwrap_or_default();
            let nname = n.name.clone().unwrap_or_default();
            let place = format!("graph {gname}, node {nname} ({op})");
            let mut inputs = Vec::with_capacity(n.input.len());
            for i in &n.input {
                if i.is_empty() {
                    inputs.push(None);
                    continue;
                }
                match capture(&mut g, i, &mut captures) {
                    Some(v) => inputs.push(Some(v)),
                    None => {
                        return Err(
                            self.invalid(place, format!("reads `{i}`, which nothing defines"))
                        );
                    }
                }
            }
            let mut attrs = Vec::with_capacity(n.attribute.len());
            let mut node_captures: Vec<String> = Vec::new();
            for a in n.attribute {
                let (attr, caps) = self.attribute(a, &visible, &place)?;
                for c in caps {
                    if !node_captures.contains(&c) {
                        node_captures.push(c);
                    }
                }
                attrs.push(attr);
            }
            let spec = NodeSpec {
                name: nname.clone(),
                op_type: op.clone(),
                domain: n.domain.clone().unwrap_or_default(),
                attrs,
                extra: NodeExtra {
                    doc_string: n.doc_string,
                    overload: n.overload,
                    metadata: entries(n.metadata_props),
                    device_configurations: n.device_configurations.iter().map(encoded).collect(),
                    empty_name_present: n.name.as_deref() == Some(""),
                    empty_domain_present: n.domain.as_deref() == Some(""),
                },
            };
            let outputs: Vec<&str> = n.output.iter().map(String::as_str).collect();
            let id = g
                .add_node(spec, &inputs, &outputs)
                .map_err(|e| self.invalid(place.clone(), e.to_string()))?;
            if !node_captures.is_empty() {
                let mut vals = Vec::new();
                for c in &node_captures {
                    match capture(&mut g, c, &mut captures) {
                        Some(v) => vals.push(v),
                        None => {
                            return Err(self.invalid(
                                place,
                                format!("a subgraph reads `{c}`, which nothing defines"),
                            ));
                        }
                    }
                }
                g.set_captures(id, vals);
            }
        }

        for vi in p.output {
            let name = vi.name.clone().unwrap_or_default();
            let place = format!("graph {gname}, output {name}");
            let Some(id) = capture(&mut g, &name, &mut captures) else {
                return Err(self.invalid(place, "is not defined"));
            };
            let ty = self.value_type(vi.r#type.as_ref(), &place)?;
            let v = g.value_mut(id);
            if ty.is_some() {
                v.ty = ty;
            }
            v.info = info(vi.doc_string, vi.metadata_props);
            g.outputs.push(id);
        }
        for vi in p.value_info {
            let name = vi.name.clone().unwrap_or_default();
            let place = format!("graph {gname}, value_info {name}");
            let ty = self.value_type(vi.r#type.as_ref(), &place)?;
            let Some(id) = g.find(&name) else {
                self.warnings.push(format!(
                    "{}: {place}: names no value of the graph; dropped",
                    self.path.display()
                ));
                continue;
            };
            let v = g.value_mut(id);
            v.ty = ty;
            v.info = info(vi.doc_string, vi.metadata_props);
            g.value_info.push(id);
        }

        // Forward references that were never defined.
        for (id, n) in g.nodes() {
            for v in n.inputs().iter().flatten() {
                if g.value(*v).def() == ValueDef::Undefined {
                    let _ = id;
                    return Err(self.invalid(
                        format!("graph {gname}, node {} ({})", n.name, n.op_type),
                        format!("reads `{}`, which nothing defines", g.value(*v).name),
                    ));
                }
            }
        }
        let before = g.node_order().to_vec();
        g.sort_topologically()
            .map_err(|e| self.graph_error(&gname, e))?;
        if g.node_order() != before {
            self.warnings.push(format!(
                "{}: graph {gname}: nodes were not in topological order; reordered",
                self.path.display()
            ));
        }
        Ok((g, captures))
    }

    fn attribute(
        &mut self,
        a: pb::AttributeProto,
        visible: &HashSet<String>,
        place: &str,
    ) -> Result<(Attribute, Vec<String>), LoadError> {
        use pb::attribute_proto::AttributeType as T;
        let name = a.name.clone().unwrap_or_default();
        let place = format!("{place}, attribute {name}");
        let mut caps = Vec::new();
        let mut sub = |me: &mut Self, g: pb::GraphProto| -> Result<Graph, LoadError> {
            let (graph, c) = me.graph(g, visible)?;
            caps.extend(c);
            Ok(graph)
        };
        let ty = match a.r#type {
            Some(t) => T::try_from(t)
                .map_err(|_| self.invalid(&place, format!("unknown attribute type {t}")))?,
            // IR < 2 models leave the type out; take the field that is set.
            None => infer_attr_type(&a),
        };
        let value = match ty {
            T::Float => AttrValue::Float(a.f.unwrap_or_default()),
            T::Int => AttrValue::Int(a.i.unwrap_or_default()),
            T::String => AttrValue::String(a.s.unwrap_or_default()),
            T::Tensor => AttrValue::Tensor(self.tensor(a.t.unwrap_or_default(), &place)?),
            T::Graph => AttrValue::Graph(Box::new(sub(self, a.g.unwrap_or_default())?)),
            T::SparseTensor => {
                AttrValue::SparseTensor(encoded(&a.sparse_tensor.unwrap_or_default()))
            }
            T::TypeProto => AttrValue::TypeProto(encoded(&a.tp.unwrap_or_default())),
            T::Floats => AttrValue::Floats(a.floats),
            T::Ints => AttrValue::Ints(a.ints),
            T::Strings => AttrValue::Strings(a.strings),
            T::Tensors => AttrValue::Tensors(
                a.tensors
                    .into_iter()
                    .map(|t| self.tensor(t, &place))
                    .collect::<Result<_, _>>()?,
            ),
            T::Graphs => AttrValue::Graphs(
                a.graphs
                    .into_iter()
                    .map(|g| sub(self, g))
                    .collect::<Result<_, _>>()?,
            ),
            T::SparseTensors => {
                AttrValue::SparseTensors(a.sparse_tensors.iter().map(encoded).collect())
            }
            T::TypeProtos => AttrValue::TypeProtos(a.type_protos.iter().map(encoded).collect()),
            T::Undefined => AttrValue::Undefined,
        };
        Ok((
            Attribute {
                name,
                value,
                doc_string: a.doc_string,
                ref_attr_name: a.ref_attr_name,
            },
            caps,
        ))
    }

    fn value_type(
        &self,
        t: Option<&pb::TypeProto>,
        place: &str,
    ) -> Result<Option<Type>, LoadError> {
        use pb::type_proto::Value as V;
        let Some(t) = t else { return Ok(None) };
        Ok(Some(match &t.value {
            Some(V::TensorType(tt)) => Type::Tensor {
                elem: match tt.elem_type {
                    None | Some(0) => None,
                    Some(code) => Some(DType::from_code(code).ok_or_else(|| {
                        self.invalid(place, format!("unknown element type {code}"))
                    })?),
                },
                shape: tt.shape.as_ref().map(|s| {
                    s.dim
                        .iter()
                        .map(|d| DeclaredDim {
                            dim: match &d.value {
                                Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) => {
                                    Dim::Known(*n)
                                }
                                Some(pb::tensor_shape_proto::dimension::Value::DimParam(s)) => {
                                    Dim::Sym(s.clone())
                                }
                                None => Dim::Unknown,
                            },
                            denotation: d.denotation.clone(),
                        })
                        .collect()
                }),
                denotation: t.denotation.clone(),
            },
            _ => Type::Other(encoded(t)),
        }))
    }

    fn tensor(&mut self, t: pb::TensorProto, place: &str) -> Result<Tensor, LoadError> {
        let code = t.data_type.unwrap_or(0);
        let dtype = DType::from_code(code).ok_or_else(|| {
            self.invalid(
                place,
                if code == 0 {
                    "tensor has no data_type".to_string()
                } else {
                    format!("unknown data_type {code}")
                },
            )
        })?;
        let external = t.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
        let data = if external {
            let entries = entries(t.external_data);
            let bytes = self.external(&entries, place)?;
            let bytes = own_payload(&self.maps, bytes);
            TensorData::External { entries, bytes }
        } else if let Some(raw) = t.raw_data {
            TensorData::Raw(own_payload(&self.maps, raw))
        } else {
            TensorData::Typed(typed_field(
                dtype,
                t.float_data,
                t.int32_data,
                t.string_data,
                t.int64_data,
                t.double_data,
                t.uint64_data,
            ))
        };
        let tensor = Tensor {
            name: t.name.unwrap_or_default(),
            dtype,
            dims: t.dims,
            data,
            doc_string: t.doc_string,
            metadata: entries(t.metadata_props),
            segment: t.segment.as_ref().map(encoded),
        };
        tensor
            .validate()
            .map_err(|e| self.invalid(place, e.to_string()))?;
        Ok(tensor)
    }

    /// The mapped bytes an `external_data` reference points at.
    fn external(&mut self, entries: &[(String, String)], place: &str) -> Result<Bytes, LoadError> {
        let get = |k: &str| {
            entries
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let Some(location) = get("location") else {
            return Err(self.invalid(place, "external data without a location"));
        };
        let rel = Path::new(location);
        if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(self.invalid(
                place,
                format!("external data location `{location}` must be a relative path inside the model's folder"),
            ));
        }
        let data_path = self.base_dir.join(rel);
        let ext_err = |me: &Self, detail: String| LoadError::ExternalData {
            path: me.path.clone(),
            place: place.to_string(),
            data_path: data_path.clone(),
            detail,
        };
        let parse = |me: &Self, k: &str| -> Result<Option<u64>, LoadError> {
            match get(k) {
                None => Ok(None),
                Some(s) => s
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| ext_err(me, format!("{k} `{s}` is not a non-negative integer"))),
            }
        };
        let offset = parse(self, "offset")?.unwrap_or(0);
        let length = parse(self, "length")?;
        if !self.files.contains_key(&data_path) {
            let (bytes, map) =
                map_file(&data_path).map_err(|e| ext_err(self, format!("cannot read: {e}")))?;
            self.maps.extend(map);
            self.files.insert(data_path.clone(), bytes);
        }
        let file = &self.files[&data_path];
        let size = file.len() as u64;
        let end = match length {
            Some(len) => offset.checked_add(len),
            None => Some(size),
        };
        match end {
            Some(end) if offset <= size && end <= size => {
                Ok(file.slice(offset as usize..end as usize))
            }
            _ => Err(ext_err(
                self,
                format!(
                    "offset {offset} + length {} runs past the end of the file ({size} bytes)",
                    length.map_or("(rest)".to_string(), |l| l.to_string())
                ),
            )),
        }
    }
}

fn info(doc_string: Option<String>, metadata: Vec<pb::StringStringEntryProto>) -> InfoExtra {
    InfoExtra {
        doc_string,
        metadata: entries(metadata),
    }
}

/// Picks the typed field ONNX stores `dtype` in (see [`TypedData`]).
fn typed_field(
    dtype: DType,
    f32s: Vec<f32>,
    i32s: Vec<i32>,
    strs: Vec<Bytes>,
    i64s: Vec<i64>,
    f64s: Vec<f64>,
    u64s: Vec<u64>,
) -> TypedData {
    use DType::*;
    match dtype {
        F32 | Complex64 => TypedData::F32(f32s),
        F64 | Complex128 => TypedData::F64(f64s),
        I64 => TypedData::I64(i64s),
        U32 | U64 => TypedData::U64(u64s),
        String => TypedData::Str(strs),
        _ => TypedData::I32(i32s),
    }
}

fn infer_attr_type(a: &pb::AttributeProto) -> pb::attribute_proto::AttributeType {
    use pb::attribute_proto::AttributeType as T;
    if a.f.is_some() {
        T::Float
    } else if a.i.is_some() {
        T::Int
    } else if a.s.is_some() {
        T::String
    } else if a.t.is_some() {
        T::Tensor
    } else if a.g.is_some() {
        T::Graph
    } else if !a.floats.is_empty() {
        T::Floats
    } else if !a.ints.is_empty() {
        T::Ints
    } else if !a.strings.is_empty() {
        T::Strings
    } else if !a.tensors.is_empty() {
        T::Tensors
    } else if !a.graphs.is_empty() {
        T::Graphs
    } else {
        T::Undefined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(name)
    }

    /// Payloads of a page or more own their slice of the map (raw data in the model file
    /// and external data alike); `locate` finds them, `mapped_bytes` reads them back after
    /// the tensors are dropped, piece by piece too; a tensor not in the maps is not found.
    #[test]
    fn mapped_payloads_are_located_and_read_back() {
        for name in ["llama_ts.onnx", "llama_dynamo.onnx"] {
            let loaded = load(&fixture(name)).unwrap();
            let files = loaded.files;
            let mut seen = Vec::new();
            for &v in &loaded.model.graph.initializers {
                let t = loaded.model.graph.value(v).tensor.as_ref().unwrap();
                let bytes = t.raw_bytes().unwrap().into_owned();
                match files.locate(t) {
                    Some(range) => {
                        assert_eq!(range.len(), bytes.len());
                        seen.push((range, bytes));
                    }
                    None => assert!(matches!(t.data, TensorData::Typed(_)), "{name}"),
                }
            }
            assert!(seen.iter().any(|(r, _)| r.len() >= 2 * PAGE), "{name}");
            drop(loaded.model);
            for (range, bytes) in &seen {
                assert_eq!(files.mapped_bytes(*range).unwrap(), &bytes[..]);
                let mut joined = Vec::new();
                let mut end = None;
                for piece in range.pieces(3 * PAGE) {
                    if let Some(e) = end {
                        assert_eq!(piece.offset, e, "contiguous");
                    }
                    assert!(
                        (piece.offset + piece.len) % (3 * PAGE) == 0
                            || piece.offset + piece.len == range.offset + range.len
                    );
                    end = Some(piece.offset + piece.len);
                    joined.extend_from_slice(files.mapped_bytes(piece).unwrap());
                    files.release_range(piece);
                }
                assert_eq!(&joined, bytes);
            }
            let other = Tensor::from_f32(vec![2], &[1.0, 2.0]);
            assert_eq!(files.locate(&other), None);
            let foreign = MappedRange {
                map: 9,
                offset: 0,
                len: 1,
            };
            assert_eq!(files.mapped_bytes(foreign), None);
            files.release_range(foreign);
        }
    }
}
