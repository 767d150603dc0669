//! The only module that speaks HTTP: an OCI distribution client (on `oci-client`) for
//! one repository, with credentials, plain HTTP for loopback registries, and retries.
//!
//! Reads say how many bytes they expect and get exactly that many or an error: a short,
//! long or failed body is retried with exponential backoff up to the configured budget.
//! Verification against digests is the caller's job ([`crate::blob`]), except for
//! manifests and small blobs fetched whole, which are checked here.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncReadExt;

use crate::config::RegistrySettings;
use crate::modelpack::media;
use crate::modelpack::Digest;

/// The largest manifest or config we accept, against a registry that sends garbage.
pub const MAX_SMALL_BLOB: u64 = 4 << 20;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference is not a valid image reference.
    #[error("invalid reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    /// The registry says the thing does not exist.
    #[error("{what} not found in {reference}")]
    NotFound { what: String, reference: String },
    /// The registry refused our credentials or asked for some.
    #[error("access to {reference} denied: {detail}")]
    Unauthorized { reference: String, detail: String },
    /// Failed after every retry.
    #[error("{what} from {reference} failed after {attempts} attempts: {last}")]
    Exhausted { what: String, reference: String, attempts: u32, last: String },
    /// The registry answered with something we cannot accept (and retrying won't help).
    #[error("{what} from {reference}: {detail}")]
    Invalid { what: String, reference: String, detail: String },
    /// Reading a local file to push failed.
    #[error("reading {path}: {source}")]
    LocalIo { path: String, source: std::io::Error },
}

/// One attempt's failure, sorted by whether trying again can help.
enum Attempt {
    Retry(String),
    Fatal(RegistryError),
}

/// A client for one repository of one registry.
pub struct Registry {
    client: Client,
    /// A client that never authenticates, for blob reads while the registry has asked
    /// for no credentials: with anonymous access to a registry that issues no token,
    /// `oci-client` probes `/v2/` before every request, which doubles the requests and
    /// the registry's CPU per byte. A 401 turns `bare_reads` off for good.
    bare: Client,
    bare_reads: AtomicBool,
    reference: Reference,
    auth: RegistryAuth,
    settings: RegistrySettings,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("reference", &self.reference.whole()).finish_non_exhaustive()
    }
}

/// Parses an image reference such as `127.0.0.1:5000/models/demo:v1` or
/// `registry.example.com/m@sha256:...`.
pub fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    s.parse::<Reference>().map_err(|e| RegistryError::BadReference { reference: s.to_owned(), reason: e.to_string() })
}

/// Whether a registry host (with optional port) is on loopback, where containerd and we
/// speak plain HTTP.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Credentials for a registry from Docker's `config.json` (`$DOCKER_CONFIG` or
/// `~/.docker`), including credential helpers; anonymous when there are none.
fn credentials_for(registry: &str) -> RegistryAuth {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    match docker_credential::get_credential(registry) {
        Ok(DockerCredential::UsernamePassword(user, pass)) => RegistryAuth::Basic(user, pass),
        Ok(DockerCredential::IdentityToken(token)) => RegistryAuth::Bearer(token),
        Err(E::ConfigNotFound | E::NoCredentialConfigured | E::ConfigReadError) => RegistryAuth::Anonymous,
        Err(e) => {
            tracing::warn!(registry, error = %e, "cannot read registry credentials; trying anonymously");
            RegistryAuth::Anonymous
        }
    }
}

impl Registry {
    /// A client for `reference`'s repository.
    pub fn new(reference: Reference, settings: RegistrySettings) -> Self {
        let registry = reference.resolve_registry().to_owned();
        let protocol = if is_loopback(&registry) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let config = || ClientConfig {
            protocol: protocol.clone(),
            connect_timeout: Some(settings.connect_timeout),
            read_timeout: Some(settings.request_timeout),
            use_monolithic_push: true,
            ..Default::default()
        };
        let auth = credentials_for(&registry);
        let bare_reads = AtomicBool::new(matches!(auth, RegistryAuth::Anonymous));
        Self { client: Client::new(config()), bare: Client::new(config()), bare_reads, auth, reference, settings }
    }

    /// The reference this client was made for.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// A client for another tag or digest in the same repository, sharing credentials.
    pub fn with_reference(&self, reference: Reference) -> Self {
        Self::new(reference, self.settings.clone())
    }

    fn name(&self) -> String {
        self.reference.whole()
    }

    /// Runs `op` with the retry budget, sorting its errors.
    async fn with_retries<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let attempts = self.settings.retries + 1;
        let mut delay = self.settings.backoff;
        let mut last = String::new();
        for attempt in 1..=attempts {
            match tokio::time::timeout(self.settings.request_timeout, op()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(Attempt::Fatal(e))) => return Err(e),
                Ok(Err(Attempt::Retry(msg))) => last = msg,
                Err(_) => last = format!("timed out after {:?}", self.settings.request_timeout),
            }
            if attempt < attempts {
                tracing::debug!(what, attempt, error = %last, "registry request failed; retrying");
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
        }
        Err(RegistryError::Exhausted { what: what.to_owned(), reference: self.name(), attempts, last })
    }

    fn classify(&self, what: &str, e: OciDistributionError) -> Attempt {
        use OciDistributionError as O;
        match e {
            O::ImageManifestNotFoundError(_) => {
                Attempt::Fatal(RegistryError::NotFound { what: what.to_owned(), reference: self.name() })
            }
            O::ServerError { code: 404, .. } => {
                Attempt::Fatal(RegistryError::NotFound { what: what.to_owned(), reference: self.name() })
            }
            O::RegistryError { ref envelope, .. }
                if envelope.errors.iter().any(|err| format!("{:?}", err.code).contains("Unknown")) =>
            {
                Attempt::Fatal(RegistryError::NotFound { what: what.to_owned(), reference: self.name() })
            }
            O::UnauthorizedError { .. } | O::AuthenticationFailure(_) | O::ServerError { code: 401 | 403, .. } => {
                Attempt::Fatal(RegistryError::Unauthorized { reference: self.name(), detail: e.to_string() })
            }
            O::DigestError(_) => Attempt::Retry(e.to_string()),
            O::ServerError { code, .. } if code < 500 && code != 408 && code != 429 => {
                Attempt::Fatal(RegistryError::Invalid {
                    what: what.to_owned(),
                    reference: self.name(),
                    detail: e.to_string(),
                })
            }
            other => Attempt::Retry(other.to_string()),
        }
    }

    /// The manifest bytes the reference names, and their digest. A digest reference is
    /// verified against the bytes.
    pub async fn fetch_manifest(&self) -> Result<(Bytes, Digest), RegistryError> {
        let accept = [media::OCI_MANIFEST, media::OCI_INDEX, media::DOCKER_MANIFEST];
        let what = "manifest";
        self.with_retries(what, || async {
            let (body, digest) = self
                .client
                .pull_manifest_raw(&self.reference, &self.auth, &accept)
                .await
                .map_err(|e| self.classify(what, e))?;
            let actual = Digest::of(&body);
            if let Some(pinned) = self.reference.digest() {
                if pinned != actual.to_string() {
                    return Err(Attempt::Retry(format!("manifest digest {actual} does not match {pinned}")));
                }
            }
            if digest != actual.to_string() {
                tracing::debug!(header = %digest, %actual, "registry reported another manifest digest");
            }
            if body.len() as u64 > MAX_SMALL_BLOB {
                return Err(Attempt::Fatal(
                    self.invalid(what, format!("manifest of {} bytes is too large", body.len())),
                ));
            }
            Ok((body, actual))
        })
        .await
    }

    fn invalid(&self, what: &str, detail: String) -> RegistryError {
        RegistryError::Invalid { what: what.to_owned(), reference: self.name(), detail }
    }

    /// A whole small blob (a config), verified against its digest.
    pub async fn fetch_small_blob(&self, digest: &Digest, size: u64) -> Result<Bytes, RegistryError> {
        let what = format!("blob {digest}");
        if size > MAX_SMALL_BLOB {
            return Err(self.invalid(&what, format!("size {size} exceeds the {MAX_SMALL_BLOB}-byte limit")));
        }
        let bytes = if size == 0 { Bytes::new() } else { self.read_range(digest, 0, size).await? };
        if Digest::of(&bytes) != *digest {
            return Err(self.invalid(&what, "content does not match its digest".to_owned()));
        }
        Ok(bytes)
    }

    /// Exactly `len` bytes of `blob` from `offset` (a ranged GET), retried on failure.
    /// The bytes are not verified here.
    pub async fn read_range(&self, blob: &Digest, offset: u64, len: u64) -> Result<Bytes, RegistryError> {
        let what = format!("bytes {offset}+{len} of blob {blob}");
        let digest = blob.to_string();
        self.with_retries(&what, || async {
            let response =
                self.pull_partial(digest.as_str(), offset, len).await.map_err(|e| self.classify(&what, e))?;
            // A registry that ignores Range sends the whole blob: skip to our window.
            let (mut stream, mut skip, whole) = match response {
                BlobResponse::Partial(s) => (s.stream, 0u64, false),
                BlobResponse::Full(s) => (s.stream, offset, true),
            };
            let mut out = BytesMut::with_capacity(len as usize);
            while let Some(piece) = stream.next().await {
                let mut piece = piece.map_err(|e| Attempt::Retry(format!("body: {e}")))?;
                if skip > 0 {
                    let n = skip.min(piece.len() as u64);
                    skip -= n;
                    piece = piece.slice(n as usize..);
                }
                let room = (len - out.len() as u64) as usize;
                if piece.len() > room {
                    if !whole {
                        return Err(Attempt::Retry(format!("long body: more than {len} bytes")));
                    }
                    out.extend_from_slice(&piece[..room]);
                    break;
                }
                out.extend_from_slice(&piece);
            }
            if out.len() as u64 != len {
                return Err(Attempt::Retry(format!("short body: got {} of {len} bytes", out.len())));
            }
            Ok(out.freeze())
        })
        .await
    }

    /// One ranged GET, unauthenticated while the registry allows it (see `bare`).
    async fn pull_partial(&self, digest: &str, offset: u64, len: u64) -> Result<BlobResponse, OciDistributionError> {
        if self.bare_reads.load(Ordering::Relaxed) {
            match self.bare.pull_blob_stream_partial(&self.reference, digest, offset, Some(len)).await {
                Err(
                    OciDistributionError::UnauthorizedError { .. }
                    | OciDistributionError::AuthenticationFailure(_)
                    | OciDistributionError::ServerError { code: 401, .. },
                ) => {
                    tracing::debug!(registry = self.reference.resolve_registry(), "registry wants a token for blobs");
                    self.bare_reads.store(false, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        self.client.store_auth_if_needed(self.reference.resolve_registry(), &self.auth).await;
        self.client.pull_blob_stream_partial(&self.reference, digest, offset, Some(len)).await
    }

    /// Streams a whole blob from `offset` to its end (for compressed layers, which are
    /// read once from start to end). The caller verifies the digest.
    pub async fn stream_blob(
        &self,
        blob: &Digest,
        offset: u64,
    ) -> Result<futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>, RegistryError> {
        let what = format!("blob {blob}");
        let digest = blob.to_string();
        self.with_retries(&what, || async {
            if offset == 0 {
                // No Range header: `bytes=0-` is unsatisfiable for an empty blob.
                let stream = self
                    .client
                    .pull_blob_stream(&self.reference, digest.as_str())
                    .await
                    .map_err(|e| self.classify(&what, e))?;
                return Ok(stream.stream);
            }
            let response = self
                .client
                .pull_blob_stream_partial(&self.reference, digest.as_str(), offset, None)
                .await
                .map_err(|e| self.classify(&what, e))?;
            match response {
                BlobResponse::Partial(s) => Ok(s.stream),
                BlobResponse::Full(s) if offset == 0 => Ok(s.stream),
                BlobResponse::Full(s) => {
                    let mut skip = offset;
                    Ok(s.stream
                        .map_ok(move |mut piece| {
                            let n = skip.min(piece.len() as u64);
                            skip -= n;
                            piece.split_off(n as usize)
                        })
                        .boxed())
                }
            }
        })
        .await
    }

    /// Whether the repository already has a blob.
    pub async fn blob_exists(&self, blob: &Digest) -> Result<bool, RegistryError> {
        let what = format!("blob {blob}");
        let digest = blob.to_string();
        self.with_retries(&what, || async {
            self.client.blob_exists(&self.reference, &digest).await.map_err(|e| self.classify(&what, e))
        })
        .await
    }

    /// Uploads an in-memory blob (configs, manifests' neighbours).
    pub async fn push_bytes(&self, data: Bytes, digest: &Digest) -> Result<(), RegistryError> {
        let what = format!("upload of blob {digest}");
        self.client.store_auth_if_needed(self.reference.resolve_registry(), &self.auth).await;
        self.with_retries(&what, || async {
            self.client
                .push_blob(&self.reference, data.clone(), &digest.to_string())
                .await
                .map(drop)
                .map_err(|e| self.classify(&what, e))
        })
        .await
    }

    /// Uploads a file as a blob in one streamed request, calling `progress` with the
    /// bytes sent so far.
    pub async fn push_file(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
        progress: impl Fn(u64) + Send + Sync + Clone + 'static,
    ) -> Result<(), RegistryError> {
        let what = format!("upload of {}", path.display());
        self.client.store_auth_if_needed(self.reference.resolve_registry(), &self.auth).await;
        let local_err = |source| RegistryError::LocalIo { path: path.display().to_string(), source };
        let attempts = self.settings.retries + 1;
        let mut last = String::new();
        for _ in 0..attempts {
            let file = tokio::fs::File::open(path).await.map_err(local_err)?;
            let progress = progress.clone();
            let stream = futures_util::stream::try_unfold((file, 0u64), move |(mut file, sent)| {
                let progress = progress.clone();
                async move {
                    let mut buf = vec![0u8; 1 << 20];
                    let n = file.read(&mut buf).await.map_err(OciDistributionError::IoError)?;
                    if n == 0 {
                        return Ok(None);
                    }
                    buf.truncate(n);
                    let sent = sent + n as u64;
                    progress(sent);
                    Ok(Some((Bytes::from(buf), (file, sent))))
                }
            });
            match self.client.push_blob_stream(&self.reference, stream, &digest.to_string(), Some(size)).await {
                Ok(_) => return Ok(()),
                Err(e) => match self.classify(&what, e) {
                    Attempt::Fatal(e) => return Err(e),
                    Attempt::Retry(msg) => last = msg,
                },
            }
        }
        Err(RegistryError::Exhausted { what, reference: self.name(), attempts, last })
    }

    /// Uploads a manifest under this client's tag (or digest), returning its digest.
    pub async fn push_manifest(&self, body: Bytes, media_type: &str) -> Result<Digest, RegistryError> {
        let what = "manifest upload";
        let content_type: http::HeaderValue = media_type
            .parse()
            .map_err(|_| self.invalid(what, format!("media type {media_type:?} is not a header value")))?;
        self.client.store_auth_if_needed(self.reference.resolve_registry(), &self.auth).await;
        self.with_retries(what, || async {
            self.client
                .push_manifest_raw(&self.reference, body.clone(), content_type.clone())
                .await
                .map_err(|e| self.classify(what, e))
        })
        .await?;
        Ok(Digest::of(&body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_plain_http() {
        for host in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.3.2.1", "[::1]:5000", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["registry.example.com", "10.0.0.1:5000", "localhost.example.com", "[::2]:80"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
