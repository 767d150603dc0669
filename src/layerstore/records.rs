//! The layer store's durable records: which layers containers/storage uses, and how
//! many times, so that a restart serves the same paths again and releases stay
//! balanced. One [`metadata::records`] table, one write transaction per change.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{LayerPath, StoreError};
use crate::companion::IndexLayer;
use crate::metadata;
use crate::modelpack::Digest;

/// A layer in use, as recorded: what to serve it from again without asking the
/// registry (every field was checked when the layer was first looked up).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The image reference, as containers/storage gave it.
    pub reference: String,
    /// The lookup key: the index layer's digest or its TOC digest.
    pub key: Digest,
    /// The index layer's digest.
    pub layer: Digest,
    /// The index layer's size.
    pub size: u64,
    /// Where the index layer is, pinned.
    pub location: String,
    /// The TOC digest the layer declares.
    pub toc: Option<Digest>,
    /// `use` notices not yet released.
    pub uses: u64,
}

impl Record {
    /// The record of `layer` looked up at `path`, not used yet.
    pub fn new(path: &LayerPath, layer: &IndexLayer) -> Self {
        Self {
            reference: path.reference.clone(),
            key: path.key,
            layer: layer.digest,
            size: layer.size,
            location: layer.location.clone(),
            toc: layer.toc,
            uses: 0,
        }
    }

    /// The index layer as recorded.
    pub fn index_layer(&self) -> IndexLayer {
        IndexLayer {
            digest: self.layer,
            size: self.size,
            location: self.location.clone(),
            toc: self.toc,
            toc_conflict: false,
        }
    }

    /// Where containers/storage finds it.
    pub fn path(&self) -> LayerPath {
        LayerPath { reference: self.reference.clone(), key: self.key }
    }
}

fn table_key(path: &LayerPath) -> String {
    // A reference never holds a newline (the reference grammar refuses it).
    format!("{}\n{}", path.reference, path.key)
}

/// The records file.
#[derive(Debug)]
pub struct Records(metadata::records::Records);

fn store_err(e: metadata::records::RecordsError) -> StoreError {
    StoreError::Records(e)
}

impl Records {
    /// Opens (or creates, readable by its owner only) the records at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        metadata::records::Records::open(path, "layers").map(Self).map_err(store_err)
    }

    /// Every record.
    pub fn list(&self) -> Result<Vec<Record>, StoreError> {
        self.0.list().map_err(store_err)
    }

    /// The record of `path`, if any.
    pub fn get(&self, path: &LayerPath) -> Result<Option<Record>, StoreError> {
        self.0.get(&table_key(path)).map_err(store_err)
    }

    /// Changes the use count of `path` by `change` in one transaction (creating its
    /// record from `fresh` when there is none, removing it at zero); returns the new
    /// count. A release of a layer nobody uses stays at zero.
    pub fn count(&self, path: &LayerPath, fresh: impl FnOnce() -> Record, change: i64) -> Result<u64, StoreError> {
        let updated = self
            .0
            .update(&table_key(path), |old: Option<Record>| {
                let mut record = old.unwrap_or_else(fresh);
                record.uses = record.uses.saturating_add_signed(change);
                (record.uses > 0).then_some(record)
            })
            .map_err(store_err)?;
        Ok(updated.map_or(0, |r| r.uses))
    }
}
