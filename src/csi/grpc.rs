//! The tonic adapter of the CSI node plugin: CSI's Identity and Node services over
//! [`CsiNode`]. Requests are checked and parsed here, and [`status_of`] is the one place
//! CSI errors become gRPC codes, as the CSI specification assigns them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::proto::v1 as csi;
use super::{CsiError, CsiNode, Exclusions, Publish, PullSecret};
use crate::model::ModelError;
use crate::registry::RegistryError;

/// The gRPC code of a CSI error.
pub fn status_of(e: &CsiError) -> Status {
    let message = e.to_string();
    match e {
        CsiError::InvalidArgument(_) => Status::invalid_argument(message),
        CsiError::AlreadyExists { .. } => Status::already_exists(message),
        CsiError::Open { source, .. } => match source.as_ref() {
            ModelError::Registry(RegistryError::NotFound { .. } | RegistryError::BadReference { .. }) => {
                Status::not_found(message)
            }
            ModelError::Registry(RegistryError::Exhausted { .. }) => Status::unavailable(message),
            ModelError::Registry(RegistryError::Unauthorized { .. }) => Status::permission_denied(message),
            ModelError::Manifest { .. } | ModelError::Companion { .. } | ModelError::NoLazyIndex { .. } => {
                Status::failed_precondition(message)
            }
            _ => Status::internal(message),
        },
        CsiError::Mount { .. } | CsiError::Records(_) => Status::internal(message),
    }
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

/// The target of a request naming `volume_id` and `target_path`, both required, the
/// target absolute.
fn target_of(volume_id: &str, target_path: &str) -> Result<PathBuf, Status> {
    if volume_id.is_empty() {
        return Err(invalid("volume_id is missing"));
    }
    if target_path.is_empty() {
        return Err(invalid("target_path is missing"));
    }
    let target = PathBuf::from(target_path);
    if !target.is_absolute() {
        return Err(invalid(format!("target_path {target_path:?} is not absolute")));
    }
    Ok(target)
}

/// Checks a publish request the way the CSI specification asks, and parses it.
fn parse_publish(request: &csi::NodePublishVolumeRequest, helper_timeout: Duration) -> Result<Publish, Status> {
    let target = target_of(&request.volume_id, &request.target_path)?;
    let Some(capability) = &request.volume_capability else { return Err(invalid("volume_capability is missing")) };
    match capability.access_type {
        Some(csi::volume_capability::AccessType::Mount(_)) => {}
        Some(csi::volume_capability::AccessType::Block(_)) => {
            return Err(invalid("a model is a filesystem: block access is not offered"))
        }
        None => return Err(invalid("volume_capability has no access type")),
    }
    use csi::volume_capability::access_mode::Mode;
    let mode = capability.access_mode.as_ref().map(|m| m.mode()).unwrap_or(Mode::Unknown);
    match mode {
        // kubelet asks inline volumes for a single-node writer mode whatever the pod says:
        // granted, since only this node mounts the volume, and mounted read-only all the
        // same (writes fail with EROFS).
        Mode::SingleNodeReaderOnly
        | Mode::MultiNodeReaderOnly
        | Mode::SingleNodeWriter
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(invalid(format!("access mode {} cannot be offered: a model is read-only", mode.as_str_name())))
        }
        Mode::Unknown => return Err(invalid("volume_capability has no access mode")),
    }
    let reference = Publish::reference_of(&request.volume_context).map_err(|e| status_of(&e))?;
    let exclusions = Exclusions::of(&request.volume_context);
    let selection = exclusions.selection().map_err(|e| status_of(&e))?;
    let pull_secret = PullSecret::of(&request.secrets, helper_timeout).map_err(|e| status_of(&e))?;
    let prefetch = Publish::prefetch_of(&request.volume_context).map_err(|e| status_of(&e))?;
    Ok(Publish {
        volume_id: request.volume_id.clone(),
        target,
        reference,
        selection,
        exclusions,
        pull_secret,
        prefetch,
    })
}

/// CSI's Identity and Node services over one [`CsiNode`].
#[derive(Debug, Clone)]
pub struct CsiGrpc {
    node: Arc<CsiNode>,
    driver_name: String,
    node_id: String,
    /// How long a credential helper of the node's Docker configuration may take.
    helper_timeout: Duration,
}

impl CsiGrpc {
    /// The services of `node`, answering as `driver_name` on node `node_id`; a credential
    /// helper gets `helper_timeout` to answer.
    pub fn new(node: Arc<CsiNode>, driver_name: String, node_id: String, helper_timeout: Duration) -> Self {
        Self { node, driver_name, node_id, helper_timeout }
    }

    /// The Identity service, for a tonic server.
    pub fn identity_server(&self) -> csi::identity_server::IdentityServer<Self> {
        csi::identity_server::IdentityServer::new(self.clone())
    }

    /// The Node service, for a tonic server.
    pub fn node_server(&self) -> csi::node_server::NodeServer<Self> {
        csi::node_server::NodeServer::new(self.clone())
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for CsiGrpc {
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::new(),
        }))
    }

    /// No controller service and no topology: volumes are published on the node alone.
    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities: Vec::new() }))
    }

    async fn probe(&self, _request: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for CsiGrpc {
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let publish = parse_publish(request.get_ref(), self.helper_timeout)?;
        self.node.publish(&publish).await.map_err(|e| {
            tracing::warn!(volume = %publish.volume_id, error = %e, "cannot publish a volume");
            status_of(&e)
        })?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let target = target_of(&request.volume_id, &request.target_path)?;
        self.node.unpublish(&request.volume_id, &target).await.map_err(|e| status_of(&e))?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    /// No staging, no volume statistics: kubelet calls publish and unpublish alone.
    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities: Vec::new() }))
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
