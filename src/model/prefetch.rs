//! A model's background prefetch: the byte ranges a [`PrefetchPolicy`] asks of the files
//! the model serves, and the task fetching them through the model's
//! [`BlobStore`](crate::blob::BlobStore), which puts every on-demand read first.
//!
//! The task lives as long as its [`Prefetching`] handle, which the [`Model`] holds: a
//! model that is dropped, or unmounted ([`Model::stop_prefetch`]), stops fetching (the
//! requests already sent finish and are cached, at most `prefetch_concurrency` of them).
//! The task holds the blob store, never the model, so it keeps no model alive.

use std::ops::Range;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::{LayerData, Model};
use crate::blob::{BlobError, BlobInfo};
use crate::config::PrefetchPolicy;

/// A running (or finished) prefetch, stopped when dropped.
#[derive(Debug)]
pub(super) struct Prefetching {
    policy: PrefetchPolicy,
    task: AbortHandle,
}

impl Drop for Prefetching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a finished prefetch did.
#[derive(Debug)]
pub struct Prefetched {
    /// The policy it followed.
    pub policy: PrefetchPolicy,
    /// Bytes of the ranges it asked for (cached ones included).
    pub bytes: u64,
    /// From its start until every range was cached or had failed.
    pub elapsed: Duration,
    /// The first failure, after every range was tried.
    pub result: Result<(), BlobError>,
}

impl Model {
    /// The byte ranges `policy` asks for, in the model's layer order: nothing for `none`;
    /// for `all`, every remote blob of a file served, whole (so that each is verified);
    /// for `head:N`, the first N bytes of each file served that is read from the registry
    /// (a compressed layer's files are local once the model is open).
    pub fn prefetch_ranges(&self, policy: PrefetchPolicy) -> Vec<(BlobInfo, Range<u64>)> {
        match policy {
            PrefetchPolicy::None => Vec::new(),
            PrefetchPolicy::All => self.remote_blobs().into_iter().map(|b| (b, 0..b.size)).collect(),
            PrefetchPolicy::Head(n) => self
                .tree
                .files()
                .filter_map(|(_, source)| match self.layers.get(source.layer)? {
                    LayerData::Remote(blob) if source.size > 0 => {
                        Some((*blob, source.offset..source.offset.saturating_add(n.min(source.size))))
                    }
                    _ => None,
                })
                .collect(),
        }
    }

    /// Starts fetching what `policy` asks for, in the background on `runtime`, unless a
    /// prefetch at least as large was started already: a larger policy replaces a smaller
    /// one (what the smaller one cached is not fetched again). Returns the outcome's
    /// receiver when it started a prefetch; the outcome is also logged.
    pub fn start_prefetch(&self, policy: PrefetchPolicy, runtime: &Handle) -> Option<oneshot::Receiver<Prefetched>> {
        self.start_prefetch_reporting(policy, runtime, |_| |_| ())
    }

    /// [`Self::start_prefetch`], showing its progress: when it starts a prefetch it calls
    /// `progress` with the bytes the prefetch asks for, and the function that returns is
    /// told the bytes of each piece once cached (or failed), from the prefetch's task.
    pub fn start_prefetch_reporting<F>(
        &self,
        policy: PrefetchPolicy,
        runtime: &Handle,
        progress: impl FnOnce(u64) -> F,
    ) -> Option<oneshot::Receiver<Prefetched>>
    where
        F: Fn(u64) + Send + Sync + 'static,
    {
        let mut current = self.prefetching.lock().expect("prefetch lock");
        if policy == PrefetchPolicy::None || current.as_ref().is_some_and(|p| p.policy >= policy) {
            return None;
        }
        let ranges = self.prefetch_ranges(policy);
        let bytes = ranges.iter().map(|(_, r)| r.end - r.start).sum();
        let report = progress(bytes);
        let (store, reference) = (self.store.clone(), self.reference.clone());
        let (tx, rx) = oneshot::channel();
        let task = runtime.spawn(async move {
            let started = Instant::now();
            let result = store.prefetch_ranges(ranges, &report).await;
            let elapsed = started.elapsed();
            match &result {
                Ok(()) => {
                    tracing::info!(%reference, %policy, bytes, seconds = elapsed.as_secs_f64(), "prefetch complete")
                }
                Err(e) => tracing::warn!(%reference, %policy, error = %e, "prefetch incomplete"),
            }
            let _ = tx.send(Prefetched { policy, bytes, elapsed, result });
        });
        tracing::debug!(reference = %self.reference, %policy, bytes, "prefetch started");
        // Replacing a smaller prefetch drops its handle, which stops it.
        *current = Some(Prefetching { policy, task: task.abort_handle() });
        Some(rx)
    }

    /// Stops the background prefetch, if one runs (when the model is unmounted).
    pub fn stop_prefetch(&self) {
        if let Some(stopped) = self.prefetching.lock().expect("prefetch lock").take() {
            tracing::debug!(reference = %self.reference, policy = %stopped.policy, "prefetch stopped");
        }
    }
}
