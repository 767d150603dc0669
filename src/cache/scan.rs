//! Recovery at `open`: empty the temporary directory and rebuild the in-memory index
//! from the chunk files on disk.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;

use super::layout::{parse_chunk_name, Layout, VERIFIED_MARKER};
use super::{io_error, CacheError, ChunkKey, Entry};
use crate::modelpack::Digest;

/// What a scan of the chunk directories found.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    /// Chunks with their sizes, least recently used (oldest mtime) first.
    pub(super) chunks: Vec<(ChunkKey, Entry)>,
    /// Blobs with a verified marker.
    pub(super) verified: HashSet<Digest>,
}

/// Deletes everything in the temporary directory. Only this process writes there (the
/// root is locked), so anything present was abandoned by an earlier run: a half-written
/// chunk, metadata record or unpacked layer, or a removed blob awaiting deletion.
pub(super) fn clear_tmp(layout: &Layout) -> Result<(), CacheError> {
    let tmp = layout.tmp_dir();
    for entry in fs::read_dir(&tmp).map_err(io_error("list temporary directory", &tmp))? {
        let entry = entry.map_err(io_error("list temporary directory", &tmp))?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let removed = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        match removed {
            Ok(()) => tracing::debug!(path = %path.display(), "removed leftover temporary file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove leftover temporary file", &path)(e)),
        }
    }
    Ok(())
}

/// Lists every chunk and verified marker under the chunk directory. Empty chunk files
/// (never valid) and empty blob directories are deleted; names the cache would not have
/// written are left alone and logged. With `drop_unverified` (the machine rebooted since
/// the cache was last open, so chunks written without `fsync` may be torn) the chunks of
/// every blob without a verified marker are deleted.
pub(super) fn scan(layout: &Layout, drop_unverified: bool) -> Result<Recovered, CacheError> {
    let mut found = Recovered::default();
    let chunks = layout.chunks();
    for entry in fs::read_dir(&chunks).map_err(io_error("list chunk directory", &chunks))? {
        let entry = entry.map_err(io_error("list chunk directory", &chunks))?;
        let path = entry.path();
        let blob = entry.file_name().to_str().and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
        match blob {
            Some(blob) if entry.file_type().is_ok_and(|t| t.is_dir()) => {
                scan_blob(blob, &path, drop_unverified, &mut found)?;
            }
            _ => tracing::warn!(path = %path.display(), "ignoring unexpected entry in chunk cache"),
        }
    }
    found.chunks.sort_by_key(|(_, entry)| entry.touched);
    Ok(found)
}

fn scan_blob(blob: Digest, dir: &Path, drop_unverified: bool, found: &mut Recovered) -> Result<(), CacheError> {
    let mut empty = true;
    let mut chunks = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list blob chunk directory", dir))? {
        let entry = entry.map_err(io_error("list blob chunk directory", dir))?;
        empty = false;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_str().unwrap_or_default();
        if name == VERIFIED_MARKER {
            found.verified.insert(blob);
            continue;
        }
        let Some(index) = parse_chunk_name(name) else {
            tracing::warn!(path = %path.display(), "ignoring unexpected entry in chunk cache");
            continue;
        };
        let meta = entry.metadata().map_err(io_error("stat chunk", &path))?;
        if !meta.is_file() {
            tracing::warn!(path = %path.display(), "ignoring non-file chunk entry");
            continue;
        }
        if meta.len() == 0 {
            tracing::warn!(path = %path.display(), "removing empty chunk file");
            fs::remove_file(&path).map_err(io_error("remove empty chunk", &path))?;
            continue;
        }
        let touched = meta.modified().map_err(io_error("read modification time of", &path))?;
        chunks.push((ChunkKey { blob, index }, Entry { size: meta.len(), touched }));
    }
    if drop_unverified && !found.verified.contains(&blob) && !chunks.is_empty() {
        tracing::info!(%blob, chunks = chunks.len(), "dropping chunks of an unverified blob after a reboot");
        fs::remove_dir_all(dir).map_err(io_error("remove unverified blob chunks", dir))?;
        return Ok(());
    }
    found.chunks.extend(chunks);
    if empty {
        // Left by an eviction that emptied the blob just before a crash; harmless, but
        // tidy. A failure here only leaves the directory for the next open.
        let _ = fs::remove_dir(dir);
    }
    Ok(())
}
