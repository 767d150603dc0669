//! `push`: packs a directory as a ModelPack artifact the way modctl does (one layer per
//! file, `raw` by default or a single-entry `tar`), and uploads it.
//!
//! Layer kinds follow the file name: weights, weight configs (configs, tokenizers),
//! docs, code, datasets. Each layer carries the filepath and file-metadata annotations;
//! the config lists the layers' diff IDs (equal to their digests: nothing is compressed).
//! Blobs the registry already has are not uploaded again. Uploads show their progress
//! ([`crate::progress`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::json;

use crate::config::RegistrySettings;
use crate::modelpack::digest::Hasher;
use crate::modelpack::media::{self, LayerFormat, LayerKind, LayerMediaType};
use crate::modelpack::path::ModelPath;
use crate::modelpack::Digest;
use crate::progress::Progress;
use crate::registry::{self, Registry, RegistryError};

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Reading the source directory failed.
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// A file name cannot be a model path.
    #[error("{path}: {reason}")]
    BadPath { path: String, reason: String },
    /// The directory holds no regular files.
    #[error("{0} holds no files to push")]
    Empty(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// How each file becomes a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackFormat {
    /// The blob is the file (modctl's default).
    #[default]
    Raw,
    /// The blob is a tar holding the one file.
    Tar,
}

/// The layer kind for a file, from its name.
pub fn classify(path: &str) -> LayerKind {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    const WEIGHTS: &[&str] = &[
        "safetensors",
        "bin",
        "pt",
        "pth",
        "gguf",
        "ggml",
        "onnx",
        "h5",
        "ckpt",
        "msgpack",
        "tflite",
        "pb",
        "npz",
        "mlmodel",
        "engine",
        "plan",
    ];
    const CONFIGS: &[&str] = &["json", "yaml", "yml", "toml", "jinja", "model", "tiktoken"];
    const CODE: &[&str] =
        &["py", "sh", "ipynb", "js", "ts", "go", "rs", "c", "cc", "cpp", "h", "cu", "java", "rb", "pl"];
    const DATA: &[&str] = &["parquet", "csv", "tsv", "jsonl", "arrow"];
    if WEIGHTS.contains(&ext) {
        LayerKind::Weight
    } else if CONFIGS.contains(&ext)
        || name.starts_with("vocab")
        || name.starts_with("merges")
        || name.starts_with("tokenizer")
    {
        LayerKind::WeightConfig
    } else if CODE.contains(&ext) {
        LayerKind::Code
    } else if DATA.contains(&ext) {
        LayerKind::Dataset
    } else {
        LayerKind::Doc
    }
}

/// A file found in the source directory.
#[derive(Debug)]
struct SourceFile {
    path: ModelPath,
    full: PathBuf,
    size: u64,
    mode: u32,
    mtime: SystemTime,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> PushError + '_ {
    move |source| PushError::Io { path: path.display().to_string(), source }
}

/// Lists regular files under `dir` in path order. Symlinks and special files are skipped
/// with a warning: a model's content is its regular files.
fn walk(dir: &Path) -> Result<Vec<SourceFile>, PushError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_error(&d))? {
            let entry = entry.map_err(io_error(&d))?;
            let full = entry.path();
            let meta = std::fs::symlink_metadata(&full).map_err(io_error(&full))?;
            if meta.is_dir() {
                stack.push(full);
            } else if meta.is_file() {
                let rel = full.strip_prefix(dir).expect("walked below dir");
                let rel_str = rel.to_str().ok_or_else(|| PushError::BadPath {
                    path: full.display().to_string(),
                    reason: "file name is not UTF-8".to_owned(),
                })?;
                let path = ModelPath::parse(rel_str)
                    .map_err(|e| PushError::BadPath { path: full.display().to_string(), reason: e.to_string() })?;
                let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
                out.push(SourceFile { path, full, size: meta.len(), mode: meta.mode() & 0o7777, mtime });
            } else {
                tracing::warn!(path = %full.display(), "skipping: not a regular file");
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The digest and size of a file, read once; a bar named `label` shows the reading (a
/// shard of many gigabytes takes seconds).
fn hash_file(path: &Path, progress: &Progress, label: &str) -> Result<(Digest, u64), PushError> {
    let io = |source| PushError::Io { path: path.display().to_string(), source };
    let mut file = File::open(path).map_err(io)?;
    let bar = progress.bar(label, file.metadata().map_err(io)?.len());
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            return Ok((hasher.finish(), size));
        }
        size += n as u64;
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
}

/// Formats a time as RFC 3339 in UTC with nanoseconds, as the file-metadata
/// annotation carries it.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Writes a tar holding one file at `path` to `out`.
fn write_single_tar(file: &SourceFile, out: &Path) -> Result<(), PushError> {
    let mut builder = tar::Builder::new(File::create(out).map_err(io_error(out))?);
    let mut header = tar::Header::new_gnu();
    header.set_size(file.size);
    header.set_mode(file.mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(file.mtime.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    header.set_entry_type(tar::EntryType::Regular);
    let src = File::open(&file.full).map_err(io_error(&file.full))?;
    builder.append_data(&mut header, file.path.as_str(), src).map_err(io_error(&file.full))?;
    builder.into_inner().and_then(|f| f.sync_all()).map_err(io_error(out))
}

/// Packs `dir` and pushes it to `reference`; returns the manifest digest. Each upload's
/// progress, and a line per blob pushed or found in the registry, go to `progress`.
pub async fn push_dir(
    dir: &Path,
    reference: &str,
    format: PackFormat,
    settings: &RegistrySettings,
    progress: &Progress,
) -> Result<Digest, PushError> {
    let registry = Registry::new(registry::parse_reference(reference)?, settings.clone());
    let files = walk(dir)?;
    if files.is_empty() {
        return Err(PushError::Empty(dir.display().to_string()));
    }
    let scratch = tempfile_dir()?;
    let mut layers = Vec::with_capacity(files.len());
    let total = files.len();
    for (n, file) in files.iter().enumerate() {
        let (blob_path, layer_format) = match format {
            PackFormat::Raw => (file.full.clone(), LayerFormat::Raw),
            PackFormat::Tar => {
                let out = scratch.join(format!("layer-{n}.tar"));
                write_single_tar(file, &out)?;
                (out, LayerFormat::Tar)
            }
        };
        let label = format!("[{}/{total}] {}", n + 1, file.path);
        let (digest, size) = {
            let (p, progress, hashing) = (blob_path.clone(), progress.clone(), format!("{label} (hashing)"));
            tokio::task::spawn_blocking(move || hash_file(&p, &progress, &hashing)).await.expect("hashing task")?
        };
        if registry.blob_exists(&digest).await? {
            progress.println(&format!("{label}: already in the registry"));
        } else {
            let bar = Arc::new(progress.bar(format!("{label} (uploading)"), size));
            let shown = bar.clone();
            registry.push_file(&blob_path, &digest, size, move |sent| shown.set_position(sent)).await?;
            bar.finish();
            progress.println(&format!("{label}: pushed {size} bytes"));
        }
        if format == PackFormat::Tar {
            let _ = std::fs::remove_file(&blob_path);
        }
        let kind = classify(file.path.as_str());
        let metadata = json!({
            "name": file.path.file_name(),
            "mode": file.mode,
            "uid": 0,
            "gid": 0,
            "size": file.size,
            "mtime": rfc3339(file.mtime),
            "typeflag": 48,
        });
        let mut annotations = BTreeMap::new();
        annotations.insert(media::ANNOTATION_FILEPATH.to_owned(), file.path.to_string());
        annotations.insert(media::ANNOTATION_FILE_METADATA.to_owned(), metadata.to_string());
        annotations.insert(media::ANNOTATION_MEDIATYPE_UNTESTED.to_owned(), "true".to_owned());
        layers.push((LayerMediaType::new(kind, layer_format), digest, size, annotations));
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let diff_ids: Vec<String> = layers.iter().map(|(_, d, _, _)| d.to_string()).collect();
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let format_name = if files.iter().any(|f| f.path.as_str().ends_with(".safetensors")) {
        "safetensors"
    } else if files.iter().any(|f| f.path.as_str().ends_with(".gguf")) {
        "gguf"
    } else {
        ""
    };
    let mut model_config = serde_json::Map::new();
    if !format_name.is_empty() {
        model_config.insert("format".to_owned(), json!(format_name));
    }
    let config = json!({
        "descriptor": { "name": name },
        "config": model_config,
        "modelfs": { "type": "layers", "diffIds": diff_ids },
    });
    let config_bytes = Bytes::from(serde_json::to_vec(&config).expect("config serializes"));
    let config_digest = Digest::of(&config_bytes);
    if !registry.blob_exists(&config_digest).await? {
        registry.push_bytes(config_bytes.clone(), &config_digest).await?;
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": media::ARTIFACT_TYPE,
        "config": {
            "mediaType": media::CONFIG_MEDIA_TYPE,
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": layers.iter().map(|(mt, d, s, a)| json!({
            "mediaType": mt.to_string(),
            "digest": d.to_string(),
            "size": s,
            "annotations": a,
        })).collect::<Vec<_>>(),
    });
    let body = Bytes::from(serde_json::to_vec(&manifest).expect("manifest serializes"));
    Ok(registry.push_manifest(body, media::OCI_MANIFEST).await?)
}

/// A private scratch directory for tar layers being built.
fn tempfile_dir() -> Result<PathBuf, PushError> {
    let dir = std::env::temp_dir().join(format!("modelpack-push-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| PushError::Io { path: dir.display().to_string(), source })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_like_modctl() {
        assert_eq!(classify("model-00001-of-00002.safetensors"), LayerKind::Weight);
        assert_eq!(classify("sub/config.json"), LayerKind::WeightConfig);
        assert_eq!(classify("tokenizer.model"), LayerKind::WeightConfig);
        assert_eq!(classify("merges.txt"), LayerKind::WeightConfig);
        assert_eq!(classify("README.md"), LayerKind::Doc);
        assert_eq!(classify("LICENSE"), LayerKind::Doc);
        assert_eq!(classify("modeling.py"), LayerKind::Code);
        assert_eq!(classify("train.parquet"), LayerKind::Dataset);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_200 + 3_723, 5);
        assert_eq!(rfc3339(t), "2024-03-01T01:02:03.000000005Z");
    }
}
