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
//! <dir>/blobs/sha256/<hex>.verified      marker: every chunk present, and the whole blob matched
//! <dir>/meta/<sha256 hex of the name>    a named metadata record
//! <dir>/unpacked/sha256/<hex>.tar        decompressed copy of a compressed layer
//! <dir>/tmp/                             files being written, or removed, before their rename/unlink
//! ```
//!
//! A blob is one sparse file, so a blob whose chunks are all present *is* the blob: once
//! verified, the FUSE layer hands that very file to the kernel for passthrough reads, with
//! no second copy. A cache is bound to one chunk size ([`ChunkCache::bind_chunk_size`]),
//! which places chunks in the file.
//!
//! # Durability
//!
//! A chunk's bytes are written into the data file first and its length into the presence
//! map second, so a reader on this boot sees a chunk whole or not at all, even if the
//! process dies mid-write. Chunk data is not flushed with `fsync` when it is stored:
//! flushing every chunk made cold reads wait for the disk. Only a power loss or kernel
//! crash can then tear a chunk, so the cache records the boot it was opened in
//! (`boot-id`), and an `open` in a later boot deletes every blob without a verified
//! marker. [`ChunkCache::mark_verified`] flushes the blob's data file and map before it
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
//! [`MTIME_REFRESH_INTERVAL`]. Metadata records and unpacked layers are outside the
//! budget; their owners manage them.
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

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use lru::LruCache;

use self::fsutil::{boot_id, ensure_dir, sync_dir, sync_file, try_lock_exclusive, write_synced};
use self::layout::Layout;
use crate::modelpack::Digest;

/// How stale a blob's recorded use may get before a read refreshes its data file's mtime.
/// Refreshing on every read would add a metadata write to each hit; this bound keeps
/// the LRU order rebuilt after a restart accurate to within a minute.
pub const MTIME_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

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
        "cache directory {path} holds {cached}-byte chunks, not {requested}-byte ones; use another cache directory"
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
#[derive(Clone, Copy, Debug)]
struct Entry {
    size: u64,
    /// The data file's mtime as last set or read by the cache.
    touched: SystemTime,
    /// Unique per stored chunk: a read that looked up one generation and finds another
    /// (or none) afterwards read bytes that may have been evicted under it.
    generation: u64,
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
        fs::create_dir_all(dir).map_err(io_error("create cache directory", dir))?;
        let layout = Layout::new(dir);

        let lock_path = layout.lock_file();
        let lock = OpenOptions::new()
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
        };
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
            _lock: lock,
        };
        {
            let mut inner = cache.lock();
            cache.evict(&mut inner, None);
        }
        Ok(cache)
    }

    /// Binds the cache to one chunk size: the first call records it, later calls (in this
    /// or a later process) with another size fail, since a chunk index only names a byte
    /// range together with the size. Chunks can be stored and read once it is bound.
    pub fn bind_chunk_size(&self, chunk_size: u64) -> Result<(), CacheError> {
        const NAME: &str = "chunk-size";
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

    fn bound_chunk_size(&self) -> Result<u64, CacheError> {
        match self.chunk_size.load(Ordering::Relaxed) {
            0 => Err(CacheError::Unbound { path: self.dir().to_owned() }),
            size => Ok(size),
        }
    }

    /// The chunk's bytes if present (counts a hit or a miss, marks it recently used).
    pub fn get(&self, key: &ChunkKey) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(size) = self.lock().lru.peek(key).map(|e| e.size) else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let mut data = vec![0u8; size as usize];
        Ok(match self.read_into(key, 0, &mut data)? {
            Some(n) if n == data.len() => Some(data),
            _ => None,
        })
    }

    /// Reads part of a present chunk into `buf` at `offset` within the chunk; returns
    /// bytes read, or None if absent. Fewer bytes than `buf.len()` means the chunk ends
    /// first (zero when `offset` is at or past its end). Counts a hit or a miss and
    /// marks the chunk recently used.
    pub fn read_into(&self, key: &ChunkKey, offset: u64, buf: &mut [u8]) -> Result<Option<usize>, CacheError> {
        let looked_up = self.lock().lru.get(key).copied();
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
        if !current || done < want {
            drop(inner);
            if current {
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
        Ok(Some(done))
    }

    /// Whether the chunk is present. Neither counts as a hit or miss nor marks the chunk
    /// used.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.lock().lru.contains(key)
    }

    /// Stores a chunk: its bytes go into the blob's data file at the chunk's place, then
    /// its length into the presence map; only then does it count as present, so a reader
    /// never sees a torn chunk. Nothing is flushed here (see the module documentation on
    /// durability). A chunk already present is left as it is. Then evicts
    /// least-recently-used chunks until within budget, never evicting the chunk just
    /// written nor any chunk of a blob currently pinned (see [`Self::pin_blob`]).
    /// Failures to evict are logged, not returned: the chunk is stored.
    pub fn put(&self, key: &ChunkKey, data: &[u8]) -> Result<(), CacheError> {
        if data.is_empty() {
            return Err(CacheError::EmptyChunk { key: *key });
        }
        let chunk_size = self.bound_chunk_size()?;
        if data.len() as u64 > chunk_size || data.len() as u64 > u64::from(u32::MAX) {
            return Err(CacheError::ChunkTooLong { key: *key, len: data.len() as u64, chunk_size });
        }
        {
            let mut inner = self.lock();
            // Present, or being written by another put: its bytes are (about to be) in place.
            if inner.lru.contains(key) || !inner.writing.insert(*key) {
                return Ok(());
            }
        }
        let path = self.layout.data(&key.blob);
        let written = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|file| {
                file.write_all_at(data, key.index * chunk_size)?;
                file.metadata()
            })
            .map_err(io_error("write chunk to", &path));

        let mut inner = self.lock();
        inner.writing.remove(key);
        let written = written?;
        // The file may have been removed (evicted, or failed verification) while we
        // wrote: then our bytes went with it, and the chunk is not present.
        match fs::metadata(&path) {
            Ok(now) if now.ino() == written.ino() && now.dev() == written.dev() => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("stat blob data", &path)(e)),
        }
        self.write_map_entry(&key.blob, key.index, data.len() as u32)?;
        let entry = Entry { size: data.len() as u64, touched: SystemTime::now(), generation: inner.next_generation };
        inner.next_generation += 1;
        inner.used_bytes += entry.size;
        inner.lru.put(*key, entry);
        self.evict(&mut inner, Some(key));
        Ok(())
    }

    /// Records chunk `index`'s length (0: absent) in the blob's presence map. Called with
    /// the bookkeeping lock held, so the map agrees with the index.
    fn write_map_entry(&self, blob: &Digest, index: u64, len: u32) -> Result<(), CacheError> {
        let path = self.layout.map(blob);
        let map = OpenOptions::new()
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

    /// Records that every chunk of the blob is present and the whole blob was hashed and
    /// matched its digest (a marker file), after flushing the blob's data and map to
    /// disk. Evicting any chunk of the blob removes the marker first. Call it while the
    /// blob is pinned: a chunk evicted between the hashing and this call would go
    /// unnoticed.
    pub fn mark_verified(&self, blob: &Digest) -> Result<(), CacheError> {
        for path in [self.layout.data(blob), self.layout.map(blob)] {
            match sync_file(&path) {
                Ok(()) => {}
                // Removed meanwhile: nothing to vouch for.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_error("flush", &path)(e)),
            }
        }
        let marker = self.layout.marker(blob);
        {
            let mut inner = self.lock();
            if !inner.lru.iter().any(|(k, _)| k.blob == *blob) {
                return Ok(());
            }
            File::create(&marker).map_err(io_error("create verified marker", &marker))?;
            inner.verified.insert(*blob);
        }
        // Flushing after publishing the marker is safe: a crash can only lose it, which
        // costs a re-verification, never a wrong answer.
        let dir = self.layout.blobs();
        sync_dir(&dir).map_err(io_error("flush directory", &dir))
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
    /// [`Self::temp_path`] and rename it here. These files are outside the chunk budget.
    pub fn unpacked_path(&self, blob: &Digest) -> PathBuf {
        self.layout.unpacked(blob)
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

    /// Evicts one chunk of an unverified blob: absent in the map first, then a hole
    /// punched where its bytes were. A blob left with no chunk loses its files.
    fn evict_chunk(&self, inner: &mut Inner, key: &ChunkKey) {
        let Some(entry) = inner.lru.peek(key).copied() else { return };
        if let Err(e) = self.write_map_entry(&key.blob, key.index, 0) {
            tracing::warn!(error = %e, "cannot evict chunk");
            return;
        }
        inner.lru.pop(key);
        inner.used_bytes -= entry.size;
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        if !inner.lru.iter().any(|(k, _)| k.blob == key.blob) {
            if let Err(e) = self.unlink_blob_files(&key.blob) {
                tracing::warn!(error = %e, "cannot remove an emptied blob");
            }
            return;
        }
        let chunk_size = self.chunk_size.load(Ordering::Relaxed);
        let path = self.layout.data(&key.blob);
        let punched = OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|file| punch_hole(&file, key.index * chunk_size, entry.size));
        if let Err(e) = punched {
            // The chunk is absent either way; only its disk space is not given back yet.
            tracing::warn!(path = %path.display(), error = %e, "cannot free an evicted chunk's space");
        }
    }
}

/// Drops every chunk of `blob` from the index and its size from the total; returns how
/// many there were.
fn pop_blob(inner: &mut Inner, blob: &Digest) -> u64 {
    let keys: Vec<ChunkKey> = inner.lru.iter().map(|(k, _)| *k).filter(|k| k.blob == *blob).collect();
    for key in &keys {
        if let Some(entry) = inner.lru.pop(key) {
            inner.used_bytes -= entry.size;
        }
    }
    keys.len() as u64
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
