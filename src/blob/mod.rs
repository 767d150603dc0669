//! Blob reader: serves byte ranges of remote blobs in fixed-size chunks, from the
//! [`ChunkCache`] when present, else fetched through a [`RangeSource`] (the registry).
//!
//! Rules this module keeps (what vouches for which cached bytes is decided in
//! [`crate::cache::trust`]):
//! - single flight: concurrent readers missing one chunk share one fetch;
//! - a store reads the cache as its [`Voucher`]: its lazy index, or a reader of its own
//!   when it has no chunk digests. It serves a cached chunk only when its blob is
//!   verified or its voucher stands behind the chunk; a chunk someone else vouched for is
//!   checked against the index first (then vouched for), or, without an index, fetched
//!   again;
//! - when per-chunk digests are known (from a lazy index), every fetched chunk is
//!   checked against them before it is cached or served;
//! - a chunk that is the whole blob is checked against the blob digest before it is
//!   cached or served (so every small file is verified); when every chunk of a larger
//!   blob is present the whole blob is hashed (continuing the hash fed as chunks
//!   arrived, on a thread of lower priority, one blob at a time): only a match makes
//!   the blob trusted by every reader, and a mismatch evicts it, is logged and counted,
//!   and condemns an index that vouched for all of it, whose reads fail from then on;
//! - a chunk failing a check is fetched once more, then the read fails;
//! - readers never wait for the disk: a fetched chunk is handed to its waiters first and
//!   written to the cache after, at most `pending_store_chunks` behind;
//! - on-demand reads go first: background prefetch waits while any is in flight, and
//!   has memory of its own for chunks awaiting their cache write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::sync::Semaphore;

use crate::cache::{CacheError, ChunkCache, ChunkKey, Standing, Verdict, Voucher};
use crate::config::FetchSettings;
use crate::metrics::{self, ChunkSource};
use crate::modelpack::index::ChunkDigests;
use crate::modelpack::Digest;
use crate::registry::{Registry, RegistryError};

/// How long a waiting prefetch sleeps before looking again for on-demand reads.
const PREFETCH_YIELD: Duration = Duration::from_millis(2);

/// Most time verification of a complete blob waits for the background hasher to feed
/// what it still holds in memory, before reading the rest back from the cache.
const HASHER_WAIT: Duration = Duration::from_secs(5);

/// Why bytes of a blob could not be served.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The registry did not deliver the bytes.
    #[error("fetching chunk {index} of {blob}: {source}")]
    Fetch { blob: Digest, index: u64, source: RegistryError },
    /// The bytes arrived but do not match their digest, even after fetching again.
    #[error("chunk {index} of {blob} failed verification: {detail}")]
    Corrupt { blob: Digest, index: u64, detail: String },
    /// The local cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A read past the end of the blob.
    #[error("read of {len} bytes at {offset} is outside blob {blob} of {size} bytes")]
    OutOfRange { blob: Digest, offset: u64, len: u64, size: u64 },
    /// The model's lazy index was caught vouching for bytes that are not its blobs.
    #[error("lazy index {index} vouched for bytes that are not the blobs it names; its model is not served")]
    Condemned { index: Digest },
    /// A worker thread died.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// The chunk digests of a lazy index, which every chunk of its blobs is checked against.
#[derive(Debug, Clone)]
pub struct IndexDigests {
    /// The digest of the index JSON: who vouches for the chunks that pass.
    pub index: Digest,
    /// Digests of pieces of each blob; each piece size divides the chunk size.
    pub chunks: HashMap<Digest, ChunkDigests>,
}

/// Where chunks come from when the cache misses. The registry implements it; unit
/// tests use fakes.
pub trait RangeSource: Send + Sync + 'static {
    /// Exactly `len` bytes of `blob` from `offset`, in pieces of `piece` bytes (the last
    /// may be shorter), each in memory of its own, so that keeping one piece keeps no
    /// other.
    fn read_range_pieces<'a>(
        &'a self,
        blob: &'a Digest,
        offset: u64,
        len: u64,
        piece: u64,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, RegistryError>>;
}

impl RangeSource for Registry {
    fn read_range_pieces<'a>(
        &'a self,
        blob: &'a Digest,
        offset: u64,
        len: u64,
        piece: u64,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, RegistryError>> {
        Registry::read_range_pieces(self, blob, offset, len, piece).boxed()
    }
}

/// A blob as the manifest describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobInfo {
    /// Its content digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// Why a chunk is being fetched: on-demand reads pre-empt prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A reader is waiting for it (including read-ahead of a sequential reader).
    OnDemand,
    /// Background prefetch of the whole model.
    Prefetch,
}

/// Counters of what the reader did, for `mount`'s report and for tests.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Bytes received from the registry.
    pub fetched_bytes: AtomicU64,
    /// Ranged requests that delivered a chunk.
    pub fetched_chunks: AtomicU64,
    /// Chunks or blobs that failed verification.
    pub verify_failures: AtomicU64,
    /// Files opened for kernel passthrough reads of a complete, verified blob.
    pub passthrough_opens: AtomicU64,
}

type ChunkFuture = Shared<BoxFuture<'static, Result<Bytes, Arc<BlobError>>>>;

/// Chunked, cached, single-flight reads of the blobs of one registry repository.
pub struct BlobStore {
    source: Arc<dyn RangeSource>,
    cache: Arc<ChunkCache>,
    settings: FetchSettings,
    /// Who this store is to the cache: its lazy index, or a reader of its own.
    voucher: Voucher,
    /// Known digests of pieces of blobs; each piece size divides the chunk size.
    digests: HashMap<Digest, ChunkDigests>,
    inflight: Mutex<HashMap<ChunkKey, ChunkFuture>>,
    /// Chunks fetched for readers, kept in memory until a read reaches their end (or
    /// newer ones push them out): a reader behind its read-ahead gets them from here,
    /// not from the cache file (written with `O_DIRECT`, so not in the page cache).
    resident: Mutex<Resident>,
    /// Runs stored but not hashed yet, kept in memory until the runs before them are
    /// hashed (see [`Self::hash_arrivals`]), by blob and first chunk.
    hash_waiting: Mutex<HashMap<Digest, BTreeMap<u64, HashRun>>>,
    /// Whether a job draining `hash_waiting` is queued on or running in the hasher.
    hash_draining: AtomicBool,
    /// Most chunks `hash_waiting` holds.
    hash_waiting_cap: usize,
    verifying: Mutex<HashSet<Digest>>,
    /// Held while a blob is hashed: one at a time.
    hashing: Mutex<()>,
    /// Fetch tasks not finished yet (their chunks stored, hashed and checked for
    /// completeness), for [`Self::settle`].
    runs: AtomicUsize,
    on_demand: AtomicUsize,
    /// One permit per chunk fetched but not yet cached (see [`Self::start_run`]), for
    /// readers and their read-ahead.
    store_permits: Arc<Semaphore>,
    /// The same for background prefetch, apart so that it never holds the permits an
    /// on-demand read waits for.
    prefetch_permits: Arc<Semaphore>,
    permits: usize,
    stats: FetchStats,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("settings", &self.settings)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Holds one count of a counter (fetches in flight, on-demand fetches) until dropped.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Chunks stored and waiting to be hashed, with the generations the cache stored them as.
struct HashRun {
    chunks: Arc<Vec<Bytes>>,
    stored: Vec<Option<u64>>,
}

/// See [`BlobStore::resident`]: at most `cap` chunks, the oldest pushed out first.
struct Resident {
    chunks: HashMap<ChunkKey, Bytes>,
    order: std::collections::VecDeque<ChunkKey>,
    cap: usize,
}

impl Resident {
    fn new(cap: usize) -> Self {
        Self { chunks: HashMap::new(), order: std::collections::VecDeque::new(), cap: cap.max(1) }
    }

    fn insert(&mut self, key: ChunkKey, data: Bytes) {
        if self.chunks.insert(key, data).is_none() {
            self.order.push_back(key);
        }
        while self.chunks.len() > self.cap {
            let Some(oldest) = self.order.pop_front() else { break };
            self.chunks.remove(&oldest);
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        if self.chunks.remove(key).is_some() {
            self.order.retain(|k| k != key);
        }
    }

    fn forget_blob(&mut self, blob: &Digest) {
        self.chunks.retain(|k, _| k.blob != *blob);
        self.order.retain(|k| k.blob != *blob);
    }
}

impl BlobStore {
    /// A reader over `source`, caching in `cache`. With a lazy index's digests, every
    /// chunk of their blobs is checked against them and the store vouches as that index;
    /// without, it vouches as a reader of its own. Each digest piece size must divide
    /// `settings.chunk_size` (see [`Self::check_digests`]).
    pub fn new(
        source: Arc<dyn RangeSource>,
        cache: Arc<ChunkCache>,
        settings: FetchSettings,
        index: Option<IndexDigests>,
    ) -> Arc<Self> {
        // A run takes a permit per chunk: there must be enough for the longest run.
        let permits = settings.pending_store_chunks.max(settings.stream_request_chunks).max(1) as usize;
        // Room for a reader's whole read-ahead window and the request arriving beyond it.
        let resident_chunks = (settings.readahead_chunks + settings.stream_request_chunks) as usize;
        // Two requests' worth: the runs in flight at once behind a reader.
        let hash_waiting_cap = (2 * settings.stream_request_chunks).max(1) as usize;
        let (voucher, digests) = match index {
            Some(IndexDigests { index, chunks }) => {
                if let Err(e) = cache.load_condemned(&index) {
                    tracing::warn!(%index, error = %e, "cannot read whether the lazy index was condemned");
                }
                (Voucher::Index(index), chunks)
            }
            None => (cache.new_reader(), HashMap::new()),
        };
        Arc::new(Self {
            source,
            cache,
            settings,
            voucher,
            digests,
            inflight: Mutex::new(HashMap::new()),
            resident: Mutex::new(Resident::new(resident_chunks)),
            hash_waiting: Mutex::new(HashMap::new()),
            hash_draining: AtomicBool::new(false),
            hash_waiting_cap,
            verifying: Mutex::new(HashSet::new()),
            hashing: Mutex::new(()),
            runs: AtomicUsize::new(0),
            on_demand: AtomicUsize::new(0),
            store_permits: Arc::new(Semaphore::new(permits)),
            prefetch_permits: Arc::new(Semaphore::new(permits)),
            permits,
            stats: FetchStats::default(),
        })
    }

    /// Waits until every fetched chunk has been written to the cache and no blob is being
    /// verified: the cache on disk then holds everything fetched so far.
    pub async fn settle(&self) {
        drop(self.store_permits.acquire_many(self.permits as u32).await);
        drop(self.prefetch_permits.acquire_many(self.permits as u32).await);
        while self.runs.load(Ordering::SeqCst) > 0 || !self.verifying.lock().expect("verifying lock").is_empty() {
            tokio::time::sleep(PREFETCH_YIELD).await;
        }
    }

    /// Whether verified blobs are served to the kernel for passthrough reads.
    pub fn passthrough_wanted(&self) -> bool {
        self.settings.passthrough
    }

    /// Verifies `blob` now if every chunk of it is cached but it is not verified yet (an
    /// earlier process stopped in between), so that its file can serve passthrough reads.
    pub fn verify_cached(self: &Arc<Self>, blob: &BlobInfo) {
        if !self.cache.is_verified(&blob.digest) {
            self.verify_if_complete(blob);
        }
    }

    /// The digest of this store's lazy index (tests only; a store without one has none).
    #[cfg(test)]
    fn voucher_index(&self) -> Digest {
        match self.voucher {
            Voucher::Index(d) => d,
            Voucher::Reader(_) => panic!("a store without an index"),
        }
    }

    /// Fails when this store's lazy index has been condemned: nothing it vouches for
    /// is served any more, not even a verified blob by passthrough.
    pub fn check_serving(&self) -> Result<(), BlobError> {
        match self.voucher {
            Voucher::Index(index) if self.cache.is_condemned(&index) => Err(BlobError::Condemned { index }),
            _ => Ok(()),
        }
    }

    /// Whether chunk `key` must be fetched: it is absent, or cached with nothing this
    /// store believes behind it and no digests to check it against. Cached chunks that
    /// can be checked are checked when read instead.
    fn must_fetch(&self, key: &ChunkKey) -> bool {
        match self.cache.standing(key, &self.voucher) {
            Standing::Absent => true,
            Standing::Trusted => false,
            Standing::Unvouched => !self.digests.contains_key(&key.blob),
        }
    }

    /// Whether chunk digests of piece size `piece` can check chunks of `chunk_size`
    /// bytes: every chunk must consist of whole pieces.
    pub fn check_digests(chunk_size: u64, piece: u64) -> bool {
        piece > 0 && chunk_size % piece == 0
    }

    /// What has been fetched and verified so far.
    pub fn stats(&self) -> &FetchStats {
        &self.stats
    }

    /// The cache behind this reader.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.settings.chunk_size
    }

    /// How many chunks to fetch ahead of a sequential reader.
    pub fn readahead_chunks(&self) -> u64 {
        self.settings.readahead_chunks
    }

    fn chunk_count(&self, blob: &BlobInfo) -> u64 {
        blob.size.div_ceil(self.settings.chunk_size)
    }

    fn chunk_len(&self, blob: &BlobInfo, index: u64) -> u64 {
        let start = index * self.settings.chunk_size;
        self.settings.chunk_size.min(blob.size - start)
    }

    /// Reads `len` bytes of `blob` at `offset` (clamped to the blob's end). Cached pieces
    /// are read straight into the result on one blocking thread; missing chunks are then
    /// fetched (or joined, if in flight). A read within one chunk that is not cached is
    /// a slice of the fetched chunk itself, with no copy and no new buffer.
    pub async fn read(self: &Arc<Self>, blob: &BlobInfo, offset: u64, len: u64) -> Result<Bytes, BlobError> {
        if offset > blob.size {
            return Err(BlobError::OutOfRange { blob: blob.digest, offset, len, size: blob.size });
        }
        let end = blob.size.min(offset.saturating_add(len));
        let pieces = self.pieces(offset, end);
        self.check_serving()?;
        if let Some(data) = self.take_resident(blob, &pieces, (end - offset) as usize) {
            return Ok(data);
        }
        let size = (end - offset) as usize;
        // Cached chunks this store does not trust yet are read whole, through `chunk`,
        // like missing ones.
        let servable =
            |index| self.cache.standing(&ChunkKey { blob: blob.digest, index }, &self.voucher) == Standing::Trusted;
        if let [(index, within, _, take)] = pieces[..] {
            if !servable(index) {
                metrics::chunk_reads(ChunkSource::Fetch, 1);
                let chunk = self.chunk(blob, index, Priority::OnDemand).await?;
                return Ok(chunk.slice(within as usize..within as usize + take));
            }
        }
        let chunks = pieces.len();
        let (mut out, missing) = if pieces.iter().any(|p| servable(p.0)) {
            let cache = self.cache.clone();
            let digest = blob.digest;
            let voucher = self.voucher;
            tokio::task::spawn_blocking(move || -> Result<_, CacheError> {
                let mut out = vec![0u8; size];
                let mut missing = Vec::new();
                for piece @ (index, within, dst, take) in pieces {
                    let key = ChunkKey { blob: digest, index };
                    match cache.read_into(&key, within, &mut out[dst..dst + take], Some(&voucher))? {
                        Some(n) if n == take => {}
                        _ => missing.push(piece),
                    }
                }
                Ok((out, missing))
            })
            .await
            .map_err(|e| BlobError::Task(e.to_string()))??
        } else {
            (vec![0u8; size], pieces)
        };
        metrics::chunk_reads(ChunkSource::Cache, chunks - missing.len());
        metrics::chunk_reads(ChunkSource::Fetch, missing.len());
        for (index, within, dst, take) in missing {
            let chunk = self.chunk(blob, index, Priority::OnDemand).await?;
            out[dst..dst + take].copy_from_slice(&chunk[within as usize..within as usize + take]);
        }
        Ok(Bytes::from(out))
    }

    /// `len` bytes of `blob` at `offset` (clamped to the blob's end) if every chunk they
    /// lie in was fetched for a reader and is still in memory; None otherwise. Never
    /// waits: the FUSE layer answers such a read on the thread that received it.
    pub fn read_in_memory(&self, blob: &BlobInfo, offset: u64, len: u64) -> Option<Bytes> {
        if offset >= blob.size || self.check_serving().is_err() {
            return None;
        }
        let end = blob.size.min(offset.saturating_add(len));
        let pieces = self.pieces(offset, end);
        self.take_resident(blob, &pieces, (end - offset) as usize)
    }

    /// The pieces `(chunk index, offset within the chunk, offset in the result, length)`
    /// of the bytes from `offset` to `end`.
    fn pieces(&self, offset: u64, end: u64) -> Vec<(u64, u64, usize, usize)> {
        let cs = self.settings.chunk_size;
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = pos / cs;
            let within = pos - index * cs;
            let take = (cs - within).min(end - pos);
            pieces.push((index, within, (pos - offset) as usize, take as usize));
            pos += take;
        }
        pieces
    }

    /// The bytes of `pieces` (`size` in all) if every chunk is resident; a chunk read to
    /// its end is dropped from memory (its reader has moved on).
    fn take_resident(&self, blob: &BlobInfo, pieces: &[(u64, u64, usize, usize)], size: usize) -> Option<Bytes> {
        let mut resident = self.resident.lock().expect("resident lock");
        let mut parts = Vec::with_capacity(pieces.len());
        for &(index, within, _, take) in pieces {
            let key = ChunkKey { blob: blob.digest, index };
            let chunk = resident.chunks.get(&key)?;
            let within = within as usize;
            parts.push((key, chunk.slice(within..within + take), within + take == chunk.len()));
        }
        for (key, _, consumed) in &parts {
            if *consumed {
                resident.remove(key);
            }
        }
        drop(resident);
        metrics::chunk_reads(ChunkSource::Memory, parts.len());
        if let [(_, data, _)] = &parts[..] {
            return Some(data.clone());
        }
        let mut out = Vec::with_capacity(size);
        for (_, data, _) in parts {
            out.extend_from_slice(&data);
        }
        Some(Bytes::from(out))
    }

    /// Starts fetching the chunks covering `len` bytes from `offset` that are neither
    /// cached nor already in flight, without waiting for them. With `whole_groups`, the
    /// window is widened to whole groups of `stream_request_chunks` chunks (a stream);
    /// without, it ends where asked (the end of a tensor a reader jumped to).
    pub fn read_ahead(self: &Arc<Self>, blob: &BlobInfo, offset: u64, len: u64, whole_groups: bool) {
        if offset >= blob.size || len == 0 {
            return;
        }
        let cs = self.settings.chunk_size;
        let per_request = self.settings.stream_request_chunks.max(1);
        // Runs never cross a group boundary of `per_request` chunks: as a reader's window
        // slides a chunk at a time, each new request still covers a whole group instead
        // of the one chunk that just entered.
        let last = (blob.size.min(offset.saturating_add(len)) - 1) / cs;
        let last = if whole_groups { (last / per_request + 1) * per_request - 1 } else { last };
        let last = last.min(self.chunk_count(blob) - 1);
        let mut index = offset / cs;
        // Runs of missing chunks, registered as in flight under one lock so that readers
        // arriving meanwhile join them instead of fetching again.
        let mut inflight = self.inflight.lock().expect("inflight lock");
        while index <= last {
            let key = ChunkKey { blob: blob.digest, index };
            if !self.must_fetch(&key) || inflight.contains_key(&key) {
                index += 1;
                continue;
            }
            let first = index;
            while index <= last
                && (index == first || index % per_request != 0)
                && !inflight.contains_key(&ChunkKey { blob: blob.digest, index })
                && self.must_fetch(&ChunkKey { blob: blob.digest, index })
            {
                index += 1;
            }
            self.start_run(&mut inflight, blob, first, index - first, Priority::OnDemand);
        }
    }

    /// Registers chunks `first..first + count` of `blob` as in flight and starts one task
    /// that fetches them with one ranged request, checks them, hands them to every
    /// waiter, and only then writes them to the cache: readers never wait for the disk.
    /// The chunks stay registered until they are cached, so no reader fetches them again
    /// meanwhile. The task holds `count` store permits from before its request until its
    /// chunks are cached, which bounds the memory of chunks not yet written.
    fn start_run(
        self: &Arc<Self>,
        inflight: &mut HashMap<ChunkKey, ChunkFuture>,
        blob: &BlobInfo,
        first: u64,
        count: u64,
        priority: Priority,
    ) {
        let (tx, rx) = oneshot::channel::<Result<Arc<Vec<Bytes>>, Arc<BlobError>>>();
        let run = rx
            .map(|r| r.unwrap_or_else(|_| Err(Arc::new(BlobError::Task("fetch task ended early".to_owned())))))
            .boxed()
            .shared();
        for i in 0..count {
            let part = run.clone().map(move |r| r.map(|chunks| chunks[i as usize].clone())).boxed().shared();
            inflight.insert(ChunkKey { blob: blob.digest, index: first + i }, part);
        }
        let this = self.clone();
        let blob = *blob;
        // Counted before the task starts, so that `settle` never misses it.
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _run = Counted(&this.runs);
            let guard = (priority == Priority::OnDemand).then(|| Counted::new(&this.on_demand));
            let pool = if priority == Priority::OnDemand { &this.store_permits } else { &this.prefetch_permits };
            let permits = pool.clone().acquire_many_owned(count as u32).await;
            let result = this.fetch_verified(&blob, first, count).await.map(Arc::new).map_err(Arc::new);
            drop(guard);
            let forget = || {
                let mut inflight = this.inflight.lock().expect("inflight lock");
                for index in first..first + count {
                    inflight.remove(&ChunkKey { blob: blob.digest, index });
                }
            };
            match result {
                Ok(chunks) => {
                    metrics::chunks_fetched(count);
                    if priority == Priority::Prefetch {
                        metrics::prefetched(chunks.iter().map(|c| c.len() as u64).sum());
                    }
                    if priority == Priority::OnDemand {
                        let mut resident = this.resident.lock().expect("resident lock");
                        for (i, chunk) in chunks.iter().enumerate() {
                            resident.insert(ChunkKey { blob: blob.digest, index: first + i as u64 }, chunk.clone());
                        }
                    }
                    let _ = tx.send(Ok(chunks.clone()));
                    let stored = this.store_chunks(&blob, first, chunks.clone()).await;
                    drop(permits);
                    forget();
                    this.hash_arrivals(&blob, first, chunks, stored);
                    this.verify_if_complete(&blob);
                }
                Err(e) => {
                    // Forgotten first, so that a reader told of the failure can try again.
                    drop(permits);
                    forget();
                    tracing::debug!(error = %e, "fetch failed");
                    let _ = tx.send(Err(e));
                }
            }
        });
    }

    /// Fetches every chunk of `blobs` not yet cached, in runs of `stream_request_chunks`
    /// chunks per request, `prefetch_concurrency` requests at a time, waiting while
    /// on-demand reads are in flight. Returns the first error after trying every chunk.
    pub async fn prefetch(self: &Arc<Self>, blobs: Vec<BlobInfo>) -> Result<(), BlobError> {
        self.prefetch_ranges(blobs.into_iter().map(|b| (b, 0..b.size)).collect(), &|_| ()).await
    }

    /// [`Self::prefetch`] of byte ranges: every chunk covering a range (clamped to its
    /// blob) that is not cached yet, in the order given. A range's chunks are requested
    /// at most `stream_request_chunks` at a time, split where the blob's groups of that
    /// many chunks meet (as for a whole blob), so a head of a file fetches the chunks it
    /// covers and no more. `progress` is told the bytes of the ranges each group covers
    /// once its chunks are cached (or failed): over the whole prefetch, the ranges' bytes.
    pub async fn prefetch_ranges(
        self: &Arc<Self>,
        ranges: Vec<(BlobInfo, Range<u64>)>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), BlobError> {
        let per_request = self.settings.stream_request_chunks.max(1);
        let cs = self.settings.chunk_size;
        // (blob, first chunk, chunks, bytes of the range in them)
        let mut work: Vec<(BlobInfo, u64, u64, u64)> = Vec::new();
        for (b, range) in ranges {
            let end = range.end.min(b.size);
            if range.start >= end {
                continue;
            }
            let (first, last) = (range.start / cs, (end - 1) / cs);
            let mut index = first;
            while index <= last {
                let group_end = ((index / per_request + 1) * per_request).min(last + 1);
                let bytes = end.min(group_end * cs) - range.start.max(index * cs);
                work.push((b, index, group_end - index, bytes));
                index = group_end;
            }
        }
        let first_error = Mutex::new(None);
        futures_util::stream::iter(work)
            .for_each_concurrent(self.settings.prefetch_concurrency.max(1), |(blob, first, count, bytes)| {
                let first_error = &first_error;
                async move {
                    while self.on_demand.load(Ordering::SeqCst) > 0 {
                        tokio::time::sleep(PREFETCH_YIELD).await;
                    }
                    // Missing chunks become runs of their own; chunks already in flight
                    // (a reader got there first) are waited for, not fetched again.
                    let waits: Vec<ChunkFuture> = {
                        let mut inflight = self.inflight.lock().expect("inflight lock");
                        let mut index = first;
                        while index < first + count {
                            let missing = |i| {
                                let key = ChunkKey { blob: blob.digest, index: i };
                                self.must_fetch(&key) && !inflight.contains_key(&key)
                            };
                            let start = index;
                            while index < first + count && missing(index) {
                                index += 1;
                            }
                            if index > start {
                                self.start_run(&mut inflight, &blob, start, index - start, Priority::Prefetch);
                            } else {
                                index += 1;
                            }
                        }
                        (first..first + count)
                            .filter_map(|i| inflight.get(&ChunkKey { blob: blob.digest, index: i }).cloned())
                            .collect()
                    };
                    for wait in waits {
                        if let Err(e) = wait.await {
                            first_error.lock().expect("error lock").get_or_insert(unshare(&e));
                        }
                    }
                    progress(bytes);
                }
            })
            .await;
        match first_error.into_inner().expect("error lock") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One whole chunk, from the cache or fetched once however many callers ask. A
    /// cached chunk this store does not trust yet is checked against the lazy index (and
    /// vouched for, or dropped and fetched again when wrong); without an index it is
    /// fetched again.
    pub async fn chunk(self: &Arc<Self>, blob: &BlobInfo, index: u64, priority: Priority) -> Result<Bytes, BlobError> {
        self.check_serving()?;
        let key = ChunkKey { blob: blob.digest, index };
        loop {
            let (pending, standing) = {
                let mut inflight = self.inflight.lock().expect("inflight lock");
                if let Some(f) = inflight.get(&key) {
                    (Some(f.clone()), Standing::Absent)
                } else {
                    match self.cache.standing(&key, &self.voucher) {
                        Standing::Unvouched if self.digests.contains_key(&blob.digest) => (None, Standing::Unvouched),
                        Standing::Trusted => (None, Standing::Trusted),
                        Standing::Absent | Standing::Unvouched => {
                            self.start_run(&mut inflight, blob, index, 1, priority);
                            (inflight.get(&key).cloned(), Standing::Absent)
                        }
                    }
                }
            };
            if let Some(fut) = pending {
                return fut.await.map_err(|e| unshare(&e));
            }
            let cache = self.cache.clone();
            if standing == Standing::Trusted {
                let voucher = self.voucher;
                let cached = tokio::task::spawn_blocking(move || cache.get(&key, Some(&voucher)))
                    .await
                    .map_err(|e| BlobError::Task(e.to_string()))??;
                match cached {
                    Some(data) => return Ok(Bytes::from(data)),
                    // Evicted between the check and the read: look again.
                    None => continue,
                }
            }
            let cached = tokio::task::spawn_blocking(move || cache.get_unvouched(&key))
                .await
                .map_err(|e| BlobError::Task(e.to_string()))??;
            let Some((data, generation)) = cached else { continue };
            match self.check_pieces(blob, index * self.settings.chunk_size, &data) {
                None => {
                    self.cache.vouch(&key, generation, &self.voucher);
                    return Ok(Bytes::from(data));
                }
                Some(detail) => {
                    // Cached by an earlier process or vouched for by another index, and
                    // not what this index says: drop it and fetch again.
                    self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                    self.cache.record_verify_failure();
                    tracing::error!(blob = %blob.digest, index, %detail, "cached chunk failed verification; dropping it");
                    self.cache.discard(&key, generation);
                }
            }
        }
    }

    /// Caches fetched, checked chunks from `first` on, in one blocking task; a cache
    /// failure is logged, since the bytes are as good as a cached copy would be. Returns,
    /// per chunk, the generation now holding its bytes (see [`ChunkCache::put`]).
    async fn store_chunks(&self, blob: &BlobInfo, first: u64, chunks: Arc<Vec<Bytes>>) -> Vec<Option<u64>> {
        let cache = self.cache.clone();
        let digest = blob.digest;
        let voucher = self.voucher;
        let put = tokio::task::spawn_blocking(move || {
            chunks
                .iter()
                .enumerate()
                .map(|(i, data)| cache.put(&ChunkKey { blob: digest, index: first + i as u64 }, data, &voucher))
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
        match put {
            Ok(Ok(generations)) => return generations,
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot cache chunk"),
            Err(e) => tracing::warn!(error = %e, "cache worker failed"),
        }
        Vec::new()
    }

    /// Hands chunks just stored to the process's background hasher, which feeds them to
    /// their blob's whole-blob hash in order, so that verification need not read them
    /// back. Runs arrive out of order (several are in flight at once): one that does not
    /// continue the hash waits in memory for those before it, up to as many chunks as a
    /// reader's window holds; beyond that, the runs furthest ahead are left to be read
    /// back at verification. Readers never wait for the hasher: it runs after the store
    /// permits are released, on a thread of lower CPU priority.
    fn hash_arrivals(self: &Arc<Self>, blob: &BlobInfo, first: u64, chunks: Arc<Vec<Bytes>>, stored: Vec<Option<u64>>) {
        if stored.is_empty() || self.cache.is_verified(&blob.digest) {
            return;
        }
        {
            let mut waiting = self.hash_waiting.lock().expect("hash waiting lock");
            waiting.entry(blob.digest).or_default().insert(first, HashRun { chunks, stored });
            let mut held: usize = waiting.values().flat_map(|runs| runs.values()).map(|r| r.chunks.len()).sum();
            while held > self.hash_waiting_cap {
                let Some(runs) = waiting.get_mut(&blob.digest) else { break };
                let Some((_, dropped)) = runs.pop_last() else { break };
                held -= dropped.chunks.len();
            }
        }
        if self.hash_draining.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        let sent =
            background_hasher().is_some_and(|hasher| hasher.send(Box::new(move || this.drain_hashing())).is_ok());
        if !sent {
            self.hash_waiting.lock().expect("hash waiting lock").clear();
            self.hash_draining.store(false, Ordering::SeqCst);
        }
    }

    /// On the hasher: feeds every waiting run that continues its blob's hash, until none
    /// does. A blob whose hash stops short of its first waiting run (the runs between
    /// were left out, having arrived too far ahead) is caught up from the cache, so that
    /// one run left out costs reading back that run, not the rest of the blob.
    fn drain_hashing(&self) {
        loop {
            if let Some((blob, first, run)) = self.next_hash_run() {
                let chunks: Vec<(Option<u64>, &[u8])> =
                    run.stored.iter().copied().zip(run.chunks.iter().map(|c| &c[..])).collect();
                self.cache.feed_hash_run(blob, first, &chunks);
                continue;
            }
            let ahead: Vec<(Digest, u64)> = {
                let waiting = self.hash_waiting.lock().expect("hash waiting lock");
                waiting.iter().filter_map(|(blob, runs)| Some((*blob, *runs.keys().next()?))).collect()
            };
            let caught_up =
                ahead.into_iter().filter(|&(blob, first)| self.cache.hash_catch_up(blob, first) == Some(first));
            if caught_up.count() > 0 {
                continue;
            }
            self.hash_draining.store(false, Ordering::SeqCst);
            // A run that arrived between the look and the flag saw it set and left.
            let ready = {
                let waiting = self.hash_waiting.lock().expect("hash waiting lock");
                waiting.iter().any(|(blob, runs)| self.cache.hash_next(blob).is_some_and(|n| runs.contains_key(&n)))
            };
            if !ready || self.hash_draining.swap(true, Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Takes a waiting run that continues its blob's hash, dropping runs the hash has
    /// passed (read back meanwhile) and those of blobs verified or being verified.
    fn next_hash_run(&self) -> Option<(Digest, u64, HashRun)> {
        let mut waiting = self.hash_waiting.lock().expect("hash waiting lock");
        let mut found = None;
        waiting.retain(|blob, runs| {
            if found.is_some() {
                return true;
            }
            let Some(next) = self.cache.hash_next(blob) else {
                // Verified, or being fed or verified elsewhere: verification reads back
                // whatever it has not seen.
                return !self.cache.is_verified(blob) && !self.verifying.lock().expect("verifying lock").contains(blob);
            };
            runs.retain(|&first, _| first >= next);
            if let Some(run) = runs.remove(&next) {
                found = Some((*blob, next, run));
            }
            !runs.is_empty()
        });
        found
    }

    /// Fetches `count` consecutive chunks from `first` with one ranged request and checks
    /// each: against the blob digest when a chunk is the whole blob, and against the lazy
    /// index's piece digests when known. A failing check fetches the range once more,
    /// then fails.
    async fn fetch_verified(&self, blob: &BlobInfo, first: u64, count: u64) -> Result<Vec<Bytes>, BlobError> {
        let cs = self.settings.chunk_size;
        let offset = first * cs;
        let len: u64 = (first..first + count).map(|i| self.chunk_len(blob, i)).sum();
        let whole = self.chunk_count(blob) == 1;
        let mut attempts_left = 2;
        loop {
            // One buffer per chunk: a chunk kept in memory for its reader (or its hash)
            // keeps no other chunk of the request.
            let chunks = self
                .source
                .read_range_pieces(&blob.digest, offset, len, cs)
                .await
                .map_err(|source| BlobError::Fetch { blob: blob.digest, index: first, source })?;
            self.stats.fetched_bytes.fetch_add(len, Ordering::Relaxed);
            self.stats.fetched_chunks.fetch_add(count, Ordering::Relaxed);
            let shape =
                (chunks.len() as u64 != count).then(|| (first, format!("{} pieces for {count} chunks", chunks.len())));
            let problem = shape.or_else(|| {
                chunks.iter().enumerate().find_map(|(i, chunk)| {
                    let index = first + i as u64;
                    if chunk.len() as u64 != self.chunk_len(blob, index) {
                        Some((index, format!("{} bytes for a chunk of {}", chunk.len(), self.chunk_len(blob, index))))
                    } else if whole && Digest::of(chunk) != blob.digest {
                        Some((index, "content does not match the blob digest".to_owned()))
                    } else {
                        self.check_pieces(blob, index * cs, chunk).map(|d| (index, d))
                    }
                })
            });
            let Some((index, detail)) = problem else { return Ok(chunks) };
            self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
            self.cache.record_verify_failure();
            attempts_left -= 1;
            tracing::warn!(blob = %blob.digest, index, %detail, "fetched chunk failed verification");
            if attempts_left == 0 {
                return Err(BlobError::Corrupt { blob: blob.digest, index, detail });
            }
        }
    }

    /// Checks `data`, read at `offset`, against the blob's known piece digests, with the
    /// hash the index's version names (sha256 or BLAKE3); says what is wrong, or None
    /// when it passes (or no digests are known).
    fn check_pieces(&self, blob: &BlobInfo, offset: u64, data: &[u8]) -> Option<String> {
        self.digests.get(&blob.digest)?.check(offset, data).err()
    }

    /// When every chunk of a blob is cached and it is not verified yet, finishes its
    /// whole-blob hash in the background and acts on the verdict (see
    /// [`ChunkCache::verify_blob`]).
    fn verify_if_complete(self: &Arc<Self>, blob: &BlobInfo) {
        let count = self.chunk_count(blob);
        // In-memory checks first: this runs after every chunk stored.
        if !(0..count).all(|i| self.cache.contains(&ChunkKey { blob: blob.digest, index: i })) {
            return;
        }
        if self.cache.is_verified(&blob.digest) {
            return;
        }
        if !self.verifying.lock().expect("verifying lock").insert(blob.digest) {
            return;
        }
        let this = self.clone();
        let blob = *blob;
        self.cache.pin_blob(&blob.digest);
        let verify = move || {
            if count > 1 {
                this.wait_for_hasher(&blob.digest);
            }
            let verdict = if count > 1 {
                let _one_at_a_time = this.hashing.lock().expect("hashing lock");
                lower_thread_priority();
                this.cache.verify_blob(&blob.digest, blob.size)
            } else {
                this.cache.verify_blob(&blob.digest, blob.size)
            };
            this.act_on(&blob, verdict);
            this.cache.unpin_blob(&blob.digest);
            this.verifying.lock().expect("verifying lock").remove(&blob.digest);
        };
        if count <= 1 {
            // A blob of one chunk was hashed as it arrived: nothing is left to read.
            drop(tokio::task::spawn_blocking(verify));
            return;
        }
        // Whatever of a larger blob arrived out of order is read back and hashed: work no
        // reader waits for, so it runs on a thread of its own at a lower CPU priority, one
        // blob at a time, and on a machine with few cores the readers, the cache writes
        // and the registry come first.
        let spawned = std::thread::Builder::new().name("verify".to_owned()).spawn(verify);
        if let Err(e) = spawned {
            tracing::warn!(blob = %blob.digest, error = %e, "cannot start verifying a blob");
            self.cache.unpin_blob(&blob.digest);
            self.verifying.lock().expect("verifying lock").remove(&blob.digest);
        }
    }

    /// Waits (a bounded time) while the background hasher still has runs of `blob` in
    /// memory to feed, so that verification does not read them back from the disk.
    fn wait_for_hasher(&self, blob: &Digest) {
        let deadline = std::time::Instant::now() + HASHER_WAIT;
        while std::time::Instant::now() < deadline {
            let waiting = self.hash_waiting.lock().expect("hash waiting lock").get(blob).is_some_and(|r| !r.is_empty());
            if !waiting && self.cache.hash_next(blob).is_some() {
                return;
            }
            std::thread::sleep(PREFETCH_YIELD);
        }
    }

    /// Logs and counts what whole-blob verification found.
    fn act_on(&self, blob: &BlobInfo, verdict: Result<Verdict, CacheError>) {
        match verdict {
            Ok(Verdict::Verified) => tracing::debug!(blob = %blob.digest, "blob verified"),
            // A chunk went missing meanwhile: verification waits for the next completion.
            Ok(Verdict::Incomplete) => {}
            Ok(Verdict::Mismatch { actual, condemned }) => {
                // Its chunks in memory are no better than the evicted ones.
                self.resident.lock().expect("resident lock").forget_blob(&blob.digest);
                self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(blob = %blob.digest, %actual, "integrity failure: cached blob does not match its digest; evicted it");
                for index in condemned {
                    tracing::error!(
                        blob = %blob.digest,
                        %actual,
                        %index,
                        "integrity failure: lazy index vouched for every chunk of a blob whose bytes are not that blob; its model is no longer served"
                    );
                }
            }
            Err(e) => tracing::warn!(blob = %blob.digest, error = %e, "cannot verify cached blob"),
        }
    }
}

/// Work for the background hasher.
type HashJob = Box<dyn FnOnce() + Send>;

/// The process's one background hasher (see [`BlobStore::hash_arrivals`]): a thread at a
/// lower CPU priority taking jobs through a channel. Each store queues at most one job
/// at a time, so the queue is as long as the stores with chunks to hash. None if the
/// thread cannot be started.
fn background_hasher() -> Option<&'static std::sync::mpsc::Sender<HashJob>> {
    static HASHER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<HashJob>>> = std::sync::OnceLock::new();
    HASHER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
            let spawned = std::thread::Builder::new().name("hash".to_owned()).spawn(move || {
                lower_thread_priority();
                for job in rx {
                    job();
                }
            });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the background hasher; blobs are hashed when complete");
                    None
                }
            }
        })
        .as_ref()
}

/// Lowers the calling thread's CPU priority (nice 10). A thread that exits afterwards
/// needs no restoring, which an unprivileged process could not do.
fn lower_thread_priority() {
    // SAFETY: `setpriority` only reads its arguments; on Linux, who = 0 with
    // PRIO_PROCESS names the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the verifier's priority");
    }
}

/// A copy of an error shared by every waiter on one fetch.
fn unshare(e: &BlobError) -> BlobError {
    match e {
        BlobError::Fetch { blob, index, source } => {
            BlobError::Fetch { blob: *blob, index: *index, source: clone_registry_error(source) }
        }
        BlobError::Corrupt { blob, index, detail } => {
            BlobError::Corrupt { blob: *blob, index: *index, detail: detail.clone() }
        }
        other => BlobError::Task(other.to_string()),
    }
}

/// Registry errors are not `Clone` (they may hold I/O errors); waiters on a shared
/// fetch get an equivalent copy.
fn clone_registry_error(e: &RegistryError) -> RegistryError {
    match e {
        RegistryError::NotFound { what, reference } => {
            RegistryError::NotFound { what: what.clone(), reference: reference.clone() }
        }
        RegistryError::Unauthorized { reference, detail } => {
            RegistryError::Unauthorized { reference: reference.clone(), detail: detail.clone() }
        }
        RegistryError::Exhausted { what, reference, attempts, last } => RegistryError::Exhausted {
            what: what.clone(),
            reference: reference.clone(),
            attempts: *attempts,
            last: last.clone(),
        },
        other => {
            RegistryError::Invalid { what: "request".to_owned(), reference: String::new(), detail: other.to_string() }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::modelpack::index::INDEX_ALGORITHM;

    /// Serves blobs from memory; can lie, and counts requests.
    #[derive(Default)]
    struct FakeSource {
        blobs: HashMap<Digest, Vec<u8>>,
        requests: AtomicU64,
        lie: AtomicBool,
    }

    impl RangeSource for FakeSource {
        fn read_range_pieces<'a>(
            &'a self,
            blob: &'a Digest,
            offset: u64,
            len: u64,
            piece: u64,
        ) -> BoxFuture<'a, Result<Vec<Bytes>, RegistryError>> {
            async move {
                self.requests.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                let data = &self.blobs[blob][offset as usize..(offset + len) as usize];
                let mut data = data.to_vec();
                if self.lie.load(Ordering::SeqCst) {
                    data[0] ^= 0xff;
                }
                Ok(data.chunks(piece as usize).map(Bytes::copy_from_slice).collect())
            }
            .boxed()
        }
    }

    fn store(blobs: &[&[u8]], chunk_size: u64) -> (Arc<BlobStore>, Arc<FakeSource>, tempfile::TempDir) {
        store_with(blobs, FetchSettings { chunk_size, ..FetchSettings::default() }, None)
    }

    /// A store over `blobs` in a fresh cache; with `piece`, each blob also has lazy-index
    /// digests of pieces of that size.
    fn store_with(
        blobs: &[&[u8]],
        settings: FetchSettings,
        piece: Option<usize>,
    ) -> (Arc<BlobStore>, Arc<FakeSource>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeSource {
            blobs: blobs.iter().map(|b| (Digest::of(b), b.to_vec())).collect(),
            ..FakeSource::default()
        });
        let cache = Arc::new(ChunkCache::open(dir.path(), None).unwrap());
        cache.bind_chunk_size(settings.chunk_size).unwrap();
        let index = piece.map(|piece| index_of(blobs.iter().map(|b| (Digest::of(b), b.to_vec())), piece));
        (BlobStore::new(source.clone(), cache, settings, index), source, dir)
    }

    /// The digests a lazy index of the current version would list for `blobs` (digest,
    /// content), in pieces of `piece` bytes; the index is named by what it describes.
    fn index_of(blobs: impl Iterator<Item = (Digest, Vec<u8>)>, piece: usize) -> IndexDigests {
        let mut described = piece.to_string().into_bytes();
        let chunks: HashMap<Digest, ChunkDigests> = blobs
            .map(|(digest, b)| {
                described.extend_from_slice(digest.hex().as_bytes());
                described.extend_from_slice(&b);
                (digest, ChunkDigests::of(INDEX_ALGORITHM, piece as u64, &b))
            })
            .collect();
        IndexDigests { index: Digest::of(&described), chunks }
    }

    fn info(data: &[u8]) -> BlobInfo {
        BlobInfo { digest: Digest::of(data), size: data.len() as u64 }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_across_chunks_and_then_from_cache() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (store, source, _dir) = store(&[&data], 1024);
        let blob = info(&data);
        assert_eq!(store.read(&blob, 1000, 3000).await.unwrap(), data[1000..4000]);
        let fetched = source.requests.load(Ordering::SeqCst);
        assert_eq!(fetched, 4, "chunks 0..=3");
        assert_eq!(store.read(&blob, 1500, 2000).await.unwrap(), data[1500..3500]);
        assert_eq!(source.requests.load(Ordering::SeqCst), fetched, "served from the cache");
        assert_eq!(store.read(&blob, 9990, 100).await.unwrap(), data[9990..], "clamped at the end");
        assert!(store.read(&blob, 20_000, 1).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_of_one_chunk_fetch_once() {
        let data = vec![7u8; 4096];
        let (store, source, _dir) = store(&[&data], 1024);
        let blob = info(&data);
        let reads: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.read(&blob, 2048, 100).await.unwrap() })
            })
            .collect();
        for r in reads {
            assert_eq!(r.await.unwrap(), vec![7u8; 100]);
        }
        assert_eq!(source.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_chunk_blob_is_verified_before_it_is_served() {
        let data = b"config bytes".to_vec();
        let (store, source, _dir) = store(&[&data], 1024);
        let blob = info(&data);
        source.lie.store(true, Ordering::SeqCst);
        let err = store.read(&blob, 0, 100).await.unwrap_err();
        assert!(matches!(err, BlobError::Corrupt { .. }), "{err}");
        assert_eq!(source.requests.load(Ordering::SeqCst), 2, "fetched once more before giving up");
        assert!(!store.cache().contains(&ChunkKey { blob: blob.digest, index: 0 }), "nothing corrupt is cached");
        source.lie.store(false, Ordering::SeqCst);
        assert_eq!(store.read(&blob, 0, 100).await.unwrap(), data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_complete_blob_that_fails_its_digest_is_evicted() {
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let (store, source, _dir) = store(&[&data], 1024);
        let blob = info(&data);
        source.lie.store(true, Ordering::SeqCst);
        store.prefetch(vec![blob]).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.stats().verify_failures.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "verification never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while (0..4).any(|i| store.cache().contains(&ChunkKey { blob: blob.digest, index: i })) {
            assert!(std::time::Instant::now() < deadline, "corrupt blob not evicted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        source.lie.store(false, Ordering::SeqCst);
        store.prefetch(vec![blob]).await.unwrap();
        while !store.cache().is_verified(&blob.digest) {
            assert!(std::time::Instant::now() < deadline, "good blob never verified");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.read(&blob, 0, 4096).await.unwrap(), data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_chunk_digests_every_chunk_is_checked_before_it_is_served() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        let blob = info(&data);
        let settings = FetchSettings { chunk_size: 2048, ..FetchSettings::default() };
        let (store, source, _dir) = store_with(&[&data], settings, Some(1024));
        source.lie.store(true, Ordering::SeqCst);
        let err = store.read(&blob, 3000, 10).await.unwrap_err();
        assert!(matches!(err, BlobError::Corrupt { .. }), "{err}");
        assert_eq!(source.requests.load(Ordering::SeqCst), 2);
        assert!(!store.cache().contains(&ChunkKey { blob: blob.digest, index: 1 }));
        source.lie.store(false, Ordering::SeqCst);
        assert_eq!(store.read(&blob, 3000, 10).await.unwrap(), data[3000..3010]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_chunk_digests_chunks_cached_by_an_earlier_process_are_checked_before_they_are_served() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 241) as u8).collect();
        let blob = info(&data);
        let settings = FetchSettings { chunk_size: 2048, ..FetchSettings::default() };
        let (store, source, _dir) = store_with(&[&data], settings, Some(1024));
        // Left by an earlier process: chunk 0 right, chunk 1 wrong with the right length.
        let earlier = Voucher::Reader(u64::MAX);
        store.cache().put(&ChunkKey { blob: blob.digest, index: 0 }, &data[..2048], &earlier).unwrap();
        store.cache().put(&ChunkKey { blob: blob.digest, index: 1 }, &[0u8; 2048], &earlier).unwrap();

        assert_eq!(store.read(&blob, 10, 100).await.unwrap(), data[10..110]);
        assert_eq!(source.requests.load(Ordering::SeqCst), 0, "a cached chunk that checks out is served");
        assert_eq!(store.read(&blob, 2048 + 10, 100).await.unwrap(), data[2058..2158]);
        assert_eq!(store.stats().verify_failures.load(Ordering::SeqCst), 1);
        assert!(source.requests.load(Ordering::SeqCst) >= 1, "the wrong chunk was fetched again");
        assert_eq!(store.read(&blob, 0, 8192).await.unwrap(), data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_ahead_fetches_whole_groups_of_chunks_in_one_request_that_readers_join() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let blob = info(&data);
        let settings = FetchSettings { chunk_size: 1024, stream_request_chunks: 4, ..FetchSettings::default() };
        let (store, source, _dir) = store_with(&[&data], settings, None);
        let cached = |range: std::ops::RangeInclusive<u64>| {
            range.into_iter().all(|i| store.cache().contains(&ChunkKey { blob: blob.digest, index: i }))
        };
        let settle = |range: std::ops::RangeInclusive<u64>| async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !cached(range.clone()) {
                assert!(std::time::Instant::now() < deadline, "read-ahead did not complete");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        // Chunk 0 on demand; then chunks 1..=8 ahead, widened to the end of their group
        // of four: runs 1..=3, 4..=7 and 8..=11.
        assert_eq!(store.read(&blob, 0, 10).await.unwrap(), data[..10]);
        store.read_ahead(&blob, 1024, 8 * 1024, true);
        // A reader arriving while a run is in flight joins it.
        assert_eq!(store.read(&blob, 2048 + 5, 100).await.unwrap(), data[2053..2153]);
        settle(1..=11).await;
        assert_eq!(source.requests.load(Ordering::SeqCst), 1 + 3, "one request per group");
        // The window slides one chunk further: the whole next group comes in one request.
        store.read_ahead(&blob, 9 * 1024, 4 * 1024, true);
        settle(12..=15).await;
        assert_eq!(source.requests.load(Ordering::SeqCst), 1 + 4);
        // The last group stops at the blob's end (chunks 16..=19).
        store.read_ahead(&blob, 16 * 1024, 1, true);
        settle(16..=19).await;
        assert_eq!(source.requests.load(Ordering::SeqCst), 1 + 5);
        assert_eq!(store.read(&blob, 1024, 18_000).await.unwrap(), data[1024..19_024]);
        assert_eq!(source.requests.load(Ordering::SeqCst), 1 + 5, "all served from the cache");
    }

    #[tokio::test]
    async fn read_ahead_can_end_where_asked() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let blob = info(&data);
        let settings = FetchSettings { chunk_size: 1024, stream_request_chunks: 4, ..FetchSettings::default() };
        let (store, source, _dir) = store_with(&[&data], settings, None);
        // Bytes 1024..3073 lie in chunks 1..=3: those alone, not the rest of the group.
        store.read_ahead(&blob, 1024, 2 * 1024 + 1, false);
        store.settle().await;
        let cached: Vec<u64> =
            (0..20).filter(|&i| store.cache().contains(&ChunkKey { blob: blob.digest, index: i })).collect();
        assert_eq!(cached, [1, 2, 3]);
        assert_eq!(source.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn chunks_fetched_for_a_reader_stay_in_memory_until_read_to_their_end() {
        let data: Vec<u8> = (0..8_000u32).map(|i| (i % 251) as u8).collect();
        let blob = info(&data);
        let settings = FetchSettings { chunk_size: 1024, stream_request_chunks: 4, ..FetchSettings::default() };
        let (store, source, _dir) = store_with(&[&data], settings, None);
        assert_eq!(store.read_in_memory(&blob, 0, 10), None, "nothing fetched yet");
        store.read_ahead(&blob, 0, 3 * 1024, false);
        store.settle().await;
        assert_eq!(store.read_in_memory(&blob, 10, 100).unwrap(), data[10..110]);
        // A read across two chunks, to the end of the first: that one is dropped.
        assert_eq!(store.read_in_memory(&blob, 1000, 100).unwrap(), data[1000..1100]);
        assert_eq!(store.read_in_memory(&blob, 0, 10), None);
        assert_eq!(store.read_in_memory(&blob, 2000, 1048).unwrap(), data[2000..3048]);
        assert_eq!(store.read_in_memory(&blob, 3072, 10), None, "never fetched");
        // What is not in memory any more comes from the cache, without a fetch.
        assert_eq!(store.read(&blob, 0, 3072).await.unwrap(), data[..3072]);
        assert_eq!(source.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetch_of_ranges_fetches_the_chunks_they_cover() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 247) as u8).collect();
        let small = b"a small file".to_vec();
        let (blob, tiny) = (info(&data), info(&small));
        let settings = FetchSettings { chunk_size: 1024, stream_request_chunks: 4, ..FetchSettings::default() };
        let (store, source, _dir) = store_with(&[&data, &small], settings, None);
        // The head of the blob (chunks 0..=1), chunks 3..=9 (split where the groups of
        // four meet: 3, 4..=7, 8..=9), chunk 9 again, a range past the end, an empty
        // range, and a whole small blob.
        let ranges = vec![
            (blob, 0..2000),
            (blob, 3500..9300),
            (blob, 9300..9301),
            (blob, 30_000..40_000),
            (blob, 5..5),
            (tiny, 0..u64::MAX),
        ];
        let reported = AtomicU64::new(0);
        store
            .prefetch_ranges(ranges, &|n| {
                reported.fetch_add(n, Ordering::SeqCst);
            })
            .await
            .unwrap();
        assert_eq!(reported.into_inner(), 2000 + 5800 + 1 + small.len() as u64, "the ranges' bytes, clamped");
        store.settle().await;
        let cached: Vec<u64> =
            (0..20).filter(|i| store.cache().contains(&ChunkKey { blob: blob.digest, index: *i })).collect();
        assert_eq!(cached, [0, 1, 3, 4, 5, 6, 7, 8, 9]);
        assert!(store.cache().contains(&ChunkKey { blob: tiny.digest, index: 0 }));
        assert_eq!(source.requests.load(Ordering::SeqCst), 5, "0..=1, 3, 4..=7, 8..=9 and the small blob");
        // A whole-blob prefetch fetches only what is missing, in the same groups.
        store.prefetch(vec![blob]).await.unwrap();
        assert_eq!(source.requests.load(Ordering::SeqCst), 5 + 4, "2, 10..=11, 12..=15, 16..=19");
        assert_eq!(store.read(&blob, 0, 20_000).await.unwrap(), data);
    }

    /// Stores over one shared cache, as `serve` has one per model: each serves `blobs`
    /// (digest → the bytes its registry answers for it), with the chunk digests of an
    /// index describing those bytes when `indexed`.
    fn tenant(cache: &Arc<ChunkCache>, blobs: &[(Digest, &[u8])], indexed: bool) -> (Arc<BlobStore>, Arc<FakeSource>) {
        let source = Arc::new(FakeSource {
            blobs: blobs.iter().map(|(d, b)| (*d, b.to_vec())).collect(),
            ..FakeSource::default()
        });
        let index = indexed.then(|| index_of(blobs.iter().map(|(d, b)| (*d, b.to_vec())), 1024));
        let settings = FetchSettings { chunk_size: 2048, ..FetchSettings::default() };
        (BlobStore::new(source.clone(), cache.clone(), settings, index), source)
    }

    fn shared_cache() -> (Arc<ChunkCache>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path(), None).unwrap());
        cache.bind_chunk_size(2048).unwrap();
        (cache, dir)
    }

    /// The honest blob and the attacker's bytes of the same length.
    fn honest_and_forged() -> (Vec<u8>, Vec<u8>) {
        let honest: Vec<u8> = (0..8192u32).map(|i| (i % 239) as u8).collect();
        let forged: Vec<u8> = honest.iter().map(|b| b ^ 0x5a).collect();
        (honest, forged)
    }

    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what} never happened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_a_forged_index_vouched_for_are_served_to_no_other_reader() {
        let (honest, forged) = honest_and_forged();
        let blob = info(&honest);
        let (cache, _dir) = shared_cache();
        let (attacker, _) = tenant(&cache, &[(blob.digest, &forged)], true);
        // The attacker's own readers get what its index describes, for part of the blob.
        assert_eq!(attacker.read(&blob, 0, 5000).await.unwrap(), forged[..5000]);
        attacker.settle().await;
        assert!(!cache.is_verified(&blob.digest));

        let (plain, _) = tenant(&cache, &[(blob.digest, &honest)], false);
        assert_eq!(plain.read(&blob, 0, 8192).await.unwrap(), honest, "a reader without an index");
        let (indexed, _) = tenant(&cache, &[(blob.digest, &honest)], true);
        assert_eq!(indexed.read(&blob, 0, 8192).await.unwrap(), honest, "a reader of the honest index");
        plain.settle().await;
        indexed.settle().await;
        wait_for("verification of the honest blob", || cache.is_verified(&blob.digest)).await;
        assert_eq!(attacker.read(&blob, 0, 8192).await.unwrap(), honest, "a verified blob is the blob, for everyone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_index_that_vouched_for_a_whole_blob_that_fails_its_digest_is_condemned() {
        let (honest, forged) = honest_and_forged();
        let blob = info(&honest);
        let (cache, _dir) = shared_cache();
        let (attacker, _) = tenant(&cache, &[(blob.digest, &forged)], true);
        let (honest_reader, _) = tenant(&cache, &[(blob.digest, &honest)], true);
        // Every chunk matches the forged index, so the whole blob is there before anyone
        // else reads it: its hash, not the index, decides.
        attacker.prefetch(vec![blob]).await.unwrap();
        attacker.settle().await;
        assert!(!cache.is_verified(&blob.digest), "chunk digests never make a blob verified");
        assert!(attacker.stats().verify_failures.load(Ordering::SeqCst) >= 1);
        let err = attacker.read(&blob, 0, 10).await.unwrap_err();
        assert!(matches!(err, BlobError::Condemned { .. }), "{err}");
        assert!(cache.complete_path(&blob.digest).is_none(), "nothing to pass through");

        assert_eq!(honest_reader.read(&blob, 0, 8192).await.unwrap(), honest);
        honest_reader.settle().await;
        wait_for("verification of the honest blob", || cache.is_verified(&blob.digest)).await;
        assert!(!cache.is_condemned(&honest_reader.voucher_index()), "an honest index is never condemned");

        // Condemnation outlives the process.
        let dir = cache.dir().to_owned();
        let condemned = attacker.voucher_index();
        drop((attacker, honest_reader, cache));
        let reopened = ChunkCache::open(&dir, None).unwrap();
        assert!(reopened.load_condemned(&condemned).unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_is_verified_by_its_whole_hash_whatever_order_its_chunks_arrive_in() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 233) as u8).collect();
        let blob = info(&data);
        let (cache, _dir) = shared_cache();
        let (store, _) = tenant(&cache, &[(blob.digest, &data)], false);
        for start in [6144, 0, 14336, 2048, 10240, 18432, 4096, 8192, 12288, 16384] {
            assert_eq!(store.read(&blob, start, 1).await.unwrap(), data[start as usize..start as usize + 1]);
        }
        store.settle().await;
        wait_for("verification", || cache.is_verified(&blob.digest)).await;
        assert_eq!(store.read(&blob, 0, 20_000).await.unwrap(), data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_arriving_out_of_order_are_hashed_from_memory_not_read_back() {
        let data: Vec<u8> = (0..8_192u32).map(|i| (i % 229) as u8).collect();
        let blob = info(&data);
        let (cache, _dir) = shared_cache();
        let (store, _) = tenant(&cache, &[(blob.digest, &data)], false);
        // The second group of four chunks arrives first, then the first.
        store.read_ahead(&blob, 4096, 4096, false);
        store.settle().await;
        store.read_ahead(&blob, 0, 4096, false);
        store.settle().await;
        wait_for("verification", || cache.is_verified(&blob.digest)).await;
        assert_eq!(cache.stats().hits, 0, "no chunk was read back from the cache");
        assert_eq!(store.read(&blob, 0, 8_192).await.unwrap(), data);
    }
}
