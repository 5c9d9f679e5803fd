//! A whole model: the main graph plus the model-level fields ONNX carries.

use crate::Graph;
use bytes::Bytes;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpsetImport {
    /// `None` when the model omits the field (the default domain).
    pub domain: Option<String>,
    pub version: Option<i64>,
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub ir_version: Option<i64>,
    pub opset_imports: Vec<OpsetImport>,
    pub producer_name: Option<String>,
    pub producer_version: Option<String>,
    pub domain: Option<String>,
    pub model_version: Option<i64>,
    pub doc_string: Option<String>,
    pub metadata: Vec<(String, String)>,
    pub graph: Graph,
    /// Encoded `TrainingInfoProto`s, `FunctionProto`s and `DeviceConfigurationProto`s:
    /// kept verbatim, not interpreted.
    pub training_info: Vec<Bytes>,
    pub functions: Vec<Bytes>,
    pub configuration: Vec<Bytes>,
}

impl Model {
    /// The opset version imported for `domain` (`""` and `"ai.onnx"` are the same domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let norm = |d: &str| if d == "ai.onnx" { "" } else { d }.to_string();
        let want = norm(domain);
        self.opset_imports
            .iter()
            .find(|o| norm(o.domain.as_deref().unwrap_or("")) == want)
            .and_then(|o| o.version)
    }
}
