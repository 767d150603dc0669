//! The layer store's durable records: which layers containers/storage uses, and how
//! many times, so that a restart serves the same paths again and releases stay
//! balanced. One redb table, one write transaction per change.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{LayerPath, StoreError};
use crate::companion::IndexLayer;
use crate::modelpack::Digest;

const LAYERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("layers");

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
pub struct Records {
    db: Database,
}

fn store_err<E: Into<redb::Error>>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Records { what, detail: e.into().to_string() }
}

impl Records {
    /// Opens (or creates, readable by its owner only) the records at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        crate::metadata::make_private(path)
            .map_err(|e| StoreError::Records { what: "securing the records file", detail: e.to_string() })?;
        let db = Database::create(path).map_err(store_err("opening the records"))?;
        let txn = db.begin_write().map_err(store_err("opening the records"))?;
        txn.open_table(LAYERS).map_err(store_err("opening the records"))?;
        txn.commit().map_err(store_err("opening the records"))?;
        Ok(Self { db })
    }

    /// Every record.
    pub fn list(&self) -> Result<Vec<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err("reading the records"))?;
        let table = txn.open_table(LAYERS).map_err(store_err("reading the records"))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(store_err("reading the records"))? {
            let (key, value) = row.map_err(store_err("reading the records"))?;
            match serde_json::from_slice::<Record>(value.value()) {
                Ok(record) => out.push(record),
                Err(e) => tracing::error!(record = key.value(), error = %e, "unreadable layer store record; skipped"),
            }
        }
        Ok(out)
    }

    /// The record of `path`, if any.
    pub fn get(&self, path: &LayerPath) -> Result<Option<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err("reading the records"))?;
        let table = txn.open_table(LAYERS).map_err(store_err("reading the records"))?;
        let value = table.get(table_key(path).as_str()).map_err(store_err("reading the records"))?;
        Ok(value.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Changes the use count of `path` by `change` in one transaction (creating its
    /// record from `fresh` when there is none, removing it at zero); returns the new
    /// count. A release of a layer nobody uses stays at zero.
    pub fn count(&self, path: &LayerPath, fresh: impl FnOnce() -> Record, change: i64) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(store_err("writing the records"))?;
        let uses = {
            let mut table = txn.open_table(LAYERS).map_err(store_err("writing the records"))?;
            let key = table_key(path);
            let found = table.get(key.as_str()).map_err(store_err("writing the records"))?.map(|v| v.value().to_vec());
            let mut record = match found.and_then(|v| serde_json::from_slice::<Record>(&v).ok()) {
                Some(record) => record,
                None => fresh(),
            };
            record.uses = record.uses.saturating_add_signed(change);
            if record.uses == 0 {
                table.remove(key.as_str()).map_err(store_err("writing the records"))?;
            } else {
                let json = serde_json::to_vec(&record).expect("records serialize");
                table.insert(key.as_str(), json.as_slice()).map_err(store_err("writing the records"))?;
            }
            record.uses
        };
        txn.commit().map_err(store_err("writing the records"))?;
        Ok(uses)
    }
}
