//! A small durable table of JSON records by string key, in a redb file of its own,
//! readable by its owner only: the front-ends' records that must outlive a restart (the
//! layer store's use counts, the CSI plugin's published volumes). Every change is one
//! write transaction.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why the records could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("records {path}: {what}: {detail}")]
pub struct RecordsError {
    path: String,
    what: &'static str,
    detail: String,
}

fn table(name: &'static str) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// The table.
#[derive(Debug)]
pub struct Records {
    db: Database,
    name: &'static str,
    path: String,
}

impl Records {
    /// Opens (or creates, mode 0600) the file at `path` with its table `name`.
    pub fn open(path: &Path, name: &'static str) -> Result<Self, RecordsError> {
        let shown = path.display().to_string();
        let err = |what| {
            let shown = shown.clone();
            move |e: redb::Error| RecordsError { path: shown, what, detail: e.to_string() }
        };
        super::make_private(path).map_err(|e| err("securing the file")(e.into()))?;
        let db = Database::create(path).map_err(|e| err("opening")(e.into()))?;
        let txn = db.begin_write().map_err(|e| err("opening")(e.into()))?;
        txn.open_table(table(name)).map_err(|e| err("opening")(e.into()))?;
        txn.commit().map_err(|e| err("opening")(e.into()))?;
        Ok(Self { db, name, path: shown })
    }

    fn err<E: Into<redb::Error>>(&self, what: &'static str) -> impl FnOnce(E) -> RecordsError + '_ {
        move |e| RecordsError { path: self.path.clone(), what, detail: e.into().to_string() }
    }

    /// Every record that parses (one that does not is logged and skipped).
    pub fn list<T: DeserializeOwned>(&self) -> Result<Vec<T>, RecordsError> {
        let txn = self.db.begin_read().map_err(self.err("reading"))?;
        let table = txn.open_table(table(self.name)).map_err(self.err("reading"))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(self.err("reading"))? {
            let (key, value) = row.map_err(self.err("reading"))?;
            match serde_json::from_slice(value.value()) {
                Ok(record) => out.push(record),
                Err(e) => {
                    tracing::error!(path = %self.path, record = key.value(), error = %e, "unreadable record; skipped")
                }
            }
        }
        Ok(out)
    }

    /// The record at `key`, if any (and if it parses).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, RecordsError> {
        let txn = self.db.begin_read().map_err(self.err("reading"))?;
        let table = txn.open_table(table(self.name)).map_err(self.err("reading"))?;
        let value = table.get(key).map_err(self.err("reading"))?;
        Ok(value.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Replaces the record at `key` by what `change` makes of it (`None`: removed), in one
    /// transaction; returns the new record.
    pub fn update<T: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        change: impl FnOnce(Option<T>) -> Option<T>,
    ) -> Result<Option<T>, RecordsError> {
        let txn = self.db.begin_write().map_err(self.err("writing"))?;
        let new = {
            let mut table = txn.open_table(table(self.name)).map_err(self.err("writing"))?;
            let old = table.get(key).map_err(self.err("writing"))?.map(|v| v.value().to_vec());
            let new = change(old.and_then(|v| serde_json::from_slice(&v).ok()));
            match &new {
                Some(record) => {
                    let json = serde_json::to_vec(record).expect("records serialize");
                    table.insert(key, json.as_slice()).map_err(self.err("writing"))?;
                }
                None => {
                    table.remove(key).map_err(self.err("writing"))?;
                }
            }
            new
        };
        txn.commit().map_err(self.err("writing"))?;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_update_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let records = Records::open(&path, "things").unwrap();
            assert_eq!(records.update("a", |old: Option<u32>| Some(old.unwrap_or(0) + 1)).unwrap(), Some(1));
            assert_eq!(records.update("a", |old: Option<u32>| Some(old.unwrap_or(0) + 1)).unwrap(), Some(2));
            records.update("b", |_: Option<u32>| Some(7)).unwrap();
        }
        let records = Records::open(&path, "things").unwrap();
        assert_eq!(records.get::<u32>("a").unwrap(), Some(2));
        let mut all: Vec<u32> = records.list().unwrap();
        all.sort();
        assert_eq!(all, [2, 7]);
        records.update("a", |_: Option<u32>| None).unwrap();
        assert_eq!(records.get::<u32>("a").unwrap(), None);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
