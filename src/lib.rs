//! modelpack-snapshotter: lazy, verified access to CNCF ModelPack artifacts in OCI
//! registries, for any host (`mount`) and for containerd (`serve`).
//!
//! The data path runs one way: [`fs`] (FUSE) asks [`blob`] for bytes, which serves them
//! from [`cache`] or fetches them through [`registry`]. [`modelpack`] is the pure model
//! of the artifact format used by all layers; [`model`] ties a reference (or a
//! [`companion`] image's lazy index) to a tree of files; [`push`] builds artifacts and
//! [`convert`] builds companion images. [`daemon`] serves [`snapshotter`], containerd's
//! snapshots API, whose records live in [`metadata`], and [`layerstore`],
//! containers/storage's additional layer store (CRI-O, podman), [`csi`], a CSI node
//! plugin, and [`cri`], a proxy of CRI's image service that hands kubelet's pull secrets
//! to the snapshotter; [`config`] holds every tunable; [`progress`] shows the progress of
//! long transfers on standard error; [`metrics`] declares what the process measures;
//! [`restart`] keeps what must outlive a restart of the daemon.
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod blob;
pub mod cache;
pub mod companion;
pub mod config;
pub mod convert;
pub mod cri;
pub mod csi;
pub mod daemon;
pub mod fs;
pub mod layerstore;
pub mod metadata;
pub mod metrics;
pub mod model;
pub mod modelpack;
pub mod progress;
pub mod push;
pub mod registry;
pub mod restart;
pub mod snapshotter;
