//! The local chunk cache: blob bytes fetched from the registry, kept on disk in chunks so
//! that a byte is fetched at most once while it stays cached, plus small metadata records
//! (resolved manifests) and the unpacked copies of compressed layers.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/lock                             advisory lock: one process per cache root
//! <dir>/chunks/sha256/<hex>/<index>      chunk <index> (decimal) of blob sha256:<hex>
//! <dir>/chunks/sha256/<hex>/verified     marker: the whole blob was hashed and matched
//! <dir>/meta/<sha256 hex of the name>    a named metadata record
//! <dir>/unpacked/sha256/<hex>.tar        decompressed copy of a compressed layer
//! <dir>/complete/sha256/<hex>            a whole blob in one file, verified (for passthrough)
//! <dir>/tmp/                             files being written, before their rename
//! ```
//!
//! # Durability
//!
//! Chunks are written to a file in `tmp/` and renamed into place, so a reader on this
//! boot sees a chunk whole or not at all, even if the process dies mid-write. Chunk data
//! is not flushed with `fsync` when it is stored: flushing every chunk made cold reads
//! wait for the disk. Only a power loss or kernel crash can then tear a chunk, so the
//! cache records the boot it was opened in (`boot-id`), and an `open` in a later boot
//! deletes the chunks of every blob without a verified marker. [`ChunkCache::mark_verified`]
//! flushes the blob's chunk files and directories before it writes the marker, so a
//! marker always vouches for durable chunks; a chunk replaced in a verified blob is
//! flushed before its rename. Metadata records, unpacked layers and complete blobs are
//! flushed before their rename, and metadata directories on every write. `open` deletes
//! whatever is left in `tmp/` and rebuilds the index by scanning the chunk directories;
//! an empty chunk file is never valid and is treated as absent.
//!
//! # Eviction
//!
//! Chunk data is kept within an optional byte budget. After each `put`, least recently
//! used chunks are deleted until the total fits, skipping the chunk just written and
//! every chunk of a pinned blob (a blob being read); if only those remain, the cache
//! stays over budget until they are unpinned. Recency survives a restart through file
//! modification times: reads refresh a chunk's mtime at most once per
//! [`MTIME_REFRESH_INTERVAL`]. Evicting any chunk of a blob first deletes the blob's
//! verified marker (durably), so the marker always means "every chunk was checked".
//! Metadata records and unpacked layers are outside the budget; their owners manage
//! them.
//!
//! # Concurrency
//!
//! [`ChunkCache`] is `Send + Sync` and meant to be shared through an `Arc` by blocking
//! threads. One mutex guards the bookkeeping (index, sizes, pins, markers) and the
//! renames and unlinks that must agree with it; reading and writing chunk data and
//! `fsync` happen outside it, so readers of large chunks do not queue behind each other.

mod fsutil;
mod layout;
mod scan;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use lru::LruCache;

use self::fsutil::{boot_id, ensure_dir, sync_dir, sync_file, try_lock_exclusive, write_new, write_synced};
use self::layout::Layout;
use crate::modelpack::Digest;

/// How stale a chunk's recorded use may get before a read refreshes its file mtime.
/// Refreshing on every read would add a metadata write to each hit; this bound keeps
/// the LRU order rebuilt after a restart accurate to within a minute.
pub const MTIME_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file-system operation on a cache path failed.
    #[error("cannot {op} {path}: {cause}")]
    Io {
        /// What was being done, e.g. "rename chunk into place".
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
    /// Chunks hold at least one byte; an empty one would be indistinguishable from a
    /// chunk truncated behind the cache's back.
    #[error("refusing to store empty chunk {} of blob {}", key.index, key.blob)]
    EmptyChunk { key: ChunkKey },
}

/// Builds the error for a failed operation `op` on `path`, for use with `map_err`.
fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |cause| CacheError::Io { op, path: path.to_owned(), cause }
}

/// One chunk of one blob: bytes `[index * chunk_size, (index + 1) * chunk_size)`. The
/// chunk size itself is the caller's business; the cache stores whatever it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub blob: Digest,
    pub index: u64,
}

/// What [`ChunkCache::assemble_complete`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assembled {
    /// The whole blob is kept in one file.
    Kept,
    /// A chunk was missing (evicted meanwhile); nothing is kept.
    Missing,
    /// The chunks hash to this other digest; nothing is kept.
    Mismatch(Digest),
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
    /// The chunk file's mtime as last set or read by the cache.
    touched: SystemTime,
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
    /// Holds the advisory lock on the root for as long as the cache is open.
    _lock: File,
}

impl ChunkCache {
    /// Opens (creating) a cache rooted at `dir`. `budget` is the most bytes of chunk data
    /// kept; `None` means unlimited. Scans existing chunks to rebuild the size accounting
    /// and the LRU order (by file mtime), deletes leftover temporary files. If the
    /// existing chunks exceed the budget, the oldest are evicted straight away.
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
        let boot = boot_id();
        let boot_file = layout.boot_file();
        let last_boot = match fs::read_to_string(&boot_file) {
            Ok(id) => Some(id.trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error("read", &boot_file)(e)),
        };
        // No record: a new cache (or one whose chunks were all flushed when written).
        let rebooted = last_boot.is_some() && (boot.is_none() || last_boot != boot);
        let recovered = scan::scan(&layout, rebooted)?;
        if boot.is_none() || last_boot != boot {
            let tmp = layout.tmp_dir().join("boot-id");
            let id = boot.unwrap_or_default();
            write_synced(&tmp, id.as_bytes()).map_err(io_error("write temporary boot record", &tmp))?;
            fs::rename(&tmp, &boot_file).map_err(io_error("rename boot record into place", &boot_file))?;
            sync_dir(dir).map_err(io_error("flush directory", dir))?;
        }

        let mut inner =
            Inner { lru: LruCache::unbounded(), used_bytes: 0, pins: HashMap::new(), verified: recovered.verified };
        for (key, entry) in recovered.chunks {
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
    /// range together with the size.
    pub fn bind_chunk_size(&self, chunk_size: u64) -> Result<(), CacheError> {
        const NAME: &str = "chunk-size";
        match self.get_meta(NAME)? {
            Some(raw) => {
                let cached = std::str::from_utf8(&raw).ok().and_then(|s| s.trim().parse::<u64>().ok());
                match cached {
                    Some(cached) if cached == chunk_size => Ok(()),
                    Some(cached) => Err(CacheError::ChunkSizeMismatch {
                        path: self.dir().to_owned(),
                        cached,
                        requested: chunk_size,
                    }),
                    // An unreadable record cannot vouch for the chunks; start over.
                    None => Err(CacheError::ChunkSizeMismatch {
                        path: self.dir().to_owned(),
                        cached: 0,
                        requested: chunk_size,
                    }),
                }
            }
            None => self.put_meta(NAME, chunk_size.to_string().as_bytes()),
        }
    }

    /// The cache root.
    pub fn dir(&self) -> &Path {
        self.layout.root()
    }

    /// The chunk's bytes if present (counts a hit or a miss, marks it recently used).
    pub fn get(&self, key: &ChunkKey) -> Result<Option<Vec<u8>>, CacheError> {
        let Some((mut file, path)) = self.open_present(key)? else {
            return Ok(None);
        };
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_error("read chunk", &path))?;
        if data.is_empty() {
            self.forget(key, &path);
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(data))
    }

    /// Reads part of a present chunk into `buf` at `offset` within the chunk; returns
    /// bytes read, or None if absent. Fewer bytes than `buf.len()` means the chunk ends
    /// first (zero when `offset` is at or past its end). Counts like [`Self::get`].
    pub fn read_into(&self, key: &ChunkKey, offset: u64, buf: &mut [u8]) -> Result<Option<usize>, CacheError> {
        let Some((file, path)) = self.open_present(key)? else {
            return Ok(None);
        };
        let mut done = 0;
        while done < buf.len() {
            // No file extends past `i64::MAX`, and `pread` rejects such offsets outright.
            let Some(at) = offset.checked_add(done as u64).filter(|&at| at <= i64::MAX as u64) else {
                break;
            };
            match file.read_at(&mut buf[done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error("read chunk", &path)(e)),
            }
        }
        // A short read is normal at the end of a chunk; only then is it worth checking
        // for the one invalid file, an empty one.
        if done < buf.len() && file.metadata().map_err(io_error("stat chunk", &path))?.len() == 0 {
            self.forget(key, &path);
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(done))
    }

    /// Whether the chunk is present. Neither counts as a hit or miss nor marks the chunk
    /// used.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.lock().lru.contains(key)
    }

    /// Stores a chunk: write to a temp file in the cache dir and rename it into place. Only
    /// then does it count as present, so a reader never sees a torn chunk; neither the
    /// data nor the directory is flushed here (see the module documentation on
    /// durability). Then evicts least-recently-used chunks until within budget, never evicting the chunk just written nor any chunk of a blob
    /// currently pinned (see [`Self::pin_blob`]). Storing a chunk that is already present
    /// replaces it. Failures to evict are logged, not returned: the chunk is stored.
    pub fn put(&self, key: &ChunkKey, data: &[u8]) -> Result<(), CacheError> {
        if data.is_empty() {
            return Err(CacheError::EmptyChunk { key: *key });
        }
        let tmp = self.temp_path();
        // A verified marker vouches for durable chunks (see the module documentation).
        let write = if self.is_verified(&key.blob) { write_synced } else { write_new };
        write(&tmp, data).map_err(io_error("write temporary chunk", &tmp))?;

        let blob_dir = self.layout.blob_dir(&key.blob);
        let path = self.layout.chunk(key);
        // Under the lock so that neither `remove_blob` nor an eviction emptying the blob
        // can remove the directory between its creation and the rename.
        {
            let mut inner = self.lock();
            let placed = ensure_dir(&blob_dir)
                .map_err(io_error("create blob chunk directory", &blob_dir))
                .and_then(|_| fs::rename(&tmp, &path).map_err(io_error("rename chunk into place", &path)));
            if let Err(e) = placed {
                drop(inner);
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            // A replaced chunk leaves the index until its successor is in place, so that
            // no eviction deletes the new file on the old entry's behalf meanwhile.
            if let Some(old) = inner.lru.pop(key) {
                inner.used_bytes -= old.size;
            }
        }

        let mut inner = self.lock();
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(blob = %key.blob, index = key.index, "chunk removed while being stored");
                return Ok(());
            }
            Err(e) => return Err(io_error("stat chunk", &path)(e)),
        }
        let entry = Entry { size: data.len() as u64, touched: SystemTime::now() };
        inner.used_bytes += entry.size;
        if let Some(old) = inner.lru.put(*key, entry) {
            // Two puts of the same chunk raced; both wrote whole files, one remains.
            inner.used_bytes -= old.size;
        }
        self.evict(&mut inner, Some(key));
        Ok(())
    }

    /// Removes every chunk of a blob and its verified marker (used when verification
    /// fails). Pins do not protect against this. The blob's unpacked copy, if any, is
    /// left alone.
    pub fn remove_blob(&self, blob: &Digest) -> Result<(), CacheError> {
        let blob_dir = self.layout.blob_dir(blob);
        let graveyard = self.temp_path();
        let moved = {
            let mut inner = self.lock();
            let keys: Vec<ChunkKey> = inner.lru.iter().map(|(k, _)| *k).filter(|k| k.blob == *blob).collect();
            for key in keys {
                if let Some(entry) = inner.lru.pop(&key) {
                    inner.used_bytes -= entry.size;
                }
            }
            inner.verified.remove(blob);
            // One rename takes every file of the blob out of sight at once; the slow
            // deletion of its contents then happens without the lock.
            match fs::rename(&blob_dir, &graveyard) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(io_error("move blob chunk directory to", &graveyard)(e)),
            }
        };
        match fs::remove_file(self.layout.complete(blob)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove complete blob", &self.layout.complete(blob))(e)),
        }
        if !moved {
            return Ok(());
        }
        // Removed chunks must not come back after a crash: they may be the bad ones.
        let chunks = self.layout.chunks();
        sync_dir(&chunks).map_err(io_error("flush directory", &chunks))?;
        if let Err(e) = fs::remove_dir_all(&graveyard) {
            // Out of sight already; `open` empties the temporary directory.
            tracing::warn!(path = %graveyard.display(), error = %e, "cannot delete removed blob chunks");
        }
        Ok(())
    }

    /// Records that the whole blob was hashed and matched its digest (a marker file).
    /// Evicting any chunk of the blob removes the marker. Call it while the blob is
    /// pinned: a chunk evicted between the hashing and this call would go unnoticed.
    pub fn mark_verified(&self, blob: &Digest) -> Result<(), CacheError> {
        let blob_dir = self.layout.blob_dir(blob);
        let marker = self.layout.marker(blob);
        // The chunks' bytes and renames must be durable before a marker vouches for them.
        let keys: Vec<ChunkKey> = self.lock().lru.iter().map(|(k, _)| *k).filter(|k| k.blob == *blob).collect();
        for key in keys {
            let path = self.layout.chunk(&key);
            match sync_file(&path) {
                Ok(()) => {}
                // Evicted meanwhile: the marker is then dropped again with it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("flush chunk", &path)(e)),
            }
        }
        match sync_dir(&blob_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("flush directory", &blob_dir)(e)),
        }
        let chunks = self.layout.chunks();
        sync_dir(&chunks).map_err(io_error("flush directory", &chunks))?;
        let created_dir = {
            let mut inner = self.lock();
            let created = ensure_dir(&blob_dir).map_err(io_error("create blob chunk directory", &blob_dir))?;
            File::create(&marker).map_err(io_error("create verified marker", &marker))?;
            inner.verified.insert(*blob);
            created
        };
        // Flushing after publishing the marker is safe: a crash can only lose it, which
        // costs a re-verification, never a wrong answer.
        match sync_dir(&blob_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("flush directory", &blob_dir)(e)),
        }
        if created_dir {
            let chunks = self.layout.chunks();
            sync_dir(&chunks).map_err(io_error("flush directory", &chunks))?;
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
    /// durably like a chunk. `name` is arbitrary text; the file is named by its sha256.
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

    /// The verified whole-blob file of `blob`, if one was assembled.
    pub fn complete_path(&self, blob: &Digest) -> Option<PathBuf> {
        let path = self.layout.complete(blob);
        path.is_file().then_some(path)
    }

    /// Concatenates chunks `0..count` of `blob` into one file and keeps it (renamed into
    /// place after an fsync) as a verified copy of the whole blob, which the FUSE layer
    /// can hand to the kernel for passthrough reads. With `hash`, the chunks are hashed
    /// while copied and the file is kept only if the hash is `blob` itself; without, the
    /// caller vouches for every chunk (each was checked against a lazy index) and the
    /// kernel copies the bytes without them passing through this process. Keeps nothing
    /// when a chunk is missing or the hash differs. Complete files are outside the chunk
    /// budget; [`Self::remove_blob`] removes them too.
    pub fn assemble_complete(&self, blob: &Digest, count: u64, hash: bool) -> Result<Assembled, CacheError> {
        let tmp = self.temp_path();
        let result = (|| -> Result<Assembled, CacheError> {
            let mut out = File::create_new(&tmp).map_err(io_error("create complete blob", &tmp))?;
            let mut hasher = crate::modelpack::digest::Hasher::default();
            let mut buf = if hash { vec![0u8; 1 << 20] } else { Vec::new() };
            for index in 0..count {
                let key = ChunkKey { blob: *blob, index };
                let Some((mut chunk, path)) = self.open_present(&key)? else { return Ok(Assembled::Missing) };
                if !hash {
                    // `io::copy` between files is `copy_file_range`: no copy through here.
                    io::copy(&mut chunk, &mut out).map_err(io_error("copy chunk into complete blob", &path))?;
                    continue;
                }
                loop {
                    let n = chunk.read(&mut buf).map_err(io_error("read chunk", &path))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    io::Write::write_all(&mut out, &buf[..n]).map_err(io_error("write complete blob", &tmp))?;
                }
            }
            if hash {
                let actual = hasher.finish();
                if actual != *blob {
                    return Ok(Assembled::Mismatch(actual));
                }
            }
            out.sync_data().map_err(io_error("flush complete blob", &tmp))?;
            let path = self.layout.complete(blob);
            fs::rename(&tmp, &path).map_err(io_error("rename complete blob into place", &path))?;
            Ok(Assembled::Kept)
        })();
        if !matches!(result, Ok(Assembled::Kept)) {
            let _ = fs::remove_file(&tmp);
        }
        result
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
    /// files that do not exist in a way later calls would trust blindly (reads re-check
    /// the disk), so a poisoned lock is used as is rather than failing every caller.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks a chunk up (marking it used) and opens its file. Counts a miss when absent.
    fn open_present(&self, key: &ChunkKey) -> Result<Option<(File, PathBuf)>, CacheError> {
        let touched = self.lock().lru.get(key).map(|entry| entry.touched);
        let Some(touched) = touched else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let path = self.layout.chunk(key);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(key, &path);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(io_error("open chunk", &path)(e)),
        };
        let now = SystemTime::now();
        // A touched time in the future (clock stepped back) counts as stale too.
        let fresh = now.duration_since(touched).is_ok_and(|age| age < MTIME_REFRESH_INTERVAL);
        if !fresh {
            if let Err(e) = file.set_modified(now) {
                tracing::debug!(path = %path.display(), error = %e, "cannot refresh chunk mtime");
            }
            if let Some(entry) = self.lock().lru.peek_mut(key) {
                entry.touched = now;
            }
        }
        Ok(Some((file, path)))
    }

    /// Drops a chunk from the index after its file turned out missing or empty, unless a
    /// concurrent `put` has meanwhile placed a good copy.
    fn forget(&self, key: &ChunkKey, path: &Path) {
        let mut inner = self.lock();
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.len() > 0 => return,
            Ok(_) => {
                tracing::warn!(path = %path.display(), "removing empty chunk file");
                if let Err(e) = fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove empty chunk file");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "chunk file disappeared");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot stat chunk file");
                return;
            }
        }
        if let Some(entry) = inner.lru.pop(key) {
            inner.used_bytes -= entry.size;
        }
        // The blob is no longer whole, so the marker no longer holds.
        if inner.verified.contains(&key.blob) {
            self.drop_marker(&mut inner, &key.blob);
        }
    }

    /// Deletes chunks, least recently used first, until the budget holds. `keep` and
    /// chunks of pinned blobs are skipped.
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

        let mut emptied_blobs = Vec::new();
        for key in victims {
            // Marker first: were the chunk to go first, a crash in between would leave a
            // marker vouching for a blob with a missing chunk.
            if inner.verified.contains(&key.blob) && !self.drop_marker(inner, &key.blob) {
                continue;
            }
            let path = self.layout.chunk(&key);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot evict chunk");
                    continue;
                }
            }
            if let Some(entry) = inner.lru.pop(&key) {
                inner.used_bytes -= entry.size;
            }
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            if !emptied_blobs.contains(&key.blob) {
                emptied_blobs.push(key.blob);
            }
        }
        for blob in emptied_blobs {
            // Succeeds only if that was the blob's last chunk; otherwise it is a no-op.
            let _ = fs::remove_dir(self.layout.blob_dir(&blob));
        }
        if inner.used_bytes > budget {
            tracing::debug!(used_bytes = inner.used_bytes, budget, "cache over budget: remaining chunks are pinned");
        }
    }

    /// Deletes a blob's verified marker, durably. Returns whether it is gone for good.
    fn drop_marker(&self, inner: &mut Inner, blob: &Digest) -> bool {
        let marker = self.layout.marker(blob);
        match fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %marker.display(), error = %e, "cannot remove verified marker");
                return false;
            }
        }
        inner.verified.remove(blob);
        let dir = self.layout.blob_dir(blob);
        if let Err(e) = sync_dir(&dir) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot flush removal of verified marker");
            return false;
        }
        true
    }
}
