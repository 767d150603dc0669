//! Recovery at `open`: empty the temporary directory, delete an earlier on-disk layout,
//! and rebuild the in-memory index from the blobs' presence maps.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::Path;

use super::layout::{Layout, MAP_SUFFIX, VERIFIED_SUFFIX};
use super::trust::MARKER_CONTENT;
use super::{io_error, CacheError, ChunkKey, Entry};
use crate::modelpack::Digest;

/// What a scan of the blob directory found.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    /// Chunks with their sizes, least recently used (oldest data file mtime) first.
    pub(super) chunks: Vec<(ChunkKey, Entry)>,
    /// Blobs with a verified marker.
    pub(super) verified: HashSet<Digest>,
    /// Unpacked copies of compressed layers: blob, size, modification time.
    pub(super) unpacked: Vec<(Digest, u64, std::time::SystemTime)>,
}

/// Deletes everything in the temporary directory. Only this process writes there (the
/// root is locked), so anything present was abandoned by an earlier run: a half-written
/// metadata record or unpacked layer, or a removed blob awaiting deletion.
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

/// Deletes the directories of an earlier layout: their chunks are fetched again.
pub(super) fn remove_obsolete(layout: &Layout) -> Result<(), CacheError> {
    for dir in layout.obsolete_dirs() {
        match fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(path = %dir.display(), "removed a cache directory of an earlier layout"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove obsolete cache directory", &dir)(e)),
        }
    }
    Ok(())
}

/// The files found for one blob.
#[derive(Debug, Default)]
struct Found {
    data: bool,
    map: bool,
    marker: bool,
}

/// Lists every blob's data file, presence map and verified marker. Files without their
/// partner (a map without data, data without a map, a marker without both) and blobs
/// with no chunk present are deleted; names the cache would not have written are left
/// alone and logged. With `drop_unverified` (the machine rebooted since the cache was
/// last open, so data written without `fsync` may be torn) every blob without a
/// verified marker is deleted.
pub(super) fn scan(layout: &Layout, drop_unverified: bool) -> Result<Recovered, CacheError> {
    let dir = layout.blobs();
    let mut blobs: HashMap<Digest, Found> = HashMap::new();
    for entry in fs::read_dir(&dir).map_err(io_error("list blob directory", &dir))? {
        let entry = entry.map_err(io_error("list blob directory", &dir))?;
        let name = entry.file_name();
        let name = name.to_str().unwrap_or_default();
        let (hex, field): (&str, fn(&mut Found) -> &mut bool) = if let Some(hex) = name.strip_suffix(MAP_SUFFIX) {
            (hex, |f| &mut f.map)
        } else if let Some(hex) = name.strip_suffix(VERIFIED_SUFFIX) {
            (hex, |f| &mut f.marker)
        } else {
            (name, |f| &mut f.data)
        };
        let digest = format!("sha256:{hex}").parse::<Digest>().ok();
        match digest {
            Some(digest) if entry.file_type().is_ok_and(|t| t.is_file()) => {
                *field(blobs.entry(digest).or_default()) = true;
            }
            _ => tracing::warn!(path = %entry.path().display(), "ignoring unexpected entry in the blob cache"),
        }
    }

    let mut recovered = Recovered::default();
    for (blob, mut found) in blobs {
        if found.marker && !marker_vouches(layout, &blob)? {
            tracing::info!(%blob, "ignoring a verified marker that does not say the whole blob was hashed");
            remove_if_present(&layout.marker(&blob))?;
            found.marker = false;
        }
        let keep = found.data && found.map && (found.marker || !drop_unverified);
        let chunks = if keep { read_map(layout, &blob)? } else { Vec::new() };
        if chunks.is_empty() {
            if drop_unverified && found.data && found.map && !found.marker {
                tracing::info!(%blob, "dropping an unverified blob after a reboot");
            }
            remove_blob_files(layout, &blob)?;
            continue;
        }
        let data = layout.data(&blob);
        let touched =
            fs::metadata(&data).and_then(|m| m.modified()).map_err(io_error("read modification time of", &data))?;
        if found.marker {
            recovered.verified.insert(blob);
        }
        recovered.chunks.extend(chunks.into_iter().map(|(index, size)| {
            (ChunkKey { blob, index }, Entry { size, touched, generation: 0, vouchers: Vec::new() })
        }));
    }
    recovered.chunks.sort_by_key(|(_, entry)| entry.touched);
    recovered.unpacked = scan_unpacked(layout)?;
    Ok(recovered)
}

/// Lists the unpacked copies (`<hex>.tar`, each flushed before its rename, so whole);
/// anything else there is left alone and logged.
fn scan_unpacked(layout: &Layout) -> Result<Vec<(Digest, u64, std::time::SystemTime)>, CacheError> {
    let dir = layout.unpacked_dir();
    let mut found = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_error("list unpacked directory", &dir))? {
        let entry = entry.map_err(io_error("list unpacked directory", &dir))?;
        let name = entry.file_name();
        let digest = name
            .to_str()
            .and_then(|n| n.strip_suffix(".tar"))
            .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
        let meta = entry.metadata().map_err(io_error("stat", &entry.path()))?;
        match digest {
            Some(digest) if meta.is_file() => {
                let touched = meta.modified().map_err(io_error("read modification time of", &entry.path()))?;
                found.push((digest, meta.len(), touched));
            }
            _ => tracing::warn!(path = %entry.path().display(), "ignoring unexpected entry among unpacked layers"),
        }
    }
    Ok(found)
}

/// Whether a blob's marker says what markers written after a whole-blob hash say.
fn marker_vouches(layout: &Layout, blob: &Digest) -> Result<bool, CacheError> {
    let path = layout.marker(blob);
    match fs::read(&path) {
        Ok(content) => Ok(content == MARKER_CONTENT),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("read verified marker", &path)(e)),
    }
}

/// The present chunks recorded in a blob's presence map: (index, length).
fn read_map(layout: &Layout, blob: &Digest) -> Result<Vec<(u64, u64)>, CacheError> {
    let path = layout.map(blob);
    let raw = fs::read(&path).map_err(io_error("read presence map", &path))?;
    Ok(raw
        .chunks_exact(4)
        .enumerate()
        .filter_map(|(i, b)| {
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (len > 0).then_some((i as u64, u64::from(len)))
        })
        .collect())
}

/// Deletes whichever of a blob's files exist.
fn remove_blob_files(layout: &Layout, blob: &Digest) -> Result<(), CacheError> {
    for path in [layout.marker(blob), layout.map(blob), layout.data(blob)] {
        remove_if_present(&path)?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}
