//! A protobuf wire-format scanner, used only to say *where* a file that prost refused to
//! decode goes wrong (prost reports what, not at which byte).

/// The byte offset of the first malformed field at the top level of `buf`, or inside the
/// length-delimited field `descend` (the graph of a ModelProto), with a description.
pub fn first_fault(buf: &[u8], descend: &[u32]) -> Option<(usize, String)> {
    scan(buf, 0, buf.len(), descend, 0)
}

fn varint(buf: &[u8], mut pos: usize, end: usize) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        if pos >= end || shift >= 64 {
            return None;
        }
        let b = buf[pos];
        pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some((value, pos));
        }
    }
    None
}

fn scan(
    buf: &[u8],
    start: usize,
    end: usize,
    descend: &[u32],
    depth: usize,
) -> Option<(usize, String)> {
    let mut pos = start;
    while pos < end {
        let field_start = pos;
        let Some((key, p)) = varint(buf, pos, end) else {
            return Some((field_start, "truncated field key".into()));
        };
        pos = p;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        if field == 0 {
            return Some((field_start, "field number 0".into()));
        }
        match wire {
            0 => match varint(buf, pos, end) {
                Some((_, p)) => pos = p,
                None => return Some((field_start, format!("field {field}: truncated varint"))),
            },
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if pos + n > end {
                    return Some((
                        field_start,
                        format!("field {field}: truncated fixed-width value"),
                    ));
                }
                pos += n;
            }
            2 => {
                let Some((len, p)) = varint(buf, pos, end) else {
                    return Some((field_start, format!("field {field}: truncated length")));
                };
                let body = p;
                let Some(stop) = usize::try_from(len).ok().and_then(|l| body.checked_add(l)) else {
                    return Some((
                        field_start,
                        format!("field {field}: length {len} overflows"),
                    ));
                };
                if stop > end {
                    return Some((
                        field_start,
                        format!(
                            "field {field}: length {len} runs past the end ({} bytes left)",
                            end - body
                        ),
                    ));
                }
                if depth == 0
                    && descend.contains(&field)
                    && let Some(f) = scan(buf, body, stop, &[], depth + 1)
                {
                    return Some(f);
                }
                pos = stop;
            }
            w => return Some((field_start, format!("field {field}: invalid wire type {w}"))),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_truncation() {
        // field 7 (graph), length 5, but only 2 bytes follow.
        let buf = [0x08, 0x08, 0x3a, 0x05, 0x0a, 0x00];
        let (off, what) = first_fault(&buf, &[7]).unwrap();
        assert_eq!(off, 2);
        assert!(what.contains("runs past the end"), "{what}");
        assert_eq!(first_fault(&[0x08, 0x08], &[7]), None);
    }
}
