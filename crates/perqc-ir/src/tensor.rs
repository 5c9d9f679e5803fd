//! Constant tensor data, kept in the form it was stored in.
//!
//! Invariant: a tensor's payload is never copied on import. `Raw` and `External` hold
//! `Bytes` that slice the memory-mapped model or data file; they are materialized only when
//! a pass asks for typed values or rewrites the tensor.

use crate::DType;
use bytes::Bytes;
use half::{bf16, f16};
use std::borrow::Cow;

/// A constant tensor (an initializer, a `Constant` value, or a tensor attribute).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<i64>,
    pub data: TensorData,
    pub doc_string: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// Encoded `TensorProto.Segment`, if the model had one (kept, never interpreted).
    pub segment: Option<Bytes>,
}

/// Where a tensor's elements live.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Little-endian packed elements, the ONNX `raw_data` layout.
    Raw(Bytes),
    /// Elements stored in one of the typed repeated fields of `TensorProto`.
    Typed(TypedData),
    /// Elements in an external file; `bytes` is the mapped slice, `entries` the
    /// `external_data` key/value pairs as read (location, offset, length, checksum, ...).
    External {
        entries: Vec<(String, String)>,
        bytes: Bytes,
    },
}

/// The typed repeated fields of `TensorProto`, following its storage rules: `I32` carries
/// every type of 16 bits or fewer (half floats as bit patterns, sub-byte types as one packed
/// byte per entry), `U64` carries u32 and u64, `F32` f32 and complex64, `F64` f64 and
/// complex128.
#[derive(Clone, Debug, PartialEq)]
pub enum TypedData {
    F32(Vec<f32>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    F64(Vec<f64>),
    Str(Vec<Bytes>),
}

/// Why a tensor's payload does not fit its declared type and shape.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("negative or overflowing dims {0:?}")]
    BadDims(Vec<i64>),
    #[error("payload has {got} bytes, {dtype}{dims:?} needs {want}")]
    RawLength {
        dtype: DType,
        dims: Vec<i64>,
        got: u64,
        want: u64,
    },
    #[error("typed field has {got} entries, {dtype}{dims:?} needs {want}")]
    TypedLength {
        dtype: DType,
        dims: Vec<i64>,
        got: u64,
        want: u64,
    },
    #[error("{dtype} data cannot be stored in that typed field")]
    TypedField { dtype: DType },
    #[error("{0} tensors have no numeric value")]
    NotNumeric(DType),
    #[error("tensor is {got}, asked for {want}")]
    WrongType { want: DType, got: DType },
    #[error("{values} values do not fill dims {dims:?}")]
    Count { dims: Vec<i64>, values: usize },
    #[error("{value} is outside the {dtype} range")]
    OutOfRange { dtype: DType, value: i64 },
}

/// An element type stored one per `size_of::<Self>()` little-endian bytes in ONNX raw
/// layout. Sub-byte types are not elements: see [`Tensor::from_int4`].
pub trait Element: Copy + Sized {
    const DTYPE: DType;
    const SIZE: usize;
    /// The little-endian bytes into `out`, exactly `SIZE` long.
    fn write(self, out: &mut [u8]);
    fn get(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn write(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("element-sized chunk"))
            }
        }
    };
}
element!(f32, F32);
element!(f64, F64);
element!(f16, F16);
element!(bf16, BF16);
element!(i8, I8);
element!(u8, U8);
element!(i32, I32);
element!(i64, I64);

impl Tensor {
    /// A tensor with `Raw` data and no name.
    pub fn from_raw(dtype: DType, dims: Vec<i64>, raw: Bytes) -> Tensor {
        Tensor {
            name: String::new(),
            dtype,
            dims,
            data: TensorData::Raw(raw),
            doc_string: None,
            metadata: Vec::new(),
            segment: None,
        }
    }

    pub fn from_f32(dims: Vec<i64>, values: &[f32]) -> Tensor {
        Tensor::from_slice(dims, values)
    }

    pub fn from_i64(dims: Vec<i64>, values: &[i64]) -> Tensor {
        Tensor::from_slice(dims, values)
    }

    /// A raw tensor of `T` elements. The caller guarantees `values` fills `dims` (see
    /// [`Tensor::validate`]; [`crate::Graph::replace_initializer`] checks it).
    pub fn from_slice<T: Element>(dims: Vec<i64>, values: &[T]) -> Tensor {
        let mut raw = vec![0u8; values.len() * T::SIZE];
        // Fixed-size chunks, so the copies compile to plain moves (a byte-wise `put` into a
        // growing Vec does not).
        for (out, &v) in raw.chunks_exact_mut(T::SIZE).zip(values) {
            v.write(out);
        }
        Tensor::from_raw(T::DTYPE, dims, raw.into())
    }

    /// The elements as `T`, which must be the tensor's element type (no conversion; see
    /// [`Tensor::to_f32`] and [`Tensor::to_i64`] for converting reads).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, TensorError> {
        if self.dtype != T::DTYPE {
            return Err(TensorError::WrongType {
                want: T::DTYPE,
                got: self.dtype,
            });
        }
        self.validate()?;
        Ok(self
            .raw_bytes()?
            .chunks_exact(T::SIZE)
            .map(T::get)
            .collect())
    }

    /// A packed 4-bit tensor (`I4` when `signed`, else `U4`): two elements per byte, the
    /// first in the low nibble, an odd count padded with a zero nibble (the ONNX layout).
    /// Values must lie in -8..=7 (signed) or 0..=15.
    pub fn from_int4(dims: Vec<i64>, values: &[i8], signed: bool) -> Result<Tensor, TensorError> {
        let dtype = if signed { DType::I4 } else { DType::U4 };
        let range = if signed { -8..=7 } else { 0..=15 };
        if let Some(&v) = values.iter().find(|v| !range.contains(*v)) {
            return Err(TensorError::OutOfRange {
                dtype,
                value: v as i64,
            });
        }
        let raw: Vec<u8> = values
            .chunks(2)
            .map(|p| (p[0] as u8 & 0xF) | ((p.get(1).copied().unwrap_or(0) as u8 & 0xF) << 4))
            .collect();
        let t = Tensor::from_raw(dtype, dims, raw.into());
        if t.numel() != Some(values.len() as u64) {
            return Err(TensorError::Count {
                dims: t.dims,
                values: values.len(),
            });
        }
        Ok(t)
    }

    /// Number of elements, `None` if a dim is negative or the product overflows.
    pub fn numel(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| {
            u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    }

    /// Checks that the payload holds exactly the elements the dtype and dims call for.
    pub fn validate(&self) -> Result<(), TensorError> {
        let numel = self
            .numel()
            .ok_or_else(|| TensorError::BadDims(self.dims.clone()))?;
        let raw_want = |got: usize| -> Result<(), TensorError> {
            let want = self
                .dtype
                .raw_len(numel)
                .ok_or(TensorError::NotNumeric(self.dtype))?;
            if got as u64 != want {
                return Err(TensorError::RawLength {
                    dtype: self.dtype,
                    dims: self.dims.clone(),
                    got: got as u64,
                    want,
                });
            }
            Ok(())
        };
        match &self.data {
            TensorData::Raw(b) | TensorData::External { bytes: b, .. } => {
                if self.dtype == DType::String {
                    return Err(TensorError::NotNumeric(DType::String));
                }
                raw_want(b.len())
            }
            TensorData::Typed(t) => {
                let want = typed_entries(self.dtype, numel)?;
                let (field_ok, got) = typed_field_fits(self.dtype, t);
                if !field_ok {
                    return Err(TensorError::TypedField { dtype: self.dtype });
                }
                if got as u64 != want {
                    return Err(TensorError::TypedLength {
                        dtype: self.dtype,
                        dims: self.dims.clone(),
                        got: got as u64,
                        want,
                    });
                }
                Ok(())
            }
        }
    }

    /// The payload in ONNX `raw_data` layout: borrowed for raw and external data, converted
    /// for typed fields. Assumes [`Tensor::validate`] passed.
    pub fn raw_bytes(&self) -> Result<Cow<'_, [u8]>, TensorError> {
        match &self.data {
            TensorData::Raw(b) | TensorData::External { bytes: b, .. } => Ok(Cow::Borrowed(b)),
            TensorData::Typed(t) => typed_to_raw(self.dtype, t).map(Cow::Owned),
        }
    }

    /// All elements converted to f32 (floats by value, integers and bools by cast).
    pub fn to_f32(&self) -> Result<Vec<f32>, TensorError> {
        let raw = self.raw_bytes()?;
        decode_elements(
            self.dtype,
            &raw,
            self.numel().unwrap_or(0) as usize,
            |e| match e {
                Elem::F(v) => v as f32,
                Elem::I(v) => v as f32,
                Elem::U(v) => v as f32,
            },
        )
    }

    /// All elements converted to i64 (floats truncate toward zero).
    pub fn to_i64(&self) -> Result<Vec<i64>, TensorError> {
        let raw = self.raw_bytes()?;
        decode_elements(
            self.dtype,
            &raw,
            self.numel().unwrap_or(0) as usize,
            |e| match e {
                Elem::F(v) => v as i64,
                Elem::I(v) => v,
                Elem::U(v) => v as i64,
            },
        )
    }

    /// Payload size in bytes in raw layout (what an external-data file would hold).
    pub fn byte_len(&self) -> u64 {
        match &self.data {
            TensorData::Raw(b) | TensorData::External { bytes: b, .. } => b.len() as u64,
            TensorData::Typed(_) => self
                .numel()
                .and_then(|n| self.dtype.raw_len(n))
                .unwrap_or(0),
        }
    }
}

enum Elem {
    F(f64),
    I(i64),
    U(u64),
}

fn decode_elements<T>(
    dtype: DType,
    raw: &[u8],
    numel: usize,
    conv: impl Fn(Elem) -> T,
) -> Result<Vec<T>, TensorError> {
    use DType::*;
    macro_rules! le {
        ($t:ty, $n:expr, $wrap:expr) => {
            raw.chunks_exact($n)
                .map(|c| conv($wrap(<$t>::from_le_bytes(c.try_into().unwrap()))))
                .collect()
        };
    }
    let out: Vec<T> = match dtype {
        F32 => le!(f32, 4, |v: f32| Elem::F(v as f64)),
        F64 => le!(f64, 8, Elem::F),
        F16 => le!(u16, 2, |v| Elem::F(f16::from_bits(v).to_f64())),
        BF16 => le!(u16, 2, |v| Elem::F(bf16::from_bits(v).to_f64())),
        I8 => le!(i8, 1, |v: i8| Elem::I(v as i64)),
        U8 => le!(u8, 1, |v: u8| Elem::U(v as u64)),
        Bool => le!(u8, 1, |v: u8| Elem::U((v != 0) as u64)),
        I16 => le!(i16, 2, |v: i16| Elem::I(v as i64)),
        U16 => le!(u16, 2, |v: u16| Elem::U(v as u64)),
        I32 => le!(i32, 4, |v: i32| Elem::I(v as i64)),
        U32 => le!(u32, 4, |v: u32| Elem::U(v as u64)),
        I64 => le!(i64, 8, Elem::I),
        U64 => le!(u64, 8, Elem::U),
        I4 | U4 => (0..numel)
            .map(|i| {
                let nib = (raw[i / 2] >> ((i % 2) * 4)) & 0xF;
                if dtype == I4 {
                    conv(Elem::I(((nib as i8) << 4 >> 4) as i64))
                } else {
                    conv(Elem::U(nib as u64))
                }
            })
            .collect(),
        other => return Err(TensorError::NotNumeric(other)),
    };
    Ok(out)
}

/// How many typed-field entries `numel` elements of `dtype` take.
fn typed_entries(dtype: DType, numel: u64) -> Result<u64, TensorError> {
    use DType::*;
    Ok(match dtype {
        Complex64 | Complex128 => numel * 2,
        String | F6E2M3 | F6E3M2 => numel,
        d if d.bits().is_some_and(|b| b < 8) => d.raw_len(numel).unwrap_or(0),
        _ => numel,
    })
}

fn typed_field_fits(dtype: DType, t: &TypedData) -> (bool, usize) {
    use DType::*;
    match t {
        TypedData::F32(v) => (matches!(dtype, F32 | Complex64), v.len()),
        TypedData::F64(v) => (matches!(dtype, F64 | Complex128), v.len()),
        TypedData::I64(v) => (dtype == I64, v.len()),
        TypedData::U64(v) => (matches!(dtype, U32 | U64), v.len()),
        TypedData::Str(v) => (dtype == String, v.len()),
        TypedData::I32(v) => (
            dtype.bits().is_some_and(|b| b <= 16) || dtype == I32,
            v.len(),
        ),
    }
}

fn typed_to_raw(dtype: DType, t: &TypedData) -> Result<Vec<u8>, TensorError> {
    let bits = dtype.bits().ok_or(TensorError::NotNumeric(dtype))?;
    Ok(match t {
        TypedData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TypedData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TypedData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TypedData::U64(v) if bits == 32 => {
            v.iter().flat_map(|x| (*x as u32).to_le_bytes()).collect()
        }
        TypedData::U64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TypedData::I32(v) => match bits {
            32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            16 => v.iter().flat_map(|x| (*x as u16).to_le_bytes()).collect(),
            // 8-bit types one per entry; sub-byte types one packed byte per entry.
            _ => v.iter().map(|x| *x as u8).collect(),
        },
        TypedData::Str(_) => return Err(TensorError::NotNumeric(dtype)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(dtype: DType, dims: Vec<i64>, t: TypedData) -> Tensor {
        Tensor {
            data: TensorData::Typed(t),
            ..Tensor::from_raw(dtype, dims, Bytes::new())
        }
    }

    #[test]
    fn typed_and_raw_agree() {
        let t = typed(DType::F16, vec![2], TypedData::I32(vec![0x3c00, 0xc000]));
        t.validate().unwrap();
        assert_eq!(t.to_f32().unwrap(), vec![1.0, -2.0]);
        let raw = Tensor::from_raw(
            DType::F16,
            vec![2],
            t.raw_bytes().unwrap().into_owned().into(),
        );
        assert_eq!(raw.to_f32().unwrap(), vec![1.0, -2.0]);
    }

    #[test]
    fn int4_unpacks_low_nibble_first() {
        let t = Tensor::from_raw(DType::I4, vec![3], Bytes::from_static(&[0xF7, 0x08]));
        t.validate().unwrap();
        assert_eq!(t.to_i64().unwrap(), vec![7, -1, -8]);
        let u = typed(DType::U4, vec![3], TypedData::I32(vec![0xF7, 0x08]));
        u.validate().unwrap();
        assert_eq!(u.to_i64().unwrap(), vec![7, 15, 8]);
    }

    #[test]
    fn length_mismatch_is_reported() {
        let t = Tensor::from_raw(DType::F32, vec![2, 3], Bytes::from_static(&[0; 20]));
        assert!(matches!(
            t.validate(),
            Err(TensorError::RawLength {
                got: 20,
                want: 24,
                ..
            })
        ));
        let t = typed(DType::I64, vec![2], TypedData::F32(vec![1.0, 2.0]));
        assert_eq!(
            t.validate(),
            Err(TensorError::TypedField { dtype: DType::I64 })
        );
    }

    #[test]
    fn elements_round_trip() {
        let t = Tensor::from_slice(vec![2], &[f16::from_f32(1.5), f16::from_f32(-2.0)]);
        assert_eq!(t.dtype, DType::F16);
        assert_eq!(t.to_f32().unwrap(), vec![1.5, -2.0]);
        assert_eq!(t.to_vec::<f16>().unwrap()[1], f16::from_f32(-2.0));
        let b = Tensor::from_slice(vec![1, 2], &[bf16::from_f32(3.0), bf16::from_f32(0.5)]);
        assert_eq!(b.to_f32().unwrap(), vec![3.0, 0.5]);
        let i = Tensor::from_slice(vec![3], &[-128i8, 0, 127]);
        assert_eq!(i.to_vec::<i8>().unwrap(), vec![-128, 0, 127]);
        assert_eq!(
            i.to_vec::<u8>(),
            Err(TensorError::WrongType {
                want: DType::U8,
                got: DType::I8
            })
        );
    }

    #[test]
    fn int4_packs_low_nibble_first() {
        let t = Tensor::from_int4(vec![3], &[7, -1, -8], true).unwrap();
        assert_eq!(t.raw_bytes().unwrap().as_ref(), &[0xF7, 0x08]);
        assert_eq!(t.to_i64().unwrap(), vec![7, -1, -8]);
        let u = Tensor::from_int4(vec![2, 2], &[0, 15, 8, 1], false).unwrap();
        assert_eq!(u.to_i64().unwrap(), vec![0, 15, 8, 1]);
        assert_eq!(
            Tensor::from_int4(vec![1], &[8], true),
            Err(TensorError::OutOfRange {
                dtype: DType::I4,
                value: 8
            })
        );
        assert!(matches!(
            Tensor::from_int4(vec![4], &[1, 2, 3], true),
            Err(TensorError::Count { .. })
        ));
    }

    #[test]
    fn bf16_and_bool() {
        let t = typed(DType::BF16, vec![1], TypedData::I32(vec![0x4049]));
        assert!((t.to_f32().unwrap()[0] - 3.140625).abs() < 1e-6);
        let b = Tensor::from_raw(DType::Bool, vec![2], Bytes::from_static(&[0, 1]));
        assert_eq!(b.to_i64().unwrap(), vec![0, 1]);
    }
}
