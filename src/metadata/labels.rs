//! Label rules shared by every write: containerd's size limit, bounds on how many labels
//! one snapshot carries, and the field paths an update may name.

use std::collections::BTreeMap;

use super::MetadataError;

/// The most bytes a label's key and value may hold together, as containerd enforces.
pub const MAX_LABEL_SIZE: usize = 4096;
/// The most labels one snapshot may carry. containerd passes a handful (the chain ID and
/// the `containerd.io/snapshot/cri.*` labels); the bound keeps a client from growing one
/// record, and every read of it, without limit.
pub const MAX_LABELS: usize = 256;
/// The most bytes all labels of one snapshot may hold together (keys and values): room
/// for 64 labels of the largest size.
pub const MAX_LABELS_SIZE: usize = 64 * MAX_LABEL_SIZE;

/// Checks labels against containerd's rules and this store's bounds, naming the first
/// key that breaks one. Labels with an empty value are not counted: they are never
/// stored.
pub fn check(labels: &BTreeMap<String, String>) -> Result<(), MetadataError> {
    let (mut count, mut total) = (0usize, 0usize);
    for (key, value) in labels.iter().filter(|(_, value)| !value.is_empty()) {
        let invalid = |reason: String| MetadataError::InvalidLabel { key: key.clone(), reason };
        if key.is_empty() {
            return Err(invalid("label key is empty".to_owned()));
        }
        let size = key.len() + value.len();
        if size > MAX_LABEL_SIZE {
            return Err(invalid(format!("key and value hold {size} bytes, more than the {MAX_LABEL_SIZE} allowed")));
        }
        count += 1;
        total += size;
        if count > MAX_LABELS {
            return Err(invalid(format!("a snapshot carries at most {MAX_LABELS} labels")));
        }
        if total > MAX_LABELS_SIZE {
            return Err(invalid(format!("a snapshot's labels hold at most {MAX_LABELS_SIZE} bytes together")));
        }
    }
    Ok(())
}

/// Checks every label and drops those with an empty value.
///
/// containerd never stores an empty label value (setting one removes the label), so the
/// store does the same: a client sees identical label semantics from this snapshotter and
/// from containerd's built-in ones.
pub(super) fn checked(mut labels: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, MetadataError> {
    labels.retain(|_, value| !value.is_empty());
    check(&labels)?;
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
