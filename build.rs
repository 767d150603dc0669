//! Generates the gRPC services we serve from `proto/`: containerd's snapshots API and
//! CSI's Identity and Node services (pure Rust: `protox` compiles the files, so no
//! `protoc` is needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/containerd/types/mount.proto",
        "proto/csi/v1/csi.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(descriptors)?;
    Ok(())
}
