//! Streaming calibration observers.
//!
//! [`ChannelObserver`] shows each watched activation of a run to a [`ChannelStats`] (over its
//! last axis), which keeps only running per-channel sums; the statistics themselves live in
//! `perqc_ops::stats` (re-exported here), so passes can use them without the runtime.

use crate::session::{Observer, RuntimeError};
use perqc_ops::RtTensor;
pub use perqc_ops::stats::{ChannelStats, StatsError, StatsOptions};

/// An [`Observer`] that keeps [`ChannelStats`] for each watched value (over its last axis),
/// across any number of runs.
pub struct ChannelObserver {
    names: Vec<String>,
    /// Per watched name.
    opts: Vec<StatsOptions>,
    stats: Vec<Option<ChannelStats>>,
}

impl ChannelObserver {
    /// Watches `names`, collecting `opts` for each.
    pub fn new(names: Vec<String>, opts: StatsOptions) -> ChannelObserver {
        let opts = vec![opts; names.len()];
        let stats = vec![None; names.len()];
        ChannelObserver { names, opts, stats }
    }

    /// Watches each name with its own options (a Gram matrix for one value, sampled rows
    /// for another).
    pub fn with_options(watch: Vec<(String, StatsOptions)>) -> ChannelObserver {
        let (names, opts): (Vec<_>, Vec<_>) = watch.into_iter().unzip();
        let stats = vec![None; names.len()];
        ChannelObserver { names, opts, stats }
    }

    /// The statistics of `name`, once it has been seen.
    pub fn stats(&self, name: &str) -> Option<&ChannelStats> {
        let i = self.names.iter().position(|n| n == name)?;
        self.stats[i].as_ref()
    }

    /// Every watched name, in the order given to [`ChannelObserver::new`], with its
    /// statistics (`None` if no run produced it).
    pub fn into_stats(self) -> Vec<(String, Option<ChannelStats>)> {
        self.names.into_iter().zip(self.stats).collect()
    }
}

impl Observer for ChannelObserver {
    fn watched(&self) -> &[String] {
        &self.names
    }

    fn observe(&mut self, name: &str, value: &RtTensor) -> Result<(), RuntimeError> {
        let fail = |detail: String| RuntimeError::Observe {
            name: name.to_string(),
            detail,
        };
        let RtTensor::F32(a) = value else {
            return Err(fail(format!(
                "{} values have no channel statistics",
                value.dtype()
            )));
        };
        let channels = *a
            .shape()
            .last()
            .ok_or_else(|| fail("a scalar has no channels".into()))?;
        let rows = a.len() / channels.max(1);
        let a = a.as_standard_layout();
        let x = a
            .view()
            .into_shape_with_order((rows, channels))
            .map_err(|e| fail(e.to_string()))?;
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| fail("not watched".into()))?;
        if self.stats[i].is_none() {
            self.stats[i] =
                Some(ChannelStats::new(channels, &self.opts[i]).map_err(|e| fail(e.to_string()))?);
        }
        let s = self.stats[i].as_mut().expect("just set");
        s.update(x).map_err(|e| fail(e.to_string()))
    }
}
