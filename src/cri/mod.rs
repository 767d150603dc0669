//! The CRI image service proxy: kubelet's pull secrets for the containerd snapshotter.
//! kubelet hands a pod's pull secret to the runtime in `PullImage`'s `AuthConfig`, and
//! containerd never passes it on to a snapshotter, so a model in a private registry
//! could only be fetched with the node's own Docker configuration. Pointed at by kubelet's
//! `--image-service-endpoint`, this serves CRI's `runtime.v1.ImageService` and forwards
//! every call (`ListImages`, `ImageStatus`, `PullImage`, `RemoveImage`, `ImageFsInfo`) to
//! containerd's CRI endpoint as the bytes kubelet sent, answering with the bytes and
//! status containerd answered (stargz-snapshotter's "CRI keychain" does the same).
//!
//! On the way it reads a `PullImage`'s image and credentials and notes them in the
//! [`CriKeychain`]: the snapshotter may use them for the model that pull prepares, and
//! they are remembered for the image only once containerd's pull with them succeeded
//! (the keychain decides what is trusted, and for which registry). The credentials are
//! read as containerd reads them ([`pull_auth`]), so that a pull's success vouches for
//! exactly what was remembered. Nothing here logs or returns a secret.

pub mod proto;

use std::path::Path;

use bytes::Bytes;
use oci_client::secrets::RegistryAuth;
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use self::proto::v1::image_service_client::ImageServiceClient;
use self::proto::v1::image_service_server::{ImageService, ImageServiceServer};
use self::proto::v1::{AuthConfig, PullImageRequest, PullImageResponse};
use crate::registry::credentials::keychain::{CriKeychain, ImageKey, ImageName, Pull};

/// Largest message taken or passed on, either way: kubelet's own limit (16 MiB), which a
/// `ListImages` answer of a node with many images may need beyond gRPC's 4 MiB default.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Metadata not passed on: compression is negotiated by each connection for itself, and
/// neither of ours compresses.
const HOP_BY_HOP: [&str; 2] = ["grpc-encoding", "grpc-accept-encoding"];

/// Why the proxy cannot start, or a pull's credentials are not noted. No variant holds a
/// secret.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// containerd's address cannot be a gRPC endpoint.
    #[error("containerd address {address}: {reason}")]
    Containerd { address: String, reason: String },
    /// The pulled image is not a reference the keychain can key.
    #[error(transparent)]
    Image(#[from] crate::registry::credentials::keychain::KeychainError),
    /// The `AuthConfig` cannot be read (containerd refuses the pull too).
    #[error("the credentials given for {image} cannot be read: {reason}")]
    Auth { image: String, reason: &'static str },
}

/// The proxy: containerd's image service behind a keychain.
#[derive(Debug, Clone)]
pub struct CriProxy {
    containerd: ImageServiceClient<Channel>,
    keychain: CriKeychain,
}

impl CriProxy {
    /// A proxy forwarding to the CRI endpoint on containerd's socket `containerd`,
    /// connected when first used (and again after containerd restarts), noting pulls'
    /// credentials in `keychain`.
    pub fn new(containerd: &Path, keychain: CriKeychain) -> Result<Self, CriError> {
        let bad = |reason: String| CriError::Containerd { address: containerd.display().to_string(), reason };
        let address = containerd.to_str().ok_or_else(|| bad("not UTF-8".to_owned()))?;
        let channel =
            Endpoint::from_shared(format!("unix://{address}")).map_err(|e| bad(e.to_string()))?.connect_lazy();
        let containerd = ImageServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { containerd, keychain })
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> ImageServiceServer<Self> {
        ImageServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Notes the credentials of the pull `request` (the raw `PullImageRequest`) as a pull
    /// now running, if it carries any that the keychain can bind to a registry.
    fn note_pull(&self, request: &Bytes) -> Option<Pull> {
        let request = PullImageRequest::decode(request.clone()).ok()?;
        let image = request.image.map(|i| i.image).unwrap_or_default();
        let auth = request.auth?;
        match pull_auth(&image, &auth) {
            Ok(Some((name, auth))) => {
                tracing::debug!(image = %name.key, registry = %name.registry, "PullImage with credentials");
                Some(self.keychain.pulling(&name, auth))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "PullImage's credentials are not kept");
                None
            }
        }
    }
}

/// Forwards a call: its metadata (timeout included) and message as they came, less what
/// one connection negotiates for itself.
fn forward(request: Request<Bytes>) -> Request<Bytes> {
    let (mut metadata, _, message) = request.into_parts();
    for key in HOP_BY_HOP {
        metadata.remove(key);
    }
    Request::from_parts(metadata, Default::default(), message)
}

#[tonic::async_trait]
impl ImageService for CriProxy {
    #[tracing::instrument(skip_all)]
    async fn list_images(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        self.containerd.clone().list_images(forward(request)).await
    }

    #[tracing::instrument(skip_all)]
    async fn image_status(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        self.containerd.clone().image_status(forward(request)).await
    }

    #[tracing::instrument(skip_all)]
    async fn pull_image(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let pull = self.note_pull(request.get_ref());
        // A failed or abandoned pull drops `pull`, and its credentials with it.
        let response = match self.containerd.clone().pull_image(forward(request)).await {
            Ok(response) => response,
            Err(status) => {
                if pull.is_some() {
                    tracing::debug!(code = ?status.code(), "PullImage failed; its credentials are forgotten");
                }
                return Err(status);
            }
        };
        if let Some(pull) = pull {
            let answered = PullImageResponse::decode(response.get_ref().clone()).map(|r| r.image_ref);
            let aliases: Vec<ImageKey> = answered.iter().filter_map(|r| ImageKey::parse(r).ok()).collect();
            tracing::debug!(image_ref = ?answered.ok(), "PullImage succeeded; its credentials are remembered");
            pull.succeeded(&aliases);
        }
        Ok(response)
    }

    #[tracing::instrument(skip_all)]
    async fn remove_image(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        self.containerd.clone().remove_image(forward(request)).await
    }

    #[tracing::instrument(skip_all)]
    async fn image_fs_info(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        self.containerd.clone().image_fs_info(forward(request)).await
    }
}

/// The credentials containerd pulls `image` with, given `auth`, and the image they are
/// for; `None` when containerd pulls anonymously. Read as containerd's CRI plugin reads
/// them: only when `server_address` is empty or names the registry containerd contacts
/// for the image, then the user name and password, else the identity token, else `auth`
/// (base64 `user:password`). containerd never sends `registry_token`, so a pull proves
/// nothing about one and it is not kept.
pub fn pull_auth(image: &str, auth: &AuthConfig) -> Result<Option<(ImageName, RegistryAuth)>, CriError> {
    let name = ImageName::parse(image)?;
    if !auth.server_address.is_empty() && server_host(&auth.server_address) != Some(contacted_host(&name)) {
        return Ok(None);
    }
    let unreadable = |reason| CriError::Auth { image: name.key.to_string(), reason };
    let found = if !auth.username.is_empty() {
        RegistryAuth::Basic(auth.username.clone(), auth.password.clone())
    } else if !auth.identity_token.is_empty() {
        // As an identity token from Docker's config.json is used.
        RegistryAuth::Bearer(auth.identity_token.clone())
    } else if !auth.auth.is_empty() {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&auth.auth)
            .map_err(|_| unreadable("`auth` is not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| unreadable("`auth` is not UTF-8"))?;
        let (user, password) = decoded.split_once(':').ok_or_else(|| unreadable("`auth` is not user:password"))?;
        RegistryAuth::Basic(user.to_owned(), password.trim_matches('\0').to_owned())
    } else {
        return Ok(None);
    };
    Ok(Some((name, found)))
}

/// The host of a `server_address` URL (`https://host[:port]/...`), as Go's URL parser
/// finds it; `None` without a scheme, where containerd finds no host either.
fn server_host(address: &str) -> Option<&str> {
    let (_, rest) = address.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    Some(host.rsplit_once('@').map_or(host, |(_, h)| h))
}

/// The host containerd contacts for `name` (Docker Hub's registry is reached at
/// `registry-1.docker.io`).
fn contacted_host(name: &ImageName) -> &str {
    match name.registry.as_str() {
        "index.docker.io" | "docker.io" => "registry-1.docker.io",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "pull-Secret-3c9e";
    const IMAGE: &str = "127.0.0.1:5000/models/m:v1";

    fn read(auth: AuthConfig) -> Option<RegistryAuth> {
        pull_auth(IMAGE, &auth).unwrap().map(|(name, auth)| {
            assert_eq!(name.registry, "127.0.0.1:5000");
            auth
        })
    }

    #[test]
    fn credentials_are_read_as_containerd_reads_them() {
        let user = AuthConfig { username: "alice".into(), password: SECRET.into(), ..Default::default() };
        assert_eq!(read(user.clone()), Some(RegistryAuth::Basic("alice".into(), SECRET.into())));
        let all = AuthConfig { identity_token: "token".into(), auth: base64_of("bob:x"), ..user.clone() };
        assert_eq!(read(all), Some(RegistryAuth::Basic("alice".into(), SECRET.into())), "user name first");
        let token = AuthConfig { identity_token: SECRET.into(), auth: base64_of("bob:x"), ..Default::default() };
        assert_eq!(read(token), Some(RegistryAuth::Bearer(SECRET.into())), "then the identity token");
        let encoded = AuthConfig { auth: base64_of(format!("bob:{SECRET}:more\0\0")), ..Default::default() };
        assert_eq!(read(encoded), Some(RegistryAuth::Basic("bob".into(), format!("{SECRET}:more"))), "then auth");
        let registry_token = AuthConfig { registry_token: SECRET.into(), ..Default::default() };
        assert_eq!(read(registry_token), None, "containerd never sends a registry token");
        assert_eq!(read(AuthConfig::default()), None);
    }

    #[test]
    fn credentials_for_another_server_are_not_the_images() {
        let with = |server: &str| AuthConfig { server_address: server.into(), ..user() };
        assert!(read(with("http://127.0.0.1:5000")).is_some());
        assert!(read(with("https://127.0.0.1:5000/v2/")).is_some());
        for other in ["https://127.0.0.1:5001", "127.0.0.1:5000", "https://evil.example.com/127.0.0.1:5000"] {
            assert_eq!(read(with(other)), None, "{other}");
        }
        let hub = |server: &str| {
            let auth = AuthConfig { server_address: server.into(), ..user() };
            pull_auth("busybox", &auth).unwrap().is_some()
        };
        assert!(hub("https://registry-1.docker.io"));
        assert!(!hub("https://index.docker.io/v1/"), "containerd contacts registry-1.docker.io, and pulls anonymously");
    }

    fn user() -> AuthConfig {
        AuthConfig { username: "alice".into(), password: SECRET.into(), ..Default::default() }
    }

    #[test]
    fn unreadable_credentials_show_no_secret() {
        for auth in [format!("{SECRET}!"), base64_of(SECRET), base64_of([0xff, 0xfe])] {
            let e = pull_auth(IMAGE, &AuthConfig { auth, ..Default::default() }).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(shown.contains(IMAGE) && !shown.contains(SECRET), "{shown}");
        }
        assert!(matches!(pull_auth("Not A Reference", &user()), Err(CriError::Image(_))));
    }

    fn base64_of(data: impl AsRef<[u8]>) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(data)
    }
}
