//! Calibration data as a pass resource.
//!
//! A driver runs the model on calibration text with streaming observers (the native
//! runtime's `ChannelObserver`), collects one [`ChannelStats`] per watched value into a
//! [`Calibration`], and hands it to the pass manager with `PassManager::provide`; a pass
//! reads it with `ctx.resource::<Calibration>()`. Passes never run the model themselves.
//!
//! Invariants: one entry per value name; entries keep the order they were first inserted
//! in (the driver inserts them in its watch order, which is graph order), so iteration and
//! anything printed from it are deterministic.

use perqc_ops::stats::ChannelStats;
use std::collections::HashMap;
use std::fmt;

/// What a [`Calibration`] was computed from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CalibrationSource {
    /// The data, for people: e.g. `corpus.txt (tokenizer.json)` or `ids.npy`.
    pub description: String,
    /// Sequences (windows) the model was run on.
    pub sequences: usize,
    /// Tokens run in total: the sum of the sequence lengths.
    pub tokens: u64,
}

impl fmt::Display for CalibrationSource {
    /// `corpus.txt (tokenizer.json): 16 sequences, 8192 tokens`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} sequence{}, {} token{}",
            self.description,
            self.sequences,
            if self.sequences == 1 { "" } else { "s" },
            self.tokens,
            if self.tokens == 1 { "" } else { "s" }
        )
    }
}

/// Per-channel activation statistics by value name, and what they were computed from.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    source: CalibrationSource,
    /// Entries in insertion order.
    entries: Vec<(String, ChannelStats)>,
    /// Name -> index into `entries`.
    index: HashMap<String, usize>,
}

impl Calibration {
    /// An empty calibration computed from `source`.
    pub fn new(source: CalibrationSource) -> Calibration {
        Calibration {
            source,
            entries: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// What the statistics were computed from.
    pub fn source(&self) -> &CalibrationSource {
        &self.source
    }

    /// Sets the statistics of value `name`. A name already present keeps its position and
    /// its previous statistics are returned.
    pub fn insert(&mut self, name: impl Into<String>, stats: ChannelStats) -> Option<ChannelStats> {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => Some(std::mem::replace(&mut self.entries[i].1, stats)),
            None => {
                self.index.insert(name.clone(), self.entries.len());
                self.entries.push((name, stats));
                None
            }
        }
    }

    /// The statistics of value `name`, if it was calibrated.
    pub fn get(&self, name: &str) -> Option<&ChannelStats> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// The statistics of value `name` to change in place.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut ChannelStats> {
        self.index.get(name).map(|&i| &mut self.entries[i].1)
    }

    /// Whether value `name` was calibrated.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Number of calibrated values.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `(name, statistics)` in insertion order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.entries.iter())
    }
}

/// The entries of a [`Calibration`], in insertion order.
#[derive(Clone, Debug)]
pub struct Iter<'a>(std::slice::Iter<'a, (String, ChannelStats)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a ChannelStats);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(n, s)| (n.as_str(), s))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Calibration {
    type Item = (&'a str, &'a ChannelStats);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use perqc_ops::stats::StatsOptions;

    fn stats(channels: usize, value: f32, rows: usize) -> ChannelStats {
        let mut s = ChannelStats::new(channels, &StatsOptions::default()).unwrap();
        s.update(ndarray::Array2::from_elem((rows, channels), value).view())
            .unwrap();
        s
    }

    #[test]
    fn insert_get_and_order() {
        let mut c = Calibration::new(CalibrationSource {
            description: "tiny_text.txt (tiny_tokenizer.json)".into(),
            sequences: 2,
            tokens: 32,
        });
        assert!(c.is_empty());
        assert!(c.insert("b", stats(4, 1.0, 3)).is_none());
        assert!(c.insert("a", stats(8, 2.0, 3)).is_none());
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a").unwrap().channels(), 8);
        assert!(c.get("c").is_none());
        assert!(c.contains("b") && !c.contains("c"));
        // Replacing keeps the position and returns the old statistics.
        let old = c.insert("b", stats(4, 5.0, 7)).unwrap();
        assert_eq!(old.rows(), 3);
        assert_eq!(c.get("b").unwrap().rows(), 7);
        let names: Vec<&str> = c.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!((&c).into_iter().len(), 2);
        assert_eq!(
            c.source().to_string(),
            "tiny_text.txt (tiny_tokenizer.json): 2 sequences, 32 tokens"
        );
    }

    #[test]
    fn is_a_pass_resource() {
        let mut ctx = perqc_ir::PassContext::new(None);
        let mut c = Calibration::default();
        c.insert("x", stats(2, 1.0, 1));
        ctx.provide(c);
        assert_eq!(ctx.resource::<Calibration>().unwrap().len(), 1);
    }
}
