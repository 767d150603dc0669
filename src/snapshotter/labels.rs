//! The snapshot labels that ask for a model, parsed at the edge. containerd passes the
//! companion layer's `containerd.io/snapshot/modelpack.*` annotations as `Prepare` labels
//! together with `containerd.io/snapshot.ref` (the chain ID to commit).

use std::collections::BTreeMap;

use crate::modelpack::index::INDEX_VERSION;
use crate::modelpack::labels::{self as keys, Pinned, PREFIX as MODELPACK_PREFIX};

/// containerd's label naming the chain ID a remote snapshotter should commit.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// Why the labels are unusable; answered with `InvalidArgument`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    /// A label under our prefix that this build does not know.
    #[error("unknown label {0:?}")]
    Unknown(String),
    /// A required label is missing.
    #[error("label {0:?} is required with {MODELPACK_PREFIX}* labels")]
    Missing(&'static str),
    /// A label's value is malformed.
    #[error("label {key:?} = {value:?}: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
}

/// What a model snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLabels {
    /// The chain ID to commit (`containerd.io/snapshot.ref`).
    pub chain_id: String,
    /// The ModelPack artifact.
    pub source: Pinned,
    /// The lazy index layer.
    pub index: Pinned,
}

/// Parses a pinned (`name@sha256:...`) reference held in label `key`.
pub fn pinned(key: &'static str, value: &str) -> Result<Pinned, LabelError> {
    Pinned::parse(value).map_err(|reason| LabelError::Invalid { key, value: value.to_owned(), reason })
}

/// The model request in `labels`, if any. Labels without our prefix are not ours and
/// are ignored; ours must be complete and well-formed.
pub fn model_labels(labels: &BTreeMap<String, String>) -> Result<Option<ModelLabels>, LabelError> {
    let ours: Vec<(&String, &String)> = labels.iter().filter(|(k, _)| k.starts_with(MODELPACK_PREFIX)).collect();
    if ours.is_empty() {
        return Ok(None);
    }
    if let Some((k, _)) = ours.iter().find(|(k, _)| !keys::KEYS.contains(&k.as_str())) {
        return Err(LabelError::Unknown((*k).clone()));
    }
    let get = |key: &'static str| labels.get(key).ok_or(LabelError::Missing(key));
    let version = get(keys::VERSION)?;
    if version != &INDEX_VERSION.to_string() {
        return Err(LabelError::Invalid {
            key: keys::VERSION,
            value: version.clone(),
            reason: format!("this build reads version {INDEX_VERSION}"),
        });
    }
    let chain_id = get(SNAPSHOT_REF)?;
    if chain_id.is_empty() {
        return Err(LabelError::Invalid { key: SNAPSHOT_REF, value: String::new(), reason: "is empty".to_owned() });
    }
    let source = pinned(keys::SOURCE, get(keys::SOURCE)?)?;
    let index = pinned(keys::INDEX, get(keys::INDEX)?)?;
    Ok(Some(ModelLabels { chain_id: chain_id.clone(), source, index }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modelpack::Digest;

    fn good() -> BTreeMap<String, String> {
        let (source, index) = (Digest::of(b"manifest"), Digest::of(b"index layer"));
        [
            (SNAPSHOT_REF, index.to_string()),
            (keys::SOURCE, format!("127.0.0.1:5000/models/m@{source}")),
            (keys::INDEX, format!("127.0.0.1:5000/models/m@{index}")),
            (keys::VERSION, "1".to_owned()),
            ("containerd.io/snapshot/cri.image-ref", "whatever".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    #[test]
    fn parses_complete_labels_and_ignores_others() {
        let m = model_labels(&good()).unwrap().unwrap();
        assert_eq!(m.chain_id, Digest::of(b"index layer").to_string());
        assert_eq!(m.index.digest, Digest::of(b"index layer"));
        assert_eq!(m.source.digest, Digest::of(b"manifest"));
        let plain: BTreeMap<String, String> = [(SNAPSHOT_REF.to_owned(), "x".to_owned())].into();
        assert_eq!(model_labels(&plain).unwrap(), None);
    }

    #[test]
    fn refuses_bad_labels() {
        let mut l = good();
        l.insert("containerd.io/snapshot/modelpack.extra".into(), "1".into());
        assert!(matches!(model_labels(&l), Err(LabelError::Unknown(_))));
        let mut l = good();
        l.remove(SNAPSHOT_REF);
        assert_eq!(model_labels(&l), Err(LabelError::Missing(SNAPSHOT_REF)));
        let mut l = good();
        l.insert(keys::SOURCE.into(), "127.0.0.1:5000/models/m:v1".into());
        assert!(matches!(model_labels(&l), Err(LabelError::Invalid { key: keys::SOURCE, .. })));
        let mut l = good();
        l.insert(keys::VERSION.into(), "2".into());
        assert!(matches!(model_labels(&l), Err(LabelError::Invalid { key: keys::VERSION, .. })));
    }
}
