//! Error measures.

/// Signal-to-quantization-noise ratio in dB: `10 log10(sum r^2 / sum (r - a)^2)`, sums in
/// f64; `+inf` when `approx` equals `reference` (also when both are empty or zero), `-inf`
/// when the reference is zero and the approximation is not. Panics if the lengths differ.
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    assert_eq!(
        reference.len(),
        approx.len(),
        "sqnr_db: reference and approx lengths differ"
    );
    let (mut sig, mut noise) = (0f64, 0f64);
    for (&r, &a) in reference.iter().zip(approx) {
        let (r, a) = (r as f64, a as f64);
        sig += r * r;
        noise += (r - a) * (r - a);
    }
    if noise == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (sig / noise).log10()
}
