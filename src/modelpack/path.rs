//! Model paths: validated, normalized relative paths inside the model tree.
//!
//! Every path that reaches the tree comes from a registry (an annotation or a tar
//! entry name), so it is parsed here into a [`ModelPath`] that cannot name anything
//! outside the tree: no absolute paths, no `..`, no empty or `.` components, no NUL.

use std::fmt;
use std::str::FromStr;

/// Longest accepted path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest accepted path component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;

/// How much of an offending path an error message quotes.
const EXCERPT_LEN: usize = 200;

/// Why a string is not a model path. Each variant quotes (the start of) the path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// The path is empty.
    #[error("path is empty")]
    Empty,
    /// The path names the tree's root, which is not a file.
    #[error("path {0:?} names the root of the model, not a file")]
    Root(String),
    /// The path starts with `/`.
    #[error("path {0:?} is absolute")]
    Absolute(String),
    /// The path contains a NUL byte.
    #[error("path {0:?} contains a nul byte")]
    Nul(String),
    /// The path has an empty component (`a//b`).
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    /// The path has a `.` component other than a leading `./`.
    #[error("path {0:?} has a `.` component")]
    DotComponent(String),
    /// The path has a `..` component.
    #[error("path {0:?} has a `..` component")]
    ParentComponent(String),
    /// A component is longer than [`MAX_COMPONENT_LEN`].
    #[error("path {0:?} has a component longer than 255 bytes")]
    ComponentTooLong(String),
    /// The path is longer than [`MAX_PATH_LEN`].
    #[error("path {0:?} is longer than 4096 bytes")]
    TooLong(String),
}

/// A relative path inside the model tree, normalized (no leading `./`, no trailing
/// `/`) and checked against the rules in the module doc.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelPath(String);

impl ModelPath {
    /// Parses an untrusted path. The root (`.` or `./`) is rejected: it cannot be a file.
    pub fn parse(s: &str) -> Result<ModelPath, PathError> {
        normalize(s)?.ok_or_else(|| PathError::Root(excerpt(s)))
    }

    /// The normalized path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, outermost first; never empty.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        match self.0.rfind('/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// The enclosing directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<ModelPath> {
        self.0.rfind('/').map(|i| ModelPath(self.0[..i].to_owned()))
    }

    /// `self/name`, where `name` is itself a relative path obeying the same rules.
    pub fn join(&self, name: &str) -> Result<ModelPath, PathError> {
        if name.is_empty() {
            return Err(PathError::Empty);
        }
        ModelPath::parse(&format!("{}/{}", self.0, name))
    }
}

impl fmt::Display for ModelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ModelPath {
    type Err = PathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelPath::parse(s)
    }
}

/// Parses a tar entry name, where the root itself (`.` or `./`) may appear as a
/// directory entry: it yields `Ok(None)`.
pub fn parse_tar_name(s: &str) -> Result<Option<ModelPath>, PathError> {
    normalize(s)
}

/// Checks and normalizes `s`; `Ok(None)` means the root.
fn normalize(s: &str) -> Result<Option<ModelPath>, PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.contains('\0') {
        return Err(PathError::Nul(excerpt(s)));
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute(excerpt(s)));
    }
    if s == "." || s == "./" {
        return Ok(None);
    }
    let rest = s.strip_prefix("./").unwrap_or(s);
    // Tar writes directory entries with one trailing slash; any more is an empty
    // component and rejected below.
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(excerpt(s)));
    }
    for component in rest.split('/') {
        match component {
            "" => return Err(PathError::EmptyComponent(excerpt(s))),
            "." => return Err(PathError::DotComponent(excerpt(s))),
            ".." => return Err(PathError::ParentComponent(excerpt(s))),
            c if c.len() > MAX_COMPONENT_LEN => return Err(PathError::ComponentTooLong(excerpt(s))),
            _ => {}
        }
    }
    Ok(Some(ModelPath(rest.to_owned())))
}

/// The start of `s`, so that an error about a huge path stays readable.
fn excerpt(s: &str) -> String {
    if s.len() <= EXCERPT_LEN {
        return s.to_owned();
    }
    let mut end = EXCERPT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        ModelPath::parse(s).unwrap().as_str().to_owned()
    }

    #[test]
    fn accepts_and_normalizes() {
        assert_eq!(ok("model.safetensors"), "model.safetensors");
        assert_eq!(ok("./a/b.json"), "a/b.json");
        assert_eq!(ok("dir/"), "dir");
        assert_eq!(ok("./dir/"), "dir");
        assert_eq!(ok("a\\b"), "a\\b");
        assert_eq!(ok("..."), "...");
        assert_eq!(ok(".hidden/..x"), ".hidden/..x");
        assert_eq!(ok("名前/データ"), "名前/データ");
        assert_eq!(ok(&"x".repeat(255)), "x".repeat(255));
    }

    #[test]
    fn rejects_attacks_and_malformed_paths() {
        type Variant = fn(String) -> PathError;
        let cases: &[(&str, Variant)] = &[
            ("../../etc/x", PathError::ParentComponent),
            ("a/../b", PathError::ParentComponent),
            ("a/..", PathError::ParentComponent),
            ("..", PathError::ParentComponent),
            ("/etc/passwd", PathError::Absolute),
            ("/", PathError::Absolute),
            ("a//b", PathError::EmptyComponent),
            ("a//", PathError::EmptyComponent),
            (".//", PathError::EmptyComponent),
            ("a/./b", PathError::DotComponent),
            ("a/.", PathError::DotComponent),
            ("././a", PathError::DotComponent),
            ("a\0b", PathError::Nul),
            ("./", PathError::Root),
            (".", PathError::Root),
        ];
        for (input, want) in cases {
            assert_eq!(ModelPath::parse(input), Err(want(input.to_string())), "{input:?}");
        }
        assert_eq!(ModelPath::parse(""), Err(PathError::Empty));
        let long_component = "x".repeat(256);
        assert!(matches!(ModelPath::parse(&long_component), Err(PathError::ComponentTooLong(_))));
        let long_path = vec!["abcdefgh"; 500].join("/");
        assert!(matches!(ModelPath::parse(&long_path), Err(PathError::TooLong(_))));
        // 17 components of 240 bytes and 16 slashes: exactly the limit.
        let at_limit = vec!["c".repeat(240); 17].join("/");
        assert_eq!(at_limit.len(), MAX_PATH_LEN);
        assert!(ModelPath::parse(&at_limit).is_ok());
        assert!(ModelPath::parse(&format!("{at_limit}/")).is_ok());
        assert!(matches!(ModelPath::parse(&format!("{at_limit}d")), Err(PathError::TooLong(_))));
    }

    #[test]
    fn errors_quote_the_path_but_stay_short() {
        let err = ModelPath::parse("../../etc/x").unwrap_err().to_string();
        assert!(err.contains("\"../../etc/x\""), "{err}");
        let huge = format!("../{}", "é".repeat(5000));
        let err = ModelPath::parse(&huge).unwrap_err().to_string();
        assert!(err.len() < 400, "{err}");
    }

    #[test]
    fn tar_names_allow_the_root() {
        assert_eq!(parse_tar_name("./"), Ok(None));
        assert_eq!(parse_tar_name("."), Ok(None));
        assert_eq!(parse_tar_name("./a/"), Ok(Some(ModelPath::parse("a").unwrap())));
        assert!(parse_tar_name("../x").is_err());
        assert!(parse_tar_name("").is_err());
    }

    #[test]
    fn accessors() {
        let p = ModelPath::parse("a/b/c.txt").unwrap();
        assert_eq!(p.components().collect::<Vec<_>>(), ["a", "b", "c.txt"]);
        assert_eq!(p.file_name(), "c.txt");
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.parent().unwrap().parent().unwrap().as_str(), "a");
        assert_eq!(p.parent().unwrap().parent().unwrap().parent(), None);
        assert_eq!(p.to_string(), "a/b/c.txt");
        let top = ModelPath::parse("top").unwrap();
        assert_eq!(top.file_name(), "top");
        assert_eq!(top.join("x/y").unwrap().as_str(), "top/x/y");
        assert!(top.join("../x").is_err());
        assert!(top.join("").is_err());
        assert_eq!("a/b".parse::<ModelPath>().unwrap().as_str(), "a/b");
    }
}
