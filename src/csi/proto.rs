//! Generated types of the CSI specification's Identity and Node services (from
//! `proto/csi/v1/csi.proto`).

#![allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

pub use csi::v1;
