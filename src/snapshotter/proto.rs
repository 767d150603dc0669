//! Generated types of containerd's snapshots API (from `proto/`), in a module tree that
//! mirrors the protobuf packages so that cross-package references resolve.

#![allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
