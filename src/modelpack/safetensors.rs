//! Where each tensor of a safetensors file starts and ends, from the file's header (an
//! 8-byte little-endian length, then that many bytes of JSON whose entries give every
//! tensor's `data_offsets` relative to the end of the header).
//!
//! Used only as a read-ahead hint: read-ahead of a reader that jumped to one tensor stops
//! at that tensor's end. The header comes from the registry and may lie; a lie costs
//! at most a fetch more or less, never a wrong byte, and nothing here trusts it further
//! than its bounds.

use std::collections::HashMap;

/// The most header bytes the format allows (its own limit, 100 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Why a header was not understood.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// The length prefix is larger than the format allows or than the file.
    #[error("safetensors header of {len} bytes does not fit a file of {file_size} bytes (most {MAX_HEADER_BYTES})")]
    HeaderLength { len: u64, file_size: u64 },
    /// The header is not the JSON the format describes.
    #[error("safetensors header: {0}")]
    Json(#[from] serde_json::Error),
}

/// The byte spans of a file's tensors, in file offsets, sorted by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TensorSpans {
    spans: Vec<(u64, u64)>,
}

#[derive(serde::Deserialize)]
struct Entry {
    data_offsets: Option<[u64; 2]>,
}

/// The header's length from the file's first 8 bytes, checked against `file_size`.
pub fn header_len(prefix: [u8; 8], file_size: u64) -> Result<u64, SafetensorsError> {
    let len = u64::from_le_bytes(prefix);
    if len > MAX_HEADER_BYTES || len.saturating_add(8) > file_size {
        return Err(SafetensorsError::HeaderLength { len, file_size });
    }
    Ok(len)
}

impl TensorSpans {
    /// The spans the JSON `header` gives, in a file of `file_size` bytes. Entries without
    /// `data_offsets` (`__metadata__`) are skipped; spans that are reversed or reach past
    /// the file's end are dropped.
    pub fn parse(header: &[u8], file_size: u64) -> Result<Self, SafetensorsError> {
        let base = 8 + header.len() as u64;
        let entries: HashMap<String, Entry> = serde_json::from_slice(header)?;
        let mut spans: Vec<(u64, u64)> = entries
            .values()
            .filter_map(|e| e.data_offsets)
            .filter_map(|[b, e]| Some((base.checked_add(b)?, base.checked_add(e)?)))
            .filter(|&(b, e)| b < e && e <= file_size)
            .collect();
        spans.sort_unstable();
        Ok(Self { spans })
    }

    /// The span `[start, end)` of the tensor holding the byte at `offset`, if any.
    pub fn span_at(&self, offset: u64) -> Option<(u64, u64)> {
        let i = self.spans.partition_point(|&(start, _)| start <= offset);
        let (start, end) = *self.spans.get(i.checked_sub(1)?)?;
        (offset < end).then_some((start, end))
    }

    /// How many tensors it knows.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether it knows none.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str) -> Vec<u8> {
        json.as_bytes().to_vec()
    }

    #[test]
    fn spans_are_file_offsets_of_each_tensor() {
        let h = header(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
        );
        let base = 8 + h.len() as u64;
        let spans = TensorSpans::parse(&h, base + 12).unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans.span_at(base), Some((base, base + 4)));
        assert_eq!(spans.span_at(base + 4), Some((base + 4, base + 12)));
        assert_eq!(spans.span_at(base + 11), Some((base + 4, base + 12)));
        assert_eq!(spans.span_at(base + 12), None);
        assert_eq!(spans.span_at(3), None, "the header is in no tensor");
    }

    #[test]
    fn lying_headers_are_bounded() {
        assert!(header_len((MAX_HEADER_BYTES + 1).to_le_bytes(), u64::MAX).is_err());
        assert!(header_len(100u64.to_le_bytes(), 50).is_err());
        assert_eq!(header_len(100u64.to_le_bytes(), 108).unwrap(), 100);
        let h = header(
            r#"{"a":{"data_offsets":[10,2]},"b":{"data_offsets":[0,999999]},"c":{"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
        );
        assert!(TensorSpans::parse(&h, 1000).unwrap().is_empty());
        assert!(TensorSpans::parse(b"not json", 1000).is_err());
        assert!(TensorSpans::parse(br#"{"a":{"data_offsets":"x"}}"#, 1000).is_err());
    }
}
