//! Generated types of CRI's image service (`runtime.v1`): the messages the proxy reads
//! (from `proto/cri/runtime/v1/api.proto`) and `ImageService`'s server and client over
//! [`RawCodec`] (declared in `build.rs`).

#![allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

pub mod runtime {
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
        include!(concat!(env!("OUT_DIR"), "/runtime.v1.ImageService.rs"));
    }
}

pub use runtime::v1;

/// A gRPC message as the bytes it is on the wire, neither decoded nor encoded again: what
/// kubelet sends reaches containerd, and what containerd answers reaches kubelet, whole.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
