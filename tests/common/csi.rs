//! kubelet's side of the CSI node plugin: the requests it sends for an inline volume
//! (built from the generated `csi.v1` types), the volume ids it makes, and its pods
//! directory, made a recursively shared mount as kubelet makes its root at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use modelpack_snapshotter::csi::proto::v1 as csi;
use sha2::Digest as _;

use super::Unmount;

pub type NodeClient = csi::node_client::NodeClient<tonic::transport::Channel>;

/// A client of the plugin's Node service at `socket`.
pub async fn node_client(socket: &Path) -> NodeClient {
    NodeClient::new(super::unix_channel(socket).await)
}

/// Mount access with `mode`.
pub fn capability(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// What kubelet sends for an inline volume with these attributes (it asks inline
/// volumes for single-node writer access whatever the pod says).
pub fn publish(volume: &str, target: &Path, attributes: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    let mut context: HashMap<String, String> = attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    context.insert("csi.storage.k8s.io/pod.name".into(), "model-server".into());
    csi::NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(capability(csi::volume_capability::access_mode::Mode::SingleNodeWriter)),
        readonly: true,
        volume_context: context,
        ..Default::default()
    }
}

/// What kubelet sends to take the volume away.
pub fn unpublish(volume: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest { volume_id: volume.into(), target_path: target.display().to_string() }
}

/// kubelet's root directory (`/var/lib/kubelet` on a node) under a temp dir.
pub struct Kubelet {
    pub root: PathBuf,
    _shared: Unmount,
}

impl Kubelet {
    /// Creates `root` and bind-mounts it on itself as a recursively shared mount, as
    /// kubelet does at start (so that volumes mounted under it reach containers that
    /// ask for host-to-container propagation). Unmounted on drop.
    pub fn start(root: &Path) -> Self {
        std::fs::create_dir_all(root.join("pods")).unwrap();
        let status = Command::new("mount").arg("--bind").arg(root).arg(root).status().unwrap();
        assert!(status.success(), "mount --bind {0} {0}", root.display());
        let _shared = Unmount(root.to_owned());
        let status = Command::new("mount").arg("--make-rshared").arg(root).status().unwrap();
        assert!(status.success(), "mount --make-rshared {}", root.display());
        Self { root: root.to_owned(), _shared }
    }

    /// The volume id kubelet gives the inline volume `volume` of pod `pod_uid`:
    /// `csi-<sha256(pod uid + volume name)>`.
    pub fn volume_id(pod_uid: &str, volume: &str) -> String {
        format!("csi-{}", hex::encode(sha2::Sha256::digest(format!("{pod_uid}{volume}"))))
    }

    /// The target path of volume `volume` of pod `pod_uid`, with its parent directory
    /// made as kubelet makes it before publishing (the plugin makes the target itself).
    pub fn target(&self, pod_uid: &str, volume: &str) -> PathBuf {
        let dir = self.root.join("pods").join(pod_uid).join("volumes/kubernetes.io~csi").join(volume);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("mount")
    }
}
