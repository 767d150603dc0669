//! Indexing of tar layers: where each file's bytes sit inside the uncompressed blob,
//! so FUSE can serve a file by reading a byte range instead of unpacking the archive.
//!
//! The `tar` crate parses headers (GNU long names, PAX records); this module decides
//! what a model tree may contain. Only regular files, directories, hard links to
//! earlier files and symlinks that stay inside the tree are accepted: devices, fifos
//! and sparse files are refused, because the tree is served read-only and byte-exact.

use std::collections::HashMap;
use std::io::{self, Read, Seek};

use tar::EntryType;

use super::path::{self, ModelPath, PathError, MAX_PATH_LEN};

/// Most entries accepted in one archive.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Why a tar layer cannot be served. Each variant names the offending entry.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The archive is truncated or corrupt.
    #[error("tar archive is unreadable after {position}: {source}")]
    Io {
        /// `the start` or the last entry read successfully.
        position: String,
        /// What the tar reader reported.
        #[source]
        source: io::Error,
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
    /// More entries than [`MAX_ENTRIES`].
    #[error("tar archive has more than 1000000 entries")]
    TooManyEntries,
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
    /// target's; 0 for directories and symlinks.
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

/// Reads every header of an uncompressed tar archive, seeking over file data, and
/// returns the entries in archive order. The root entry (`./`) is skipped.
pub fn index_tar<R: Read + Seek>(reader: R) -> Result<Vec<TarEntry>, TarError> {
    let mut archive = tar::Archive::new(reader);
    let mut out: Vec<TarEntry> = Vec::new();
    // Regular files and hard links seen so far, by path, as positions in `out`.
    let mut files: HashMap<ModelPath, usize> = HashMap::new();
    let io_error = |out: &[TarEntry], source| TarError::Io {
        position: out.last().map_or_else(|| "the start".to_owned(), |e| format!("entry {:?}", e.path.as_str())),
        source,
    };

    let entries = archive.entries_with_seek().map_err(|e| io_error(&out, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| io_error(&out, e))?;
        let entry_type = entry.header().entry_type();
        // Global PAX headers carry archive-wide defaults (comments, charset); the
        // crate hands them through as entries.
        if entry_type.is_pax_global_extensions() {
            continue;
        }
        let name = utf8(entry.path_bytes().into_owned())?;
        let pax = pax_overrides(&mut entry).map_err(|e| io_error(&out, e))?;
        // Old (v7) archives mark directories only by the trailing slash.
        let is_dir = entry_type.is_dir()
            || (matches!(entry_type, EntryType::Regular | EntryType::Continuous) && name.ends_with('/'));
        let Some(path) = path::parse_tar_name(&name).map_err(TarError::Path)? else {
            if is_dir {
                continue;
            }
            return Err(TarError::RootNotDir(name));
        };
        if out.len() >= MAX_ENTRIES {
            return Err(TarError::TooManyEntries);
        }

        let header = entry.header();
        let mode = header.mode().unwrap_or(0) & 0o7777;
        let mtime =
            pax.mtime.or_else(|| header.mtime().ok().map(|t| i64::try_from(t).unwrap_or(i64::MAX))).unwrap_or(0);
        let unsupported = |what: &str| TarError::Unsupported { path: name.clone(), what: what.to_owned() };
        let link_target = || -> Result<String, TarError> {
            let target = entry.link_name_bytes().ok_or_else(|| TarError::MissingLinkTarget(name.clone()))?;
            utf8(target.into_owned())
        };

        let (kind, size, data_offset) = match entry_type {
            _ if pax.sparse => return Err(unsupported("sparse file")),
            _ if is_dir => (TarEntryKind::Dir, 0, 0),
            EntryType::Regular | EntryType::Continuous => (TarEntryKind::File, entry.size(), entry.raw_file_position()),
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
    }
    Ok(out)
}

/// What an entry's PAX records change beyond what the crate applies itself.
#[derive(Default)]
struct PaxOverrides {
    mtime: Option<i64>,
    sparse: bool,
}

fn pax_overrides<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<PaxOverrides> {
    let mut out = PaxOverrides::default();
    let Some(records) = entry.pax_extensions()? else {
        return Ok(out);
    };
    for record in records {
        let record = record?;
        match record.key_bytes() {
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
        index_tar(Cursor::new(bytes))
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
        let err = index(&bytes).unwrap_err().to_string();
        assert!(err.contains("after entry \"a\""), "{err}");
        assert_eq!(index(&[]).unwrap(), vec![]);
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
