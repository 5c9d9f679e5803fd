//! Value types: tensor element type plus a symbolic shape.

use crate::DType;
use bytes::Bytes;
use std::fmt;

/// One dimension of a shape: a known size, a named symbol (`batch`), or unknown.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(i64),
    Sym(String),
    Unknown,
}

impl Dim {
    pub fn known(&self) -> Option<i64> {
        match self {
            Dim::Known(n) => Some(*n),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => write!(f, "{s}"),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A dimension as declared in the model, with its optional denotation kept for export.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeclaredDim {
    pub dim: Dim,
    pub denotation: Option<String>,
}

/// A (possibly partial) shape. `None` rank means nothing is known.
pub type Shape = Vec<Dim>;

/// The type of a value.
#[derive(Clone, Debug, PartialEq)]
pub enum Type {
    /// A dense tensor. `elem` is `None` when the model leaves it undefined (code 0);
    /// `shape` is `None` when the rank is unknown.
    Tensor {
        elem: Option<DType>,
        shape: Option<Vec<DeclaredDim>>,
        denotation: Option<String>,
    },
    /// Sequence, map, optional, sparse or opaque types: kept as the encoded `TypeProto`
    /// bytes, re-emitted unchanged. Passes treat such values as barriers.
    Other(Bytes),
}

impl Type {
    /// A tensor type with the given element type and dims, no denotations.
    pub fn tensor(elem: DType, shape: Option<Shape>) -> Type {
        Type::Tensor {
            elem: Some(elem),
            shape: shape.map(|s| {
                s.into_iter()
                    .map(|dim| DeclaredDim {
                        dim,
                        denotation: None,
                    })
                    .collect()
            }),
            denotation: None,
        }
    }

    pub fn elem(&self) -> Option<DType> {
        match self {
            Type::Tensor { elem, .. } => *elem,
            Type::Other(_) => None,
        }
    }

    /// The dims without denotations, if this is a tensor of known rank.
    pub fn shape(&self) -> Option<Shape> {
        match self {
            Type::Tensor {
                shape: Some(dims), ..
            } => Some(dims.iter().map(|d| d.dim.clone()).collect()),
            _ => None,
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Tensor { elem, shape, .. } => {
                match elem {
                    Some(e) => write!(f, "{e}")?,
                    None => f.write_str("?")?,
                }
                match shape {
                    None => f.write_str("[..]"),
                    Some(dims) => {
                        f.write_str("[")?;
                        for (i, d) in dims.iter().enumerate() {
                            if i > 0 {
                                f.write_str(", ")?;
                            }
                            write!(f, "{}", d.dim)?;
                        }
                        f.write_str("]")
                    }
                }
            }
            Type::Other(b) => write!(f, "opaque<{} B>", b.len()),
        }
    }
}
