//! Indexing of tar layers: where each file's bytes sit inside the uncompressed blob,
//! so FUSE can serve a file by reading a byte range instead of unpacking the archive.
//!
//! The archive is untrusted, so this module walks its headers itself, with the `tar`
//! crate only decoding single header blocks and PAX records: every record it reads into
//! memory (GNU long names and links, PAX records) is bounded by [`TarLimits`] before a
//! byte of it is read, every entry's data must lie inside the blob whose size the caller
//! states, and the number of entries is bounded. Only regular files, directories, hard
//! links to earlier files and symlinks that stay inside the tree are accepted: devices,
//! fifos and sparse files are refused, because the tree is served read-only and
//! byte-exact.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom};

use tar::{EntryType, Header, PaxExtensions};

use super::path::{self, ModelPath, PathError, MAX_PATH_LEN};

/// Bytes in a tar block: every header is one block, and data is padded to whole blocks.
pub const BLOCK_SIZE: u64 = 512;
/// Most entries accepted in one archive, counting the root directory and global PAX
/// headers that are skipped: a bound on the headers walked, since each entry brings at
/// most one long name, one long link and one PAX record of its own.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Largest GNU long-name or long-link record, and largest PAX record set (local or
/// global), in bytes. A long name is at most a path (4096 bytes); PAX records also carry
/// extended attributes and comments, for which 1 MiB is far more than any tool writes.
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// The bounds applied while indexing one archive; [`Default`] gives the constants above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TarLimits {
    /// Most entries, see [`MAX_ENTRIES`].
    pub max_entries: usize,
    /// Largest long-name, long-link or PAX record, see [`MAX_EXTENSION_BYTES`].
    pub max_extension_bytes: u64,
}

impl Default for TarLimits {
    fn default() -> Self {
        Self { max_entries: MAX_ENTRIES, max_extension_bytes: MAX_EXTENSION_BYTES }
    }
}

/// Why a tar layer cannot be served. Each variant names the offending entry or the
/// offset of the offending header in the (uncompressed) blob.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// Reading the archive failed.
    #[error("reading the tar archive at offset {offset}: {source}")]
    Read {
        /// Where the read started.
        offset: u64,
        /// What the reader reported.
        #[source]
        source: io::Error,
    },
    /// The blob ends inside a header or an extension record.
    #[error("tar archive ends inside the {what} at offset {offset}")]
    Truncated {
        /// Offset of the header whose block or record is cut short.
        offset: u64,
        /// `header` or the kind of record.
        what: &'static str,
    },
    /// A header block is not a valid tar header.
    #[error("tar header at offset {offset} is corrupt: {reason}")]
    Header {
        /// Offset of the header.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A long-name, long-link or PAX record larger than the limit.
    #[error("tar {what} at offset {offset} is {size} bytes, more than the limit of {limit}")]
    ExtensionTooLarge {
        /// Offset of the record's header.
        offset: u64,
        /// The kind of record.
        what: &'static str,
        /// The size its header declares.
        size: u64,
        /// The limit in force.
        limit: u64,
    },
    /// Two records of one kind for the same entry: readers disagree on which one wins.
    #[error("tar {what} at offset {offset} is the second one for the same entry")]
    DuplicateExtension {
        /// Offset of the second record's header.
        offset: u64,
        /// The kind of record.
        what: &'static str,
    },
    /// Extension records followed by the end of the archive or a global header, not by
    /// the entry they describe.
    #[error("tar extension records at offset {offset} describe no entry")]
    DanglingExtension {
        /// Offset of the first of the records.
        offset: u64,
    },
    /// A PAX record set that does not parse, or a PAX value this module relies on that is
    /// malformed.
    #[error("tar pax record at offset {offset} is malformed: {reason}")]
    Pax {
        /// Offset of the PAX header.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An entry whose data would run past the end of the blob.
    #[error(
        "tar entry {path:?} at offset {offset} declares {size} bytes of data, which run past the end of the \
         {blob_size}-byte blob"
    )]
    OutsideBlob {
        /// The entry's name as written (lossily decoded).
        path: String,
        /// Offset of the entry's header.
        offset: u64,
        /// The data size it declares.
        size: u64,
        /// The blob's size.
        blob_size: u64,
    },
    /// An entry's name or link target is not UTF-8.
    #[error("tar entry {0:?} has a name or link target that is not utf-8")]
    NonUtf8(String),
    /// An entry's name is not a valid model path.
    #[error("tar entry: {0}")]
    Path(PathError),
    /// An entry of a kind a model may not contain.
    #[error("tar entry {path:?} is a {what}, which a model may not contain")]
    Unsupported {
        /// The entry's name.
        path: String,
        /// What kind of entry it is.
        what: String,
    },
    /// The archive's root (`./`) appears as something other than a directory.
    #[error("tar entry {0:?} names the root of the model but is not a directory")]
    RootNotDir(String),
    /// A link entry without a target.
    #[error("tar entry {0:?} is a link without a target")]
    MissingLinkTarget(String),
    /// A hard link whose target is not an earlier regular file of the archive.
    #[error(
        "hard link {:?} points to {target:?}, which is not an earlier regular file of this layer",
        .path.as_str()
    )]
    HardLinkTarget {
        /// The link's path.
        path: ModelPath,
        /// The target as written.
        target: String,
    },
    /// A symlink whose target could lead outside the model tree.
    #[error("symlink {:?} points to {target:?}, {why}", .path.as_str())]
    SymlinkTarget {
        /// The link's path.
        path: ModelPath,
        /// The target as written.
        target: String,
        /// Why the target is refused.
        why: &'static str,
    },
    /// More entries than the limit.
    #[error("tar archive has more than {0} entries")]
    TooManyEntries(usize),
}

/// One accepted entry of a tar layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// Where the entry goes in the model tree.
    pub path: ModelPath,
    /// What the entry is.
    pub kind: TarEntryKind,
    /// Mode bits from the header (permissions only), unsanitized.
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch (PAX `mtime` if present).
    pub mtime: i64,
    /// File size in bytes; for a hard link, its target's; 0 for directories and
    /// symlinks.
    pub size: u64,
    /// Offset of the file's bytes in the uncompressed blob; for a hard link, its
    /// target's; 0 for directories and symlinks. `data_offset + size` never exceeds
    /// the blob's size.
    pub data_offset: u64,
}

/// The kinds of entry a model tree may contain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TarEntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink, with its target as written (relative, staying inside the tree).
    Symlink(String),
    /// A hard link to an earlier regular file of the same archive (resolved through
    /// chains of hard links to the file itself).
    HardLink(ModelPath),
}

/// Reads every header of an uncompressed tar archive of `blob_size` bytes, seeking over
/// file data, and returns the entries in archive order, with the default [`TarLimits`].
/// The root entry (`./`) is skipped.
pub fn index_tar<R: Read + Seek>(reader: R, blob_size: u64) -> Result<Vec<TarEntry>, TarError> {
    index_tar_with(reader, blob_size, &TarLimits::default())
}

/// [`index_tar`] with explicit limits.
pub fn index_tar_with<R: Read + Seek>(
    mut reader: R,
    blob_size: u64,
    limits: &TarLimits,
) -> Result<Vec<TarEntry>, TarError> {
    let mut out: Vec<TarEntry> = Vec::new();
    // Regular files and hard links seen so far, by path, as positions in `out`.
    let mut files: HashMap<ModelPath, usize> = HashMap::new();
    let mut pending = Extensions::default();
    let mut headers = 0usize;
    let mut offset = 0u64;

    while let Some(header) = read_header(&mut reader, offset, blob_size)? {
        let corrupt = |reason: String| TarError::Header { offset, reason };
        let data_offset = offset + BLOCK_SIZE;
        let declared = header.entry_size().map_err(|e| corrupt(format!("size field: {e}")))?;
        let entry_type = header.entry_type();

        if let Some(kind) = ExtensionKind::of(entry_type) {
            let what = kind.what();
            if pending.slot(kind).is_some() {
                return Err(TarError::DuplicateExtension { offset, what });
            }
            let data = read_extension(&mut reader, offset, declared, what, blob_size, limits)?;
            *pending.slot(kind) = Some(data);
            pending.first.get_or_insert(offset);
            if kind == ExtensionKind::Pax {
                pending.pax_offset = offset;
            }
            offset = next_header(data_offset, declared).ok_or_else(|| corrupt("size overflows".to_owned()))?;
            continue;
        }

        headers += 1;
        if headers > limits.max_entries {
            return Err(TarError::TooManyEntries(limits.max_entries));
        }
        // Global PAX headers carry archive-wide defaults (comments, charset) that change
        // nothing this module serves; they are bounded like local ones, then skipped.
        if entry_type.is_pax_global_extensions() {
            if declared > limits.max_extension_bytes {
                return Err(TarError::ExtensionTooLarge {
                    offset,
                    what: "global pax record",
                    size: declared,
                    limit: limits.max_extension_bytes,
                });
            }
            if let Some(first) = pending.first {
                return Err(TarError::DanglingExtension { offset: first });
            }
            offset = next_header(data_offset, declared).ok_or_else(|| corrupt("size overflows".to_owned()))?;
            continue;
        }

        let extensions = std::mem::take(&mut pending);
        let pax = match &extensions.pax {
            Some(records) => {
                parse_pax(records).map_err(|reason| TarError::Pax { offset: extensions.pax_offset, reason })?
            }
            None => Pax::default(),
        };
        let name_bytes = match (&extensions.long_name, &pax.path) {
            (Some(long), _) => strip_nul(long).to_vec(),
            (None, Some(path)) => path.clone(),
            (None, None) => header.path_bytes().into_owned(),
        };
        let size = pax.size.unwrap_or(declared);
        if data_offset.checked_add(size).is_none_or(|end| end > blob_size) {
            let path = String::from_utf8_lossy(&name_bytes).into_owned();
            return Err(TarError::OutsideBlob { path, offset, size, blob_size });
        }
        let next = next_header(data_offset, size).ok_or_else(|| corrupt("size overflows".to_owned()))?;
        let link_bytes = match (&extensions.long_link, &pax.linkpath) {
            (Some(long), _) => Some(strip_nul(long).to_vec()),
            (None, Some(link)) => Some(link.clone()),
            (None, None) => header.link_name_bytes().map(|b| b.into_owned()),
        };

        let name = utf8(name_bytes)?;
        // Old (v7) archives mark directories only by the trailing slash.
        let is_dir = entry_type.is_dir()
            || (matches!(entry_type, EntryType::Regular | EntryType::Continuous) && name.ends_with('/'));
        let Some(path) = path::parse_tar_name(&name).map_err(TarError::Path)? else {
            if is_dir {
                offset = next;
                continue;
            }
            return Err(TarError::RootNotDir(name));
        };

        let mode = header.mode().unwrap_or(0) & 0o7777;
        let mtime =
            pax.mtime.or_else(|| header.mtime().ok().map(|t| i64::try_from(t).unwrap_or(i64::MAX))).unwrap_or(0);
        let unsupported = |what: &str| TarError::Unsupported { path: name.clone(), what: what.to_owned() };
        let link_target = || -> Result<String, TarError> {
            match &link_bytes {
                Some(target) if !target.is_empty() => utf8(target.clone()),
                _ => Err(TarError::MissingLinkTarget(name.clone())),
            }
        };

        let (kind, size, data_offset) = match entry_type {
            _ if pax.sparse => return Err(unsupported("sparse file")),
            _ if is_dir => (TarEntryKind::Dir, 0, 0),
            EntryType::Regular | EntryType::Continuous => (TarEntryKind::File, size, data_offset),
            EntryType::Symlink => {
                let target = link_target()?;
                check_symlink(&path, &target).map_err(|why| TarError::SymlinkTarget {
                    path: path.clone(),
                    target: target.clone(),
                    why,
                })?;
                (TarEntryKind::Symlink(target), 0, 0)
            }
            EntryType::Link => {
                let target = link_target()?;
                let earlier = ModelPath::parse(&target).ok().and_then(|t| files.get(&t)).map(|&i| &out[i]);
                let Some(earlier) = earlier else {
                    return Err(TarError::HardLinkTarget { path, target });
                };
                let file = match &earlier.kind {
                    TarEntryKind::HardLink(file) => file.clone(),
                    _ => earlier.path.clone(),
                };
                (TarEntryKind::HardLink(file), earlier.size, earlier.data_offset)
            }
            EntryType::Char => return Err(unsupported("character device")),
            EntryType::Block => return Err(unsupported("block device")),
            EntryType::Fifo => return Err(unsupported("fifo")),
            EntryType::GNUSparse => return Err(unsupported("sparse file")),
            other => {
                let byte = other.as_byte();
                return Err(unsupported(&format!("entry of unknown type {:?}", char::from(byte))));
            }
        };

        if matches!(kind, TarEntryKind::File | TarEntryKind::HardLink(_)) {
            files.insert(path.clone(), out.len());
        } else {
            files.remove(&path);
        }
        out.push(TarEntry { path, kind, mode, mtime, size, data_offset });
        offset = next;
    }
    match pending.first {
        Some(first) => Err(TarError::DanglingExtension { offset: first }),
        None => Ok(out),
    }
}

/// The extension records read so far for the entry that follows them.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
    /// Offset of the first record, for errors about records that describe nothing.
    first: Option<u64>,
    /// Offset of the PAX record's header, for errors about its content.
    pax_offset: u64,
}

impl Extensions {
    fn slot(&mut self, kind: ExtensionKind) -> &mut Option<Vec<u8>> {
        match kind {
            ExtensionKind::LongName => &mut self.long_name,
            ExtensionKind::LongLink => &mut self.long_link,
            ExtensionKind::Pax => &mut self.pax,
        }
    }
}

/// The records that describe the entry after them rather than being entries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ExtensionKind {
    LongName,
    LongLink,
    Pax,
}

impl ExtensionKind {
    fn of(entry_type: EntryType) -> Option<Self> {
        match entry_type {
            EntryType::GNULongName => Some(Self::LongName),
            EntryType::GNULongLink => Some(Self::LongLink),
            EntryType::XHeader => Some(Self::Pax),
            _ => None,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::LongName => "gnu long name",
            Self::LongLink => "gnu long link",
            Self::Pax => "pax record",
        }
    }
}

/// The header block at `offset`; `None` at the end of the archive (the end of the blob
/// or a zero block).
fn read_header<R: Read + Seek>(reader: &mut R, offset: u64, blob_size: u64) -> Result<Option<Header>, TarError> {
    if offset >= blob_size {
        return Ok(None);
    }
    if blob_size - offset < BLOCK_SIZE {
        return Err(TarError::Truncated { offset, what: "header" });
    }
    let mut header = Header::new_old();
    let read_err = |source| TarError::Read { offset, source };
    reader.seek(SeekFrom::Start(offset)).map_err(read_err)?;
    reader.read_exact(header.as_mut_bytes()).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => TarError::Truncated { offset, what: "header" },
        _ => read_err(e),
    })?;
    let bytes = header.as_bytes();
    if bytes.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    // The checksum is the sum of the header's bytes with its own field counted as spaces.
    let sum: u32 = bytes[..148].iter().chain(&bytes[156..]).map(|&b| u32::from(b)).sum::<u32>() + 8 * u32::from(b' ');
    let stored = header.cksum().map_err(|e| TarError::Header { offset, reason: format!("checksum field: {e}") })?;
    if sum != stored {
        return Err(TarError::Header { offset, reason: format!("checksum is {stored}, the header sums to {sum}") });
    }
    Ok(Some(header))
}

/// The data of an extension record whose header is at `offset`, read only once its
/// declared size is known to be within the limit and the blob.
fn read_extension<R: Read + Seek>(
    reader: &mut R,
    offset: u64,
    size: u64,
    what: &'static str,
    blob_size: u64,
    limits: &TarLimits,
) -> Result<Vec<u8>, TarError> {
    if size > limits.max_extension_bytes {
        return Err(TarError::ExtensionTooLarge { offset, what, size, limit: limits.max_extension_bytes });
    }
    let start = offset + BLOCK_SIZE;
    if start + size > blob_size {
        return Err(TarError::Truncated { offset, what });
    }
    let mut data = Vec::with_capacity(size as usize);
    let read_err = |source| TarError::Read { offset: start, source };
    reader.seek(SeekFrom::Start(start)).map_err(read_err)?;
    reader.by_ref().take(size).read_to_end(&mut data).map_err(read_err)?;
    if data.len() as u64 != size {
        return Err(TarError::Truncated { offset, what });
    }
    Ok(data)
}

/// Where the header after data of `size` bytes at `data_offset` starts.
fn next_header(data_offset: u64, size: u64) -> Option<u64> {
    data_offset.checked_add(size.checked_next_multiple_of(BLOCK_SIZE)?)
}

/// GNU long names and links end with a NUL, which is not part of the name.
fn strip_nul(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\0").unwrap_or(bytes)
}

/// What an entry's PAX records say that this module uses.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    mtime: Option<i64>,
    sparse: bool,
}

/// Parses a PAX record set. When a key repeats, the last record wins, as in Go's
/// `archive/tar` (which writes ModelPack layers) and GNU tar.
fn parse_pax(records: &[u8]) -> Result<Pax, String> {
    let mut out = Pax::default();
    for record in PaxExtensions::new(records) {
        let record = record.map_err(|e| e.to_string())?;
        match record.key_bytes() {
            b"path" => out.path = Some(record.value_bytes().to_vec()),
            b"linkpath" => out.linkpath = Some(record.value_bytes().to_vec()),
            // The size decides where the next header is: a value other readers could
            // read differently is refused, not guessed at.
            b"size" => {
                let value = std::str::from_utf8(record.value_bytes()).ok();
                let size = value.filter(|v| v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse().ok());
                out.size = Some(size.ok_or_else(|| {
                    format!("size {:?} is not a decimal number", String::from_utf8_lossy(record.value_bytes()))
                })?);
            }
            // `seconds[.fraction]`, possibly negative; the fraction is dropped. A
            // malformed value leaves the header's mtime in place: a time is not worth
            // refusing a layer over.
            b"mtime" => {
                let value = record.value().unwrap_or_default();
                out.mtime = value.split('.').next().and_then(|whole| whole.parse().ok());
            }
            // GNU sparse files in PAX form keep their map in the data; serving those
            // bytes verbatim would be wrong.
            key if key.starts_with(b"GNU.sparse.") => out.sparse = true,
            _ => {}
        }
    }
    Ok(out)
}

fn utf8(bytes: Vec<u8>) -> Result<String, TarError> {
    String::from_utf8(bytes).map_err(|e| TarError::NonUtf8(String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// Checks, lexically, that `target` resolved from `link`'s directory stays inside the
/// tree. `..` is accepted only before the first name: once a name has been walked,
/// that name might be another symlink, and a `..` after it would climb from wherever
/// that symlink leads, which a lexical walk cannot see.
fn check_symlink(link: &ModelPath, target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("an empty path");
    }
    if target.contains('\0') {
        return Err("a path with a nul byte");
    }
    if target.len() > MAX_PATH_LEN {
        return Err("a path longer than 4096 bytes");
    }
    if target.starts_with('/') {
        return Err("an absolute path");
    }
    let mut depth = link.components().count() - 1;
    let mut named = false;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." if named => return Err("with `..` after a name, which could leave the model through another symlink"),
            ".." => depth = depth.checked_sub(1).ok_or("outside the model")?,
            _ => named = true,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use tar::{Builder, Header};

    use super::*;

    type Tar = Builder<Vec<u8>>;

    fn header(kind: EntryType, size: u64, mode: u32) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h
    }

    fn file(t: &mut Tar, path: &str, data: &[u8]) {
        t.append_data(&mut header(EntryType::Regular, data.len() as u64, 0o644), path, data).unwrap();
    }

    fn dir(t: &mut Tar, path: &str) {
        t.append_data(&mut header(EntryType::Directory, 0, 0o755), path, io::empty()).unwrap();
    }

    fn link(t: &mut Tar, kind: EntryType, path: &str, target: &str) {
        t.append_link(&mut header(kind, 0, 0o777), path, target).unwrap();
    }

    /// Writes a header byte for byte, bypassing the builder's own path checks.
    fn raw(t: &mut Tar, kind: EntryType, name: &str, link_name: &str, data: &[u8]) {
        let mut h = header(kind, data.len() as u64, 0o644);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname = [0; 100];
        old.linkname[..link_name.len()].copy_from_slice(link_name.as_bytes());
        h.set_cksum();
        t.append(&h, data).unwrap();
    }

    fn build(f: impl FnOnce(&mut Tar)) -> Vec<u8> {
        let mut t = Builder::new(Vec::new());
        f(&mut t);
        t.into_inner().unwrap()
    }

    fn index(bytes: &[u8]) -> Result<Vec<TarEntry>, TarError> {
        index_tar(Cursor::new(bytes), bytes.len() as u64)
    }

    fn data_of<'a>(bytes: &'a [u8], e: &TarEntry) -> &'a [u8] {
        &bytes[e.data_offset as usize..(e.data_offset + e.size) as usize]
    }

    #[test]
    fn indexes_nested_dirs_and_file_offsets() {
        let bytes = build(|t| {
            dir(t, "./");
            dir(t, "model/");
            dir(t, "model/sub/");
            file(t, "model/config.json", b"{\"a\":1}");
            file(t, "model/sub/weights.bin", &[7u8; 1500]);
            file(t, "./model/empty", b"");
        });
        let entries = index(&bytes).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["model", "model/sub", "model/config.json", "model/sub/weights.bin", "model/empty"]);
        assert_eq!(entries[0].kind, TarEntryKind::Dir);
        assert_eq!((entries[0].mode, entries[0].size), (0o755, 0));
        let config = &entries[2];
        assert_eq!((config.kind.clone(), config.mode, config.mtime), (TarEntryKind::File, 0o644, 1_700_000_000));
        assert_eq!(data_of(&bytes, config), b"{\"a\":1}");
        assert_eq!(data_of(&bytes, &entries[3]), &[7u8; 1500][..]);
        assert_eq!(entries[4].size, 0);
    }

    #[test]
    fn handles_gnu_and_pax_long_names() {
        let gnu_name = format!("{}/{}", "d".repeat(120), "f".repeat(150));
        let pax_name = format!("{}/{}", "p".repeat(200), "q".repeat(100));
        let bytes = build(|t| {
            file(t, &gnu_name, b"gnu");
            t.append_pax_extensions([("path", pax_name.as_bytes()), ("mtime", b"1234.75".as_slice())]).unwrap();
            raw(t, EntryType::Regular, "truncated", "", b"pax");
        });
        let entries = index(&bytes).unwrap();
        assert_eq!(entries[0].path.as_str(), gnu_name);
        assert_eq!(data_of(&bytes, &entries[0]), b"gnu");
        assert_eq!(entries[1].path.as_str(), pax_name);
        assert_eq!(entries[1].mtime, 1234);
        assert_eq!(data_of(&bytes, &entries[1]), b"pax");
    }

    #[test]
    fn skips_global_pax_headers_and_treats_v7_slash_names_as_dirs() {
        let bytes = build(|t| {
            let records = b"17 comment=hello\n";
            raw(t, EntryType::XGlobalHeader, "pax_global_header", "", records);
            raw(t, EntryType::Regular, "olddir/", "", b"");
            file(t, "olddir/x", b"x");
        });
        let entries = index(&bytes).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].path.as_str(), &entries[0].kind), ("olddir", &TarEntryKind::Dir));
    }

    #[test]
    fn accepts_symlinks_inside_the_tree() {
        let bytes = build(|t| {
            file(t, "blobs/abc", b"data");
            link(t, EntryType::Symlink, "snapshots/main/model.bin", "../../blobs/abc");
            link(t, EntryType::Symlink, "alias", "./blobs/abc");
            link(t, EntryType::Symlink, "snapshots/up", "..");
            link(t, EntryType::Symlink, "long/link", &format!("../{}", "t".repeat(150)));
        });
        let entries = index(&bytes).unwrap();
        assert_eq!(entries[1].kind, TarEntryKind::Symlink("../../blobs/abc".into()));
        assert_eq!((entries[1].size, entries[1].data_offset), (0, 0));
        assert_eq!(entries[2].kind, TarEntryKind::Symlink("./blobs/abc".into()));
        assert_eq!(entries[4].kind, TarEntryKind::Symlink(format!("../{}", "t".repeat(150))));
    }

    #[test]
    fn refuses_symlinks_that_escape() {
        for (path, target) in [
            ("link", "/etc/passwd"),
            ("link", ".."),
            ("link", "../x"),
            ("a/b/link", "../../../x"),
            ("a/link", "./../../x"),
            ("a/link", "b/../../x"),
            ("a/link", "b/../c"),
        ] {
            let bytes = build(|t| raw(t, EntryType::Symlink, path, target, b""));
            let err = index(&bytes).unwrap_err();
            assert!(matches!(err, TarError::SymlinkTarget { .. }), "{path} -> {target}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{path:?}")) && msg.contains(&format!("{target:?}")), "{msg}");
        }
    }

    #[test]
    fn resolves_hard_links_to_earlier_files() {
        let bytes = build(|t| {
            file(t, "a/orig", b"shared");
            link(t, EntryType::Link, "b/copy", "a/orig");
            link(t, EntryType::Link, "c/copy2", "./b/copy");
        });
        let entries = index(&bytes).unwrap();
        let orig = ModelPath::parse("a/orig").unwrap();
        for e in &entries[1..] {
            assert_eq!(e.kind, TarEntryKind::HardLink(orig.clone()));
            assert_eq!((e.size, e.data_offset), (entries[0].size, entries[0].data_offset));
            assert_eq!(data_of(&bytes, e), b"shared");
        }
    }

    #[test]
    fn refuses_dangling_or_later_or_non_file_hard_links() {
        let cases: [fn(&mut Tar); 4] = [
            |t| link(t, EntryType::Link, "l", "missing"),
            |t| {
                link(t, EntryType::Link, "l", "later");
                file(t, "later", b"x");
            },
            |t| {
                dir(t, "d/");
                link(t, EntryType::Link, "l", "d");
            },
            |t| raw(t, EntryType::Link, "l", "../../etc/shadow", b""),
        ];
        for case in cases {
            let err = index(&build(case)).unwrap_err();
            assert!(matches!(&err, TarError::HardLinkTarget { path, .. } if path.as_str() == "l"), "{err}");
        }
    }

    #[test]
    fn refuses_path_attacks() {
        for name in ["../../etc/x", "/etc/passwd", "a//b", "a/./b", "a/../b", "x/.."] {
            let err = index(&build(|t| raw(t, EntryType::Regular, name, "", b"evil"))).unwrap_err();
            assert!(matches!(err, TarError::Path(_)), "{name}: {err}");
            assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
        }
        let err = index(&build(|t| raw(t, EntryType::Regular, ".", "", b""))).unwrap_err();
        assert!(matches!(err, TarError::RootNotDir(_)), "{err}");
        let err = index(&build(|t| raw(t, EntryType::Symlink, "./", "x", b""))).unwrap_err();
        assert!(matches!(err, TarError::RootNotDir(_)), "{err}");
        assert_eq!(index(&build(|t| raw(t, EntryType::Regular, "./", "", b""))).unwrap(), vec![]);
        let entries = index(&build(|t| raw(t, EntryType::Regular, "caf\u{e9}\\x", "", b""))).unwrap();
        assert_eq!(entries[0].path.as_str(), "caf\u{e9}\\x");
        let mut h = header(EntryType::Regular, 0, 0o644);
        h.as_old_mut().name[..3].copy_from_slice(b"a\xffb");
        h.set_cksum();
        let bytes = build(|t| t.append(&h, io::empty()).unwrap());
        assert!(matches!(index(&bytes), Err(TarError::NonUtf8(_))));
    }

    #[test]
    fn refuses_devices_fifos_and_sparse_files() {
        for (kind, what) in [
            (EntryType::Fifo, "fifo"),
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::GNUSparse, "sparse file"),
            (EntryType::new(b'V'), "unknown type"),
        ] {
            let bytes = build(|t| {
                let mut h = header(kind, 0, 0o644);
                h.set_path("dev/thing").unwrap();
                if let Some(gnu) = h.as_gnu_mut() {
                    gnu.set_real_size(0);
                }
                h.set_cksum();
                t.append(&h, io::empty()).unwrap();
            });
            let err = index(&bytes).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("\"dev/thing\"") && msg.contains(what), "{msg}");
        }
        let bytes = build(|t| {
            t.append_pax_extensions([("GNU.sparse.major", b"1".as_slice())]).unwrap();
            file(t, "sparse", b"map-and-data");
        });
        assert!(index(&bytes).unwrap_err().to_string().contains("sparse file"));
    }

    #[test]
    fn refuses_corrupt_archives() {
        let mut bytes = build(|t| {
            file(t, "a", b"1");
            file(t, "b", b"2");
        });
        bytes[1024 + 10] ^= 0xff;
        let err = index(&bytes).unwrap_err();
        assert!(matches!(err, TarError::Header { offset: 1024, .. }), "{err}");
        assert!(err.to_string().contains("offset 1024") && err.to_string().contains("checksum"), "{err}");
        assert_eq!(index(&[]).unwrap(), vec![]);
    }

    /// A header block, checksummed, followed by `data` padded to whole blocks.
    fn record(kind: EntryType, name: &str, declared: u64, data: &[u8]) -> Vec<u8> {
        let mut h = header(kind, declared, 0o644);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
        out
    }

    /// A PAX header with `records`, each `len key=value\n` with its own length in front.
    fn pax(records: &[(&str, &str)]) -> Vec<u8> {
        let mut text = String::new();
        for (key, value) in records {
            let body = format!(" {key}={value}\n");
            let mut len = body.len() + 1;
            while (len.to_string().len() + body.len()) != len {
                len += 1;
            }
            text.push_str(&format!("{len}{body}"));
        }
        record(EntryType::XHeader, "pax", text.len() as u64, text.as_bytes())
    }

    /// A reader that counts the bytes handed out, to show what was never read.
    struct Counting {
        inner: Cursor<Vec<u8>>,
        read: u64,
    }

    impl Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    impl Seek for Counting {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.inner.seek(to)
        }
    }

    #[test]
    fn extension_records_over_the_limit_are_refused_before_they_are_read() {
        let over = MAX_EXTENSION_BYTES + 1;
        for (kind, what) in [
            (EntryType::GNULongName, "gnu long name"),
            (EntryType::GNULongLink, "gnu long link"),
            (EntryType::XHeader, "pax record"),
            (EntryType::XGlobalHeader, "global pax record"),
        ] {
            let mut bytes = record(EntryType::Regular, "first", 3, b"abc");
            bytes.extend(record(kind, "././@LongLink", over, &vec![b'a'; over as usize]));
            bytes.extend(record(EntryType::Regular, "f", 0, b""));
            let blob_size = bytes.len() as u64;
            let mut reader = Counting { inner: Cursor::new(bytes), read: 0 };
            let err = index_tar(&mut reader, blob_size).unwrap_err();
            assert!(
                matches!(err, TarError::ExtensionTooLarge { offset: 1024, size, .. } if size == over),
                "{what}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(what) && msg.contains("offset 1024") && msg.contains("1048577"), "{msg}");
            assert!(reader.read <= 2048, "{what}: {} bytes read", reader.read);
        }
    }

    #[test]
    fn extension_records_at_the_limit_are_read() {
        // A PAX record set of exactly the limit: one `comment` record padded to size.
        let limit = MAX_EXTENSION_BYTES as usize;
        let len_digits = limit.to_string().len();
        let value = "c".repeat(limit - len_digits - " comment=\n".len());
        let pax = format!("{limit} comment={value}\n");
        assert_eq!(pax.len(), limit);
        let mut bytes = record(EntryType::XHeader, "pax", limit as u64, pax.as_bytes());
        bytes.extend(record(EntryType::Regular, "f", 2, b"hi"));
        let entries = index(&bytes).unwrap();
        assert_eq!(entries[0].path.as_str(), "f");
        assert_eq!(data_of(&bytes, &entries[0]), b"hi");
    }

    #[test]
    fn entry_data_must_lie_inside_the_blob() {
        // The header declares 1000 bytes; the blob ends 100 bytes into them.
        let mut bytes = record(EntryType::Regular, "a", 3, b"abc");
        bytes.extend(record(EntryType::Regular, "weights", 1000, &[1u8; 1000]));
        bytes.truncate(1024 + 512 + 100);
        let err = index(&bytes).unwrap_err();
        assert!(
            matches!(&err, TarError::OutsideBlob { path, offset: 1024, size: 1000, blob_size: 1636 } if path == "weights"),
            "{err}"
        );
        // The data fits the reader but not the size the caller states.
        let whole = record(EntryType::Regular, "weights", 1000, &[1u8; 1000]);
        let err = index_tar(Cursor::new(&whole), 1000).unwrap_err();
        assert!(matches!(err, TarError::OutsideBlob { offset: 0, .. }), "{err}");
        // A PAX size overrides the header's, and is held to the blob too.
        let mut bytes = pax(&[("size", "999999999")]);
        bytes.extend(record(EntryType::Regular, "big", 3, b"abc"));
        let err = index(&bytes).unwrap_err();
        assert!(matches!(&err, TarError::OutsideBlob { size: 999_999_999, .. }), "{err}");
        // A size near u64::MAX (base-256 encoding) overflows nothing.
        let mut h = header(EntryType::Regular, 0, 0o644);
        h.as_old_mut().size = [0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        h.as_old_mut().name[..4].copy_from_slice(b"huge");
        h.set_cksum();
        let err = index(h.as_bytes()).unwrap_err();
        assert!(matches!(&err, TarError::OutsideBlob { size: u64::MAX, .. }), "{err}");
    }

    #[test]
    fn truncated_headers_and_records_are_refused() {
        let mut bytes = record(EntryType::Regular, "a", 3, b"abc");
        bytes.extend_from_slice(&[7u8; 100]);
        let err = index(&bytes).unwrap_err();
        assert!(matches!(err, TarError::Truncated { offset: 1024, what: "header" }), "{err}");
        // A reader shorter than the size the caller states.
        let err = index_tar(Cursor::new(&bytes[..1024]), 2048).unwrap_err();
        assert!(matches!(err, TarError::Truncated { offset: 1024, what: "header" }), "{err}");
        let mut long = record(EntryType::GNULongName, "././@LongLink", 600, &[b'n'; 600]);
        long.truncate(800);
        let err = index(&long).unwrap_err();
        assert!(matches!(err, TarError::Truncated { offset: 0, what: "gnu long name" }), "{err}");
    }

    #[test]
    fn extension_records_must_describe_exactly_one_entry() {
        let name = record(EntryType::GNULongName, "././@LongLink", 5, b"long\0");
        let mut twice = name.clone();
        twice.extend(name.clone());
        twice.extend(record(EntryType::Regular, "f", 0, b""));
        let err = index(&twice).unwrap_err();
        assert!(matches!(err, TarError::DuplicateExtension { offset: 1024, what: "gnu long name" }), "{err}");
        let err = index(&name).unwrap_err();
        assert!(matches!(err, TarError::DanglingExtension { offset: 0 }), "{err}");
        let mut before_global = name.clone();
        before_global.extend(record(EntryType::XGlobalHeader, "g", 0, b""));
        before_global.extend(record(EntryType::Regular, "f", 0, b""));
        assert!(matches!(index(&before_global), Err(TarError::DanglingExtension { offset: 0 })));
        let mut ok = name;
        ok.extend(record(EntryType::Regular, "short", 0, b""));
        assert_eq!(index(&ok).unwrap()[0].path.as_str(), "long");
        let mut bad_size = pax(&[("size", "12x")]);
        bad_size.extend(record(EntryType::Regular, "a", 1, b"1"));
        let err = index(&bad_size).unwrap_err();
        assert!(matches!(err, TarError::Pax { offset: 0, .. }) && err.to_string().contains("12x"), "{err}");
    }

    #[test]
    fn entry_count_is_bounded_counting_skipped_entries() {
        let limits = TarLimits { max_entries: 3, ..TarLimits::default() };
        let files = build(|t| (0..4).for_each(|i| file(t, &format!("f{i}"), b"x")));
        let err = index_tar_with(Cursor::new(&files), files.len() as u64, &limits).unwrap_err();
        assert!(matches!(err, TarError::TooManyEntries(3)), "{err}");
        assert_eq!(err.to_string(), "tar archive has more than 3 entries");
        let roots = build(|t| (0..4).for_each(|_| dir(t, "./")));
        assert!(matches!(
            index_tar_with(Cursor::new(&roots), roots.len() as u64, &limits),
            Err(TarError::TooManyEntries(3))
        ));
        let globals: Vec<u8> = (0..4).flat_map(|_| record(EntryType::XGlobalHeader, "g", 0, b"")).collect();
        assert!(matches!(
            index_tar_with(Cursor::new(&globals), globals.len() as u64, &limits),
            Err(TarError::TooManyEntries(3))
        ));
        let three = build(|t| (0..3).for_each(|i| file(t, &format!("f{i}"), b"x")));
        assert_eq!(index_tar_with(Cursor::new(&three), three.len() as u64, &limits).unwrap().len(), 3);
    }

    #[test]
    fn pax_mtime_overrides_the_header_unless_malformed() {
        let bytes = build(|t| {
            t.append_pax_extensions([("mtime", b"soon".as_slice())]).unwrap();
            file(t, "a", b"1");
            t.append_pax_extensions([("mtime", b"-86400.5".as_slice())]).unwrap();
            file(t, "b", b"2");
        });
        let entries = index(&bytes).unwrap();
        assert_eq!((entries[0].mtime, entries[1].mtime), (1_700_000_000, -86_400));
    }

    #[test]
    fn refuses_links_without_target() {
        let err = index(&build(|t| raw(t, EntryType::Symlink, "a/link", "", b""))).unwrap_err();
        assert_eq!(err.to_string(), "tar entry \"a/link\" is a link without a target");
    }

    #[test]
    fn lexical_symlink_rules() {
        let at = |p: &str| ModelPath::parse(p).unwrap();
        assert_eq!(check_symlink(&at("a/b/l"), "../../x"), Ok(()));
        assert_eq!(check_symlink(&at("a/b/l"), "./.././../x/./y/"), Ok(()));
        assert_eq!(check_symlink(&at("a/b/l"), "x/y"), Ok(()));
        assert!(check_symlink(&at("l"), "x/../y").is_err());
        assert!(check_symlink(&at("a/b/l"), "../../../x").is_err());
        assert!(check_symlink(&at("l"), &"x".repeat(MAX_PATH_LEN + 1)).is_err());
    }
}
