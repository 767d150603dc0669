//! The snapshotter test suite: containerd's snapshots API served by a real `serve`
//! process over its Unix socket, with the returned mounts performed for real (overlay
//! and bind), covering what containerd's own snapshotter test suite checks.

mod common;

use std::collections::HashMap;

use common::*;
use modelpack_snapshotter::snapshotter::proto::snapshots as pb;
use tonic::Code;

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

async fn prepare(
    c: &mut SnapshotsClient,
    key: &str,
    parent: &str,
) -> Result<Vec<modelpack_snapshotter::snapshotter::proto::types::Mount>, tonic::Status> {
    let r = pb::PrepareSnapshotRequest {
        snapshotter: "modelpack".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    };
    c.prepare(r).await.map(|r| r.into_inner().mounts)
}

async fn view(
    c: &mut SnapshotsClient,
    key: &str,
    parent: &str,
) -> Result<Vec<modelpack_snapshotter::snapshotter::proto::types::Mount>, tonic::Status> {
    let r = pb::ViewSnapshotRequest {
        snapshotter: "modelpack".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    };
    c.view(r).await.map(|r| r.into_inner().mounts)
}

async fn commit(c: &mut SnapshotsClient, name: &str, key: &str) -> Result<(), tonic::Status> {
    let r = pb::CommitSnapshotRequest {
        snapshotter: "modelpack".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    };
    c.commit(r).await.map(drop)
}

async fn stat(c: &mut SnapshotsClient, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest { snapshotter: "modelpack".into(), key: key.into() })
        .await
        .map(|r| r.into_inner().info.unwrap())
}

async fn remove(c: &mut SnapshotsClient, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest { snapshotter: "modelpack".into(), key: key.into() }).await.map(drop)
}

async fn list(c: &mut SnapshotsClient, filters: &[&str]) -> Vec<pb::Info> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "modelpack".into(),
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        out.extend(batch.info);
    }
    out
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

/// Prepares `key` on `parent`, mounts it, runs `f` in the mount, unmounts, commits as `name`.
async fn layer(
    c: &mut SnapshotsClient,
    tmp: &std::path::Path,
    name: &str,
    parent: &str,
    f: impl FnOnce(&std::path::Path),
) {
    let key = format!("{name}-active");
    let mounts = prepare(c, &key, parent).await.unwrap();
    let target = tmp.join(format!("m-{name}"));
    {
        let _m = mount_all(&mounts, &target);
        f(&target);
    }
    commit(c, name, &key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_views_and_removal_order() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _serve = SnapshotterProcess::start(&tmp.path().join("root"));
    let mut c = snapshots_client(&_serve.socket).await;

    layer(&mut c, tmp.path(), "base", "", |d| {
        std::fs::create_dir_all(d.join("etc")).unwrap();
        std::fs::write(d.join("etc/hostname"), b"base\n").unwrap();
        std::fs::write(d.join("gone"), b"to be deleted").unwrap();
    })
    .await;
    layer(&mut c, tmp.path(), "top", "base", |d| {
        assert_eq!(std::fs::read(d.join("etc/hostname")).unwrap(), b"base\n", "the parent is visible");
        std::fs::write(d.join("etc/hostname"), b"top\n").unwrap();
        std::fs::remove_file(d.join("gone")).unwrap();
        std::fs::write(d.join("new"), b"new").unwrap();
    })
    .await;

    let info = stat(&mut c, "top").await.unwrap();
    assert_eq!((info.name.as_str(), info.parent.as_str(), info.kind), ("top", "base", pb::Kind::Committed as i32));
    assert_eq!(stat(&mut c, "base").await.unwrap().parent, "");

    // A view shows the merged layers and refuses writes.
    let mounts = view(&mut c, "v", "top").await.unwrap();
    {
        let target = tmp.path().join("m-view");
        let _m = mount_all(&mounts, &target);
        assert_eq!(std::fs::read(target.join("etc/hostname")).unwrap(), b"top\n");
        assert!(!target.join("gone").exists(), "whiteouts apply");
        assert_eq!(std::fs::read(target.join("new")).unwrap(), b"new");
        assert!(std::fs::write(target.join("x"), b"x").is_err(), "views are read-only");
    }
    assert_eq!(stat(&mut c, "v").await.unwrap().kind, pb::Kind::View as i32);
    assert_eq!(code(commit(&mut c, "v2", "v").await), Code::FailedPrecondition, "views do not commit");

    // A view of several layers is an overlay of lowerdirs only.
    let mounts = view(&mut c, "v-base", "base").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    let child = prepare(&mut c, "child", "top").await.unwrap();
    assert_eq!(child[0].r#type, "overlay");
    assert!(child[0].options.iter().any(|o| o.starts_with("lowerdir=") && o.matches(':').count() == 1), "{child:?}");

    // Removal order: parents go after their children.
    assert_eq!(code(remove(&mut c, "base").await), Code::FailedPrecondition);
    assert_eq!(code(remove(&mut c, "top").await), Code::FailedPrecondition);
    for key in ["child", "v", "v-base", "top", "base"] {
        remove(&mut c, key).await.unwrap_or_else(|e| panic!("remove {key}: {e}"));
    }
    assert!(list(&mut c, &[]).await.is_empty());
    assert_eq!(code(stat(&mut c, "base").await), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_containerds_codes() {
    if !prerequisites(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let serve = SnapshotterProcess::start(&tmp.path().join("root"));
    let mut c = snapshots_client(&serve.socket).await;

    prepare(&mut c, "a", "").await.unwrap();
    assert_eq!(code(prepare(&mut c, "a", "").await), Code::AlreadyExists);
    assert_eq!(code(prepare(&mut c, "b", "missing").await), Code::NotFound);
    assert_eq!(code(prepare(&mut c, "b", "a").await), Code::InvalidArgument, "parent must be committed");
    assert_eq!(code(prepare(&mut c, "", "").await), Code::InvalidArgument);
    commit(&mut c, "a-committed", "a").await.unwrap();
    assert_eq!(code(stat(&mut c, "a").await), Code::NotFound, "the active key is gone after commit");
    prepare(&mut c, "c", "a-committed").await.unwrap();
    assert_eq!(code(commit(&mut c, "a-committed", "c").await), Code::AlreadyExists);
    assert_eq!(code(commit(&mut c, "x", "missing").await), Code::NotFound);
    let r = c.mounts(pb::MountsRequest { snapshotter: "modelpack".into(), key: "a-committed".into() }).await;
    assert_eq!(code(r), Code::FailedPrecondition, "committed snapshots have no mounts");
    let r = c.mounts(pb::MountsRequest { snapshotter: "modelpack".into(), key: "missing".into() }).await;
    assert_eq!(code(r), Code::NotFound);
    assert_eq!(code(remove(&mut c, "missing").await), Code::NotFound);

    let huge = "x".repeat(5000);
    let r = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "modelpack".into(),
            key: "l".into(),
            parent: "".into(),
            labels: labels(&[("k", &huge)]),
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument, "labels are limited to 4096 bytes");
    // So are label maps, in count and in total size; the error names the key. A model
    // label is bounded before it is parsed.
    let prepare_labelled = |key: &str, labels: HashMap<String, String>| pb::PrepareSnapshotRequest {
        snapshotter: "modelpack".into(),
        key: key.into(),
        parent: "".into(),
        labels,
    };
    let many: HashMap<String, String> = (0..300).map(|i| (format!("k{i:03}"), "v".to_owned())).collect();
    let e = c.prepare(prepare_labelled("many", many)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("\"k256\""), "{}", e.message());
    let heavy: HashMap<String, String> = (0..100).map(|i| (format!("k{i:03}"), "v".repeat(4000))).collect();
    assert_eq!(code(c.prepare(prepare_labelled("heavy", heavy)).await), Code::InvalidArgument);
    let index_key = "containerd.io/snapshot/modelpack.index";
    let e = c.prepare(prepare_labelled("model", labels(&[(index_key, &huge)]))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(index_key), "{}", e.message());
    for key in ["many", "heavy", "model"] {
        assert_eq!(code(stat(&mut c, key).await), Code::NotFound, "{key} was not recorded");
    }

    let r = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "modelpack".into(),
            filters: vec!["labels.\"unterminated".into()],
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "modelpack".into(),
            info: Some(pb::Info { name: "missing".into(), ..Default::default() }),
            update_mask: None,
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_filters_usage_and_restart() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut serve = SnapshotterProcess::start(&root);
    let mut c = snapshots_client(&serve.socket).await;

    let key = "extract-1 sha256:layer";
    let r = pb::PrepareSnapshotRequest {
        snapshotter: "modelpack".into(),
        key: key.into(),
        parent: "".into(),
        labels: labels(&[("containerd.io/snapshot.ref", "sha256:layer"), ("other", "1")]),
    };
    let mounts = c.prepare(r).await.unwrap().into_inner().mounts;
    {
        let target = tmp.path().join("m");
        let _m = mount_all(&mounts, &target);
        std::fs::write(target.join("blob"), vec![1u8; 1 << 20]).unwrap();
    }
    let usage =
        c.usage(pb::UsageRequest { snapshotter: "modelpack".into(), key: key.into() }).await.unwrap().into_inner();
    assert!(usage.size >= 1 << 20 && usage.inodes >= 1, "{usage:?}");
    let r = pb::CommitSnapshotRequest {
        snapshotter: "modelpack".into(),
        name: "sha256:layer".into(),
        key: key.into(),
        labels: labels(&[("containerd.io/snapshot.ref", "sha256:layer")]),
    };
    c.commit(r).await.unwrap();
    prepare(&mut c, "other-root", "").await.unwrap();

    // The filter containerd's unpacker sends.
    let found = list(&mut c, &["labels.\"containerd.io/snapshot.ref\"==sha256:layer,parent==\"\""]).await;
    assert_eq!(found.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["sha256:layer"]);
    assert_eq!(list(&mut c, &["kind==active", "name==sha256:layer"]).await.len(), 2, "alternatives are OR-ed");
    assert_eq!(list(&mut c, &[]).await.len(), 2);

    // Update one label by path, then all labels.
    let r = pb::UpdateSnapshotRequest {
        snapshotter: "modelpack".into(),
        info: Some(pb::Info { name: "sha256:layer".into(), labels: labels(&[("added", "yes")]), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["labels.added".into()] }),
    };
    let info = c.update(r).await.unwrap().into_inner().info.unwrap();
    assert_eq!(info.labels.get("added").map(String::as_str), Some("yes"));
    assert_eq!(info.labels.get("containerd.io/snapshot.ref").map(String::as_str), Some("sha256:layer"));

    let committed_usage = c
        .usage(pb::UsageRequest { snapshotter: "modelpack".into(), key: "sha256:layer".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed_usage.size, usage.size);

    // Everything survives a restart.
    serve.stop();
    let serve = SnapshotterProcess::start(&root);
    let mut c = snapshots_client(&serve.socket).await;
    let info = stat(&mut c, "sha256:layer").await.unwrap();
    assert_eq!(info.labels.get("added").map(String::as_str), Some("yes"));
    assert_eq!(stat(&mut c, "other-root").await.unwrap().kind, pb::Kind::Active as i32);

    // Cleanup removes directories no snapshot refers to.
    let stray = root.join("snapshots/999999/fs");
    std::fs::create_dir_all(&stray).unwrap();
    c.cleanup(pb::CleanupRequest { snapshotter: "modelpack".into() }).await.unwrap();
    assert!(!stray.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_layers_stack() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let serve = SnapshotterProcess::start(&tmp.path().join("root"));
    let mut c = snapshots_client(&serve.socket).await;
    let mut parent = String::new();
    for i in 0..24 {
        let name = format!("layer-{i}");
        layer(&mut c, tmp.path(), &name, &parent, |d| std::fs::write(d.join(format!("f{i}")), format!("{i}")).unwrap())
            .await;
        parent = name;
    }
    let mounts = view(&mut c, "all", &parent).await.unwrap();
    let target = tmp.path().join("m-all");
    let _m = mount_all(&mounts, &target);
    for i in 0..24 {
        assert_eq!(std::fs::read_to_string(target.join(format!("f{i}"))).unwrap(), i.to_string());
    }
}

/// A model written to `dir` (its shards `shard_size` bytes), pushed to `registry` as
/// `models/<name>:v1` and converted; returns its companion's layer.
async fn converted_model(
    registry: &TestRegistry,
    dir: &std::path::Path,
    name: &str,
    shard_size: usize,
) -> CompanionLayer {
    write_model_dir(dir, shard_size);
    converted_dir(registry, dir, name).await
}

/// The model in `dir` pushed to `registry` as `models/<name>:v1` and converted; returns
/// its companion's layer.
async fn converted_dir(registry: &TestRegistry, dir: &std::path::Path, name: &str) -> CompanionLayer {
    let source = format!("{}/models/{name}:v1", registry.addr());
    push_dir(dir, &source, "raw");
    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "{stderr}");
    companion_layer(&format!("{source}-lazy")).await
}

async fn mounts(
    c: &mut SnapshotsClient,
    key: &str,
) -> Result<Vec<modelpack_snapshotter::snapshotter::proto::types::Mount>, tonic::Status> {
    c.mounts(pb::MountsRequest { snapshotter: "modelpack".into(), key: key.into() })
        .await
        .map(|r| r.into_inner().mounts)
}

/// Stats `key` until it answers something other than `Unavailable`, for up to `limit`.
async fn stat_when_available(c: &mut SnapshotsClient, key: &str, limit: std::time::Duration) -> pb::Info {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match stat(c, key).await {
            Ok(info) => return info,
            Err(e) if e.code() == Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(e) => panic!("stat {key}: {e}"),
        }
    }
}

fn model_request(key: &str, parent: &str, labels: HashMap<String, String>) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest { snapshotter: "modelpack".into(), key: key.into(), parent: parent.into(), labels }
}

/// Views `parent` as `key` and checks that it shows exactly the files of `src`.
async fn assert_serves(c: &mut SnapshotsClient, tmp: &std::path::Path, key: &str, parent: &str, src: &std::path::Path) {
    let mounts = view(c, key, parent).await.unwrap_or_else(|e| panic!("view {key} of {parent}: {e}"));
    let target = tmp.join(format!("m-{key}"));
    let _m = mount_all(&mounts, &target);
    assert_same_tree(src, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_with_model_labels_mounts_the_model_and_answers_already_exists() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let src = tmp.path().join("model");
    write_model_dir(&src, 2 << 20);
    let source = format!("{}/models/labels:v1", registry.addr());
    push_dir(&src, &source, "tar");
    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "{stderr}");
    let layer = companion_layer(&format!("{source}-lazy")).await;
    let chain = layer.digest.clone();
    let labels = prepare_labels(&layer.annotations, &chain);

    let serve = SnapshotterProcess::start(&tmp.path().join("root"));
    let mut c = snapshots_client(&serve.socket).await;
    let extract = |n: u32| format!("extract-{n} {chain}");

    // Bad labels are refused before anything is fetched.
    let mut unknown = labels.clone();
    unknown.insert("containerd.io/snapshot/modelpack.bogus".into(), "1".into());
    assert_eq!(code(c.prepare(model_request(&extract(0), "", unknown)).await), Code::InvalidArgument);
    let mut unpinned = labels.clone();
    unpinned.insert("containerd.io/snapshot/modelpack.source".into(), source.clone());
    assert_eq!(code(c.prepare(model_request(&extract(0), "", unpinned)).await), Code::InvalidArgument);
    let mut missing = labels.clone();
    let index_ref = missing["containerd.io/snapshot/modelpack.index"].clone();
    let (repo, _) = index_ref.split_once('@').unwrap();
    let nothing = modelpack_snapshotter::modelpack::Digest::of(b"nothing").to_string();
    missing.insert("containerd.io/snapshot/modelpack.index".into(), format!("{repo}@{nothing}"));
    missing.insert("containerd.io/snapshot.ref".into(), nothing.clone());
    assert_ne!(code(c.prepare(model_request(&format!("extract-0 {nothing}"), "", missing)).await), Code::Ok);
    assert_eq!(code(stat(&mut c, &nothing).await), Code::NotFound, "a failed model prepare leaves nothing behind");

    // The handshake: AlreadyExists, then the chain ID is committed and findable.
    assert_eq!(code(c.prepare(model_request(&extract(1), "", labels.clone())).await), Code::AlreadyExists);
    let info = stat(&mut c, &chain).await.unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    let found = list(&mut c, &[&format!("labels.\"containerd.io/snapshot.ref\"=={chain},parent==\"\"")]).await;
    assert_eq!(found.len(), 1);
    assert_eq!(code(stat(&mut c, &extract(1)).await), Code::NotFound, "the extraction key is never created");
    assert_eq!(code(c.prepare(model_request(&extract(2), "", labels.clone())).await), Code::AlreadyExists, "again");

    // Children see the model: a view (bind) and an active snapshot (overlay).
    assert_serves(&mut c, tmp.path(), "volume", &chain, &src).await;
    let mounts = prepare(&mut c, "rootfs", &chain).await.unwrap();
    {
        let target = tmp.path().join("m-rootfs");
        let _m = mount_all(&mounts, &target);
        assert_eq!(std::fs::read(target.join("config.json")).unwrap(), std::fs::read(src.join("config.json")).unwrap());
        std::fs::write(target.join("scratch"), b"writable upper").unwrap();
    }
    assert_eq!(code(remove(&mut c, &chain).await), Code::FailedPrecondition, "children first");
    remove(&mut c, "volume").await.unwrap();
    remove(&mut c, "rootfs").await.unwrap();
    remove(&mut c, &chain).await.unwrap();
    assert!(list(&mut c, &[]).await.is_empty());
    let leftover = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!leftover.contains(&serve.root.display().to_string()), "the model is unmounted");
}

/// The attack on the label handshake: an image whose layer is byte-identical to an
/// honest companion's (so containerd computes the same chain ID) but whose annotations
/// name another model's index. It must never decide what that chain ID serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_id_serves_only_the_model_its_own_index_layer_names() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let honest_src = tmp.path().join("honest");
    let honest = converted_model(&registry, &honest_src, "honest", 1 << 20).await;
    let evil = converted_model(&registry, &tmp.path().join("evil"), "evil", 3 << 20).await;
    assert_ne!(honest.digest, evil.digest);
    let chain = honest.digest.clone();

    // The forged image: the honest index layer's bytes, the other model's annotations.
    let forged_ref = format!("{}/evil/forged:v1", registry.addr());
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [chain] },
    }))
    .unwrap();
    let spec = LayerSpec {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        data: honest.bytes.clone(),
        annotations: serde_json::to_value(&evil.annotations).unwrap(),
    };
    let pushed = forged_ref.clone();
    tokio::task::spawn_blocking(move || {
        push_artifact(&pushed, "", "application/vnd.oci.image.config.v1+json", &config, &[spec])
    })
    .await
    .unwrap();
    // Its chain ID is its diff ID, the digest of the (uncompressed) layer: the honest one.
    assert_eq!(modelpack_snapshotter::modelpack::Digest::of(&honest.bytes).to_string(), chain);
    let forged = prepare_labels(&evil.annotations, &chain);
    // A subtler forgery: the honest index digest in the forger's repository (the blob
    // is there, byte-identical), with the other model as the source.
    let mut forged_source = prepare_labels(&honest.annotations, &chain);
    forged_source
        .insert("containerd.io/snapshot/modelpack.index".into(), format!("{}/evil/forged@{chain}", registry.addr()));
    forged_source.insert(
        "containerd.io/snapshot/modelpack.source".into(),
        evil.annotations["containerd.io/snapshot/modelpack.source"].clone(),
    );

    let serve = SnapshotterProcess::start(&tmp.path().join("root"));
    let mut c = snapshots_client(&serve.socket).await;

    // Forged first: refused, saying what did not match, and nothing is recorded.
    let e = c.prepare(model_request(&format!("extract-1 {chain}"), "", forged.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("does not match") && e.message().contains(&evil.digest), "{}", e.message());
    let e = c.prepare(model_request(&format!("extract-2 {chain}"), "", forged_source.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("describes"), "{}", e.message());
    assert_eq!(code(stat(&mut c, &chain).await), Code::NotFound);
    // A companion layer has no parent.
    prepare(&mut c, "base-active", "").await.unwrap();
    commit(&mut c, "base", "base-active").await.unwrap();
    let honest_labels = prepare_labels(&honest.annotations, &chain);
    let e = c.prepare(model_request(&format!("extract-3 {chain}"), "base", honest_labels.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // Honest labels with some other chain ID are refused as well.
    let elsewhere = prepare_labels(&honest.annotations, "sha256:chain");
    assert_eq!(code(c.prepare(model_request("extract-4 sha256:chain", "", elsewhere)).await), Code::InvalidArgument);

    // Honest: served.
    assert_eq!(
        code(c.prepare(model_request(&format!("extract-5 {chain}"), "", honest_labels)).await),
        Code::AlreadyExists
    );
    assert_serves(&mut c, tmp.path(), "v1", &chain, &honest_src).await;

    // Forged after: the honest model stays what the chain ID serves.
    for (n, labels) in [forged, forged_source].into_iter().enumerate() {
        let r = c.prepare(model_request(&format!("extract-{} {chain}", 6 + n), "", labels)).await;
        assert!(matches!(code(r), Code::InvalidArgument | Code::AlreadyExists));
    }
    let info = stat(&mut c, &chain).await.unwrap();
    assert_eq!(
        info.labels["containerd.io/snapshot/modelpack.index"],
        honest.annotations["containerd.io/snapshot/modelpack.index"]
    );
    assert_serves(&mut c, tmp.path(), "v2", &chain, &honest_src).await;
}

/// The commit path (a client that unpacks the companion layer itself): the index comes
/// from the layer's content, which containerd checked against the chain ID it commits,
/// so labels sent with the commit decide nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_companion_serves_what_its_content_names_whatever_its_labels_say() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let honest_src = tmp.path().join("honest");
    let honest = converted_model(&registry, &honest_src, "honest", 1 << 20).await;
    let evil = converted_model(&registry, &tmp.path().join("evil"), "evil", 3 << 20).await;
    let chain = honest.digest.clone();

    let serve = SnapshotterProcess::start(&tmp.path().join("root"));
    let mut c = snapshots_client(&serve.socket).await;
    let key = format!("extract-1 {chain}");
    let mounts = prepare(&mut c, &key, "").await.unwrap();
    {
        let target = tmp.path().join("m-unpack");
        let _m = mount_all(&mounts, &target);
        let json = modelpack_snapshotter::companion::index_from_tar(&honest.bytes).unwrap();
        std::fs::create_dir(target.join(".modelpack")).unwrap();
        std::fs::write(target.join(".modelpack/index.json"), json).unwrap();
    }
    let r = pb::CommitSnapshotRequest {
        snapshotter: "modelpack".into(),
        name: chain.clone(),
        key,
        labels: prepare_labels(&evil.annotations, &chain),
    };
    c.commit(r).await.unwrap();
    let info = stat(&mut c, &chain).await.unwrap();
    assert_eq!(
        info.labels.get("containerd.io/snapshot/modelpack.source"),
        honest.annotations.get("containerd.io/snapshot/modelpack.source"),
        "the record names the source the content names"
    );
    assert_eq!(info.labels.get("containerd.io/snapshot/modelpack.index"), None, "no forged index is kept");
    assert_serves(&mut c, tmp.path(), "v", &chain, &honest_src).await;
}

/// A model whose registry is gone across a restart (and whose index the cache lost) is
/// never handed out as an empty directory: the model and its children answer
/// `Unavailable` with the cause, until a background retry mounts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_be_mounted_after_a_restart_is_unavailable_until_a_retry_mounts_it() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut registry = TestRegistry::start();
    let src = tmp.path().join("model");
    let layer = converted_model(&registry, &src, "retried", 1 << 20).await;
    let chain = layer.digest.clone();
    let root = tmp.path().join("root");
    let socket = root.join("snapshotter.sock");
    let config = write_config(&tmp.path().join("config"), "[models]\nretry_initial_secs = 1\nretry_max_secs = 2\n");

    let mut serve = SnapshotterProcess::start_with(&root, &socket, &config);
    let mut c = snapshots_client(&socket).await;
    let labels = prepare_labels(&layer.annotations, &chain);
    assert_eq!(code(c.prepare(model_request(&format!("extract-1 {chain}"), "", labels)).await), Code::AlreadyExists);
    view(&mut c, "volume", &chain).await.unwrap();
    serve.stop();

    // The registry goes away, and with the cache the index: mounting needs the registry.
    registry.stop();
    std::fs::remove_dir_all(root.join("cache")).unwrap();
    let _serve = SnapshotterProcess::start_with(&root, &socket, &config);
    let mut c = snapshots_client(&socket).await;
    let e = stat(&mut c, &chain).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains(&chain) && e.message().contains("next attempt"), "{}", e.message());
    assert!(e.message().contains(&registry.addr()), "the cause names the registry: {}", e.message());
    let e = mounts(&mut c, "volume").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "the child of an unmounted model has no mounts: {e}");
    assert_eq!(code(prepare(&mut c, "rootfs", &chain).await), Code::Unavailable);
    assert_eq!(code(view(&mut c, "volume-2", &chain).await), Code::Unavailable);
    for key in ["rootfs", "volume-2"] {
        assert_eq!(code(stat(&mut c, key).await), Code::NotFound, "{key} was not recorded");
    }

    registry.restart();
    stat_when_available(&mut c, &chain, std::time::Duration::from_secs(60)).await;
    {
        let mounts = mounts(&mut c, "volume").await.unwrap();
        let target = tmp.path().join("m-volume");
        let _m = mount_all(&mounts, &target);
        assert_same_tree(&src, &target);
    }
    assert_serves(&mut c, tmp.path(), "volume-2", &chain, &src).await;
    prepare(&mut c, "rootfs", &chain).await.unwrap();
}

/// `serve` answers on its socket before it has mounted its models again, and mounts
/// them concurrently: one model behind a registry that accepts connections and never
/// replies holds up none of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_answers_at_once_and_a_hung_registry_holds_up_no_other_model() {
    if !prerequisites(true) {
        return;
    }
    const MODELS: usize = 20;
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let mut doomed = TestRegistry::start();
    let mut models = Vec::new();
    for i in 0..MODELS {
        let dir = tmp.path().join(format!("model-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("weights.bin"), pseudo_random(64 << 10, i as u64 + 1)).unwrap();
        std::fs::write(dir.join("config.json"), format!("{{\"model\":{i}}}")).unwrap();
        let on = if i == MODELS - 1 { &doomed } else { &registry };
        let layer = converted_dir(on, &dir, &format!("m{i}")).await;
        models.push((dir, layer.digest.clone(), prepare_labels(&layer.annotations, &layer.digest)));
    }
    // A request timeout far beyond the test's, so that only concurrency can let the
    // others through; a short wait for a model still being mounted.
    let request_timeout = std::time::Duration::from_secs(600);
    let config = write_config(
        &tmp.path().join("config"),
        &format!("[registry]\nrequest_timeout_secs = {}\n[models]\nrestore_wait_secs = 1\n", request_timeout.as_secs()),
    );
    let root = tmp.path().join("root");
    let socket = root.join("snapshotter.sock");
    let mut serve = SnapshotterProcess::start_with(&root, &socket, &config);
    let mut c = snapshots_client(&socket).await;
    for (_, chain, labels) in &models {
        let r = c.prepare(model_request(&format!("extract {chain}"), "", labels.clone())).await;
        assert_eq!(code(r), Code::AlreadyExists);
    }
    serve.stop();

    // One registry now hangs, and the cache is gone: every model needs its registry.
    doomed.stop();
    let _hung = HungServer::start(doomed.port);
    std::fs::remove_dir_all(root.join("cache")).unwrap();
    let started = std::time::Instant::now();
    let _serve = SnapshotterProcess::start_with(&root, &socket, &config);
    let mut c = snapshots_client(&socket).await;
    assert_eq!(list(&mut c, &["kind==committed"]).await.len(), MODELS);
    let (_, hung_chain, _) = &models[MODELS - 1];
    let e = stat(&mut c, hung_chain).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("still being mounted"), "{}", e.message());

    for (n, (dir, chain, _)) in models[..MODELS - 1].iter().enumerate() {
        stat_when_available(&mut c, chain, request_timeout / 2).await;
        assert_serves(&mut c, tmp.path(), &format!("v{n}"), chain, dir).await;
    }
    let elapsed = started.elapsed();
    assert!(elapsed < request_timeout, "{elapsed:?}: the others waited for the hung registry");
    assert_eq!(code(stat(&mut c, hung_chain).await), Code::Unavailable, "still hung");
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The state (where unpacked layers, setuid files among them, live) and the socket are
/// out of other local users' reach: created so, and tightened when an earlier build
/// left them open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_and_the_socket_are_private() {
    if !prerequisites(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state/root");
    let run = tmp.path().join("run/modelpack");
    let socket = run.join("snapshotter.sock");
    let config = write_config(&tmp.path().join("config"), "");
    let private = [root.clone(), root.join("snapshots"), run.clone()];
    let metadata = root.join("metadata.redb");
    let check = || {
        for dir in &private {
            assert_eq!(mode_of(dir), 0o700, "{}", dir.display());
        }
        assert_eq!(mode_of(&metadata), 0o600, "{}", metadata.display());
    };
    {
        let serve = SnapshotterProcess::start_with(&root, &socket, &config);
        check();
        let mut c = snapshots_client(&serve.socket).await;
        prepare(&mut c, "a", "").await.unwrap();
    }
    for dir in &private {
        set_mode(dir, 0o755);
    }
    set_mode(&metadata, 0o644);
    {
        let serve = SnapshotterProcess::start_with(&root, &socket, &config);
        check();
        let mut c = snapshots_client(&serve.socket).await;
        assert_eq!(stat(&mut c, "a").await.unwrap().kind, pb::Kind::Active as i32, "the state is kept");
    }

    // A socket directory shared with other files is refused, not closed to everyone.
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    set_mode(&shared, 0o755);
    std::fs::write(shared.join("other.txt"), b"someone else's").unwrap();
    let address = shared.join("snapshotter.sock");
    let (ok, _, stderr) = run_bin(&[
        "serve",
        "--root",
        root.to_str().unwrap(),
        "--address",
        address.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!ok, "serve started with a shared socket directory");
    assert!(stderr.contains(shared.to_str().unwrap()) && stderr.contains("other.txt"), "{stderr}");
    assert_eq!(mode_of(&shared), 0o755);
    assert!(!address.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpacked_layer_is_counted_in_the_cache_and_goes_with_its_last_model() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    // A model whose one layer is a gzip-compressed tar: served from an unpacked copy.
    let weights = pseudo_random(300_000, 21);
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(weights.len() as u64);
    header.set_mode(0o644);
    tar.append_data(&mut header, "weights.bin", &weights[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let layer = LayerSpec {
        media_type: "application/vnd.cncf.model.weight.v1.tar+gzip".into(),
        data: gz.finish().unwrap(),
        annotations: serde_json::json!({}),
    };
    let layer_digest = modelpack_snapshotter::modelpack::Digest::of(&layer.data);
    let config = serde_json::to_vec(&serde_json::json!({
        "modelfs": { "type": "layers", "diffIds": [modelpack_snapshotter::modelpack::Digest::of(&tar).to_string()] }
    }))
    .unwrap();
    let source = format!("{}/models/packed:v1", registry.addr());
    tokio::task::block_in_place(|| {
        push_artifact(
            &source,
            "application/vnd.cncf.model.manifest.v1+json",
            "application/vnd.cncf.model.config.v1+json",
            &config,
            &[layer],
        )
    });
    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "{stderr}");
    let companion = companion_layer(&format!("{source}-lazy")).await;
    let chain = companion.digest.clone();

    let serve = SnapshotterProcess::start(&tmp.path().join("root"));
    let mut c = snapshots_client(&serve.socket).await;
    let prepared = c
        .prepare(model_request(&format!("extract-1 {chain}"), "", prepare_labels(&companion.annotations, &chain)))
        .await;
    assert_eq!(code(prepared), Code::AlreadyExists);
    let unpacked = serve.root.join("cache/unpacked/sha256").join(format!("{}.tar", layer_digest.hex()));
    assert_eq!(std::fs::read(&unpacked).unwrap(), tar, "served from its unpacked copy");
    {
        let mounts = view(&mut c, "volume", &chain).await.unwrap();
        let target = tmp.path().join("m-volume");
        let _m = mount_all(&mounts, &target);
        assert_eq!(std::fs::read(target.join("weights.bin")).unwrap(), weights);
    }
    remove(&mut c, "volume").await.unwrap();
    remove(&mut c, &chain).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while unpacked.exists() {
        assert!(std::time::Instant::now() < deadline, "the unpacked copy outlived its model");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// containerd keeps its connection open: a stop for good must not wait for it forever,
/// or a supervisor's SIGKILL would leave the models mounted with nobody serving them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_unmounts_the_models_although_a_client_keeps_its_connection() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let layer = converted_model(&registry, &tmp.path().join("model"), "stop", 1 << 20).await;
    let root = tmp.path().join("root");
    let config = write_config(&tmp.path().join("config"), "shutdown_grace_secs = 1\n");
    let mut serve = SnapshotterProcess::start_with(&root, &root.join("snapshotter.sock"), &config);
    let mut c = snapshots_client(&serve.socket).await;
    let prepared = c.prepare(model_request(&format!("extract-1 {}", layer.digest), "", layer.prepare_labels())).await;
    assert_eq!(code(prepared), Code::AlreadyExists);
    let model_dir = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .find(|p| p.starts_with(&root.display().to_string()))
        .expect("the model is mounted under the root");
    // A client that connected and went silent, as one whose runtime stopped polling.
    let _silent = std::os::unix::net::UnixStream::connect(&serve.socket).unwrap();

    let started = std::time::Instant::now();
    tokio::task::block_in_place(|| serve.stop_for_good());
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "the stop waited for the silent client");
    assert!(
        !modelpack_snapshotter::fs::is_mountpoint(std::path::Path::new(&model_dir)),
        "the model was left mounted with nobody serving it"
    );
}

/// The mounts under `root`, as (mount point, device, filesystem type) from
/// `/proc/self/mountinfo`.
fn mounts_under(root: &std::path::Path) -> Vec<(String, String, String)> {
    let root = root.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let fs_type = line.split(" - ").nth(1)?.split(' ').next()?;
            Some((fields.get(4)?.to_string(), fields.get(2)?.to_string(), fs_type.to_owned()))
        })
        .filter(|(at, _, _)| at.starts_with(&root))
        .collect()
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .count()
}

/// Every model snapshot is served by one FUSE session, each bound at its snapshot's
/// directory: the session's threads do not grow with the models, the session goes with
/// the last model, and after a crash (SIGKILL) the dead session and binds are replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_snapshots_share_one_fuse_session_that_a_crash_does_not_leave_dead() {
    if !prerequisites(true) {
        return;
    }
    const MODELS: usize = 3;
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let mut models = Vec::new();
    for i in 0..MODELS {
        let dir = tmp.path().join(format!("model-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("weights.bin"), pseudo_random(300 << 10, i as u64 + 40)).unwrap();
        std::fs::write(dir.join("config.json"), format!("{{\"model\":{i}}}")).unwrap();
        let layer = converted_dir(&registry, &dir, &format!("shared{i}")).await;
        models.push((dir, layer));
    }
    let root = tmp.path().join("root");
    let socket = root.join("snapshotter.sock");
    let config = write_config(&tmp.path().join("config"), "[models]\nfuse_threads = 2\n");
    let mut serve = SnapshotterProcess::start_with(&root, &socket, &config);
    let session_dir = root.join("models").display().to_string();
    let mut c = snapshots_client(&socket).await;
    assert!(mounts_under(&root).is_empty(), "no model, no session");
    let threads_before = threads_named(serve.pid(), "fuser");
    for (_, layer) in &models {
        let prepared = c.prepare(model_request(&format!("extract {}", layer.digest), "", layer.prepare_labels())).await;
        assert_eq!(code(prepared), Code::AlreadyExists);
    }
    let mounted = mounts_under(&root);
    let sessions: Vec<_> = mounted.iter().filter(|(at, _, _)| *at == session_dir).collect();
    assert_eq!(sessions.len(), 1, "one session: {mounted:?}");
    let (_, device, fs_type) = sessions[0].clone();
    assert!(fs_type.starts_with("fuse"), "{fs_type}");
    assert_eq!(mounted.len(), MODELS + 1, "the session and a bind per model: {mounted:?}");
    assert!(mounted.iter().all(|(_, d, _)| *d == device), "every model is the session's: {mounted:?}");
    assert_eq!(threads_named(serve.pid(), "fuser") - threads_before, 3, "the session's two and its runner");
    for (i, (dir, layer)) in models.iter().enumerate() {
        assert_serves(&mut c, tmp.path(), &format!("view-{i}"), &layer.digest, dir).await;
    }

    // A crash leaves the session and the binds dead; a restart serves every model again.
    serve.kill();
    let serve = SnapshotterProcess::start_with(&root, &socket, &config);
    let mut c = snapshots_client(&socket).await;
    for (i, (dir, layer)) in models.iter().enumerate() {
        stat_when_available(&mut c, &layer.digest, std::time::Duration::from_secs(60)).await;
        assert_serves(&mut c, tmp.path(), &format!("again-{i}"), &layer.digest, dir).await;
    }
    let mounted = mounts_under(&root);
    assert_eq!(mounted.len(), MODELS + 1, "no dead mount left behind: {mounted:?}");
    let device = &mounted.iter().find(|(at, _, _)| *at == session_dir).expect("a new session").1;
    assert!(mounted.iter().all(|(_, d, _)| d == device), "every model is the new session's: {mounted:?}");

    // The session goes with the last model.
    for (i, (_, layer)) in models.iter().enumerate() {
        remove(&mut c, &format!("view-{i}")).await.unwrap();
        remove(&mut c, &format!("again-{i}")).await.unwrap();
        remove(&mut c, &layer.digest).await.unwrap();
    }
    assert!(mounts_under(&root).is_empty(), "nothing left mounted: {:?}", mounts_under(&root));
    drop(serve);
}
