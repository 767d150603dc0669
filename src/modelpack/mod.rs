//! The ModelPack artifact format, as pure data: media types and annotations
//! ([`media`]), manifests and configs ([`manifest`]), untrusted path rules ([`path`]),
//! tar layer indexing ([`tar_index`]), the merged file tree ([`tree`]), the lazy index
//! ([`index`]), the companion layer's labels ([`labels`]), referrers lists
//! ([`referrers`]) and the tensor spans of a safetensors header ([`safetensors`]).
//!
//! Nothing here does I/O of its own: callers hand in bytes or a reader. Every string
//! that comes from a registry is validated here before anything deeper sees it.

pub mod digest;
pub mod index;
pub mod labels;
pub mod manifest;
pub mod media;
pub mod path;
pub mod referrers;
pub mod safetensors;
pub mod select;
pub mod tar_index;
pub mod tree;

pub use digest::Digest;
