//! The merged, read-only file tree of a model: every layer's files under one root,
//! with inode numbers, sanitized modes and, for each file, the byte range of a layer
//! blob that holds its contents. The FUSE filesystem serves this tree as it is.
//!
//! Layers may not overlap: two layers providing the same file is an error, not an
//! override, because a model has no notion of whiteouts and a silent winner would
//! hide a broken artifact. Directories are the exception; they merge.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::digest::Digest;
use super::manifest::{unix_time, ModelLayer};
use super::path::ModelPath;
use super::tar_index::{TarEntry, TarEntryKind};

/// An inode number. Inodes are dense: a node's inode is its position plus one.
pub type Ino = u64;

/// The root directory's inode, as FUSE expects.
pub const ROOT_INO: Ino = 1;

/// Mode of every directory: listable by everyone, writable by no one.
const DIR_MODE: u32 = 0o555;
/// Mode of every symlink, as Linux reports them.
const SYMLINK_MODE: u32 = 0o777;

/// Why a layer does not fit into the tree. Each variant names the layer's index and
/// digest and the path in question.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    /// Two layers, or two entries of one layer, provide the same path.
    #[error("layer {layer} ({digest}) provides {path:?}, which layer {other} already provides")]
    Duplicate {
        /// The layer being added.
        layer: usize,
        /// Its digest.
        digest: Digest,
        /// The contested path.
        path: String,
        /// The layer that provided the path first.
        other: usize,
    },
    /// A path must be a directory but is a file or symlink.
    #[error(
        "layer {layer} ({digest}) needs {path:?} to be a directory, but layer {other} provides it as a file or symlink"
    )]
    NotADirectory {
        /// The layer being added.
        layer: usize,
        /// Its digest.
        digest: Digest,
        /// The path that should be a directory.
        path: String,
        /// The layer that provided the file or symlink.
        other: usize,
    },
    /// A file or symlink would replace a directory.
    #[error(
        "layer {layer} ({digest}) provides {path:?} as a file or symlink, but layer {other} has it as a directory"
    )]
    IsADirectory {
        /// The layer being added.
        layer: usize,
        /// Its digest.
        digest: Digest,
        /// The path that is a directory.
        path: String,
        /// The layer that made it a directory.
        other: usize,
    },
    /// A raw layer without a path has nowhere to go.
    #[error("layer {layer} ({digest}) is a raw file but has no path")]
    MissingPath {
        /// The layer being added.
        layer: usize,
        /// Its digest.
        digest: Digest,
    },
    /// A hard link whose target is not a file of the same layer.
    #[error("layer {layer} ({digest}) hard-links {path:?} to {target:?}, which is not a file of this layer")]
    HardLinkTarget {
        /// The layer being added.
        layer: usize,
        /// Its digest.
        digest: Digest,
        /// The link's path.
        path: String,
        /// The target's path.
        target: String,
    },
}

/// Where a file's bytes are: a range of one layer's uncompressed blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSource {
    /// Index into [`ModelArtifact::layers`](super::manifest::ModelArtifact::layers).
    pub layer: usize,
    /// Offset of the first byte in the uncompressed blob.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory, with its entries by name.
    Dir {
        /// Entry names to inodes, in name order.
        children: BTreeMap<String, Ino>,
    },
    /// A regular file.
    File(FileSource),
    /// A symlink and its target, as written.
    Symlink(String),
}

/// One file, directory or symlink of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// This node's inode.
    pub ino: Ino,
    /// The enclosing directory's inode; the root is its own parent.
    pub parent: Ino,
    /// The name in the parent directory; empty for the root.
    pub name: String,
    /// What the node is.
    pub kind: NodeKind,
    /// Permission bits, sanitized: files at least `0o444` and never writable or
    /// set-id, directories `0o555`, symlinks `0o777`.
    pub mode: u32,
    /// Modification time.
    pub mtime: SystemTime,
    /// File size, symlink target length, or 0 for a directory.
    pub size: u64,
}

/// Which layer put a node in the tree, for error messages, and whether a directory
/// was listed explicitly (its metadata then wins over an implicit parent's).
#[derive(Clone, Copy, Debug)]
struct Origin {
    layer: usize,
    explicit: bool,
}

/// Collects layers into a [`Tree`], refusing overlaps.
#[derive(Debug)]
pub struct TreeBuilder {
    nodes: Vec<Node>,
    origins: Vec<Origin>,
    default_mtime: SystemTime,
}

/// A leaf to insert: everything a [`Node`] needs except its place.
struct Leaf {
    kind: NodeKind,
    mode: u32,
    mtime: SystemTime,
    size: u64,
}

impl TreeBuilder {
    /// An empty tree. `default_mtime` dates the root, implicit directories and files
    /// whose layer gives no time.
    pub fn new(default_mtime: SystemTime) -> Self {
        let root = Node {
            ino: ROOT_INO,
            parent: ROOT_INO,
            name: String::new(),
            kind: NodeKind::Dir { children: BTreeMap::new() },
            mode: DIR_MODE,
            mtime: default_mtime,
            size: 0,
        };
        Self { nodes: vec![root], origins: vec![Origin { layer: 0, explicit: false }], default_mtime }
    }

    /// Adds a raw layer: one file at the layer's path, the whole blob as its contents.
    /// Mode and mtime come from the layer's file metadata when it has some.
    pub fn add_raw_layer(&mut self, layer: &ModelLayer) -> Result<(), TreeError> {
        let path = layer.path.as_ref().ok_or(TreeError::MissingPath { layer: layer.index, digest: layer.digest })?;
        let metadata = layer.metadata.as_ref();
        let leaf = Leaf {
            kind: NodeKind::File(FileSource { layer: layer.index, offset: 0, size: layer.size }),
            mode: file_mode(metadata.map_or(0, |m| m.mode)),
            mtime: metadata.and_then(|m| m.mtime).unwrap_or(self.default_mtime),
            size: layer.size,
        };
        self.insert_leaf(layer, path, leaf)
    }

    /// Adds the entries of a tar layer, as [`index_tar`](super::tar_index::index_tar)
    /// returned them. The layer's own path annotation is not used: entries carry
    /// their full paths. After an error the builder may hold part of the layer; a
    /// caller that fails the mount simply drops it.
    pub fn add_tar_layer(&mut self, layer: &ModelLayer, entries: &[TarEntry]) -> Result<(), TreeError> {
        for entry in entries {
            let mtime = unix_time(entry.mtime, 0).unwrap_or(self.default_mtime);
            let leaf = match &entry.kind {
                TarEntryKind::Dir => {
                    self.add_dir(layer, &entry.path, mtime)?;
                    continue;
                }
                TarEntryKind::File => Leaf {
                    kind: NodeKind::File(FileSource {
                        layer: layer.index,
                        offset: entry.data_offset,
                        size: entry.size,
                    }),
                    mode: file_mode(entry.mode),
                    mtime,
                    size: entry.size,
                },
                TarEntryKind::Symlink(target) => Leaf {
                    kind: NodeKind::Symlink(target.clone()),
                    mode: SYMLINK_MODE,
                    mtime,
                    size: target.len() as u64,
                },
                TarEntryKind::HardLink(target) => {
                    let source = self.hard_link_source(layer, &entry.path, target)?;
                    Leaf { kind: NodeKind::File(source), mode: file_mode(entry.mode), mtime, size: source.size }
                }
            };
            self.insert_leaf(layer, &entry.path, leaf)?;
        }
        Ok(())
    }

    /// The finished tree.
    pub fn build(self) -> Tree {
        Tree { nodes: self.nodes }
    }

    fn hard_link_source(
        &self,
        layer: &ModelLayer,
        path: &ModelPath,
        target: &ModelPath,
    ) -> Result<FileSource, TreeError> {
        let found = resolve_in(&self.nodes, target).and_then(|ino| node_at(&self.nodes, ino));
        match found.map(|n| &n.kind) {
            Some(NodeKind::File(source)) if source.layer == layer.index => Ok(*source),
            _ => Err(TreeError::HardLinkTarget {
                layer: layer.index,
                digest: layer.digest,
                path: path.to_string(),
                target: target.to_string(),
            }),
        }
    }

    /// Adds or merges an explicitly listed directory.
    fn add_dir(&mut self, layer: &ModelLayer, path: &ModelPath, mtime: SystemTime) -> Result<(), TreeError> {
        let ino = self.ensure_dir(layer, path)?;
        let i = index_of(ino);
        if !self.origins[i].explicit {
            self.origins[i] = Origin { layer: layer.index, explicit: true };
            self.nodes[i].mtime = mtime;
        }
        Ok(())
    }

    fn insert_leaf(&mut self, layer: &ModelLayer, path: &ModelPath, leaf: Leaf) -> Result<(), TreeError> {
        let parent = match path.parent() {
            Some(dir) => self.ensure_dir(layer, &dir)?,
            None => ROOT_INO,
        };
        let name = path.file_name();
        if let Some(existing) = self.child(parent, name) {
            let i = index_of(existing);
            let (digest, path, other) = (layer.digest, path.to_string(), self.origins[i].layer);
            return Err(match self.nodes[i].kind {
                NodeKind::Dir { .. } => TreeError::IsADirectory { layer: layer.index, digest, path, other },
                _ => TreeError::Duplicate { layer: layer.index, digest, path, other },
            });
        }
        self.push(parent, name, leaf, Origin { layer: layer.index, explicit: true });
        Ok(())
    }

    /// The directory at `path`, creating it and its ancestors as implicit directories
    /// where missing.
    fn ensure_dir(&mut self, layer: &ModelLayer, path: &ModelPath) -> Result<Ino, TreeError> {
        let mut ino = ROOT_INO;
        let mut walked = 0;
        for component in path.components() {
            walked += component.len() + 1;
            ino = match self.child(ino, component) {
                Some(child) if matches!(self.nodes[index_of(child)].kind, NodeKind::Dir { .. }) => child,
                Some(child) => {
                    return Err(TreeError::NotADirectory {
                        layer: layer.index,
                        digest: layer.digest,
                        path: path.as_str()[..walked - 1].to_owned(),
                        other: self.origins[index_of(child)].layer,
                    })
                }
                None => {
                    let dir = Leaf {
                        kind: NodeKind::Dir { children: BTreeMap::new() },
                        mode: DIR_MODE,
                        mtime: self.default_mtime,
                        size: 0,
                    };
                    self.push(ino, component, dir, Origin { layer: layer.index, explicit: false })
                }
            };
        }
        Ok(ino)
    }

    fn child(&self, dir: Ino, name: &str) -> Option<Ino> {
        match &node_at(&self.nodes, dir)?.kind {
            NodeKind::Dir { children } => children.get(name).copied(),
            _ => None,
        }
    }

    /// Appends a node under `parent`, which must be a directory node.
    fn push(&mut self, parent: Ino, name: &str, leaf: Leaf, origin: Origin) -> Ino {
        let ino = self.nodes.len() as Ino + 1;
        if let NodeKind::Dir { children } = &mut self.nodes[index_of(parent)].kind {
            children.insert(name.to_owned(), ino);
        }
        self.nodes.push(Node {
            ino,
            parent,
            name: name.to_owned(),
            kind: leaf.kind,
            mode: leaf.mode,
            mtime: leaf.mtime,
            size: leaf.size,
        });
        self.origins.push(origin);
        ino
    }
}

/// The merged tree of a model, read-only.
#[derive(Clone, Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// The node with inode `ino`.
    pub fn get(&self, ino: Ino) -> Option<&Node> {
        node_at(&self.nodes, ino)
    }

    /// The entry `name` of directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &str) -> Option<&Node> {
        match &self.get(parent)?.kind {
            NodeKind::Dir { children } => self.get(*children.get(name)?),
            _ => None,
        }
    }

    /// The node at `path`, without following symlinks.
    pub fn resolve(&self, path: &ModelPath) -> Option<&Node> {
        self.get(resolve_in(&self.nodes, path)?)
    }

    /// The path of `ino` from the root, for display: empty for the root and for an
    /// inode not in the tree.
    pub fn path_of(&self, ino: Ino) -> String {
        let mut names = Vec::new();
        let mut node = self.get(ino);
        while let Some(n) = node.filter(|n| n.ino != ROOT_INO) {
            names.push(n.name.as_str());
            node = self.get(n.parent);
        }
        names.reverse();
        names.join("/")
    }

    /// Number of nodes, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A digest of what the kernel may remember of the tree: every inode with its
    /// parent, name, kind, size, mode and source. A process taking over a FUSE session
    /// serves a model only with the very inode numbers the kernel knows (see
    /// [`crate::fs::handover`]), even when a newer build made the tree.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let mut hash = Sha256::new();
        for node in &self.nodes {
            let (kind, extra) = match &node.kind {
                NodeKind::Dir { .. } => ("d", String::new()),
                NodeKind::File(source) => ("f", format!("{}:{}", source.layer, source.offset)),
                NodeKind::Symlink(target) => ("l", format!("{}:{target}", target.len())),
            };
            // Lengths first: no name can pass for another line.
            let line = format!(
                "{} {} {}:{} {kind} {} {:o} {extra}\n",
                node.ino,
                node.parent,
                node.name.len(),
                node.name,
                node.size,
                node.mode
            );
            hash.update(line.as_bytes());
        }
        format!("sha256:{}", hex::encode(hash.finalize()))
    }

    /// All nodes in inode order, the root first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    /// All regular files (hard links included) with their sources, in inode order.
    pub fn files(&self) -> impl Iterator<Item = (&Node, &FileSource)> {
        self.nodes.iter().filter_map(|n| match &n.kind {
            NodeKind::File(source) => Some((n, source)),
            _ => None,
        })
    }

    /// Sum of all file sizes; a hard-linked file counts once per link.
    pub fn total_file_bytes(&self) -> u64 {
        self.files().fold(0u64, |sum, (_, source)| sum.saturating_add(source.size))
    }

    /// The entries of directory `ino` in name order, or `None` if it is not a directory.
    pub fn children(&self, ino: Ino) -> Option<impl Iterator<Item = (&str, Ino)>> {
        match &self.get(ino)?.kind {
            NodeKind::Dir { children } => Some(children.iter().map(|(name, &ino)| (name.as_str(), ino))),
            _ => None,
        }
    }
}

/// Files are read-only: write and set-id/sticky bits go, read for all is added.
fn file_mode(perm: u32) -> u32 {
    (perm & 0o555) | 0o444
}

fn index_of(ino: Ino) -> usize {
    (ino - 1) as usize
}

fn node_at(nodes: &[Node], ino: Ino) -> Option<&Node> {
    let i = usize::try_from(ino.checked_sub(1)?).ok()?;
    nodes.get(i)
}

fn resolve_in(nodes: &[Node], path: &ModelPath) -> Option<Ino> {
    path.components().try_fold(ROOT_INO, |dir, name| match &node_at(nodes, dir)?.kind {
        NodeKind::Dir { children } => children.get(name).copied(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::time::{Duration, UNIX_EPOCH};

    use tar::{Builder, EntryType, Header};

    use super::*;
    use crate::modelpack::manifest::FileMetadata;
    use crate::modelpack::media::{LayerFormat, LayerKind, LayerMediaType};
    use crate::modelpack::tar_index::index_tar;

    fn default_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000)
    }

    fn layer(index: usize, format: LayerFormat, path: Option<&str>, size: u64) -> ModelLayer {
        ModelLayer {
            index,
            media_type: LayerMediaType::new(LayerKind::Weight, format),
            digest: Digest::of(&index.to_le_bytes()),
            size,
            path: path.map(|p| ModelPath::parse(p).unwrap()),
            metadata: None,
            annotations: BTreeMap::new(),
        }
    }

    fn raw(index: usize, path: &str, size: u64) -> ModelLayer {
        layer(index, LayerFormat::Raw, Some(path), size)
    }

    fn p(s: &str) -> ModelPath {
        ModelPath::parse(s).unwrap()
    }

    fn tar_entries(f: impl FnOnce(&mut Builder<Vec<u8>>)) -> Vec<TarEntry> {
        let mut t = Builder::new(Vec::new());
        f(&mut t);
        let bytes = t.into_inner().unwrap();
        index_tar(Cursor::new(&bytes), bytes.len() as u64).unwrap()
    }

    fn append(t: &mut Builder<Vec<u8>>, kind: EntryType, path: &str, data: &[u8], mode: u32) {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        t.append_data(&mut h, path, data).unwrap();
    }

    fn append_link(t: &mut Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str) {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        t.append_link(&mut h, path, target).unwrap();
    }

    #[test]
    fn raw_layers_make_files_and_implicit_dirs() {
        let mut b = TreeBuilder::new(default_time());
        b.add_raw_layer(&raw(0, "weights/part-2.safetensors", 20)).unwrap();
        b.add_raw_layer(&raw(1, "weights/part-1.safetensors", 10)).unwrap();
        b.add_raw_layer(&raw(2, "config.json", 3)).unwrap();
        let tree = b.build();

        assert_eq!(tree.len(), 5);
        assert!(!tree.is_empty());
        for (i, node) in tree.nodes().enumerate() {
            assert_eq!(node.ino, i as Ino + 1);
        }
        let root = tree.get(ROOT_INO).unwrap();
        assert_eq!((root.parent, root.name.as_str(), root.mode, root.size), (ROOT_INO, "", 0o555, 0));
        let names: Vec<_> = tree.children(ROOT_INO).unwrap().map(|(n, _)| n).collect();
        assert_eq!(names, ["config.json", "weights"]);

        let weights = tree.lookup(ROOT_INO, "weights").unwrap();
        assert_eq!((weights.mode, weights.mtime, weights.size), (0o555, default_time(), 0));
        let parts: Vec<_> = tree.children(weights.ino).unwrap().collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, "part-1.safetensors");

        let part1 = tree.resolve(&p("weights/part-1.safetensors")).unwrap();
        assert_eq!(part1.parent, weights.ino);
        assert_eq!(part1.kind, NodeKind::File(FileSource { layer: 1, offset: 0, size: 10 }));
        assert_eq!((part1.mode, part1.mtime, part1.size), (0o444, default_time(), 10));
        assert_eq!(tree.files().count(), 3);
        assert_eq!(tree.total_file_bytes(), 33);

        assert_eq!(tree.path_of(part1.ino), "weights/part-1.safetensors");
        assert_eq!(tree.path_of(weights.ino), "weights");
        assert_eq!((tree.path_of(ROOT_INO), tree.path_of(99)), (String::new(), String::new()));
        assert!(tree.get(0).is_none() && tree.get(6).is_none() && tree.get(u64::MAX).is_none());
        assert!(tree.children(part1.ino).is_none());
        assert!(tree.lookup(part1.ino, "x").is_none());
        assert!(tree.resolve(&p("weights/part-1.safetensors/x")).is_none());
        assert!(tree.resolve(&p("missing")).is_none());
    }

    #[test]
    fn file_modes_are_sanitized_and_metadata_applies() {
        let cases = [(0o4755, 0o555), (0o600, 0o444), (0o644, 0o444), (0o777, 0o555), (0o100700, 0o544), (0, 0o444)];
        let mut b = TreeBuilder::new(default_time());
        let at = UNIX_EPOCH + Duration::from_secs(42);
        for (i, (mode, _)) in cases.iter().enumerate() {
            let mut l = raw(i, &format!("f{i}"), 1);
            l.metadata = Some(FileMetadata { mode: *mode, mtime: Some(at), ..FileMetadata::default() });
            b.add_raw_layer(&l).unwrap();
        }
        let tree = b.build();
        for (i, (mode, want)) in cases.iter().enumerate() {
            let node = tree.resolve(&p(&format!("f{i}"))).unwrap();
            assert_eq!(node.mode, *want, "{mode:o}");
            assert_eq!(node.mtime, at);
        }
    }

    #[test]
    fn refuses_duplicates_and_kind_conflicts_naming_layer_digest_and_path() {
        let mut b = TreeBuilder::new(default_time());
        b.add_raw_layer(&raw(0, "a/b.bin", 1)).unwrap();
        let dup = raw(3, "a/b.bin", 1);
        let err = b.add_raw_layer(&dup).unwrap_err();
        assert_eq!(err, TreeError::Duplicate { layer: 3, digest: dup.digest, path: "a/b.bin".into(), other: 0 });
        let msg = err.to_string();
        assert!(msg.contains("layer 3") && msg.contains(&dup.digest.to_string()) && msg.contains("\"a/b.bin\""));

        let under_file = raw(4, "a/b.bin/c", 1);
        assert_eq!(
            b.add_raw_layer(&under_file).unwrap_err(),
            TreeError::NotADirectory { layer: 4, digest: under_file.digest, path: "a/b.bin".into(), other: 0 }
        );
        let over_dir = raw(5, "a", 1);
        assert_eq!(
            b.add_raw_layer(&over_dir).unwrap_err(),
            TreeError::IsADirectory { layer: 5, digest: over_dir.digest, path: "a".into(), other: 0 }
        );
        let no_path = layer(6, LayerFormat::Raw, None, 1);
        assert_eq!(b.add_raw_layer(&no_path).unwrap_err(), TreeError::MissingPath { layer: 6, digest: no_path.digest });
    }

    #[test]
    fn tar_layers_bring_dirs_files_symlinks_and_hard_links() {
        let entries = tar_entries(|t| {
            append(t, EntryType::Directory, "./", b"", 0o755);
            append(t, EntryType::Directory, "tok/", b"", 0o700);
            append(t, EntryType::Regular, "tok/vocab.json", b"{}", 0o4755);
            append(t, EntryType::Regular, "deep/er/file", b"abc", 0o600);
            append_link(t, EntryType::Symlink, "tok/latest", "vocab.json");
            append_link(t, EntryType::Link, "tok/vocab-copy.json", "tok/vocab.json");
        });
        let l = layer(2, LayerFormat::Tar, Some("tok"), 10_240);
        let mut b = TreeBuilder::new(default_time());
        b.add_tar_layer(&l, &entries).unwrap();
        let tree = b.build();

        let tar_time = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let tok = tree.resolve(&p("tok")).unwrap();
        assert_eq!((tok.mode, tok.mtime), (0o555, tar_time));
        let implicit = tree.resolve(&p("deep/er")).unwrap();
        assert_eq!((implicit.mode, implicit.mtime), (0o555, default_time()));

        let vocab = tree.resolve(&p("tok/vocab.json")).unwrap();
        let NodeKind::File(source) = vocab.kind else { panic!("{vocab:?}") };
        assert_eq!((source.layer, source.size), (2, 2));
        assert_eq!(source.offset, entries[1].data_offset);
        assert_eq!((vocab.mode, vocab.mtime, vocab.size), (0o555, tar_time, 2));
        assert_eq!(tree.resolve(&p("deep/er/file")).unwrap().mode, 0o444);

        let latest = tree.resolve(&p("tok/latest")).unwrap();
        assert_eq!(latest.kind, NodeKind::Symlink("vocab.json".into()));
        assert_eq!((latest.mode, latest.size), (0o777, 10));

        let copy = tree.resolve(&p("tok/vocab-copy.json")).unwrap();
        assert_eq!(copy.kind, NodeKind::File(source));
        assert_eq!(copy.size, 2);
        assert_eq!(tree.total_file_bytes(), 7);
        let names: Vec<_> = tree.children(tok.ino).unwrap().map(|(n, _)| n).collect();
        assert_eq!(names, ["latest", "vocab-copy.json", "vocab.json"]);
    }

    #[test]
    fn directories_merge_across_layers_but_files_do_not() {
        let first = tar_entries(|t| {
            append(t, EntryType::Directory, "shared/", b"", 0o755);
            append(t, EntryType::Regular, "shared/a", b"a", 0o644);
        });
        let second = tar_entries(|t| {
            append(t, EntryType::Directory, "shared/", b"", 0o755);
            append(t, EntryType::Regular, "shared/b", b"b", 0o644);
        });
        let mut b = TreeBuilder::new(default_time());
        b.add_raw_layer(&raw(0, "shared/c", 1)).unwrap();
        b.add_tar_layer(&layer(1, LayerFormat::Tar, None, 0), &first).unwrap();
        b.add_tar_layer(&layer(2, LayerFormat::TarGzip, None, 0), &second).unwrap();

        let clash = tar_entries(|t| append(t, EntryType::Regular, "shared/a", b"z", 0o644));
        let l3 = layer(3, LayerFormat::Tar, None, 0);
        assert_eq!(
            b.add_tar_layer(&l3, &clash).unwrap_err(),
            TreeError::Duplicate { layer: 3, digest: l3.digest, path: "shared/a".into(), other: 1 }
        );
        let dir_over_file = tar_entries(|t| append(t, EntryType::Directory, "shared/c/", b"", 0o755));
        let l4 = layer(4, LayerFormat::Tar, None, 0);
        assert_eq!(
            b.add_tar_layer(&l4, &dir_over_file).unwrap_err(),
            TreeError::NotADirectory { layer: 4, digest: l4.digest, path: "shared/c".into(), other: 0 }
        );
        let symlink_over_dir = tar_entries(|t| append_link(t, EntryType::Symlink, "shared", "x"));
        let l5 = layer(5, LayerFormat::Tar, None, 0);
        assert!(matches!(b.add_tar_layer(&l5, &symlink_over_dir), Err(TreeError::IsADirectory { layer: 5, .. })));

        let tree = b.build();
        let names: Vec<_> = tree.children(tree.resolve(&p("shared")).unwrap().ino).unwrap().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn duplicate_entries_within_one_tar_layer_are_refused() {
        let entries = tar_entries(|t| {
            append(t, EntryType::Regular, "x", b"1", 0o644);
            append(t, EntryType::Regular, "x", b"2", 0o644);
        });
        let l = layer(0, LayerFormat::Tar, None, 0);
        let err = TreeBuilder::new(default_time()).add_tar_layer(&l, &entries).unwrap_err();
        assert_eq!(err, TreeError::Duplicate { layer: 0, digest: l.digest, path: "x".into(), other: 0 });
    }

    #[test]
    fn hard_links_must_target_a_file_of_the_same_layer() {
        let mut b = TreeBuilder::new(default_time());
        b.add_raw_layer(&raw(0, "elsewhere", 5)).unwrap();
        let entries = [TarEntry {
            path: p("link"),
            kind: TarEntryKind::HardLink(p("elsewhere")),
            mode: 0o644,
            mtime: 0,
            size: 5,
            data_offset: 0,
        }];
        let l = layer(1, LayerFormat::Tar, None, 0);
        assert_eq!(
            b.add_tar_layer(&l, &entries).unwrap_err(),
            TreeError::HardLinkTarget { layer: 1, digest: l.digest, path: "link".into(), target: "elsewhere".into() }
        );
    }
}
