//! What inference knows about one value ([`Facts`]) and the symbolic-dimension algebra the
//! rules share: broadcasting, unification, and products of dims.
//!
//! A symbol (`Dim::Sym`) names a runtime size: non-negative, equal wherever the name is
//! equal, otherwise unconstrained. Two different symbols may or may not be equal, so nothing
//! is concluded from their difference.

use perqc_ir::{DType, DeclaredDim, Dim, Shape, Type};
use std::fmt::Write as _;

/// Largest tensor whose element values inference tracks.
pub const MAX_VALUE_ELEMS: usize = 1024;

/// Everything inference knows about a value.
///
/// Invariant: `value` is `Some` only when `shape` is fully known and its element count is
/// `value.len()` (at most [`MAX_VALUE_ELEMS`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    pub dtype: Option<DType>,
    /// `None` when even the rank is unknown.
    pub shape: Option<Shape>,
    /// Element values, row-major, of a small tensor whose values are integers (any numeric
    /// or bool dtype; bools are 0 / 1). `Sym` elements name a runtime size, as in
    /// `Shape(x)` of a `[batch, seq, 64]` tensor, whose value is `[batch, seq, 64]`.
    pub value: Option<Vec<Dim>>,
}

impl Facts {
    pub fn new(dtype: Option<DType>, shape: Option<Shape>) -> Facts {
        Facts {
            dtype,
            shape,
            value: None,
        }
    }

    /// A tensor of known shape and (possibly partly) known values. The value is dropped if
    /// it does not fit the shape, is too large, or holds nothing known.
    pub fn with_value(dtype: Option<DType>, shape: Shape, value: Vec<Dim>) -> Facts {
        let fits = known_numel(&shape) == Some(value.len())
            && value.len() <= MAX_VALUE_ELEMS
            && value.iter().any(|d| *d != Dim::Unknown);
        Facts {
            dtype,
            shape: Some(shape),
            value: fits.then_some(value),
        }
    }

    /// Facts of a constant tensor: dtype, dims and, for small integral tensors, the values.
    pub fn of_tensor(t: &perqc_ir::Tensor) -> Facts {
        let shape: Shape = t.dims.iter().map(|&d| Dim::Known(d)).collect();
        let value = small_tensor_values(t);
        match value {
            Some(v) => Facts::with_value(Some(t.dtype), shape, v),
            None => Facts::new(Some(t.dtype), Some(shape)),
        }
    }

    /// Facts from a declared type (no values).
    pub fn of_type(ty: &Type) -> Facts {
        Facts::new(ty.elem(), ty.shape())
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }

    /// The values if every element is a known integer.
    pub fn known_ints(&self) -> Option<Vec<i64>> {
        self.value.as_ref()?.iter().map(Dim::known).collect()
    }

    /// The value as a vector of dims (Unknown where unknown) when the shape is a known
    /// small rank-0 or rank-1 shape, even if no element value is known.
    pub fn dims_value(&self) -> Option<Vec<Dim>> {
        if let Some(v) = &self.value {
            return Some(v.clone());
        }
        let n = known_numel(self.shape.as_ref()?)?;
        (self.rank()? <= 1 && n <= MAX_VALUE_ELEMS).then(|| vec![Dim::Unknown; n])
    }

    /// The type to record on a value, `None` if nothing is known.
    pub fn to_type(&self) -> Option<Type> {
        if self.dtype.is_none() && self.shape.is_none() {
            return None;
        }
        Some(Type::Tensor {
            elem: self.dtype,
            shape: self.shape.as_ref().map(|s| {
                s.iter()
                    .map(|d| DeclaredDim {
                        dim: d.clone(),
                        denotation: None,
                    })
                    .collect()
            }),
            denotation: None,
        })
    }

    /// Fills what `self` leaves unknown from `other` (a declared type): dtype, rank, dims.
    pub fn refine_with(&mut self, other: &Facts) {
        if self.dtype.is_none() {
            self.dtype = other.dtype;
        }
        match (&mut self.shape, &other.shape) {
            (None, Some(s)) => self.shape = Some(s.clone()),
            (Some(a), Some(b)) if a.len() == b.len() => {
                for (x, y) in a.iter_mut().zip(b) {
                    if *x == Dim::Unknown {
                        *x = y.clone();
                    }
                }
            }
            _ => {}
        }
    }
}

/// `[batch, seq, 64]`.
pub fn fmt_shape(s: &[Dim]) -> String {
    let mut out = String::from("[");
    for (i, d) in s.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{d}");
    }
    out.push(']');
    out
}

/// `[batch, seq, 64]` or `[..]` for unknown rank.
pub fn fmt_opt_shape(s: Option<&[Dim]>) -> String {
    s.map_or_else(|| "[..]".to_string(), fmt_shape)
}

/// Element count of a fully known shape.
pub fn known_numel(s: &[Dim]) -> Option<usize> {
    s.iter().try_fold(1usize, |acc, d| {
        let n = usize::try_from(d.known()?).ok()?;
        acc.checked_mul(n)
    })
}

/// The concrete sizes of a fully known shape.
pub fn known_dims(s: &[Dim]) -> Option<Vec<usize>> {
    s.iter()
        .map(|d| d.known().and_then(|n| usize::try_from(n).ok()))
        .collect()
}

/// The integer element values of a small constant tensor (floats only when all integral).
fn small_tensor_values(t: &perqc_ir::Tensor) -> Option<Vec<Dim>> {
    let numel = usize::try_from(t.numel()?).ok()?;
    if numel > MAX_VALUE_ELEMS || t.dtype == DType::String || t.validate().is_err() {
        return None;
    }
    if t.dtype.is_float() {
        let f = t.to_f32().ok()?;
        if f.len() != numel {
            return None;
        }
        return Some(f.iter().map(|&x| float_dim(x as f64)).collect());
    }
    let v = t.to_i64().ok()?;
    (v.len() == numel).then(|| v.into_iter().map(Dim::Known).collect())
}

/// An integral float as a known dim, anything else unknown.
pub fn float_dim(x: f64) -> Dim {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 {
        Dim::Known(x as i64)
    } else {
        Dim::Unknown
    }
}

// ---- dims ----

/// Numpy broadcasting of two dims; `None` when both are known, differ, and neither is 1.
pub fn broadcast_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    use Dim::*;
    Some(match (a, b) {
        (Known(1), d) | (d, Known(1)) => d.clone(),
        (Known(x), Known(y)) if x == y => Known(*x),
        (Known(_), Known(_)) => return None,
        // A symbol or unknown against a known size other than 1 must be that size.
        (Known(n), _) | (_, Known(n)) => Known(*n),
        (Sym(x), Sym(y)) if x == y => Sym(x.clone()),
        _ => Unknown,
    })
}

/// Numpy broadcasting of shapes (right-aligned).
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let rank = a.len().max(b.len());
    let one = Dim::Known(1);
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank {
                &a[i + a.len() - rank]
            } else {
                &one
            };
            let db = if i + b.len() >= rank {
                &b[i + b.len() - rank]
            } else {
                &one
            };
            broadcast_dim(da, db)
        })
        .collect()
}

/// Two dims that must be equal: the more specific one, `None` if both known and different.
pub fn unify_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    use Dim::*;
    Some(match (a, b) {
        (Known(x), Known(y)) if x != y => return None,
        (Known(x), _) | (_, Known(x)) => Known(*x),
        (Sym(x), _) | (_, Sym(x)) => Sym(x.clone()),
        _ => Unknown,
    })
}

/// Sum of two sizes, as far as it is known.
pub fn add_dims(a: &Dim, b: &Dim) -> Dim {
    use Dim::*;
    match (a, b) {
        (Known(x), Known(y)) => x.checked_add(*y).map_or(Unknown, Known),
        (Known(0), d) | (d, Known(0)) => d.clone(),
        _ => Unknown,
    }
}

/// A product of dims: `coef * sym_1 * ... * sym_k` (symbols sorted, with repetition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mono {
    pub coef: i64,
    pub syms: Vec<String>,
}

impl Mono {
    /// The product of `dims`; `None` if one is unknown or it overflows.
    pub fn product<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Option<Mono> {
        let mut m = Mono {
            coef: 1,
            syms: Vec::new(),
        };
        for d in dims {
            match d {
                Dim::Known(n) => m.coef = m.coef.checked_mul(*n)?,
                Dim::Sym(s) => m.syms.push(s.clone()),
                Dim::Unknown => return None,
            }
        }
        m.syms.sort();
        Some(m)
    }

    /// `self / other` when the symbols of `other` cancel and the coefficient divides.
    pub fn div(&self, other: &Mono) -> Option<Mono> {
        let mut syms = self.syms.clone();
        for s in &other.syms {
            let pos = syms.iter().position(|x| x == s)?;
            syms.remove(pos);
        }
        if self.coef.checked_rem(other.coef)? != 0 {
            return None;
        }
        Some(Mono {
            coef: self.coef.checked_div(other.coef)?,
            syms,
        })
    }

    /// As a single dim: known, one symbol, or unknown (a product of symbols has no name).
    pub fn to_dim(&self) -> Dim {
        match (self.coef, self.syms.as_slice()) {
            (0, _) => Dim::Known(0),
            (c, []) => Dim::Known(c),
            (1, [s]) => Dim::Sym(s.clone()),
            _ => Dim::Unknown,
        }
    }
}

/// The product of dims as one dim (`Unknown` for products of several symbols).
pub fn product_dim(dims: &[Dim]) -> Dim {
    Mono::product(dims).map_or(Dim::Unknown, |m| m.to_dim())
}

/// Normalizes `axis` (negative counts from the end) against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Dim {
        Dim::Sym(x.into())
    }
    use Dim::Known as K;

    #[test]
    fn broadcasting_with_symbols() {
        assert_eq!(broadcast_dim(&s("a"), &s("a")), Some(s("a")));
        assert_eq!(broadcast_dim(&K(1), &s("a")), Some(s("a")));
        assert_eq!(broadcast_dim(&s("a"), &K(7)), Some(K(7)));
        assert_eq!(broadcast_dim(&s("a"), &s("b")), Some(Dim::Unknown));
        assert_eq!(broadcast_dim(&Dim::Unknown, &K(1)), Some(Dim::Unknown));
        assert_eq!(broadcast_dim(&K(3), &K(4)), None);
        assert_eq!(
            broadcast_shapes(&[s("b"), K(1), s("t")], &[K(9), K(1), K(1)]),
            Some(vec![K(9), K(1), s("t")])
        );
        assert_eq!(
            broadcast_shapes(&[K(4)], &[s("b"), s("t"), K(1)]),
            Some(vec![s("b"), s("t"), K(4)])
        );
    }

    #[test]
    fn products_cancel_symbols() {
        let a = Mono::product(&[s("b"), s("t"), K(576)]).unwrap();
        let b = Mono::product(&[s("t"), K(9), s("b")]).unwrap();
        assert_eq!(a.div(&b).unwrap().to_dim(), K(64));
        let c = Mono::product(&[s("b"), K(64)]).unwrap();
        assert_eq!(a.div(&c).unwrap().to_dim(), Dim::Unknown); // 9 * t
        assert_eq!(product_dim(&[s("t"), K(1)]), s("t"));
        assert_eq!(Mono::product(&[s("b"), Dim::Unknown]), None);
    }
}
