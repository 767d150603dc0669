//! The gRPC adapter: serves a [`Service`] as containerd's snapshots API. Requests are
//! turned into plain types here, work runs on blocking threads, and [`status_of`] is the
//! one place where errors become gRPC codes — containerd relies on them (`NotFound`,
//! `AlreadyExists`, `FailedPrecondition`, `InvalidArgument`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use super::proto::snapshots as pb;
use super::proto::types::Mount as PbMount;
use super::{Mount, SnapshotError};
use crate::metadata::{Kind, MetadataError, SnapshotRecord};

/// How many records one `List` response message carries.
const LIST_BATCH: usize = 100;

/// What the gRPC adapter serves: [`super::remote::RemoteSnapshotter`], the overlay
/// snapshotter with model snapshots on top.
pub trait Service: Send + Sync + 'static {
    /// See [`super::Snapshotter::prepare`].
    fn prepare(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>, SnapshotError>;
    /// See [`super::Snapshotter::view`].
    fn view(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>, SnapshotError>;
    /// See [`super::Snapshotter::mounts`].
    fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError>;
    /// See [`super::Snapshotter::commit`].
    fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), SnapshotError>;
    /// See [`super::Snapshotter::remove`].
    fn remove(&self, key: &str) -> Result<(), SnapshotError>;
    /// See [`super::Snapshotter::stat`].
    fn stat(&self, key: &str) -> Result<SnapshotRecord, SnapshotError>;
    /// See [`super::Snapshotter::update`].
    fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotRecord, SnapshotError>;
    /// See [`super::Snapshotter::list`].
    fn list(&self, filters: &[String]) -> Result<Vec<SnapshotRecord>, SnapshotError>;
    /// See [`super::Snapshotter::usage`].
    fn usage(&self, key: &str) -> Result<crate::metadata::Usage, SnapshotError>;
    /// See [`super::Snapshotter::cleanup`].
    fn cleanup(&self) -> Result<(), SnapshotError>;
}

/// The one mapping from snapshot errors to gRPC status codes.
pub fn status_of(e: &SnapshotError) -> Status {
    let message = e.to_string();
    match e {
        SnapshotError::Metadata(m) => match m {
            MetadataError::NotFound { .. } | MetadataError::ParentNotFound { .. } => Status::not_found(message),
            MetadataError::AlreadyExists { .. } => Status::already_exists(message),
            MetadataError::ParentNotCommitted { .. }
            | MetadataError::InvalidLabel { .. }
            | MetadataError::InvalidKey { .. } => Status::invalid_argument(message),
            MetadataError::NotActive { .. } | MetadataError::HasChildren { .. } => Status::failed_precondition(message),
            _ => Status::internal(message),
        },
        SnapshotError::Filter(_) | SnapshotError::InvalidArgument(_) | SnapshotError::Labels(_) => {
            Status::invalid_argument(message)
        }
        SnapshotError::RemoteReady { .. } => Status::already_exists(message),
        SnapshotError::Model { source, .. } if matches!(**source, crate::model::ModelError::Registry(_)) => {
            Status::unavailable(message)
        }
        SnapshotError::Index { source, .. } if matches!(**source, crate::companion::CompanionError::Registry(_)) => {
            Status::unavailable(message)
        }
        SnapshotError::Unavailable { .. } => Status::unavailable(message),
        SnapshotError::Model { .. } | SnapshotError::Index { .. } | SnapshotError::Remote { .. } => {
            Status::failed_precondition(message)
        }
        SnapshotError::WrongKind { .. } => Status::failed_precondition(message),
        SnapshotError::Io { .. } => Status::internal(message),
    }
}

/// Runs blocking snapshot work off the async threads, mapping its error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|e| {
            let status = status_of(&e);
            if matches!(status.code(), tonic::Code::Internal) {
                tracing::error!(error = %e, "snapshot operation failed");
            } else {
                tracing::debug!(error = %e, code = ?status.code(), "snapshot request refused");
            }
            status
        }),
        Err(e) => Err(Status::internal(format!("snapshot worker failed: {e}"))),
    }
}

fn to_pb_mounts(mounts: Vec<Mount>) -> Vec<PbMount> {
    mounts
        .into_iter()
        .map(|m| PbMount { r#type: m.kind, source: m.source, target: String::new(), options: m.options })
        .collect()
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn to_pb_info(r: SnapshotRecord) -> pb::Info {
    let kind = match r.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name: r.key,
        parent: r.parent.unwrap_or_default(),
        kind: kind as i32,
        created_at: Some(timestamp(r.created)),
        updated_at: Some(timestamp(r.updated)),
        labels: r.labels.into_iter().collect(),
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} must not be empty")));
    }
    Ok(())
}

/// The tonic service over a [`Service`].
#[derive(Debug)]
pub struct Grpc<S> {
    inner: Arc<S>,
}

impl<S: Service> Grpc<S> {
    /// Serves `inner`.
    pub fn new(inner: Arc<S>) -> Self {
        Self { inner }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::snapshots_server::SnapshotsServer<Self> {
        pb::snapshots_server::SnapshotsServer::new(self)
    }
}

#[tonic::async_trait]
impl<S: Service> pb::snapshots_server::Snapshots for Grpc<S> {
    #[tracing::instrument(skip_all, fields(key = %request.get_ref().key, parent = %request.get_ref().parent))]
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        require("key", &r.key)?;
        let inner = self.inner.clone();
        let mounts = blocking(move || inner.prepare(&r.key, &r.parent, labels(r.labels))).await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts: to_pb_mounts(mounts) }))
    }

    #[tracing::instrument(skip_all, fields(key = %request.get_ref().key, parent = %request.get_ref().parent))]
    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        require("key", &r.key)?;
        let inner = self.inner.clone();
        let mounts = blocking(move || inner.view(&r.key, &r.parent, labels(r.labels))).await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts: to_pb_mounts(mounts) }))
    }

    #[tracing::instrument(skip_all, fields(key = %request.get_ref().key))]
    async fn mounts(&self, request: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let inner = self.inner.clone();
        let mounts = blocking(move || inner.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: to_pb_mounts(mounts) }))
    }

    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name, key = %request.get_ref().key))]
    async fn commit(&self, request: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        require("name", &r.name)?;
        let inner = self.inner.clone();
        blocking(move || inner.commit(&r.name, &r.key, labels(r.labels))).await?;
        Ok(Response::new(()))
    }

    #[tracing::instrument(skip_all, fields(key = %request.get_ref().key))]
    async fn remove(&self, request: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let inner = self.inner.clone();
        blocking(move || inner.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    #[tracing::instrument(skip_all, fields(key = %request.get_ref().key))]
    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let inner = self.inner.clone();
        let record = blocking(move || inner.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse { info: Some(to_pb_info(record)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r.info.ok_or_else(|| Status::invalid_argument("info must be set"))?;
        require("info.name", &info.name)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let inner = self.inner.clone();
        let record = blocking(move || inner.update(&info.name, labels(info.labels), &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse { info: Some(to_pb_info(record)) }))
    }

    type ListStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    #[tracing::instrument(skip_all, fields(filters = ?request.get_ref().filters))]
    async fn list(&self, request: Request<pb::ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let inner = self.inner.clone();
        let records = blocking(move || inner.list(&r.filters)).await?;
        let mut batches = Vec::new();
        let mut records = records.into_iter().map(to_pb_info).peekable();
        while records.peek().is_some() {
            batches.push(Ok(pb::ListSnapshotsResponse { info: records.by_ref().take(LIST_BATCH).collect() }));
        }
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    #[tracing::instrument(skip_all, fields(key = %request.get_ref().key))]
    async fn usage(&self, request: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let inner = self.inner.clone();
        let usage = blocking(move || inner.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse { size: usage.size, inodes: usage.inodes }))
    }

    #[tracing::instrument(skip_all)]
    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let inner = self.inner.clone();
        blocking(move || inner.cleanup()).await?;
        Ok(Response::new(()))
    }
}
