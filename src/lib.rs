//! modelpack-snapshotter: lazy, verified access to CNCF ModelPack artifacts in OCI
//! registries.
//!
//! The data path runs one way: [`fs`] (FUSE) asks [`blob`] for bytes, which serves them
//! from [`cache`] or fetches them through [`registry`]. [`modelpack`] is the pure model
//! of the artifact format used by all layers; [`model`] ties a reference to a tree of
//! files; [`push`] builds artifacts.
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod blob;
pub mod cache;
pub mod companion;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod fs;
pub mod metadata;
pub mod model;
pub mod modelpack;
pub mod push;
pub mod registry;
pub mod snapshotter;
