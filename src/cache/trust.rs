//! Who vouches for which cached bytes. Every trust decision of the cache is made here;
//! [`super::ChunkCache`] applies them and [`crate::blob`] asks them.
//!
//! One cache serves every model of a node, and models come from people who may want to
//! read or corrupt another tenant's model. So a cached chunk is served to a reader only
//! when something that reader believes vouches for it:
//!
//! - **A verified blob** is trusted by every reader: its whole content was hashed (in
//!   arrival order where it could be, see [`HashSlot`]) and matched its own digest. Only
//!   then is its verified marker written, and only then is it served by passthrough.
//! - **A chunk of an unverified blob** carries the [`Voucher`]s that stood behind its
//!   exact bytes (one stored generation of the chunk):
//!   - [`Voucher::Index`]: its pieces matched the chunk digests of the lazy index with
//!     that JSON digest. Readers of that index trust it; nobody else does, since a
//!     forged index can list digests of any bytes it likes.
//!   - [`Voucher::Reader`]: a reader with no chunk digests (a plain artifact) fetched it
//!     in this process. Only that reader trusts it: it is what its own registry said.
//! - A chunk cached by an earlier process carries no voucher. A reader with an index
//!   checks it against its digests (and vouches for it if it passes); a reader without
//!   one cannot check it, so it is dropped and fetched again.
//! - A blob whose every chunk is present but whose whole hash differs from its digest
//!   is evicted. Every index that vouched for *every* chunk of it described bytes that
//!   are not the blob it names: it is condemned, and its readers get errors from then on
//!   (an honest index can never be condemned: its digests only match the real bytes).

use std::fmt;

use crate::modelpack::digest::Hasher;
use crate::modelpack::Digest;

/// What stood behind one stored chunk's bytes before the blob was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Voucher {
    /// The chunk matched the chunk digests of the lazy index whose JSON has this digest.
    Index(Digest),
    /// A reader without chunk digests fetched it in this process (ids from
    /// [`super::ChunkCache::new_reader`]).
    Reader(u64),
}

impl fmt::Display for Voucher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Voucher::Index(d) => write!(f, "lazy index {d}"),
            Voucher::Reader(n) => write!(f, "unchecked reader {n}"),
        }
    }
}

/// How a reader stands to a cached chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Not cached.
    Absent,
    /// Cached, and the reader may serve it: its blob is verified or the reader's voucher
    /// stands behind these bytes.
    Trusted,
    /// Cached, but nothing the reader believes vouches for it: check it first, or drop it.
    Unvouched,
}

/// The standing of a present chunk with `vouchers` for a reader with `voucher`, in a
/// blob verified or not.
pub(super) fn standing(verified: bool, vouchers: &[Voucher], voucher: &Voucher) -> Standing {
    if verified || vouchers.contains(voucher) {
        Standing::Trusted
    } else {
        Standing::Unvouched
    }
}

/// The vouchers that stood behind every chunk of a blob that failed its whole hash: each
/// of them vouched for bytes that are not the blob. Readers vouch only for what they
/// fetched without a check, so only indexes are condemned.
pub(super) fn liars<'a>(mut per_chunk: impl Iterator<Item = &'a [Voucher]>) -> Vec<Digest> {
    let Some(first) = per_chunk.next() else { return Vec::new() };
    let mut common: Vec<Digest> = first
        .iter()
        .filter_map(|v| match v {
            Voucher::Index(d) => Some(*d),
            Voucher::Reader(_) => None,
        })
        .collect();
    for vouchers in per_chunk {
        common.retain(|d| vouchers.contains(&Voucher::Index(*d)));
    }
    common
}

/// What came of hashing a whole blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The blob matched its digest: it is now verified, trusted by every reader.
    Verified,
    /// A chunk went missing (or the blob changed) while it was being hashed; nothing was
    /// decided. The next completion tries again.
    Incomplete,
    /// The whole blob hashed to `actual`, not its digest. It was evicted; `condemned`
    /// lists the indexes that vouched for every chunk of it.
    Mismatch { actual: Digest, condemned: Vec<Digest> },
}

/// The whole-blob hash of one blob, fed with its chunks in order as they arrive, so that
/// verification rarely reads a blob back from disk.
#[derive(Debug)]
pub(super) enum HashSlot {
    /// Chunks `0..next` are in `hasher`.
    Idle { next: u64, hasher: Hasher },
    /// A thread is feeding it. `stale` is set when a chunk of the blob is removed
    /// meanwhile: the hash may then cover bytes that are no longer the blob's.
    Busy { stale: bool },
}

impl HashSlot {
    /// Notes that chunk `index` of the blob was removed. Returns false when the slot no
    /// longer describes the blob's bytes and must be dropped.
    pub(super) fn keep_after_removal(&mut self, index: Option<u64>) -> bool {
        match self {
            HashSlot::Idle { next, .. } => index.is_some_and(|i| i >= *next),
            HashSlot::Busy { stale } => {
                *stale = true;
                true
            }
        }
    }
}

/// The marker file's content: written only after the whole blob hashed to its digest.
/// Markers with other content (earlier versions wrote empty ones, some of them for blobs
/// that were never hashed whole) vouch for nothing.
pub(super) const MARKER_CONTENT: &[u8] = b"sha256 of the whole blob matched its digest\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn a_verified_blob_is_trusted_by_everyone_and_a_chunk_only_by_its_vouchers() {
        let honest = Voucher::Index(d(1));
        let forged = Voucher::Index(d(2));
        assert_eq!(standing(true, &[], &honest), Standing::Trusted);
        assert_eq!(standing(false, &[forged], &forged), Standing::Trusted);
        assert_eq!(standing(false, &[forged], &honest), Standing::Unvouched);
        assert_eq!(standing(false, &[forged], &Voucher::Reader(1)), Standing::Unvouched);
        assert_eq!(standing(false, &[], &Voucher::Reader(1)), Standing::Unvouched);
    }

    #[test]
    fn only_indexes_that_vouched_for_every_chunk_are_condemned() {
        let (a, b, c) = (Voucher::Index(d(1)), Voucher::Index(d(2)), Voucher::Index(d(3)));
        let chunks: Vec<Vec<Voucher>> = vec![vec![a, b, Voucher::Reader(7)], vec![a, c], vec![Voucher::Reader(7), a]];
        assert_eq!(liars(chunks.iter().map(Vec::as_slice)), vec![d(1)]);
        let mixed: Vec<Vec<Voucher>> = vec![vec![b], vec![c]];
        assert!(liars(mixed.iter().map(Vec::as_slice)).is_empty());
        let readers: Vec<Vec<Voucher>> = vec![vec![Voucher::Reader(7)], vec![Voucher::Reader(7)]];
        assert!(liars(readers.iter().map(Vec::as_slice)).is_empty(), "a registry lied; no index did");
    }

    #[test]
    fn removing_a_hashed_chunk_drops_the_slot() {
        let mut idle = HashSlot::Idle { next: 3, hasher: Hasher::default() };
        assert!(idle.keep_after_removal(Some(5)), "not hashed yet");
        assert!(!idle.keep_after_removal(Some(2)));
        assert!(!idle.keep_after_removal(None), "the whole blob went");
        let mut busy = HashSlot::Busy { stale: false };
        assert!(busy.keep_after_removal(Some(9)));
        assert!(matches!(busy, HashSlot::Busy { stale: true }));
    }
}
