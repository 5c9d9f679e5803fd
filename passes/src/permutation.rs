//! Channel permutations that balance activation mass across rotation blocks (PeRQ,
//! arXiv 2601.22347).
//!
//! # Convention
//!
//! A permutation of `n` channels is a `Vec<usize>` `perm` holding each of `0..n` exactly once,
//! read as: **new channel position `p` holds old channel `perm[p]`**. Permuting an activation
//! `x` (channels on its last axis) gives
//!
//! ```text
//! x'[.., p] = x[.., perm[p]]        i.e. x' = x P  with the n x n matrix P[perm[p], p] = 1.
//! ```
//!
//! P is orthogonal (P Pᵀ = I), so a weight reading `x` (`y = x W`, `W` of shape `[n, out]`)
//! keeps the product with its rows permuted the same way, `W'[p, :] = W[perm[p], :]`
//! (`x' W' = x P Pᵀ W = x W`), and a weight writing `x` (`x = u V`, `V` of shape `[in, n]`)
//! gets its output columns permuted, `V'[:, p] = V[:, perm[p]]`. [`inverse`] gives the
//! other direction: `inverse(perm)[c]` is the new position of old channel `c`.
//!
//! # Blocks
//!
//! With block size `b` (which must divide `n`), positions `k·b .. (k+1)·b` form rotation
//! block `k`, for `k < B = n / b`. The mass of a block is the sum of its channels' masses;
//! MassDiff and Absmax make those sums as even as a greedy rule can.

use perqc_ops::stats::ChannelStats;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;

/// How to order the channels of a region before block rotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PermuteMethod {
    /// Greedy balance of mean |x| (the paper's method). With `m_c` = mean |x_c|: visit the
    /// channels by decreasing `m_c` (ties: lower channel first) and put each into the
    /// non-full block `k` with the least `M_k = Σ_{c ∈ block k} m_c` so far (ties: lower
    /// `k`); inside a block, channels keep the order they were put in.
    #[default]
    MassDiff,
    /// Snake dealing: with channels sorted by decreasing mean |x| (ties: lower channel
    /// first), the `i`-th goes to block `i mod B` on even rounds `⌊i/B⌋` and to block
    /// `B-1 - (i mod B)` on odd ones, at position `⌊i/B⌋` of its block.
    Zigzag,
    /// MassDiff's rule with `m_c` = max |x_c| instead of mean |x_c|. The choice: a rotated
    /// block's largest value is bounded by its channels' peaks, `|(H x_k)_i| ≤ (1/√b)
    /// Σ_{c ∈ block k} max |x_c|` for a normalized Hadamard `H`, so balancing the summed peaks
    /// balances that bound (what sets the quantization range), where MassDiff balances the
    /// typical magnitude.
    Absmax,
    /// A uniform shuffle (Fisher-Yates driven by splitmix64 from `seed`): the same seed gives
    /// the same permutation on every platform.
    Random { seed: u64 },
    /// `perm[p] = p`.
    Identity,
}

/// The names [`PermuteMethod::from_str`] accepts, for messages and `--help`.
pub const METHOD_NAMES: &str = "massdiff, zigzag, absmax, random, random(seed=N), identity";

impl PermuteMethod {
    /// Whether the method reads the statistics (all but `random` and `identity`).
    pub fn uses_statistics(&self) -> bool {
        matches!(
            self,
            PermuteMethod::MassDiff | PermuteMethod::Zigzag | PermuteMethod::Absmax
        )
    }
}

impl fmt::Display for PermuteMethod {
    /// The name [`FromStr`] reads back: `massdiff`, `zigzag`, `absmax`, `random(seed=N)`,
    /// `identity`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PermuteMethod::MassDiff => f.write_str("massdiff"),
            PermuteMethod::Zigzag => f.write_str("zigzag"),
            PermuteMethod::Absmax => f.write_str("absmax"),
            PermuteMethod::Random { seed } => write!(f, "random(seed={seed})"),
            PermuteMethod::Identity => f.write_str("identity"),
        }
    }
}

impl FromStr for PermuteMethod {
    type Err = PermuteError;

    /// `massdiff`, `zigzag`, `absmax`, `random` (seed 0), `random(seed=N)` or `identity`;
    /// surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<PermuteMethod, PermuteError> {
        let text = s.trim();
        Ok(match text {
            "massdiff" => PermuteMethod::MassDiff,
            "zigzag" => PermuteMethod::Zigzag,
            "absmax" => PermuteMethod::Absmax,
            "random" => PermuteMethod::Random { seed: 0 },
            "identity" => PermuteMethod::Identity,
            _ => {
                let Some(inner) = text
                    .strip_prefix("random(")
                    .and_then(|r| r.strip_suffix(')'))
                else {
                    return Err(PermuteError::UnknownMethod(text.to_string()));
                };
                let seed = inner
                    .split_once('=')
                    .filter(|(key, _)| key.trim() == "seed")
                    .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| PermuteError::BadOption(text.to_string()))?;
                PermuteMethod::Random { seed }
            }
        })
    }
}

/// Why no permutation could be made. Messages name the value, channel or block at fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PermuteError {
    #[error("unknown permutation method `{0}`; the methods are {METHOD_NAMES}")]
    UnknownMethod(String),
    #[error(
        "permutation method `{0}`: random takes one option, seed=N (N an unsigned 64-bit integer)"
    )]
    BadOption(String),
    #[error("{}", block_message(*.block, *.channels, .fits))]
    Block {
        block: usize,
        channels: usize,
        /// The block sizes that divide `channels`, ascending: all of them if there are at most
        /// 8, else the 6 nearest `block`.
        fits: Vec<usize>,
    },
    #[error(
        "the statistics disagree on the channel count: {mean_abs} mean |x| values, {max_abs} max |x| values"
    )]
    Channels { mean_abs: usize, max_abs: usize },
    #[error("no channels to permute")]
    NoChannels,
    #[error("{method} needs statistics, but they were computed from 0 rows")]
    NoRows { method: PermuteMethod },
    #[error("{what} of channel {channel} is {value}; the statistics must be finite")]
    NonFinite {
        what: &'static str,
        channel: usize,
        value: f64,
    },
    #[error("not a permutation of 0..{len}: {detail}")]
    NotPermutation { len: usize, detail: String },
}

fn block_message(block: usize, channels: usize, fits: &[usize]) -> String {
    let list = fits
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let total = divisors(channels).len();
    let sizes = if total > fits.len() {
        format!("the nearest of the {total} sizes that divide {channels}: {list}")
    } else {
        format!("sizes that divide {channels}: {list}")
    };
    if block == 0 {
        format!("block size 0: a block needs at least one channel; {sizes}")
    } else {
        format!("block size {block} does not divide {channels} channels; {sizes}")
    }
}

/// The divisors of `n`, ascending.
fn divisors(n: usize) -> Vec<usize> {
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut d = 1;
    while d * d <= n {
        if n.is_multiple_of(d) {
            small.push(d);
            if d * d != n {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// Checks that `block` splits `channels` into whole blocks.
fn check_block(block: usize, channels: usize) -> Result<(), PermuteError> {
    if block != 0 && channels.is_multiple_of(block) {
        return Ok(());
    }
    let mut fits = divisors(channels);
    if fits.len() > 8 {
        fits.sort_by_key(|&d| (d.abs_diff(block), d));
        fits.truncate(6);
        fits.sort_unstable();
    }
    Err(PermuteError::Block {
        block,
        channels,
        fits,
    })
}

/// The permutation `method` gives for a value with statistics `stats`, in blocks of `block`
/// channels (see the module docs for the convention). Errors: `block` is 0 or does not
/// divide the channel count, there are no channels, the statistics are not finite, or a
/// method that reads them finds they saw no rows.
pub fn permutation(
    method: PermuteMethod,
    stats: &ChannelStats,
    block: usize,
) -> Result<Vec<usize>, PermuteError> {
    if method.uses_statistics() && stats.rows() == 0 {
        return Err(PermuteError::NoRows { method });
    }
    permutation_from(method, &stats.mean_abs(), stats.max_abs(), block)
}

/// [`permutation`] from the per-channel mean |x| and max |x| directly (both of length `n`,
/// the channel count).
pub fn permutation_from(
    method: PermuteMethod,
    mean_abs: &[f64],
    max_abs: &[f32],
    block: usize,
) -> Result<Vec<usize>, PermuteError> {
    let n = mean_abs.len();
    if max_abs.len() != n {
        return Err(PermuteError::Channels {
            mean_abs: n,
            max_abs: max_abs.len(),
        });
    }
    if n == 0 {
        return Err(PermuteError::NoChannels);
    }
    check_block(block, n)?;
    let finite = |what: &'static str, values: &mut dyn Iterator<Item = f64>| match values
        .enumerate()
        .find(|(_, v)| !v.is_finite())
    {
        Some((channel, value)) => Err(PermuteError::NonFinite {
            what,
            channel,
            value,
        }),
        None => Ok(()),
    };
    finite("mean |x|", &mut mean_abs.iter().copied())?;
    finite("max |x|", &mut max_abs.iter().map(|&v| v as f64))?;
    let max64 = || max_abs.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    Ok(match method {
        PermuteMethod::MassDiff => balance(mean_abs, block),
        PermuteMethod::Absmax => balance(&max64(), block),
        PermuteMethod::Zigzag => zigzag(mean_abs, block),
        PermuteMethod::Random { seed } => shuffle(n, seed),
        PermuteMethod::Identity => (0..n).collect(),
    })
}

/// `inv` with `inv[perm[p]] = p`: the new position of each old channel. Errors if `perm` is
/// not a permutation of `0..perm.len()`, naming the first entry out of range or repeated.
pub fn inverse(perm: &[usize]) -> Result<Vec<usize>, PermuteError> {
    let n = perm.len();
    let mut inv = vec![usize::MAX; n];
    for (p, &c) in perm.iter().enumerate() {
        let not = |detail: String| PermuteError::NotPermutation { len: n, detail };
        match inv.get(c) {
            None => return Err(not(format!("position {p} holds {c}"))),
            Some(&q) if q != usize::MAX => {
                return Err(not(format!("{c} is at positions {q} and {p}")));
            }
            Some(_) => inv[c] = p,
        }
    }
    Ok(inv)
}

/// The mass of each block after permuting: `M_k = Σ_{p in block k} mass[perm[p]]`, for
/// `k < mass.len() / block`. Errors if `perm` is not a permutation of `0..mass.len()` or
/// `block` does not divide it.
pub fn block_masses(mass: &[f64], perm: &[usize], block: usize) -> Result<Vec<f64>, PermuteError> {
    if perm.len() != mass.len() {
        return Err(PermuteError::NotPermutation {
            len: mass.len(),
            detail: format!("it has {} entries", perm.len()),
        });
    }
    inverse(perm)?;
    check_block(block, mass.len())?;
    Ok(perm
        .chunks(block)
        .map(|b| b.iter().map(|&c| mass[c]).sum())
        .collect())
}

/// Channels by decreasing `mass`, ties by lower index.
fn by_mass(mass: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..mass.len()).collect();
    order.sort_by(|&a, &b| mass[b].total_cmp(&mass[a]).then(a.cmp(&b)));
    order
}

/// A block's accumulated mass, ordered by `total_cmp` (the masses are finite).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Mass(f64);

impl Eq for Mass {}

impl PartialOrd for Mass {
    fn partial_cmp(&self, other: &Mass) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Mass {
    fn cmp(&self, other: &Mass) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The greedy balance of MassDiff and Absmax (`n` a multiple of `block`, both > 0).
/// A min-heap of the non-full blocks keyed by (mass, block index) makes it O(n log B).
fn balance(mass: &[f64], block: usize) -> Vec<usize> {
    let blocks = mass.len() / block;
    let mut open: BinaryHeap<Reverse<(Mass, usize)>> =
        (0..blocks).map(|k| Reverse((Mass(0.0), k))).collect();
    let mut members: Vec<Vec<usize>> = vec![Vec::with_capacity(block); blocks];
    for c in by_mass(mass) {
        // B blocks of b places hold the n = B·b channels: one is open while a channel is left.
        let Some(Reverse((Mass(m), k))) = open.pop() else {
            unreachable!("{blocks} blocks of {block} hold {} channels", mass.len());
        };
        members[k].push(c);
        if members[k].len() < block {
            open.push(Reverse((Mass(m + mass[c]), k)));
        }
    }
    members.concat()
}

/// Snake dealing of the channels by decreasing mean |x| (`n` a multiple of `block`).
fn zigzag(mass: &[f64], block: usize) -> Vec<usize> {
    let blocks = mass.len() / block;
    let mut perm = vec![0; mass.len()];
    for (i, c) in by_mass(mass).into_iter().enumerate() {
        let (round, step) = (i / blocks, i % blocks);
        let k = if round % 2 == 0 {
            step
        } else {
            blocks - 1 - step
        };
        perm[k * block + round] = c;
    }
    perm
}

/// splitmix64 (Steele, Lea, Flood 2014): a 64-bit state stepped by the golden-ratio
/// increment, output mixed; every seed gives a full-period sequence.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `0..bound` (`bound >= 1`): Lemire's multiply-shift, rejecting the low products
/// that would bias it.
fn below(state: &mut u64, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound; // 2^64 mod bound
    loop {
        let m = u128::from(splitmix64(state)) * u128::from(bound);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// Fisher-Yates: for i = n-1 down to 1, swap i with a uniform j in 0..=i.
fn shuffle(n: usize, seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut state = seed;
    for i in (1..n).rev() {
        let j = below(&mut state, i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;
    use perqc_ops::stats::StatsOptions;

    fn mass_only(mean: &[f64], block: usize, method: PermuteMethod) -> Vec<usize> {
        let max: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        permutation_from(method, mean, &max, block).unwrap()
    }

    fn is_permutation(perm: &[usize], n: usize) -> bool {
        perm.len() == n && inverse(perm).is_ok()
    }

    /// Skewed synthetic statistics: a few large outlier channels, the rest small and
    /// uneven (deterministic).
    fn skewed(n: usize, seed: u64) -> (Vec<f64>, Vec<f32>) {
        let mut s = seed;
        let mean: Vec<f64> = (0..n)
            .map(|c| {
                let u = (splitmix64(&mut s) >> 11) as f64 / (1u64 << 53) as f64;
                let base = 0.05 + u * u;
                if c % 37 == 5 { base * 60.0 } else { base }
            })
            .collect();
        let max = mean
            .iter()
            .enumerate()
            .map(|(c, &m)| (m * (3.0 + (c % 7) as f64)) as f32)
            .collect();
        (mean, max)
    }

    fn imbalance(mass: &[f64], perm: &[usize], block: usize) -> f64 {
        let m = block_masses(mass, perm, block).unwrap();
        let max = m.iter().cloned().fold(f64::MIN, f64::max);
        let min = m.iter().cloned().fold(f64::MAX, f64::min);
        max - min
    }

    #[test]
    fn massdiff_hand_worked() {
        // Six channels, blocks of 2 (three blocks). Sorted by mean |x| descending, ties by
        // index: c1 (9), c5 (7), c2 (4), c3 (4), c4 (2), c0 (1). Block masses [M0, M1, M2]:
        //   c1 -> all 0, lowest index: block 0        [9, 0, 0]
        //   c5 -> 1 and 2 tie at 0: block 1            [9, 7, 0]
        //   c2 -> block 2 (0)                          [9, 7, 4]
        //   c3 -> block 2 (4 is least)                 [9, 7, 8]  block 2 full
        //   c4 -> open blocks 0 (9), 1 (7): block 1    [9, 9, 8]  block 1 full
        //   c0 -> only block 0 is open                 [10, 9, 8]
        // Blocks in assignment order: [c1, c0], [c5, c4], [c2, c3].
        let mean = [1.0, 9.0, 4.0, 4.0, 2.0, 7.0];
        let perm = mass_only(&mean, 2, PermuteMethod::MassDiff);
        assert_eq!(perm, [1, 0, 5, 4, 2, 3]);
        assert_eq!(block_masses(&mean, &perm, 2).unwrap(), [10.0, 9.0, 8.0]);
        assert_eq!(inverse(&perm).unwrap(), [1, 0, 4, 5, 3, 2]);
        // One block, or blocks of one: the channels by decreasing mass.
        assert_eq!(
            mass_only(&mean, 6, PermuteMethod::MassDiff),
            [1, 5, 2, 3, 4, 0]
        );
        assert_eq!(
            mass_only(&mean, 1, PermuteMethod::MassDiff),
            [1, 5, 2, 3, 4, 0]
        );
    }

    #[test]
    fn absmax_balances_the_maxima() {
        // The mean |x| says c0 is heavy, the max |x| says c3: Absmax follows the max.
        let mean = [9.0, 1.0, 1.0, 2.0];
        let max = [10.0f32, 3.0, 4.0, 50.0];
        let perm = permutation_from(PermuteMethod::Absmax, &mean, &max, 2).unwrap();
        // By max: c3 (50) -> b0, c0 (10) -> b1, c2 (4) -> b1, c1 (3) -> b1 is full -> b0.
        assert_eq!(perm, [3, 1, 0, 2]);
        let mass = permutation_from(PermuteMethod::MassDiff, &mean, &max, 2).unwrap();
        // By mean: c0 (9) -> b0, c3 (2) -> b1, c1 (1) -> b1, c2 (1) -> b0.
        assert_eq!(mass, [0, 2, 3, 1]);
    }

    #[test]
    fn every_method_gives_a_permutation() {
        let methods = [
            PermuteMethod::MassDiff,
            PermuteMethod::Zigzag,
            PermuteMethod::Absmax,
            PermuteMethod::Random { seed: 7 },
            PermuteMethod::Identity,
        ];
        for (n, block) in [(1, 1), (8, 2), (64, 16), (192, 64), (576, 32), (1536, 1)] {
            let (mean, max) = skewed(n, n as u64);
            for m in methods {
                let perm = permutation_from(m, &mean, &max, block).unwrap();
                assert!(is_permutation(&perm, n), "{m} n={n} b={block}");
            }
        }
    }

    #[test]
    fn massdiff_balances_better_than_identity() {
        for (n, block, seed) in [(64, 8, 1), (192, 64, 2), (576, 32, 3), (1536, 128, 4)] {
            let (mean, _) = skewed(n, seed);
            let identity: Vec<usize> = (0..n).collect();
            let perm = mass_only(&mean, block, PermuteMethod::MassDiff);
            let (got, before) = (
                imbalance(&mean, &perm, block),
                imbalance(&mean, &identity, block),
            );
            assert!(got <= before, "n={n} b={block}: {got} > {before}");
            // And within one channel's mass of even (true of these inputs; 10^5 random small
            // cases in a Python model of the rule never exceeded it either).
            let largest = mean.iter().cloned().fold(0.0, f64::max);
            assert!(got <= largest, "n={n} b={block}: {got} > {largest}");
        }
    }

    #[test]
    fn zigzag_deals_in_snake_order() {
        // Mass c: channels by mass are c11, c10, ..., c0; three blocks get
        // 0 1 2 | 2 1 0 | 0 1 2 | 2 1 0.
        let mean: Vec<f64> = (0..12).map(f64::from).collect();
        assert_eq!(
            mass_only(&mean, 4, PermuteMethod::Zigzag),
            [11, 6, 5, 0, 10, 7, 4, 1, 9, 8, 3, 2]
        );
        let mean: Vec<f64> = (0..8).map(f64::from).collect();
        assert_eq!(
            mass_only(&mean, 2, PermuteMethod::Zigzag),
            [7, 0, 6, 1, 5, 2, 4, 3]
        );
    }

    #[test]
    fn random_is_reproducible_per_seed() {
        let (mean, max) = skewed(64, 0);
        let r = |seed| permutation_from(PermuteMethod::Random { seed }, &mean, &max, 8).unwrap();
        assert_eq!(r(1), r(1));
        assert_ne!(r(1), r(2));
        assert_ne!(r(0), (0..64).collect::<Vec<_>>());
        // Pinned: a recorded seed must give the same permutation in every later version.
        let small =
            |seed| permutation_from(PermuteMethod::Random { seed }, &[0.0; 8], &[0.0; 8], 4);
        assert_eq!(small(0).unwrap(), PINNED_SEED0);
        // Every position is reachable: over many seeds each channel lands in position 0.
        let mut seen = [false; 8];
        for seed in 0..200 {
            seen[small(seed).unwrap()[0]] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    /// splitmix64 from seed 0 (first output 0xe220a8397b1dcdaf, the reference value) through
    /// Fisher-Yates; checked against an independent Python implementation.
    const PINNED_SEED0: [usize; 8] = [1, 2, 6, 5, 4, 0, 3, 7];

    #[test]
    fn identity_and_stats_entry_point() {
        let mut s = ChannelStats::new(4, &StatsOptions::default()).unwrap();
        assert_eq!(
            permutation(PermuteMethod::MassDiff, &s, 2).unwrap_err(),
            PermuteError::NoRows {
                method: PermuteMethod::MassDiff
            }
        );
        assert_eq!(
            permutation(PermuteMethod::Identity, &s, 2).unwrap(),
            [0, 1, 2, 3]
        );
        let x = ndarray::arr2(&[[1.0f32, -8.0, 0.5, 3.0], [-1.0, 6.0, 0.5, -3.0]]);
        s.update(x.view()).unwrap();
        // mean |x| = [1, 7, 0.5, 3]: c1 -> b0, c3 -> b1, c0 -> b1, c2 -> b0.
        assert_eq!(
            permutation(PermuteMethod::MassDiff, &s, 2).unwrap(),
            [1, 2, 3, 0]
        );
    }

    #[test]
    fn splitmix64_reference_value() {
        let mut state = 0;
        assert_eq!(splitmix64(&mut state), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn names_round_trip() {
        for m in [
            PermuteMethod::MassDiff,
            PermuteMethod::Zigzag,
            PermuteMethod::Absmax,
            PermuteMethod::Random { seed: 0 },
            PermuteMethod::Random { seed: u64::MAX },
            PermuteMethod::Identity,
        ] {
            assert_eq!(m.to_string().parse::<PermuteMethod>().unwrap(), m);
        }
        assert_eq!(
            "random".parse::<PermuteMethod>().unwrap(),
            PermuteMethod::Random { seed: 0 }
        );
        assert_eq!(
            " random( seed = 42 ) ".parse::<PermuteMethod>().unwrap(),
            PermuteMethod::Random { seed: 42 }
        );
        assert_eq!(PermuteMethod::default(), PermuteMethod::MassDiff);
    }

    #[test]
    fn error_messages() {
        let msg = |e: PermuteError| e.to_string();
        assert_eq!(
            msg("mass-diff".parse::<PermuteMethod>().unwrap_err()),
            "unknown permutation method `mass-diff`; the methods are massdiff, zigzag, absmax, \
             random, random(seed=N), identity"
        );
        assert_eq!(
            msg("random(sed=3)".parse::<PermuteMethod>().unwrap_err()),
            "permutation method `random(sed=3)`: random takes one option, seed=N (N an \
             unsigned 64-bit integer)"
        );
        assert!("random(seed=-1)".parse::<PermuteMethod>().is_err());
        let z = [0.0; 64];
        let zf = [0.0f32; 64];
        assert_eq!(
            msg(permutation_from(PermuteMethod::MassDiff, &z, &zf, 5).unwrap_err()),
            "block size 5 does not divide 64 channels; sizes that divide 64: 1, 2, 4, 8, 16, 32, 64"
        );
        assert_eq!(
            msg(permutation_from(PermuteMethod::MassDiff, &z, &zf, 0).unwrap_err()),
            "block size 0: a block needs at least one channel; sizes that divide 64: 1, 2, 4, 8, \
             16, 32, 64"
        );
        let z = [0.0; 576];
        let zf = [0.0f32; 576];
        assert_eq!(
            msg(permutation_from(PermuteMethod::Identity, &z, &zf, 100).unwrap_err()),
            "block size 100 does not divide 576 channels; the nearest of the 21 sizes that \
             divide 576: 36, 48, 64, 72, 96, 144"
        );
        assert_eq!(
            msg(permutation_from(PermuteMethod::MassDiff, &[1.0; 4], &[1.0; 3], 2).unwrap_err()),
            "the statistics disagree on the channel count: 4 mean |x| values, 3 max |x| values"
        );
        assert_eq!(
            msg(permutation_from(PermuteMethod::MassDiff, &[], &[], 2).unwrap_err()),
            "no channels to permute"
        );
        assert_eq!(
            msg(
                permutation_from(PermuteMethod::MassDiff, &[1.0, f64::NAN], &[1.0; 2], 2)
                    .unwrap_err()
            ),
            "mean |x| of channel 1 is NaN; the statistics must be finite"
        );
        assert_eq!(
            msg(
                permutation_from(PermuteMethod::Absmax, &[1.0; 2], &[f32::INFINITY, 1.0], 2)
                    .unwrap_err()
            ),
            "max |x| of channel 0 is inf; the statistics must be finite"
        );
        assert_eq!(
            msg(permutation(
                PermuteMethod::Zigzag,
                &ChannelStats::new(4, &StatsOptions::default()).unwrap(),
                2
            )
            .unwrap_err()),
            "zigzag needs statistics, but they were computed from 0 rows"
        );
        assert_eq!(
            msg(inverse(&[0, 3, 1]).unwrap_err()),
            "not a permutation of 0..3: position 1 holds 3"
        );
        assert_eq!(
            msg(inverse(&[2, 0, 2]).unwrap_err()),
            "not a permutation of 0..3: 2 is at positions 0 and 2"
        );
        assert_eq!(
            msg(block_masses(&[1.0; 4], &[0, 1, 2], 2).unwrap_err()),
            "not a permutation of 0..4: it has 3 entries"
        );
    }
}
