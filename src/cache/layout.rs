//! Where each kind of cache file lives under the cache root. Every path the cache
//! touches is built here, so the on-disk layout is written down in one place.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::ChunkKey;
use crate::modelpack::Digest;

/// File name of the marker saying a blob's chunks were hashed and matched its digest.
/// Chunk files are named by decimal index, so this name cannot collide with one.
pub(super) const VERIFIED_MARKER: &str = "verified";

/// File name of the lock that keeps a second process out of the same cache root.
const LOCK_FILE: &str = "lock";
/// File name of the record of the boot during which the cache was last opened.
const BOOT_FILE: &str = "boot-id";

/// The paths of one cache root.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(super) fn new(root: &Path) -> Self {
        Self { root: root.to_owned() }
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn lock_file(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }

    pub(super) fn boot_file(&self) -> PathBuf {
        self.root.join(BOOT_FILE)
    }

    /// Parent of the per-blob chunk directories.
    pub(super) fn chunks(&self) -> PathBuf {
        self.root.join("chunks").join("sha256")
    }

    pub(super) fn blob_dir(&self, blob: &Digest) -> PathBuf {
        self.chunks().join(blob.hex())
    }

    pub(super) fn chunk(&self, key: &ChunkKey) -> PathBuf {
        self.blob_dir(&key.blob).join(key.index.to_string())
    }

    pub(super) fn marker(&self, blob: &Digest) -> PathBuf {
        self.blob_dir(blob).join(VERIFIED_MARKER)
    }

    pub(super) fn meta_dir(&self) -> PathBuf {
        self.root.join("meta")
    }

    /// Metadata names are arbitrary text (registry references contain `/` and `:`), so
    /// the file is named by the sha256 of the name: fixed length, no separators, and no
    /// way for a name to climb out of the directory.
    pub(super) fn meta(&self, name: &str) -> PathBuf {
        self.meta_dir().join(hex::encode(Sha256::digest(name.as_bytes())))
    }

    pub(super) fn unpacked_dir(&self) -> PathBuf {
        self.root.join("unpacked").join("sha256")
    }

    pub(super) fn unpacked(&self, blob: &Digest) -> PathBuf {
        self.unpacked_dir().join(format!("{}.tar", blob.hex()))
    }

    pub(super) fn complete_dir(&self) -> PathBuf {
        self.root.join("complete").join("sha256")
    }

    pub(super) fn complete(&self, blob: &Digest) -> PathBuf {
        self.complete_dir().join(blob.hex())
    }

    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Every directory below the root that `open` makes sure exists, parents first.
    pub(super) fn dirs(&self) -> [PathBuf; 8] {
        [
            self.root.join("chunks"),
            self.chunks(),
            self.meta_dir(),
            self.root.join("unpacked"),
            self.unpacked_dir(),
            self.root.join("complete"),
            self.complete_dir(),
            self.tmp_dir(),
        ]
    }
}

/// The chunk index a chunk file name stands for, if it is one: canonical decimal only,
/// so that each chunk has exactly one possible file name.
pub(super) fn parse_chunk_name(name: &str) -> Option<u64> {
    let index: u64 = name.parse().ok()?;
    (index.to_string() == name).then_some(index)
}
