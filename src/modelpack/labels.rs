//! The companion layer's annotations, which containerd hands the snapshotter as
//! `Prepare` labels, and [`Pinned`], the `registry/repository@sha256:...` location they
//! hold. Pure data: `convert` writes these keys, the snapshotter and `companion` read
//! them, and neither has to know the other.

use super::digest::Digest;

/// The prefix of every key here. containerd passes layer annotations under
/// `containerd.io/snapshot/` to the snapshotter as labels.
pub const PREFIX: &str = "containerd.io/snapshot/modelpack.";
/// The source ModelPack artifact, pinned by digest.
pub const SOURCE: &str = "containerd.io/snapshot/modelpack.source";
/// The lazy index layer: `registry/repository@sha256:<layer digest>`.
pub const INDEX: &str = "containerd.io/snapshot/modelpack.index";
/// The index format version.
pub const VERSION: &str = "containerd.io/snapshot/modelpack.version";
/// The TOC digest of an eStargz layer, the key containers/storage (>= 1.54) looks a
/// layer up by in an additional layer store. A companion's index layer carries it with
/// the digest of its index JSON, the model's table of contents. Not under [`PREFIX`]:
/// the snapshotter does not read it.
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The TOC digest of a zstd:chunked layer, the other key containers/image reads; a layer
/// carrying both is refused by containers/image, and by the layer store.
pub const ZSTD_CHUNKED_TOC_DIGEST: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// Every key this build reads.
pub const KEYS: [&str; 3] = [SOURCE, INDEX, VERSION];

/// Where a piece of content is: a repository and a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// `registry/repository@sha256:...`, as given.
    pub reference: String,
    /// The digest.
    pub digest: Digest,
}

impl Pinned {
    /// Parses `registry/repository@sha256:...` with the distribution reference grammar
    /// the registry client uses later; says what is wrong otherwise.
    pub fn parse(value: &str) -> Result<Self, String> {
        // The registry's own parser: `oci-client`'s compiles a large regular expression
        // on first use, which a restarted daemon would pay before its first model is back.
        let r = crate::registry::parse_reference(value).map_err(|e| e.to_string())?;
        let digest = r.digest().ok_or("must be pinned by digest (name@sha256:...)")?;
        let digest = digest.parse::<Digest>().map_err(|e| e.to_string())?;
        Ok(Self { reference: value.to_owned(), digest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_references_only() {
        let d = Digest::of(b"x");
        let p = Pinned::parse(&format!("127.0.0.1:5000/models/m@{d}")).unwrap();
        assert_eq!(p.digest, d);
        assert!(Pinned::parse("127.0.0.1:5000/models/m:v1").unwrap_err().contains("pinned"));
        assert!(Pinned::parse("127.0.0.1:5000/models/m@sha256:1234").is_err());
        assert!(Pinned::parse("").is_err());
        assert!(KEYS.iter().all(|k| k.starts_with(PREFIX)));
    }
}
