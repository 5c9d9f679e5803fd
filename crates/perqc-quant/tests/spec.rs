//! Validation rules (one test per rule, with the message), code ranges, group lengths and
//! the display form.

mod common;

use common::{fmt, int};
use perqc_quant::{Format, Granularity, QuantSpec, ScaleSearch, SpecError};

fn msg(spec: QuantSpec) -> String {
    spec.validate().unwrap_err().to_string()
}

#[test]
fn int_bits_must_be_2_to_8() {
    for bits in [0, 1, 9, 16] {
        let m = msg(int(bits, true, Granularity::Channel, ScaleSearch::Max));
        assert_eq!(
            m,
            format!("bits = {bits} is not allowed for int; allowed: 2..=8")
        );
    }
    for bits in 2..=8 {
        int(bits, true, Granularity::Channel, ScaleSearch::Max)
            .validate()
            .unwrap();
        int(bits, false, Granularity::Channel, ScaleSearch::Mse)
            .validate()
            .unwrap();
    }
}

#[test]
fn fp4_formats_need_4_bits_and_mxint8_8() {
    let s = QuantSpec {
        bits: 8,
        ..fmt(Format::Fp4, Granularity::Group(16), ScaleSearch::Max)
    };
    assert_eq!(msg(s), "bits = 8 is not allowed for fp4; allowed: 4 (E2M1)");
    let s = QuantSpec {
        bits: 3,
        ..fmt(Format::MxFp4, Granularity::Group(32), ScaleSearch::Max)
    };
    assert_eq!(
        msg(s),
        "bits = 3 is not allowed for mxfp4; allowed: 4 (E2M1)"
    );
    let s = QuantSpec {
        bits: 4,
        ..fmt(Format::MxInt8, Granularity::Group(32), ScaleSearch::Max)
    };
    assert_eq!(msg(s), "bits = 4 is not allowed for mxint8; allowed: 8");
}

#[test]
fn mx_formats_need_group_32() {
    for g in [
        Granularity::Channel,
        Granularity::Tensor,
        Granularity::Group(16),
    ] {
        let m = msg(fmt(Format::MxFp4, g, ScaleSearch::Max));
        assert_eq!(
            m,
            format!(
                "granularity = {g} is not allowed for mxfp4; allowed: group(32) (OCP MX blocks of 32)"
            )
        );
    }
    let m = msg(fmt(
        Format::MxInt8,
        Granularity::Group(64),
        ScaleSearch::Max,
    ));
    assert!(
        m.starts_with("granularity = group(64) is not allowed for mxint8"),
        "{m}"
    );
}

#[test]
fn float_formats_are_symmetric_and_signed() {
    for f in [Format::Fp4, Format::MxFp4, Format::MxInt8] {
        let s = QuantSpec {
            symmetric: false,
            ..fmt(f, Granularity::Group(32), ScaleSearch::Max)
        };
        assert_eq!(
            msg(s),
            format!(
                "symmetric = false is not allowed for {f}; allowed: symmetric = true (no zero point)"
            )
        );
        let s = QuantSpec {
            signed: false,
            ..fmt(f, Granularity::Group(32), ScaleSearch::Max)
        };
        assert_eq!(
            msg(s),
            format!("signed = false is not allowed for {f}; allowed: signed = true")
        );
    }
}

#[test]
fn group_zero_is_rejected() {
    let s = int(4, true, Granularity::Group(0), ScaleSearch::Max);
    assert_eq!(
        msg(s),
        "granularity = group(0) is not allowed; allowed: group(g) with g >= 1"
    );
    assert_eq!(s.group_len(64), Err(SpecError::ZeroGroup));
}

#[test]
fn token_is_for_activations_only() {
    let s = int(8, true, Granularity::Token, ScaleSearch::Max);
    s.validate().unwrap();
    assert_eq!(
        s.for_weights().unwrap_err().to_string(),
        "granularity = per-token is for activations only; allowed for weights: per-tensor, per-channel, group(g)"
    );
    // Every rule is one line.
    assert!(!s.for_weights().unwrap_err().to_string().contains('\n'));
}

#[test]
fn group_len_names_both_numbers() {
    let s = int(4, true, Granularity::Group(128), ScaleSearch::Max);
    assert_eq!(s.group_len(256), Ok(128));
    assert_eq!(
        s.group_len(576).unwrap_err().to_string(),
        "granularity = group(128) does not divide the 576 input columns; allowed: a group size dividing 576"
    );
    assert_eq!(
        int(4, true, Granularity::Channel, ScaleSearch::Max).group_len(576),
        Ok(576)
    );
    assert_eq!(
        int(4, true, Granularity::Tensor, ScaleSearch::Max).group_len(576),
        Ok(576)
    );
}

#[test]
fn code_ranges() {
    let r = |bits, signed| {
        QuantSpec {
            signed,
            ..int(bits, true, Granularity::Channel, ScaleSearch::Max)
        }
        .code_range()
    };
    assert_eq!(r(4, true), (-8, 7));
    assert_eq!(r(8, true), (-128, 127));
    assert_eq!(r(2, true), (-2, 1));
    assert_eq!(r(4, false), (0, 15));
    assert_eq!(r(8, false), (0, 255));
    assert_eq!(
        fmt(Format::Fp4, Granularity::Channel, ScaleSearch::Max).code_range(),
        (0, 15)
    );
    assert_eq!(
        fmt(Format::MxFp4, Granularity::Group(32), ScaleSearch::Max).code_range(),
        (0, 15)
    );
    assert_eq!(
        fmt(Format::MxInt8, Granularity::Group(32), ScaleSearch::Max).code_range(),
        (-128, 127)
    );
}

#[test]
fn display() {
    assert_eq!(
        int(4, true, Granularity::Channel, ScaleSearch::Mse).to_string(),
        "int4 sym per-channel mse"
    );
    let u8a = QuantSpec {
        signed: false,
        ..int(8, false, Granularity::Tensor, ScaleSearch::Max)
    };
    assert_eq!(u8a.to_string(), "uint8 asym per-tensor max");
    assert_eq!(
        int(3, false, Granularity::Group(64), ScaleSearch::Max).to_string(),
        "int3 asym group(64) max"
    );
    assert_eq!(
        fmt(Format::MxFp4, Granularity::Group(32), ScaleSearch::Max).to_string(),
        "mxfp4 group(32) max"
    );
    assert_eq!(
        fmt(Format::Fp4, Granularity::Group(16), ScaleSearch::Mse).to_string(),
        "fp4 group(16) mse"
    );
}
