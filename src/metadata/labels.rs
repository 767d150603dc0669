//! Label rules shared by every write: containerd's size limit, and the field paths an
//! update may name.

use std::collections::BTreeMap;

use super::MetadataError;

/// The most bytes a label's key and value may hold together, as containerd enforces.
pub const MAX_LABEL_SIZE: usize = 4096;

/// Checks every label and drops those with an empty value.
///
/// containerd never stores an empty label value (setting one removes the label), so the
/// store does the same: a client sees identical label semantics from this snapshotter and
/// from containerd's built-in ones.
pub(super) fn checked(mut labels: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, MetadataError> {
    labels.retain(|_, value| !value.is_empty());
    for (key, value) in &labels {
        if key.is_empty() {
            return Err(MetadataError::InvalidLabel { key: key.clone(), reason: "label key is empty".to_owned() });
        }
        let size = key.len() + value.len();
        if size > MAX_LABEL_SIZE {
            return Err(MetadataError::InvalidLabel {
                key: key.clone(),
                reason: format!("key and value hold {size} bytes, more than the {MAX_LABEL_SIZE} allowed"),
            });
        }
    }
    Ok(labels)
}

/// One field path of a label update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LabelPath<'a> {
    /// `labels`: the whole set is replaced.
    All,
    /// `labels.<key>`: one label is set, or deleted when the update does not carry it.
    One(&'a str),
}

/// Parses containerd field paths; an empty list means "replace all labels".
pub(super) fn parse_paths(paths: &[String]) -> Result<Vec<LabelPath<'_>>, MetadataError> {
    if paths.is_empty() {
        return Ok(vec![LabelPath::All]);
    }
    paths
        .iter()
        .map(|path| match path.strip_prefix("labels.") {
            Some(key) if !key.is_empty() => Ok(LabelPath::One(key)),
            None if path == "labels" => Ok(LabelPath::All),
            _ => Err(MetadataError::InvalidField { path: path.clone() }),
        })
        .collect()
}

/// Applies parsed paths to `current`, taking new values from `given`.
pub(super) fn apply(current: &mut BTreeMap<String, String>, given: &BTreeMap<String, String>, paths: &[LabelPath<'_>]) {
    for path in paths {
        match *path {
            LabelPath::All => current.clone_from(given),
            LabelPath::One(key) => match given.get(key) {
                Some(value) => {
                    current.insert(key.to_owned(), value.clone());
                }
                None => {
                    current.remove(key);
                }
            },
        }
    }
}
