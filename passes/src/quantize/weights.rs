//! A quantized weight into the graph, in one of two standard spellings:
//!
//! - **QDQ** (integer formats): the codes as a packed initializer `[K, N]` (INT4/UINT4 for up
//!   to 4 bits, INT8/UINT8 above; MXINT8's power-of-two scales are f32) with `DequantizeLinear` in front of the
//!   linear: per axis 1 (one scale per output channel), blocked along axis 0 (groups of `g`
//!   input rows, scale `[K/g, N]`), or per tensor. The linear then reads `x · DQ(W_q)`
//!   with transB = 0, the form ONNX Runtime fuses for weight-only graphs. FP4 and MXFP4
//!   codes are UINT4 bit patterns decoded by a 16-entry table (ONNX Runtime has no FP4
//!   `DequantizeLinear`): see `write_fp4`.
//! - **MatMulNBits** (`com.microsoft`, 4-bit integer groups of a power of two >= 16):
//!   ONNX Runtime's own 4-bit kernel; B is `[N, K/g, g/2]` bytes (low nibble first),
//!   unsigned codes with a zero point (the default 8 for symmetric codes `c + 8`).
//!
//! Either way `DQ(W_q)[k, n] = (code - zp) · scale` in f32: what `QWeight::value` gives.

use super::sites::Site;
use ndarray::Array2;
use perqc_ir::{AttrValue, DType, Graph, NodeId, NodeSpec, Tensor, ValueId};
use perqc_quant::{Format, Granularity, QWeight};

/// The float weight of `site` as `[N, K]` (rows = output channels), the layout quantizers
/// and GPTQ work in.
pub fn float_weight(graph: &Graph, site: &Site) -> Result<Array2<f32>, String> {
    let t = graph
        .const_tensor(site.weight)
        .ok_or_else(|| format!("{}: the weight is not a constant", site.name))?;
    let v = t
        .to_f32()
        .map_err(|e| format!("{}: reading the weight: {e}", site.name))?;
    let stored = Array2::from_shape_vec((t.dims[0] as usize, t.dims[1] as usize), v)
        .map_err(|e| format!("{}: {e}", site.name))?;
    Ok(if site.trans {
        stored
    } else {
        stored.t().as_standard_layout().into_owned()
    })
}

/// The element type codes of `q` are stored in.
fn code_dtype(q: &QWeight) -> DType {
    match (
        q.spec.format,
        q.spec.bits,
        q.spec.signed || q.spec.symmetric,
    ) {
        (Format::Fp4 | Format::MxFp4, _, _) => DType::F4E2M1,
        (_, b, true) if b <= 4 => DType::I4,
        (_, b, false) if b <= 4 => DType::U4,
        (_, _, true) => DType::I8,
        (_, _, false) => DType::U8,
    }
}

/// A tensor of `dtype` holding `values` (codes already in its range).
fn code_tensor(dims: Vec<i64>, values: &[i16], dtype: DType) -> Result<Tensor, String> {
    match dtype {
        DType::I4 | DType::U4 => {
            let v: Vec<i8> = values.iter().map(|&c| c as i8).collect();
            Tensor::from_int4(dims, &v, dtype == DType::I4).map_err(|e| e.to_string())
        }
        DType::F4E2M1 => {
            // E2M1 bit patterns, packed two per byte like the 4-bit integers.
            let raw: Vec<u8> = values
                .chunks(2)
                .map(|p| (p[0] as u8 & 0xF) | ((p.get(1).copied().unwrap_or(0) as u8 & 0xF) << 4))
                .collect();
            Ok(Tensor::from_raw(DType::F4E2M1, dims, raw.into()))
        }
        DType::I8 => {
            let v: Vec<i8> = values.iter().map(|&c| c as i8).collect();
            Ok(Tensor::from_slice(dims, &v))
        }
        _ => {
            let v: Vec<u8> = values.iter().map(|&c| c as u8).collect();
            Ok(Tensor::from_slice(dims, &v))
        }
    }
}

/// `src` (`rows x cols`, row-major) transposed.
fn transposed<T: Copy>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(src.len());
    for c in 0..cols {
        out.extend((0..rows).map(|r| src[r * cols + c]));
    }
    out
}

/// Adds an initializer with a fresh name derived from `base`.
fn add(graph: &mut Graph, base: &str, t: Tensor) -> Result<ValueId, String> {
    let name = graph.fresh_name(base);
    graph.add_initializer(&name, t).map_err(|e| e.to_string())
}

/// Points `site`'s linear at weight `w` (`[K, N]`, transB = 0).
fn read_weight(graph: &mut Graph, site: &Site, w: ValueId) -> Result<(), String> {
    let node = graph.node(site.node);
    let inputs = [node.input(0), Some(w), node.input(2)];
    let mut linear = NodeSpec::new("Linear").attr("transB", AttrValue::Int(0));
    linear.domain = perqc_ops::PERQC_DOMAIN.to_string();
    graph
        .set_op(site.node, linear, &inputs)
        .map_err(|e| e.to_string())
}

/// Adds node `op(inputs)` before `site`'s linear; returns its result.
fn node_before(
    graph: &mut Graph,
    site: &Site,
    spec: NodeSpec,
    inputs: &[ValueId],
    out: &str,
) -> Result<ValueId, String> {
    let out = graph.fresh_name(out);
    let ins: Vec<Option<ValueId>> = inputs.iter().map(|&v| Some(v)).collect();
    graph
        .insert_node_before(site.node, spec, &ins, &[out.as_str()])
        .map_err(|e| e.to_string())?;
    Ok(graph.find(&out).expect("just defined"))
}

/// FP4 weights (FP4 E2M1 codes with a float or OCP MX power-of-two scale per group).
/// ONNX Runtime (1.32) has no `DequantizeLinear` for FLOAT4E2M1, so the codes are stored
/// as UINT4 bit patterns and decoded by a 16-entry table:
/// `W = Reshape(Gather(E2M1, Cast(DQ(codes), int64)) ⊙ scale)` (the scale broadcast over
/// the groups of `g` input rows); the same values as `QWeight::value`, in 4 bits a weight.
fn write_fp4(graph: &mut Graph, site: &Site, q: &QWeight) -> Result<(), String> {
    let (k, n, g) = (site.k, site.n, q.group);
    let groups = k / g;
    let base = graph.value(site.weight).name.clone();
    let codes = code_tensor(
        vec![k as i64, n as i64],
        &transposed(&q.codes, n, k),
        DType::U4,
    )?;
    let codes = add(graph, &format!("{base}.fp4"), codes)?;
    let one = add(
        graph,
        &format!("{base}.one"),
        Tensor::from_slice(vec![], &[1f32]),
    )?;
    let lut = add(
        graph,
        "perqc.fp4_e2m1",
        Tensor::from_slice(vec![16], &perqc_quant::FP4_E2M1_VALUES),
    )?;
    let f = node_before(
        graph,
        site,
        NodeSpec::new("DequantizeLinear"),
        &[codes, one],
        &format!("{base}.fp4_codes"),
    )?;
    let cast = NodeSpec::new("Cast").attr("to", AttrValue::Int(DType::I64.code() as i64));
    let i = node_before(graph, site, cast, &[f], &format!("{base}.fp4_index"))?;
    let v = node_before(
        graph,
        site,
        NodeSpec::new("Gather"),
        &[lut, i],
        &format!("{base}.fp4_values"),
    )?;
    let w = if groups == 1 {
        let scale = add(
            graph,
            &format!("{base}.scale"),
            Tensor::from_slice(vec![n as i64], &transposed(&q.scales, n, 1)),
        )?;
        node_before(
            graph,
            site,
            NodeSpec::new("Mul"),
            &[v, scale],
            &format!("{base}.dequantized"),
        )?
    } else {
        let shape3 = add(
            graph,
            &format!("{base}.group_shape"),
            Tensor::from_i64(vec![3], &[groups as i64, g as i64, n as i64]),
        )?;
        let shape2 = add(
            graph,
            &format!("{base}.shape"),
            Tensor::from_i64(vec![2], &[k as i64, n as i64]),
        )?;
        let scale = add(
            graph,
            &format!("{base}.scale"),
            Tensor::from_slice(
                vec![groups as i64, 1, n as i64],
                &transposed(&q.scales, n, groups),
            ),
        )?;
        let r = node_before(
            graph,
            site,
            NodeSpec::new("Reshape"),
            &[v, shape3],
            &format!("{base}.fp4_groups"),
        )?;
        let m = node_before(
            graph,
            site,
            NodeSpec::new("Mul"),
            &[r, scale],
            &format!("{base}.fp4_scaled"),
        )?;
        node_before(
            graph,
            site,
            NodeSpec::new("Reshape"),
            &[m, shape2],
            &format!("{base}.dequantized"),
        )?
    };
    read_weight(graph, site, w)
}

/// `DequantizeLinear` of `q` (integer codes, `rows x cols` = output channels x inputs),
/// inserted before node `before`; returns its result. `transpose`: stored as `[cols,
/// rows]` (a linear's `[K, N]`: scales on axis 1, groups blocked along axis 0), else as
/// `[rows, cols]` (a table: scales on axis 0, groups blocked along axis 1). Per tensor: a
/// scalar scale.
fn dequantize_node(
    graph: &mut Graph,
    before: NodeId,
    base: &str,
    q: &QWeight,
    transpose: bool,
) -> Result<ValueId, String> {
    let (rows, cols, g) = (q.rows, q.cols, q.group);
    let groups = cols / g;
    let dtype = code_dtype(q);
    // Codes, and scales / zero points (`rows x groups` in `q`) in the stored layout.
    let layout = |v: &[i16], r: usize, c: usize| {
        if transpose {
            transposed(v, r, c)
        } else {
            v.to_vec()
        }
    };
    let (code_dims, codes) = if transpose {
        (vec![cols as i64, rows as i64], layout(&q.codes, rows, cols))
    } else {
        (vec![rows as i64, cols as i64], q.codes.clone())
    };
    let (dims, axis, block): (Vec<i64>, Option<i64>, Option<i64>) = match q.spec.granularity {
        Granularity::Tensor => (vec![], None, None),
        _ if groups == 1 => (vec![rows as i64], Some(transpose as i64), None),
        _ if transpose => (vec![groups as i64, rows as i64], Some(0), Some(g as i64)),
        _ => (vec![rows as i64, groups as i64], Some(1), Some(g as i64)),
    };
    let tensor = q.spec.granularity == Granularity::Tensor;
    let scales: Vec<f32> = match (tensor, transpose) {
        (true, _) => vec![q.scales[0]],
        (false, true) => transposed(&q.scales, rows, groups),
        (false, false) => q.scales.clone(),
    };
    let codes_v = add(
        graph,
        &format!("{base}.q"),
        code_tensor(code_dims, &codes, dtype)?,
    )?;
    let scale_v = add(
        graph,
        &format!("{base}.scale"),
        Tensor::from_slice(dims.clone(), &scales),
    )?;
    let zp_v = match &q.zero_points {
        Some(zp) => {
            let zp = if tensor {
                vec![zp[0]]
            } else {
                layout(zp, rows, groups)
            };
            Some(add(
                graph,
                &format!("{base}.zero_point"),
                code_tensor(dims, &zp, dtype)?,
            )?)
        }
        None => None,
    };
    let mut spec =
        NodeSpec::new("DequantizeLinear").named(&graph.fresh_name(&format!("{base}/dq")));
    if let Some(a) = axis {
        spec = spec.attr("axis", AttrValue::Int(a));
    }
    if let Some(b) = block {
        spec = spec.attr("block_size", AttrValue::Int(b));
    }
    let out = graph.fresh_name(&format!("{base}.dequantized"));
    graph
        .insert_node_before(
            before,
            spec,
            &[Some(codes_v), Some(scale_v), zp_v],
            &[out.as_str()],
        )
        .map_err(|e| e.to_string())?;
    Ok(graph.find(&out).expect("just defined"))
}

/// Replaces `site`'s weight by `DequantizeLinear(codes, scale, zp)` (see the module doc).
/// The original initializer stays while something else reads it (a tied embedding).
pub fn write_qdq(graph: &mut Graph, site: &Site, q: &QWeight) -> Result<(), String> {
    if matches!(q.spec.format, Format::Fp4 | Format::MxFp4) {
        return write_fp4(graph, site, q);
    }
    debug_assert_eq!((q.rows, q.cols), (site.n, site.k));
    let base = graph.value(site.weight).name.clone();
    let w = dequantize_node(graph, site.node, &base, q, true)?;
    read_weight(graph, site, w)
}

/// Removes initializer `w` if nothing reads it any more (the float weight a quantized one
/// replaced; a tied embedding keeps it).
pub fn drop_if_unread(graph: &mut Graph, w: ValueId) {
    if graph.value(w).uses().is_empty() && !graph.outputs.contains(&w) {
        // An initializer with no readers: removal cannot fail.
        let _ = graph.remove_initializer(w);
    }
}

/// Whether `q` can be written as `com.microsoft::MatMulNBits`, and why not.
pub fn nbits_fits(q: &QWeight) -> Result<(), String> {
    let g = q.group;
    if q.spec.format != Format::Int || q.spec.bits != 4 {
        return Err(format!("MatMulNBits holds 4-bit integers, not {}", q.spec));
    }
    if !matches!(q.spec.granularity, Granularity::Group(_)) || g < 16 || !g.is_power_of_two() {
        return Err(format!(
            "MatMulNBits needs groups of a power of two >= 16 along the input, not {}",
            q.spec
        ));
    }
    Ok(())
}

/// Replaces `site` by `com.microsoft::MatMulNBits(x, B, scales, zero_points?, -, bias?)`.
pub fn write_nbits(graph: &mut Graph, site: &Site, q: &QWeight) -> Result<(), String> {
    nbits_fits(q)?;
    let (k, n, g) = (site.k, site.n, q.group);
    let blocks = k / g;
    // Unsigned 4-bit codes: symmetric codes shift by the default zero point 8.
    let shift: i16 = if q.zero_points.is_none() { 8 } else { 0 };
    let signed_zp = q.spec.signed && q.zero_points.is_some();
    let mut packed = vec![0u8; n * blocks * g / 2];
    for r in 0..n {
        for c in 0..k {
            let mut u = q.codes[r * k + c] + shift;
            if signed_zp {
                u += 8;
            }
            let byte = (r * k + c) / 2;
            packed[byte] |= ((u as u8) & 0xF) << (4 * (c % 2));
        }
    }
    let base = graph.value(site.weight).name.clone();
    let b = Tensor::from_slice(vec![n as i64, blocks as i64, (g / 2) as i64], &packed);
    let b_v = add(graph, &format!("{base}.q4"), b)?;
    let s_v = add(
        graph,
        &format!("{base}.scales"),
        Tensor::from_slice(vec![(n * blocks) as i64], &q.scales),
    )?;
    let zp_v = match &q.zero_points {
        Some(zp) => {
            // [N, ceil(blocks / 2)] bytes, two blocks per byte, low nibble first.
            let per_row = blocks.div_ceil(2);
            let mut z = vec![0u8; n * per_row];
            for r in 0..n {
                for j in 0..blocks {
                    let v = zp[r * blocks + j] + if signed_zp { 8 } else { 0 };
                    z[r * per_row + j / 2] |= ((v as u8) & 0xF) << (4 * (j % 2));
                }
            }
            Some(add(
                graph,
                &format!("{base}.zero_points"),
                Tensor::from_slice(vec![(n * per_row) as i64], &z),
            )?)
        }
        None => None,
    };
    let node = graph.node(site.node);
    let (x, bias) = (node.input(0), node.input(2));
    let mut spec = NodeSpec::new("MatMulNBits")
        .attr("K", AttrValue::Int(k as i64))
        .attr("N", AttrValue::Int(n as i64))
        .attr("bits", AttrValue::Int(4))
        .attr("block_size", AttrValue::Int(g as i64));
    spec.domain = "com.microsoft".to_string();
    let mut inputs = vec![x, Some(b_v), Some(s_v), zp_v];
    if bias.is_some() {
        inputs.push(None); // g_idx
        inputs.push(bias);
    }
    graph
        .set_op(site.node, spec, &inputs)
        .map_err(|e| e.to_string())
}

/// Replaces the table `Gather` reads by `DequantizeLinear` of its codes: `q` is the table
/// as rows x cols (entries x width), scales per entry (`axis = 0`) or per group of `g`
/// along the width (`axis = 1, block_size = g`). Integer formats only (an FP4 table would
/// need the decode of `write_fp4` in front of a Gather; not done).
pub fn write_table(graph: &mut Graph, t: &super::sites::Table, q: &QWeight) -> Result<(), String> {
    if !matches!(q.spec.format, Format::Int | Format::MxInt8) {
        return Err(format!(
            "an embedding table is quantized to integers, not {}",
            q.spec
        ));
    }
    debug_assert_eq!((q.rows, q.cols), (t.rows, t.cols));
    let base = graph.value(t.table).name.clone();
    let w = dequantize_node(graph, t.node, &base, q, false)?;
    graph.set_input(t.node, 0, Some(w));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::transposed;

    #[test]
    fn transposes() {
        assert_eq!(
            transposed(&[1, 2, 3, 4, 5, 6], 2, 3),
            vec![1, 4, 2, 5, 3, 6]
        );
    }
}
