use std::fs;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use tempfile::TempDir;

use super::*;

fn blob(name: &str) -> Digest {
    Digest::of(name.as_bytes())
}

fn key(name: &str, index: u64) -> ChunkKey {
    ChunkKey { blob: blob(name), index }
}

/// Bytes that differ per chunk, so a mixed-up chunk is caught.
fn bytes_for(key: &ChunkKey, len: usize) -> Vec<u8> {
    let seed = key.blob.hex().as_bytes()[0] as usize + key.index as usize * 31;
    (0..len).map(|i| ((i + seed) % 251) as u8).collect()
}

/// The chunk size the test caches are bound to.
const CHUNK: u64 = 4096;

/// The voucher the tests store chunks as.
const V: Voucher = Voucher::Reader(0);

/// Marks a blob verified as a matching whole-blob hash would, for tests whose blobs are
/// named rather than hashed.
fn mark_verified(cache: &ChunkCache, blob: &Digest) {
    fs::write(cache.layout.marker(blob), MARKER_CONTENT).unwrap();
    cache.lock().verified.insert(*blob);
}

fn open(dir: &TempDir, budget: Option<u64>) -> ChunkCache {
    let cache = ChunkCache::open(dir.path(), budget).unwrap();
    cache.bind_chunk_size(CHUNK).unwrap();
    cache
}

#[test]
fn is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChunkCache>();
}

#[test]
fn put_then_get_round_trips_and_counts() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let k = key("a", 3);
    assert_eq!(cache.get(&k, None).unwrap(), None);
    assert!(!cache.contains(&k));

    let data = bytes_for(&k, 1000);
    cache.put(&k, &data, &V).unwrap();
    assert!(cache.contains(&k));
    assert_eq!(cache.get(&k, None).unwrap().as_deref(), Some(&data[..]));
    // One sparse file per blob, the chunk at its place in it.
    let data_file = dir.path().join("blobs/sha256").join(k.blob.hex());
    assert_eq!(fs::metadata(&data_file).unwrap().len(), 3 * CHUNK + 1000);
    assert_eq!(&fs::read(&data_file).unwrap()[3 * CHUNK as usize..], &data[..]);

    let stats = cache.stats();
    assert_eq!((stats.used_bytes, stats.chunks, stats.hits, stats.misses), (1000, 1, 1, 1));
    assert_eq!(cache.dir(), dir.path());
}

#[test]
fn cached_bytes_counts_the_chunks_of_one_blob_present() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, Some(1 << 20));
    assert_eq!(cache.budget(), Some(1 << 20));
    // A blob of three chunks, the last one short, with its first and last chunks cached;
    // another blob's chunk at the same index does not count.
    let size = 2 * CHUNK + 100;
    for (name, index, len) in [("a", 0, CHUNK), ("a", 2, 100), ("b", 1, CHUNK)] {
        let k = key(name, index);
        cache.put(&k, &bytes_for(&k, len as usize), &V).unwrap();
    }
    assert_eq!(cache.cached_bytes(&blob("a"), size), CHUNK + 100);
    assert_eq!(cache.cached_bytes(&blob("c"), size), 0);
    // Past one batch of look-ups under the lock.
    assert_eq!(cache.cached_bytes(&blob("a"), (PRESENCE_BATCH + 3) * CHUNK), CHUNK + 100);
}

#[test]
fn putting_a_present_chunk_again_keeps_it_without_double_counting() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let k = key("a", 0);
    cache.put(&k, b"first version", &V).unwrap();
    cache.put(&k, b"second", &V).unwrap();
    assert_eq!(cache.get(&k, None).unwrap().as_deref(), Some(&b"first version"[..]));
    assert_eq!(cache.stats().used_bytes, 13);
    assert_eq!(cache.stats().chunks, 1);
}

#[test]
fn chunks_must_fit_the_bound_chunk_size() {
    let dir = TempDir::new().unwrap();
    let cache = ChunkCache::open(dir.path(), None).unwrap();
    let err = cache.put(&key("a", 0), b"x", &V).unwrap_err();
    assert!(matches!(err, CacheError::Unbound { .. }), "{err}");
    cache.bind_chunk_size(CHUNK).unwrap();
    let err = cache.put(&key("a", 0), &vec![1; CHUNK as usize + 1], &V).unwrap_err();
    assert!(matches!(err, CacheError::ChunkTooLong { .. }), "{err}");
    cache.put(&key("a", 0), &vec![1; CHUNK as usize], &V).unwrap();
}

#[test]
fn empty_chunks_are_refused() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let err = cache.put(&key("a", 0), b"", &V).unwrap_err();
    assert!(matches!(err, CacheError::EmptyChunk { .. }));
    assert!(err.to_string().starts_with("refusing to store empty chunk 0 of blob sha256:"));
}

#[test]
fn read_into_reads_at_offsets() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let k = key("a", 0);
    let data = bytes_for(&k, 4096);
    cache.put(&k, &data, &V).unwrap();

    let mut buf = [0u8; 100];
    assert_eq!(cache.read_into(&k, 0, &mut buf, None).unwrap(), Some(100));
    assert_eq!(&buf[..], &data[..100]);
    assert_eq!(cache.read_into(&k, 1000, &mut buf, None).unwrap(), Some(100));
    assert_eq!(&buf[..], &data[1000..1100]);
    assert_eq!(cache.read_into(&k, 4050, &mut buf, None).unwrap(), Some(46));
    assert_eq!(&buf[..46], &data[4050..]);
    assert_eq!(cache.read_into(&k, 4096, &mut buf, None).unwrap(), Some(0));
    assert_eq!(cache.read_into(&k, u64::MAX, &mut buf, None).unwrap(), Some(0));
    assert_eq!(cache.read_into(&key("a", 1), 0, &mut buf, None).unwrap(), None);

    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (5, 1));
}

#[test]
fn chunks_survive_reopen() {
    let dir = TempDir::new().unwrap();
    let keys = [key("a", 0), key("a", 1), key("b", 7)];
    {
        let cache = open(&dir, None);
        for (i, k) in keys.iter().enumerate() {
            cache.put(k, &bytes_for(k, 100 + i), &V).unwrap();
        }
        mark_verified(&cache, &blob("b"));
    }
    let cache = open(&dir, None);
    let stats = cache.stats();
    assert_eq!((stats.used_bytes, stats.chunks), (100 + 101 + 102, 3));
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(cache.get(k, None).unwrap(), Some(bytes_for(k, 100 + i)));
    }
    assert!(cache.is_verified(&blob("b")));
    assert!(!cache.is_verified(&blob("a")));
}

#[test]
fn after_a_reboot_only_verified_blobs_keep_their_unflushed_chunks() {
    let dir = TempDir::new().unwrap();
    {
        let cache = open(&dir, None);
        for k in [key("a", 0), key("a", 1), key("b", 0)] {
            cache.put(&k, &bytes_for(&k, 100), &V).unwrap();
        }
        mark_verified(&cache, &blob("b"));
    }
    // Same boot: everything written is still in the page cache, so all of it counts.
    assert_eq!(open(&dir, None).stats().chunks, 3);
    // Another boot: chunks of the unverified blob may be torn and are dropped.
    std::fs::write(dir.path().join("boot-id"), "an-earlier-boot").unwrap();
    let cache = open(&dir, None);
    assert_eq!(cache.get(&key("a", 0), None).unwrap(), None);
    assert_eq!(cache.get(&key("a", 1), None).unwrap(), None);
    assert_eq!(cache.get(&key("b", 0), None).unwrap(), Some(bytes_for(&key("b", 0), 100)));
    assert!(cache.is_verified(&blob("b")));
    drop(cache);
    assert_eq!(open(&dir, None).stats().chunks, 1, "the new boot is recorded");
}

#[test]
fn a_second_open_of_the_same_dir_is_refused_while_the_first_lives() {
    let dir = TempDir::new().unwrap();
    let first = open(&dir, None);
    let err = ChunkCache::open(dir.path(), None).unwrap_err();
    assert!(matches!(err, CacheError::Locked { .. }), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    drop(first);
    open(&dir, None);
}

#[test]
fn leftover_temporary_files_are_removed_at_open_and_never_served() {
    let dir = TempDir::new().unwrap();
    let k = key("a", 0);
    let leftover;
    {
        let cache = open(&dir, None);
        leftover = cache.temp_path();
        assert!(leftover.starts_with(dir.path()));
        assert_ne!(leftover, cache.temp_path(), "temp paths are unique per call");
        fs::write(&leftover, b"half a chunk").unwrap();
        fs::create_dir(cache.temp_path()).unwrap();
        assert!(!cache.contains(&k));
    }
    // A process killed between writing a chunk's bytes and its map entry leaves data
    // without a map: it must read as absent. So must the directory of an earlier layout.
    let data_file = dir.path().join("blobs/sha256").join(k.blob.hex());
    fs::write(&data_file, b"bytes nobody vouches for").unwrap();
    let old_layout = dir.path().join("chunks/sha256").join(k.blob.hex());
    fs::create_dir_all(&old_layout).unwrap();
    fs::write(old_layout.join("0"), b"old").unwrap();

    let cache = open(&dir, None);
    assert!(!leftover.exists());
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    assert!(!cache.contains(&k));
    assert_eq!(cache.get(&k, None).unwrap(), None);
    assert_eq!(cache.stats().chunks, 0);
    assert!(!data_file.exists());
    assert!(!dir.path().join("chunks").exists());
}

#[test]
fn eviction_is_least_recently_used() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, Some(300));
    let [a, b, c, d] = [key("x", 0), key("x", 1), key("y", 0), key("y", 1)];
    for k in [a, b, c] {
        cache.put(&k, &bytes_for(&k, 100), &V).unwrap();
    }
    cache.get(&a, None).unwrap().unwrap();
    cache.put(&d, &bytes_for(&d, 100), &V).unwrap();

    assert!(!cache.contains(&b), "b was least recently used");
    for k in [a, c, d] {
        assert!(cache.contains(&k));
    }
    let stats = cache.stats();
    assert_eq!((stats.used_bytes, stats.chunks, stats.evictions), (300, 3, 1));
    // Its bytes are a hole now, and its map entry says absent.
    let map = fs::read(dir.path().join("blobs/sha256").join(format!("{}.map", b.blob.hex()))).unwrap();
    assert_eq!(&map[4..8], &[0, 0, 0, 0]);
    let data = fs::read(dir.path().join("blobs/sha256").join(b.blob.hex())).unwrap();
    assert!(data[CHUNK as usize..CHUNK as usize + 100].iter().all(|&b| b == 0));
}

#[test]
fn read_into_also_marks_a_chunk_used() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, Some(200));
    let [a, b, c] = [key("x", 0), key("x", 1), key("x", 2)];
    cache.put(&a, &[1; 100], &V).unwrap();
    cache.put(&b, &[2; 100], &V).unwrap();
    cache.read_into(&a, 10, &mut [0; 10], None).unwrap().unwrap();
    cache.put(&c, &[3; 100], &V).unwrap();
    assert!(cache.contains(&a));
    assert!(!cache.contains(&b));
}

#[test]
fn lru_order_is_rebuilt_from_mtimes() {
    let dir = TempDir::new().unwrap();
    // Recency is kept per blob, in its data file's mtime.
    let [old, new, next] = [key("x", 0), key("y", 0), key("z", 0)];
    {
        let cache = open(&dir, None);
        // Written in the opposite order of their recorded use.
        cache.put(&new, &[1; 100], &V).unwrap();
        cache.put(&old, &[2; 100], &V).unwrap();
    }
    let data_file = |k: &ChunkKey| dir.path().join("blobs/sha256").join(k.blob.hex());
    let now = SystemTime::now();
    let set_mtime =
        |k: &ChunkKey, t| fs::File::options().write(true).open(data_file(k)).unwrap().set_modified(t).unwrap();
    set_mtime(&old, now - Duration::from_secs(3600));
    set_mtime(&new, now - Duration::from_secs(60));

    let cache = open(&dir, Some(200));
    cache.put(&next, &[3; 100], &V).unwrap();
    assert!(!cache.contains(&old));
    assert!(cache.contains(&new));
}

#[test]
fn reads_refresh_a_stale_mtime() {
    let dir = TempDir::new().unwrap();
    let k = key("x", 0);
    {
        let cache = open(&dir, None);
        cache.put(&k, &[1; 10], &V).unwrap();
    }
    let path = dir.path().join("blobs/sha256").join(k.blob.hex());
    let long_ago = SystemTime::now() - Duration::from_secs(86400);
    fs::File::options().write(true).open(&path).unwrap().set_modified(long_ago).unwrap();

    let cache = open(&dir, None);
    cache.get(&k, None).unwrap().unwrap();
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    assert!(mtime > long_ago + MTIME_REFRESH_INTERVAL);
}

#[test]
fn existing_chunks_over_a_smaller_budget_are_evicted_at_open() {
    let dir = TempDir::new().unwrap();
    {
        let cache = open(&dir, None);
        for i in 0..5 {
            cache.put(&key("x", i), &[1; 100], &V).unwrap();
        }
    }
    let cache = open(&dir, Some(250));
    let stats = cache.stats();
    assert_eq!((stats.used_bytes, stats.chunks, stats.evictions), (200, 2, 3));
}

#[test]
fn pinned_blobs_and_the_chunk_just_written_are_not_evicted() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, Some(100));
    let pinned = key("pinned", 0);
    let other = key("other", 0);

    cache.pin_blob(&pinned.blob);
    cache.pin_blob(&pinned.blob);
    cache.put(&pinned, &[1; 100], &V).unwrap();
    cache.put(&other, &[2; 100], &V).unwrap();
    assert!(cache.contains(&pinned) && cache.contains(&other));
    assert_eq!(cache.stats().used_bytes, 200);

    // A chunk larger than the whole budget is still kept once written.
    let big = key("big", 0);
    cache.put(&big, &[3; 500], &V).unwrap();
    assert!(cache.contains(&big) && cache.contains(&pinned));
    assert!(!cache.contains(&other));

    // Pins nest: the first unpin keeps the blob protected.
    cache.unpin_blob(&pinned.blob);
    assert!(cache.contains(&pinned));
    cache.unpin_blob(&pinned.blob);
    assert!(!cache.contains(&pinned), "evicted once the last pin goes");
    assert!(!cache.contains(&big), "still over budget, so the big chunk goes as well");
    assert_eq!(cache.stats().used_bytes, 0);

    // Unbalanced unpins are harmless.
    cache.unpin_blob(&pinned.blob);
}

#[test]
fn remove_blob_drops_all_its_chunks_and_marker() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let bad = blob("bad");
    for i in 0..3 {
        cache.put(&ChunkKey { blob: bad, index: i }, &[1; 10], &V).unwrap();
    }
    cache.put(&key("good", 0), &[2; 10], &V).unwrap();
    mark_verified(&cache, &bad);
    cache.pin_blob(&bad);

    cache.remove_blob(&bad).unwrap();
    for i in 0..3 {
        assert!(!cache.contains(&ChunkKey { blob: bad, index: i }));
    }
    assert!(!cache.is_verified(&bad));
    assert!(!dir.path().join("blobs/sha256").join(bad.hex()).exists());
    assert!(cache.contains(&key("good", 0)));
    assert_eq!(cache.stats().used_bytes, 10);
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

    // Removing an absent blob is fine, and the blob can be stored again.
    cache.remove_blob(&bad).unwrap();
    cache.put(&ChunkKey { blob: bad, index: 0 }, &[3; 10], &V).unwrap();
    drop(cache);
    let cache = open(&dir, None);
    assert_eq!(cache.stats().chunks, 2);
    assert!(!cache.is_verified(&bad));
}

#[test]
fn evicting_a_chunk_of_a_verified_blob_evicts_the_blob_whole() {
    let dir = TempDir::new().unwrap();
    let b = blob("b");
    let marker = dir.path().join("blobs/sha256").join(format!("{}.verified", b.hex()));
    {
        let cache = open(&dir, Some(300));
        for i in 0..3 {
            cache.put(&ChunkKey { blob: b, index: i }, &[1; 100], &V).unwrap();
        }
        mark_verified(&cache, &b);
        assert!(cache.is_verified(&b));
        assert!(marker.is_file());
        // A passthrough reader holds the file open: its bytes must stay intact.
        let reader = fs::File::open(cache.complete_path(&b).unwrap()).unwrap();

        cache.put(&key("other", 0), &[2; 100], &V).unwrap();
        for i in 0..3 {
            assert!(!cache.contains(&ChunkKey { blob: b, index: i }));
        }
        assert!(!cache.is_verified(&b));
        assert_eq!(cache.complete_path(&b), None);
        let mut kept = vec![0u8; 100];
        std::os::unix::fs::FileExt::read_exact_at(&reader, &mut kept, 2 * CHUNK).unwrap();
        assert_eq!(kept, vec![1; 100], "an open file keeps its bytes");
        assert_eq!(cache.stats().evictions, 3);
    }
    assert!(!marker.exists());
    let cache = open(&dir, None);
    assert!(!cache.is_verified(&b), "the marker stays gone after a restart");
    assert_eq!(cache.stats().chunks, 1);
}

#[test]
fn a_chunk_deleted_behind_the_cache_back_reads_as_absent() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let [gone, also] = [key("x", 0), key("x", 1)];
    cache.put(&gone, &[1; 10], &V).unwrap();
    cache.put(&also, &[2; 10], &V).unwrap();
    mark_verified(&cache, &gone.blob);
    let blobs = dir.path().join("blobs/sha256");
    fs::remove_file(blobs.join(gone.blob.hex())).unwrap();

    assert_eq!(cache.get(&gone, None).unwrap(), None);
    assert_eq!(cache.read_into(&also, 0, &mut [0; 4], None).unwrap(), None);
    let stats = cache.stats();
    assert_eq!((stats.used_bytes, stats.chunks, stats.misses, stats.hits), (0, 0, 2, 0));
    assert!(!cache.is_verified(&gone.blob));
    assert!(!blobs.join(format!("{}.map", gone.blob.hex())).exists());
    assert!(!blobs.join(format!("{}.verified", gone.blob.hex())).exists());
}

#[test]
fn a_blob_file_cut_short_behind_the_cache_back_reads_as_absent() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let [first, second] = [key("x", 0), key("x", 1)];
    cache.put(&first, &[1; 10], &V).unwrap();
    cache.put(&second, &[2; 10], &V).unwrap();
    let data_file = dir.path().join("blobs/sha256").join(first.blob.hex());
    fs::File::options().write(true).open(&data_file).unwrap().set_len(CHUNK + 5).unwrap();

    assert_eq!(cache.get(&second, None).unwrap(), None);
    assert!(!cache.contains(&second), "a short chunk is not left present, so it is fetched again");
    assert!(!cache.contains(&first), "nor is the rest of a blob that cannot be trusted");
    assert_eq!(cache.stats().used_bytes, 0);
}

#[test]
fn meta_round_trips_any_name() {
    let dir = TempDir::new().unwrap();
    let names = [
        "registry.example:5000/org/model:v1",
        "../../etc/passwd",
        "..",
        "a/../../b",
        "",
        "name with spaces and ünïcödé",
    ];
    {
        let cache = open(&dir, None);
        assert_eq!(cache.get_meta(names[0]).unwrap(), None);
        for name in names {
            cache.put_meta(name, format!("record for {name}").as_bytes()).unwrap();
        }
        cache.put_meta(names[0], b"replaced").unwrap();
    }
    let cache = open(&dir, None);
    assert_eq!(cache.get_meta(names[0]).unwrap().as_deref(), Some(&b"replaced"[..]));
    for name in &names[1..] {
        assert_eq!(cache.get_meta(name).unwrap(), Some(format!("record for {name}").into_bytes()));
    }
    let files: Vec<_> = fs::read_dir(dir.path().join("meta")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), names.len() + 1, "and the chunk-size record");
    for file in files {
        let file = file.to_str().unwrap().to_owned();
        assert!(file.len() == 64 && file.bytes().all(|b| b.is_ascii_hexdigit()), "{file}");
    }
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn unpacked_paths_live_in_the_cache_dir() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let b = blob("layer");
    let path = cache.unpacked_path(&b);
    assert_eq!(path, dir.path().join("unpacked/sha256").join(format!("{}.tar", b.hex())));
    let tmp = cache.temp_path();
    fs::write(&tmp, b"tar bytes").unwrap();
    fs::rename(&tmp, &path).unwrap();
    drop(cache);
    let cache = open(&dir, None);
    assert_eq!(fs::read(cache.unpacked_path(&b)).unwrap(), b"tar bytes");
    assert_eq!(cache.stats().used_bytes, 9, "unpacked copies count in the budget");
}

#[test]
fn concurrent_puts_and_gets_agree() {
    let dir = TempDir::new().unwrap();
    // Room for about half the chunks, so eviction runs alongside everything else.
    let cache = Arc::new(open(&dir, Some(40 * 1000)));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let cache = Arc::clone(&cache);
            thread::spawn(move || {
                for round in 0..200u64 {
                    let k = key(["p", "q", "r", "s"][(round % 4) as usize], (round * 7 + t) % 20);
                    let len = 1000 + k.index as usize;
                    if round % 3 == 0 {
                        cache.put(&k, &bytes_for(&k, len), &V).unwrap();
                    }
                    if let Some(data) = cache.get(&k, None).unwrap() {
                        assert_eq!(data, bytes_for(&k, len));
                    }
                    let mut buf = [0u8; 64];
                    if let Some(n) = cache.read_into(&k, 500, &mut buf, None).unwrap() {
                        assert_eq!(&buf[..n], &bytes_for(&k, len)[500..500 + n]);
                    }
                    if round % 50 == 0 {
                        cache.pin_blob(&k.blob);
                        cache.unpin_blob(&k.blob);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    let stats = cache.stats();
    assert!(stats.used_bytes <= 40 * 1000, "{stats:?}");
    drop(cache);
    let reopened = open(&dir, None);
    assert_eq!(reopened.stats().used_bytes, stats.used_bytes, "the index matched the disk");
    assert_eq!(reopened.stats().chunks, stats.chunks);
}

#[test]
fn verify_failures_are_counted() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    cache.record_verify_failure();
    cache.record_verify_failure();
    assert_eq!(cache.stats().verify_failures, 2);
}

#[test]
fn errors_name_the_operation_and_path() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"").unwrap();
    let err = ChunkCache::open(&file.join("cache"), None).unwrap_err();
    let message = err.to_string();
    assert!(message.starts_with("cannot create cache directory "), "{message}");
    assert!(message.contains(&file.display().to_string()), "{message}");
}

#[test]
fn chunk_size_is_bound_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = ChunkCache::open(dir.path(), None).unwrap();
        cache.bind_chunk_size(4096).unwrap();
        cache.bind_chunk_size(4096).unwrap();
    }
    let cache = ChunkCache::open(dir.path(), None).unwrap();
    cache.bind_chunk_size(4096).unwrap();
    let err = cache.bind_chunk_size(8192).unwrap_err();
    assert!(matches!(err, CacheError::ChunkSizeMismatch { cached: 4096, requested: 8192, .. }), "{err}");
}

#[test]
fn a_marker_that_does_not_say_the_whole_blob_was_hashed_is_ignored_at_open() {
    let dir = TempDir::new().unwrap();
    let k = key("a", 0);
    {
        let cache = open(&dir, None);
        cache.put(&k, &bytes_for(&k, 100), &V).unwrap();
        // Earlier versions wrote empty markers, some for blobs never hashed whole.
        fs::write(cache.layout.marker(&k.blob), b"").unwrap();
    }
    let cache = open(&dir, None);
    assert!(!cache.is_verified(&k.blob));
    assert!(!cache.layout.marker(&k.blob).exists());
    assert_eq!(cache.standing(&k, &V), Standing::Unvouched, "chunks of an earlier process carry no voucher");
}

#[test]
fn a_chunk_is_trusted_only_by_who_vouched_for_its_bytes() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let (a, b) = (Voucher::Index(blob("index a")), Voucher::Index(blob("index b")));
    let k = key("x", 0);
    cache.put(&k, b"bytes a", &a).unwrap();
    assert_eq!(cache.standing(&k, &a), Standing::Trusted);
    assert_eq!(cache.standing(&k, &b), Standing::Unvouched);
    assert_eq!(cache.get(&k, Some(&b)).unwrap(), None);
    let mut buf = [0u8; 7];
    assert_eq!(cache.read_into(&k, 0, &mut buf, Some(&b)).unwrap(), None);

    // The same bytes from b: b vouches too. Other bytes from b: they replace a's.
    cache.put(&k, b"bytes a", &b).unwrap();
    assert_eq!(cache.standing(&k, &b), Standing::Trusted);
    let c = Voucher::Reader(7);
    cache.put(&k, b"bytes c", &c).unwrap();
    assert_eq!(cache.get(&k, Some(&c)).unwrap().as_deref(), Some(&b"bytes c"[..]));
    assert_eq!(cache.standing(&k, &a), Standing::Unvouched);

    // A checker vouches for the generation it checked, not for bytes stored since.
    let (_, generation) = cache.get_unvouched(&k).unwrap().unwrap();
    cache.discard(&k, generation);
    cache.put(&k, b"bytes d", &c).unwrap();
    assert!(!cache.vouch(&k, generation, &a));
    assert_eq!(cache.standing(&k, &a), Standing::Unvouched);
}

#[test]
fn whole_blob_verification_decides_and_names_the_index_that_vouched_for_all_of_it() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let index = Voucher::Index(blob("index"));
    let data: Vec<u8> = (0..3 * CHUNK + 10).map(|i| (i % 241) as u8).collect();
    let good = Digest::of(&data);
    // Out of order: the hash is fed as far as the chunks are contiguous.
    for i in [1u64, 0, 3, 2] {
        let start = (i * CHUNK) as usize;
        let end = (start + CHUNK as usize).min(data.len());
        cache.put(&ChunkKey { blob: good, index: i }, &data[start..end], &index).unwrap();
    }
    assert_eq!(cache.verify_blob(&good, data.len() as u64).unwrap(), Verdict::Verified);
    assert!(cache.is_verified(&good));
    assert_eq!(fs::read(cache.layout.marker(&good)).unwrap(), MARKER_CONTENT);

    // Bytes that are not the blob named by `lie`, all vouched for by one index.
    let lie = blob("claimed");
    for i in 0..4u64 {
        let start = (i * CHUNK) as usize;
        let end = (start + CHUNK as usize).min(data.len());
        cache.put(&ChunkKey { blob: lie, index: i }, &data[start..end], &index).unwrap();
    }
    let verdict = cache.verify_blob(&lie, data.len() as u64).unwrap();
    assert_eq!(verdict, Verdict::Mismatch { actual: good, condemned: vec![blob("index")] });
    assert!(!cache.contains(&ChunkKey { blob: lie, index: 0 }), "evicted");
    assert!(cache.is_condemned(&blob("index")));
    assert_eq!(cache.stats().verify_failures, 1);
}

#[test]
fn the_cache_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let parent = TempDir::new().unwrap();
    let root = parent.path().join("cache");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    let cache = ChunkCache::open(&root, None).unwrap();
    cache.bind_chunk_size(CHUNK).unwrap();
    let data: Vec<u8> = (0..100u8).collect();
    let k = ChunkKey { blob: Digest::of(&data), index: 0 };
    cache.put(&k, &data, &V).unwrap();
    assert_eq!(cache.verify_blob(&k.blob, 100).unwrap(), Verdict::Verified);
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root), 0o700, "an existing root is tightened");
    for dir in cache.layout.dirs() {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in [cache.layout.data(&k.blob), cache.layout.map(&k.blob), cache.layout.marker(&k.blob)] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    for entry in fs::read_dir(cache.layout.meta_dir()).unwrap() {
        assert_eq!(mode(&entry.unwrap().path()), 0o600);
    }
}

#[test]
fn unpacked_copies_count_in_the_budget_and_go_when_unused() {
    let dir = TempDir::new().unwrap();
    let cache = Arc::new(ChunkCache::open(dir.path(), Some(1200)).unwrap());
    cache.bind_chunk_size(CHUNK).unwrap();
    let (a, b) = (blob("layer a"), blob("layer b"));
    for (blob, size) in [(a, 600usize), (b, 300)] {
        fs::write(cache.unpacked_path(&blob), vec![7u8; size]).unwrap();
    }
    let lease_a = cache.lease_unpacked(&a).unwrap();
    let lease_b = cache.lease_unpacked(&b).unwrap();
    assert_eq!(cache.stats().used_bytes, 900);
    cache.put(&key("c", 0), &[1; 200], &V).unwrap();
    assert_eq!(cache.stats().used_bytes, 1100);

    // Unused, a copy stays for the next process while the budget allows, and is
    // evicted before any chunk once it needs room.
    drop(lease_b);
    assert!(cache.unpacked_path(&b).exists());
    cache.put(&key("d", 0), &[2; 300], &V).unwrap();
    assert!(!cache.unpacked_path(&b).exists(), "the unused copy made room");
    assert!(cache.contains(&key("c", 0)) && cache.contains(&key("d", 0)));
    assert!(cache.unpacked_path(&a).exists(), "the copy in use stays");
    assert_eq!(cache.stats().used_bytes, 1100);
    assert!(!cache.discard_unpacked(&a).unwrap(), "a copy in use is not discarded");

    // The daemon drops a copy with its last model.
    cache.drop_unused_unpacked();
    drop(lease_a);
    assert!(!cache.unpacked_path(&a).exists());
    assert_eq!(cache.stats().used_bytes, 500);
}

#[test]
fn unpacked_copies_are_counted_again_at_open() {
    let dir = TempDir::new().unwrap();
    {
        let cache = open(&dir, None);
        fs::write(cache.unpacked_path(&blob("layer")), vec![1u8; 500]).unwrap();
    }
    let cache = open(&dir, None);
    assert_eq!(cache.stats().used_bytes, 500);
    drop(cache);
    let cache = ChunkCache::open(dir.path(), Some(100)).unwrap();
    assert_eq!(cache.stats().used_bytes, 0, "an unused copy over budget is evicted at open");
}

#[test]
fn chunks_fed_in_order_are_not_read_back_to_verify_their_blob() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let data: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 239) as u8).collect();
    let digest = Digest::of(&data);
    let chunk = |i: u64| &data[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize];
    let put = |i: u64| (cache.put(&ChunkKey { blob: digest, index: i }, chunk(i), &V).unwrap(), chunk(i));
    // Chunks 2..4 arrive first and cannot continue the hash; 0..2 then do, and the
    // hash catches up with 2..4 from the cache.
    let late = [put(2), put(3)];
    cache.feed_hash(digest, 2, &late);
    let early = [put(0), put(1)];
    cache.feed_hash(digest, 0, &early);
    let reads = cache.stats().hits;
    assert_eq!(cache.verify_blob(&digest, data.len() as u64).unwrap(), Verdict::Verified);
    assert_eq!(cache.stats().hits, reads, "nothing left to read back");

    // Bytes that are not the stored chunk are never hashed as if they were.
    let other = blob("other");
    let k = ChunkKey { blob: other, index: 0 };
    let generation = cache.put(&k, b"stored", &V).unwrap();
    assert!(generation.is_some());
    assert_eq!(cache.put(&k, b"a second answer", &V).unwrap(), None, "trusted bytes stay, unread");
    cache.feed_hash(other, 0, &[(generation.map(|g| g + 1), &b"forged"[..])]);
    assert!(cache.lock().hashing.is_empty(), "a stale generation feeds nothing");
}

#[test]
fn a_hash_stopped_short_of_a_run_catches_up_from_the_cache_only_to_that_run() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    let data: Vec<u8> = (0..6 * CHUNK).map(|i| (i % 241) as u8).collect();
    let digest = Digest::of(&data);
    let chunk = |i: u64| &data[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize];
    let put = |i: u64| (cache.put(&ChunkKey { blob: digest, index: i }, chunk(i), &V).unwrap(), chunk(i));
    // Chunks 0..2 are fed in order; 2..4 are stored but were never fed (left out); 4..6
    // wait in memory. Chunk 5 is not stored yet when the hash catches up.
    let first = [put(0), put(1)];
    cache.feed_hash_run(digest, 0, &first);
    put(2);
    put(3);
    let reads = cache.stats().hits;
    assert_eq!(cache.hash_catch_up(digest, 4), Some(4), "read back up to the waiting run");
    assert_eq!(cache.stats().hits, reads + 2, "chunks 2 and 3 read back, no more");
    assert_eq!(cache.hash_catch_up(digest, 4), Some(4), "nothing more to do");
    let late = [put(4), put(5)];
    cache.feed_hash_run(digest, 4, &late);
    assert_eq!(cache.hash_next(&digest), Some(6));
    let reads = cache.stats().hits;
    assert_eq!(cache.verify_blob(&digest, data.len() as u64).unwrap(), Verdict::Verified);
    assert_eq!(cache.stats().hits, reads, "nothing left to read back");

    // A gap of chunks not stored yet: the hash waits where it is.
    let other: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 13) as u8).collect();
    let other_digest = Digest::of(&other);
    cache.put(&ChunkKey { blob: other_digest, index: 2 }, &other[2 * CHUNK as usize..], &V).unwrap();
    assert_eq!(cache.hash_catch_up(other_digest, 2), Some(0));
    assert_eq!(cache.hash_next(&other_digest), Some(0));
}

#[test]
fn page_aligned_chunks_go_around_the_page_cache_and_read_back_the_same() {
    let dir = TempDir::new().unwrap();
    let cache = open(&dir, None);
    // Page-aligned memory, as fetched bodies are; and an unaligned copy of the same
    // bytes, written through the page cache.
    let k = key("direct", 2);
    let data = bytes_for(&k, CHUNK as usize);
    let mut buf: Vec<u8> = Vec::with_capacity(2 * CHUNK as usize);
    let start = buf.as_ptr().align_offset(4096);
    buf.resize(start, 0);
    buf.extend_from_slice(&data);
    let aligned = &buf[start..];
    assert_eq!(aligned.as_ptr() as usize % 4096, 0);
    cache.put(&k, aligned, &V).unwrap();
    let k2 = key("direct", 0);
    let data2 = bytes_for(&k2, CHUNK as usize);
    let mut unaligned = vec![0u8; CHUNK as usize + 1];
    unaligned[1..].copy_from_slice(&data2);
    cache.put(&k2, &unaligned[1..], &V).unwrap();
    assert_eq!(cache.get(&k, None).unwrap().as_deref(), Some(&data[..]));
    assert_eq!(cache.get(&k2, None).unwrap().as_deref(), Some(&data2[..]));
    // The file holds both at their places, a hole between them.
    let file = fs::read(cache.layout.data(&k.blob)).unwrap();
    assert_eq!(&file[2 * CHUNK as usize..], &data[..]);
    assert_eq!(&file[..CHUNK as usize], &data2[..]);
    assert!(file[CHUNK as usize..2 * CHUNK as usize].iter().all(|&b| b == 0));
}
