//! Kubernetes' path, without kubelet: containerd's CRI API driven by a CRI client, with
//! the snapshotter as the node's snapshotter. containerd 1.6 (Debian) pulls a model
//! companion lazily; containerd 2.x runs a pod whose container has the model as an OCI
//! image volume and prints the model files' sha256, which must match the source. With
//! the daemon's CRI image service proxy in front of containerd 2.x (kubelet's
//! `--image-service-endpoint`), a pull secret given to `PullImage` opens a model in a
//! registry that wants a password, on a node without any Docker configuration.

mod common;

use common::containerd::{Containerd, Flavor};
use common::cri::{
    cri_prerequisites, fixture, image_volume, printed_sums, private_model, sha256_every_file, spec, sums, Cri,
};
use common::*;
use k8s_cri::v1 as cri;
use modelpack_snapshotter::config::RegistrySettings;
use modelpack_snapshotter::registry::credentials::CredentialStore;
use modelpack_snapshotter::snapshotter::proto::snapshots as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_16_cri_pulls_a_model_companion_lazily() {
    if !cri_prerequisites(Flavor::V16) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tokio::task::block_in_place(|| fixture(tmp.path()));
    let serve = SnapshotterProcess::start(&tmp.path().join("snapshotter"));
    let containerd = Containerd::start_cri(
        Flavor::V16,
        &tmp.path().join("containerd"),
        &serve.socket,
        &f.sandbox,
        &[f.proxy.addr()],
    );
    let mut cri = Cri::connect(&containerd.socket).await;

    f.proxy.reset_counts();
    cri.pull(&f.companion).await;
    let (_, fetched) = f.proxy.blob_counts();
    assert!(fetched < f.model_bytes / 8, "PullImage fetched {fetched} bytes of a {}-byte model", f.model_bytes);

    // The model is mounted as the companion's layer snapshot.
    let mut client = snapshots_client(&serve.socket).await;
    let names = snapshot_names(&serve.socket, "labels.\"containerd.io/snapshot/modelpack.source\"").await;
    assert_eq!(names.len(), 1, "one model snapshot, made from labels: {names:?}\n{}", containerd.log());
    let mounts = client
        .view(pb::ViewSnapshotRequest {
            snapshotter: "modelpack".into(),
            key: "check".into(),
            parent: names[0].clone(),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let target = tmp.path().join("view");
    let _m = mount_all(&mounts, &target);
    assert_eq!(sums(&target), sums(&f.src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_runs_a_pod_with_the_model_as_an_image_volume() {
    if !cri_prerequisites(Flavor::V2) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tokio::task::block_in_place(|| fixture(tmp.path()));
    let serve = SnapshotterProcess::start(&tmp.path().join("snapshotter"));
    let containerd =
        Containerd::start_cri(Flavor::V2, &tmp.path().join("containerd"), &serve.socket, &f.sandbox, &[f.proxy.addr()]);
    let mut cri = Cri::connect(&containerd.socket).await;

    f.proxy.reset_counts();
    cri.pull(&f.companion).await;
    let (_, fetched) = f.proxy.blob_counts();
    assert!(
        fetched < f.model_bytes / 8,
        "PullImage fetched {fetched} bytes of a {}-byte model\n{}",
        f.model_bytes,
        containerd.log()
    );
    cri.pull(&f.busybox).await;

    let logs = tmp.path().join("logs");
    let sandbox = cri.run_sandbox("model-pod", &logs).await;
    let (code, log) = cri
        .run_to_exit(
            &sandbox,
            "reader",
            &f.busybox,
            &["/bin/sh", "-c", &sha256_every_file("/model")],
            vec![image_volume(&f.companion, "/model")],
            &logs,
        )
        .await;
    cri.remove_sandbox(&sandbox.0).await;
    assert_eq!(code, 0, "container failed:\n{log}\n{}", containerd.log());
    assert_eq!(printed_sums(&log), sums(&f.src), "the container saw the model's files");
}

const PASSWORD: &str = "kubelet-Secret-6d2f";
const WRONG: &str = "wrong-Secret-1a8e";

/// A `serve` configuration logging at debug level whose CRI proxy forwards to the
/// containerd that will run in `containerd_dir`.
fn cri_proxy_config(dir: &std::path::Path, containerd_dir: &std::path::Path) -> std::path::PathBuf {
    let containerd = containerd_dir.join("containerd.sock");
    let text = format!(
        "log_level = \"modelpack_snapshotter=debug\"\n[cri]\ncontainerd_address = \"{}\"\n",
        containerd.display()
    );
    write_config(dir, &text)
}

fn basic_auth(user: &str, password: &str) -> Option<cri::AuthConfig> {
    Some(cri::AuthConfig { username: user.into(), password: password.into(), ..Default::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_reads_a_private_model_with_the_pull_secret_kubelet_gave_the_cri_proxy() {
    if !cri_prerequisites(Flavor::V2) || !require_tools(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tokio::task::block_in_place(|| fixture(tmp.path()));
    let private = tokio::task::block_in_place(|| private_model(tmp.path(), "dana", PASSWORD));
    // The daemon finds no Docker configuration (and containerd has none either): only the
    // pull secret kubelet hands over can open the model.
    let no_docker = tmp.path().join("no-docker");
    std::fs::create_dir_all(&no_docker).unwrap();
    let containerd_dir = tmp.path().join("containerd");
    let cri_socket = tmp.path().join("cri/cri.sock");
    let serve = SnapshotterProcess::start_cri_proxy(
        &tmp.path().join("snapshotter"),
        &cri_socket,
        &cri_proxy_config(&tmp.path().join("etc"), &containerd_dir),
        &[("DOCKER_CONFIG", no_docker.as_os_str())],
    );
    let registries = [f.proxy.addr(), private.proxy.addr()];
    let containerd = Containerd::start_cri(Flavor::V2, &containerd_dir, &serve.socket, &f.sandbox, &registries);
    let mut kubelet = Cri::connect_split(&containerd.socket, &cri_socket).await;

    // A wrong password fails at PullImage, and leaves nothing remembered: a model of that
    // image prepared now (as containerd would, naming the image) gets no credentials.
    let e = kubelet.pull_with(&private.companion, basic_auth(&private.user, WRONG)).await.unwrap_err();
    assert!(!e.message().contains(WRONG), "{e:?}");
    let with_password =
        CredentialStore::new(Some(private.docker_config.clone()), None, std::time::Duration::from_secs(10));
    let settings = RegistrySettings { credentials: Some(with_password), ..RegistrySettings::default() };
    let layer = companion_layer_with(&private.companion, settings).await;
    let mut labels = layer.prepare_labels();
    labels.insert("containerd.io/snapshot/cri.image-ref".into(), private.companion.clone());
    let mut snapshots = snapshots_client(&serve.socket).await;
    let request = pb::PrepareSnapshotRequest {
        snapshotter: "modelpack".into(),
        key: format!("extract-probe {}", layer.digest),
        parent: String::new(),
        labels,
    };
    let e = snapshots.prepare(request).await.unwrap_err();
    assert!(e.message().contains("denied"), "the model was opened without a password: {e:?}\n{}", serve.log());
    let log = serve.log();
    let anonymous = format!("registry=\"{}\" source=anonymous", private.proxy.addr());
    assert!(log.contains(&anonymous) && !log.contains("source=the CRI pull"), "{log}");

    // With the right one the model is mounted while containerd pulls, fetching a little.
    private.proxy.reset_counts();
    kubelet.pull_with(&private.companion, basic_auth(&private.user, &private.password)).await.unwrap();
    let (_, at_pull) = private.proxy.blob_counts();
    assert!(at_pull < private.model_bytes / 8, "PullImage fetched {at_pull} of {} bytes", private.model_bytes);
    let names = snapshot_names(&serve.socket, "labels.\"containerd.io/snapshot/modelpack.source\"").await;
    assert_eq!(names.len(), 1, "{names:?}\n{}", containerd.log());
    let stat = pb::StatSnapshotRequest { snapshotter: "modelpack".into(), key: names[0].clone() };
    let info = snapshots.stat(stat).await.unwrap().into_inner().info.unwrap();
    assert_eq!(info.labels.get("containerd.io/snapshot/cri.image-ref"), Some(&private.companion));
    kubelet.pull(&f.busybox).await;

    // The pod reads every file of the model: the bytes are fetched now, with the
    // credentials the pull proved.
    let logs = tmp.path().join("logs");
    let sandbox = kubelet.run_sandbox("private-model-pod", &logs).await;
    let (code, log) = kubelet
        .run_to_exit(
            &sandbox,
            "reader",
            &f.busybox,
            &["/bin/sh", "-c", &sha256_every_file("/model")],
            vec![image_volume(&private.companion, "/model")],
            &logs,
        )
        .await;
    kubelet.remove_sandbox(&sandbox.0).await;
    assert_eq!(code, 0, "container failed:\n{log}\n{}\n{}", serve.log(), containerd.log());
    assert_eq!(printed_sums(&log), sums(&private.src), "the container saw the model's files");
    let (_, read) = private.proxy.blob_counts();
    assert!(read >= private.model_bytes, "the reads fetched {read} of {} bytes", private.model_bytes);

    let log = serve.log();
    let source = format!("source=the CRI pull of {}", private.companion);
    assert!(log.contains(&source), "the log does not name the CRI pull as the source: {log}");
    let wrong_auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{WRONG}", private.user))
    };
    for secret in [PASSWORD, WRONG, &private.auth, &wrong_auth] {
        assert!(!log.contains(secret), "the log shows a secret");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cri_proxy_forwards_every_image_call_to_containerd() {
    if !cri_prerequisites(Flavor::V2) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tokio::task::block_in_place(|| fixture(tmp.path()));
    let containerd_dir = tmp.path().join("containerd");
    let cri_socket = tmp.path().join("cri/cri.sock");
    let config = cri_proxy_config(&tmp.path().join("etc"), &containerd_dir);
    let serve = SnapshotterProcess::start_cri_proxy(&tmp.path().join("snapshotter"), &cri_socket, &config, &[]);
    let containerd = Containerd::start_cri(Flavor::V2, &containerd_dir, &serve.socket, &f.sandbox, &[f.proxy.addr()]);
    let mut proxied = Cri::connect_split(&containerd.socket, &cri_socket).await;
    let mut direct = Cri::connect(&containerd.socket).await;

    let image_ref = proxied.pull(&f.busybox).await;
    proxied.pull(&f.companion).await;
    let status = |verbose| cri::ImageStatusRequest { image: Some(spec(&f.busybox)), verbose };
    let through = proxied.images.image_status(status(true)).await.unwrap().into_inner();
    assert_eq!(through, direct.images.image_status(status(true)).await.unwrap().into_inner());
    assert_eq!(through.image.as_ref().map(|i| i.id.clone()), Some(image_ref));
    assert!(!through.info.is_empty(), "verbose information is passed on");

    let list = || cri::ListImagesRequest { filter: None };
    let mut through = proxied.images.list_images(list()).await.unwrap().into_inner().images;
    let mut straight = direct.images.list_images(list()).await.unwrap().into_inner().images;
    through.sort_by(|a, b| a.id.cmp(&b.id));
    straight.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(through, straight);
    assert!(through.iter().any(|i| i.repo_tags.contains(&f.companion)), "{through:?}");

    let fs = |c: cri::ImageFsInfoResponse| {
        let mounts = |u: Vec<cri::FilesystemUsage>| u.into_iter().map(|u| u.fs_id.unwrap().mountpoint).collect();
        (mounts(c.image_filesystems), mounts(c.container_filesystems))
    };
    let through: (Vec<String>, Vec<String>) =
        fs(proxied.images.image_fs_info(cri::ImageFsInfoRequest {}).await.unwrap().into_inner());
    assert!(!through.0.is_empty());
    assert_eq!(through, fs(direct.images.image_fs_info(cri::ImageFsInfoRequest {}).await.unwrap().into_inner()));

    // containerd's errors come back as it gave them.
    let missing = format!("{}/library/missing:v1", f.proxy.addr());
    let through = proxied.pull_with(&missing, None).await.unwrap_err();
    let straight = direct.pull_with(&missing, None).await.unwrap_err();
    assert_eq!((through.code(), through.message()), (straight.code(), straight.message()));

    let remove = cri::RemoveImageRequest { image: Some(spec(&f.busybox)) };
    proxied.images.remove_image(remove).await.unwrap();
    let gone = direct.images.image_status(status(false)).await.unwrap().into_inner();
    assert_eq!(gone.image, None, "RemoveImage reached containerd");
}
