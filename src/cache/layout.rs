//! Where each kind of cache file lives under the cache root. Every path the cache
//! touches is built here, so the on-disk layout is written down in one place.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::modelpack::Digest;

/// Suffix of a blob's presence map, next to its data file.
pub(super) const MAP_SUFFIX: &str = ".map";
/// Suffix of the marker saying a blob's chunks were all present, hashed and matched its
/// digest.
pub(super) const VERIFIED_SUFFIX: &str = ".verified";

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

    /// Parent of the blob data files, their presence maps and markers.
    pub(super) fn blobs(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    /// A blob's data file: chunk `i` at byte `i × chunk size`, holes where chunks are
    /// absent.
    pub(super) fn data(&self, blob: &Digest) -> PathBuf {
        self.blobs().join(blob.hex())
    }

    /// A blob's presence map: the length of chunk `i` as a little-endian `u32` at byte
    /// `4 × i`, zero while absent.
    pub(super) fn map(&self, blob: &Digest) -> PathBuf {
        self.blobs().join(format!("{}{MAP_SUFFIX}", blob.hex()))
    }

    pub(super) fn marker(&self, blob: &Digest) -> PathBuf {
        self.blobs().join(format!("{}{VERIFIED_SUFFIX}", blob.hex()))
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

    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Directories of an earlier layout (one file per chunk, plus whole-blob copies),
    /// deleted at `open`.
    pub(super) fn obsolete_dirs(&self) -> [PathBuf; 2] {
        [self.root.join("chunks"), self.root.join("complete")]
    }

    /// Every directory below the root that `open` makes sure exists, parents first.
    pub(super) fn dirs(&self) -> [PathBuf; 6] {
        [
            self.root.join("blobs"),
            self.blobs(),
            self.meta_dir(),
            self.root.join("unpacked"),
            self.unpacked_dir(),
            self.tmp_dir(),
        ]
    }
}
