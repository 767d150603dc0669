//! `convert`: publishes, next to an unchanged ModelPack artifact, a small companion
//! image that containerd can pull: an OCI image index (linux/amd64 and linux/arm64)
//! whose one layer is a real tar holding the lazy index of the model. The layer's
//! `containerd.io/snapshot/modelpack.*` annotations tell the snapshotter where the model
//! and its index are; each manifest's `subject` points at the ModelPack manifest. No
//! model data is copied, and converting the same artifact twice gives the same digests.
//!
//! When the companion lives in the model's own repository, `convert` also adds it to the
//! referrers tag of the model's manifest (`sha256-<hex>`, the OCI distribution spec's
//! fallback for registries without the referrers API), so that a plain reference finds
//! it ([`crate::companion::discover`]). Entries already listed are kept, none is listed
//! twice, and a list that did not change is not pushed again.

use std::time::UNIX_EPOCH;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;

use crate::cache::ChunkCache;
use crate::config::{PrefetchPolicy, Settings};
use crate::model::{Model, ModelError};
use crate::modelpack::digest::Hasher;
use crate::modelpack::index::{
    IndexBlob, IndexFile, IndexSource, LazyIndex, INDEX_ALGORITHM, INDEX_PATH, INDEX_VERSION, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
};
use crate::modelpack::labels;
use crate::modelpack::media;
use crate::modelpack::referrers::{self, Referrer, ReferrersError};
use crate::modelpack::tree::NodeKind;
use crate::modelpack::Digest;
use crate::progress::{Bar, Progress};
use crate::registry::{self, Registry, RegistryError};

/// Media type of the companion's layer: a plain tar, so any containerd unpacks it.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of the companion's image configs.
pub const IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Platforms the companion is published for.
pub const PLATFORMS: &[&str] = &["amd64", "arm64"];

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The source is not a usable model.
    #[error(transparent)]
    Model(Box<ModelError>),
    /// A blob's bytes do not match its digest or size.
    #[error("blob {digest} of {reference}: {detail}")]
    Blob { reference: String, digest: Digest, detail: String },
    /// The digested chunk size is out of range.
    #[error("--chunk-size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(u64),
    /// The target reference cannot be derived or parsed.
    #[error("target: {0}")]
    Target(String),
    /// The scratch cache failed.
    #[error("scratch cache {path}: {source}")]
    Scratch { path: String, source: std::io::Error },
    /// The referrers tag cannot take the companion (it is not an image index, or full).
    #[error("referrers tag {tag} of {reference}: {source}")]
    Referrers { reference: String, tag: String, source: ReferrersError },
}

/// What `convert` published.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The companion's reference (tag).
    pub target: String,
    /// The digest of the companion's image index.
    pub digest: Digest,
    /// The digest of the lazy index layer.
    pub layer: Digest,
    /// The referrers tag that lists the companion, when it is in the model's repository.
    pub referrers_tag: Option<String>,
}

/// Adds `new` to the referrers tag of `subject` in `registry`'s repository, unless each
/// is listed already; says whether the tag changed. The tag is read, extended and
/// written back: entries other clients listed stay, in their order.
pub async fn add_referrers(registry: &Registry, subject: &Digest, new: &[Referrer]) -> Result<bool, ConvertError> {
    let tag = referrers::referrers_tag(subject);
    let referrers_err =
        |source| ConvertError::Referrers { reference: registry.reference().whole(), tag: tag.clone(), source };
    let mut list = registry.referrers_tag(subject).await?;
    if !list.add(new).map_err(referrers_err)? {
        return Ok(false);
    }
    registry.push_referrers_tag(subject, &list).await?;
    Ok(true)
}

/// The default target: the source's tag with `-lazy` appended.
pub fn default_target(source: &str) -> Result<String, ConvertError> {
    let r = registry::parse_reference(source)?;
    let tag = r.tag().ok_or_else(|| ConvertError::Target(format!("{source} has no tag; give --target")))?;
    Ok(format!("{}/{}:{tag}-lazy", r.registry(), r.repository()))
}

/// Reads a blob once, as it streams, into two hashes of the same bytes: the sha256 of
/// the whole, which must match `digest` and `size` (whatever vouched for the blob before,
/// no index is published for bytes that do not hash to the manifest's digest), and the
/// [`INDEX_ALGORITHM`] digest of every `chunk_size` piece. Both are fed each frame as it
/// arrives: hashing them on two threads measured no faster on two cores, with twice the
/// context switches (docs/benchmarks.md). Each frame counts on `bar`.
async fn chunk_digests(
    registry: &Registry,
    digest: &Digest,
    size: u64,
    chunk_size: u64,
    bar: &Bar,
) -> Result<Vec<String>, ConvertError> {
    let blob_err =
        |detail: String| ConvertError::Blob { reference: registry.reference().whole(), digest: *digest, detail };
    if size == 0 {
        return if *digest == Digest::of(b"") {
            Ok(Vec::new())
        } else {
            Err(blob_err("an empty blob with another digest".into()))
        };
    }
    let mut stream = registry.stream_blob(digest, 0).await?;
    let mut whole = Hasher::default();
    let (mut piece, mut in_piece) = (INDEX_ALGORITHM.hasher(), 0u64);
    let mut total = 0u64;
    let mut out = Vec::with_capacity(usize::try_from(size.div_ceil(chunk_size)).unwrap_or(0));
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(|e| blob_err(format!("download: {e}")))?;
        total += bytes.len() as u64;
        if total > size {
            return Err(blob_err(format!("more than the {size} bytes the manifest says")));
        }
        bar.inc(bytes.len() as u64);
        whole.update(&bytes);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let take = ((chunk_size - in_piece) as usize).min(rest.len());
            piece.update(&rest[..take]);
            in_piece += take as u64;
            rest = &rest[take..];
            if in_piece == chunk_size {
                out.push(std::mem::replace(&mut piece, INDEX_ALGORITHM.hasher()).finish().to_string());
                in_piece = 0;
            }
        }
    }
    if in_piece > 0 {
        out.push(piece.finish().to_string());
    }
    if total != size {
        return Err(blob_err(format!("got {total} of {size} bytes")));
    }
    let actual = whole.finish();
    if actual != *digest {
        return Err(blob_err(format!("content hashes to {actual}")));
    }
    Ok(out)
}

/// A tar with the index at [`INDEX_PATH`], byte-for-byte deterministic.
fn index_tar(index_json: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    let dir = INDEX_PATH.rsplit_once('/').map_or("", |(d, _)| d);
    builder
        .append_data(&mut header(tar::EntryType::Directory, 0o755, 0), format!("{dir}/"), &[][..])
        .expect("in-memory tar");
    builder
        .append_data(&mut header(tar::EntryType::Regular, 0o444, index_json.len() as u64), INDEX_PATH, index_json)
        .expect("in-memory tar");
    builder.into_inner().expect("in-memory tar")
}

/// Converts `source` and pushes the companion to `target`; its lazy index asks nodes to
/// prefetch as `prefetch` says, when given. The reading of each blob shows its progress,
/// and a line per blob digested, on `progress`.
pub async fn convert(
    source: &str,
    target: &str,
    chunk_size: u64,
    prefetch: Option<PrefetchPolicy>,
    settings: &Settings,
    progress: &Progress,
) -> Result<Converted, ConvertError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(ConvertError::ChunkSize(chunk_size));
    }
    let src = Registry::new(registry::parse_reference(source)?, settings.registry.clone());
    let target_ref = registry::parse_reference(target)?;
    let dst = Registry::new(target_ref.clone(), settings.registry.clone());
    let (manifest_bytes, manifest_digest) = src.fetch_manifest().await?;
    let pinned = format!("{}/{}@{manifest_digest}", src.reference().registry(), src.reference().repository());

    // Open the model once from a scratch cache: this validates it and gives the tree.
    let scratch = std::env::temp_dir().join(format!(
        "modelpack-convert-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    ));
    let scratch_err = |source| ConvertError::Scratch { path: scratch.display().to_string(), source };
    let cache = std::sync::Arc::new(ChunkCache::open(&scratch, None).map_err(|e| ConvertError::Scratch {
        path: scratch.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?);
    let opened = Model::open_artifact(&pinned, settings, cache).await;
    let model = match opened {
        Ok(model) => {
            model.store.settle().await;
            std::fs::remove_dir_all(&scratch).map_err(scratch_err)?;
            model
        }
        Err(e) => {
            // Best effort: the model's error is the one worth reporting.
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(ConvertError::Model(Box::new(e)));
        }
    };
    let config = src.fetch_small_blob(&model.artifact.config.digest, model.artifact.config.size).await?;

    let mut blobs = Vec::with_capacity(model.artifact.layers.len());
    let total = model.artifact.layers.len();
    for (n, layer) in model.artifact.layers.iter().enumerate() {
        let label = format!(
            "[{}/{total}] {}",
            n + 1,
            layer.path.as_ref().map_or_else(|| layer.digest.to_string(), ToString::to_string)
        );
        let bar = progress.bar(label.clone(), layer.size);
        let chunks = chunk_digests(&src, &layer.digest, layer.size, chunk_size, &bar).await?;
        bar.finish();
        progress.println(&format!("{label}: {} bytes, {} chunk digests", layer.size, chunks.len()));
        blobs.push(IndexBlob { digest: layer.digest.to_string(), size: layer.size, chunks });
    }
    let files = model
        .tree
        .nodes()
        .filter(|n| n.ino != crate::modelpack::tree::ROOT_INO)
        .map(|n| {
            let path = model.tree.path_of(n.ino);
            match &n.kind {
                NodeKind::Dir { .. } => {
                    IndexFile { path, kind: "dir".into(), mode: n.mode, size: 0, layer: None, offset: 0, target: None }
                }
                NodeKind::File(f) => IndexFile {
                    path,
                    kind: "file".into(),
                    mode: n.mode,
                    size: n.size,
                    layer: Some(f.layer),
                    offset: f.offset,
                    target: None,
                },
                NodeKind::Symlink(t) => IndexFile {
                    path,
                    kind: "symlink".into(),
                    mode: n.mode,
                    size: 0,
                    layer: None,
                    offset: 0,
                    target: Some(t.clone()),
                },
            }
        })
        .collect();
    let index = LazyIndex {
        version: INDEX_VERSION,
        source: IndexSource { reference: pinned.clone(), manifest_digest: manifest_digest.to_string() },
        manifest: String::from_utf8(manifest_bytes.to_vec())
            .map_err(|_| ConvertError::Target(format!("manifest of {source} is not UTF-8")))?,
        config: String::from_utf8(config.to_vec())
            .map_err(|_| ConvertError::Target(format!("config of {source} is not UTF-8")))?,
        chunk_size,
        blobs,
        files,
        prefetch,
    };
    // Check what we publish the way the snapshotter will read it.
    LazyIndex::parse(&index.to_json()).map_err(|e| ConvertError::Target(e.to_string()))?;

    let json = index.to_json();
    let toc_digest = Digest::of(&json);
    let layer = Bytes::from(index_tar(&json));
    let layer_digest = Digest::of(&layer);
    if !dst.blob_exists(&layer_digest).await? {
        dst.push_bytes(layer.clone(), &layer_digest).await?;
    }
    let index_location = format!("{}/{}@{layer_digest}", target_ref.registry(), target_ref.repository());
    let subject = json!({
        "mediaType": media::OCI_MANIFEST,
        "digest": manifest_digest.to_string(),
        "size": manifest_bytes.len(),
        "artifactType": model.artifact.family.artifact_type(),
    });
    let mut entries = Vec::new();
    let mut listed = Vec::new();
    for arch in PLATFORMS {
        let image_config = json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Labels": { "org.cncf.model.source": pinned } },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest.to_string()] },
        });
        let config_bytes = Bytes::from(serde_json::to_vec(&image_config).expect("config serializes"));
        let config_digest = Digest::of(&config_bytes);
        if !dst.blob_exists(&config_digest).await? {
            dst.push_bytes(config_bytes.clone(), &config_digest).await?;
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": { "mediaType": IMAGE_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len() },
            "layers": [{
                "mediaType": LAYER_MEDIA_TYPE,
                "digest": layer_digest.to_string(),
                "size": layer.len(),
                "annotations": {
                    labels::SOURCE: pinned,
                    labels::INDEX: index_location,
                    labels::VERSION: INDEX_VERSION.to_string(),
                    labels::TOC_DIGEST: toc_digest.to_string(),
                    "org.opencontainers.image.title": "modelpack-index.tar",
                },
            }],
            "subject": subject,
        });
        let body = Bytes::from(serde_json::to_vec(&manifest).expect("manifest serializes"));
        let by_digest = dst.with_reference(target_ref.clone_with_digest(Digest::of(&body).to_string()));
        let digest = by_digest.push_manifest(body.clone(), media::OCI_MANIFEST).await?;
        entries.push(json!({
            "mediaType": media::OCI_MANIFEST,
            "digest": digest.to_string(),
            "size": body.len(),
            "platform": { "architecture": arch, "os": "linux" },
        }));
        // As the spec lists a manifest without an artifact type: by its config's media type.
        listed.push(Referrer {
            media_type: media::OCI_MANIFEST.to_owned(),
            digest,
            size: body.len() as u64,
            artifact_type: Some(IMAGE_CONFIG.to_owned()),
        });
    }
    let image_index = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": entries,
        "subject": subject,
    });
    let body = Bytes::from(serde_json::to_vec(&image_index).expect("index serializes"));
    let size = body.len() as u64;
    let digest = dst.push_manifest(body, media::OCI_INDEX).await?;
    // The index first: it is what a reader of the list should try first. An index
    // without an artifact type is listed without one.
    listed.insert(0, Referrer { media_type: media::OCI_INDEX.to_owned(), digest, size, artifact_type: None });

    // Referrers must be in the subject's repository: a companion elsewhere is not listed.
    let same_repository = src.reference().resolve_registry() == target_ref.resolve_registry()
        && src.reference().repository() == target_ref.repository();
    let referrers_tag = if same_repository {
        let tag = referrers::referrers_tag(&manifest_digest);
        if add_referrers(&src, &manifest_digest, &listed).await? {
            progress.println(&format!("listed the companion under the referrers tag {tag}"));
        }
        Some(tag)
    } else {
        progress.println(
            "the companion is not in the model's repository, so it is not listed among its referrers: \
             plain references of the model will not find it",
        );
        None
    };
    Ok(Converted { target: target.to_owned(), digest, layer: layer_digest, referrers_tag })
}
