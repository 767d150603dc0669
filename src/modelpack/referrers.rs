//! Referrers lists (OCI distribution spec 1.1): the image index a registry's referrers
//! API answers for a manifest digest, or that clients keep under the **referrers tag**
//! `sha256-<hex>` on registries without that API. Each entry is a descriptor of a
//! manifest or index whose `subject` is that digest, with the `artifactType` the spec
//! assigns: the manifest's own, else its config's media type; omitted for an index
//! without one.
//!
//! Anyone who can push to a repository can list anything here, so a list only names
//! candidates: [`crate::companion`] fetches each one and checks it before it counts.
//! Parsing is bounded in bytes and entries; entries this build does not understand are
//! kept as they are, so that writing a list back loses nothing another client put there.

use serde_json::{json, Map, Value};

use super::digest::Digest;
use super::media;

/// The largest referrers list accepted (the manifest size registries must accept).
pub const MAX_REFERRERS_BYTES: usize = 4 << 20;
/// The most entries a referrers list may have.
pub const MAX_REFERRERS: usize = 10_000;

/// Why a referrers list is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ReferrersError {
    /// Larger than [`MAX_REFERRERS_BYTES`].
    #[error("referrers list of {0} bytes exceeds the {MAX_REFERRERS_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not JSON, or not an image index (the spec says to treat the tag as broken then).
    #[error("referrers list is not an image index: {0}")]
    NotAnIndex(String),
    /// More than [`MAX_REFERRERS`] entries.
    #[error("referrers list has {0} entries, more than the {MAX_REFERRERS} accepted")]
    TooMany(usize),
}

/// The referrers tag of `subject`: its algorithm, `-`, and its hex digits.
pub fn referrers_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// One entry of a referrers list that this build understands: a sha256 digest, a media
/// type and a size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    /// The referrer's media type (an image manifest or index).
    pub media_type: String,
    /// The referrer's digest.
    pub digest: Digest,
    /// The referrer's size in bytes.
    pub size: u64,
    /// Its artifact type, when the list gives one.
    pub artifact_type: Option<String>,
}

impl Referrer {
    /// The descriptor as a referrers list holds it.
    fn to_value(&self) -> Value {
        let mut entry = json!({
            "mediaType": self.media_type,
            "digest": self.digest.to_string(),
            "size": self.size,
        });
        if let Some(artifact_type) = &self.artifact_type {
            entry["artifactType"] = json!(artifact_type);
        }
        entry
    }

    fn from_value(entry: &Value) -> Option<Self> {
        Some(Self {
            media_type: entry["mediaType"].as_str()?.to_owned(),
            digest: entry["digest"].as_str()?.parse().ok()?,
            size: entry["size"].as_u64()?,
            artifact_type: entry["artifactType"].as_str().map(str::to_owned),
        })
    }

    /// Whether this entry may be a companion image (see [`crate::convert`]): an OCI
    /// image index (which has no artifact type), or an OCI image manifest whose artifact
    /// type is an image config's. Signatures, SBOMs and other artifacts are not.
    pub fn may_be_companion(&self) -> bool {
        match self.media_type.as_str() {
            media::OCI_INDEX => self.artifact_type.is_none(),
            media::OCI_MANIFEST => self.artifact_type.as_deref().is_none_or(|t| t == media::OCI_IMAGE_CONFIG),
            _ => false,
        }
    }
}

/// A parsed referrers list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReferrersList {
    /// Every entry as listed, for writing the list back unchanged.
    entries: Vec<Value>,
    /// The entries this build understands, in list order.
    referrers: Vec<Referrer>,
}

impl ReferrersList {
    /// A list with no entries (the spec's start when the tag does not exist yet).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses a referrers list, bounded by [`MAX_REFERRERS_BYTES`] and [`MAX_REFERRERS`].
    pub fn parse(bytes: &[u8]) -> Result<Self, ReferrersError> {
        if bytes.len() > MAX_REFERRERS_BYTES {
            return Err(ReferrersError::TooLarge(bytes.len()));
        }
        let not_index = |why: &str| ReferrersError::NotAnIndex(why.to_owned());
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ReferrersError::NotAnIndex(e.to_string()))?;
        let top = value.as_object().ok_or_else(|| not_index("not a JSON object"))?;
        match top.get("schemaVersion") {
            None => {}
            Some(v) if v.as_u64() == Some(2) => {}
            Some(v) => return Err(ReferrersError::NotAnIndex(format!("schemaVersion {v}"))),
        }
        match top.get("mediaType") {
            None => {}
            Some(Value::String(t)) if t == media::OCI_INDEX => {}
            Some(t) => return Err(ReferrersError::NotAnIndex(format!("media type {t}"))),
        }
        let entries = match top.get("manifests") {
            Some(Value::Array(entries)) => entries,
            None if top.contains_key("layers") || top.contains_key("config") => {
                return Err(not_index("an image manifest"));
            }
            _ => return Err(not_index("no manifests array")),
        };
        if entries.len() > MAX_REFERRERS {
            return Err(ReferrersError::TooMany(entries.len()));
        }
        let entries: Vec<Value> = entries.iter().filter(|e| e.is_object()).cloned().collect();
        let referrers = entries.iter().filter_map(Referrer::from_value).collect();
        Ok(Self { entries, referrers })
    }

    /// The entries this build understands, in list order.
    pub fn referrers(&self) -> &[Referrer] {
        &self.referrers
    }

    /// How many entries the list has, understood or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends each of `new` whose digest is not listed yet, in order; says whether any
    /// was added. Fails rather than grow past [`MAX_REFERRERS`].
    pub fn add(&mut self, new: &[Referrer]) -> Result<bool, ReferrersError> {
        let mut added = false;
        for referrer in new {
            let digest = referrer.digest.to_string();
            if self.entries.iter().any(|e| e["digest"].as_str() == Some(digest.as_str())) {
                continue;
            }
            if self.entries.len() == MAX_REFERRERS {
                return Err(ReferrersError::TooMany(MAX_REFERRERS + 1));
            }
            self.entries.push(referrer.to_value());
            self.referrers.push(referrer.clone());
            added = true;
        }
        Ok(added)
    }

    /// The list as an image index, ready to push under the referrers tag.
    pub fn to_json(&self) -> Vec<u8> {
        let mut top = Map::new();
        top.insert("schemaVersion".into(), json!(2));
        top.insert("mediaType".into(), json!(media::OCI_INDEX));
        top.insert("manifests".into(), Value::Array(self.entries.clone()));
        serde_json::to_vec(&Value::Object(top)).expect("a JSON value serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn referrer(n: u8, media_type: &str, artifact_type: Option<&str>) -> Referrer {
        Referrer {
            media_type: media_type.to_owned(),
            digest: Digest::of(&[n]),
            size: 100 + u64::from(n),
            artifact_type: artifact_type.map(str::to_owned),
        }
    }

    #[test]
    fn the_tag_is_the_digest_with_a_dash() {
        let d = Digest::of(b"m");
        assert_eq!(referrers_tag(&d), format!("sha256-{}", d.hex()));
        assert_eq!(referrers_tag(&d).len(), 71, "a valid tag: at most 128 characters");
    }

    #[test]
    fn a_list_reads_back_what_was_written() {
        let mut list = ReferrersList::empty();
        let new =
            [referrer(1, media::OCI_INDEX, None), referrer(2, media::OCI_MANIFEST, Some(media::OCI_IMAGE_CONFIG))];
        assert!(list.add(&new).unwrap());
        let again = ReferrersList::parse(&list.to_json()).unwrap();
        assert_eq!(again.referrers(), &new);
        assert_eq!(again, list);
    }

    #[test]
    fn adding_twice_adds_nothing() {
        let mut list = ReferrersList::empty();
        let new = [referrer(1, media::OCI_INDEX, None)];
        assert!(list.add(&new).unwrap());
        let json = list.to_json();
        assert!(!list.add(&new).unwrap());
        assert!(!list.add(&new).unwrap());
        assert_eq!(list.len(), 1);
        assert_eq!(list.to_json(), json, "unchanged, byte for byte");
    }

    #[test]
    fn entries_of_other_clients_are_kept_as_they_are() {
        let other = json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha512:abcd",
            "size": 12,
            "artifactType": "application/vnd.example.signature.v1",
            "annotations": { "org.example": "kept" },
        });
        let text = json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": [other] });
        let mut list = ReferrersList::parse(&serde_json::to_vec(&text).unwrap()).unwrap();
        assert!(list.referrers().is_empty(), "a sha512 entry is not understood");
        list.add(&[referrer(1, media::OCI_INDEX, None)]).unwrap();
        let written: Value = serde_json::from_slice(&list.to_json()).unwrap();
        assert_eq!(written["manifests"][0], other);
        assert_eq!(written["manifests"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn what_is_not_an_index_is_refused() {
        let manifest = json!({ "schemaVersion": 2, "mediaType": media::OCI_MANIFEST, "config": {}, "layers": [] });
        for bad in [
            serde_json::to_vec(&manifest).unwrap(),
            br#"{"schemaVersion":2,"config":{},"layers":[]}"#.to_vec(),
            br#"{"schemaVersion":1,"manifests":[]}"#.to_vec(),
            br#"{"manifests":{}}"#.to_vec(),
            b"[]".to_vec(),
            b"not json".to_vec(),
        ] {
            let e = ReferrersList::parse(&bad).unwrap_err();
            assert!(matches!(e, ReferrersError::NotAnIndex(_)), "{e}");
        }
        assert!(ReferrersList::parse(br#"{"manifests":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn lists_are_bounded() {
        let entry = referrer(1, media::OCI_INDEX, None).to_value();
        let many = json!({ "schemaVersion": 2, "manifests": vec![entry; MAX_REFERRERS + 1] });
        let e = ReferrersList::parse(&serde_json::to_vec(&many).unwrap()).unwrap_err();
        assert!(matches!(e, ReferrersError::TooMany(n) if n == MAX_REFERRERS + 1), "{e}");
        let big = vec![b' '; MAX_REFERRERS_BYTES + 1];
        assert!(matches!(ReferrersList::parse(&big), Err(ReferrersError::TooLarge(_))));

        let mut full = ReferrersList::empty();
        let new: Vec<Referrer> = (0..MAX_REFERRERS)
            .map(|n| Referrer { digest: Digest::of(&(n as u64).to_le_bytes()), ..referrer(0, media::OCI_INDEX, None) })
            .collect();
        assert!(full.add(&new).unwrap());
        assert!(full.add(&[referrer(1, media::OCI_INDEX, None)]).is_err(), "never past the bound");
    }

    #[test]
    fn only_images_may_be_companions() {
        assert!(referrer(1, media::OCI_INDEX, None).may_be_companion());
        assert!(referrer(1, media::OCI_MANIFEST, Some(media::OCI_IMAGE_CONFIG)).may_be_companion());
        assert!(referrer(1, media::OCI_MANIFEST, None).may_be_companion(), "a list that omits it");
        assert!(!referrer(1, media::OCI_MANIFEST, Some("application/vnd.example.sbom.v1")).may_be_companion());
        assert!(!referrer(1, media::OCI_INDEX, Some("application/vnd.example.sbom.v1")).may_be_companion());
        assert!(!referrer(1, media::DOCKER_MANIFEST, None).may_be_companion());
    }

    #[test]
    fn malformed_entries_are_not_understood() {
        let text = br#"{"manifests":[1,"x",{"mediaType":"m","digest":"sha256:12","size":1},{"digest":"sha256:12"},
            {"mediaType":"m","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":-1}]}"#;
        let list = ReferrersList::parse(text).unwrap();
        assert!(list.referrers().is_empty());
        assert_eq!(list.len(), 3, "objects are kept, other values dropped");
    }
}
