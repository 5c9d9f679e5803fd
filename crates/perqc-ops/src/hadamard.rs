//! Hadamard matrices of the orders PeRQ's rotations need, and the reference Walsh-Hadamard
//! transform.
//!
//! A Hadamard matrix of order `n` is an `n x n` matrix `H` of ±1 with `H Hᵀ = n I`, so
//! `H / sqrt(n)` is orthogonal. They exist only for `n = 1, 2` and multiples of 4 (the
//! Hadamard conjecture says for every multiple of 4); [`hadamard`] builds one
//! deterministically from these constructions:
//!
//! - **Sylvester**, `n = 2^k`, natural order: `H[i][j] = (-1)^popcount(i & j)`. Every power
//!   of two gets exactly this matrix, so a fast Walsh-Hadamard transform
//!   ([`fwht_normalized`]) can replace the dense product.
//! - **Paley I**, `n = q + 1` for a prime power `q ≡ 3 (mod 4)`, and **Paley II**,
//!   `n = 2(q + 1)` for a prime power `q ≡ 1 (mod 4)`, from the quadratic character of
//!   GF(q) (computed in GF(p^k) modulo an irreducible polynomial when `q = p^k`, k > 1).
//! - **Williamson**, `n = 4m` for `m` = 23, 29, 39, 43 (orders 92, 116, 156, 172), from four
//!   stored symmetric circulant ±1 matrices (their provenance is documented at the table).
//! - **Kronecker products** of the above. An order `n = 2^e · o` (`o` odd, `o > 1`) is built
//!   as `H = H_m ⊗ S_s` with `S_s` the Sylvester matrix of the largest power of two `s` that
//!   leaves a constructible core `m = n / s`; the core is one base matrix (Paley or
//!   Williamson; Paley I preferred over Paley II over Williamson when several apply) or,
//!   failing that, a Kronecker product of base matrices, smallest factor first. Entry
//!   `((i1·s + i2), (j1·s + j2))` is `H_m[i1][j1] · S_s[i2][j2]`: every `s x s` block is
//!   `±S_s`, so a transform can run a fast Walsh-Hadamard transform inside the blocks and a
//!   dense `m x m` product across them ([`Hadamard::sylvester_factor`]).
//!
//! Orders `4k <= 256` that none of these reach: **188** (= 4·47) and **236** (= 4·59).
//! Williamson matrices of orders 47 and 59 do not exist (Holzmann, Kharaghani and
//! Tayfeh-Rezaie 2008), neither 187, 93, 235 nor 117 is a prime power, and both are
//! 4 times a prime, so no Kronecker product reaches them. Every other multiple of 4 up to
//! 256 is covered (the test `uncovered_orders_up_to_256` pins this list).
//!
//! Dense matrices are limited to [`MAX_ORDER`]. [`hadamard`], [`constructible`] and
//! [`fwht_normalized`] accept any input, returning an error (never panicking) when there is
//! no matrix; only the index accessors panic on out-of-range indices, as slices do.

use std::collections::HashMap;
use std::fmt;

/// The largest order [`hadamard`] builds: `MAX_ORDER²` i8 entries are 1 GiB.
pub const MAX_ORDER: usize = 1 << 15;

/// A Hadamard matrix: `n x n`, entries ±1, row-major, `H Hᵀ = n I`.
///
/// Built only by [`hadamard`], so the invariant holds for every value of the type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hadamard {
    n: usize,
    entries: Vec<i8>,
    /// The power of two `s` with `H = H_{n/s} ⊗ Sylvester(s)`.
    sylvester: usize,
    /// The base matrices `H_{n/s} = F_0 ⊗ F_1 ⊗ ..` (order, ±1 entries row-major); none
    /// for a power of two.
    core_factors: Vec<(usize, Vec<i8>)>,
    construction: String,
}

impl Hadamard {
    /// The order `n`.
    pub fn order(&self) -> usize {
        self.n
    }

    /// Entry `(i, j)`, ±1. Panics if `i` or `j` is not below the order, like slice indexing.
    pub fn get(&self, i: usize, j: usize) -> i8 {
        assert!(j < self.n, "column {j} out of range for order {}", self.n);
        self.entries[i * self.n + j]
    }

    /// Row `i` (`n` entries). Panics if `i` is not below the order, like slice indexing.
    pub fn row(&self, i: usize) -> &[i8] {
        &self.entries[i * self.n..(i + 1) * self.n]
    }

    /// All `n²` entries, row-major.
    pub fn entries(&self) -> &[i8] {
        &self.entries
    }

    /// `H / sqrt(n)` row-major: an orthogonal matrix (`(H/√n)(H/√n)ᵀ = I`).
    pub fn normalized_f64(&self) -> Vec<f64> {
        let s = 1.0 / (self.n as f64).sqrt();
        self.entries.iter().map(|&e| f64::from(e) * s).collect()
    }

    /// `H / sqrt(n)` in f32: each entry is `±(1/√n)` computed in f64 and rounded once.
    pub fn normalized_f32(&self) -> Vec<f32> {
        let s = (1.0 / (self.n as f64).sqrt()) as f32;
        self.entries.iter().map(|&e| f32::from(e) * s).collect()
    }

    /// Whether this is the natural-order Sylvester matrix `(-1)^popcount(i & j)`, so that
    /// `H x` is [`fwht_normalized`] (times `√n`). True exactly for the powers of two.
    pub fn is_sylvester(&self) -> bool {
        self.sylvester == self.n
    }

    /// The Sylvester factor `s` of the construction, `H = H_{n/s} ⊗ Sylvester(s)`: each
    /// `s x s` block `(i1, j1)` of `H` is `H_{n/s}[i1][j1] · Sylvester(s)`. `n` for a power
    /// of two; 1 when the construction has no Sylvester factor (a Paley or Williamson
    /// matrix, or a Kronecker product of those). [`hadamard`] makes `s` as large as its
    /// constructions allow.
    pub fn sylvester_factor(&self) -> usize {
        self.sylvester
    }

    /// The Kronecker factors of the core `H_{n/s}` (see [`Hadamard::sylvester_factor`]),
    /// left to right, each `(order, entries)` with its entries ±1 row-major: `H = F_0 ⊗ F_1
    /// ⊗ .. ⊗ Sylvester(s)`. Empty for a power of two (the core is `[1]`). Applying them
    /// one after the other costs `Σ order` signed additions per entry instead of `n / s`.
    pub fn core_factors(&self) -> &[(usize, Vec<i8>)] {
        &self.core_factors
    }

    /// How the matrix was built, for diagnostics: Kronecker factors left to right, each
    /// `sylvester(order)`, `paley1(q)` (order `q + 1`), `paley2(q)` (order `2(q + 1)`) or
    /// `williamson(m)` (order `4m`); e.g. `"paley2(37) ⊗ sylvester(64)"` for 4864.
    pub fn construction(&self) -> &str {
        &self.construction
    }
}

/// Why no Hadamard matrix of the requested order could be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HadamardError {
    /// No construction reaches order `n` (or none can exist: `n` is 0 or not 1, 2 or a
    /// multiple of 4). `below` and `above` are the nearest orders that work.
    NoConstruction {
        n: usize,
        below: Option<usize>,
        above: Option<usize>,
    },
    /// `n` exceeds [`MAX_ORDER`], the limit on dense matrices.
    TooLarge { n: usize, max: usize },
    /// [`fwht_normalized`] was given a length that is not a power of two.
    NotPowerOfTwo { len: usize },
    /// [`hadamard_with_core`]: `m` is not a core of order `n`; `valid` lists those that are.
    NoCore {
        n: usize,
        m: usize,
        valid: Vec<usize>,
    },
}

impl fmt::Display for HadamardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let HadamardError::NoCore { n, m, valid } = self {
            let list: Vec<String> = valid.iter().map(|v| v.to_string()).collect();
            return write!(
                f,
                "{m} is not a core of a Hadamard matrix of order {n} (cores: {})",
                if list.is_empty() {
                    "none".to_string()
                } else {
                    list.join(", ")
                }
            );
        }
        match *self {
            HadamardError::NoConstruction { n, below, above } => {
                if n % 4 == 0 && n > 0 {
                    write!(
                        f,
                        "no Hadamard matrix of order {n}: perqc has no construction for this \
                         multiple of 4 (Sylvester, Paley I/II, Williamson and their Kronecker \
                         products do not reach it)"
                    )?;
                } else {
                    write!(
                        f,
                        "no Hadamard matrix of order {n}: orders must be 1, 2 or a multiple \
                         of 4 that perqc can construct"
                    )?;
                }
                match (below, above) {
                    (Some(b), Some(a)) => write!(f, "; nearest: {b} and {a}"),
                    (Some(b), None) => write!(f, "; nearest below: {b}"),
                    (None, Some(a)) => write!(f, "; nearest above: {a}"),
                    (None, None) => Ok(()),
                }
            }
            HadamardError::TooLarge { n, max } => write!(
                f,
                "no Hadamard matrix of order {n}: dense Hadamard matrices are limited to order \
                 {max} (order² one-byte entries)"
            ),
            HadamardError::NotPowerOfTwo { len } => write!(
                f,
                "the Walsh-Hadamard transform needs a power-of-two length, got {len}"
            ),
            HadamardError::NoCore { .. } => unreachable!("written above"),
        }
    }
}

impl std::error::Error for HadamardError {}

/// A Hadamard matrix of order `n`, deterministic (the same matrix for the same `n` on
/// every call and platform); see the module documentation for which construction is used.
///
/// Errors: [`HadamardError::NoConstruction`] (naming the nearest constructible orders) when
/// no construction reaches `n`, including `n = 0`; [`HadamardError::TooLarge`] above
/// [`MAX_ORDER`].
pub fn hadamard(n: usize) -> Result<Hadamard, HadamardError> {
    if n > MAX_ORDER {
        return Err(HadamardError::TooLarge { n, max: MAX_ORDER });
    }
    match plan(n) {
        Some(plan) => Ok(build(&plan)),
        None => Err(HadamardError::NoConstruction {
            n,
            below: nearest_below(n),
            above: nearest_above(n),
        }),
    }
}

/// The cores [`hadamard_with_core`] accepts for order `n`: each `m` with `n = m · 2^j`
/// that is a base matrix or a Kronecker product of base matrices, smallest first (the
/// first is what [`hadamard`] uses). Empty for powers of two and orders with no
/// construction.
pub fn cores(n: usize) -> Vec<usize> {
    if n == 0 || n > MAX_ORDER || n.is_power_of_two() || !n.is_multiple_of(4) {
        return Vec::new();
    }
    let e = n.trailing_zeros();
    let odd = n >> e;
    let mut memo = HashMap::new();
    (2..=e)
        .map(|j| odd << j)
        .filter(|&m| core(m, &mut memo).is_some())
        .collect()
}

/// A Hadamard matrix of order `n` built as `H_m ⊗ Sylvester(n / m)` with core order `m`
/// (one of [`cores`]`(n)`): the same order can be reached from different cores, and the
/// choice changes how a rotation spreads outliers (measured in docs/results.md). Errors
/// list the cores `n` has.
pub fn hadamard_with_core(n: usize, m: usize) -> Result<Hadamard, HadamardError> {
    let valid = cores(n);
    if !valid.contains(&m) {
        return Err(HadamardError::NoCore { n, m, valid });
    }
    let cores = core(m, &mut HashMap::new()).expect("listed by cores()");
    Ok(build(&Plan {
        cores,
        sylvester: n / m,
    }))
}

/// Whether [`hadamard`]`(n)` succeeds, decided without building the matrix (a few
/// prime-power tests by trial division; microseconds).
pub fn constructible(n: usize) -> bool {
    plan(n).is_some()
}

/// The largest constructible order below `n`.
fn nearest_below(n: usize) -> Option<usize> {
    let n = n.min(MAX_ORDER + 1);
    // Candidates are 1, 2 and the multiples of 4; the power of two below `n` ends the loop.
    let mut c = (n.saturating_sub(1) / 4) * 4;
    while c >= 4 {
        if constructible(c) {
            return Some(c);
        }
        c -= 4;
    }
    [2, 1].into_iter().find(|&c| c < n)
}

/// The smallest constructible order above `n`, if any is at most [`MAX_ORDER`].
fn nearest_above(n: usize) -> Option<usize> {
    if n < 2 {
        return Some(n + 1);
    }
    // The next power of two bounds the loop.
    let mut c = (n / 4 + 1) * 4;
    while c <= MAX_ORDER {
        if constructible(c) {
            return Some(c);
        }
        c += 4;
    }
    None
}

/// `n` random signs ±1 for a randomized Hadamard `H · diag(s)`: sign `i` is `-1` when bit
/// 63 of the `(i+1)`-th splitmix64 output from state `seed` is set. This definition is
/// part of the contract (a calibrated model stores only the seed), and the signs for a
/// shorter `n` are a prefix of those for a longer one.
pub fn random_signs(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            if splitmix64(&mut state) >> 63 == 1 {
                -1.0
            } else {
                1.0
            }
        })
        .collect()
}

/// Steele, Lea and Flood's splitmix64 step (the 64-bit finalizer of MurmurHash3 over a
/// Weyl sequence): advances `state` and returns the next output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// In place, `x <- H x / sqrt(n)` for the natural-order Sylvester matrix `H` of order
/// `n = x.len()` (a power of two): the reference that vectorized kernels are checked
/// against.
///
/// Butterflies in stages `h = 1, 2, 4, ..., n/2`; stage `h` maps each pair
/// `(a, b) = (x[j], x[j + h])` with `j & h == 0` to `(a + b, a - b)` in f32. After the last
/// stage every element is multiplied once by `1/sqrt(n)` (computed in f64, rounded to f32).
/// Errors with [`HadamardError::NotPowerOfTwo`] (leaving `x` untouched) when `x.len()` is
/// not a power of two (0 included).
pub fn fwht_normalized(x: &mut [f32]) -> Result<(), HadamardError> {
    let n = x.len();
    if !n.is_power_of_two() {
        return Err(HadamardError::NotPowerOfTwo { len: n });
    }
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let scale = (1.0 / (n as f64).sqrt()) as f32;
    for v in x.iter_mut() {
        *v *= scale;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Planning: which construction reaches n (cheap; no matrix is built).

/// A base matrix that is not a power-of-two Sylvester matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    /// Order `q + 1`, `q ≡ 3 (mod 4)` a prime power `p^k`.
    Paley1 { q: usize, p: usize, k: u32 },
    /// Order `2(q + 1)`, `q ≡ 1 (mod 4)` a prime power `p^k`.
    Paley2 { q: usize, p: usize, k: u32 },
    /// Order `4m` from the stored quadruple [`WILLIAMSON`]`[index]`.
    Williamson { index: usize },
}

impl Base {
    fn order(self) -> usize {
        match self {
            Base::Paley1 { q, .. } => q + 1,
            Base::Paley2 { q, .. } => 2 * (q + 1),
            Base::Williamson { index } => 4 * WILLIAMSON[index].m,
        }
    }

    fn name(self) -> String {
        match self {
            Base::Paley1 { q, .. } => format!("paley1({q})"),
            Base::Paley2 { q, .. } => format!("paley2({q})"),
            Base::Williamson { index } => format!("williamson({})", WILLIAMSON[index].m),
        }
    }
}

/// `H = cores[0] ⊗ cores[1] ⊗ ... ⊗ Sylvester(sylvester)`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plan {
    cores: Vec<Base>,
    sylvester: usize,
}

impl Plan {
    fn order(&self) -> usize {
        self.cores.iter().map(|b| b.order()).product::<usize>() * self.sylvester
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.cores.iter().map(|b| b.name()).collect();
        if self.sylvester > 1 || parts.is_empty() {
            parts.push(format!("sylvester({})", self.sylvester));
        }
        parts.join(" ⊗ ")
    }
}

/// The construction for order `n`, if any: the smallest core `m = n / 2^j` (largest
/// Sylvester factor) that is a base matrix or a Kronecker product of base matrices.
fn plan(n: usize) -> Option<Plan> {
    if n == 0 || n > MAX_ORDER {
        return None;
    }
    if n.is_power_of_two() {
        return Some(Plan {
            cores: Vec::new(),
            sylvester: n,
        });
    }
    if !n.is_multiple_of(4) {
        return None;
    }
    let e = n.trailing_zeros();
    let odd = n >> e;
    let mut memo = HashMap::new();
    // A core is a multiple of 4 (a Hadamard order above 2) with the odd part of n.
    (2..=e).find_map(|j| {
        let m = odd << j;
        core(m, &mut memo).map(|cores| Plan {
            cores,
            sylvester: n / m,
        })
    })
}

/// Base matrices whose Kronecker product has order `m`, or `None`. `m` is a multiple of 4
/// with an odd part above 1; a power-of-two factor is never needed here because
/// [`plan`] tries the cores with fewer factors of two first.
fn core(m: usize, memo: &mut HashMap<usize, Option<Vec<Base>>>) -> Option<Vec<Base>> {
    if let Some(b) = base(m) {
        return Some(vec![b]);
    }
    if let Some(known) = memo.get(&m) {
        return known.clone();
    }
    // Both factors are multiples of 4 with odd parts above 1, so each is at least 12.
    let mut found = None;
    let mut a = 12;
    while a * 12 <= m {
        let b = m / a;
        if m.is_multiple_of(a)
            && b.is_multiple_of(4)
            && !a.is_power_of_two()
            && !b.is_power_of_two()
            && let Some(first) = base(a)
            && let Some(rest) = core(b, memo)
        {
            let mut cores = vec![first];
            cores.extend(rest);
            found = Some(cores);
            break;
        }
        a += 4;
    }
    memo.insert(m, found.clone());
    found
}

/// The base construction of order `m` (not a power of two), preferring Paley I, then
/// Paley II, then the stored Williamson quadruples.
fn base(m: usize) -> Option<Base> {
    if !m.is_multiple_of(4) || m.is_power_of_two() {
        return None;
    }
    let q = m - 1;
    if q % 4 == 3
        && let Some((p, k)) = prime_power(q)
    {
        return Some(Base::Paley1 { q, p, k });
    }
    let q = m / 2 - 1;
    if m % 8 == 4
        && q % 4 == 1
        && let Some((p, k)) = prime_power(q)
    {
        return Some(Base::Paley2 { q, p, k });
    }
    WILLIAMSON
        .iter()
        .position(|w| 4 * w.m == m)
        .map(|index| Base::Williamson { index })
}

/// `Some((p, k))` when `q = p^k` for a prime `p` and `k >= 1` (trial division).
fn prime_power(q: usize) -> Option<(usize, u32)> {
    if q < 2 {
        return None;
    }
    let mut p = 2;
    while p * p <= q && !q.is_multiple_of(p) {
        p += 1;
    }
    if !q.is_multiple_of(p) {
        return Some((q, 1)); // no divisor up to sqrt(q): q is prime
    }
    let (mut rest, mut k) = (q, 0);
    while rest.is_multiple_of(p) {
        rest /= p;
        k += 1;
    }
    (rest == 1).then_some((p, k))
}

// ---------------------------------------------------------------------------------------
// Building.

fn build(plan: &Plan) -> Hadamard {
    let core_factors: Vec<(usize, Vec<i8>)> = plan
        .cores
        .iter()
        .map(|&b| (b.order(), base_matrix(b)))
        .collect();
    let mut core: Option<(Vec<i8>, usize)> = None;
    for (order, m) in &core_factors {
        core = Some(match core {
            None => (m.clone(), *order),
            Some((k, ko)) => (kron(&k, ko, m, *order), ko * order),
        });
    }
    let s = plan.sylvester;
    let entries = match core {
        None => sylvester(s),
        Some((k, _)) if s == 1 => k,
        Some((k, ko)) => kron(&k, ko, &sylvester(s), s),
    };
    Hadamard {
        n: plan.order(),
        entries,
        sylvester: s,
        core_factors,
        construction: plan.describe(),
    }
}

fn base_matrix(b: Base) -> Vec<i8> {
    match b {
        Base::Paley1 { q, p, k } => paley1(&Field::new(p, k), q),
        Base::Paley2 { q, p, k } => paley2(&Field::new(p, k), q),
        Base::Williamson { index } => williamson(&WILLIAMSON[index]),
    }
}

/// `A ⊗ B` for square row-major `A` (order `na`) and `B` (order `nb`): entry
/// `(i1·nb + i2, j1·nb + j2)` is `A[i1][j1] · B[i2][j2]`.
fn kron(a: &[i8], na: usize, b: &[i8], nb: usize) -> Vec<i8> {
    let n = na * nb;
    let b_neg: Vec<i8> = b.iter().map(|&v| -v).collect();
    let mut out = vec![0i8; n * n];
    for (out_row, r) in out.chunks_exact_mut(n).zip(0..) {
        let a_row = &a[(r / nb) * na..(r / nb + 1) * na];
        let i2 = r % nb;
        let (pos, neg) = (&b[i2 * nb..(i2 + 1) * nb], &b_neg[i2 * nb..(i2 + 1) * nb]);
        for (block, &sign) in out_row.chunks_exact_mut(nb).zip(a_row) {
            block.copy_from_slice(if sign > 0 { pos } else { neg });
        }
    }
    out
}

/// The natural-order Sylvester matrix of order `n` (a power of two), built by Kronecker
/// doubling: `S_{2^(a+b)} = S_{2^a} ⊗ S_{2^b}` because `popcount(i & j)` adds over the
/// high and low bits of the indices.
fn sylvester(n: usize) -> Vec<i8> {
    const DIRECT: usize = 64;
    if n <= DIRECT {
        let mut out = Vec::with_capacity(n * n);
        for i in 0..n {
            out.extend((0..n).map(|j| if (i & j).count_ones() % 2 == 0 { 1 } else { -1 }));
        }
        return out;
    }
    let outer = n / DIRECT;
    kron(&sylvester(outer), outer, &sylvester(DIRECT), DIRECT)
}

/// Paley I, order `q + 1` (`q ≡ 3 mod 4`): `H = I + S` with `S = [[0, 1ᵀ], [-1, Q]]` and the
/// Jacobsthal matrix `Q[a][b] = χ(a - b)` over GF(q) (χ the quadratic character). `χ(-1) =
/// -1` makes `Q`, hence `S`, antisymmetric; `Q Qᵀ = qI - J` and `Q J = 0` give
/// `S Sᵀ = qI`, so `H Hᵀ = I + S + Sᵀ + S Sᵀ = (q + 1) I`.
fn paley1(field: &Field, q: usize) -> Vec<i8> {
    let n = q + 1;
    let mut out = vec![0i8; n * n];
    out[..n].fill(1);
    jacobsthal_rows(field, |a, q_row| {
        let row = &mut out[(a + 1) * n..(a + 2) * n];
        row[0] = -1;
        row[1..].copy_from_slice(q_row);
        row[a + 1] = 1;
    });
    out
}

/// Paley II, order `2(q + 1)` (`q ≡ 1 mod 4`): the symmetric conference matrix
/// `C = [[0, 1ᵀ], [1, Q]]` (`χ(-1) = 1` makes `Q` symmetric; `C Cᵀ = qI`) with each entry
/// replaced by a 2x2 block: `0 -> [[1, -1], [-1, -1]]`, `±1 -> ±[[1, 1], [1, -1]]`, i.e.
/// `H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]`.
fn paley2(field: &Field, q: usize) -> Vec<i8> {
    let c = q + 1;
    let n = 2 * c;
    let mut out = vec![0i8; n * n];
    // Conference-matrix row `i` becomes output rows 2i and 2i + 1.
    let mut put_row = |i: usize, conf: &[i8]| {
        let (top, bottom) = out[2 * i * n..(2 * i + 2) * n].split_at_mut(n);
        for ((t, b), &v) in top
            .chunks_exact_mut(2)
            .zip(bottom.chunks_exact_mut(2))
            .zip(conf)
        {
            let (tv, bv) = if v == 0 {
                ([1, -1], [-1, -1])
            } else {
                ([v, v], [v, -v])
            };
            t.copy_from_slice(&tv);
            b.copy_from_slice(&bv);
        }
    };
    let mut conf = vec![1i8; c];
    conf[0] = 0;
    put_row(0, &conf);
    conf[0] = 1;
    jacobsthal_rows(field, |a, q_row| {
        conf[1..].copy_from_slice(q_row);
        put_row(a + 1, &conf);
    });
    out
}

/// Calls `f(a, row)` for each row `a` of the Jacobsthal matrix `Q[a][b] = χ(a - b)` of
/// GF(q), elements numbered by their base-`p` digits; subtraction is digitwise mod `p`.
///
/// Each row is assembled from contiguous copies instead of entry by entry:
/// - prime field: row `a` is the reversed character `χ(-t)` rotated right by `a`;
/// - `q = p^k`, `k > 1`: with `a = a_hi · P + a_lo` for `P = p^L` (the `L` low digits,
///   `P <= 256`), the `P` entries of row `a` at `b_hi` are those of the template row
///   `T_{a_lo}[h · P + b_lo] = χ(h · P + (a_lo - b_lo))` at `h = a_hi - b_hi`; the `P`
///   templates (`P · q` bytes) are built once, and `a_hi - b_hi` is kept digit by digit
///   while `b_hi` counts up.
fn jacobsthal_rows(field: &Field, mut f: impl FnMut(usize, &[i8])) {
    let (p, q) = (field.p, field.q);
    let chi = field.quadratic_character();
    let mut row = vec![0i8; q];
    if field.k == 1 {
        let rev: Vec<i8> = (0..q).map(|t| chi[(q - t) % q]).collect();
        for a in 0..q {
            // row[b] = χ(a - b) = rev[(b - a) mod q].
            row[..a].copy_from_slice(&rev[q - a..]);
            row[a..].copy_from_slice(&rev[..q - a]);
            f(a, &row);
        }
        return;
    }
    let k = field.k as usize;
    let low = (1..=k)
        .take_while(|&l| p.pow(l as u32) <= 256)
        .last()
        .unwrap_or(1);
    let big_p = p.pow(low as u32);
    let mut low_a = vec![0usize; low];
    let mut low_b = vec![0usize; low];
    let mut templates = vec![0i8; big_p * q];
    for (a_lo, template) in templates.chunks_exact_mut(q).enumerate() {
        field.digits(a_lo, &mut low_a);
        for b_lo in 0..big_p {
            field.digits(b_lo, &mut low_b);
            let d: usize = (0..low)
                .map(|i| (low_a[i] + p - low_b[i]) % p * field.weight[i])
                .sum();
            for h in 0..q / big_p {
                template[h * big_p + b_lo] = chi[h * big_p + d];
            }
        }
    }
    let high = k - low;
    let mut diff = vec![0usize; high];
    let mut b_digits = vec![0usize; high];
    for a in 0..q {
        let (a_lo, a_hi) = (a % big_p, a / big_p);
        let template = &templates[a_lo * q..(a_lo + 1) * q];
        field.digits(a_hi, &mut diff);
        b_digits.fill(0);
        let mut h = a_hi; // a_hi - b_hi
        for dst in row.chunks_exact_mut(big_p) {
            dst.copy_from_slice(&template[h * big_p..(h + 1) * big_p]);
            // b_hi += 1: each digit that moves lowers the matching digit of a_hi - b_hi.
            for i in 0..high {
                let old = diff[i];
                let new = if old == 0 { p - 1 } else { old - 1 };
                diff[i] = new;
                h = h - old * field.weight[i] + new * field.weight[i];
                b_digits[i] += 1;
                if b_digits[i] < p {
                    break;
                }
                b_digits[i] = 0;
            }
        }
        f(a, &row);
    }
}

/// GF(p^k), elements numbered `Σ c_i p^i` for the polynomial `Σ c_i x^i` of degree < k,
/// multiplied modulo a monic irreducible polynomial of degree `k` (the first in counting
/// order, so the numbering is deterministic; χ does not depend on the choice).
struct Field {
    p: usize,
    k: u32,
    q: usize,
    /// `p^i`.
    weight: Vec<usize>,
    /// The low coefficients `c_0 .. c_{k-1}` of the modulus `x^k + Σ c_i x^i`.
    modulus: Vec<usize>,
}

impl Field {
    fn new(p: usize, k: u32) -> Field {
        let q = p.pow(k);
        let weight = (0..k).map(|i| p.pow(i)).collect();
        let modulus = irreducible(p, k as usize);
        Field {
            p,
            k,
            q,
            weight,
            modulus,
        }
    }

    fn digits(&self, mut x: usize, out: &mut [usize]) {
        for d in out.iter_mut() {
            *d = x % self.p;
            x /= self.p;
        }
    }

    /// `χ(x)` for every element: 0 for 0, 1 for a nonzero square, -1 otherwise.
    fn quadratic_character(&self) -> Vec<i8> {
        let mut chi = vec![-1i8; self.q];
        chi[0] = 0;
        let k = self.k as usize;
        let mut y = vec![0usize; k];
        let mut prod = vec![0usize; 2 * k];
        for x in 1..self.q {
            self.digits(x, &mut y);
            // y² as a polynomial of degree < 2k - 1, then reduced modulo the modulus.
            prod.fill(0);
            for i in 0..k {
                for j in 0..k {
                    prod[i + j] = (prod[i + j] + y[i] * y[j]) % self.p;
                }
            }
            for d in (k..2 * k).rev() {
                let c = prod[d];
                if c != 0 {
                    // x^d = x^(d-k) · x^k = -x^(d-k) Σ m_i x^i.
                    for (i, &m) in self.modulus.iter().enumerate() {
                        let sub = c * m % self.p;
                        prod[d - k + i] = (prod[d - k + i] + self.p - sub) % self.p;
                    }
                    prod[d] = 0;
                }
            }
            let sq: usize = prod[..k].iter().zip(&self.weight).map(|(c, w)| c * w).sum();
            chi[sq] = 1;
        }
        chi
    }
}

/// The low coefficients of the first monic irreducible polynomial of degree `k` over
/// GF(p), counting `c_0 + c_1 p + ...` up (for `k = 1`: `x`, giving the integers mod p).
/// Irreducible means no monic factor of degree `1..=k/2`, checked by trial division.
fn irreducible(p: usize, k: usize) -> Vec<usize> {
    if k == 1 {
        return vec![0];
    }
    let count = p.pow(k as u32);
    let mut f = vec![0usize; k + 1];
    for code in 0..count {
        let mut c = code;
        for d in f.iter_mut().take(k) {
            *d = c % p;
            c /= p;
        }
        f[k] = 1;
        if f[0] != 0 && !has_small_factor(&f, p) {
            f.truncate(k);
            return f;
        }
    }
    // Unreachable: GF(p^k) exists for every prime p and k >= 1.
    vec![0; k]
}

/// Whether the monic `f` (coefficients low to high) has a monic factor of degree
/// `1..=deg(f)/2` over GF(p).
fn has_small_factor(f: &[usize], p: usize) -> bool {
    let deg = f.len() - 1;
    for d in 1..=deg / 2 {
        let mut g = vec![0usize; d + 1];
        for code in 0..p.pow(d as u32) {
            let mut c = code;
            for x in g.iter_mut().take(d) {
                *x = c % p;
                c /= p;
            }
            g[d] = 1;
            if poly_rem_is_zero(f, &g, p) {
                return true;
            }
        }
    }
    false
}

/// Whether the monic `g` divides `f` over GF(p).
fn poly_rem_is_zero(f: &[usize], g: &[usize], p: usize) -> bool {
    let mut r = f.to_vec();
    let dg = g.len() - 1;
    for top in (dg..r.len()).rev() {
        let c = r[top];
        if c != 0 {
            for (i, &gi) in g.iter().enumerate() {
                let idx = top - dg + i;
                r[idx] = (r[idx] + p - c * gi % p) % p;
            }
        }
    }
    r.iter().all(|&c| c == 0)
}

/// Four symmetric circulant ±1 matrices `A, B, C, D` of order `m` with
/// `A² + B² + C² + D² = 4m I`; by symmetry only entries `0..=(m-1)/2` of each first row
/// are stored (`+`/`-`), entry `m - i` equal to entry `i`.
#[derive(Debug)]
struct Williamson {
    m: usize,
    half_rows: [&'static str; 4],
}

/// Williamson quadruples for the orders that neither Paley construction nor a Kronecker
/// product reaches up to 256. First rows as tabulated in SageMath's `hadamard_matrix.py`
/// (`williamson_type_quadruples_smallcases`), which cites M. Hall, *Combinatorial Theory*
/// (2nd ed., 1986) for m = 23, 29, 43 and S. London's 2013 thesis for m = 39; stored here
/// as half rows. The test `williamson_quadruples` checks symmetry and that the periodic
/// autocorrelations add to 0 at every nonzero shift (equivalent to the sum of squares),
/// and the order tests check `H Hᵀ = 4m I` of the assembled matrix.
static WILLIAMSON: [Williamson; 4] = [
    Williamson {
        m: 23,
        half_rows: [
            "++---+---+-+",
            "+-++-++--+++",
            "+++---++-+-+",
            "+++-+++-+---",
        ],
    },
    Williamson {
        m: 29,
        half_rows: [
            "+++---++--+-+--",
            "+-+---++--+-+++",
            "++++-++-+---+++",
            "++--+--+-+++-++",
        ],
    },
    Williamson {
        m: 39,
        half_rows: [
            "+++--+-+-----+--++--",
            "+++--++-+---+-+--+--",
            "++++---+--++----+-+-",
            "+---++-+-+-----+++-+",
        ],
    },
    Williamson {
        m: 43,
        half_rows: [
            "++---++++-+--+--++----",
            "+++-+-++--+-+-++++-+--",
            "++-++++++----+-+--++-+",
            "+---++--++++-+-+++-++-",
        ],
    },
];

impl Williamson {
    /// The full first row of circulant `which` (0..4 for A..D).
    fn first_row(&self, which: usize) -> Vec<i8> {
        let half: Vec<i8> = self.half_rows[which]
            .bytes()
            .map(|c| if c == b'-' { -1 } else { 1 })
            .collect();
        (0..self.m)
            .map(|i| half.get(i.min(self.m - i)).copied().unwrap_or(1))
            .collect()
    }
}

/// The Williamson array
/// ```text
/// [  A  B  C  D ]
/// [ -B  A -D  C ]
/// [ -C  D  A -B ]
/// [ -D -C  B  A ]
/// ```
/// of symmetric (hence pairwise commuting) circulants: off-diagonal block rows cancel in
/// pairs such as `-A Bᵀ + B Aᵀ = BA - AB = 0`, and each diagonal block is
/// `A² + B² + C² + D² = 4m I`.
fn williamson(w: &Williamson) -> Vec<i8> {
    const LAYOUT: [[(usize, i8); 4]; 4] = [
        [(0, 1), (1, 1), (2, 1), (3, 1)],
        [(1, -1), (0, 1), (3, -1), (2, 1)],
        [(2, -1), (3, 1), (0, 1), (1, -1)],
        [(3, -1), (2, -1), (1, 1), (0, 1)],
    ];
    let m = w.m;
    let n = 4 * m;
    let rows: Vec<Vec<i8>> = (0..4).map(|x| w.first_row(x)).collect();
    let mut out = vec![0i8; n * n];
    for (bi, layout_row) in LAYOUT.iter().enumerate() {
        for i in 0..m {
            let row = &mut out[(bi * m + i) * n..(bi * m + i + 1) * n];
            for (bj, &(which, sign)) in layout_row.iter().enumerate() {
                // Circulant: X[i][j] = x[(j - i) mod m].
                for j in 0..m {
                    row[bj * m + j] = sign * rows[which][(j + m - i) % m];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `H Hᵀ == n I` exactly: rows packed as bits (bit set for -1), so the dot product of
    /// rows `i` and `j` is `n - 2 · popcount(r_i XOR r_j)`; pairs `i <= j` only, the
    /// product being symmetric.
    fn assert_orthogonal(h: &[i8], n: usize, what: &str) {
        assert_eq!(h.len(), n * n, "{what}");
        assert!(h.iter().all(|&e| e == 1 || e == -1), "{what}: entries ±1");
        let words = n.div_ceil(64);
        let mut bits = vec![0u64; n * words];
        for (i, &e) in h.iter().enumerate() {
            if e < 0 {
                let (r, c) = (i / n, i % n);
                bits[r * words + c / 64] |= 1 << (c % 64);
            }
        }
        for i in 0..n {
            let ri = &bits[i * words..(i + 1) * words];
            for j in i..n {
                let rj = &bits[j * words..(j + 1) * words];
                let differ: u32 = ri.iter().zip(rj).map(|(a, b)| (a ^ b).count_ones()).sum();
                let dot = n as i64 - 2 * i64::from(differ);
                let want = if i == j { n as i64 } else { 0 };
                assert_eq!(dot, want, "{what}: rows {i} and {j}");
            }
        }
    }

    /// Prime powers `q ≡ r (mod 4)` up to `max`.
    fn prime_powers(r: usize, max: usize) -> Vec<usize> {
        (2..=max)
            .filter(|&q| q % 4 == r && prime_power(q).is_some())
            .collect()
    }

    #[test]
    fn paley_constructions_over_prime_fields_and_extensions() {
        // Every q up to 255 (order <= 256 for Paley I, <= 512 for Paley II): this includes
        // GF(9), GF(25), GF(27), GF(49), GF(81), GF(121), GF(125), GF(243).
        for q in prime_powers(3, 255) {
            let (p, k) = prime_power(q).unwrap();
            assert_orthogonal(
                &paley1(&Field::new(p, k), q),
                q + 1,
                &format!("paley1({q})"),
            );
        }
        for q in prime_powers(1, 125) {
            let (p, k) = prime_power(q).unwrap();
            let n = 2 * (q + 1);
            assert_orthogonal(&paley2(&Field::new(p, k), q), n, &format!("paley2({q})"));
        }
    }

    #[test]
    fn fields_have_half_their_nonzero_elements_square() {
        for (p, k) in [
            (3, 2),
            (3, 3),
            (5, 2),
            (7, 2),
            (3, 5),
            (5, 3),
            (13, 2),
            (3, 7),
        ] {
            let f = Field::new(p, k);
            let chi = f.quadratic_character();
            let squares = chi.iter().filter(|&&c| c == 1).count();
            assert_eq!(squares, (f.q - 1) / 2, "GF({p}^{k})");
            // -1 is a square exactly when q ≡ 1 (mod 4); -1 is numbered (p-1)·1.
            assert_eq!(chi[p - 1] == 1, f.q % 4 == 1, "GF({p}^{k})");
        }
        assert_eq!(irreducible(3, 2), vec![1, 0]); // x² + 1 over GF(3)
        assert_eq!(prime_power(27), Some((3, 3)));
        assert_eq!(prime_power(75), None);
        assert_eq!(prime_power(1), None);
        assert_eq!(prime_power(2), Some((2, 1)));
    }

    #[test]
    fn williamson_quadruples() {
        for w in &WILLIAMSON {
            let m = w.m;
            let rows: Vec<Vec<i8>> = (0..4).map(|x| w.first_row(x)).collect();
            for (x, r) in rows.iter().enumerate() {
                assert_eq!(w.half_rows[x].len(), m.div_ceil(2), "m = {m}");
                assert!(w.half_rows[x].bytes().all(|c| c == b'+' || c == b'-'));
                assert!((1..m).all(|i| r[i] == r[m - i]), "m = {m}: symmetric");
            }
            for shift in 1..m {
                let paf: i32 = rows
                    .iter()
                    .map(|r| {
                        (0..m)
                            .map(|i| i32::from(r[i] * r[(i + shift) % m]))
                            .sum::<i32>()
                    })
                    .sum();
                assert_eq!(paf, 0, "m = {m}, shift {shift}");
            }
            assert_orthogonal(&williamson(w), 4 * m, &format!("williamson({m})"));
        }
    }

    #[test]
    fn powers_of_two_are_natural_order_sylvester() {
        for k in 0..=12 {
            let n = 1usize << k;
            let h = hadamard(n).unwrap();
            assert!(h.is_sylvester());
            assert_eq!(h.sylvester_factor(), n);
            assert_eq!(h.construction(), format!("sylvester({n})"));
            // Every row up to 1024, every 17th above.
            for i in (0..n).step_by(if n <= 1024 { 1 } else { 17 }) {
                let row = h.row(i);
                for (j, &e) in row.iter().enumerate() {
                    let want = if (i & j).count_ones() % 2 == 0 { 1 } else { -1 };
                    assert_eq!(e, want, "n = {n}, ({i}, {j})");
                }
            }
            if n <= 1024 {
                assert_orthogonal(h.entries(), n, &format!("sylvester({n})"));
            }
        }
    }

    /// The orders 4k <= 256 that no construction reaches (the module documentation's list).
    #[test]
    fn uncovered_orders_up_to_256() {
        let missing: Vec<usize> = (1..=64)
            .map(|k| 4 * k)
            .filter(|&n| !constructible(n))
            .collect();
        assert_eq!(missing, vec![188, 236]);
    }

    #[test]
    fn every_covered_order_up_to_256_is_orthogonal() {
        for n in [1, 2].into_iter().chain((1..=64).map(|k| 4 * k)) {
            if let Ok(h) = hadamard(n) {
                assert_eq!(h.order(), n);
                assert_orthogonal(h.entries(), n, h.construction());
                assert_eq!(h.is_sylvester(), n.is_power_of_two(), "n = {n}");
            }
        }
    }

    #[test]
    fn cores_of_576() {
        assert_eq!(cores(576), vec![36, 72, 144, 288, 576]);
        for m in cores(576) {
            let h = hadamard_with_core(576, m).unwrap();
            assert_eq!(h.sylvester_factor(), 576 / m);
            // Orthogonal rows (sampled pairs; the full check is O(n³)).
            for (i, j) in [(0, 1), (5, 300), (17, 575), (100, 100)] {
                let dot: i64 = (0..576).map(|k| (h.get(i, k) * h.get(j, k)) as i64).sum();
                assert_eq!(dot, if i == j { 576 } else { 0 }, "core {m}: rows {i}, {j}");
            }
        }
        assert_eq!(hadamard_with_core(576, 36).unwrap(), hadamard(576).unwrap());
        assert_eq!(
            hadamard_with_core(576, 48).unwrap_err().to_string(),
            "48 is not a core of a Hadamard matrix of order 576 (cores: 36, 72, 144, 288, 576)"
        );
    }

    #[test]
    fn base_orders() {
        let cases = [
            (12, "paley1(11)"),
            (20, "paley1(19)"),
            (28, "paley1(27)"),
            (36, "paley2(17)"),
            (40, "paley1(19) ⊗ sylvester(2)"),
            (52, "paley2(25)"),
            (60, "paley1(59)"),
            (92, "williamson(23)"),
            (108, "paley1(107)"),
            (116, "williamson(29)"),
            (140, "paley1(139)"),
            (156, "williamson(39)"),
            (172, "williamson(43)"),
            (184, "williamson(23) ⊗ sylvester(2)"),
            (232, "williamson(29) ⊗ sylvester(2)"),
        ];
        for (n, want) in cases {
            let h = hadamard(n).unwrap();
            assert_eq!(h.construction(), want, "n = {n}");
            assert!(!h.is_sylvester());
        }
    }

    /// Large orders: up to 768 the full product `H Hᵀ = n I` is checked exactly; every
    /// order is also checked by structure, which is what covers the larger ones without an
    /// O(n³) product: the plan's core is built and checked exactly (`H_m H_mᵀ = m I`), 24
    /// sampled rows of `H` match `H_m ⊗ Sylvester(s)` entry by entry (a Kronecker product
    /// of Hadamard matrices is Hadamard), and 24 sampled row pairs (and each sampled row
    /// with itself) have the dot product `n δ`.
    #[test]
    fn large_orders_by_structure() {
        let cases = [
            (576, "paley2(17) ⊗ sylvester(16)"),
            (640, "paley1(19) ⊗ sylvester(32)"),
            (768, "paley1(11) ⊗ sylvester(64)"),
            (1536, "paley1(11) ⊗ sylvester(128)"),
            (2304, "paley2(17) ⊗ sylvester(64)"),
            (3584, "paley1(27) ⊗ sylvester(128)"),
            (4864, "paley2(37) ⊗ sylvester(64)"),
            (5120, "paley1(19) ⊗ sylvester(256)"),
            (11008, "williamson(43) ⊗ sylvester(64)"),
            (2048, "sylvester(2048)"),
            (8192, "sylvester(8192)"),
        ];
        let mut state = 7u64;
        for (n, want) in cases {
            let h = hadamard(n).unwrap();
            assert_eq!(h.order(), n);
            assert_eq!(h.construction(), want);
            if n <= 768 {
                assert_orthogonal(h.entries(), n, want);
            }
            let s = h.sylvester_factor();
            let m = n / s;
            let core = hadamard(m).unwrap();
            assert_orthogonal(core.entries(), m, core.construction());
            let syl = hadamard(s).unwrap();
            assert!(syl.is_sylvester());
            let rows: Vec<usize> = (0..24)
                .map(|_| (splitmix64(&mut state) % n as u64) as usize)
                .collect();
            for &i in &rows {
                for (j, &e) in h.row(i).iter().enumerate() {
                    assert_eq!(e, core.get(i / s, j / s) * syl.get(i % s, j % s), "{n}");
                }
            }
            for pair in rows.windows(2) {
                for (a, b) in [(pair[0], pair[1]), (pair[0], pair[0])] {
                    let dot: i64 = h
                        .row(a)
                        .iter()
                        .zip(h.row(b))
                        .map(|(&x, &y)| i64::from(x * y))
                        .sum();
                    assert_eq!(dot, if a == b { n as i64 } else { 0 }, "{n}: rows {a}, {b}");
                }
            }
        }
    }

    #[test]
    fn normalized_matrices_are_orthogonal() {
        for n in [1, 2, 12, 20, 28, 64, 92, 156, 172] {
            let h = hadamard(n).unwrap();
            let (m64, m32) = (h.normalized_f64(), h.normalized_f32());
            for i in 0..n {
                for j in 0..n {
                    let dot: f64 = (0..n).map(|t| m64[i * n + t] * m64[j * n + t]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-12, "{n}: ({i}, {j}) {dot}");
                    let e = f64::from(h.get(i, j)) / (n as f64).sqrt();
                    assert!((f64::from(m32[i * n + j]) - e).abs() <= 1e-7 * e.abs());
                }
            }
        }
    }

    #[test]
    fn not_sylvester() {
        for n in [12, 24, 156, 576] {
            assert!(!hadamard(n).unwrap().is_sylvester(), "{n}");
        }
    }

    #[test]
    fn errors_name_the_nearest_orders() {
        let e = hadamard(6).unwrap_err();
        assert_eq!(
            e,
            HadamardError::NoConstruction {
                n: 6,
                below: Some(4),
                above: Some(8)
            }
        );
        assert_eq!(
            e.to_string(),
            "no Hadamard matrix of order 6: orders must be 1, 2 or a multiple of 4 that \
             perqc can construct; nearest: 4 and 8"
        );
        let e = hadamard(0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no Hadamard matrix of order 0: orders must be 1, 2 or a multiple of 4 that \
             perqc can construct; nearest above: 1"
        );
        let e = hadamard(188).unwrap_err();
        assert_eq!(
            e,
            HadamardError::NoConstruction {
                n: 188,
                below: Some(184),
                above: Some(192)
            }
        );
        let text = e.to_string();
        assert!(
            text.starts_with("no Hadamard matrix of order 188: "),
            "{text}"
        );
        assert!(text.ends_with("; nearest: 184 and 192"), "{text}");
        assert_eq!(
            hadamard(3).unwrap_err(),
            HadamardError::NoConstruction {
                n: 3,
                below: Some(2),
                above: Some(4)
            }
        );
        assert_eq!(
            hadamard(MAX_ORDER + 1).unwrap_err(),
            HadamardError::TooLarge {
                n: MAX_ORDER + 1,
                max: MAX_ORDER
            }
        );
        // The nearest order above may not exist within the limit.
        match hadamard(MAX_ORDER - 1).unwrap_err() {
            HadamardError::NoConstruction { below, above, .. } => {
                assert_eq!(above, Some(MAX_ORDER));
                assert!(below.is_some_and(|b| b < MAX_ORDER - 1 && constructible(b)));
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn no_panics_and_cheap_errors_for_any_order() {
        for n in [
            usize::MAX,
            usize::MAX - 3,
            1 << 40,
            MAX_ORDER + 4,
            2 * MAX_ORDER,
        ] {
            assert!(!constructible(n));
            assert!(matches!(hadamard(n), Err(HadamardError::TooLarge { .. })));
        }
        // Orders that are not multiples of 4 fail without building anything.
        for n in (0..=4096)
            .chain(MAX_ORDER - 64..=MAX_ORDER)
            .filter(|&n| n % 4 != 0 && n > 2)
        {
            assert!(hadamard(n).is_err());
        }
    }

    #[test]
    fn constructible_agrees_with_hadamard() {
        for n in 0..=512 {
            let built = hadamard(n);
            assert_eq!(constructible(n), built.is_ok(), "n = {n}");
            if let Ok(h) = built {
                assert_eq!(h.order(), n);
                assert_eq!(h.entries().len(), n * n);
            }
        }
    }

    #[test]
    fn random_signs_are_deterministic_prefixes() {
        let a = random_signs(1000, 42);
        assert_eq!(a, random_signs(1000, 42));
        assert_eq!(&a[..100], &random_signs(100, 42)[..]);
        assert_ne!(a, random_signs(1000, 43));
        assert!(a.iter().all(|&s| s == 1.0 || s == -1.0));
        let plus = a.iter().filter(|&&s| s > 0.0).count();
        assert!((430..=570).contains(&plus), "{plus} of 1000 positive");
        assert!(random_signs(0, 1).is_empty());
    }

    #[test]
    fn fwht_matches_the_dense_sylvester_product() {
        for k in 0..=10 {
            let n = 1usize << k;
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 + 11) % 23) as f32 - 11.0).collect();
            let mut y = x.clone();
            fwht_normalized(&mut y).unwrap();
            let h = hadamard(n).unwrap().normalized_f64();
            for (i, &yi) in y.iter().enumerate() {
                let want: f64 = (0..n).map(|j| h[i * n + j] * f64::from(x[j])).sum();
                let tol = 1e-5 * (1.0 + want.abs());
                assert!((f64::from(yi) - want).abs() < tol, "n = {n}, i = {i}");
            }
        }
        for len in [0, 3, 6, 12] {
            let mut x = vec![1.0f32; len];
            assert_eq!(
                fwht_normalized(&mut x),
                Err(HadamardError::NotPowerOfTwo { len })
            );
            assert!(x.iter().all(|&v| v == 1.0));
        }
    }
}
