//! End-to-end tests of `push`, `inspect` and `mount` against a real registry and real
//! kernel FUSE mounts.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use common::proxy::{Fault, FaultProxy};
use common::*;
use serde_json::json;

const CNCF_ARTIFACT: &str = "application/vnd.cncf.model.manifest.v1+json";
const CNCF_CONFIG: &str = "application/vnd.cncf.model.config.v1+json";

fn model_config(diff_ids: &[&[u8]]) -> Vec<u8> {
    let ids: Vec<String> =
        diff_ids.iter().map(|d| modelpack_snapshotter::modelpack::Digest::of(d).to_string()).collect();
    serde_json::to_vec(&json!({"modelfs": {"type": "layers", "diffIds": ids}})).unwrap()
}

/// Mounts `reference` through a fresh cache dir under `tmp`.
fn mount(reference: &str, tmp: &Path, args: &[&str]) -> MountProcess {
    MountProcess::start(reference, &tmp.join("mnt"), &tmp.join("cache"), args)
        .unwrap_or_else(|e| panic!("mount failed: {e}"))
}

#[test]
fn raw_model_reads_back_byte_for_byte() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 3 << 20);
    let reference = format!("{}/models/raw:v1", registry.addr());
    push_dir(&src, &reference, "raw");

    // Small chunks so that reads cross many chunk boundaries.
    let m = mount(&reference, tmp.path(), &["--chunk-size", "65536"]);
    assert_same_tree(&src, &m.mountpoint);

    // Attributes: sizes, read-only modes, root ownership.
    let meta = std::fs::metadata(m.mountpoint.join("model-00001-of-00002.safetensors")).unwrap();
    assert_eq!(meta.len(), 3 << 20);
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.permissions().mode() & 0o222, 0, "files are read-only");
    assert!(std::fs::write(m.mountpoint.join("config.json"), b"x").is_err(), "writes are refused");

    // Reads at odd offsets and lengths across chunk boundaries.
    let want = pseudo_random(3 << 20, 1);
    let f = std::fs::File::open(m.mountpoint.join("model-00001-of-00002.safetensors")).unwrap();
    for (offset, len) in [(65_535usize, 3usize), (131_000, 200_000), (0, 1), ((3 << 20) - 5, 5)] {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset as u64).unwrap();
        assert_eq!(buf, want[offset..offset + len], "read at {offset}+{len}");
    }
}

#[test]
fn tar_layers_read_back_byte_for_byte() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 2 << 20);
    let reference = format!("{}/models/tar:v1", registry.addr());
    push_dir(&src, &reference, "tar");
    let m = mount(&reference, tmp.path(), &["--chunk-size", "65536"]);
    assert_same_tree(&src, &m.mountpoint);
}

/// A directory packed as one tar layer (as KitOps does), then compressed.
fn directory_tar(src: &Path) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_dir_all(".", src).unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    builder.append_link(&mut header, "docs/link-to-config", "../config.json").unwrap();
    builder.into_inner().unwrap()
}

#[test]
fn compressed_tar_layers_read_back_byte_for_byte() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 1 << 20);
    let tar = directory_tar(&src);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();

    for (name, media_type, data) in [
        ("zstd", "application/vnd.cncf.model.weight.v1.tar+zstd", zst),
        ("gzip", "application/vnd.cncf.model.weight.v1.tar+gzip", gz),
    ] {
        let reference = format!("{}/models/{name}:v1", registry.addr());
        let layer = LayerSpec { media_type: media_type.into(), data, annotations: json!({}) };
        push_artifact(&reference, CNCF_ARTIFACT, CNCF_CONFIG, &model_config(&[&tar]), &[layer]);
        let sub = tmp.path().join(name);
        let m = mount(&reference, &sub, &[]);
        assert_same_tree(&src, &m.mountpoint);
        let link = std::fs::read_link(m.mountpoint.join("docs/link-to-config")).unwrap();
        assert_eq!(link, Path::new("../config.json"));
        assert_eq!(
            std::fs::read(m.mountpoint.join("docs/link-to-config")).unwrap(),
            std::fs::read(src.join("config.json")).unwrap()
        );
    }
}

#[test]
fn legacy_cnai_artifact_reads_back() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let weights = pseudo_random(1_500_000, 9);
    let config_file = br#"{"model_type":"legacy"}"#.to_vec();
    let layers = [
        LayerSpec {
            media_type: "application/vnd.cnai.model.weight.v1.raw".into(),
            data: weights.clone(),
            annotations: json!({"org.cnai.model.filepath": "weights/model.safetensors"}),
        },
        LayerSpec {
            media_type: "application/vnd.cnai.model.weight.config.v1.raw".into(),
            data: config_file.clone(),
            annotations: json!({"org.cnai.model.filepath": "config.json"}),
        },
    ];
    let config = serde_json::to_vec(&json!({"modelfs": {"type": "layers", "diff_ids": [
        modelpack_snapshotter::modelpack::Digest::of(&weights).to_string(),
        modelpack_snapshotter::modelpack::Digest::of(&config_file).to_string(),
    ]}}))
    .unwrap();
    let reference = format!("{}/models/legacy:v1", registry.addr());
    push_artifact(
        &reference,
        "application/vnd.cnai.model.manifest.v1+json",
        "application/vnd.cnai.model.config.v1+json",
        &config,
        &layers,
    );
    let m = mount(&reference, tmp.path(), &[]);
    assert_eq!(std::fs::read(m.mountpoint.join("weights/model.safetensors")).unwrap(), weights);
    assert_eq!(std::fs::read(m.mountpoint.join("config.json")).unwrap(), config_file);
}

/// Pushes a one-file raw model (`model.safetensors` holding `data`) as `repo:v1`.
fn push_one_file(registry: &TestRegistry, tmp: &Path, repo: &str, data: &[u8]) {
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("model.safetensors"), data).unwrap();
    push_dir(&src, &format!("{}/models/{repo}:v1", registry.addr()), "raw");
}

#[test]
fn small_read_fetches_only_its_chunk() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let tmp = tempfile::tempdir().unwrap();
    let data = pseudo_random(32 << 20, 5);
    push_one_file(&registry, tmp.path(), "partial", &data);

    let m = mount(
        &format!("{}/models/partial:v1", proxy.addr()),
        tmp.path(),
        &["--chunk-size", "1048576", "--readahead-chunks", "0"],
    );
    proxy.reset_counts();
    let f = std::fs::File::open(m.mountpoint.join("model.safetensors")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 10 << 20).unwrap();
    assert_eq!(buf, data[10 << 20..(10 << 20) + 4096]);
    let (requests, bytes) = proxy.blob_counts();
    assert!(requests >= 1 && bytes <= 2 << 20, "a 4 KiB read fetched {bytes} bytes in {requests} requests");
}

/// A cache directory an earlier release made with 4 MiB chunks keeps them: a mount with
/// the default chunk size reads through it, and only a chunk size named on the command
/// line that is not the directory's is refused, with an error that says so.
#[test]
fn a_cache_made_with_another_chunk_size_keeps_it_unless_told_otherwise() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let data = pseudo_random(12 << 20, 9);
    push_one_file(&registry, tmp.path(), "older", &data);
    let cache_dir = tmp.path().join("cache");
    modelpack_snapshotter::cache::ChunkCache::open(&cache_dir, None).unwrap().bind_chunk_size(4 << 20).unwrap();
    let reference = format!("{}/models/older:v1", registry.addr());

    let mut m = mount(&reference, tmp.path(), &[]);
    assert_eq!(std::fs::read(m.mountpoint.join("model.safetensors")).unwrap(), data);
    m.stop();
    let cache = modelpack_snapshotter::cache::ChunkCache::open(&cache_dir, None).unwrap();
    assert_eq!(cache.recorded_chunk_size().unwrap(), Some(4 << 20));
    drop(cache);

    let err = MountProcess::start(&reference, &tmp.path().join("mnt"), &cache_dir, &["--chunk-size", "2097152"])
        .err()
        .expect("a chunk size that is not the directory's is refused");
    assert!(err.contains("4194304") && err.contains("2097152"), "{err}");
}

#[test]
fn a_registry_that_wants_a_token_from_anonymous_clients_is_served() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let tmp = tempfile::tempdir().unwrap();
    let data = pseudo_random(12 << 20, 8);
    push_one_file(&registry, tmp.path(), "token", &data);
    proxy.require_token();

    let m = mount(&format!("{}/models/token:v1", proxy.addr()), tmp.path(), &[]);
    let read = std::fs::read(m.mountpoint.join("model.safetensors")).unwrap();
    assert!(read == data, "the model read through a token-wanting registry differs");
    assert!(proxy.unauthorized_count() >= 1, "the proxy never asked for a token");
    assert!(proxy.blob_counts().0 >= 1, "no blob came through the proxy");
}

#[test]
fn concurrent_readers_of_one_chunk_cause_one_fetch() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let tmp = tempfile::tempdir().unwrap();
    let data = Arc::new(pseudo_random(16 << 20, 6));
    push_one_file(&registry, tmp.path(), "flight", &data);
    let m = mount(&format!("{}/models/flight:v1", proxy.addr()), tmp.path(), &["--readahead-chunks", "0"]);
    proxy.reset_counts();
    let path = m.mountpoint.join("model.safetensors");
    let barrier = Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (0..16u64)
        .map(|i| {
            let (path, data, barrier) = (path.clone(), data.clone(), barrier.clone());
            std::thread::spawn(move || {
                let f = std::fs::File::open(&path).unwrap();
                let offset = (5 << 20) + i * 8192;
                let mut buf = vec![0u8; 4096];
                barrier.wait();
                f.read_exact_at(&mut buf, offset).unwrap();
                assert_eq!(buf, data[offset as usize..offset as usize + 4096]);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (requests, _) = proxy.blob_counts();
    assert_eq!(requests, 1, "16 readers of one chunk caused {requests} fetches");
}

#[test]
fn remount_reads_from_cache_with_registry_stopped() {
    if !prerequisites(true) {
        return;
    }
    let mut registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 2 << 20);
    let reference = format!("{}/models/offline:v1", registry.addr());
    push_dir(&src, &reference, "tar");
    {
        let m = mount(&reference, tmp.path(), &[]);
        assert_same_tree(&src, &m.mountpoint);
    }
    registry.stop();
    let m = mount(&reference, tmp.path(), &["--retries", "0"]);
    assert!(m.ready_line.contains("offline"), "ready line: {}", m.ready_line);
    assert_same_tree(&src, &m.mountpoint);
}

#[test]
fn registry_faults_are_retried_then_eio_never_wrong_bytes() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Each file fits in one chunk, so its whole-blob digest verifies every read.
    let files: Vec<(String, Vec<u8>)> =
        (0..9).map(|i| (format!("shard-{i}.bin"), pseudo_random(200_000 + i * 1000, 20 + i as u64))).collect();
    for (name, data) in &files {
        std::fs::write(src.join(name), data).unwrap();
    }
    push_dir(&src, &format!("{}/models/faults:v1", registry.addr()), "raw");
    let m = mount(
        &format!("{}/models/faults:v1", proxy.addr()),
        tmp.path(),
        &["--retries", "2", "--request-timeout", "10"],
    );

    // One failure of each kind is retried and the read succeeds with the right bytes.
    let faults = [Fault::Reset, Fault::Status500, Fault::Truncate, Fault::Corrupt];
    for (fault, (name, data)) in faults.iter().zip(&files) {
        proxy.set_fault(*fault, 1);
        assert_eq!(&std::fs::read(m.mountpoint.join(name)).unwrap(), data, "after one {fault:?}");
    }
    // A registry that keeps failing gives EIO, never wrong bytes, and the mount stays usable.
    for (fault, (name, data)) in faults.iter().zip(&files[4..]) {
        proxy.set_fault(*fault, u32::MAX);
        let err = std::fs::read(m.mountpoint.join(name)).expect_err(&format!("read with {fault:?} must fail"));
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{fault:?}: {err}");
        proxy.clear_fault();
        assert_eq!(&std::fs::read(m.mountpoint.join(name)).unwrap(), data, "after {fault:?} cleared");
    }
}

/// `inspect` refuses each hostile artifact with an error naming what is wrong.
#[test]
fn bad_artifacts_are_refused() {
    if !prerequisites(false) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let raw = |path: &str, data: &[u8]| LayerSpec {
        media_type: "application/vnd.cncf.model.weight.v1.raw".into(),
        data: data.to_vec(),
        annotations: json!({"org.cncf.model.filepath": path}),
    };
    let tar_layer = |build: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        LayerSpec {
            media_type: "application/vnd.cncf.model.weight.v1.tar".into(),
            data: b.into_inner().unwrap(),
            annotations: json!({}),
        }
    };
    let entry = |kind: tar::EntryType, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    };
    let raw_name = |h: &mut tar::Header, name: &str| {
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
    };
    let cases: Vec<(&str, Vec<LayerSpec>, &str)> = vec![
        ("dotdot", vec![raw("../../etc/x", b"x")], "../../etc/x"),
        ("absolute", vec![raw("/etc/passwd", b"x")], "/etc/passwd"),
        ("empty-component", vec![raw("a//b", b"x")], "a//b"),
        ("duplicate", vec![raw("same.bin", b"one"), raw("same.bin", b"two")], "same.bin"),
        (
            "tar-escape",
            vec![tar_layer(&|b| {
                let mut h = entry(tar::EntryType::Regular, 1);
                raw_name(&mut h, "../escape.bin");
                b.append(&h, &b"x"[..]).unwrap();
            })],
            "../escape.bin",
        ),
        (
            "tar-symlink-escape",
            vec![tar_layer(&|b| {
                let mut h = entry(tar::EntryType::Symlink, 0);
                b.append_link(&mut h, "evil", "../../etc/shadow").unwrap();
            })],
            "evil",
        ),
        (
            "tar-hardlink-out",
            vec![tar_layer(&|b| {
                let mut h = entry(tar::EntryType::Link, 0);
                b.append_link(&mut h, "hard", "not-in-layer").unwrap();
            })],
            "hard",
        ),
        (
            "tar-fifo",
            vec![tar_layer(&|b| {
                let mut h = entry(tar::EntryType::Fifo, 0);
                b.append_data(&mut h, "pipe", &[][..]).unwrap();
            })],
            "pipe",
        ),
        (
            "tar-device",
            vec![tar_layer(&|b| {
                let mut h = entry(tar::EntryType::Char, 0);
                b.append_data(&mut h, "null", &[][..]).unwrap();
            })],
            "null",
        ),
    ];
    for (name, layers, needle) in cases {
        let reference = format!("{}/bad/{name}:v1", registry.addr());
        push_artifact(&reference, CNCF_ARTIFACT, CNCF_CONFIG, b"{}", &layers);
        let cache = tmp.path().join(name);
        let (ok, _, stderr) = run_bin(&["inspect", &reference, "--cache-dir", cache.to_str().unwrap()]);
        assert!(!ok, "{name} was accepted");
        assert!(stderr.contains(needle), "{name}: error does not name {needle:?}: {stderr}");
    }

    // A container image is not a model, and the error says what it is.
    let reference = format!("{}/bad/image:v1", registry.addr());
    let layer = LayerSpec {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        data: b"x".to_vec(),
        annotations: json!({}),
    };
    push_artifact(&reference, "", "application/vnd.oci.image.config.v1+json", b"{}", &[layer]);
    let (ok, _, stderr) = run_bin(&["inspect", &reference, "--cache-dir", tmp.path().join("img").to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("image"), "{stderr}");
}

#[test]
fn inspect_lists_layers_and_files() {
    if !prerequisites(false) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 100_000);
    let reference = format!("{}/models/inspect:v1", registry.addr());
    push_dir(&src, &reference, "raw");
    // Pushing again uploads nothing new and gives the same manifest digest.
    let (ok, stdout, stderr) = run_bin(&["push", src.to_str().unwrap(), &reference]);
    assert!(ok && stderr.contains("already in the registry"), "{stderr}");
    assert!(stdout.starts_with("sha256:"));
    let (ok, stdout, stderr) = run_bin(&["inspect", &reference, "--cache-dir", tmp.path().join("c").to_str().unwrap()]);
    assert!(ok, "{stderr}");
    for needle in [
        "application/vnd.cncf.model.weight.v1.raw",
        "application/vnd.cncf.model.weight.config.v1.raw",
        "docs/extra/NOTES.md",
        "model-00001-of-00002.safetensors",
    ] {
        assert!(stdout.contains(needle), "inspect output lacks {needle}: {stdout}");
    }
}

/// Whether `python3` can import the `safetensors` library (skip outside CI, fail in CI).
fn python_safetensors() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 with safetensors and numpy is required when CI=true"
        );
        eprintln!("skipping: python3 cannot import safetensors and numpy");
    }
    ok
}

#[test]
fn safetensors_library_loads_tensors_through_the_mount() {
    if !prerequisites(true) || !python_safetensors() {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let status = std::process::Command::new("python3")
        .arg(scripts.join("make_model.py"))
        .arg(&src)
        .args(["--size", "25165824", "--shards", "2", "--tensor-bytes", "1048576"])
        .status()
        .unwrap();
    assert!(status.success());
    let reference = format!("{}/models/st:v1", registry.addr());
    push_dir(&src, &reference, "raw");
    let m = mount(&reference, tmp.path(), &[]);
    let out = std::process::Command::new("python3")
        .arg(scripts.join("load_tensors.py"))
        .arg(&m.mountpoint)
        .arg(&src)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all equal to the reference"), "{stdout}");
}

#[test]
fn prefetch_fetches_the_whole_model_in_the_background() {
    if !prerequisites(true) {
        return;
    }
    let mut registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 6 << 20);
    push_dir(&src, &format!("{}/models/prefetch:v1", registry.addr()), "raw");
    let total: u64 = read_tree(&src).values().map(|v| v.len() as u64).sum();
    let m =
        mount(&format!("{}/models/prefetch:v1", proxy.addr()), tmp.path(), &["--prefetch", "--chunk-size", "1048576"]);
    m.wait_line("prefetched:", std::time::Duration::from_secs(60));
    let (_, fetched) = proxy.blob_counts();
    assert!(fetched >= total, "prefetch fetched {fetched} of {total} bytes");
    // Everything is local now: reads succeed with the registry gone, fetching nothing.
    registry.stop();
    assert_same_tree(&src, &m.mountpoint);
    assert_eq!(proxy.blob_counts().1, fetched);
}

#[test]
fn mount_prefetches_as_the_companion_says_unless_told_otherwise() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let source = format!("{}/models/policy:v1", proxy.addr());
    push_converted(&src, 6 << 20, &source, &["--prefetch", "all"]);
    let companion = format!("{source}-lazy");
    let sizes: Vec<u64> = read_tree(&src).values().map(|v| v.len() as u64).collect();

    // No --prefetch: the companion's policy.
    let m = mount(&companion, &tmp.path().join("a"), &["--chunk-size", "1048576"]);
    let line = m.wait_line("prefetched:", std::time::Duration::from_secs(60));
    assert!(line.contains("(all)"), "{line}");
    drop(m);

    // --prefetch=POLICY overrides it: the first MiB of each file, into a fresh cache.
    proxy.reset_counts();
    let m = mount(&companion, &tmp.path().join("b"), &["--prefetch=head:1MiB", "--chunk-size", "1048576"]);
    let line = m.wait_line("prefetched:", std::time::Duration::from_secs(60));
    assert!(line.contains("(head:1MiB)"), "{line}");
    let heads: u64 = sizes.iter().map(|s| (*s).min(1 << 20)).sum();
    let (_, fetched) = proxy.blob_counts();
    assert!((heads..heads + (64 << 10)).contains(&fetched), "fetched {fetched}; the heads are {heads} bytes");
}

#[test]
fn a_mount_left_by_a_killed_process_is_replaced() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 1 << 20);
    let reference = format!("{}/models/stale:v1", registry.addr());
    push_dir(&src, &reference, "raw");
    let mut first = mount(&reference, tmp.path(), &[]);
    first.kill();
    assert!(modelpack_snapshotter::fs::is_mountpoint(&first.mountpoint), "a killed FUSE server leaves its mount");
    assert!(std::fs::read_dir(&first.mountpoint).is_err(), "the stale mount is dead");
    let second = mount(&reference, tmp.path(), &[]);
    assert_same_tree(&src, &second.mountpoint);
    drop(second);
    drop(first);
    assert!(!modelpack_snapshotter::fs::is_mountpoint(&tmp.path().join("mnt")), "nothing left mounted");
}

#[test]
fn a_companion_reference_mounts_its_model_with_every_chunk_verified() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let source = format!("{}/models/companion:v1", proxy.addr());
    push_converted(&src, 3 << 20, &source, &[]);
    let m = mount(&format!("{source}-lazy"), tmp.path(), &["--chunk-size", "1048576", "--retries", "1"]);

    // A registry that corrupts bytes of a multi-chunk blob gets EIO, never wrong bytes.
    proxy.set_fault(Fault::Corrupt, u32::MAX);
    let err = std::fs::read(m.mountpoint.join("model-00001-of-00002.safetensors"))
        .expect_err("corrupt chunks must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    proxy.clear_fault();
    assert_same_tree(&src, &m.mountpoint);
}

#[test]
fn a_reference_by_digest_opens_again_from_the_cache_without_asking_the_registry() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 3 << 20);
    let source = format!("{}/models/pinned:v1", proxy.addr());
    let (ok, stdout, stderr) = run_bin(&["push", src.to_str().unwrap(), &source]);
    assert!(ok, "{stderr}");
    let digest = stdout.lines().last().expect("push prints the manifest digest").trim().to_owned();
    assert!(digest.starts_with("sha256:"), "{stdout}");
    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "{stderr}");
    let pinned = format!("{}/models/pinned@{digest}", proxy.addr());
    let first = mount(&pinned, tmp.path(), &[]);
    assert_same_tree(&src, &first.mountpoint);
    drop(first);
    // The manifest, the companion found for it and every chunk are cached: a second
    // mount of the same digest asks the registry nothing.
    let before = proxy.request_count();
    let second = mount(&pinned, tmp.path(), &[]);
    assert_same_tree(&src, &second.mountpoint);
    let requests = proxy.request_count() - before;
    assert_eq!(requests, 0, "the second mount sent {requests} requests to the registry");
    drop(second);

    // A cached manifest that is not the one the digest names (another model's, as a
    // tampered cache would hold) is never used: the mount asks the registry again, and
    // without a registry it fails rather than serve the other model.
    let record_of = |reference: &str| {
        tmp.path()
            .join("cache/meta")
            .join(modelpack_snapshotter::modelpack::Digest::of(format!("manifest-for:{reference}").as_bytes()).hex())
    };
    let other_src = tmp.path().join("other");
    write_model_dir(&other_src, 1 << 20);
    let other = format!("{}/models/other:v1", proxy.addr());
    push_dir(&other_src, &other, "raw");
    drop(mount(&other, tmp.path(), &[]));
    let forge = || std::fs::copy(record_of(&other), record_of(&pinned)).unwrap();
    forge();
    let before = proxy.request_count();
    let third = mount(&pinned, tmp.path(), &[]);
    assert!(proxy.request_count() > before, "the registry was not asked for the manifest");
    assert_same_tree(&src, &third.mountpoint);
    drop(third);
    forge();
    drop(registry);
    let offline = MountProcess::start(&pinned, &tmp.path().join("mnt"), &tmp.path().join("cache"), &["--retries", "0"]);
    assert!(offline.is_err(), "another model's manifest was served for a digest reference");
}

/// Whether the running kernel has FUSE passthrough (Linux 6.9 and later).
fn kernel_has_passthrough() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (6, 9)
}

#[test]
fn complete_blobs_are_read_through_kernel_passthrough() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 3 << 20);
    let reference = format!("{}/models/passthrough:v1", registry.addr());
    push_dir(&src, &reference, "raw");
    let mut m = mount(&reference, tmp.path(), &["--chunk-size", "1048576"]);
    assert_same_tree(&src, &m.mountpoint);
    // Once every chunk is cached, each multi-chunk raw blob is verified: its data file,
    // the one copy the cache keeps, is then the whole blob.
    let blobs = tmp.path().join("cache/blobs/sha256");
    let shards: Vec<_> = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        .iter()
        .map(|name| modelpack_snapshotter::modelpack::Digest::of(&std::fs::read(src.join(name)).unwrap()))
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !shards.iter().all(|d| blobs.join(format!("{}.verified", d.hex())).is_file()) {
        assert!(std::time::Instant::now() < deadline, "complete blobs were not verified");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for d in &shards {
        let data = std::fs::read(blobs.join(d.hex())).unwrap();
        assert_eq!(modelpack_snapshotter::modelpack::Digest::of(&data), *d, "the data file is the blob");
    }
    // New opens are served by the kernel from those files, with the same bytes,
    // including through mmap.
    assert_same_tree(&src, &m.mountpoint);
    let f = std::fs::File::open(m.mountpoint.join("model-00001-of-00002.safetensors")).unwrap();
    let mut buf = vec![0u8; 100];
    f.read_exact_at(&mut buf, (1 << 20) - 50).unwrap();
    assert_eq!(buf, pseudo_random(3 << 20, 1)[(1 << 20) - 50..(1 << 20) + 50]);
    drop(f);
    let last = m.stop();
    let opens: u64 =
        last.rsplit(", ").next().and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    if kernel_has_passthrough() {
        assert!(opens > 0, "no passthrough opens: {last}");
    }
}

/// A tar holding one file, `name`, of `data`.
fn one_file_tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    builder.append_data(&mut header, name, data).unwrap();
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, data).unwrap();
    gz.finish().unwrap()
}

/// The cache's temporary directory and where it keeps the unpacked copy of `layer`,
/// learnt from the cache itself (opened and closed before the test's processes use it).
fn cache_paths(
    cache_dir: &Path,
    layer: &modelpack_snapshotter::modelpack::Digest,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let cache = modelpack_snapshotter::cache::ChunkCache::open(cache_dir, None).unwrap();
    (cache.temp_path().parent().unwrap().to_owned(), cache.unpacked_path(layer))
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true)
}

/// A gzip bomb (64 MiB of zeros in ~64 KiB) is refused, whether its metadata declares a
/// small file or it declares nothing and meets the configured maximum, and leaves nothing
/// in the cache's temporary directory.
#[test]
fn compressed_layer_bombs_are_refused() {
    if !prerequisites(false) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let tar = one_file_tar("weights.bin", &vec![0u8; 64 << 20]);
    let bomb = gzip(&tar);
    assert!(bomb.len() < 128 << 10, "{} bytes", bomb.len());
    let digest = modelpack_snapshotter::modelpack::Digest::of(&bomb);
    let declared = json!({"org.cncf.model.file.metadata+json":
        r#"{"name":"weights.bin","mode":420,"size":1024,"typeflag":48}"#});
    let cases = [
        ("declared", declared, vec![], "the file size its metadata annotation declares"),
        (
            "undeclared",
            json!({}),
            vec!["--max-unpacked-bytes", "8388608"],
            "more than 8388608 bytes, the limit set by max_unpacked_bytes",
        ),
    ];
    for (name, annotations, args, why) in cases {
        let reference = format!("{}/bombs/{name}:v1", registry.addr());
        let layer = LayerSpec {
            media_type: "application/vnd.cncf.model.weight.v1.tar+gzip".into(),
            data: bomb.clone(),
            annotations,
        };
        push_artifact(&reference, CNCF_ARTIFACT, CNCF_CONFIG, &model_config(&[&tar]), &[layer]);
        let cache = tmp.path().join(name);
        let (tmp_dir, unpacked) = cache_paths(&cache, &digest);
        let mut cmd = vec!["inspect", &reference, "--cache-dir", cache.to_str().unwrap()];
        cmd.extend(&args);
        let (ok, _, stderr) = run_bin(&cmd);
        assert!(!ok, "{name}: the bomb was accepted");
        assert!(
            stderr.contains(&format!("unpacking layer 0 ({digest})")) && stderr.contains("unpacks to more than"),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(why), "{name}: {stderr}");
        assert!(is_empty_dir(&tmp_dir), "{name}: left in {}: {:?}", tmp_dir.display(), std::fs::read_dir(&tmp_dir));
        assert!(!unpacked.exists(), "{name}: an unpacked copy was kept");
    }
}

/// A compressed layer whose unpacked tar does not match the config's diffId is refused;
/// an unpacked copy in the cache that no longer matches is unpacked again, and the mount
/// serves the layer's real bytes.
#[test]
fn compressed_layers_are_checked_against_their_diff_ids() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let weights = pseudo_random(300_000, 11);
    let tar = one_file_tar("weights.bin", &weights);
    let layer = || LayerSpec {
        media_type: "application/vnd.cncf.model.weight.v1.tar+gzip".into(),
        data: gzip(&tar),
        annotations: json!({}),
    };
    let digest = modelpack_snapshotter::modelpack::Digest::of(&layer().data);

    let wrong = format!("{}/models/wrong-diffid:v1", registry.addr());
    push_artifact(&wrong, CNCF_ARTIFACT, CNCF_CONFIG, &model_config(&[b"another tar"]), &[layer()]);
    let cache = tmp.path().join("wrong");
    let (tmp_dir, unpacked) = cache_paths(&cache, &digest);
    let (ok, _, stderr) = run_bin(&["inspect", &wrong, "--cache-dir", cache.to_str().unwrap()]);
    assert!(!ok, "a layer with the wrong diffId was accepted");
    let expected = modelpack_snapshotter::modelpack::Digest::of(b"another tar");
    assert!(
        stderr.contains(&format!("unpacking layer 0 ({digest})"))
            && stderr.contains(&format!(
                "the unpacked tar has digest {}",
                modelpack_snapshotter::modelpack::Digest::of(&tar)
            ))
            && stderr.contains(&format!("diffIds lists {expected}")),
        "{stderr}"
    );
    assert!(is_empty_dir(&tmp_dir) && !unpacked.exists(), "the refused layer left files behind");

    let good = format!("{}/models/good-diffid:v1", registry.addr());
    push_artifact(&good, CNCF_ARTIFACT, CNCF_CONFIG, &model_config(&[&tar]), &[layer()]);
    let cache = tmp.path().join("cache");
    let (_, unpacked) = cache_paths(&cache, &digest);
    let (ok, _, stderr) = run_bin(&["inspect", &good, "--cache-dir", cache.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read(&unpacked).unwrap(), tar);
    // Same length, other bytes: only the digest tells.
    let mut tampered = tar.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0xff;
    std::fs::write(&unpacked, &tampered).unwrap();
    let m = mount(&good, tmp.path(), &[]);
    assert_eq!(std::fs::read(m.mountpoint.join("weights.bin")).unwrap(), weights);
    assert_eq!(std::fs::read(&unpacked).unwrap(), tar, "the copy was unpacked again");
}
