//! Reading companion images (see [`crate::convert`]): finding the lazy index layer of a
//! companion reference and loading the index from it, with the cache as a fallback so
//! that a model served before is served again while its registry is unreachable.

use std::io::Read;

use bytes::Bytes;

use futures_util::StreamExt;

use crate::cache::ChunkCache;
use crate::config::RegistrySettings;
use crate::modelpack::digest::Hasher;
use crate::modelpack::index::{LazyIndex, VerifiedIndex, INDEX_PATH, MAX_INDEX_BYTES};
use crate::modelpack::labels;
use crate::modelpack::media;
use crate::modelpack::Digest;
use crate::registry::{parse_reference, Registry, RegistryError};

/// Why a companion's index could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The companion or its index is malformed.
    #[error("lazy index {at}: {detail}")]
    Invalid { at: String, detail: String },
}

fn invalid(at: &str, detail: impl Into<String>) -> CompanionError {
    CompanionError::Invalid { at: at.to_owned(), detail: detail.into() }
}

/// Cache record of an index JSON, by the JSON's digest.
pub fn index_key(digest: &Digest) -> String {
    format!("lazy-index:{digest}")
}

/// Cache record naming the index JSON digest of an index layer.
fn layer_key(digest: &Digest) -> String {
    format!("lazy-index-layer:{digest}")
}

/// Cache record of an index layer's blob (its tar), by the blob's digest.
fn layer_blob_key(digest: &Digest) -> String {
    format!("lazy-index-layer-blob:{digest}")
}

/// This machine's OCI architecture name.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The index layer of a companion image, as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexLayer {
    /// The layer blob's digest (its diff ID too: the layer is an uncompressed tar).
    pub digest: Digest,
    /// The layer blob's size.
    pub size: u64,
    /// Where the layer is, pinned (`registry/repo@sha256:...`), from its annotation.
    pub location: String,
    /// The TOC digest its annotation declares (the digest of the index JSON), if any.
    pub toc: Option<Digest>,
    /// Both TOC annotations were set: containers/image refuses such a layer.
    pub toc_conflict: bool,
}

/// If `manifest` (fetched through `registry`) is a companion image or an index of them,
/// its lazy index layer as the manifest (this machine's platform, else the first)
/// describes it. Nothing here is trusted yet: the caller checks the layer's bytes.
pub async fn index_layer(registry: &Registry, manifest: &[u8]) -> Result<Option<IndexLayer>, RegistryError> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(manifest) else { return Ok(None) };
    let is_index = value["mediaType"] == media::OCI_INDEX || value["manifests"].is_array();
    let image = if is_index {
        let entries = value["manifests"].as_array().cloned().unwrap_or_default();
        let pick = entries
            .iter()
            .find(|e| e["platform"]["architecture"] == oci_arch() && e["platform"]["os"] == "linux")
            .or_else(|| entries.first());
        let Some(digest) = pick.and_then(|e| e["digest"].as_str()) else { return Ok(None) };
        let (bytes, _) =
            registry.with_reference(registry.reference().clone_with_digest(digest.to_owned())).fetch_manifest().await?;
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        }
    } else {
        value
    };
    let layer = &image["layers"][0];
    let annotations = &layer["annotations"];
    let Some(location) = annotations[labels::INDEX].as_str() else { return Ok(None) };
    let (Some(digest), Some(size)) = (layer["digest"].as_str().and_then(|d| d.parse().ok()), layer["size"].as_u64())
    else {
        return Ok(None);
    };
    let toc_of = |key: &str| annotations[key].as_str().and_then(|d| d.parse::<Digest>().ok());
    let (stargz, chunked) = (toc_of(labels::TOC_DIGEST), toc_of(labels::ZSTD_CHUNKED_TOC_DIGEST));
    Ok(Some(IndexLayer {
        digest,
        size,
        location: location.to_owned(),
        toc_conflict: stargz.is_some() && chunked.is_some(),
        toc: stargz.or(chunked),
    }))
}

/// If `manifest` (fetched through `registry`) is a companion image or an index of them,
/// the pinned location of its lazy index layer (`registry/repo@sha256:...`).
pub async fn index_location(registry: &Registry, manifest: &[u8]) -> Result<Option<String>, RegistryError> {
    Ok(index_layer(registry, manifest).await?.map(|layer| layer.location))
}

/// The index in the layer at `at` (pinned), and the digest of its JSON: from the cache,
/// else fetched whole (digest-checked, size-capped), unpacked from its tar and cached.
pub async fn load_index(
    at: &str,
    layer: &Digest,
    cache: &ChunkCache,
    settings: &RegistrySettings,
) -> Result<(VerifiedIndex, Digest), CompanionError> {
    let cache_err = |e: crate::cache::CacheError| invalid(at, e.to_string());
    if let Some(named) = cache.get_meta(&layer_key(layer)).map_err(cache_err)? {
        let json_digest = std::str::from_utf8(&named).ok().and_then(|s| s.parse::<Digest>().ok());
        if let Some(json_digest) = json_digest {
            if let Some(index) = cached_index(cache, &json_digest).map_err(|e| invalid(at, e))? {
                return Ok((index, json_digest));
            }
        }
    }
    let data = fetch_layer(at, layer, settings).await?;
    let index = keep_layer_index(at, layer, &data, cache)?;
    let json_digest = index.digest;
    Ok((index, json_digest))
}

/// The index layer at `at` (pinned), its tar bytes, and the index in it: from the
/// cache, else fetched whole (digest-checked, size-capped) and cached. For front-ends
/// that hand the layer itself out (the layer store's `blob`).
pub async fn load_index_layer(
    at: &str,
    layer: &Digest,
    cache: &ChunkCache,
    settings: &RegistrySettings,
) -> Result<(VerifiedIndex, Bytes), CompanionError> {
    let cache_err = |e: crate::cache::CacheError| invalid(at, e.to_string());
    let data = match cache.get_meta(&layer_blob_key(layer)).map_err(cache_err)? {
        Some(data) if Digest::of(&data) == *layer => Bytes::from(data),
        _ => {
            let data = fetch_layer(at, layer, settings).await?;
            cache.put_meta(&layer_blob_key(layer), &data).map_err(cache_err)?;
            data
        }
    };
    Ok((keep_layer_index(at, layer, &data, cache)?, data))
}

/// The index in `data` (the verified blob of index layer `layer`), parsed and kept in
/// the cache with the record naming it.
fn keep_layer_index(
    at: &str,
    layer: &Digest,
    data: &[u8],
    cache: &ChunkCache,
) -> Result<VerifiedIndex, CompanionError> {
    let cache_err = |e: crate::cache::CacheError| invalid(at, e.to_string());
    let json = index_from_tar(data).map_err(|e| invalid(at, e))?;
    let index = LazyIndex::parse(&json).map_err(|e| invalid(at, e.to_string()))?;
    keep_index(cache, &json).map_err(cache_err)?;
    cache.put_meta(&layer_key(layer), index.digest.to_string().as_bytes()).map_err(cache_err)?;
    Ok(index)
}

/// The index layer blob at `at`, fetched whole, size-capped and checked against `layer`.
async fn fetch_layer(at: &str, layer: &Digest, settings: &RegistrySettings) -> Result<Bytes, CompanionError> {
    let registry = Registry::new(parse_reference(at)?, settings.clone());
    let mut stream = registry.stream_blob(layer, 0).await?;
    let mut data = Vec::new();
    let mut hasher = Hasher::default();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| invalid(at, format!("download: {e}")))?;
        if (data.len() + piece.len()) as u64 > MAX_INDEX_BYTES {
            return Err(invalid(at, format!("index layer exceeds {MAX_INDEX_BYTES} bytes")));
        }
        hasher.update(&piece);
        data.extend_from_slice(&piece);
    }
    if hasher.finish() != *layer {
        return Err(invalid(at, "index layer does not match its digest"));
    }
    Ok(Bytes::from(data))
}

/// A cached index JSON by its digest, checked and parsed.
pub fn cached_index(cache: &ChunkCache, json_digest: &Digest) -> Result<Option<VerifiedIndex>, String> {
    match cache.get_meta(&index_key(json_digest)).map_err(|e| e.to_string())? {
        Some(json) if Digest::of(&json) == *json_digest => LazyIndex::parse(&json).map(Some).map_err(|e| e.to_string()),
        _ => Ok(None),
    }
}

/// Keeps an index JSON in the cache, by its digest.
pub fn keep_index(cache: &ChunkCache, json: &[u8]) -> Result<Digest, crate::cache::CacheError> {
    let digest = Digest::of(json);
    cache.put_meta(&index_key(&digest), json)?;
    Ok(digest)
}

/// The index file inside a companion layer's tar.
pub fn index_from_tar(layer: &[u8]) -> Result<Vec<u8>, String> {
    let mut archive = tar::Archive::new(layer);
    for entry in archive.entries().map_err(|e| format!("index layer is not a tar: {e}"))? {
        let entry = entry.map_err(|e| format!("index layer is not a tar: {e}"))?;
        let path = entry.path_bytes().into_owned();
        if path == INDEX_PATH.as_bytes() || path.strip_prefix(b"./") == Some(INDEX_PATH.as_bytes()) {
            let mut json = Vec::new();
            entry.take(MAX_INDEX_BYTES).read_to_end(&mut json).map_err(|e| format!("reading {INDEX_PATH}: {e}"))?;
            return Ok(json);
        }
    }
    Err(format!("index layer holds no {INDEX_PATH}"))
}
