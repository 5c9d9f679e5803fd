//! A minimal `.npy` (format 1.0) reader and writer for runtime tensors, so tests and tools
//! can exchange inputs and outputs with numpy / ONNX Runtime.
//!
//! Layout: magic `\x93NUMPY`, version 1.0, a little-endian u16 header length, a Python
//! dict literal `{'descr': '<f4', 'fortran_order': False, 'shape': (..), }` padded with
//! spaces and a newline so the data starts at a multiple of 64 bytes, then row-major data.

use ndarray::{ArrayD, IxDyn};
use perqc_ops::RtTensor;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a supported .npy file: {what}")]
    Format { path: String, what: String },
    #[error("{0} tensors cannot be written as .npy")]
    Type(perqc_ir::DType),
}

fn descr(t: &RtTensor) -> Result<&'static str, NpyError> {
    Ok(match t {
        RtTensor::F32(_) => "<f4",
        RtTensor::F16(_) => "<f2",
        RtTensor::I64(_) => "<i8",
        RtTensor::I32(_) => "<i4",
        RtTensor::Bool(_) => "|b1",
        RtTensor::U8(_) => "|u1",
        RtTensor::I8(_) => "|i1",
        other => return Err(NpyError::Type(other.dtype())),
    })
}

/// Writes `t` to `path` as a row-major `.npy` file.
pub fn write_npy(path: &Path, t: &RtTensor) -> Result<(), NpyError> {
    let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        descr(t)?
    );
    // 10 bytes of preamble + header + '\n' must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.len() * 8);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match t {
        RtTensor::F32(a) => a
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        RtTensor::F16(a) => a
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        RtTensor::I64(a) => a
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        RtTensor::I32(a) => a
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        RtTensor::Bool(a) => a.iter().for_each(|&v| out.push(v as u8)),
        RtTensor::U8(a) => out.extend(a.iter().copied()),
        RtTensor::I8(a) => out.extend(a.iter().map(|&v| v as u8)),
        other => return Err(NpyError::Type(other.dtype())),
    }
    std::fs::write(path, out).map_err(|source| NpyError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a little-endian, C-order `.npy` file of f32, f16, i64, i32, bool, u8 or i8.
pub fn read_npy(path: &Path) -> Result<RtTensor, NpyError> {
    let p = path.display().to_string();
    let fmt = |what: &str| NpyError::Format {
        path: p.clone(),
        what: what.to_string(),
    };
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
        path: p.clone(),
        source,
    })?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(fmt("bad magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(fmt("unknown version")),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| fmt("truncated header"))?;
    if header.contains("'fortran_order': True") {
        return Err(fmt("fortran order"));
    }
    let field = |key: &str| -> Option<&str> {
        let at = header.find(key)? + key.len();
        Some(header[at..].trim_start_matches([':', ' ']))
    };
    let d = field("'descr'")
        .and_then(|s| s.get(1..4))
        .ok_or_else(|| fmt("no descr"))?;
    let sh = field("'shape'").ok_or_else(|| fmt("no shape"))?;
    let sh = &sh[1..sh.find(')').ok_or_else(|| fmt("bad shape"))?];
    let shape: Vec<usize> = sh
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| fmt("bad shape")))
        .collect::<Result<_, _>>()?;
    let data = &bytes[start + hlen..];
    let ix = IxDyn(&shape);
    macro_rules! le {
        ($ty:ty, $n:expr) => {
            ArrayD::from_shape_vec(
                ix,
                data.chunks_exact($n)
                    .map(|c| <$ty>::from_le_bytes(c.try_into().expect("chunk size")))
                    .collect(),
            )
            .map_err(|e| fmt(&e.to_string()))?
            .into_shared()
        };
    }
    Ok(match d {
        "<f4" => RtTensor::F32(le!(f32, 4)),
        "<f2" => RtTensor::F16(le!(half::f16, 2)),
        "<i8" => RtTensor::I64(le!(i64, 8)),
        "<i4" => RtTensor::I32(le!(i32, 4)),
        "|b1" => RtTensor::Bool(
            ArrayD::from_shape_vec(ix, data.iter().map(|&b| b != 0).collect())
                .map_err(|e| fmt(&e.to_string()))?
                .into_shared(),
        ),
        "|u1" => RtTensor::U8(le!(u8, 1)),
        "|i1" => RtTensor::I8(le!(i8, 1)),
        other => return Err(fmt(&format!("dtype {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn every_written_type_reads_back() {
        let dir = std::env::temp_dir().join(format!("perqc-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.5f32, -1.0, 2.25, 3.0, 1e-3, -7.5])
            .unwrap();
        for (k, t) in [
            RtTensor::f32(f.clone()),
            RtTensor::F16(f.mapv(half::f16::from_f32).into_shared()),
            RtTensor::i64(f.mapv(|v| v as i64)),
            RtTensor::I8(f.mapv(|v| v as i8).into_shared()),
        ]
        .into_iter()
        .enumerate()
        {
            let p = dir.join(format!("{k}.npy"));
            write_npy(&p, &t).unwrap();
            let back = read_npy(&p).unwrap();
            assert_eq!(back.dtype(), t.dtype());
            assert_eq!(back.shape(), t.shape());
            assert_eq!(format!("{back:?}"), format!("{t:?}"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
