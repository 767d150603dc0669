//! Which files of a model are served: a CSI volume's exclusions, with the Model CSI
//! driver's meaning so that its pod specs move over unchanged.
//!
//! - `exclude-model-weights` (`true`/`false` in Go's `ParseBool` spellings): weights are
//!   files named `*.safetensors` and the file `model.safetensors.index.json` at the top.
//! - `exclude-file-patterns`: a JSON array of gitignore-style patterns matched against
//!   each file's base name (`*`, `?`, `[...]`; a leading `!` keeps what matches); the
//!   last pattern that matches decides, and a decision by pattern overrides the weights
//!   rule.
//!
//! Decided per layer, by the file path its `org.cncf.model.filepath` annotation names
//! (one file per layer, as modctl writes); when anything is excluded, a layer without
//! that annotation is not served. Pure: no I/O.

use super::manifest::ModelLayer;

/// Most patterns, and longest pattern, accepted.
pub const MAX_PATTERNS: usize = 1024;
pub const MAX_PATTERN_BYTES: usize = 4096;

/// Why the exclusions are unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// The weights flag is not a boolean.
    #[error("exclude-model-weights {0:?} is not true or false")]
    Flag(String),
    /// The patterns are not a JSON array of strings, or too many or too long.
    #[error("exclude-file-patterns: {0}")]
    Patterns(String),
}

/// One pattern: whether a match keeps the file, and the glob.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Rule {
    keep: bool,
    /// `None`: a pattern that can match no file (a directory pattern, `dir/`).
    glob: Option<glob::Pattern>,
}

/// Which layers to serve.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selection {
    exclude_weights: bool,
    rules: Vec<Rule>,
}

impl Selection {
    /// Everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// The selection of a volume's `exclude-model-weights` and `exclude-file-patterns`
    /// attributes (either may be absent).
    pub fn parse(exclude_weights: Option<&str>, patterns: Option<&str>) -> Result<Self, SelectError> {
        let exclude_weights = match exclude_weights.unwrap_or("") {
            "" | "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
            "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
            other => return Err(SelectError::Flag(other.to_owned())),
        };
        let patterns = patterns.map(str::trim).filter(|p| !p.is_empty()).unwrap_or("[]");
        if patterns.len() > MAX_PATTERNS * (MAX_PATTERN_BYTES + 4) {
            return Err(SelectError::Patterns("too long".into()));
        }
        let list: Vec<String> = serde_json::from_str(patterns)
            .map_err(|_| SelectError::Patterns(format!("{patterns:?} is not a JSON array of strings")))?;
        if list.len() > MAX_PATTERNS {
            return Err(SelectError::Patterns(format!("more than {MAX_PATTERNS} patterns")));
        }
        let mut rules = Vec::with_capacity(list.len());
        for pattern in list {
            if pattern.len() > MAX_PATTERN_BYTES {
                return Err(SelectError::Patterns(format!("a pattern is longer than {MAX_PATTERN_BYTES} bytes")));
            }
            let (keep, glob) = match pattern.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, pattern.as_str()),
            };
            // Matched against a base name alone: an anchor or a leading `**/` changes
            // nothing, a directory pattern matches no file.
            let glob = glob.strip_prefix("**/").or_else(|| glob.strip_prefix('/')).unwrap_or(glob);
            let glob = if glob.is_empty() || glob.ends_with('/') {
                None
            } else {
                Some(glob::Pattern::new(glob).map_err(|e| SelectError::Patterns(format!("{pattern:?}: {e}")))?)
            };
            rules.push(Rule { keep, glob });
        }
        Ok(Self { exclude_weights, rules })
    }

    /// Whether everything is served.
    pub fn is_all(&self) -> bool {
        !self.exclude_weights && self.rules.is_empty()
    }

    /// Whether `layer` is served.
    pub fn keeps(&self, layer: &ModelLayer) -> bool {
        if self.is_all() {
            return true;
        }
        let Some(path) = &layer.path else { return false };
        let path = path.as_str();
        let name = path.rsplit('/').next().unwrap_or(path);
        let options =
            glob::MatchOptions { case_sensitive: true, require_literal_separator: true, ..Default::default() };
        let decided =
            self.rules.iter().rev().find(|rule| rule.glob.as_ref().is_some_and(|g| g.matches_with(name, options)));
        match decided {
            Some(rule) => rule.keep,
            None => !(self.exclude_weights && is_weight(path)),
        }
    }
}

/// A weight file, as the Model CSI driver counts them.
fn is_weight(path: &str) -> bool {
    path.ends_with(".safetensors") || path == "model.safetensors.index.json"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modelpack::media::LayerMediaType;

    fn layer(path: Option<&str>) -> ModelLayer {
        ModelLayer {
            index: 0,
            media_type: "application/vnd.cncf.model.weight.v1.raw".parse::<LayerMediaType>().unwrap(),
            digest: crate::modelpack::Digest::of(b"x"),
            size: 1,
            path: path.map(|p| p.parse().unwrap()),
            metadata: None,
            annotations: Default::default(),
        }
    }

    fn keeps(select: &Selection, path: &str) -> bool {
        select.keeps(&layer(Some(path)))
    }

    #[test]
    fn weights_are_safetensors_files_and_their_index() {
        let s = Selection::parse(Some("true"), None).unwrap();
        assert!(!keeps(&s, "model-00001-of-00002.safetensors"));
        assert!(!keeps(&s, "sub/model.safetensors"));
        assert!(!keeps(&s, "model.safetensors.index.json"));
        assert!(keeps(&s, "sub/model.safetensors.index.json"));
        assert!(keeps(&s, "config.json"));
        assert!(keeps(&s, "model.gguf"));
        assert!(keeps(&s, "model.SAFETENSORS"));
        assert!(!s.keeps(&layer(None)), "a layer without a path is not served once anything is excluded");
        assert!(Selection::parse(Some("false"), None).unwrap().is_all());
        assert!(Selection::parse(Some(""), Some(" [] ")).unwrap().is_all());
        assert!(Selection::all().keeps(&layer(None)));
        for bad in ["yes", " true", "tRuE"] {
            assert_eq!(Selection::parse(Some(bad), None), Err(SelectError::Flag(bad.to_owned())));
        }
    }

    #[test]
    fn patterns_match_base_names_and_the_last_match_decides() {
        let s = Selection::parse(Some("true"), Some(r#"["*.json", "!config.json", "!model-0000[1]-*"]"#)).unwrap();
        assert!(!keeps(&s, "tokenizer.json"));
        assert!(!keeps(&s, "docs/extra/notes.json"));
        assert!(keeps(&s, "config.json"));
        assert!(keeps(&s, "sub/config.json"));
        assert!(keeps(&s, "model-00001-of-00002.safetensors"), "a pattern overrides the weights rule");
        assert!(!keeps(&s, "model-00002-of-00002.safetensors"));
        assert!(keeps(&s, "README.md"));
        let s = Selection::parse(None, Some(r#"["/*.md", "**/*.txt", "docs/", "sub/*.bin"]"#)).unwrap();
        assert!(!keeps(&s, "docs/README.md"));
        assert!(!keeps(&s, "a/b/c.txt"));
        assert!(keeps(&s, "docs/x.json"), "a directory pattern matches no file");
        assert!(keeps(&s, "sub/a.bin"), "a pattern with a directory part never matches a base name");
        for bad in ["*.json", "[1, 2]", "{\"a\": 1}", r#"["[unclosed"]"#] {
            assert!(matches!(Selection::parse(None, Some(bad)), Err(SelectError::Patterns(_))), "{bad}");
        }
        let many = serde_json::to_string(&vec!["a"; MAX_PATTERNS + 1]).unwrap();
        assert!(Selection::parse(None, Some(&many)).is_err());
    }
}
