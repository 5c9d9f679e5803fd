//! Perplexity scoring: the bench protocol (docs/bench.md), which scripts/bench/ppl_ort.py
//! implements with ONNX Runtime.
//!
//! The text is tokenized whole and cut into non-overlapping windows of `seq` tokens
//! (`corpus.rs`); each window's logits score its `seq - 1` next tokens. ppl = exp(mean NLL),
//! accumulated in f64.

/// Sum over positions t < seq-1 of -log softmax(logits[t])[ids[t+1]], in f64: each row's
/// `log Σ exp` by `perqc_ops::kernels::log_sum_exp` (f32 terms, vectorized, an f64 sum),
/// minus the target's logit. `logits` is `[seq, vocab]` row-major.
pub fn window_nll(logits: &[f32], vocab: usize, ids: &[u32]) -> f64 {
    use rayon::prelude::*;
    let seq = ids.len();
    debug_assert_eq!(logits.len(), seq * vocab);
    // Rows in parallel, summed in order: the same total whatever the threads.
    let per_row: Vec<f64> = (0..seq.saturating_sub(1))
        .into_par_iter()
        .map(|t| {
            let row = &logits[t * vocab..(t + 1) * vocab];
            perqc_ops::kernels::log_sum_exp(row) - f64::from(row[ids[t + 1] as usize])
        })
        .collect();
    per_row.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_vocab_perplexity() {
        let vocab = 7;
        let ids = [1u32, 4, 2, 6];
        let logits = vec![0.25f32; ids.len() * vocab];
        let nll = window_nll(&logits, vocab, &ids);
        let ppl = (nll / 3.0).exp();
        assert!((ppl - 7.0).abs() < 1e-9, "{ppl}");
    }

    #[test]
    fn confident_correct_prediction_costs_little() {
        let vocab = 3;
        let ids = [0u32, 2];
        let logits = [0.0, 0.0, 30.0, 0.0, 0.0, 0.0];
        assert!(window_nll(&logits, vocab, &ids) < 1e-12);
    }
}
