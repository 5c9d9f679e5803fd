//! Value propagation on small integer tensors: element arithmetic on symbolic sizes and
//! the index maps that move elements through broadcasts, gathers and slices.
//!
//! Elements are [`Dim`]s: `Known(n)`, `Sym(s)` (a runtime size, so `>= 0`), or `Unknown`.
//! Each operation returns what is certain and `Unknown` otherwise.

use crate::facts::{Facts, MAX_VALUE_ELEMS, known_dims, known_numel};
use perqc_ir::{DType, Dim};
use std::cmp::Ordering;

use Dim::{Known, Sym, Unknown};

/// The element values of `f` if its shape is known and small: its value, or all Unknown.
pub fn values_or_unknown(f: &Facts) -> Option<Vec<Dim>> {
    if let Some(v) = &f.value {
        return Some(v.clone());
    }
    let n = known_numel(f.shape.as_ref()?)?;
    (n <= MAX_VALUE_ELEMS).then(|| vec![Unknown; n])
}

/// For each flat index of `out`, the flat index of the element of `inp` (right-aligned,
/// numpy broadcasting) it reads.
pub fn broadcast_map(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let numel: usize = out.iter().product();
    let off = out.len() - inp.len();
    let mut map = Vec::with_capacity(numel);
    let mut idx = vec![0usize; out.len()];
    for _ in 0..numel {
        let mut flat = 0;
        for (k, &d) in inp.iter().enumerate() {
            let i = if d == 1 { 0 } else { idx[off + k] };
            flat = flat * d + i;
        }
        map.push(flat);
        advance(&mut idx, out);
    }
    map
}

/// Steps a row-major multi-index; wraps to zero after the last.
pub fn advance(idx: &mut [usize], shape: &[usize]) {
    for k in (0..idx.len()).rev() {
        idx[k] += 1;
        if idx[k] < shape[k] {
            return;
        }
        idx[k] = 0;
    }
}

/// Applies `f` elementwise over broadcast inputs. `None` unless the output shape and every
/// input shape are known and small and at least one input has a known value.
pub fn zip_broadcast(
    inputs: &[&Facts],
    out: &[Dim],
    f: impl Fn(&[&Dim]) -> Dim,
) -> Option<Vec<Dim>> {
    if inputs.iter().all(|i| i.value.is_none()) {
        return None;
    }
    let out_dims = known_dims(out)?;
    if known_numel(out)? > MAX_VALUE_ELEMS {
        return None;
    }
    let mut cols = Vec::with_capacity(inputs.len());
    for i in inputs {
        let vals = values_or_unknown(i)?;
        let dims = known_dims(i.shape.as_ref()?)?;
        let off = out_dims.len().checked_sub(dims.len())?;
        if dims
            .iter()
            .zip(&out_dims[off..])
            .any(|(&d, &o)| d != 1 && d != o)
        {
            return None;
        }
        let map = broadcast_map(&out_dims, &dims);
        cols.push((vals, map));
    }
    let n: usize = out_dims.iter().product();
    Some(
        (0..n)
            .map(|j| {
                let args: Vec<&Dim> = cols.iter().map(|(v, m)| &v[m[j]]).collect();
                f(&args)
            })
            .collect(),
    )
}

/// The dtype family an arithmetic result is computed in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Num {
    Int,
    Float,
}

impl Num {
    pub fn of(dt: Option<DType>) -> Num {
        match dt {
            Some(d) if d.is_float() => Num::Float,
            _ => Num::Int,
        }
    }
}

/// Binary arithmetic ops with value propagation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Max,
    Min,
}

pub fn arith(op: Arith, num: Num, a: &Dim, b: &Dim) -> Dim {
    match op {
        Arith::Add => match (a, b) {
            (Known(x), Known(y)) => x.checked_add(*y).map_or(Unknown, Known),
            (Known(0), d) | (d, Known(0)) => d.clone(),
            _ => Unknown,
        },
        Arith::Sub => match (a, b) {
            (Known(x), Known(y)) => x.checked_sub(*y).map_or(Unknown, Known),
            (d, Known(0)) => d.clone(),
            (Sym(x), Sym(y)) if x == y => Known(0),
            _ => Unknown,
        },
        Arith::Mul => match (a, b) {
            (Known(x), Known(y)) => x.checked_mul(*y).map_or(Unknown, Known),
            (Known(0), _) | (_, Known(0)) => Known(0),
            (Known(1), d) | (d, Known(1)) => d.clone(),
            _ => Unknown,
        },
        Arith::Div => match (a, b) {
            (_, Known(0)) => Unknown,
            (Known(x), Known(y)) => match num {
                Num::Int => x.checked_div(*y).map_or(Unknown, Known),
                Num::Float if x.checked_rem(*y) == Some(0) => {
                    x.checked_div(*y).map_or(Unknown, Known)
                }
                Num::Float => Unknown,
            },
            (d, Known(1)) => d.clone(),
            _ => Unknown,
        },
        Arith::Mod => match (a, b) {
            // Integer Mod takes the sign of the divisor (fmod = 0), like Python's `%`.
            (Known(x), Known(y)) if num == Num::Int => x
                .checked_rem(*y)
                .and_then(|r| {
                    if r != 0 && (r < 0) != (*y < 0) {
                        r.checked_add(*y)
                    } else {
                        Some(r)
                    }
                })
                .map_or(Unknown, Known),
            _ => Unknown,
        },
        Arith::Pow => match (a, b) {
            (Known(x), Known(y)) if (0..64).contains(y) => {
                x.checked_pow(*y as u32).map_or(Unknown, Known)
            }
            (d, Known(1)) => d.clone(),
            (_, Known(0)) => Known(1),
            _ => Unknown,
        },
        Arith::Max | Arith::Min => {
            let want_max = op == Arith::Max;
            match order(a, b) {
                Some(Ordering::Less) => (if want_max { b } else { a }).clone(),
                Some(_) => (if want_max { a } else { b }).clone(),
                None => Unknown,
            }
        }
    }
}

/// The order of two elements where it is certain (symbols are sizes, so `>= 0`).
pub fn order(a: &Dim, b: &Dim) -> Option<Ordering> {
    match (a, b) {
        (Known(x), Known(y)) => Some(x.cmp(y)),
        (Sym(x), Sym(y)) if x == y => Some(Ordering::Equal),
        (Sym(_), Known(k)) if *k < 0 => Some(Ordering::Greater),
        (Known(k), Sym(_)) if *k < 0 => Some(Ordering::Less),
        _ => None,
    }
}

/// Comparison ops (bool results as 0 / 1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

pub fn compare(op: Cmp, a: &Dim, b: &Dim) -> Dim {
    let Some(o) = order(a, b) else {
        return Unknown;
    };
    let r = match op {
        Cmp::Eq => o == Ordering::Equal,
        Cmp::Lt => o == Ordering::Less,
        Cmp::Le => o != Ordering::Greater,
        Cmp::Gt => o == Ordering::Greater,
        Cmp::Ge => o != Ordering::Less,
    };
    Known(r as i64)
}

/// Logical ops on bools (0 / 1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Logic {
    And,
    Or,
    Xor,
}

pub fn logic(op: Logic, a: &Dim, b: &Dim) -> Dim {
    let t = |d: &Dim| d.known().map(|v| v != 0);
    match (op, t(a), t(b)) {
        (Logic::And, Some(false), _) | (Logic::And, _, Some(false)) => Known(0),
        (Logic::Or, Some(true), _) | (Logic::Or, _, Some(true)) => Known(1),
        (Logic::And, Some(x), Some(y)) => Known((x && y) as i64),
        (Logic::Or, Some(x), Some(y)) => Known((x || y) as i64),
        (Logic::Xor, Some(x), Some(y)) => Known((x ^ y) as i64),
        _ => Unknown,
    }
}

/// Unary ops that keep integer values exact.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unary {
    Neg,
    Abs,
    Not,
    Sign,
    /// Floor, Ceil, Round: the identity on integers.
    Integral,
}

pub fn unary(op: Unary, a: &Dim) -> Dim {
    match (op, a) {
        (Unary::Integral, d) => d.clone(),
        (Unary::Abs, Sym(_)) => a.clone(),
        (Unary::Neg, Known(x)) => x.checked_neg().map_or(Unknown, Known),
        (Unary::Abs, Known(x)) => x.checked_abs().map_or(Unknown, Known),
        (Unary::Not, Known(x)) => Known((*x == 0) as i64),
        (Unary::Sign, Known(x)) => Known(x.signum()),
        _ => Unknown,
    }
}

/// An element converted to `to` (Cast): exact when the integer fits the target.
pub fn cast(a: &Dim, to: DType) -> Dim {
    use DType::*;
    match (a, to) {
        (Known(x), Bool) => Known((*x != 0) as i64),
        (Sym(_), Bool) => Unknown,
        (d, _) if to.is_float() => d.clone(),
        (Sym(_), I32 | I64 | U32 | U64) => a.clone(),
        (Known(x), _) => {
            let fits = match to {
                I64 => true,
                I32 => i32::try_from(*x).is_ok(),
                I16 => i16::try_from(*x).is_ok(),
                I8 => i8::try_from(*x).is_ok(),
                U64 | U32 | U16 | U8 => {
                    *x >= 0 && to.bits().is_some_and(|b| b >= 64 || *x < (1i64 << b))
                }
                _ => false,
            };
            if fits { a.clone() } else { Unknown }
        }
        _ => Unknown,
    }
}

/// Row-major strides of concrete dims.
pub fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for k in (0..dims.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * dims[k + 1];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Dim {
        Sym(x.into())
    }

    #[test]
    fn arithmetic_on_symbols() {
        assert_eq!(arith(Arith::Mul, Num::Int, &s("b"), &Known(1)), s("b"));
        assert_eq!(
            arith(Arith::Mul, Num::Int, &Known(-1), &Known(1)),
            Known(-1)
        );
        assert_eq!(arith(Arith::Div, Num::Int, &Known(7), &Known(2)), Known(3));
        assert_eq!(arith(Arith::Div, Num::Float, &Known(7), &Known(2)), Unknown);
        assert_eq!(arith(Arith::Add, Num::Int, &s("b"), &Known(1)), Unknown);
        assert_eq!(arith(Arith::Mod, Num::Int, &Known(-7), &Known(3)), Known(2));
        assert_eq!(compare(Cmp::Eq, &s("b"), &Known(-1)), Known(0));
        assert_eq!(compare(Cmp::Eq, &s("b"), &s("b")), Known(1));
        assert_eq!(compare(Cmp::Eq, &s("b"), &Known(4)), Unknown);
        assert_eq!(logic(Logic::And, &Known(0), &Unknown), Known(0));
        assert_eq!(cast(&Known(300), DType::U8), Unknown);
        assert_eq!(cast(&s("t"), DType::F32), s("t"));
    }

    #[test]
    fn broadcast_maps() {
        assert_eq!(broadcast_map(&[2, 3], &[3]), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(broadcast_map(&[2, 3], &[2, 1]), vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
    }
}
