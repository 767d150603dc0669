//! The Kubernetes install (`contrib/kubernetes/snapshotter/`) kept true without a cluster:
//! the ConfigMap's `config.toml` is accepted by the daemon's own loader, and every path it
//! names is the host path the DaemonSet mounts there (with the propagation containerd
//! needs); the containerd drop-in dials that socket and defines the runtime handler the
//! RuntimeClass and the example pod name; the install script installs the drop-in only
//! where containerd reads it and restarts containerd only when asked; and a real
//! containerd 2.x whose main config imports the drop-in runs a pod of that runtime
//! handler with a model as an image volume, while a pod without it needs no daemon. The
//! image `scripts/build-image.sh` builds from Debian packages (no base image) runs the
//! binary and fusermount3, has the CA certificates, and runs the init container's script
//! as the DaemonSet does, in Debian 12's podman.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::containerd::{Containerd, Flavor};
use common::cri::{cri_prerequisites, fixture, image_volume, printed_sums, sha256_every_file, sums, Cri};
use common::podman::{require_podman, run_within, Flavor as PodmanFlavor, Podman};
use common::*;
use modelpack_snapshotter::daemon::DaemonConfig;

fn install_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/kubernetes/snapshotter")
}

fn read(name: &str) -> String {
    let path = install_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn config() -> DaemonConfig {
    DaemonConfig::load(&install_dir().join("config.toml")).expect("the ConfigMap's config.toml loads")
}

fn drop_in() -> toml::Table {
    toml::from_str(&read("containerd-drop-in.toml")).expect("the drop-in is TOML")
}

/// The block-style YAML the manifests are written in: mappings, sequences, plain or
/// quoted scalars and `[a, b]` lists. Anything else fails the test, so the manifests
/// cannot drift into a form these checks would misread.
#[derive(Debug, Clone, PartialEq)]
enum Yaml {
    Map(Vec<(String, Yaml)>),
    Seq(Vec<Yaml>),
    Str(String),
}

impl Yaml {
    fn parse(text: &str) -> Yaml {
        let mut lines: Vec<(usize, String)> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.trim() != "---")
            .map(|l| (l.len() - l.trim_start().len(), l.trim().to_owned()))
            .collect();
        let mut i = 0;
        let indent = lines[0].0;
        let doc = Self::block(&mut lines, &mut i, indent);
        assert_eq!(i, lines.len(), "unparsed YAML from line {:?}", lines.get(i));
        doc
    }

    fn block(lines: &mut [(usize, String)], i: &mut usize, indent: usize) -> Yaml {
        if lines[*i].1.starts_with("- ") || lines[*i].1 == "-" {
            let mut items = Vec::new();
            while *i < lines.len() && lines[*i].0 == indent && lines[*i].1.starts_with('-') {
                let rest = lines[*i].1[1..].trim_start().to_owned();
                if rest.is_empty() {
                    *i += 1;
                    let inner = lines[*i].0;
                    items.push(Self::block(lines, i, inner));
                } else if Self::key_value(&rest).is_some() {
                    // `- key: value` opens a mapping whose other keys sit under `key`.
                    let inner = indent + 1 + (lines[*i].1.len() - 1 - rest.len());
                    lines[*i] = (inner, rest);
                    items.push(Self::block(lines, i, inner));
                } else {
                    items.push(Self::scalar(&rest));
                    *i += 1;
                }
            }
            return Yaml::Seq(items);
        }
        let mut entries = Vec::new();
        while *i < lines.len() && lines[*i].0 == indent && !lines[*i].1.starts_with("- ") {
            let (key, value) =
                Self::key_value(&lines[*i].1).unwrap_or_else(|| panic!("not `key: value`: {:?}", lines[*i]));
            *i += 1;
            let value = if !value.is_empty() {
                Self::scalar(&value)
            } else if *i < lines.len() && (lines[*i].0 > indent || lines[*i].1.starts_with("- ")) {
                let inner = lines[*i].0;
                Self::block(lines, i, inner)
            } else {
                Yaml::Str(String::new())
            };
            entries.push((key, value));
        }
        assert!(*i == lines.len() || lines[*i].0 < indent, "unexpected indentation at {:?}", lines[*i]);
        Yaml::Map(entries)
    }

    fn key_value(line: &str) -> Option<(String, String)> {
        let (key, value) = line.split_once(": ").or_else(|| line.strip_suffix(':').map(|k| (k, "")))?;
        let plain = !key.is_empty() && !key.starts_with(['"', '\'', '[', '{']);
        plain.then(|| (key.to_owned(), value.trim().to_owned()))
    }

    fn scalar(text: &str) -> Yaml {
        assert!(!text.starts_with(['{', '&', '*', '|', '>']), "unsupported YAML: {text}");
        if let Some(list) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            return Yaml::Seq(list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Self::scalar).collect());
        }
        let unquoted = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(open, close)| text.strip_prefix(*open).and_then(|t| t.strip_suffix(*close)));
        Yaml::Str(unquoted.unwrap_or(text).to_owned())
    }

    /// The value under `key` of a mapping, if any.
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value at a `/`-separated path of keys; panics naming the path if it is missing.
    fn at(&self, path: &str) -> &Yaml {
        path.split('/').fold(self, |node, key| node.get(key).unwrap_or_else(|| panic!("no `{path}` in the manifest")))
    }

    fn str(&self) -> &str {
        match self {
            Yaml::Str(s) => s,
            other => panic!("not a scalar: {other:?}"),
        }
    }

    fn seq(&self) -> &[Yaml] {
        match self {
            Yaml::Seq(items) => items,
            other => panic!("not a sequence: {other:?}"),
        }
    }

    /// The item of a sequence whose `name` is `name`.
    fn named(&self, name: &str) -> &Yaml {
        self.seq()
            .iter()
            .find(|item| item.get("name").map(Yaml::str) == Some(name))
            .unwrap_or_else(|| panic!("nothing named {name}"))
    }

    fn strs(&self) -> Vec<&str> {
        self.seq().iter().map(Yaml::str).collect()
    }
}

fn manifest(name: &str) -> Yaml {
    Yaml::parse(&read(name))
}

/// The DaemonSet's host path volume mounted at `path` in `container`, which must be the
/// same path on the host: (its mount, its volume).
fn host_mount<'a>(pod: &'a Yaml, container: &str, path: &Path) -> (&'a Yaml, &'a Yaml) {
    let c = pod.at("containers").named(container);
    let mount = c
        .at("volumeMounts")
        .seq()
        .iter()
        .find(|m| Path::new(m.at("mountPath").str()) == path)
        .unwrap_or_else(|| panic!("{container} mounts nothing at {}", path.display()));
    let volume = pod.at("volumes").named(mount.at("name").str());
    assert_eq!(
        Path::new(volume.at("hostPath/path").str()),
        path,
        "{} is mounted from another host path: containerd, on the host, would see other files",
        path.display()
    );
    (mount, volume)
}

#[test]
fn the_config_map_config_loads_and_its_paths_are_the_mounted_host_paths() {
    let config = config();
    let ds = manifest("daemonset.yaml");
    assert_eq!(ds.at("kind").str(), "DaemonSet");
    let pod = ds.at("spec/template/spec");
    let daemon = pod.at("containers").named("snapshotter");

    // The daemon reads the ConfigMap's config.toml where the ConfigMap is mounted.
    let args = daemon.at("args").strs();
    let flag = args.iter().position(|a| *a == "--config").expect("serve --config");
    let config_path = Path::new(args[flag + 1]);
    assert_eq!(args[0], "serve");
    let config_mount = daemon
        .at("volumeMounts")
        .seq()
        .iter()
        .find(|m| Path::new(m.at("mountPath").str()) == config_path.parent().unwrap())
        .expect("the config directory is mounted");
    let generated = manifest("kustomization.yaml");
    let generator = generated.at("configMapGenerator").named("modelpack-snapshotter");
    assert_eq!(
        pod.at("volumes").named(config_mount.at("name").str()).at("configMap/name").str(),
        "modelpack-snapshotter"
    );
    assert!(generator.at("files").strs().contains(&config_path.file_name().unwrap().to_str().unwrap()));

    // State root: FUSE mounts made in the pod must reach the host, where containerd
    // mounts overlays of them.
    let (root, _) = host_mount(pod, "snapshotter", &config.root);
    assert_eq!(root.at("mountPropagation").str(), "Bidirectional", "model mounts must propagate to the host");
    host_mount(pod, "snapshotter", &config.cache_dir());
    assert_ne!(config.cache_dir(), config.root.join("cache"), "the cache has a host path of its own");
    let socket_dir = config.address.parent().unwrap();
    let (_, volume) = host_mount(pod, "snapshotter", socket_dir);
    assert_eq!(volume.at("hostPath/type").str(), "DirectoryOrCreate");
    let hosts = config.registry.config_path.clone().expect("the hosts directory is named");
    let (hosts_mount, _) = host_mount(pod, "snapshotter", &hosts);
    assert_eq!(hosts_mount.at("readOnly").str(), "true");
    let (_, fuse) = host_mount(pod, "snapshotter", Path::new("/dev/fuse"));
    assert_eq!(fuse.at("hostPath/type").str(), "CharDevice");
    assert_eq!(daemon.at("securityContext/privileged").str(), "true");

    // The holder: a sidecar started before the daemon, listening where the daemon looks,
    // on the daemon's own state root, so that a restart of the daemon's container is
    // handed over.
    let holder = pod.at("initContainers").named("holder");
    assert_eq!(holder.at("restartPolicy").str(), "Always", "a sidecar outlives the daemon's container restarts");
    assert_eq!(holder.at("args").strs(), ["hold", "--socket", config.holder_socket().to_str().unwrap()]);
    let state = holder
        .at("volumeMounts")
        .seq()
        .iter()
        .find(|m| Path::new(m.at("mountPath").str()) == config.root)
        .expect("the holder mounts the state root");
    assert_eq!(state.at("name").str(), root.at("name").str(), "the holder and the daemon share the state root");
    assert_eq!(
        state.at("mountPropagation").str(),
        "Bidirectional",
        "the holder's stop unmounts what the daemon mounted"
    );
    // When the pod goes, the holder stops the daemon for good, with the daemon's config.
    let stop = holder.at("lifecycle/preStop/exec/command").strs();
    assert_eq!(stop[..2], ["modelpack-snapshotter", "stop"]);
    let flag = stop.iter().position(|a| *a == "--config").expect("stop --config");
    assert_eq!(stop[flag + 1], config_path.to_str().unwrap());
    assert!(holder
        .at("volumeMounts")
        .seq()
        .iter()
        .any(|m| m.at("mountPath").str() == config_mount.at("mountPath").str()));

    // Probes look at the socket the config binds.
    for probe in ["readinessProbe", "livenessProbe"] {
        let command = daemon.at(probe).at("exec/command").strs();
        assert_eq!(command, ["test", "-S", config.address.to_str().unwrap()], "{probe}");
    }
    // A stop waits shutdown_grace_secs for calls, then unmounts: kubelet must not kill first.
    let grace: u64 = pod.at("terminationGracePeriodSeconds").str().parse().unwrap();
    assert!(grace > config.shutdown_grace_secs + 10, "terminationGracePeriodSeconds {grace} too short");
    assert_eq!(ds.at("spec/updateStrategy/type").str(), "OnDelete");
}

#[test]
fn the_drop_in_dials_the_socket_and_defines_the_runtime_class_handler() {
    let config = config();
    let drop_in = drop_in();
    assert_eq!(drop_in["version"].as_integer(), Some(3), "containerd 2.x config");
    let proxy = &drop_in["proxy_plugins"]["modelpack"];
    assert_eq!(proxy["type"].as_str(), Some("snapshot"));
    assert_eq!(Path::new(proxy["address"].as_str().unwrap()), config.address, "containerd dials the daemon's socket");
    // The same proxy plugin as the node-wide configuration for containerd 2.x.
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/containerd/config-2.x.toml");
    let node_wide: toml::Table = toml::from_str(&std::fs::read_to_string(contrib).unwrap()).unwrap();
    assert_eq!(drop_in["proxy_plugins"], node_wide["proxy_plugins"]);

    // The runtime handler uses that snapshotter, and the RuntimeClass and the pod name it.
    let runtimes = drop_in["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"].as_table().unwrap();
    let (handler, runtime) = runtimes.iter().next().unwrap();
    assert_eq!(runtimes.len(), 1, "the drop-in adds one runtime handler and changes no other");
    assert_eq!(runtime["snapshotter"].as_str(), Some("modelpack"));
    assert_eq!(runtime["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
    assert!(
        drop_in["plugins"].as_table().unwrap().len() == 1,
        "no other plugin section: the default snapshotter stays"
    );
    let class = manifest("runtimeclass.yaml");
    assert_eq!(class.at("kind").str(), "RuntimeClass");
    assert_eq!(class.at("handler").str(), handler);
    let pod = manifest("pod.yaml");
    assert_eq!(pod.at("spec/runtimeClassName").str(), class.at("metadata/name").str());
    assert!(pod.at("spec/volumes").named("model").get("image").is_some(), "the example reads an image volume");

    // The init container installs this very file, into the directory it mounts.
    let ds = manifest("daemonset.yaml");
    let spec = ds.at("spec/template/spec");
    let init = spec.at("initContainers").named("install-containerd-drop-in");
    let command = init.at("command").strs();
    let script = Path::new(command[1]);
    assert_eq!(command[0], "sh");
    let mounted = init
        .at("volumeMounts")
        .seq()
        .iter()
        .find(|m| Path::new(m.at("mountPath").str()) == script.parent().unwrap())
        .expect("the script's directory is mounted");
    assert_eq!(spec.at("volumes").named(mounted.at("name").str()).at("configMap/name").str(), "modelpack-snapshotter");
    let env = |name: &str| init.at("env").named(name).at("value").str().to_owned();
    assert_eq!(env("RESTART_CONTAINERD"), "false", "restarting containerd is the operator's choice");
    let containerd_etc = init
        .at("volumeMounts")
        .seq()
        .iter()
        .find(|m| m.at("mountPath").str() == "/host/etc/containerd")
        .expect("the host's /etc/containerd is mounted at /host/etc/containerd");
    assert_eq!(spec.at("volumes").named(containerd_etc.at("name").str()).at("hostPath/path").str(), "/etc/containerd");
    assert!(env("DROP_IN_DIR").starts_with("/etc/containerd/"));

    // The kustomization: every resource and generated file exists, images are replaced.
    let kustomization = manifest("kustomization.yaml");
    for resource in kustomization.at("resources").strs() {
        assert!(install_dir().join(resource).is_file(), "{resource} is missing");
    }
    let files = kustomization.at("configMapGenerator").named("modelpack-snapshotter").at("files").strs();
    for file in ["config.toml", "containerd-drop-in.toml", script.file_name().unwrap().to_str().unwrap()] {
        assert!(files.contains(&file) && install_dir().join(file).is_file(), "{file} is not generated");
    }
    let image = kustomization.at("images").seq()[0].at("name").str();
    for container in spec.at("initContainers").seq().iter().chain(spec.at("containers").seq()) {
        assert_eq!(container.at("image").str(), image, "kustomize sets every image");
    }
    let namespace = manifest("namespace.yaml");
    let namespace = namespace.at("metadata/name").str();
    assert_eq!(ds.at("metadata/namespace").str(), namespace);
    assert_eq!(manifest("serviceaccount.yaml").at("metadata/namespace").str(), namespace);
    assert_eq!(spec.at("serviceAccountName").str(), manifest("serviceaccount.yaml").at("metadata/name").str());
}

/// Runs the install script against a fake host under `host`, with a `nsenter` on PATH
/// that records its arguments in `host/nsenter.args`: (success, output).
fn run_install(host: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let bin = host.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let nsenter = bin.join("nsenter");
    std::fs::write(&nsenter, format!("#!/bin/sh\necho \"$@\" >> {}\n", host.join("nsenter.args").display())).unwrap();
    std::fs::set_permissions(&nsenter, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new("sh")
        .arg(install_dir().join("install-containerd-drop-in.sh"))
        .env("HOST_ROOT", host)
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .envs(env.iter().copied())
        .output()
        .expect("running sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_install_script_installs_where_containerd_reads_and_restarts_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path();
    let etc = host.join("etc/containerd");
    let installed = etc.join("conf.d/modelpack-snapshotter.toml");
    let restarts = || std::fs::read_to_string(host.join("nsenter.args")).unwrap_or_default();

    // No main config: containerd's defaults import nothing.
    let (ok, out) = run_install(host, &[("RESTART_CONTAINERD", "true")]);
    assert!(ok && out.contains("nothing installed") && !installed.exists(), "{out}");

    // containerd 1.x (version 2) would replace its whole CRI section with the drop-in's.
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("config.toml"), "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n").unwrap();
    let (ok, out) = run_install(host, &[("RESTART_CONTAINERD", "true")]);
    assert!(ok && out.contains("version 2") && !installed.exists(), "{out}");

    // Version 3 without imports: installed, said to be unread, containerd left alone.
    std::fs::write(etc.join("config.toml"), "version = 3\n").unwrap();
    let (ok, out) = run_install(host, &[("RESTART_CONTAINERD", "true")]);
    assert!(ok && out.contains("does not import /etc/containerd/conf.d"), "{out}");
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), read("containerd-drop-in.toml"));
    assert_eq!(restarts(), "");
    std::fs::remove_file(&installed).unwrap();

    // Imported, restart not asked: installed, and containerd reads it when it next starts.
    let main = "version = 3\nimports = [\n  \"/etc/containerd/conf.d/*.toml\",\n]\n";
    std::fs::write(etc.join("config.toml"), main).unwrap();
    let (ok, out) = run_install(host, &[]);
    assert!(ok && out.contains("when it next starts") && installed.is_file(), "{out}");
    assert_eq!(restarts(), "");

    // Asked to restart: only when the file changed.
    let (ok, out) = run_install(host, &[("RESTART_CONTAINERD", "true")]);
    assert!(ok && out.contains("up to date"), "{out}");
    assert_eq!(restarts(), "");
    std::fs::write(&installed, "version = 3\n# an older drop-in\n").unwrap();
    let (ok, out) = run_install(host, &[("RESTART_CONTAINERD", "true")]);
    assert!(ok && out.contains("restarted containerd"), "{out}");
    assert_eq!(restarts(), "--target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd\n");
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), read("containerd-drop-in.toml"));

    // A directory outside the mounted /etc/containerd cannot be written.
    let (ok, out) = run_install(host, &[("DROP_IN_DIR", "/etc/other")]);
    assert!(ok && out.contains("not under /etc/containerd"), "{out}");
}

/// The drop-in as installed, for a test containerd: the proxy plugin dials `socket`,
/// and the runtime handler runs this machine's runc with cgroupfs (no systemd here).
fn drop_in_for_test(socket: &Path) -> String {
    let mut drop_in = drop_in();
    let proxy = drop_in["proxy_plugins"]["modelpack"].as_table_mut().unwrap();
    proxy.insert("address".into(), socket.display().to_string().into());
    let runtimes = drop_in["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"].as_table_mut().unwrap();
    let options = runtimes["modelpack"]["options"].as_table_mut().unwrap();
    assert_eq!(options["SystemdCgroup"].as_bool(), Some(true), "the drop-in names kubeadm's cgroup driver");
    options.insert("SystemdCgroup".into(), false.into());
    options.insert("BinaryName".into(), which("runc").expect("runc").display().to_string().into());
    toml::to_string(&drop_in).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_with_the_drop_in_runs_the_runtime_class_pod_reading_a_model() {
    if !cri_prerequisites(Flavor::V2) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tokio::task::block_in_place(|| fixture(tmp.path()));

    // The ConfigMap's configuration, its host paths moved under the test's directory.
    let mut daemon: toml::Table = toml::from_str(&read("config.toml")).unwrap();
    daemon["cache"].as_table_mut().unwrap().insert("dir".into(), tmp.path().join("cache").display().to_string().into());
    let daemon_config = write_config(&tmp.path().join("etc"), &toml::to_string(&daemon).unwrap());
    let socket_dir = tmp.path().join("run");
    let mut serve = SnapshotterProcess::start_with(
        &tmp.path().join("state"),
        &socket_dir.join(config().address.file_name().unwrap()),
        &daemon_config,
    );

    let conf_d = tmp.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::write(conf_d.join("modelpack-snapshotter.toml"), drop_in_for_test(&serve.socket)).unwrap();
    let containerd = Containerd::start_cri_importing(
        Flavor::V2,
        &tmp.path().join("containerd"),
        &f.sandbox,
        &[f.proxy.addr()],
        &[conf_d.join("*.toml")],
    );
    let mut cri = Cri::connect(&containerd.socket).await;
    // kubelet pulls with the node's default snapshotter; the runtime handler's takes
    // over when a container of the pod is created.
    cri.pull(&f.companion).await;
    cri.pull(&f.busybox).await;
    assert_eq!(snapshot_names(&serve.socket, "").await, Vec::<String>::new(), "pulls leave the snapshotter alone");

    let logs = tmp.path().join("logs");
    let sandbox = cri.run_sandbox_with_handler("model-reader", &logs, "modelpack").await;
    let (code, log) = cri
        .run_to_exit(
            &sandbox,
            "reader",
            &f.busybox,
            &["/bin/sh", "-c", &sha256_every_file("/models")],
            vec![image_volume(&f.companion, "/models")],
            &logs,
        )
        .await;
    cri.remove_sandbox(&sandbox.0).await;
    assert_eq!(code, 0, "container failed:\n{log}\n{}", containerd.log());
    assert_eq!(printed_sums(&log), sums(&f.src), "the pod read the model through the snapshotter");

    // With the daemon stopped, a pod without the RuntimeClass still runs: the node's
    // other pods (the DaemonSet's own among them) never wait for it.
    serve.stop();
    let sandbox = cri.run_sandbox("ordinary", &logs).await;
    let (code, log) = cri.run_to_exit(&sandbox, "ordinary", &f.busybox, &["/bin/echo", "ok"], vec![], &logs).await;
    cri.remove_sandbox(&sandbox.0).await;
    assert_eq!((code, log.trim()), (0, "ok"), "{}", containerd.log());
}

/// How long `scripts/build-image.sh` may take with a given binary: mmdebstrap fetches
/// some 70 packages from the Debian mirror (20-40 s here).
const IMAGE_BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The name `scripts/build-image.sh` gives the image when not given one.
const DEFAULT_IMAGE_NAME: &str = "localhost/modelpack-snapshotter:dev";

/// A program that runs `podman`'s command (its storage, flags and environment) with the
/// arguments it is given, for a script that runs podman itself (`PODMAN`).
fn podman_program(podman: &Podman, dir: &Path) -> PathBuf {
    let cmd = podman.command(&[]);
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_str().unwrap().replace('\'', r"'\''"));
    let mut line = String::from("exec env -i");
    for (key, value) in cmd.get_envs() {
        let assignment = format!("{}={}", key.to_str().unwrap(), value.unwrap().to_str().unwrap());
        line += &format!(" {}", quote(assignment.as_ref()));
    }
    for word in std::iter::once(cmd.get_program()).chain(cmd.get_args()) {
        line += &format!(" {}", quote(word));
    }
    let program = dir.join("podman");
    std::fs::write(&program, format!("#!/bin/sh\n{line} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    program
}

/// The Containerfile's `ENTRYPOINT` (exec form).
fn containerfile_entrypoint() -> Vec<String> {
    let containerfile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Containerfile")).unwrap();
    let line =
        containerfile.lines().find_map(|l| l.strip_prefix("ENTRYPOINT ")).expect("the Containerfile's ENTRYPOINT");
    serde_json::from_str(line).expect("an ENTRYPOINT in exec form")
}

#[test]
fn the_image_built_from_debian_packages_runs_the_daemon_fusermount3_and_the_init_container_script() {
    if !require_tools(&["mmdebstrap"]) || !require_podman(PodmanFlavor::V4) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Dropped first: removes the image and every container, then its storage.
    let podman = Podman::new(PodmanFlavor::V4);
    let archive = tmp.path().join("image.tar");
    let mut build = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-image.sh"));
    build.args(["--binary", BIN, "--oci-archive"]).arg(&archive).env("PODMAN", podman_program(&podman, tmp.path()));
    let started = Instant::now();
    let (status, stdout, stderr) = run_within(build, IMAGE_BUILD_TIMEOUT);
    assert!(status.as_ref().is_ok_and(|s| s.success()), "build-image.sh: {status:?}\n{stdout}\n{stderr}");
    eprintln!("{} ({:.0?})", stdout.lines().last().unwrap_or_default(), started.elapsed());
    let image = DEFAULT_IMAGE_NAME;

    // Its entrypoint is the Containerfile's: the daemon, which the pod gives its args.
    let entrypoint = podman.cmd(&["image", "inspect", "--format", "{{json .Config.Entrypoint}}", image]).unwrap();
    assert_eq!(serde_json::from_str::<Vec<String>>(&entrypoint).unwrap(), containerfile_entrypoint());
    let version = podman.run(image, &["--version"]).unwrap();
    assert_eq!(version.trim(), format!("modelpack-snapshotter {}", env!("CARGO_PKG_VERSION")));
    let fusermount = podman.run_with(&["--entrypoint", "fusermount3"], image, &["-V"]).unwrap();
    assert!(fusermount.contains("fusermount3 version"), "{fusermount}");
    // Registries' certificates are checked against the system's roots.
    podman
        .run_with(&["--entrypoint", "test"], image, &["-s", "/etc/ssl/certs/ca-certificates.crt"])
        .expect("the image has the CA certificates");

    // The init container, as the DaemonSet runs it: its command, its environment, the
    // ConfigMap's files and the host's /etc/containerd where it mounts them, privileged.
    let ds = manifest("daemonset.yaml");
    let init = ds.at("spec/template/spec/initContainers").named("install-containerd-drop-in");
    let mount_path = |volume: &str| {
        let mounts = init.at("volumeMounts");
        mounts.named(volume).at("mountPath").str().to_owned()
    };
    let etc = tmp.path().join("etc-containerd");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("config.toml"), "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n").unwrap();
    let installed = etc.join("conf.d/modelpack-snapshotter.toml");
    let command = init.at("command").strs();
    let run_init = |restart: &str| {
        let volumes = [
            format!("{}:{}:ro", install_dir().display(), mount_path("config")),
            format!("{}:{}", etc.display(), mount_path("containerd-config")),
        ];
        let mut env = Vec::new();
        for var in init.at("env").seq() {
            let (name, value) = (var.at("name").str(), var.at("value").str());
            env.push(format!("{name}={}", if name == "RESTART_CONTAINERD" { restart } else { value }));
        }
        let mut extra = vec!["--privileged", "--entrypoint", command[0], "-v", &volumes[0], "-v", &volumes[1]];
        for var in &env {
            extra.extend(["-e", var]);
        }
        let (ok, stdout, stderr) = podman.run_output(&extra, image, &command[1..]);
        (ok, format!("{stdout}{stderr}"))
    };

    let (ok, out) = run_init("false");
    assert!(ok && out.contains("installed /etc/containerd/conf.d/modelpack-snapshotter.toml"), "{out}");
    assert!(out.contains("when it next starts"), "{out}");
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), read("containerd-drop-in.toml"));
    let (ok, out) = run_init("true");
    assert!(ok && out.contains("is up to date"), "cmp found the same file: {out}");
    // Asked to restart after a change: nsenter runs. Without hostPID its PID 1 is the
    // container's own, which has no systemctl (never this machine's containerd).
    std::fs::write(&installed, "version = 3\n# an older drop-in\n").unwrap();
    let (ok, out) = run_init("true");
    assert!(ok && out.contains("nsenter: failed to execute systemctl"), "{out}");
    assert!(out.contains("restarting containerd failed"), "{out}");
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), read("containerd-drop-in.toml"));

    // The OCI archive is the same image: loaded again under its name, it runs.
    podman.rmi(image).unwrap();
    podman.cmd(&["load", "--quiet", "--input", archive.to_str().unwrap()]).unwrap();
    assert_eq!(podman.run(image, &["--version"]).unwrap(), version);
}
