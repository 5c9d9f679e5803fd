//! What to quantize to: [`QuantSpec`] and its parts, validation ([`SpecError`]) and the
//! display form used in logs (`int4 sym per-channel mse`).

use std::fmt;

/// The element format of the codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// Uniform integer codes (`bits` wide, signed or unsigned) with an f32 scale and, when
    /// asymmetric, an integer zero point per group.
    Int,
    /// FP4 E2M1 elements (magnitudes `{0, 0.5, 1, 1.5, 2, 3, 4, 6}`) with an f32 scale per
    /// group; the scale maps the group's (clipped) absolute maximum to 6.
    Fp4,
    /// OCP MXFP4: E2M1 elements, blocks of 32 input columns sharing a power-of-two scale
    /// `2^e`, `e = floor(log2(amax)) - 2` (2 = the largest exponent of E2M1).
    MxFp4,
    /// OCP MXINT8: int8 elements with 6 fractional bits sharing a power-of-two scale per
    /// block of 32: `value = code * 2^(e - 6)`, `e = floor(log2(amax))`.
    MxInt8,
}

impl Format {
    /// The OCP microscaling formats (shared power-of-two scale per block of 32).
    pub fn is_mx(self) -> bool {
        matches!(self, Format::MxFp4 | Format::MxInt8)
    }

    /// Formats whose elements are E2M1 bit patterns.
    pub fn is_fp4(self) -> bool {
        matches!(self, Format::Fp4 | Format::MxFp4)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Int => "int",
            Format::Fp4 => "fp4",
            Format::MxFp4 => "mxfp4",
            Format::MxInt8 => "mxint8",
        })
    }
}

/// Which elements share one scale (and zero point).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per output channel (weight row).
    Channel,
    /// One scale per `g` consecutive input-dim columns of a row; `g` must divide the columns.
    Group(usize),
    /// One scale per row, computed at run time (activations only; invalid for weights).
    Token,
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Granularity::Tensor => f.write_str("per-tensor"),
            Granularity::Channel => f.write_str("per-channel"),
            Granularity::Group(g) => write!(f, "group({g})"),
            Granularity::Token => f.write_str("per-token"),
        }
    }
}

/// How the scale of a group is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleSearch {
    /// The range of the group (clip factor 1).
    Max,
    /// The clip factor (or, for MX formats, the shared exponent) that minimizes the group's
    /// sum of squared errors; see [`crate::params`] for the grid.
    Mse,
}

impl fmt::Display for ScaleSearch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScaleSearch::Max => "max",
            ScaleSearch::Mse => "mse",
        })
    }
}

/// A quantization scheme. Check it with [`QuantSpec::validate`] (or
/// [`QuantSpec::for_weights`]); the quantizers do so and return the [`SpecError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    /// Code width: 2..=8 for `Int`, 4 for `Fp4`/`MxFp4`, 8 for `MxInt8`.
    pub bits: u32,
    /// Signed codes (`Int`); the float and MX formats are signed.
    pub signed: bool,
    /// No zero point (`value = code * scale`); asymmetric `Int` carries one per group.
    pub symmetric: bool,
    /// Which elements share a scale.
    pub granularity: Granularity,
    /// The element format.
    pub format: Format,
    /// How scales are chosen.
    pub scale: ScaleSearch,
}

/// Why a [`QuantSpec`] is rejected. Each message is one line naming the field, the value
/// given and the values allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `bits` outside what the format allows.
    #[error("bits = {bits} is not allowed for {format}; allowed: {allowed}")]
    Bits {
        format: Format,
        bits: u32,
        allowed: &'static str,
    },
    /// An MX format with a granularity other than `Group(32)`.
    #[error(
        "granularity = {got} is not allowed for {format}; allowed: group(32) (OCP MX blocks of 32)"
    )]
    MxGranularity { format: Format, got: Granularity },
    /// A float or MX format asked to be asymmetric.
    #[error(
        "symmetric = false is not allowed for {format}; allowed: symmetric = true (no zero point)"
    )]
    Asymmetric { format: Format },
    /// A float or MX format asked to be unsigned.
    #[error("signed = false is not allowed for {format}; allowed: signed = true")]
    Unsigned { format: Format },
    /// `Group(0)`.
    #[error("granularity = group(0) is not allowed; allowed: group(g) with g >= 1")]
    ZeroGroup,
    /// `Token` granularity for a weight.
    #[error(
        "granularity = per-token is for activations only; allowed for weights: per-tensor, per-channel, group(g)"
    )]
    TokenForWeights,
    /// A group size that does not divide the input columns.
    #[error(
        "granularity = group({group}) does not divide the {cols} input columns; allowed: a group size dividing {cols}"
    )]
    GroupDoesNotDivide { group: usize, cols: usize },
}

impl QuantSpec {
    /// Checks the rules, in this order: the bit width of the format (`Int` 2..=8, `Fp4` and
    /// `MxFp4` 4, `MxInt8` 8); float and MX formats are signed and symmetric; MX formats use
    /// `Group(32)`; `Group(g)` has `g >= 1`.
    pub fn validate(&self) -> Result<(), SpecError> {
        let (ok, allowed) = match self.format {
            Format::Int => ((2..=8).contains(&self.bits), "2..=8"),
            Format::Fp4 | Format::MxFp4 => (self.bits == 4, "4 (E2M1)"),
            Format::MxInt8 => (self.bits == 8, "8"),
        };
        if !ok {
            return Err(SpecError::Bits {
                format: self.format,
                bits: self.bits,
                allowed,
            });
        }
        if self.format != Format::Int {
            if !self.signed {
                return Err(SpecError::Unsigned {
                    format: self.format,
                });
            }
            if !self.symmetric {
                return Err(SpecError::Asymmetric {
                    format: self.format,
                });
            }
        }
        if self.format.is_mx() && self.granularity != Granularity::Group(32) {
            return Err(SpecError::MxGranularity {
                format: self.format,
                got: self.granularity,
            });
        }
        if self.granularity == Granularity::Group(0) {
            return Err(SpecError::ZeroGroup);
        }
        Ok(())
    }

    /// [`validate`](Self::validate), and rejects `Token` (weights have no tokens).
    pub fn for_weights(&self) -> Result<(), SpecError> {
        self.validate()?;
        if self.granularity == Granularity::Token {
            return Err(SpecError::TokenForWeights);
        }
        Ok(())
    }

    /// The inclusive range of codes. `Int`: signed `[-2^(b-1), 2^(b-1) - 1]`, unsigned
    /// `[0, 2^b - 1]`; `Fp4`/`MxFp4`: `[0, 15]` (E2M1 bit patterns: bit 3 the sign, bits 2..1
    /// the exponent, bit 0 the mantissa); `MxInt8`: `[-128, 127]`.
    ///
    /// Meaningful for a valid spec (bits are clamped to 1..=16 so it never overflows).
    pub fn code_range(&self) -> (i32, i32) {
        match self.format {
            Format::Fp4 | Format::MxFp4 => (0, 15),
            Format::MxInt8 => (-128, 127),
            Format::Int => {
                let b = self.bits.clamp(1, 16);
                if self.signed {
                    (-(1 << (b - 1)), (1 << (b - 1)) - 1)
                } else {
                    (0, (1 << b) - 1)
                }
            }
        }
    }

    /// Columns per scale along the input dim for a weight with `cols` columns: `cols` for
    /// `Tensor`, `Channel` and `Token`, `g` for `Group(g)` (an error unless `g` divides
    /// `cols`; `cols = 0` is divided by every `g`).
    pub fn group_len(&self, cols: usize) -> Result<usize, SpecError> {
        match self.granularity {
            Granularity::Tensor | Granularity::Channel | Granularity::Token => Ok(cols),
            Granularity::Group(0) => Err(SpecError::ZeroGroup),
            Granularity::Group(g) if !cols.is_multiple_of(g) => {
                Err(SpecError::GroupDoesNotDivide { group: g, cols })
            }
            Granularity::Group(g) => Ok(g),
        }
    }
}

/// `int4 sym per-channel mse`, `uint8 asym per-tensor max`, `mxfp4 group(32) max`.
impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.format {
            Format::Int => {
                let u = if self.signed { "" } else { "u" };
                let sym = if self.symmetric { "sym" } else { "asym" };
                write!(f, "{u}int{} {sym}", self.bits)?;
            }
            Format::Fp4 => f.write_str("fp4")?,
            other => write!(f, "{other}")?,
        }
        write!(f, " {} {}", self.granularity, self.scale)
    }
}
