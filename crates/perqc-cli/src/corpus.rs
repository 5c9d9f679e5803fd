//! Token streams for the commands that run a causal LM on text (`perqc eval` and
//! calibration): reading them (a Hugging Face tokenizer over a text file, or pre-tokenized
//! ids), cutting them into windows, and the graph feeds of one window.

use anyhow::{Context, Result, bail};
use ndarray::Array2;
use perqc_runtime::{RtTensor, Session};
use std::path::Path;

/// The ids of `text` from character `skip_chars` on (characters, not bytes), tokenized whole
/// by `tokenizer` (a tokenizer.json) with special tokens added as its post-processor says.
/// Errors name the file: unreadable, not UTF-8 (and at which byte), `skip_chars` past the end.
pub fn tokenize(tokenizer: &Path, text: &Path, skip_chars: usize) -> Result<Vec<u32>> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer).map_err(|e| {
        anyhow::anyhow!("{}: not a usable tokenizer.json: {e}", tokenizer.display())
    })?;
    let raw = std::fs::read(text).with_context(|| format!("{}: cannot read", text.display()))?;
    let text_str = std::str::from_utf8(&raw).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text: invalid byte at offset {}",
            text.display(),
            e.valid_up_to()
        )
    })?;
    let body = match text_str.char_indices().nth(skip_chars) {
        Some((at, _)) => &text_str[at..],
        None if skip_chars == 0 => bail!("{}: the text is empty", text.display()),
        None => bail!(
            "{}: --skip-chars {skip_chars} skips the whole text ({} characters)",
            text.display(),
            text_str.chars().count()
        ),
    };
    encode(&tok, body, tokenizer, text)
}

fn encode(
    tok: &tokenizers::Tokenizer,
    body: &str,
    tokenizer: &Path,
    text: &Path,
) -> Result<Vec<u32>> {
    let enc = tok.encode(body, true).map_err(|e| {
        anyhow::anyhow!(
            "{}: tokenizing {}: {e}",
            tokenizer.display(),
            text.display()
        )
    })?;
    Ok(enc.get_ids().to_vec())
}

/// The first `need` ids of `text` as [`tokenize`] gives them (from character 0), or all of
/// them if the text has fewer, without tokenizing more of the text than it takes: prefixes
/// that end at a line break, doubling until one gives more than `need` ids. Tokens never
/// span a line break in the tokenizers this is used with (their pre-tokenizers split
/// there), so the prefix's first `need` ids are the whole text's (a test checks it on the
/// fixture tokenizer). Calibration reads a few thousand tokens of a corpus this way.
pub fn tokenize_prefix(tokenizer: &Path, text: &Path, need: usize) -> Result<Vec<u32>> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer).map_err(|e| {
        anyhow::anyhow!("{}: not a usable tokenizer.json: {e}", tokenizer.display())
    })?;
    let raw = std::fs::read(text).with_context(|| format!("{}: cannot read", text.display()))?;
    let body = std::str::from_utf8(&raw).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text: invalid byte at offset {}",
            text.display(),
            e.valid_up_to()
        )
    })?;
    if body.is_empty() {
        bail!("{}: the text is empty", text.display());
    }
    let mut bytes = need.saturating_mul(8).max(64);
    loop {
        if bytes >= body.len() {
            return encode(&tok, body, tokenizer, text);
        }
        // Up to the last line break before `bytes` (a char boundary: '\n' is one byte).
        if let Some(cut) = body[..body.floor_char_boundary(bytes)].rfind('\n') {
            let mut ids = encode(&tok, &body[..=cut], tokenizer, text)?;
            // More than `need`: the ids at the cut (a closing special token) are not kept.
            if ids.len() > need + 1 {
                ids.truncate(need);
                return Ok(ids);
            }
        }
        bytes = bytes.saturating_mul(2);
    }
}

/// Pre-tokenized ids: a `.npy` of int64 or int32 (any shape, read in order). Errors name the
/// file and the first id that is negative or too large.
pub fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let t = perqc_runtime::read_npy(path)?;
    let as_u32 = |v: i64, i: usize| {
        u32::try_from(v).map_err(|_| {
            anyhow::anyhow!(
                "{}: id {v} at index {i} is negative or too large",
                path.display()
            )
        })
    };
    match t {
        RtTensor::I64(a) => a.iter().enumerate().map(|(i, &v)| as_u32(v, i)).collect(),
        RtTensor::I32(a) => a
            .iter()
            .enumerate()
            .map(|(i, &v)| as_u32(v as i64, i))
            .collect(),
        other => bail!(
            "{}: ids must be int64 or int32, not {:?}",
            path.display(),
            other.dtype()
        ),
    }
}

/// The first `windows` complete, non-overlapping windows of `seq` tokens (the tail that
/// does not fill a window is dropped).
pub fn windows(ids: &[u32], seq: usize, windows: usize) -> impl Iterator<Item = &[u32]> {
    ids.chunks_exact(seq).take(windows)
}

/// [`windows`], for a command: an error if `ids` (read from `source`) make no window, and a
/// note on stderr if they make fewer than asked. `seq_flag` names the option that set `seq`
/// and `doing` what the command does with the windows, for those messages.
pub fn take_windows<'a>(
    ids: &'a [u32],
    seq: usize,
    count: usize,
    source: &Path,
    seq_flag: &str,
    doing: &str,
) -> Result<Vec<&'a [u32]>> {
    let taken: Vec<&[u32]> = windows(ids, seq, count).collect();
    if taken.is_empty() {
        bail!(
            "{}: {} tokens make no complete window of {seq_flag} {seq}",
            source.display(),
            ids.len()
        );
    }
    if taken.len() < count {
        let n = taken.len();
        eprintln!(
            "note: {} makes {n} window{} of {seq} tokens; {doing} {n} of the {count} asked",
            source.display(),
            if n == 1 { "" } else { "s" },
        );
    }
    Ok(taken)
}

/// The graph inputs of one window of `seq` tokens scored from scratch: the ids go to
/// `input_ids` (else the session's first input) as int64 `[1, seq]`; a graph that takes a KV
/// cache gets the rest from [`extra_feeds`].
pub struct WindowFeeds {
    input: String,
    extra: Vec<(String, RtTensor)>,
}

impl WindowFeeds {
    /// The feeds for `session`, planned from `graph`, and windows of `seq` tokens.
    pub fn new(session: &Session, graph: &perqc_ir::Graph, seq: usize) -> Result<WindowFeeds> {
        let input = session
            .input_names()
            .find(|n| *n == "input_ids")
            .or_else(|| session.input_names().next())
            .map(str::to_string)
            .context("the model has no inputs")?;
        let extra = extra_feeds(graph, &input, seq)?;
        Ok(WindowFeeds { input, extra })
    }

    /// The feeds for `graph` itself (its first input without a default, or `input_ids`,
    /// takes the ids), for a model run in pieces.
    pub fn for_graph(graph: &perqc_ir::Graph, seq: usize) -> Result<WindowFeeds> {
        let fed: Vec<&str> = graph
            .inputs
            .iter()
            .map(|&v| graph.value(v))
            .filter(|v| v.tensor.is_none())
            .map(|v| v.name.as_str())
            .collect();
        let input = fed
            .iter()
            .find(|n| **n == "input_ids")
            .or(fed.first())
            .map(|n| n.to_string())
            .context("the model has no inputs")?;
        let extra = extra_feeds(graph, &input, seq)?;
        Ok(WindowFeeds { input, extra })
    }

    /// The feeds of `window` (of the `seq` tokens the feeds were made for).
    pub fn feeds(&self, window: &[u32]) -> Vec<(&str, RtTensor)> {
        let x = Array2::from_shape_fn((1, window.len()), |(_, t)| window[t] as i64)
            .into_dyn()
            .into_shared();
        let mut feeds = vec![(self.input.as_str(), RtTensor::I64(x))];
        feeds.extend(self.extra.iter().map(|(n, t)| (n.as_str(), t.clone())));
        feeds
    }
}

/// Feeds for the graph inputs besides the token ids, for one window of `seq` tokens scored
/// from scratch: an all-ones `attention_mask` `[1, seq]`, `position_ids` `0..seq`, and each
/// past key/value (an input whose name contains `past`) empty: its declared shape with a
/// symbolic first (batch) dim 1 and every other symbolic dim (the past length) 0. Inputs
/// with a default (an initializer) are left to it; any other input is an error naming it.
fn extra_feeds(g: &perqc_ir::Graph, ids: &str, seq: usize) -> Result<Vec<(String, RtTensor)>> {
    use perqc_ir::{DType, Dim};
    let mut feeds = Vec::new();
    for &vid in &g.inputs {
        let v = g.value(vid);
        if v.name == ids || v.tensor.is_some() {
            continue;
        }
        let dtype = v.ty.as_ref().and_then(|t| t.elem());
        let ints = |vals: Vec<i64>| -> Result<RtTensor> {
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, seq]), vals)?;
            Ok(match dtype {
                Some(DType::I64) => RtTensor::i64(a),
                Some(DType::I32) => RtTensor::I32(a.mapv(|x| x as i32).into_shared()),
                other => bail!("input `{}` is {other:?}; expected int64 or int32", v.name),
            })
        };
        let t = if v.name == "attention_mask" {
            ints(vec![1; seq])?
        } else if v.name == "position_ids" {
            ints((0..seq as i64).collect())?
        } else if v.name.contains("past") {
            let Some(shape) = v.ty.as_ref().and_then(|t| t.shape()) else {
                bail!(
                    "input `{}` (a past key/value) has no declared shape",
                    v.name
                );
            };
            let dims: Vec<usize> = shape
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Dim::Known(n) => usize::try_from(*n).unwrap_or(0),
                    _ if i == 0 => 1,
                    _ => 0,
                })
                .collect();
            // Empty (a zero-length past): only the element type matters.
            let zeros = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&dims));
            match dtype {
                Some(DType::F32) => RtTensor::f32(zeros),
                Some(DType::F16) => RtTensor::F16(zeros.mapv(half::f16::from_f32).into_shared()),
                Some(DType::BF16) => RtTensor::BF16(zeros.mapv(half::bf16::from_f32).into_shared()),
                other => bail!(
                    "input `{}` (a past key/value) is {other:?}; expected float32, float16 or bfloat16",
                    v.name
                ),
            }
        } else {
            bail!(
                "input `{}` is none of input_ids, attention_mask, position_ids or a past \
                 key/value; perqc cannot feed it",
                v.name
            );
        };
        feeds.push((v.name.clone(), t));
    }
    Ok(feeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_drop_the_tail() {
        let ids: Vec<u32> = (0..10).collect();
        let w: Vec<_> = windows(&ids, 4, 16).collect();
        assert_eq!(w, vec![&[0, 1, 2, 3][..], &[4, 5, 6, 7][..]]);
    }

    #[test]
    fn no_window_is_an_error_naming_the_source_and_flag() {
        let ids: Vec<u32> = (0..3).collect();
        let e = take_windows(
            &ids,
            4,
            2,
            Path::new("a.npy"),
            "--calib-len",
            "calibrating on",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.npy: 3 tokens make no complete window of --calib-len 4"
        );
        assert_eq!(
            take_windows(&ids, 1, 2, Path::new("a.npy"), "--seq", "scoring")
                .unwrap()
                .len(),
            2
        );
    }
}
