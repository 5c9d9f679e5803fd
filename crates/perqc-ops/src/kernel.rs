//! Native kernels: the runtime tensor type, the kernel signature and its errors.
//!
//! A kernel is a plain function stored in an [`OpDef`](crate::OpDef) row. It reads the node's
//! attributes through [`KernelCtx`], gets its inputs as `Option<&RtTensor>` (`None` for an
//! omitted optional input) and returns one tensor per node result (trailing optional results
//! may be left out; the executor checks the count it needs).
//!
//! Invariant: kernels never panic on user data; shape or type mismatches are
//! [`KernelError`]s. Arrays are reference-counted (`ArcArray`), so view-like ops (Transpose,
//! Slice, Squeeze, Unsqueeze, Reshape of contiguous data, Identity) cost no copy.

use ndarray::{ArcArray, ArrayD, IxDyn};
use perqc_ir::{AttrValue, DType, Node, Tensor, TensorError};

/// A shared, copy-on-write n-d array.
pub type Arr<T> = ArcArray<T, IxDyn>;

/// A tensor at run time. Sub-byte integers are held one value per element (`I4` in `i8`,
/// `U4` in `u8`), so the variant carries the ONNX type and the array its values.
#[derive(Clone, Debug, PartialEq)]
pub enum RtTensor {
    F32(Arr<f32>),
    I64(Arr<i64>),
    I32(Arr<i32>),
    Bool(Arr<bool>),
    U8(Arr<u8>),
    I8(Arr<i8>),
    U4(Arr<u8>),
    I4(Arr<i8>),
    /// Half-precision floats are carried and cast; arithmetic kernels take f32.
    F16(Arr<half::f16>),
    BF16(Arr<half::bf16>),
}

/// Applies `$body` to the array inside any variant, rewrapping with the same variant.
#[macro_export]
#[doc(hidden)]
macro_rules! rt_map {
    ($t:expr, $a:ident => $body:expr) => {{
        use $crate::kernel::RtTensor as R;
        match $t {
            R::F32($a) => R::F32($body),
            R::I64($a) => R::I64($body),
            R::I32($a) => R::I32($body),
            R::Bool($a) => R::Bool($body),
            R::U8($a) => R::U8($body),
            R::I8($a) => R::I8($body),
            R::U4($a) => R::U4($body),
            R::I4($a) => R::I4($body),
            R::F16($a) => R::F16($body),
            R::BF16($a) => R::BF16($body),
        }
    }};
}

/// Applies `$body` to the array inside any variant (no rewrap).
#[macro_export]
#[doc(hidden)]
macro_rules! rt_with {
    ($t:expr, $a:ident => $body:expr) => {{
        use $crate::kernel::RtTensor as R;
        match $t {
            R::F32($a) => $body,
            R::I64($a) => $body,
            R::I32($a) => $body,
            R::Bool($a) => $body,
            R::U8($a) => $body,
            R::I8($a) => $body,
            R::U4($a) => $body,
            R::I4($a) => $body,
            R::F16($a) => $body,
            R::BF16($a) => $body,
        }
    }};
}

impl RtTensor {
    pub fn dtype(&self) -> DType {
        match self {
            RtTensor::F32(_) => DType::F32,
            RtTensor::I64(_) => DType::I64,
            RtTensor::I32(_) => DType::I32,
            RtTensor::Bool(_) => DType::Bool,
            RtTensor::U8(_) => DType::U8,
            RtTensor::I8(_) => DType::I8,
            RtTensor::U4(_) => DType::U4,
            RtTensor::I4(_) => DType::I4,
            RtTensor::F16(_) => DType::F16,
            RtTensor::BF16(_) => DType::BF16,
        }
    }

    pub fn shape(&self) -> &[usize] {
        rt_with!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        rt_with!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn f32(a: ArrayD<f32>) -> RtTensor {
        RtTensor::F32(a.into_shared())
    }

    pub fn i64(a: ArrayD<i64>) -> RtTensor {
        RtTensor::I64(a.into_shared())
    }

    pub fn bool(a: ArrayD<bool>) -> RtTensor {
        RtTensor::Bool(a.into_shared())
    }

    /// A 1-d i64 tensor.
    pub fn i64_vec(v: Vec<i64>) -> RtTensor {
        let n = v.len();
        RtTensor::i64(ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("1-d shape fits"))
    }

    pub fn as_f32(&self) -> Option<&Arr<f32>> {
        match self {
            RtTensor::F32(a) => Some(a),
            _ => None,
        }
    }

    /// Integer (or bool) elements as i64, in logical (row-major) order; `None` for floats.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            RtTensor::I64(a) => a.iter().copied().collect(),
            RtTensor::I32(a) => a.iter().map(|&v| v as i64).collect(),
            RtTensor::U8(a) | RtTensor::U4(a) => a.iter().map(|&v| v as i64).collect(),
            RtTensor::I8(a) | RtTensor::I4(a) => a.iter().map(|&v| v as i64).collect(),
            RtTensor::Bool(a) => a.iter().map(|&v| v as i64).collect(),
            RtTensor::F32(_) | RtTensor::F16(_) | RtTensor::BF16(_) => return None,
        })
    }

    /// The tensor as a constant (raw data, elements in logical row-major order; 4-bit
    /// types packed). The inverse of [`RtTensor::from_tensor`].
    pub fn to_tensor(&self) -> Result<Tensor, TensorError> {
        let dims: Vec<i64> = self.shape().iter().map(|&d| d as i64).collect();
        fn vals<T: Copy>(a: &Arr<T>) -> Vec<T> {
            a.iter().copied().collect()
        }
        Ok(match self {
            RtTensor::F32(a) => Tensor::from_slice(dims, &vals(a)),
            RtTensor::I64(a) => Tensor::from_slice(dims, &vals(a)),
            RtTensor::I32(a) => Tensor::from_slice(dims, &vals(a)),
            RtTensor::U8(a) => Tensor::from_slice(dims, &vals(a)),
            RtTensor::I8(a) => Tensor::from_slice(dims, &vals(a)),
            RtTensor::F16(a) => Tensor::from_slice(dims, &vals(a)),
            RtTensor::BF16(a) => Tensor::from_slice(dims, &vals(a)),
            RtTensor::Bool(a) => {
                let raw: Vec<u8> = a.iter().map(|&b| b as u8).collect();
                Tensor::from_raw(DType::Bool, dims, raw.into())
            }
            RtTensor::I4(a) => Tensor::from_int4(dims, &vals(a), true)?,
            RtTensor::U4(a) => {
                let v: Vec<i8> = a.iter().map(|&x| x as i8).collect();
                Tensor::from_int4(dims, &v, false)?
            }
        })
    }

    /// Converts a constant. Floats other than f32 and 16-bit / unsigned-wide integers are not
    /// runtime types in this slice.
    pub fn from_tensor(t: &Tensor) -> Result<RtTensor, KernelError> {
        let shape: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| KernelError::Tensor(TensorError::BadDims(t.dims.clone())))?;
        t.validate()?;
        let ix = IxDyn(&shape);
        let bad = |e: ndarray::ShapeError| KernelError::Invalid(e.to_string());
        let raw = t.raw_bytes()?;
        macro_rules! le {
            ($ty:ty, $n:expr) => {
                ArrayD::from_shape_vec(
                    ix,
                    raw.chunks_exact($n)
                        .map(|c| <$ty>::from_le_bytes(c.try_into().expect("chunk size")))
                        .collect(),
                )
                .map_err(bad)?
                .into_shared()
            };
        }
        Ok(match t.dtype {
            DType::F32 => RtTensor::F32(le!(f32, 4)),
            DType::I64 => RtTensor::I64(le!(i64, 8)),
            DType::I32 => RtTensor::I32(le!(i32, 4)),
            DType::U8 => RtTensor::U8(le!(u8, 1)),
            DType::I8 => RtTensor::I8(le!(i8, 1)),
            DType::F16 => RtTensor::F16(le!(half::f16, 2)),
            DType::BF16 => RtTensor::BF16(le!(half::bf16, 2)),
            DType::Bool => RtTensor::Bool(
                ArrayD::from_shape_vec(ix, raw.iter().map(|&b| b != 0).collect())
                    .map_err(bad)?
                    .into_shared(),
            ),
            DType::I4 | DType::U4 => {
                // Nibbles straight from the packed bytes (low nibble first), one byte each:
                // no wider temporary (a 4-bit embedding table is 28 M elements).
                let n = t.dims.iter().product::<i64>().max(0) as usize;
                let nibbles: Vec<u8> = match t.raw_bytes() {
                    Ok(raw) if raw.len() * 2 >= n => (0..n)
                        .map(|i| (raw[i / 2] >> ((i % 2) * 4)) & 0xF)
                        .collect(),
                    _ => t.to_i64()?.iter().map(|&x| x as u8 & 0xF).collect(),
                };
                if t.dtype == DType::I4 {
                    let signed = nibbles.into_iter().map(|b| ((b << 4) as i8) >> 4).collect();
                    RtTensor::I4(
                        ArrayD::from_shape_vec(ix, signed)
                            .map_err(bad)?
                            .into_shared(),
                    )
                } else {
                    RtTensor::U4(
                        ArrayD::from_shape_vec(ix, nibbles)
                            .map_err(bad)?
                            .into_shared(),
                    )
                }
            }
            other => return Err(KernelError::UnsupportedType(other)),
        })
    }
}

/// What a kernel sees of its node besides the inputs.
pub struct KernelCtx<'a> {
    pub node: &'a Node,
    /// The opset version of the node's domain.
    pub opset: i64,
    /// Threads the kernel may use (inside the executor's rayon pool).
    pub threads: usize,
    /// Runs the node's subgraphs (If/Loop/Scan bodies); `None` where none can run.
    pub subgraphs: Option<&'a dyn SubgraphRunner>,
}

/// Runs a body graph of the current node: `inputs` bind the body's inputs in order, and the
/// values the body reads from enclosing graphs are bound by the executor. Returns the body's
/// outputs in order.
pub trait SubgraphRunner: Sync {
    fn run(
        &self,
        graph: &perqc_ir::Graph,
        inputs: &[RtTensor],
    ) -> Result<Vec<RtTensor>, KernelError>;
}

impl KernelCtx<'_> {
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.node.attr_int(name).unwrap_or(default)
    }

    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.node.attr_float(name).unwrap_or(default)
    }

    pub fn ints(&self, name: &str) -> Option<&[i64]> {
        self.node.attr_ints(name)
    }

    pub fn string(&self, name: &str) -> Option<&[u8]> {
        self.node.attr_str(name)
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        match self.node.attr(name) {
            Some(AttrValue::Tensor(t)) => Some(t),
            _ => None,
        }
    }
}

/// Why a kernel failed. The executor adds the node name and op type.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("input {0} is required")]
    MissingInput(usize),
    #[error("input {index}: {dtype} is not supported here")]
    InputType { index: usize, dtype: DType },
    #[error("element type {0} is not supported by the runtime")]
    UnsupportedType(DType),
    #[error("shapes {a:?} and {b:?} do not broadcast")]
    Broadcast { a: Vec<usize>, b: Vec<usize> },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

impl From<ndarray::ShapeError> for KernelError {
    fn from(e: ndarray::ShapeError) -> Self {
        KernelError::Invalid(e.to_string())
    }
}

/// A native kernel: node attributes and inputs to results.
pub type KernelFn = fn(&KernelCtx<'_>, &[Option<&RtTensor>]) -> Result<Vec<RtTensor>, KernelError>;

/// Input `i`, which the op requires.
pub fn req<'a>(inputs: &[Option<&'a RtTensor>], i: usize) -> Result<&'a RtTensor, KernelError> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or(KernelError::MissingInput(i))
}

/// Input `i` if present.
pub fn opt<'a>(inputs: &[Option<&'a RtTensor>], i: usize) -> Option<&'a RtTensor> {
    inputs.get(i).copied().flatten()
}

/// Input `i` as f32.
pub fn req_f32<'a>(inputs: &[Option<&'a RtTensor>], i: usize) -> Result<&'a Arr<f32>, KernelError> {
    let t = req(inputs, i)?;
    t.as_f32().ok_or(KernelError::InputType {
        index: i,
        dtype: t.dtype(),
    })
}

/// Input `i` as a vector of integers (a shape, axes, indices...).
pub fn req_ints(inputs: &[Option<&RtTensor>], i: usize) -> Result<Vec<i64>, KernelError> {
    let t = req(inputs, i)?;
    t.to_i64_vec().ok_or(KernelError::InputType {
        index: i,
        dtype: t.dtype(),
    })
}

/// Normalizes a possibly negative axis against `rank`.
pub fn axis(a: i64, rank: usize) -> Result<usize, KernelError> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if (0..r).contains(&v) {
        Ok(v as usize)
    } else {
        Err(KernelError::Invalid(format!(
            "axis {a} out of range for rank {rank}"
        )))
    }
}

/// The numpy broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, KernelError> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        *o = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(KernelError::Broadcast {
                a: a.to_vec(),
                b: b.to_vec(),
            });
        };
    }
    Ok(out)
}

/// Outputs of at least this many bytes are backed by transparent huge pages.
const HUGE_OUTPUT_BYTES: usize = 4 << 20;

/// An empty `Vec` with capacity for `len` elements, to hold a kernel's output.
///
/// Buffers of 4 MiB and more are advised as transparent-huge-page candidates (Linux
/// `madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned part). Such buffers usually come fresh
/// from `mmap`, and writing them would otherwise take one page fault per 4 KiB: on
/// SmolLM2's 100 MB logits that was +120 ms on a 75 ms product. Where the advice is not
/// available (other systems, THP disabled) this is a plain `Vec::with_capacity`. f32
/// buffers of 32 MiB and more come from [`crate::pool`] when it holds one of that size.
pub fn output_vec<T: 'static>(len: usize) -> Vec<T> {
    if let Some(v) = crate::pool::take(len) {
        return v;
    }
    let v = Vec::with_capacity(len);
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_OUTPUT_BYTES {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) & !(HUGE - 1));
        if hi > lo {
            // Safety: advice only; [lo, hi) lies inside this allocation. The result is
            // ignored on purpose: without THP the buffer works the same, only slower.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
    v
}
