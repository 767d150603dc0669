//! Media types and annotation keys of ModelPack artifacts, for both the current
//! `cncf` family and the legacy `cnai` family written before mid-2025.
//!
//! Layer media types are parsed into [`LayerMediaType`] once, at the manifest edge;
//! nothing deeper compares media type strings.

use std::fmt;
use std::str::FromStr;

/// An OCI image manifest: the only manifest kind a model artifact may be.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// An OCI image index (a list of manifests), never a model by itself.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// A Docker schema 2 image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// A Docker schema 2 manifest list, Docker's image index.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The config of an OCI container image.
pub const OCI_IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The config of a Docker container image.
pub const DOCKER_IMAGE_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// `artifactType` of a current ModelPack manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.cncf.model.manifest.v1+json";
/// `artifactType` of a legacy ModelPack manifest.
pub const ARTIFACT_TYPE_CNAI: &str = "application/vnd.cnai.model.manifest.v1+json";
/// Config media type of a current ModelPack manifest.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.model.config.v1+json";
/// Config media type of a legacy ModelPack manifest.
pub const CONFIG_MEDIA_TYPE_CNAI: &str = "application/vnd.cnai.model.config.v1+json";

/// Layer annotation: the file's path inside the model tree.
pub const ANNOTATION_FILEPATH: &str = "org.cncf.model.filepath";
/// Layer annotation: JSON file metadata (`name`, `mode`, `uid`, `gid`, `size`, `mtime`,
/// `typeflag`).
pub const ANNOTATION_FILE_METADATA: &str = "org.cncf.model.file.metadata+json";
/// Layer annotation: the builder did not verify the file's own media type.
pub const ANNOTATION_MEDIATYPE_UNTESTED: &str = "org.cncf.model.file.mediatype.untested";
/// Legacy layer annotation for the file's path.
pub const ANNOTATION_CNAI_FILEPATH: &str = "org.cnai.model.filepath";
/// Legacy layer annotation for the file metadata.
pub const ANNOTATION_CNAI_FILE_METADATA: &str = "org.cnai.model.file.metadata+json";
/// The generic OCI title annotation, which builders also set to the file's path.
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";

/// Why a string is not a model layer media type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaTypeError {
    /// The string is not `application/vnd.{cncf|cnai}.model.<kind>.v1.<format>`.
    #[error("media type {0:?} is not a model layer type (application/vnd.cncf.model.<kind>.v1.<format>)")]
    NotModelLayer(String),
    /// The layer kind is not one the spec defines.
    #[error("media type {0:?} has an unknown layer kind")]
    UnknownKind(String),
    /// A tar with a compression we cannot serve; treating it as a raw file would
    /// expose compressed bytes under the file's name.
    #[error("media type {0:?} is a tar with an unsupported compression")]
    UnsupportedCompression(String),
}

/// Which generation of the ModelPack spec named a type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `application/vnd.cncf.model.*`, `org.cncf.model.*`.
    Cncf,
    /// `application/vnd.cnai.model.*`, `org.cnai.model.*` (before mid-2025).
    Cnai,
}

impl Family {
    /// The family whose manifest `artifactType` is `s`.
    pub fn from_artifact_type(s: &str) -> Option<Family> {
        match s {
            ARTIFACT_TYPE => Some(Family::Cncf),
            ARTIFACT_TYPE_CNAI => Some(Family::Cnai),
            _ => None,
        }
    }

    /// The family whose config media type is `s`.
    pub fn from_config_media_type(s: &str) -> Option<Family> {
        match s {
            CONFIG_MEDIA_TYPE => Some(Family::Cncf),
            CONFIG_MEDIA_TYPE_CNAI => Some(Family::Cnai),
            _ => None,
        }
    }

    /// The `artifactType` this family writes.
    pub fn artifact_type(self) -> &'static str {
        match self {
            Family::Cncf => ARTIFACT_TYPE,
            Family::Cnai => ARTIFACT_TYPE_CNAI,
        }
    }

    /// The config media type this family writes.
    pub fn config_media_type(self) -> &'static str {
        match self {
            Family::Cncf => CONFIG_MEDIA_TYPE,
            Family::Cnai => CONFIG_MEDIA_TYPE_CNAI,
        }
    }

    /// The file path annotation key this family writes.
    pub fn filepath_annotation(self) -> &'static str {
        match self {
            Family::Cncf => ANNOTATION_FILEPATH,
            Family::Cnai => ANNOTATION_CNAI_FILEPATH,
        }
    }

    /// The file metadata annotation key this family writes.
    pub fn metadata_annotation(self) -> &'static str {
        match self {
            Family::Cncf => ANNOTATION_FILE_METADATA,
            Family::Cnai => ANNOTATION_CNAI_FILE_METADATA,
        }
    }

    fn layer_prefix(self) -> &'static str {
        match self {
            Family::Cncf => "application/vnd.cncf.model.",
            Family::Cnai => "application/vnd.cnai.model.",
        }
    }
}

/// What a layer holds, as the spec classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// Model weights (`weight`).
    Weight,
    /// Configuration needed to load the weights, e.g. tokenizer files (`weight.config`).
    WeightConfig,
    /// Documentation (`doc`).
    Doc,
    /// Code (`code`).
    Code,
    /// Datasets (`dataset`).
    Dataset,
}

impl LayerKind {
    const ALL: [LayerKind; 5] =
        [LayerKind::Weight, LayerKind::WeightConfig, LayerKind::Doc, LayerKind::Code, LayerKind::Dataset];

    /// The kind's name inside a media type.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Weight => "weight",
            LayerKind::WeightConfig => "weight.config",
            LayerKind::Doc => "doc",
            LayerKind::Code => "code",
            LayerKind::Dataset => "dataset",
        }
    }
}

/// How a layer blob encodes its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerFormat {
    /// The blob is one file, byte for byte, even if its name ends in `.tar`.
    Raw,
    /// An uncompressed tar.
    Tar,
    /// A gzip-compressed tar.
    TarGzip,
    /// A zstd-compressed tar.
    TarZstd,
}

impl LayerFormat {
    /// The format's name inside a media type.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerFormat::Raw => "raw",
            LayerFormat::Tar => "tar",
            LayerFormat::TarGzip => "tar+gzip",
            LayerFormat::TarZstd => "tar+zstd",
        }
    }

    /// Whether the blob is a tar archive (of any compression).
    pub fn is_tar(self) -> bool {
        !matches!(self, LayerFormat::Raw)
    }
}

/// A parsed model layer media type: `application/vnd.{family}.model.{kind}.v1.{format}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerMediaType {
    /// Which spec generation wrote it.
    pub family: Family,
    /// What the layer holds.
    pub kind: LayerKind,
    /// How the blob encodes its files.
    pub format: LayerFormat,
}

impl LayerMediaType {
    /// A current-family media type, for builders.
    pub fn new(kind: LayerKind, format: LayerFormat) -> Self {
        Self { family: Family::Cncf, kind, format }
    }
}

impl FromStr for LayerMediaType {
    type Err = MediaTypeError;

    /// Accepts any format suffix made of token characters: some builders write the
    /// file's own format (`gguf`, `safetensors`) where the spec says `raw`, and such a
    /// layer is still one unarchived file.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let not_model = || MediaTypeError::NotModelLayer(s.to_owned());
        let (family, rest) = [Family::Cncf, Family::Cnai]
            .into_iter()
            .find_map(|f| s.strip_prefix(f.layer_prefix()).map(|rest| (f, rest)))
            .ok_or_else(not_model)?;
        let (kind, format) = rest.split_once(".v1.").ok_or_else(not_model)?;
        let kind = LayerKind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| MediaTypeError::UnknownKind(s.to_owned()))?;
        let format = match format {
            "raw" => LayerFormat::Raw,
            "tar" => LayerFormat::Tar,
            "tar+gzip" => LayerFormat::TarGzip,
            "tar+zstd" => LayerFormat::TarZstd,
            other if other.starts_with("tar+") => return Err(MediaTypeError::UnsupportedCompression(s.to_owned())),
            other if !other.is_empty() && other.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-._".contains(&b)) => {
                LayerFormat::Raw
            }
            _ => return Err(not_model()),
        };
        Ok(Self { family, kind, format })
    }
}

impl fmt::Display for LayerMediaType {
    /// The canonical spelling for the family; a non-standard raw suffix such as `gguf`
    /// is written back as `raw`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}.v1.{}", self.family.layer_prefix(), self.kind.as_str(), self.format.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LayerMediaType, MediaTypeError> {
        s.parse()
    }

    #[test]
    fn parses_every_kind_and_format_in_both_families() {
        let formats = [LayerFormat::Raw, LayerFormat::Tar, LayerFormat::TarGzip, LayerFormat::TarZstd];
        for family in [Family::Cncf, Family::Cnai] {
            for kind in LayerKind::ALL {
                for format in formats {
                    let mt = LayerMediaType { family, kind, format };
                    let s = mt.to_string();
                    assert_eq!(parse(&s), Ok(mt), "{s}");
                }
            }
        }
        assert_eq!(
            parse("application/vnd.cnai.model.weight.config.v1.tar+gzip").unwrap(),
            LayerMediaType { family: Family::Cnai, kind: LayerKind::WeightConfig, format: LayerFormat::TarGzip }
        );
        assert_eq!(
            LayerMediaType::new(LayerKind::Doc, LayerFormat::Raw).to_string(),
            "application/vnd.cncf.model.doc.v1.raw"
        );
    }

    #[test]
    fn other_suffixes_are_raw_files() {
        for s in [
            "application/vnd.cncf.model.weight.v1.gguf",
            "application/vnd.cncf.model.weight.v1.safetensors",
            "application/vnd.cnai.model.code.v1.python",
        ] {
            assert_eq!(parse(s).unwrap().format, LayerFormat::Raw, "{s}");
        }
        let gguf = parse("application/vnd.cncf.model.weight.v1.gguf").unwrap();
        assert_eq!(gguf.to_string(), "application/vnd.cncf.model.weight.v1.raw");
    }

    #[test]
    fn rejects_non_model_types_naming_them() {
        for s in [
            "",
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.cncf.model.config.v1+json",
            "application/vnd.cncf.model.weight.v1.",
            "application/vnd.cncf.model.weight.v1",
            "application/vnd.cncf.model.weight.v2.raw",
            "application/vnd.cncf.model.weights.v1.raw",
            "application/vnd.cncf.model.weight.v1.ra w",
            "application/vnd.cncf.model.weight.v1.a/b",
            "application/vnd.other.model.weight.v1.raw",
        ] {
            let err = parse(s).unwrap_err();
            assert!(err.to_string().contains(&format!("{s:?}")), "{err}");
        }
        assert_eq!(
            parse("application/vnd.cncf.model.weight.v1.tar+lz4"),
            Err(MediaTypeError::UnsupportedCompression("application/vnd.cncf.model.weight.v1.tar+lz4".into()))
        );
    }

    #[test]
    fn family_lookups() {
        assert_eq!(Family::from_artifact_type(ARTIFACT_TYPE_CNAI), Some(Family::Cnai));
        assert_eq!(Family::from_artifact_type(OCI_IMAGE_CONFIG), None);
        assert_eq!(Family::from_config_media_type(CONFIG_MEDIA_TYPE), Some(Family::Cncf));
        for family in [Family::Cncf, Family::Cnai] {
            assert_eq!(Family::from_artifact_type(family.artifact_type()), Some(family));
            assert_eq!(Family::from_config_media_type(family.config_media_type()), Some(family));
        }
        assert_eq!(Family::Cnai.filepath_annotation(), ANNOTATION_CNAI_FILEPATH);
        assert_eq!(Family::Cncf.metadata_annotation(), ANNOTATION_FILE_METADATA);
        assert!(LayerFormat::TarZstd.is_tar() && !LayerFormat::Raw.is_tar());
    }
}
