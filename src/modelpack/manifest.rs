//! Model manifests and configs: the registry's JSON turned into [`ModelArtifact`] and
//! [`ModelConfig`].
//!
//! This is the edge where untrusted manifests become types. A manifest that is not a
//! ModelPack artifact is refused with an error that says what it is instead, so a user
//! who points the snapshotter at a container image or an index learns why at once.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{DeserializeOwned, Deserializer, IgnoredAny};
use serde::Deserialize;

use super::digest::Digest;
use super::media::{self, Family, LayerFormat, LayerMediaType, MediaTypeError};
use super::path::{ModelPath, PathError};

/// Largest blob size accepted in a descriptor (1 PiB): far above any real model file,
/// low enough that offsets and sums of sizes cannot overflow.
pub const MAX_BLOB_SIZE: u64 = 1 << 50;
/// Most layers accepted in one manifest.
pub const MAX_LAYERS: usize = 100_000;
/// Largest manifest accepted, in bytes: the most the registry client fetches
/// (`registry::MAX_SMALL_BLOB`), which is also the size the OCI distribution spec asks
/// registries to accept. Applies as well to manifests from the cache or a lazy index.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Largest model config accepted, in bytes (its descriptor's size and its content): the
/// registry client's limit too. A config holds a few strings and one diffId per layer.
pub const MAX_CONFIG_BYTES: usize = 4 << 20;
/// Largest file metadata annotation accepted, in bytes: its fields are a name (at most a
/// path, 4096 bytes) and a few numbers and a timestamp.
pub const MAX_METADATA_BYTES: usize = 64 << 10;

/// Why a manifest or config is not a model we can mount.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest is larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {0} bytes, more than the limit of {MAX_MANIFEST_BYTES}")]
    ManifestTooLarge(usize),
    /// The manifest is not JSON of the expected shape.
    #[error("manifest is not valid json: {0}")]
    Json(#[source] serde_json::Error),
    /// The manifest is an index of manifests rather than one artifact.
    #[error("manifest is an image index, not a model manifest")]
    ImageIndex,
    /// The manifest describes a container image; the string is the media type that
    /// shows it.
    #[error("manifest is a container image ({0}), not a model manifest")]
    ContainerImage(String),
    /// The manifest declares a media type other than the OCI image manifest.
    #[error("manifest has media type {0:?}, not {OCI_MANIFEST:?}", OCI_MANIFEST = media::OCI_MANIFEST)]
    UnsupportedMediaType(String),
    /// Neither `artifactType` nor the config media type is a ModelPack type.
    #[error("manifest has unknown artifact type {0:?}, not a model manifest")]
    UnknownArtifactType(String),
    /// `schemaVersion` is missing or not 2.
    #[error("manifest schemaVersion is {0}, not 2")]
    SchemaVersion(String),
    /// The manifest has no config descriptor.
    #[error("manifest has no config descriptor")]
    MissingConfig,
    /// The config descriptor's digest is malformed.
    #[error("manifest config has malformed digest {0:?}")]
    ConfigDigest(String),
    /// The config descriptor's size is missing or out of range.
    #[error("manifest config has size {0}, outside 0..=2^50")]
    ConfigSize(String),
    /// The config descriptor, or the config itself, is larger than [`MAX_CONFIG_BYTES`].
    #[error("model config is {0} bytes, more than the limit of {MAX_CONFIG_BYTES}")]
    ConfigTooLarge(u64),
    /// More layers than [`MAX_LAYERS`].
    #[error("manifest has {0} layers, more than the limit of {MAX_LAYERS}")]
    TooManyLayers(usize),
    /// A layer's media type is not a model layer type.
    #[error("layer {index}: {reason}")]
    LayerMediaType {
        /// Position in the manifest's `layers`.
        index: usize,
        /// What is wrong; it quotes the media type.
        reason: MediaTypeError,
    },
    /// A layer's digest is malformed.
    #[error("layer {index} has malformed digest {digest:?}")]
    LayerDigest {
        /// Position in the manifest's `layers`.
        index: usize,
        /// The digest as written.
        digest: String,
    },
    /// A layer's size is missing or out of range.
    #[error("layer {index} ({digest}) has size {size}, outside 0..=2^50")]
    LayerSize {
        /// Position in the manifest's `layers`.
        index: usize,
        /// The layer's digest.
        digest: Digest,
        /// The size as written.
        size: String,
    },
    /// A layer's file path annotation is not a valid model path.
    #[error("layer {index} ({digest}) has an invalid file path: {reason}")]
    LayerPath {
        /// Position in the manifest's `layers`.
        index: usize,
        /// The layer's digest.
        digest: Digest,
        /// What is wrong; it quotes the path.
        reason: PathError,
    },
    /// A raw layer carries no path annotation, so there is nowhere to put its file.
    #[error(
        "layer {index} ({digest}) is a raw file but has no {key} or {title} annotation",
        key = media::ANNOTATION_FILEPATH,
        title = media::ANNOTATION_TITLE
    )]
    RawLayerWithoutPath {
        /// Position in the manifest's `layers`.
        index: usize,
        /// The layer's digest.
        digest: Digest,
    },
    /// A layer's file metadata annotation is not the expected JSON.
    #[error("layer {index} ({digest}) has malformed file metadata: {reason}")]
    LayerMetadata {
        /// Position in the manifest's `layers`.
        index: usize,
        /// The layer's digest.
        digest: Digest,
        /// The JSON error.
        reason: serde_json::Error,
    },
    /// The model config is not JSON of the expected shape.
    #[error("model config is not valid json: {0}")]
    ConfigJson(#[source] serde_json::Error),
    /// A `diffIds` entry of the model config is not a digest.
    #[error("model config diffIds[{index}] {value:?} is not a sha256 digest")]
    DiffId {
        /// Position in `diffIds`.
        index: usize,
        /// The entry as written.
        value: String,
    },
}

/// A content descriptor, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// The media type as written.
    pub media_type: String,
    /// The content digest.
    pub digest: Digest,
    /// The content size in bytes, at most [`MAX_BLOB_SIZE`].
    pub size: u64,
}

/// The file metadata annotation of a layer. Fields the builder left out are zero or
/// empty; this is informational and never decides where data lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileMetadata {
    /// The file's name as the builder saw it.
    pub name: String,
    /// Mode bits as written (permissions and possibly type bits); unsanitized.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// The file's size as the builder saw it.
    pub size: u64,
    /// Modification time; `None` if absent, unparsable or Go's zero time.
    pub mtime: Option<SystemTime>,
    /// Tar type flag byte (`b'0'` for a regular file).
    pub typeflag: u8,
}

impl FileMetadata {
    /// Parses the annotation's JSON. `typeflag` may be a number or a one-character
    /// string; `mtime` is an RFC 3339 string, and a bad one is dropped, not an error.
    /// JSON longer than [`MAX_METADATA_BYTES`] is an error.
    pub fn from_json(json: &str) -> Result<FileMetadata, serde_json::Error> {
        if json.len() > MAX_METADATA_BYTES {
            return Err(serde::de::Error::custom(format_args!(
                "{} bytes, more than the limit of {MAX_METADATA_BYTES}",
                json.len()
            )));
        }
        let raw: RawFileMetadata = from_object(json.as_bytes())?;
        Ok(FileMetadata {
            name: raw.name,
            mode: raw.mode,
            uid: raw.uid,
            gid: raw.gid,
            size: raw.size,
            mtime: raw.mtime.as_ref().and_then(|v| v.as_str()).and_then(parse_rfc3339),
            typeflag: raw.typeflag,
        })
    }
}

/// One layer of a model artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLayer {
    /// Position in the manifest's `layers`; the key other modules use for the layer.
    pub index: usize,
    /// The parsed media type.
    pub media_type: LayerMediaType,
    /// The blob digest.
    pub digest: Digest,
    /// The blob size in bytes.
    pub size: u64,
    /// Where the file goes in the tree. Always set for raw layers; for tar layers it
    /// only names what was archived, the entries carry their own paths.
    pub path: Option<ModelPath>,
    /// The file metadata annotation, if any.
    pub metadata: Option<FileMetadata>,
    /// All annotations as written.
    pub annotations: BTreeMap<String, String>,
}

/// A parsed ModelPack manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelArtifact {
    /// Which spec generation the manifest follows (from `artifactType`, else config).
    pub family: Family,
    /// The model config blob.
    pub config: Descriptor,
    /// The layers, in manifest order.
    pub layers: Vec<ModelLayer>,
}

/// The parts of the model config blob this crate uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// `modelfs.diffIds` (legacy `modelfs.diff_ids`): digests of the uncompressed layers.
    pub diff_ids: Vec<Digest>,
    /// `descriptor.name`.
    pub name: Option<String>,
    /// `config.architecture`.
    pub architecture: Option<String>,
    /// `config.format`.
    pub format: Option<String>,
}

/// Parses and validates a manifest. See [`ManifestError`] for everything refused.
pub fn parse_manifest(bytes: &[u8]) -> Result<ModelArtifact, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::ManifestTooLarge(bytes.len()));
    }
    let raw: RawManifest = from_object(bytes).map_err(ManifestError::Json)?;

    match raw.media_type.as_deref() {
        None | Some(media::OCI_MANIFEST) => {}
        Some(media::OCI_INDEX | media::DOCKER_MANIFEST_LIST) => return Err(ManifestError::ImageIndex),
        Some(media::DOCKER_MANIFEST) => return Err(ManifestError::ContainerImage(media::DOCKER_MANIFEST.to_owned())),
        Some(other) => return Err(ManifestError::UnsupportedMediaType(other.to_owned())),
    }
    // An index may omit its mediaType; its `manifests` list gives it away.
    if raw.manifests.is_some() {
        return Err(ManifestError::ImageIndex);
    }
    if raw.schema_version != Some(2) {
        let found = raw.schema_version.map_or_else(|| "missing".to_owned(), |v| v.to_string());
        return Err(ManifestError::SchemaVersion(found));
    }
    let config = raw.config.ok_or(ManifestError::MissingConfig)?;

    let family = raw
        .artifact_type
        .as_deref()
        .and_then(Family::from_artifact_type)
        .or_else(|| Family::from_config_media_type(&config.media_type));
    let Some(family) = family else {
        if matches!(config.media_type.as_str(), media::OCI_IMAGE_CONFIG | media::DOCKER_IMAGE_CONFIG) {
            return Err(ManifestError::ContainerImage(format!("config {}", config.media_type)));
        }
        // Without artifactType, OCI takes the config media type as the artifact type.
        let artifact_type = raw.artifact_type.unwrap_or(config.media_type);
        return Err(ManifestError::UnknownArtifactType(artifact_type));
    };

    let config = Descriptor {
        digest: config.digest.parse().map_err(|_| ManifestError::ConfigDigest(config.digest.clone()))?,
        size: check_size(config.size.as_ref()).map_err(ManifestError::ConfigSize)?,
        media_type: config.media_type,
    };
    if config.size > MAX_CONFIG_BYTES as u64 {
        return Err(ManifestError::ConfigTooLarge(config.size));
    }

    if raw.layers.len() > MAX_LAYERS {
        return Err(ManifestError::TooManyLayers(raw.layers.len()));
    }
    let layers =
        raw.layers.into_iter().enumerate().map(|(index, layer)| parse_layer(index, layer)).collect::<Result<_, _>>()?;

    Ok(ModelArtifact { family, config, layers })
}

/// Parses a model config blob. Everything is optional: some builders write `{}`.
pub fn parse_config(bytes: &[u8]) -> Result<ModelConfig, ManifestError> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(ManifestError::ConfigTooLarge(bytes.len() as u64));
    }
    let raw: RawConfig = from_object(bytes).map_err(ManifestError::ConfigJson)?;
    let modelfs = raw.modelfs.unwrap_or_default();
    let diff_ids = modelfs
        .diff_ids
        .or(modelfs.legacy_diff_ids)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, value)| value.parse().map_err(|_| ManifestError::DiffId { index, value }))
        .collect::<Result<_, _>>()?;
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let body = raw.config.unwrap_or_default();
    Ok(ModelConfig {
        diff_ids,
        name: non_empty(raw.descriptor.unwrap_or_default().name),
        architecture: non_empty(body.architecture),
        format: non_empty(body.format),
    })
}

fn parse_layer(index: usize, raw: RawDescriptor) -> Result<ModelLayer, ManifestError> {
    let media_type: LayerMediaType =
        raw.media_type.parse().map_err(|reason| ManifestError::LayerMediaType { index, reason })?;
    let digest: Digest =
        raw.digest.parse().map_err(|_| ManifestError::LayerDigest { index, digest: raw.digest.clone() })?;
    let size = check_size(raw.size.as_ref()).map_err(|size| ManifestError::LayerSize { index, digest, size })?;
    let annotations = raw.annotations.unwrap_or_default();

    let path = [media::ANNOTATION_FILEPATH, media::ANNOTATION_TITLE, media::ANNOTATION_CNAI_FILEPATH]
        .into_iter()
        .find_map(|key| annotations.get(key))
        .map(|p| ModelPath::parse(p))
        .transpose()
        .map_err(|reason| ManifestError::LayerPath { index, digest, reason })?;
    if path.is_none() && media_type.format == LayerFormat::Raw {
        return Err(ManifestError::RawLayerWithoutPath { index, digest });
    }

    let metadata = [media::ANNOTATION_FILE_METADATA, media::ANNOTATION_CNAI_FILE_METADATA]
        .into_iter()
        .find_map(|key| annotations.get(key))
        .map(|json| FileMetadata::from_json(json))
        .transpose()
        .map_err(|reason| ManifestError::LayerMetadata { index, digest, reason })?;

    Ok(ModelLayer { index, media_type, digest, size, path, metadata, annotations })
}

/// The size as a `u64` in range, or a description of what was written instead.
fn check_size(size: Option<&serde_json::Value>) -> Result<u64, String> {
    let size = size.ok_or_else(|| "missing".to_owned())?;
    match size.as_u64() {
        Some(n) if n <= MAX_BLOB_SIZE => Ok(n),
        _ => Err(size.to_string()),
    }
}

/// Deserializes a JSON object. Going through a map first refuses arrays, which
/// serde would otherwise accept for a struct by position.
fn from_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)?;
    T::deserialize(serde_json::Value::Object(object))
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Vec<RawDescriptor>,
    manifests: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: String,
    size: Option<serde_json::Value>,
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawFileMetadata {
    name: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Option<serde_json::Value>,
    #[serde(deserialize_with = "typeflag")]
    typeflag: u8,
}

/// Go's `tar.Header.Typeflag` is a byte and serializes as a number; other builders
/// write the flag character as a string.
fn typeflag<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    use serde::de::Error;
    let invalid = || D::Error::custom("typeflag must be a byte or a one-character string");
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(0),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u8::try_from(n).ok()).ok_or_else(invalid),
        serde_json::Value::String(s) => match s.as_bytes() {
            [] => Ok(0),
            [b] if b.is_ascii() => Ok(*b),
            _ => Err(invalid()),
        },
        _ => Err(invalid()),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    descriptor: Option<RawConfigDescriptor>,
    config: Option<RawConfigBody>,
    modelfs: Option<RawModelFs>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfigDescriptor {
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfigBody {
    architecture: Option<String>,
    format: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawModelFs {
    #[serde(rename = "diffIds")]
    diff_ids: Option<Vec<String>>,
    #[serde(rename = "diff_ids")]
    legacy_diff_ids: Option<Vec<String>>,
}

/// Go's zero `time.Time` (`0001-01-01T00:00:00Z`), which means "unset".
const GO_ZERO_TIME_UNIX: i64 = -62_135_596_800;

/// Parses an RFC 3339 timestamp (`2025-04-01T12:00:00.123456789Z`,
/// `2025-04-01T12:00:00+02:00`). Digits past nanoseconds are ignored.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |from: usize, to: usize| -> Option<u32> {
        let digits = b.get(from..to)?;
        digits.iter().try_fold(0u32, |acc, &d| d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0')))
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);

    let mut i = 19;
    let mut nanos = 0u32;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        if digits < 9 {
            nanos *= 10u32.pow((9 - digits) as u32);
        }
    }
    let offset_secs: i64 = match b.get(i) {
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            if !sep(i + 3, b":") {
                return None;
            }
            let (oh, om) = (num(i + 1, i + 3)?, num(i + 4, i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            i += 6;
            let secs = i64::from(oh * 3600 + om * 60);
            if sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    if i != b.len() {
        return None;
    }
    // Second 60 is a leap second; it lands on the next minute's first second.
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let unix = days_since_epoch(i64::from(year), month, day) * 86_400 + i64::from(hour * 3600 + minute * 60 + second)
        - offset_secs;
    if unix == GO_ZERO_TIME_UNIX && nanos == 0 {
        return None;
    }
    unix_time(unix, nanos)
}

/// The instant `secs` seconds (possibly negative) and `nanos` nanoseconds after the
/// Unix epoch, if `SystemTime` can represent it.
pub(crate) fn unix_time(secs: i64, nanos: u32) -> Option<SystemTime> {
    let whole = Duration::from_secs(secs.unsigned_abs());
    let at = if secs >= 0 { UNIX_EPOCH.checked_add(whole) } else { UNIX_EPOCH.checked_sub(whole) };
    at?.checked_add(Duration::from_nanos(u64::from(nanos)))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date. Counting years from
/// March puts the leap day at the end of the counted year, so every 400-year cycle
/// has the same 146097 days.
fn days_since_epoch(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let cycle = y.div_euclid(400);
    let year_of_cycle = y.rem_euclid(400);
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_cycle = year_of_cycle * 365 + year_of_cycle / 4 - year_of_cycle / 100 + day_of_year;
    // 719468 days separate 0000-03-01, where cycle 0 starts, from 1970-01-01.
    cycle * 146_097 + day_of_cycle - 719_468
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::modelpack::media::LayerKind;

    fn digest(n: u8) -> String {
        Digest::of(&[n]).to_string()
    }

    fn raw_layer(n: u8, path: &str) -> Value {
        json!({
            "mediaType": "application/vnd.cncf.model.weight.v1.raw",
            "digest": digest(n),
            "size": 1000 + u64::from(n),
            "annotations": {
                "org.cncf.model.filepath": path,
                "org.cncf.model.file.metadata+json":
                    r#"{"name":"x","mode":420,"uid":1,"gid":2,"size":1000,"mtime":"2025-04-01T12:00:00.5Z","typeflag":48}"#,
                "org.cncf.model.file.mediatype.untested": "true"
            }
        })
    }

    fn manifest(layers: Vec<Value>) -> Value {
        json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "artifactType": media::ARTIFACT_TYPE,
            "config": { "mediaType": media::CONFIG_MEDIA_TYPE, "digest": digest(0), "size": 321 },
            "layers": layers
        })
    }

    fn parse(v: &Value) -> Result<ModelArtifact, ManifestError> {
        parse_manifest(v.to_string().as_bytes())
    }

    fn err(v: &Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_modctl_style_manifest() {
        let m = manifest(vec![
            raw_layer(1, "model-00001-of-00002.safetensors"),
            raw_layer(2, "model-00002-of-00002.safetensors"),
            json!({
                "mediaType": "application/vnd.cncf.model.doc.v1.tar",
                "digest": digest(3),
                "size": 0
            }),
        ]);
        let a = parse(&m).unwrap();
        assert_eq!(a.family, Family::Cncf);
        assert_eq!(
            a.config,
            Descriptor { media_type: media::CONFIG_MEDIA_TYPE.into(), digest: Digest::of(&[0]), size: 321 }
        );
        assert_eq!(a.layers.len(), 3);
        let l = &a.layers[1];
        assert_eq!(l.index, 1);
        assert_eq!(l.media_type.kind, LayerKind::Weight);
        assert_eq!(l.digest, Digest::of(&[2]));
        assert_eq!(l.size, 1002);
        assert_eq!(l.path.as_ref().unwrap().as_str(), "model-00002-of-00002.safetensors");
        let md = l.metadata.as_ref().unwrap();
        assert_eq!((md.mode, md.uid, md.gid, md.size, md.typeflag), (0o644, 1, 2, 1000, b'0'));
        assert_eq!(md.mtime, Some(UNIX_EPOCH + Duration::new(1_743_508_800, 500_000_000)));
        assert_eq!(l.annotations[media::ANNOTATION_MEDIATYPE_UNTESTED], "true");
        let tar = &a.layers[2];
        assert_eq!(tar.media_type.format, LayerFormat::Tar);
        assert_eq!((tar.path.clone(), tar.metadata.clone()), (None, None));
    }

    #[test]
    fn parses_a_legacy_cnai_manifest() {
        let m = json!({
            "schemaVersion": 2,
            "config": { "mediaType": media::CONFIG_MEDIA_TYPE_CNAI, "digest": digest(0), "size": 2 },
            "layers": [{
                "mediaType": "application/vnd.cnai.model.weight.v1.raw",
                "digest": digest(1),
                "size": 5,
                "annotations": {
                    "org.cnai.model.filepath": "sub/model.gguf",
                    "org.cnai.model.file.metadata+json": r#"{"mode":493,"typeflag":"0"}"#
                }
            }]
        });
        let a = parse(&m).unwrap();
        assert_eq!(a.family, Family::Cnai);
        let l = &a.layers[0];
        assert_eq!(l.media_type.family, Family::Cnai);
        assert_eq!(l.path.as_ref().unwrap().as_str(), "sub/model.gguf");
        let md = l.metadata.as_ref().unwrap();
        assert_eq!((md.mode, md.typeflag, md.mtime, md.name.as_str()), (0o755, b'0', None, ""));
    }

    #[test]
    fn family_comes_from_artifact_type_then_config() {
        let mut m = manifest(vec![]);
        m["artifactType"] = json!(media::ARTIFACT_TYPE_CNAI);
        assert_eq!(parse(&m).unwrap().family, Family::Cnai);
        m.as_object_mut().unwrap().remove("artifactType");
        assert_eq!(parse(&m).unwrap().family, Family::Cncf);
        m["artifactType"] = json!(media::ARTIFACT_TYPE);
        m["config"]["mediaType"] = json!("application/vnd.oci.empty.v1+json");
        assert_eq!(parse(&m).unwrap().family, Family::Cncf);
    }

    #[test]
    fn path_annotations_in_priority_order() {
        let mut l = raw_layer(1, "cncf.bin");
        l["annotations"][media::ANNOTATION_TITLE] = json!("title.bin");
        l["annotations"][media::ANNOTATION_CNAI_FILEPATH] = json!("cnai.bin");
        let path_of = |l: &Value| parse(&manifest(vec![l.clone()])).unwrap().layers[0].path.clone().unwrap();
        assert_eq!(path_of(&l).as_str(), "cncf.bin");
        l["annotations"].as_object_mut().unwrap().remove(media::ANNOTATION_FILEPATH);
        assert_eq!(path_of(&l).as_str(), "title.bin");
        l["annotations"].as_object_mut().unwrap().remove(media::ANNOTATION_TITLE);
        assert_eq!(path_of(&l).as_str(), "cnai.bin");
        l["annotations"].as_object_mut().unwrap().remove(media::ANNOTATION_CNAI_FILEPATH);
        let e = err(&manifest(vec![l]));
        assert!(e.contains("layer 0") && e.contains(&digest(1)) && e.contains("raw file"), "{e}");
    }

    #[test]
    fn refuses_what_is_not_a_model_saying_what_it_is() {
        let index = json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": [] });
        assert!(matches!(parse(&index), Err(ManifestError::ImageIndex)));
        assert_eq!(err(&index), "manifest is an image index, not a model manifest");
        let bare_index = json!({ "schemaVersion": 2, "manifests": [] });
        assert!(matches!(parse(&bare_index), Err(ManifestError::ImageIndex)));

        let mut image = manifest(vec![]);
        image.as_object_mut().unwrap().remove("artifactType");
        image["config"]["mediaType"] = json!(media::OCI_IMAGE_CONFIG);
        image["layers"] = json!([{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                   "digest": digest(1), "size": 1 }]);
        assert!(err(&image).contains("container image"), "{}", err(&image));
        image["config"]["mediaType"] = json!(media::DOCKER_IMAGE_CONFIG);
        assert!(err(&image).contains("container image"));
        image["mediaType"] = json!(media::DOCKER_MANIFEST);
        assert!(err(&image).contains("container image"));

        let mut helm = manifest(vec![]);
        helm.as_object_mut().unwrap().remove("artifactType");
        helm["config"]["mediaType"] = json!("application/vnd.cncf.helm.config.v1+json");
        assert_eq!(
            err(&helm),
            "manifest has unknown artifact type \"application/vnd.cncf.helm.config.v1+json\", not a model manifest"
        );
        helm["artifactType"] = json!("application/vnd.example.thing");
        assert!(err(&helm).contains("unknown artifact type \"application/vnd.example.thing\""));

        let mut other = manifest(vec![]);
        other["mediaType"] = json!("application/json");
        assert!(matches!(parse(&other), Err(ManifestError::UnsupportedMediaType(_))));
    }

    #[test]
    fn refuses_malformed_manifests() {
        assert!(matches!(parse_manifest(b"{not json"), Err(ManifestError::Json(_))));
        assert!(matches!(parse_manifest(b"[]"), Err(ManifestError::Json(_))));
        let mut m = manifest(vec![]);
        m["schemaVersion"] = json!(1);
        assert_eq!(err(&m), "manifest schemaVersion is 1, not 2");
        m.as_object_mut().unwrap().remove("schemaVersion");
        assert_eq!(err(&m), "manifest schemaVersion is missing, not 2");
        let mut m = manifest(vec![]);
        m.as_object_mut().unwrap().remove("config");
        assert!(matches!(parse(&m), Err(ManifestError::MissingConfig)));
        let mut m = manifest(vec![]);
        m["config"]["digest"] = json!("md5:abc");
        assert!(err(&m).contains("\"md5:abc\""));
        m["config"]["digest"] = json!(digest(0));
        m["config"]["size"] = json!(-1);
        assert!(matches!(parse(&m), Err(ManifestError::ConfigSize(_))));
    }

    #[test]
    fn refuses_bad_layers_naming_them() {
        let mut oci = raw_layer(1, "a");
        oci["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar");
        let e = err(&manifest(vec![raw_layer(0, "b"), oci]));
        assert!(e.starts_with("layer 1:") && e.contains("application/vnd.oci.image.layer.v1.tar"), "{e}");

        let mut bad_digest = raw_layer(1, "a");
        bad_digest["digest"] = json!("sha256:zz");
        assert_eq!(err(&manifest(vec![bad_digest])), "layer 0 has malformed digest \"sha256:zz\"");

        for (size, ok) in [
            (json!(1u64 << 50), true),
            (json!((1u64 << 50) + 1), false),
            (json!(-5), false),
            (json!(1.5), false),
            (json!(u64::MAX), false),
            (json!("12"), false),
        ] {
            let mut l = raw_layer(1, "a");
            l["size"] = size.clone();
            let result = parse(&manifest(vec![l]));
            assert_eq!(result.is_ok(), ok, "{size}");
            if !ok {
                let e = result.unwrap_err().to_string();
                assert!(e.contains("layer 0"), "{e}");
            }
        }
        let mut no_size = raw_layer(1, "a");
        no_size.as_object_mut().unwrap().remove("size");
        assert!(err(&manifest(vec![no_size])).contains("size missing"));
    }

    #[test]
    fn refuses_path_attacks_naming_layer_digest_and_path() {
        for bad in ["../../etc/x", "/etc/passwd", "a//b", "a/./b", "a/../b", "a\0b", ""] {
            let e = err(&manifest(vec![raw_layer(0, "ok"), raw_layer(7, bad)]));
            assert!(e.contains("layer 1") && e.contains(&digest(7)), "{e}");
            if !bad.is_empty() {
                assert!(e.contains(&format!("{bad:?}")), "{e}");
            }
        }
    }

    #[test]
    fn refuses_malformed_metadata_naming_the_layer() {
        for bad in [r#"{"mode":"#, r#"{"mode":-1}"#, r#"{"typeflag":"00"}"#, r#"{"typeflag":300}"#, "[]"] {
            let mut l = raw_layer(4, "a");
            l["annotations"][media::ANNOTATION_FILE_METADATA] = json!(bad);
            let e = err(&manifest(vec![l]));
            assert!(e.contains("layer 0") && e.contains(&digest(4)) && e.contains("metadata"), "{bad}: {e}");
        }
    }

    #[test]
    fn refuses_oversized_manifests_configs_and_metadata() {
        let mut m = manifest(vec![raw_layer(1, "a")]);
        let padding = "x".repeat(MAX_MANIFEST_BYTES);
        m["annotations"] = json!({ "pad": padding });
        let e = parse(&m).unwrap_err();
        assert!(matches!(e, ManifestError::ManifestTooLarge(n) if n > MAX_MANIFEST_BYTES), "{e}");
        assert!(e.to_string().contains("more than the limit of 4194304"), "{e}");

        let mut m = manifest(vec![]);
        m["config"]["size"] = json!(MAX_CONFIG_BYTES + 1);
        assert_eq!(err(&m), "model config is 4194305 bytes, more than the limit of 4194304");
        m["config"]["size"] = json!(MAX_CONFIG_BYTES);
        assert!(parse(&m).is_ok());

        let mut config = br#"{"descriptor":{"name":""#.to_vec();
        config.resize(MAX_CONFIG_BYTES + 1 - 3, b'n');
        config.extend_from_slice(br#""}}"#);
        assert!(
            matches!(parse_config(&config), Err(ManifestError::ConfigTooLarge(n)) if n == MAX_CONFIG_BYTES as u64 + 1)
        );
        config.remove(30);
        assert!(parse_config(&config).is_ok());

        let big_name = format!(r#"{{"name":"{}"}}"#, "n".repeat(MAX_METADATA_BYTES));
        let mut l = raw_layer(4, "a");
        l["annotations"][media::ANNOTATION_FILE_METADATA] = json!(big_name);
        let e = err(&manifest(vec![l]));
        assert!(e.contains("layer 0") && e.contains(&digest(4)) && e.contains("more than the limit of 65536"), "{e}");
        let fits = format!(r#"{{"name":"{}"}}"#, "n".repeat(MAX_METADATA_BYTES - 11));
        assert_eq!(fits.len(), MAX_METADATA_BYTES);
        assert!(FileMetadata::from_json(&fits).is_ok());
    }

    #[test]
    fn refuses_too_many_layers() {
        let m = manifest(vec![json!({}); MAX_LAYERS + 1]);
        assert!(matches!(parse(&m), Err(ManifestError::TooManyLayers(n)) if n == MAX_LAYERS + 1));
    }

    #[test]
    fn file_metadata_defaults_and_tolerance() {
        let md = FileMetadata::from_json("{}").unwrap();
        assert_eq!(md, FileMetadata::default());
        let md = FileMetadata::from_json(r#"{"mtime":"yesterday","typeflag":null,"extra":1}"#).unwrap();
        assert_eq!((md.mtime, md.typeflag), (None, 0));
        let md = FileMetadata::from_json(r#"{"mtime":12345}"#).unwrap();
        assert_eq!(md.mtime, None);
    }

    #[test]
    fn rfc3339_timestamps() {
        let at = |secs: i64, nanos: u32| unix_time(secs, nanos).unwrap();
        let cases = [
            ("1970-01-01T00:00:00Z", at(0, 0)),
            ("2025-04-01T12:00:00.123456789Z", at(1_743_508_800, 123_456_789)),
            ("2025-04-01T12:00:00+02:00", at(1_743_501_600, 0)),
            ("2025-04-01T12:00:00-01:30", at(1_743_514_200, 0)),
            ("2025-04-01t12:00:00.1z", at(1_743_508_800, 100_000_000)),
            ("2025-04-01 12:00:00.1234567891234Z", at(1_743_508_800, 123_456_789)),
            ("2024-02-29T00:00:00Z", at(1_709_164_800, 0)),
            ("2000-03-01T00:00:00Z", at(951_868_800, 0)),
            ("1969-12-31T23:59:59Z", at(-1, 0)),
            ("2016-12-31T23:59:60Z", at(1_483_228_800, 0)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_rfc3339(s), Some(want), "{s}");
        }
        for bad in [
            "",
            "2025-04-01",
            "2025-04-01T12:00:00",
            "2025-04-01T12:00:00.Z",
            "2025-13-01T12:00:00Z",
            "2025-02-29T12:00:00Z",
            "1900-02-29T00:00:00Z",
            "2025-04-31T12:00:00Z",
            "2025-04-01T24:00:00Z",
            "2025-04-01T12:00:00+2:00",
            "2025-04-01T12:00:00+02:00 ",
            "2025-04-01T12:00:00Zjunk",
            "+025-04-01T12:00:00Z",
            "2025-04-01T12:00:00+24:00",
            "0001-01-01T00:00:00Z",
            "２025-04-01T12:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_configs_of_every_shape() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let camel = json!({
            "descriptor": { "name": "qwen", "createdAt": "2025-01-01T00:00:00Z" },
            "config": { "architecture": "transformer", "format": "safetensors", "paramSize": "7B" },
            "modelfs": { "type": "layers", "diffIds": [a.to_string(), b.to_string()] }
        });
        let c = parse_config(camel.to_string().as_bytes()).unwrap();
        assert_eq!(
            c,
            ModelConfig {
                diff_ids: vec![a, b],
                name: Some("qwen".into()),
                architecture: Some("transformer".into()),
                format: Some("safetensors".into()),
            }
        );
        let snake = json!({ "modelfs": { "type": "layers", "diff_ids": [b.to_string()] } });
        assert_eq!(parse_config(snake.to_string().as_bytes()).unwrap().diff_ids, vec![b]);
        let both = json!({ "modelfs": { "diffIds": [a.to_string()], "diff_ids": [b.to_string()] } });
        assert_eq!(parse_config(both.to_string().as_bytes()).unwrap().diff_ids, vec![a]);
        assert_eq!(parse_config(b"{}").unwrap(), ModelConfig::default());
        let nulls = json!({ "descriptor": null, "config": { "format": "" }, "modelfs": null });
        assert_eq!(parse_config(nulls.to_string().as_bytes()).unwrap(), ModelConfig::default());

        let bad = json!({ "modelfs": { "diffIds": [a.to_string(), "sha256:nope"] } });
        assert_eq!(
            parse_config(bad.to_string().as_bytes()).unwrap_err().to_string(),
            "model config diffIds[1] \"sha256:nope\" is not a sha256 digest"
        );
        assert!(matches!(parse_config(b"nope"), Err(ManifestError::ConfigJson(_))));
    }
}
