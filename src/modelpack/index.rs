//! The lazy index: what `convert` publishes inside a companion image so that a
//! snapshotter can serve a model without trusting the registry's bytes blindly.
//!
//! It carries the source ModelPack manifest and config verbatim (so their digests can be
//! checked), the sha256 of every fixed-size chunk of every layer blob, and the list of
//! files (for people and tools; the snapshotter rebuilds the tree from the manifest).
//! The format is versioned JSON; `docs/lazy-index.md` describes it. Parsing checks every
//! digest, size and count before anything uses them.

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::manifest::{self, ManifestError, ModelArtifact};

/// The only format version this build reads and writes.
pub const INDEX_VERSION: u32 = 1;
/// The index's path inside the companion layer's tar.
pub const INDEX_PATH: &str = ".modelpack/index.json";
/// Smallest and largest chunk sizes an index may declare.
pub const MIN_CHUNK_SIZE: u64 = 4096;
/// See [`MIN_CHUNK_SIZE`].
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// The largest index accepted, against a hostile companion.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

/// Why an index is unusable.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Not JSON of the expected shape.
    #[error("lazy index is malformed: {0}")]
    Malformed(String),
    /// Written by a newer (or unknown) format.
    #[error("lazy index version {0} is not supported (this build reads version {INDEX_VERSION})")]
    Version(u32),
    /// The embedded manifest does not hash to the source digest it claims.
    #[error("lazy index manifest does not match source digest {0}")]
    ManifestDigest(Digest),
    /// The embedded config does not match the manifest's config descriptor.
    #[error("lazy index config does not match the manifest's config {0}")]
    ConfigDigest(Digest),
    /// The embedded manifest is not a ModelPack manifest.
    #[error("lazy index: {0}")]
    Manifest(#[from] ManifestError),
    /// Chunk size out of range.
    #[error("lazy index chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(u64),
    /// The blobs do not correspond to the manifest's layers, or their chunk lists do not
    /// fit their sizes.
    #[error("lazy index blob {index} ({digest}): {reason}")]
    Blob { index: usize, digest: String, reason: String },
}

/// Where the model came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexSource {
    /// The source reference, pinned by digest (`registry/repo@sha256:...`).
    pub reference: String,
    /// The ModelPack manifest's digest.
    pub manifest_digest: String,
}

/// Chunk digests of one layer blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexBlob {
    /// The blob's digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// sha256 of each `chunkSize` piece, in order (the last may be shorter).
    pub chunks: Vec<String>,
}

/// One file of the model tree, for reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexFile {
    /// Path in the model.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Permission bits as served.
    pub mode: u32,
    /// Size in bytes (files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Index of the layer holding the bytes (files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    /// Offset of the bytes in the layer's (uncompressed) blob (files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// Link target (symlinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The serialized form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LazyIndex {
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// Where the model came from.
    pub source: IndexSource,
    /// The ModelPack manifest, byte for byte.
    pub manifest: String,
    /// The model config blob, byte for byte.
    pub config: String,
    /// Bytes per digested chunk.
    pub chunk_size: u64,
    /// One entry per manifest layer, in manifest order.
    pub blobs: Vec<IndexBlob>,
    /// Every file, directory and symlink of the model tree.
    pub files: Vec<IndexFile>,
    /// What of the model a node fetches in the background once it serves it (`convert
    /// --prefetch`), in place of the node's own `cache.prefetch`; a CSI volume attribute
    /// overrides it. Parsed strictly: a malformed value makes the whole index malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<crate::config::PrefetchPolicy>,
}

/// Chunk digests of one blob, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkDigests {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// One digest per chunk.
    pub digests: Vec<Digest>,
}

/// A parsed, checked index.
#[derive(Debug, Clone)]
pub struct VerifiedIndex {
    /// The sha256 of the JSON it was parsed from: the index's identity, under which its
    /// readers vouch for the chunks its digests checked.
    pub digest: Digest,
    /// The raw form.
    pub index: LazyIndex,
    /// The source manifest digest.
    pub manifest_digest: Digest,
    /// The parsed source manifest.
    pub artifact: ModelArtifact,
    /// Chunk digests per layer, in layer order.
    pub chunks: Vec<ChunkDigests>,
}

fn blob_err(index: usize, digest: &str, reason: impl Into<String>) -> IndexError {
    IndexError::Blob { index, digest: digest.to_owned(), reason: reason.into() }
}

impl LazyIndex {
    /// Deterministic JSON: the same model gives the same bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("index serializes")
    }

    /// Parses and checks an index: version, manifest and config digests, one blob per
    /// layer with matching digest and size, chunk counts that fit the sizes.
    pub fn parse(bytes: &[u8]) -> Result<VerifiedIndex, IndexError> {
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            return Err(IndexError::Malformed(format!(
                "{} bytes exceeds the {MAX_INDEX_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let index: LazyIndex = serde_json::from_slice(bytes).map_err(|e| IndexError::Malformed(e.to_string()))?;
        if index.version != INDEX_VERSION {
            return Err(IndexError::Version(index.version));
        }
        let manifest_digest: Digest = index
            .source
            .manifest_digest
            .parse()
            .map_err(|e: super::digest::DigestError| IndexError::Malformed(e.to_string()))?;
        if Digest::of(index.manifest.as_bytes()) != manifest_digest {
            return Err(IndexError::ManifestDigest(manifest_digest));
        }
        let artifact = manifest::parse_manifest(index.manifest.as_bytes())?;
        if Digest::of(index.config.as_bytes()) != artifact.config.digest {
            return Err(IndexError::ConfigDigest(artifact.config.digest));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&index.chunk_size) {
            return Err(IndexError::ChunkSize(index.chunk_size));
        }
        if index.blobs.len() != artifact.layers.len() {
            return Err(IndexError::Malformed(format!(
                "{} blobs for {} manifest layers",
                index.blobs.len(),
                artifact.layers.len()
            )));
        }
        let mut chunks = Vec::with_capacity(index.blobs.len());
        for (i, (blob, layer)) in index.blobs.iter().zip(&artifact.layers).enumerate() {
            if blob.digest != layer.digest.to_string() || blob.size != layer.size {
                return Err(blob_err(
                    i,
                    &blob.digest,
                    format!("does not match manifest layer {} of {} bytes", layer.digest, layer.size),
                ));
            }
            let expected = blob.size.div_ceil(index.chunk_size);
            if blob.chunks.len() as u64 != expected {
                return Err(blob_err(
                    i,
                    &blob.digest,
                    format!("has {} chunk digests, {expected} expected", blob.chunks.len()),
                ));
            }
            let digests = blob
                .chunks
                .iter()
                .map(|c| c.parse::<Digest>().map_err(|e| blob_err(i, &blob.digest, e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            chunks.push(ChunkDigests { chunk_size: index.chunk_size, digests });
        }
        Ok(VerifiedIndex { digest: Digest::of(bytes), index, manifest_digest, artifact, chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LazyIndex {
        let data = vec![7u8; 10_000];
        let config = r#"{"modelfs":{"type":"layers","diffIds":[]}}"#.to_owned();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.cncf.model.manifest.v1+json",
            "config": {"mediaType": "application/vnd.cncf.model.config.v1+json", "digest": Digest::of(config.as_bytes()).to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw", "digest": Digest::of(&data).to_string(), "size": data.len(),
                        "annotations": {"org.cncf.model.filepath": "w.bin"}}],
        })
        .to_string();
        LazyIndex {
            version: INDEX_VERSION,
            source: IndexSource {
                reference: "r/m@x".into(),
                manifest_digest: Digest::of(manifest.as_bytes()).to_string(),
            },
            manifest,
            config,
            chunk_size: 4096,
            blobs: vec![IndexBlob {
                digest: Digest::of(&data).to_string(),
                size: data.len() as u64,
                chunks: data.chunks(4096).map(|c| Digest::of(c).to_string()).collect(),
            }],
            files: vec![IndexFile {
                path: "w.bin".into(),
                kind: "file".into(),
                mode: 0o444,
                size: 10_000,
                layer: Some(0),
                offset: 0,
                target: None,
            }],
            prefetch: None,
        }
    }

    #[test]
    fn round_trips() {
        let index = sample();
        let verified = LazyIndex::parse(&index.to_json()).unwrap();
        assert_eq!(verified.index, index);
        assert_eq!(verified.chunks[0].digests.len(), 3);
        assert_eq!(verified.artifact.layers.len(), 1);
    }

    #[test]
    fn refuses_inconsistent_indexes() {
        let mut i = sample();
        i.version = 2;
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::Version(2))));
        let mut i = sample();
        i.manifest.push(' ');
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::ManifestDigest(_))));
        let mut i = sample();
        i.config.push(' ');
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::ConfigDigest(_))));
        let mut i = sample();
        i.blobs[0].chunks.pop();
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::Blob { .. })));
        let mut i = sample();
        i.blobs[0].size += 1;
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::Blob { .. })));
        let mut i = sample();
        i.chunk_size = 1;
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::ChunkSize(1))));
        assert!(matches!(LazyIndex::parse(b"{\"version\":1}"), Err(IndexError::Malformed(_))));
    }

    #[test]
    fn carries_a_prefetch_policy_or_none() {
        use crate::config::PrefetchPolicy;
        let json = String::from_utf8(sample().to_json()).unwrap();
        assert!(!json.contains("prefetch"), "absent unless set: {json}");
        let mut i = sample();
        i.prefetch = Some(PrefetchPolicy::Head(64 << 20));
        let json = String::from_utf8(i.to_json()).unwrap();
        assert!(json.contains(r#""prefetch":"head:64MiB""#), "{json}");
        assert_eq!(LazyIndex::parse(json.as_bytes()).unwrap().index.prefetch, Some(PrefetchPolicy::Head(64 << 20)));
        let bad = json.replace("head:64MiB", "head:lots");
        let e = LazyIndex::parse(bad.as_bytes()).unwrap_err();
        assert!(matches!(e, IndexError::Malformed(_)) && e.to_string().contains(r#""head:lots""#), "{e}");
    }
}
