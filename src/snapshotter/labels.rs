//! The snapshot labels that ask for a model, parsed at the edge. containerd passes the
//! companion layer's `containerd.io/snapshot/modelpack.*` annotations as `Prepare` labels
//! together with `containerd.io/snapshot.ref` (the chain ID to commit).
//!
//! The annotations are the least trusted input here: any image can carry them on any
//! layer. What binds them to the layer is the chain ID. A companion is one uncompressed
//! layer without a parent, so its chain ID is its diff ID, which is the digest of the
//! index layer itself; labels whose chain ID is anything else describe some other layer
//! and are refused. A chain ID therefore only ever serves the model its own bytes name.
//!
//! containerd's CRI plugin also names the image being pulled
//! (`containerd.io/snapshot/cri.image-ref`); it selects which credentials of a CRI pull a
//! model is fetched with, never what is served, and those credentials go to that image's
//! registry alone (see [`crate::registry::credentials::keychain`]).

use std::collections::BTreeMap;

use crate::modelpack::index::READABLE_VERSIONS;
use crate::modelpack::labels::{self as keys, Pinned, PREFIX as MODELPACK_PREFIX};
use crate::registry::credentials::keychain::ImageKey;

/// containerd's label naming the chain ID a remote snapshotter should commit.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// containerd's CRI label naming the image being pulled, normalised
/// (`docker.io/library/busybox:latest`).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";

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
    /// The chain ID is not the one the index layer yields: the labels came with some
    /// other layer.
    #[error(
        "label {SNAPSHOT_REF:?} = {chain_id:?} does not match label {:?}: a companion layer's chain ID is its index layer's digest {index}",
        keys::INDEX
    )]
    ChainId { chain_id: String, index: String },
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
    // The index itself is authoritative (it is parsed and checked when mounted); the
    // label only lets a newer format be refused before anything is fetched.
    if !READABLE_VERSIONS.iter().any(|v| v.to_string() == *version) {
        return Err(LabelError::Invalid {
            key: keys::VERSION,
            value: version.clone(),
            reason: format!("this build reads versions {READABLE_VERSIONS:?}"),
        });
    }
    let chain_id = get(SNAPSHOT_REF)?;
    if chain_id.is_empty() {
        return Err(LabelError::Invalid { key: SNAPSHOT_REF, value: String::new(), reason: "is empty".to_owned() });
    }
    let source = pinned(keys::SOURCE, get(keys::SOURCE)?)?;
    let index = pinned(keys::INDEX, get(keys::INDEX)?)?;
    if *chain_id != index.digest.to_string() {
        return Err(LabelError::ChainId { chain_id: chain_id.clone(), index: index.digest.to_string() });
    }
    Ok(Some(ModelLabels { chain_id: chain_id.clone(), source, index }))
}

/// The image `labels` say is being pulled, if they name one that parses.
pub fn image_ref(labels: &BTreeMap<String, String>) -> Option<ImageKey> {
    let value = labels.get(CRI_IMAGE_REF)?;
    ImageKey::parse(value)
        .inspect_err(|e| tracing::debug!(label = CRI_IMAGE_REF, error = %e, "unusable image label"))
        .ok()
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
            (CRI_IMAGE_REF, "127.0.0.1:5000/models/m:v1-lazy".to_owned()),
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
        assert_eq!(image_ref(&good()), ImageKey::parse("127.0.0.1:5000/models/m:v1-lazy").ok());
        assert_eq!(image_ref(&plain), None);
        let odd: BTreeMap<String, String> = [(CRI_IMAGE_REF.to_owned(), "Not An Image".to_owned())].into();
        assert_eq!(image_ref(&odd), None);
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
        for version in ["3", "0", "02", " 2", ""] {
            let mut l = good();
            l.insert(keys::VERSION.into(), version.into());
            assert!(matches!(model_labels(&l), Err(LabelError::Invalid { key: keys::VERSION, .. })), "{version:?}");
        }
        let mut l = good();
        l.insert(keys::VERSION.into(), "2".into());
        assert!(model_labels(&l).unwrap().is_some(), "both formats are read");
    }

    #[test]
    fn the_chain_id_must_be_the_index_layers_digest() {
        // The attack: a layer with the honest companion's bytes (so its chain ID) whose
        // annotations name another index.
        let mut l = good();
        l.insert(keys::INDEX.into(), format!("127.0.0.1:5000/evil/m@{}", Digest::of(b"forged index")));
        let e = model_labels(&l).unwrap_err();
        assert!(matches!(e, LabelError::ChainId { .. }), "{e}");
        let message = e.to_string();
        assert!(message.contains(SNAPSHOT_REF) && message.contains(keys::INDEX), "{message}");
        assert!(message.contains(&Digest::of(b"forged index").to_string()), "{message}");
        let mut l = good();
        l.insert(SNAPSHOT_REF.into(), "sha256:chain".into());
        assert!(matches!(model_labels(&l), Err(LabelError::ChainId { .. })));
    }

    /// Deterministic pseudo-random strings built from the pieces a reference is made of.
    fn garbage(seed: u64, n: usize) -> Vec<String> {
        let long = "x".repeat(300);
        let pieces = [
            "@",
            ":",
            "/",
            "sha256:",
            "sha512:",
            "127.0.0.1",
            ":5000",
            "a",
            "A",
            "-",
            "_",
            ".",
            "..",
            "%",
            "\u{0}",
            "\u{e9}",
            "\u{1F600}",
            "0123456789abcdef",
            " ",
            "\n",
            "@@",
            "//",
            "localhost",
            "[::1]",
            &long,
        ];
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                let mut s = String::new();
                for _ in 0..(x % 12) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    s.push_str(pieces[(x % pieces.len() as u64) as usize]);
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s
            })
            .collect()
    }

    #[test]
    fn malformed_labels_never_panic() {
        let sha = Digest::of(b"index layer").to_string();
        for (n, value) in garbage(0x9e37_79b9_7f4a_7c15, 1000).into_iter().enumerate() {
            for key in [keys::SOURCE, keys::INDEX, keys::VERSION, SNAPSHOT_REF] {
                let mut l = good();
                l.insert(key.to_owned(), value.clone());
                let _ = model_labels(&l);
                let mut l = good();
                l.insert(key.to_owned(), format!("{value}@{sha}"));
                let _ = model_labels(&l);
            }
            let _ = Pinned::parse(&value);
            let mut l = good();
            l.insert(format!("{MODELPACK_PREFIX}{value}"), n.to_string());
            let _ = model_labels(&l);
        }
    }
}
