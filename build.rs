//! Generates the gRPC services we serve from `proto/`: containerd's snapshots API, CSI's
//! Identity and Node services, and the messages of CRI's image service that its proxy
//! reads (pure Rust: `protox` compiles the files, so no `protoc` is needed). CRI's
//! `ImageService` itself is declared here, with a codec that keeps each message as the
//! bytes it came as: the proxy forwards calls unchanged, fields this build does not know
//! included.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/containerd/types/mount.proto",
        "proto/csi/v1/csi.proto",
        "proto/cri/runtime/v1/api.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(descriptors)?;
    tonic_build::manual::Builder::new().build_server(true).build_client(true).compile(&[cri_image_service()]);
    Ok(())
}

/// `runtime.v1.ImageService`, every call of it as CRI v1 defines them, each message raw.
fn cri_image_service() -> tonic_build::manual::Service {
    let raw = |name: &str, route: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type("bytes::Bytes")
            .output_type("bytes::Bytes")
            .codec_path("crate::cri::proto::RawCodec")
            .build()
    };
    tonic_build::manual::Service::builder()
        .name("ImageService")
        .package("runtime.v1")
        .method(raw("list_images", "ListImages"))
        .method(raw("image_status", "ImageStatus"))
        .method(raw("pull_image", "PullImage"))
        .method(raw("remove_image", "RemoveImage"))
        .method(raw("image_fs_info", "ImageFsInfo"))
        .build()
}
