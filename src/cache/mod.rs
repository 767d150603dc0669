//! The local chunk cache: blob bytes fetched from the registry, kept on disk in chunks so
//! that a byte is fetched at most once while it stays cached, plus small metadata records
//! (resolved manifests) and the unpacked copies of compressed layers.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/lock                             advisory lock: one process per cache root
//! <dir>/boot-id                          the boot in which the cache was last opened
//! <dir>/blobs/sha256/<hex>               blob data: chunk i at byte i × chunk size, holes elsewhere
//! <dir>/blobs/sha256/<hex>.map           presence map: chunk i's length (u32 LE) at byte 4i, 0 = absent
//! <dir>/blobs/sha256/<hex>.verified      marker: every chunk present, and the whole blob hashed to its digest
//! <dir>/meta/<sha256 hex of the name>    a named metadata record (also: condemned lazy indexes)
//! <dir>/unpacked/sha256/<hex>.tar        decompressed copy of a compressed layer
//! <dir>/tmp/                             files being written, or removed, before their rename/unlink
//! ```
//!
//! Every directory is `0700` and every file `0600` (an existing root is tightened at
//! `open`): cached weights may be proprietary, and no other local user may read them.
//!
//! A blob is one sparse file, so a blob whose chunks are all present *is* the blob: once
//! verified, the FUSE layer hands that very file to the kernel for passthrough reads, with
//! no second copy. A cache is bound to one chunk size ([`ChunkCache::bind_chunk_size`]),
//! which places chunks in the file.
//!
//! # Trust
//!
//! Who may be served which cached bytes is decided in [`trust`]: a verified blob (its
//! whole content hashed to its digest) is trusted by every reader; a chunk of an
//! unverified blob only by the [`Voucher`]s that stood behind its exact bytes. The
//! whole-blob hash can be fed with chunks as they arrive in order
//! ([`ChunkCache::feed_hash`], with the generation [`ChunkCache::put`] returned), so
//! [`ChunkCache::verify_blob`] reads back only what was not fed.
//!
//! # Durability
//!
//! A chunk's bytes are written into the data file first and its length into the presence
//! map second, so a reader on this boot sees a chunk whole or not at all, even if the
//! process dies mid-write. Chunk data is not flushed with `fsync` when it is stored:
//! flushing every chunk made cold reads wait for the disk. Only a power loss or kernel
//! crash can then tear a chunk, so the cache records the boot it was opened in
//! (`boot-id`), and an `open` in a later boot deletes every blob without a verified
//! marker. [`ChunkCache::verify_blob`] flushes the blob's data file and map before it
//! writes the marker, so a marker always vouches for durable chunks. A present chunk is
//! never written again (a verified blob's bytes never change under a passthrough reader).
//! Metadata records and unpacked layers are flushed before their rename, and metadata
//! directories on every write. `open` deletes whatever is left in `tmp/` and rebuilds the
//! index from the presence maps.
//!
//! # Eviction
//!
//! Chunk data is kept within an optional byte budget. After each `put`, least recently
//! used chunks are evicted until the total fits, skipping the chunk just written and
//! every chunk of a pinned blob (a blob being read); if only those remain, the cache
//! stays over budget until they are unpinned. A chunk of an unverified blob is evicted by
//! punching a hole in the data file; a verified blob is evicted whole, its marker first
//! (durably) and then its files unlinked, so a file the kernel still reads for a
//! passthrough open keeps its bytes until closed. Recency survives a restart through the
//! data file's modification time, refreshed by reads at most once per
//! [`MTIME_REFRESH_INTERVAL`]. Unpacked copies of compressed layers count too: a copy an
//! open model holds ([`ChunkCache::lease_unpacked`]) is never evicted, one no model holds
//! is evicted before any chunk, and the daemon removes a copy as soon as its last model
//! goes ([`ChunkCache::drop_unused_unpacked`]). Metadata records are outside the budget.
//!
//! # Concurrency
//!
//! [`ChunkCache`] is `Send + Sync` and meant to be shared through an `Arc` by blocking
//! threads. One mutex guards the bookkeeping (index, sizes, pins, markers) and the
//! renames, unlinks, holes and map entries that must agree with it; reading and writing
//! chunk data and `fsync` happen outside it, so readers of large chunks do not queue
//! behind each other. Every present chunk carries a generation number: a read checks,
//! after reading, that its chunk is still the one it looked up, so a chunk evicted or
//! removed meanwhile reads as absent rather than as the hole left behind.

mod fsutil;
mod layout;
mod scan;
#[cfg(test)]
mod tests;
pub mod trust;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use lru::LruCache;

use self::fsutil::{
    boot_id, ensure_dir, private_dir_all, private_file, sync_dir, sync_file, try_lock_exclusive, write_synced,
};
use self::layout::Layout;
use self::trust::{HashSlot, MARKER_CONTENT};
pub use self::trust::{Standing, Verdict, Voucher};
use crate::modelpack::digest::Hasher;
use crate::modelpack::Digest;

/// How stale a blob's recorded use may get before a read refreshes its data file's mtime.
/// Refreshing on every read would add a metadata write to each hit; this bound keeps
/// the LRU order rebuilt after a restart accurate to within a minute.
pub const MTIME_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// How long verification waits before looking again when a put is feeding the blob's
/// hash (which takes a few milliseconds per chunk).
const HASH_WAIT: Duration = Duration::from_millis(1);

/// Most chunks [`ChunkCache::cached_bytes`] looks up under one hold of the lock: a few
/// hundred microseconds, however large the blob.
const PRESENCE_BATCH: u64 = 4096;

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file-system operation on a cache path failed.
    #[error("cannot {op} {path}: {cause}")]
    Io {
        /// What was being done, e.g. "write chunk".
        op: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    /// Another process (or another `ChunkCache` in this one) already uses the directory.
    #[error("cache directory {path} is already in use by another process")]
    Locked { path: PathBuf },
    /// The cache holds chunks of another size: their indices mean other byte ranges.
    #[error(
        "cache directory {path} holds {cached}-byte chunks, not {requested}-byte ones; use another cache directory, or leave the chunk size at its default to keep this one's"
    )]
    ChunkSizeMismatch { path: PathBuf, cached: u64, requested: u64 },
    /// Chunks hold at least one byte: a zero length marks an absent chunk.
    #[error("refusing to store empty chunk {} of blob {}", key.index, key.blob)]
    EmptyChunk { key: ChunkKey },
    /// A chunk longer than the chunk size would overlap the next one.
    #[error("refusing to store chunk {} of blob {}: {len} bytes exceed the {chunk_size}-byte chunk size", key.index, key.blob)]
    ChunkTooLong { key: ChunkKey, len: u64, chunk_size: u64 },
    /// Chunks are placed by the chunk size, which is not known yet.
    #[error("cache directory {path} is not bound to a chunk size yet")]
    Unbound { path: PathBuf },
}

/// Builds the error for a failed operation `op` on `path`, for use with `map_err`.
fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |cause| CacheError::Io { op, path: path.to_owned(), cause }
}

/// One chunk of one blob: bytes `[index * chunk_size, (index + 1) * chunk_size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub blob: Digest,
    pub index: u64,
}

/// A snapshot of the cache's counters. `hits`, `misses`, `evictions` and
/// `verify_failures` count since `open`; `used_bytes` and `chunks` describe the chunks
/// present now.
#[derive(Clone, Debug, Default)]
pub struct CacheStats {
    pub used_bytes: u64,
    pub chunks: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub verify_failures: u64,
}

/// What the index remembers about a present chunk.
#[derive(Clone, Debug)]
struct Entry {
    size: u64,
    /// The data file's mtime as last set or read by the cache.
    touched: SystemTime,
    /// Unique per stored chunk: a read that looked up one generation and finds another
    /// (or none) afterwards read bytes that may have been evicted under it.
    generation: u64,
    /// Who stands behind this generation's bytes while the blob is unverified (see
    /// [`trust`]). Empty for chunks an earlier process stored.
    vouchers: Vec<Voucher>,
}

/// Bookkeeping guarded by the mutex.
#[derive(Debug)]
struct Inner {
    /// Present chunks, most recently used first.
    lru: LruCache<ChunkKey, Entry>,
    used_bytes: u64,
    /// Pin counts of blobs that must not lose chunks to eviction.
    pins: HashMap<Digest, u64>,
    /// Blobs whose verified marker exists.
    verified: HashSet<Digest>,
    /// Chunks whose bytes a `put` is writing: one writer per chunk, and none while it is
    /// present, so no write can straddle the hole punched by an eviction.
    writing: HashSet<ChunkKey>,
    next_generation: u64,
    /// Whole-blob hashes fed in arrival order.
    hashing: HashMap<Digest, HashSlot>,
    /// Lazy indexes (by JSON digest) caught vouching for bytes that are not their blob.
    condemned: HashSet<Digest>,
    /// Unpacked copies of compressed layers, counted in `used_bytes`.
    unpacked: HashMap<Digest, UnpackedEntry>,
    /// Whether a copy goes when its last user does (the daemon), or stays, evictable,
    /// for the next process (the CLI).
    drop_unused_unpacked: bool,
}

/// What the cache remembers about one unpacked copy.
#[derive(Debug, Clone, Copy)]
struct UnpackedEntry {
    size: u64,
    /// Leases held by open models: a copy in use is never evicted.
    users: u64,
    touched: SystemTime,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    verify_failures: AtomicU64,
}

/// A chunk cache rooted at one directory. See the module documentation for its layout,
/// durability and eviction rules.
#[derive(Debug)]
pub struct ChunkCache {
    layout: Layout,
    budget: Option<u64>,
    inner: Mutex<Inner>,
    counters: Counters,
    next_temp: AtomicU64,
    /// The bound chunk size; 0 until [`Self::bind_chunk_size`].
    chunk_size: AtomicU64,
    next_reader: AtomicU64,
    /// Whether chunk writes may bypass the page cache (see [`Self::write_chunk`]); cleared
    /// the first time the file system refuses `O_DIRECT`.
    direct: AtomicBool,
    /// Holds the advisory lock on the root for as long as the cache is open.
    _lock: File,
}

impl ChunkCache {
    /// Opens (creating) a cache rooted at `dir`. `budget` is the most bytes of chunk data
    /// kept; `None` means unlimited. Rebuilds the size accounting and the LRU order (by
    /// data file mtime) from the presence maps, deletes leftover temporary files and the
    /// directories of an earlier layout, and, in a new boot, every unverified blob. If
    /// the existing chunks exceed the budget, the oldest are evicted straight away.
    pub fn open(dir: &Path, budget: Option<u64>) -> Result<Self, CacheError> {
        private_dir_all(dir).map_err(io_error("create cache directory", dir))?;
        let layout = Layout::new(dir);

        let lock_path = layout.lock_file();
        let lock = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open lock file", &lock_path))?;
        if !try_lock_exclusive(&lock).map_err(io_error("lock", &lock_path))? {
            return Err(CacheError::Locked { path: dir.to_owned() });
        }

        for sub in layout.dirs() {
            if ensure_dir(&sub).map_err(io_error("create directory", &sub))? {
                let parent = sub.parent().unwrap_or(dir);
                sync_dir(parent).map_err(io_error("flush directory", parent))?;
            }
        }
        scan::clear_tmp(&layout)?;
        scan::remove_obsolete(&layout)?;
        let boot = boot_id();
        let boot_file = layout.boot_file();
        let last_boot = match fs::read_to_string(&boot_file) {
            Ok(id) => Some(id.trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error("read", &boot_file)(e)),
        };
        // No record: a new cache. An unreadable boot id counts as a new boot each time.
        let rebooted = last_boot.is_some() && (boot.is_none() || last_boot != boot);
        let recovered = scan::scan(&layout, rebooted)?;
        if boot.is_none() || last_boot != boot {
            let tmp = layout.tmp_dir().join("boot-id");
            let id = boot.unwrap_or_default();
            write_synced(&tmp, id.as_bytes()).map_err(io_error("write temporary boot record", &tmp))?;
            fs::rename(&tmp, &boot_file).map_err(io_error("rename boot record into place", &boot_file))?;
            sync_dir(dir).map_err(io_error("flush directory", dir))?;
        }

        let mut inner = Inner {
            lru: LruCache::unbounded(),
            used_bytes: 0,
            pins: HashMap::new(),
            verified: recovered.verified,
            writing: HashSet::new(),
            next_generation: 1,
            hashing: HashMap::new(),
            condemned: HashSet::new(),
            unpacked: HashMap::new(),
            drop_unused_unpacked: false,
        };
        for (blob, size, touched) in recovered.unpacked {
            inner.used_bytes += size;
            inner.unpacked.insert(blob, UnpackedEntry { size, users: 0, touched });
        }
        for (key, mut entry) in recovered.chunks {
            entry.generation = inner.next_generation;
            inner.next_generation += 1;
            inner.used_bytes += entry.size;
            inner.lru.push(key, entry);
        }
        tracing::info!(
            dir = %dir.display(),
            chunks = inner.lru.len(),
            used_bytes = inner.used_bytes,
            budget = ?budget,
            "opened chunk cache"
        );

        let cache = Self {
            layout,
            budget,
            inner: Mutex::new(inner),
            counters: Counters::default(),
            next_temp: AtomicU64::new(0),
            chunk_size: AtomicU64::new(0),
            next_reader: AtomicU64::new(1),
            direct: AtomicBool::new(true),
            _lock: lock,
        };
        {
            let mut inner = cache.lock();
            cache.evict(&mut inner, None);
        }
        Ok(cache)
    }

    /// The chunk size the cache directory was bound to, by this or an earlier process;
    /// None while it is not bound to one.
    pub fn recorded_chunk_size(&self) -> Result<Option<u64>, CacheError> {
        Ok(self.get_meta(CHUNK_SIZE_META)?.and_then(|raw| std::str::from_utf8(&raw).ok()?.trim().parse().ok()))
    }

    /// Binds the cache to one chunk size: the first call records it, later calls (in this
    /// or a later process) with another size fail, since a chunk index only names a byte
    /// range together with the size. Chunks can be stored and read once it is bound.
    pub fn bind_chunk_size(&self, chunk_size: u64) -> Result<(), CacheError> {
        const NAME: &str = CHUNK_SIZE_META;
        match self.get_meta(NAME)? {
            Some(raw) => {
                let cached = std::str::from_utf8(&raw).ok().and_then(|s| s.trim().parse::<u64>().ok());
                match cached {
                    Some(cached) if cached == chunk_size => {}
                    // An unreadable record cannot vouch for the chunks; start over.
                    cached => {
                        return Err(CacheError::ChunkSizeMismatch {
                            path: self.dir().to_owned(),
                            cached: cached.unwrap_or(0),
                            requested: chunk_size,
                        })
                    }
                }
            }
            None => self.put_meta(NAME, chunk_size.to_string().as_bytes())?,
        }
        self.chunk_size.store(chunk_size, Ordering::Relaxed);
        Ok(())
    }

    /// The cache root.
    pub fn dir(&self) -> &Path {
        self.layout.root()
    }

    /// The most bytes kept; None when unlimited.
    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Bytes of `blob` (of `size` bytes) present in the cache now. Looks every chunk up
    /// by its index (a blob's chunks are not kept together), taking the lock for at most
    /// [`PRESENCE_BATCH`] of them at a time so that readers are never held up for long.
    pub fn cached_bytes(&self, blob: &Digest, size: u64) -> u64 {
        let Ok(chunk_size) = self.bound_chunk_size() else { return 0 };
        let chunks = size.div_ceil(chunk_size);
        let mut present = 0;
        let mut first = 0;
        while first < chunks {
            let last = chunks.min(first + PRESENCE_BATCH);
            let inner = self.lock();
            present += (first..last)
                .filter_map(|index| inner.lru.peek(&ChunkKey { blob: *blob, index }))
                .map(|e| e.size)
                .sum::<u64>();
            drop(inner);
            first = last;
        }
        present
    }

    fn bound_chunk_size(&self) -> Result<u64, CacheError> {
        match self.chunk_size.load(Ordering::Relaxed) {
            0 => Err(CacheError::Unbound { path: self.dir().to_owned() }),
            size => Ok(size),
        }
    }

    /// A reader identity for a reader without chunk digests (see [`Voucher::Reader`]):
    /// the chunks it fetches are trusted by it alone until their blob is verified.
    pub fn new_reader(&self) -> Voucher {
        Voucher::Reader(self.next_reader.fetch_add(1, Ordering::Relaxed))
    }

    /// How a reader vouching as `voucher` stands to a chunk (see [`trust`]).
    pub fn standing(&self, key: &ChunkKey, voucher: &Voucher) -> Standing {
        let inner = self.lock();
        match inner.lru.peek(key) {
            None => Standing::Absent,
            Some(e) => trust::standing(inner.verified.contains(&key.blob), &e.vouchers, voucher),
        }
    }

    /// The chunk's bytes if present and trusted by `voucher` (counts a hit or a miss,
    /// marks it recently used). With `None`, any present chunk is read: for a reader
    /// that checks the bytes itself, or for hashing.
    pub fn get(&self, key: &ChunkKey, voucher: Option<&Voucher>) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.get_with_generation(key, voucher)?.map(|(data, _)| data))
    }

    /// A present chunk's bytes, trusted or not, with the generation to name them by in
    /// [`Self::vouch`] or [`Self::discard`] once they are checked.
    pub fn get_unvouched(&self, key: &ChunkKey) -> Result<Option<(Vec<u8>, u64)>, CacheError> {
        self.get_with_generation(key, None)
    }

    fn get_with_generation(
        &self,
        key: &ChunkKey,
        voucher: Option<&Voucher>,
    ) -> Result<Option<(Vec<u8>, u64)>, CacheError> {
        let Some(size) = self.lock().lru.peek(key).map(|e| e.size) else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let mut data = vec![0u8; size as usize];
        Ok(match self.read_chunk(key, 0, &mut data, voucher)? {
            Some((n, generation)) if n == data.len() => Some((data, generation)),
            _ => None,
        })
    }

    /// Reads part of a present chunk trusted by `voucher` (any present chunk with `None`)
    /// into `buf` at `offset` within the chunk; returns bytes read, or None if absent or
    /// not trusted. Fewer bytes than `buf.len()` means the chunk ends first (zero when
    /// `offset` is at or past its end). Counts a hit or a miss and marks the chunk
    /// recently used.
    pub fn read_into(
        &self,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
        voucher: Option<&Voucher>,
    ) -> Result<Option<usize>, CacheError> {
        Ok(self.read_chunk(key, offset, buf, voucher)?.map(|(n, _)| n))
    }

    /// [`Self::read_into`], also returning the generation read. Trust is checked before
    /// the read and again after it, together with the generation, so bytes stored by
    /// someone else under our feet are never returned as trusted ones.
    fn read_chunk(
        &self,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
        voucher: Option<&Voucher>,
    ) -> Result<Option<(usize, u64)>, CacheError> {
        let looked_up = {
            let mut inner = self.lock();
            let verified = inner.verified.contains(&key.blob);
            inner
                .lru
                .get(key)
                .cloned()
                .filter(|e| voucher.is_none_or(|v| trust::standing(verified, &e.vouchers, v) == Standing::Trusted))
        };
        let Some(entry) = looked_up else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let chunk_size = self.bound_chunk_size()?;
        let path = self.layout.data(&key.blob);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(key, entry.generation);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(io_error("open blob data", &path)(e)),
        };
        let want = (entry.size.saturating_sub(offset)).min(buf.len() as u64) as usize;
        let start = key.index * chunk_size + offset;
        let mut done = 0;
        while done < want {
            match file.read_at(&mut buf[done..want], start + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error("read chunk from", &path)(e)),
            }
        }
        let now = SystemTime::now();
        // A touched time in the future (clock stepped back) counts as stale too.
        let fresh = now.duration_since(entry.touched).is_ok_and(|age| age < MTIME_REFRESH_INTERVAL);
        let mut inner = self.lock();
        // Evicted (a hole punched) or removed while we read: what we read is not the chunk.
        let current = inner.lru.peek(key).is_some_and(|e| e.generation == entry.generation);
        let verified = inner.verified.contains(&key.blob);
        let trusted = inner
            .lru
            .peek(key)
            .is_some_and(|e| voucher.is_none_or(|v| trust::standing(verified, &e.vouchers, v) == Standing::Trusted));
        if !current || !trusted || done < want {
            drop(inner);
            if current && done < want {
                // The data file is shorter than its map says (cut behind our back): the
                // blob cannot be trusted, and a chunk left present would never be fetched.
                self.forget(key, entry.generation);
            }
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        if !fresh {
            for (k, e) in inner.lru.iter_mut() {
                if k.blob == key.blob {
                    e.touched = now;
                }
            }
            drop(inner);
            if let Err(e) = file.set_modified(now) {
                tracing::debug!(path = %path.display(), error = %e, "cannot refresh blob mtime");
            }
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some((done, entry.generation)))
    }

    /// Whether the chunk is present. Neither counts as a hit or miss nor marks the chunk
    /// used.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.lock().lru.contains(key)
    }

    /// Stores a chunk that `voucher` stands behind: its bytes go into the blob's data
    /// file at the chunk's place, then its length into the presence map; only then does
    /// it count as present, so a reader never sees a torn chunk. Nothing is flushed here
    /// (see the module documentation on durability). A chunk already present and trusted
    /// by `voucher` is left as it is; one present but not trusted by it gains the voucher
    /// if it holds the same bytes, and makes way for these otherwise (never in a verified
    /// blob). Then evicts least-recently-used chunks until within budget, never evicting
    /// the chunk just written nor any chunk of a blob currently pinned (see
    /// [`Self::pin_blob`]). Failures to evict are logged, not returned: the chunk is
    /// stored. Returns the generation that holds exactly these bytes now, for
    /// [`Self::feed_hash`], or None (another writer, other bytes kept, or gone meanwhile).
    pub fn put(&self, key: &ChunkKey, data: &[u8], voucher: &Voucher) -> Result<Option<u64>, CacheError> {
        if data.is_empty() {
            return Err(CacheError::EmptyChunk { key: *key });
        }
        let chunk_size = self.bound_chunk_size()?;
        if data.len() as u64 > chunk_size || data.len() as u64 > u64::from(u32::MAX) {
            return Err(CacheError::ChunkTooLong { key: *key, len: data.len() as u64, chunk_size });
        }
        let existing = {
            let mut inner = self.lock();
            // Being written by another put: its bytes are about to be in place.
            if !inner.writing.insert(*key) {
                return Ok(None);
            }
            let verified = inner.verified.contains(&key.blob);
            match inner.lru.peek(key) {
                None => None,
                Some(e) if trust::standing(verified, &e.vouchers, voucher) == Standing::Trusted => {
                    inner.writing.remove(key);
                    // These bytes were not compared with the present ones: they must not
                    // be hashed as if they were the chunk.
                    return Ok(None);
                }
                Some(e) => Some((e.generation, e.size)),
            }
        };
        let stored = self.put_claimed(key, data, voucher, chunk_size, existing);
        self.lock().writing.remove(key);
        stored
    }

    /// The part of [`Self::put`] done while this call alone writes `key`. `existing` is
    /// the generation and size of a present chunk `voucher` does not stand behind.
    fn put_claimed(
        &self,
        key: &ChunkKey,
        data: &[u8],
        voucher: &Voucher,
        chunk_size: u64,
        existing: Option<(u64, u64)>,
    ) -> Result<Option<u64>, CacheError> {
        if let Some((generation, size)) = existing {
            let mut present = vec![0u8; size as usize];
            let same = size == data.len() as u64
                && matches!(self.read_chunk(key, 0, &mut present, None)?, Some((n, g)) if n == data.len() && g == generation)
                && present == data;
            let mut inner = self.lock();
            let current = inner.lru.peek(key).is_some_and(|e| e.generation == generation);
            if same || !current || inner.verified.contains(&key.blob) {
                // The same bytes: ours to vouch for too. Gone or changed meanwhile, or
                // verified (so the present bytes are the blob's and ours are not): leave it.
                if same && current {
                    if let Some(e) = inner.lru.peek_mut(key) {
                        e.vouchers.push(*voucher);
                    }
                    return Ok(Some(generation));
                }
                return Ok(None);
            }
            self.drop_chunk(&mut inner, key);
        }
        let path = self.layout.data(&key.blob);
        let written =
            self.write_chunk(&path, data, key.index * chunk_size).map_err(io_error("write chunk to", &path))?;

        let mut inner = self.lock();
        // The file may have been removed (evicted, or failed verification) while we
        // wrote: then our bytes went with it, and the chunk is not present.
        match fs::metadata(&path) {
            Ok(now) if now.ino() == written.ino() && now.dev() == written.dev() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("stat blob data", &path)(e)),
        }
        self.write_map_entry(&key.blob, key.index, data.len() as u32)?;
        let generation = inner.next_generation;
        let entry = Entry { size: data.len() as u64, touched: SystemTime::now(), generation, vouchers: vec![*voucher] };
        inner.next_generation += 1;
        inner.used_bytes += entry.size;
        inner.lru.put(*key, entry);
        self.evict(&mut inner, Some(key));
        Ok(Some(generation))
    }

    /// Writes `data` at `at` in the data file at `path`; returns the file's metadata.
    /// Data whose memory, length and place are page-aligned (fetched chunks are: see
    /// [`crate::registry::BODY_ALIGN`]) is written with `O_DIRECT`: it goes to the disk
    /// without a copy into the page cache, which cost a fifth of the CPU of a cold read,
    /// and without doubling the page cache the reader fills. Readers get fetched chunks
    /// from memory, and whatever reads them from the file later reads it from the disk.
    /// A file system that refuses `O_DIRECT` gets buffered writes from then on.
    fn write_chunk(&self, path: &Path, data: &[u8], at: u64) -> io::Result<fs::Metadata> {
        const ALIGN: usize = crate::registry::BODY_ALIGN;
        let aligned = (data.as_ptr() as usize) % ALIGN == 0 && data.len() % ALIGN == 0 && at % ALIGN as u64 == 0;
        let write = |flags: i32| {
            let file = private_file().create(true).truncate(false).write(true).custom_flags(flags).open(path)?;
            file.write_all_at(data, at)?;
            file.metadata()
        };
        if aligned && self.direct.load(Ordering::Relaxed) {
            match write(libc::O_DIRECT) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "the cache's file system refuses O_DIRECT; writing through the page cache");
                    self.direct.store(false, Ordering::Relaxed);
                }
                done => return done,
            }
        }
        write(0)
    }

    /// Feeds chunks just stored from `first` on (their bytes, with the generations
    /// [`Self::put`] returned) to the blob's whole-blob hash, if they continue it, then
    /// every chunk present after them until one is missing, and keeps the hash for the
    /// next arrival. Chunks arriving out of order are left for [`Self::verify_blob`] to
    /// read back. Call it off the readers' path: it hashes every byte it is given.
    pub fn feed_hash(&self, blob: Digest, first: u64, chunks: &[(Option<u64>, &[u8])]) {
        self.feed(blob, first, chunks, true);
    }

    /// [`Self::feed_hash`] without reading back the chunks present after the run: for a
    /// caller that holds those in memory and feeds them next.
    pub fn feed_hash_run(&self, blob: Digest, first: u64, chunks: &[(Option<u64>, &[u8])]) {
        self.feed(blob, first, chunks, false);
    }

    /// The chunk index the blob's whole-blob hash takes next (0 before it starts), or
    /// None while it is being fed or verified, or once the blob is verified.
    pub fn hash_next(&self, blob: &Digest) -> Option<u64> {
        let inner = self.lock();
        if inner.verified.contains(blob) {
            return None;
        }
        match inner.hashing.get(blob) {
            None => Some(0),
            Some(HashSlot::Idle { next, .. }) => Some(*next),
            Some(_) => None,
        }
    }

    fn feed(&self, blob: Digest, first: u64, chunks: &[(Option<u64>, &[u8])], catch_up: bool) {
        let (run, (mut next, mut hasher)) = {
            let mut inner = self.lock();
            // Only bytes that are the chunks now: a chunk stored by someone else, or gone,
            // ends the run (its bytes are read back later).
            let run = chunks
                .iter()
                .enumerate()
                .take_while(|(i, (generation, _))| {
                    let key = ChunkKey { blob, index: first + *i as u64 };
                    generation.is_some() && inner.lru.peek(&key).map(|e| e.generation) == *generation
                })
                .count();
            if run == 0 {
                return;
            }
            match take_hash_slot(&mut inner, &ChunkKey { blob, index: first }) {
                Some(slot) => (run, slot),
                None => return,
            }
        };
        for (_, data) in &chunks[..run] {
            hasher.update(data);
            next += 1;
        }
        if catch_up {
            next = self.hash_present(blob, next, u64::MAX, &mut hasher);
        }
        self.put_hash_slot(blob, next, hasher);
    }

    /// Feeds the blob's whole-blob hash the chunks present from where it stands up to
    /// (not including) chunk `until`, read back from the cache, stopping at the first
    /// missing one; returns where the hash stands then, or None while it is being fed or
    /// verified elsewhere. For runs that were left out of arrival-order hashing (they
    /// arrived too far ahead), so that the runs after them can still be fed from memory.
    pub fn hash_catch_up(&self, blob: Digest, until: u64) -> Option<u64> {
        let next = self.hash_next(&blob)?;
        if next >= until {
            return Some(next);
        }
        // Taken only if it still stands at `next`.
        let (next, mut hasher) = take_hash_slot(&mut self.lock(), &ChunkKey { blob, index: next })?;
        let next = self.hash_present(blob, next, until, &mut hasher);
        self.put_hash_slot(blob, next, hasher).then_some(next)
    }

    /// Gives back the hash slot of `blob` taken with `take_hash_slot`, standing at `next`;
    /// false (and the hash dropped) when a chunk of the blob was removed meanwhile, for
    /// verification to hash it again from the start.
    fn put_hash_slot(&self, blob: Digest, next: u64, hasher: Hasher) -> bool {
        let mut inner = self.lock();
        if matches!(inner.hashing.get(&blob), Some(HashSlot::Busy { stale: false })) {
            inner.hashing.insert(blob, HashSlot::Idle { next, hasher });
            true
        } else {
            inner.hashing.remove(&blob);
            false
        }
    }

    /// Feeds `hasher` the chunks of `blob` present from `next` on (before `until`), read
    /// back from the cache, until one is missing; returns the index after the last one fed.
    fn hash_present(&self, blob: Digest, mut next: u64, until: u64, hasher: &mut Hasher) -> u64 {
        let mut buf = Vec::new();
        while next < until {
            let key = ChunkKey { blob, index: next };
            let Some(size) = self.lock().lru.peek(&key).map(|e| e.size as usize) else { return next };
            buf.resize(size, 0);
            match self.read_chunk(&key, 0, &mut buf, None) {
                Ok(Some((n, _))) if n == size => hasher.update(&buf),
                _ => return next,
            }
            next += 1;
        }
        next
    }

    /// Hashes the whole blob (`size` bytes), continuing the hash fed in arrival order and
    /// reading back only the chunks it has not seen, and decides by the result (see
    /// [`trust`]): on a match the blob is flushed and marked verified; on a mismatch it is
    /// evicted, the verification failure counted, and every lazy index that vouched for
    /// all of its chunks condemned. Call it once every chunk is present, with the blob
    /// pinned; it runs on the caller's thread and reads from disk.
    pub fn verify_blob(&self, blob: &Digest, size: u64) -> Result<Verdict, CacheError> {
        let chunk_size = self.bound_chunk_size()?;
        let count = size.div_ceil(chunk_size);
        let (mut next, mut hasher) = loop {
            let mut inner = self.lock();
            if inner.verified.contains(blob) {
                return Ok(Verdict::Verified);
            }
            match inner.hashing.remove(blob) {
                Some(HashSlot::Idle { next, hasher }) => {
                    inner.hashing.insert(*blob, HashSlot::Busy { stale: false });
                    break (next, hasher);
                }
                None => {
                    inner.hashing.insert(*blob, HashSlot::Busy { stale: false });
                    break (0, Hasher::default());
                }
                Some(busy) => {
                    // A put is feeding it; it will be done shortly.
                    inner.hashing.insert(*blob, busy);
                    drop(inner);
                    std::thread::sleep(HASH_WAIT);
                }
            }
        };
        let release = |verdict: Verdict| {
            self.lock().hashing.remove(blob);
            Ok(verdict)
        };
        let mut buf = vec![0u8; chunk_size as usize];
        while next < count {
            let len = chunk_size.min(size - next * chunk_size) as usize;
            match self.read_chunk(&ChunkKey { blob: *blob, index: next }, 0, &mut buf[..len], None) {
                Ok(Some((n, _))) if n == len => hasher.update(&buf[..len]),
                Ok(_) => return release(Verdict::Incomplete),
                Err(e) => {
                    self.lock().hashing.remove(blob);
                    return Err(e);
                }
            }
            next += 1;
        }
        let actual = hasher.finish();
        if actual == *blob {
            self.mark_verified(blob, count)
        } else {
            self.reject_blob(blob, count, actual)
        }
    }

    /// Writes the verified marker of a blob whose whole hash matched, after flushing its
    /// data and map, unless a chunk went meanwhile.
    fn mark_verified(&self, blob: &Digest, count: u64) -> Result<Verdict, CacheError> {
        for path in [self.layout.data(blob), self.layout.map(blob)] {
            match sync_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.lock().hashing.remove(blob);
                    return Ok(Verdict::Incomplete);
                }
                Err(e) => {
                    self.lock().hashing.remove(blob);
                    return Err(io_error("flush", &path)(e));
                }
            }
        }
        let marker = self.layout.marker(blob);
        {
            let mut inner = self.lock();
            let slot = inner.hashing.remove(blob);
            let whole = (0..count).all(|index| inner.lru.contains(&ChunkKey { blob: *blob, index }));
            if !matches!(slot, Some(HashSlot::Busy { stale: false })) || !whole {
                return Ok(Verdict::Incomplete);
            }
            private_file()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&marker)
                .and_then(|mut file| std::io::Write::write_all(&mut file, MARKER_CONTENT))
                .map_err(io_error("create verified marker", &marker))?;
            inner.verified.insert(*blob);
        }
        // Flushing after publishing the marker is safe: a crash can only lose it, which
        // costs a re-verification, never a wrong answer.
        let dir = self.layout.blobs();
        sync_dir(&dir).map_err(io_error("flush directory", &dir))?;
        Ok(Verdict::Verified)
    }

    /// Evicts a blob whose whole hash did not match and condemns the indexes that
    /// vouched for every chunk of it.
    fn reject_blob(&self, blob: &Digest, count: u64, actual: Digest) -> Result<Verdict, CacheError> {
        let condemned = {
            let mut inner = self.lock();
            let slot = inner.hashing.remove(blob);
            if !matches!(slot, Some(HashSlot::Busy { stale: false })) {
                return Ok(Verdict::Incomplete);
            }
            let condemned = {
                let keys: Vec<ChunkKey> = (0..count).map(|index| ChunkKey { blob: *blob, index }).collect();
                let per_chunk: Vec<&[Voucher]> =
                    keys.iter().filter_map(|k| inner.lru.peek(k).map(|e| e.vouchers.as_slice())).collect();
                if per_chunk.len() as u64 == count {
                    trust::liars(per_chunk.into_iter())
                } else {
                    Vec::new()
                }
            };
            pop_blob(&mut inner, blob);
            inner.verified.remove(blob);
            inner.condemned.extend(condemned.iter().copied());
            self.unlink_blob_files(blob)?;
            condemned
        };
        self.counters.verify_failures.fetch_add(1, Ordering::Relaxed);
        for index in &condemned {
            self.put_meta(&condemned_key(index), b"")?;
        }
        let dir = self.layout.blobs();
        sync_dir(&dir).map_err(io_error("flush directory", &dir))?;
        Ok(Verdict::Mismatch { actual, condemned })
    }

    /// Adds `voucher` to the chunk's vouchers if it is still generation `generation`
    /// (the bytes the caller checked). Returns whether it did.
    pub fn vouch(&self, key: &ChunkKey, generation: u64, voucher: &Voucher) -> bool {
        let mut inner = self.lock();
        match inner.lru.peek_mut(key) {
            Some(e) if e.generation == generation => {
                if !e.vouchers.contains(voucher) {
                    e.vouchers.push(*voucher);
                }
                true
            }
            _ => false,
        }
    }

    /// Drops a chunk of an unverified blob whose bytes (generation `generation`) a reader
    /// found wrong or cannot check, so that it can be fetched again. Chunks of verified
    /// blobs, and chunks stored again meanwhile, are left alone.
    pub fn discard(&self, key: &ChunkKey, generation: u64) {
        let mut inner = self.lock();
        if inner.verified.contains(&key.blob) || inner.lru.peek(key).is_none_or(|e| e.generation != generation) {
            return;
        }
        self.drop_chunk(&mut inner, key);
    }

    /// Whether a lazy index (by the digest of its JSON) was caught vouching for bytes
    /// that are not their blob. Cheap: asks memory only, see [`Self::load_condemned`].
    pub fn is_condemned(&self, index: &Digest) -> bool {
        self.lock().condemned.contains(index)
    }

    /// Whether an index was condemned, by this process or an earlier one (the record is
    /// kept on disk); remembers the answer for [`Self::is_condemned`].
    pub fn load_condemned(&self, index: &Digest) -> Result<bool, CacheError> {
        if self.is_condemned(index) {
            return Ok(true);
        }
        let recorded = self.get_meta(&condemned_key(index))?.is_some();
        if recorded {
            self.lock().condemned.insert(*index);
        }
        Ok(recorded)
    }

    /// Records chunk `index`'s length (0: absent) in the blob's presence map. Called with
    /// the bookkeeping lock held, so the map agrees with the index.
    fn write_map_entry(&self, blob: &Digest, index: u64, len: u32) -> Result<(), CacheError> {
        let path = self.layout.map(blob);
        let map = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("open presence map", &path))?;
        map.write_all_at(&len.to_le_bytes(), index * 4).map_err(io_error("write presence map", &path))
    }

    /// Removes every chunk of a blob and its verified marker (used when verification
    /// fails). Pins do not protect against this. The blob's unpacked copy, if any, is
    /// left alone. A file still open (a passthrough reader) keeps its bytes until closed.
    pub fn remove_blob(&self, blob: &Digest) -> Result<(), CacheError> {
        let mut inner = self.lock();
        pop_blob(&mut inner, blob);
        inner.verified.remove(blob);
        self.unlink_blob_files(blob)?;
        drop(inner);
        // Removed chunks must not come back after a crash: they may be the bad ones.
        let dir = self.layout.blobs();
        sync_dir(&dir).map_err(io_error("flush directory", &dir))
    }

    /// Unlinks a blob's marker, map and data file, in that order: a crash in between
    /// leaves no marker vouching for missing chunks, nor a map naming chunks that are
    /// gone. Called with the bookkeeping lock held.
    fn unlink_blob_files(&self, blob: &Digest) -> Result<(), CacheError> {
        for (op, path) in [
            ("remove verified marker", self.layout.marker(blob)),
            ("remove presence map", self.layout.map(blob)),
            ("remove blob data", self.layout.data(blob)),
        ] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(op, &path)(e)),
            }
        }
        Ok(())
    }

    /// Whether the blob's verified marker is present.
    pub fn is_verified(&self, blob: &Digest) -> bool {
        self.lock().verified.contains(blob)
    }

    /// Counts a verification failure (for stats).
    pub fn record_verify_failure(&self) {
        self.counters.verify_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Pins a blob against eviction while it is being read. Pins nest: each call needs
    /// one [`Self::unpin_blob`].
    pub fn pin_blob(&self, blob: &Digest) {
        *self.lock().pins.entry(*blob).or_insert(0) += 1;
    }

    /// Releases one pin. When the last pin of a blob goes, chunks it kept over budget
    /// are evicted.
    pub fn unpin_blob(&self, blob: &Digest) {
        let mut inner = self.lock();
        let Some(count) = inner.pins.get_mut(blob) else {
            tracing::warn!(%blob, "unpinning a blob that is not pinned");
            return;
        };
        *count -= 1;
        if *count == 0 {
            inner.pins.remove(blob);
            self.evict(&mut inner, None);
        }
    }

    /// Stores a small named metadata record (a resolved manifest keyed by reference),
    /// durably. `name` is arbitrary text; the file is named by its sha256.
    pub fn put_meta(&self, name: &str, data: &[u8]) -> Result<(), CacheError> {
        let tmp = self.temp_path();
        let path = self.layout.meta(name);
        write_synced(&tmp, data).map_err(io_error("write temporary metadata", &tmp))?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("rename metadata into place", &path)(e));
        }
        let dir = self.layout.meta_dir();
        sync_dir(&dir).map_err(io_error("flush directory", &dir))
    }

    /// The named metadata record, if stored.
    pub fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.layout.meta(name);
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read metadata", &path)(e)),
        }
    }

    /// The data file of a verified blob: the whole blob, every byte checked, which the
    /// FUSE layer can hand to the kernel for passthrough reads.
    pub fn complete_path(&self, blob: &Digest) -> Option<PathBuf> {
        self.is_verified(blob).then(|| self.layout.data(blob))
    }

    /// Where an unpacked (decompressed) copy of a compressed layer lives. Write it at a
    /// [`Self::temp_path`] and rename it here, then take a [`Self::lease_unpacked`] for
    /// as long as a model reads it.
    pub fn unpacked_path(&self, blob: &Digest) -> PathBuf {
        self.layout.unpacked(blob)
    }

    /// Makes unpacked copies go as soon as no open model uses them (for the daemon, where
    /// models come and go); by default they stay for the next process, counted in the
    /// budget and evicted first when it is exceeded.
    pub fn drop_unused_unpacked(&self) {
        self.lock().drop_unused_unpacked = true;
    }

    /// Counts the unpacked copy of `blob` (now at [`Self::unpacked_path`]) in the budget
    /// and holds it for a model until the lease drops: a copy in use is never evicted.
    /// Evicts other data if the copy takes the cache over budget.
    pub fn lease_unpacked(self: &Arc<Self>, blob: &Digest) -> Result<UnpackedLease, CacheError> {
        let path = self.layout.unpacked(blob);
        let size = fs::metadata(&path).map_err(io_error("stat unpacked copy", &path))?.len();
        let mut inner = self.lock();
        let entry =
            inner.unpacked.entry(*blob).or_insert(UnpackedEntry { size: 0, users: 0, touched: SystemTime::now() });
        let old = entry.size;
        entry.size = size;
        entry.users += 1;
        entry.touched = SystemTime::now();
        inner.used_bytes = inner.used_bytes - old + size;
        self.evict(&mut inner, None);
        Ok(UnpackedLease { cache: self.clone(), blob: *blob })
    }

    /// Removes an unpacked copy no model uses (one that failed its check, say). Returns
    /// false, removing nothing, while a model holds it.
    pub fn discard_unpacked(&self, blob: &Digest) -> Result<bool, CacheError> {
        let mut inner = self.lock();
        if inner.unpacked.get(blob).is_some_and(|e| e.users > 0) {
            return Ok(false);
        }
        inner.unpacked.remove(blob).inspect(|e| inner.used_bytes -= e.size);
        let path = self.layout.unpacked(blob);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(io_error("remove unpacked copy", &path)(e)),
        }
    }

    /// Drops one lease (see [`UnpackedLease`]).
    fn release_unpacked(&self, blob: &Digest) {
        let mut inner = self.lock();
        let Some(entry) = inner.unpacked.get_mut(blob) else { return };
        entry.users = entry.users.saturating_sub(1);
        entry.touched = SystemTime::now();
        if entry.users == 0 && inner.drop_unused_unpacked {
            self.remove_unpacked(&mut inner, blob);
        } else {
            self.evict(&mut inner, None);
        }
    }

    /// Removes an unused unpacked copy and its bytes from the total. Called with the
    /// bookkeeping lock held.
    fn remove_unpacked(&self, inner: &mut Inner, blob: &Digest) {
        let Some(entry) = inner.unpacked.remove(blob) else { return };
        inner.used_bytes -= entry.size;
        let path = self.layout.unpacked(blob);
        match fs::remove_file(&path) {
            Ok(()) => tracing::debug!(%blob, "removed an unused unpacked copy"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove an unpacked copy"),
        }
    }

    /// A fresh path in the cache's temporary directory, unique per call, on the same file
    /// system as everything else in the cache (so renames out of it are atomic). Files
    /// left there are deleted by the next `open`.
    pub fn temp_path(&self) -> PathBuf {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        self.layout.tmp_dir().join(n.to_string())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let (used_bytes, chunks) = {
            let inner = self.lock();
            (inner.used_bytes, inner.lru.len() as u64)
        };
        CacheStats {
            used_bytes,
            chunks,
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            verify_failures: self.counters.verify_failures.load(Ordering::Relaxed),
        }
    }

    /// The bookkeeping lock. A panic while holding it cannot leave the index describing
    /// chunks in a way later calls would trust blindly (reads check generations and the
    /// disk), so a poisoned lock is used as is rather than failing every caller.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops a chunk's whole blob from the index and the disk after its data file turned
    /// out missing or short, unless the chunk was stored again meanwhile (another
    /// generation).
    fn forget(&self, key: &ChunkKey, generation: u64) {
        let mut inner = self.lock();
        if inner.lru.peek(key).is_none_or(|e| e.generation != generation) {
            return;
        }
        tracing::warn!(blob = %key.blob, "blob data file is missing or cut short; dropping the blob");
        pop_blob(&mut inner, &key.blob);
        // The blob is no longer whole, so neither marker nor map holds.
        inner.verified.remove(&key.blob);
        if let Err(e) = self.unlink_blob_files(&key.blob) {
            tracing::warn!(error = %e, "cannot remove the rest of a vanished blob");
        }
    }

    /// Evicts chunks, least recently used first, until the budget holds. `keep` and
    /// chunks of pinned blobs are skipped; a chunk of a verified blob takes the whole
    /// blob with it.
    fn evict(&self, inner: &mut Inner, keep: Option<&ChunkKey>) {
        let Some(budget) = self.budget else { return };
        if inner.used_bytes <= budget {
            return;
        }
        // Copies no open model uses go first, oldest first: they are whole layers, and
        // whoever needs one again unpacks it again.
        let mut idle: Vec<(SystemTime, Digest)> =
            inner.unpacked.iter().filter(|(_, e)| e.users == 0).map(|(d, e)| (e.touched, *d)).collect();
        idle.sort();
        for (_, blob) in idle {
            if inner.used_bytes <= budget {
                return;
            }
            self.remove_unpacked(inner, &blob);
        }
        if inner.used_bytes <= budget {
            return;
        }
        let mut excess = inner.used_bytes - budget;
        let mut victims = Vec::new();
        for (key, entry) in inner.lru.iter().rev() {
            if excess == 0 {
                break;
            }
            if Some(key) == keep || inner.pins.contains_key(&key.blob) {
                continue;
            }
            victims.push(*key);
            excess = excess.saturating_sub(entry.size);
        }

        for key in victims {
            if !inner.lru.contains(&key) {
                continue; // went with its whole blob
            }
            if inner.verified.contains(&key.blob) {
                self.evict_blob(inner, &key.blob);
            } else {
                self.evict_chunk(inner, &key);
            }
        }
        if inner.used_bytes > budget {
            tracing::debug!(used_bytes = inner.used_bytes, budget, "cache over budget: remaining chunks are pinned");
        }
    }

    /// Evicts a verified blob whole: the marker goes first and durably (were a chunk to
    /// go first, a crash in between would leave a marker vouching for a blob with a
    /// missing chunk), then the files are unlinked.
    fn evict_blob(&self, inner: &mut Inner, blob: &Digest) {
        let marker = self.layout.marker(blob);
        match fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %marker.display(), error = %e, "cannot remove verified marker");
                return;
            }
        }
        inner.verified.remove(blob);
        let dir = self.layout.blobs();
        if let Err(e) = sync_dir(&dir) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot flush removal of verified marker");
            return;
        }
        if let Err(e) = self.unlink_blob_files(blob) {
            tracing::warn!(error = %e, "cannot evict blob");
            return;
        }
        let evicted = pop_blob(inner, blob);
        self.counters.evictions.fetch_add(evicted, Ordering::Relaxed);
    }

    /// Evicts one chunk of an unverified blob (see [`Self::drop_chunk`]) and counts it.
    fn evict_chunk(&self, inner: &mut Inner, key: &ChunkKey) {
        if self.drop_chunk(inner, key) {
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes one chunk of an unverified blob: absent in the map first, then a hole
    /// punched where its bytes were. A blob left with no chunk loses its files. Returns
    /// whether the chunk was dropped.
    fn drop_chunk(&self, inner: &mut Inner, key: &ChunkKey) -> bool {
        let Some(size) = inner.lru.peek(key).map(|e| e.size) else { return false };
        if let Err(e) = self.write_map_entry(&key.blob, key.index, 0) {
            tracing::warn!(error = %e, "cannot drop chunk");
            return false;
        }
        inner.lru.pop(key);
        inner.used_bytes -= size;
        forget_hash(inner, &key.blob, Some(key.index));
        if !inner.lru.iter().any(|(k, _)| k.blob == key.blob) {
            if let Err(e) = self.unlink_blob_files(&key.blob) {
                tracing::warn!(error = %e, "cannot remove an emptied blob");
            }
            return true;
        }
        let chunk_size = self.chunk_size.load(Ordering::Relaxed);
        let path = self.layout.data(&key.blob);
        let punched =
            OpenOptions::new().write(true).open(&path).and_then(|file| punch_hole(&file, key.index * chunk_size, size));
        if let Err(e) = punched {
            // The chunk is absent either way; only its disk space is not given back yet.
            tracing::warn!(path = %path.display(), error = %e, "cannot free a dropped chunk's space");
        }
        true
    }
}

/// A model's hold on an unpacked copy (see [`ChunkCache::lease_unpacked`]), released on
/// drop.
#[derive(Debug)]
pub struct UnpackedLease {
    cache: Arc<ChunkCache>,
    blob: Digest,
}

impl Drop for UnpackedLease {
    fn drop(&mut self) {
        self.cache.release_unpacked(&self.blob);
    }
}

/// Drops every chunk of `blob` from the index and its size from the total; returns how
/// many there were.
fn pop_blob(inner: &mut Inner, blob: &Digest) -> u64 {
    forget_hash(inner, blob, None);
    let keys: Vec<ChunkKey> = inner.lru.iter().map(|(k, _)| *k).filter(|k| k.blob == *blob).collect();
    for key in &keys {
        if let Some(entry) = inner.lru.pop(key) {
            inner.used_bytes -= entry.size;
        }
    }
    keys.len() as u64
}

/// Tells the blob's whole-blob hash that chunk `index` (every chunk, with `None`) was
/// removed: a hash that covered it no longer describes the blob.
fn forget_hash(inner: &mut Inner, blob: &Digest, index: Option<u64>) {
    if let Some(slot) = inner.hashing.get_mut(blob) {
        if !slot.keep_after_removal(index) {
            inner.hashing.remove(blob);
        }
    }
}

/// Takes the blob's whole-blob hash for a thread to feed chunk `key` to, if that chunk
/// is the next the hash needs (a new hash starts at chunk 0); marks it busy meanwhile.
fn take_hash_slot(inner: &mut Inner, key: &ChunkKey) -> Option<(u64, Hasher)> {
    let taken = match inner.hashing.remove(&key.blob) {
        Some(HashSlot::Idle { next, hasher }) if next == key.index => (next, hasher),
        None if key.index == 0 => (0, Hasher::default()),
        Some(other) => {
            inner.hashing.insert(key.blob, other);
            return None;
        }
        None => return None,
    };
    inner.hashing.insert(key.blob, HashSlot::Busy { stale: false });
    Some(taken)
}

/// The metadata record of the chunk size a cache directory is bound to.
const CHUNK_SIZE_META: &str = "chunk-size";

/// The metadata record that remembers a condemned lazy index.
fn condemned_key(index: &Digest) -> String {
    format!("condemned-index:{index}")
}

/// Deallocates `len` bytes at `offset` of `file`, which then read as zeros.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: `fallocate` only reads its arguments; the descriptor is valid for the
    // duration of the call because `file` is borrowed.
    let rc = unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
