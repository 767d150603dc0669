//! containerd's filter language, as carried by the snapshots `List` RPC.
//!
//! containerd asks a snapshotter for snapshots with `repeated string filters`; a snapshot
//! is listed when it matches any of the strings, and every snapshot is listed when there
//! are none. The metadata store relies on this when a backend reports that a snapshot
//! already exists: it looks the snapshot up with
//! `labels."containerd.io/snapshot.ref"==<chain id>,parent=="<parent key>"`, where the
//! parent key of a root snapshot is `""`.
//!
//! Each string is parsed here into a [`Filter`] once, at the edge, following containerd's
//! `pkg/filters` scanner and parser:
//!
//! ```text
//! filter     := "" | selector ("," selector)*       the empty string matches everything
//! selector   := fieldpath [operator value]           no operator: the field is present
//! fieldpath  := field ("." field)*
//! field      := [A-Za-z0-9_]+ | dquoted
//! operator   := "==" | "!=" | "~="
//! value      := dquoted | unquoted                   after "~=" also /…/ and |…|
//! unquoted   := first   any character but whitespace , . = ! ~ " / |
//!               then    letters, marks, numbers, punctuation and symbols, but not ","
//! dquoted    := '"' (character | escape)* '"'        no raw newline inside
//! escape     := \a \b \f \n \r \t \v \\ \<the quote> | \ooo | \xhh | \uhhhh | \Uhhhhhhhh
//! ```
//!
//! Whitespace may precede a field, an operator or a value, and nowhere else: not before
//! `.` or `,`, and not at the end. `\ooo` and `\xhh` are bytes, so escapes may spell out
//! multi-byte UTF-8; a string that does not decode to UTF-8 is rejected, since no field
//! could equal it. `/…/` and `|…|` quotes exist so a regular expression may contain `,`;
//! their escapes are those of `"…"` with the delimiter in place of `"` (so `\d` must be
//! written `\\d` inside them, as in containerd).
//!
//! Matching (containerd's `selector.Match`): `==` needs the field present and equal; `!=`
//! and `~=` compare a missing field as the empty string, so `labels.x!=y` matches a
//! snapshot without label `x` and `labels.x!=""` does not. Regular expressions use the
//! `regex` crate's syntax, which agrees with Go's RE2 for the patterns clients send; they
//! search rather than match whole values, as Go's `MatchString` does. Unlike containerd,
//! which logs an invalid expression and then matches nothing, an invalid expression is a
//! parse error, so the caller is told.
//!
//! Filters come from whoever can reach the socket, so their size is bounded: at most
//! [`MAX_FILTERS`] strings of at most [`MAX_FILTER_BYTES`] each, and a regular expression
//! compiles to at most [`MAX_REGEX_BYTES`].

use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};

/// Longest filter string accepted, in bytes. containerd's own lookups quote one label key
/// and value (at most 4096 bytes together) and a parent key; 16 KiB leaves room for
/// several such selectors.
pub const MAX_FILTER_BYTES: usize = 16 << 10;
/// Most filter strings in one request: each one is tested against every snapshot listed,
/// and containerd sends one.
pub const MAX_FILTERS: usize = 256;
/// Largest compiled `~=` regular expression (the `regex` crate's size limit, 10 MiB by
/// default), so that a short pattern with nested repetitions such as `(a{200}){200}` is
/// refused rather than built at length.
pub const MAX_REGEX_BYTES: usize = 1 << 20;

/// How much of an over-long filter its error quotes.
const EXCERPT_LEN: usize = 64;

/// The characters an unquoted value continues with: Go's `unicode.IsGraphic` without the
/// spaces (categories L, M, N, P, S), and not the selector separator `,`.
static VALUE_TAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A[\p{L}\p{M}\p{N}\p{P}\p{S}--,]*").expect("the value pattern is valid"));

/// Why a filter string could not be parsed; names the input and the position.
///
/// Positions are byte offsets into the filter string; the length of the string means its end.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A filter string longer than [`MAX_FILTER_BYTES`]; quotes its start.
    #[error("filter of {len} bytes starting {excerpt:?} is longer than the limit of {MAX_FILTER_BYTES}")]
    TooLong { excerpt: String, len: usize },
    /// More filter strings than [`MAX_FILTERS`] in one request.
    #[error("{0} filters in one request, more than the limit of {MAX_FILTERS}")]
    TooMany(usize),
    /// A selector or a `.` is not followed by a field name or a quoted field.
    #[error("filter {input:?} at byte {pos}: expected a field name or a quoted field")]
    ExpectedField { input: String, pos: usize },
    /// A field path is followed by neither an operator, `,` nor the end of the filter.
    #[error("filter {input:?} at byte {pos}: expected an operator (`==`, `!=` or `~=`)")]
    ExpectedOperator { input: String, pos: usize },
    /// A run of operator characters is not one of the three operators.
    #[error("filter {input:?} at byte {pos}: unsupported operator {op:?}")]
    UnsupportedOperator { input: String, pos: usize, op: String },
    /// An operator is not followed by a value.
    #[error("filter {input:?} at byte {pos}: expected a value or a quoted value")]
    ExpectedValue { input: String, pos: usize },
    /// A selector is followed by something other than `,` or the end of the filter.
    #[error("filter {input:?} at byte {pos}: expected `,` or the end of the filter")]
    UnexpectedInput { input: String, pos: usize },
    /// A quoted string runs into a newline or the end of the filter.
    #[error("filter {input:?} at byte {pos}: quoted string is not terminated")]
    UnterminatedQuote { input: String, pos: usize },
    /// A backslash inside a quoted string does not start a known escape.
    #[error("filter {input:?} at byte {pos}: illegal escape sequence")]
    IllegalEscape { input: String, pos: usize },
    /// `/…/` or `|…|` quotes outside the value of a `~=` selector.
    #[error("filter {input:?} at byte {pos}: `{quote}` quotes are only allowed around the value of `~=`")]
    RegexQuote { input: String, pos: usize, quote: char },
    /// The escapes of a quoted string spell out bytes that are not UTF-8.
    #[error("filter {input:?} at byte {pos}: quoted string is not valid utf-8")]
    NotUtf8 { input: String, pos: usize },
    /// The filter contains a NUL character, which containerd rejects anywhere.
    #[error("filter {input:?} at byte {pos}: unexpected nul character")]
    Nul { input: String, pos: usize },
    /// The value of a `~=` selector does not compile.
    #[error("filter {input:?} at byte {pos}: {pattern:?} is not a valid regular expression")]
    Regex {
        input: String,
        pos: usize,
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

/// Parsed filters: matches when any alternative matches.
#[derive(Debug, Clone)]
pub struct Filter {
    /// One conjunction per filter string; no strings at all means "match everything".
    alternatives: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses the filter strings of one request. An empty list, or an empty string among
    /// them, matches everything.
    ///
    /// # Errors
    ///
    /// The first string that does not follow the grammar in the module doc, or whose `~=`
    /// value is not a valid regular expression, or a request over the size limits.
    /// containerd answers that with `InvalidArgument`.
    pub fn parse_all(filters: &[String]) -> Result<Filter, FilterError> {
        if filters.len() > MAX_FILTERS {
            return Err(FilterError::TooMany(filters.len()));
        }
        let alternatives = filters.iter().map(|filter| Parser::new(filter).filter()).collect::<Result<_, _>>()?;
        Ok(Filter { alternatives })
    }

    /// Whether an object matches, reading its fields through `field`.
    ///
    /// `field` returns a field's value by path (e.g. `["labels", "containerd.io/snapshot.ref"]`
    /// or `["parent"]`), `None` when absent. The path's components are passed as written,
    /// so `labels.a.b` arrives as `["labels", "a", "b"]` and `labels."a.b"` as
    /// `["labels", "a.b"]`. To agree with containerd's snapshot adaptor
    /// (`adaptSnapshot` in `core/snapshots/storage/bolt.go` and `core/metadata/adaptors.go`)
    /// a snapshot exposes `name` and `parent` as always present (a root snapshot's parent
    /// is `Some("")`, which `parent==""` relies on), `kind` as `view`, `active` or
    /// `committed`, and `labels.…` as the label whose key is the remaining components
    /// joined with `.`; every other path is absent.
    pub fn matches(&self, field: &dyn Fn(&[&str]) -> Option<String>) -> bool {
        self.alternatives.is_empty()
            || self.alternatives.iter().any(|selectors| selectors.iter().all(|selector| selector.matches(field)))
    }
}

/// One `fieldpath[operator value]` term of a filter.
#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    test: Test,
}

/// What a selector asks of its field.
#[derive(Debug, Clone)]
enum Test {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Selector {
    fn matches(&self, field: &dyn Fn(&[&str]) -> Option<String>) -> bool {
        let path: Vec<&str> = self.path.iter().map(String::as_str).collect();
        let value = field(&path);
        match &self.test {
            Test::Present => value.is_some(),
            Test::Equal(want) => value.as_deref() == Some(want.as_str()),
            Test::NotEqual(want) => value.as_deref().unwrap_or("") != want,
            Test::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

/// The operators, before their value is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    Equal,
    NotEqual,
    Matches,
}

/// A recursive-descent parser over one filter string; `pos` is always on a character
/// boundary.
struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Parser<'a> {
        Parser { input, pos: 0 }
    }

    fn filter(mut self) -> Result<Vec<Selector>, FilterError> {
        if self.input.is_empty() {
            return Ok(Vec::new());
        }
        if self.input.len() > MAX_FILTER_BYTES {
            let mut end = EXCERPT_LEN;
            while !self.input.is_char_boundary(end) {
                end -= 1;
            }
            return Err(FilterError::TooLong { excerpt: self.input[..end].to_owned(), len: self.input.len() });
        }
        if let Some(pos) = self.input.find('\0') {
            return Err(FilterError::Nul { input: self.owned_input(), pos });
        }
        let mut selectors = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(selectors),
                Some(',') => {
                    self.pos += 1;
                    selectors.push(self.selector()?);
                }
                Some(_) => return Err(FilterError::UnexpectedInput { input: self.owned_input(), pos: self.pos }),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let path = self.fieldpath()?;
        if matches!(self.peek(), None | Some(',')) {
            return Ok(Selector { path, test: Test::Present });
        }
        let operator = self.operator()?;
        self.skip_whitespace();
        let value_pos = self.pos;
        let value = self.value(operator)?;
        let test = match operator {
            Operator::Equal => Test::Equal(value),
            Operator::NotEqual => Test::NotEqual(value),
            Operator::Matches => match RegexBuilder::new(&value).size_limit(MAX_REGEX_BYTES).build() {
                Ok(re) => Test::Matches(re),
                Err(source) => {
                    return Err(FilterError::Regex {
                        input: self.owned_input(),
                        pos: value_pos,
                        pattern: value,
                        source,
                    })
                }
            },
        };
        Ok(Selector { path, test })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_whitespace();
        let start = self.pos;
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(quote @ ('/' | '|')) => {
                // Scanned first so an unterminated quote is reported as such.
                self.quoted(quote)?;
                Err(FilterError::RegexQuote { input: self.owned_input(), pos: start, quote })
            }
            Some(c) if is_field_char(c) => {
                let len = self.rest().find(|c| !is_field_char(c)).unwrap_or(self.rest().len());
                self.pos += len;
                Ok(self.input[start..self.pos].to_owned())
            }
            _ => Err(FilterError::ExpectedField { input: self.owned_input(), pos: start }),
        }
    }

    fn operator(&mut self) -> Result<Operator, FilterError> {
        self.skip_whitespace();
        let start = self.pos;
        let len = self.rest().find(|c| !matches!(c, '=' | '!' | '~')).unwrap_or(self.rest().len());
        self.pos += len;
        match &self.input[start..self.pos] {
            "" => Err(FilterError::ExpectedOperator { input: self.owned_input(), pos: start }),
            "==" => Ok(Operator::Equal),
            "!=" => Ok(Operator::NotEqual),
            "~=" => Ok(Operator::Matches),
            op => Err(FilterError::UnsupportedOperator { input: self.owned_input(), pos: start, op: op.to_owned() }),
        }
    }

    /// Reads the value after `operator`; leading whitespace is already skipped.
    fn value(&mut self, operator: Operator) -> Result<String, FilterError> {
        let start = self.pos;
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(quote @ ('/' | '|')) => {
                let value = self.quoted(quote)?;
                if operator == Operator::Matches {
                    Ok(value)
                } else {
                    Err(FilterError::RegexQuote { input: self.owned_input(), pos: start, quote })
                }
            }
            None | Some(',' | '.' | '=' | '!' | '~') => {
                Err(FilterError::ExpectedValue { input: self.owned_input(), pos: start })
            }
            // containerd's scanner takes any first character here (whitespace is already
            // skipped) and only restricts the ones after it.
            Some(first) => {
                self.pos += first.len_utf8();
                let tail = VALUE_TAIL.find(self.rest()).map_or(0, |m| m.end());
                self.pos += tail;
                Ok(self.input[start..self.pos].to_owned())
            }
        }
    }

    /// Reads a string quoted with `quote`, whose opening quote is at the current position,
    /// and decodes its escapes.
    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        let start = self.pos;
        self.pos += quote.len_utf8();
        let mut bytes = Vec::new();
        loop {
            let at = self.pos;
            match self.bump() {
                None | Some('\n') => {
                    return Err(FilterError::UnterminatedQuote { input: self.owned_input(), pos: start })
                }
                Some(c) if c == quote => break,
                Some('\\') => {
                    if self.escape(quote, &mut bytes).is_none() {
                        return Err(FilterError::IllegalEscape { input: self.owned_input(), pos: at });
                    }
                }
                Some(c) => push_char(&mut bytes, c),
            }
        }
        String::from_utf8(bytes).map_err(|_| FilterError::NotUtf8 { input: self.owned_input(), pos: start })
    }

    /// Decodes the escape after a backslash into `bytes`; `None` when it is illegal.
    fn escape(&mut self, quote: char, bytes: &mut Vec<u8>) -> Option<()> {
        match self.bump()? {
            'a' => bytes.push(0x07),
            'b' => bytes.push(0x08),
            'f' => bytes.push(0x0c),
            'n' => bytes.push(b'\n'),
            'r' => bytes.push(b'\r'),
            't' => bytes.push(b'\t'),
            'v' => bytes.push(0x0b),
            '\\' => bytes.push(b'\\'),
            c if c == quote => push_char(bytes, c),
            c @ '0'..='7' => {
                let value = (c.to_digit(8)? << 6) | self.digits(2, 8)?;
                bytes.push(u8::try_from(value).ok()?);
            }
            'x' => bytes.push(u8::try_from(self.digits(2, 16)?).ok()?),
            // Go encodes a surrogate code point as U+FFFD rather than rejecting it.
            'u' => push_char(bytes, char::from_u32(self.digits(4, 16)?).unwrap_or(char::REPLACEMENT_CHARACTER)),
            'U' => {
                let value = self.digits(8, 16)?;
                if value > u32::from(char::MAX) {
                    return None;
                }
                push_char(bytes, char::from_u32(value).unwrap_or(char::REPLACEMENT_CHARACTER));
            }
            _ => return None,
        }
        Some(())
    }

    /// Reads exactly `count` digits in `radix`.
    fn digits(&mut self, count: usize, radix: u32) -> Option<u32> {
        let mut value = 0;
        for _ in 0..count {
            value = value * radix + self.bump()?.to_digit(radix)?;
        }
        Some(value)
    }

    fn skip_whitespace(&mut self) {
        let len = self.rest().find(|c: char| !c.is_whitespace()).unwrap_or(self.rest().len());
        self.pos += len;
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn owned_input(&self) -> String {
        self.input.to_owned()
    }
}

/// Characters of an unquoted field (containerd's `isFieldRune`).
fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn push_char(bytes: &mut Vec<u8>, c: char) {
    bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A snapshot as the snapshotter would describe it to a filter.
    struct Snap {
        name: &'static str,
        parent: &'static str,
        kind: &'static str,
        labels: BTreeMap<&'static str, &'static str>,
    }

    impl Snap {
        fn new(name: &'static str, parent: &'static str, kind: &'static str) -> Snap {
            Snap { name, parent, kind, labels: BTreeMap::new() }
        }

        fn label(mut self, key: &'static str, value: &'static str) -> Snap {
            self.labels.insert(key, value);
            self
        }

        /// The adaptor contract documented on [`Filter::matches`].
        fn field(&self, path: &[&str]) -> Option<String> {
            match path {
                ["name", ..] => Some(self.name.to_owned()),
                ["parent", ..] => Some(self.parent.to_owned()),
                ["kind", ..] => Some(self.kind.to_owned()),
                ["labels", key @ ..] => self.labels.get(key.join(".").as_str()).map(|v| (*v).to_owned()),
                _ => None,
            }
        }
    }

    fn parse(filters: &[&str]) -> Filter {
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        match Filter::parse_all(&filters) {
            Ok(filter) => filter,
            Err(err) => panic!("{filters:?} should parse: {err}"),
        }
    }

    fn parse_err(filter: &str) -> FilterError {
        match Filter::parse_all(&[filter.to_owned()]) {
            Ok(parsed) => panic!("{filter:?} should not parse, got {parsed:?}"),
            Err(err) => err,
        }
    }

    fn matches(filters: &[&str], snap: &Snap) -> bool {
        parse(filters).matches(&|path| snap.field(path))
    }

    /// The single value a one-selector filter compares against, as parsed.
    fn value_of(filter: &str) -> String {
        let parsed = parse(&[filter]);
        match &parsed.alternatives[0][0].test {
            Test::Equal(v) | Test::NotEqual(v) => v.clone(),
            Test::Matches(re) => re.as_str().to_owned(),
            Test::Present => panic!("{filter:?} has no value"),
        }
    }

    /// The field path of a one-selector filter, as parsed.
    fn path_of(filter: &str) -> Vec<String> {
        parse(&[filter]).alternatives[0][0].path.clone()
    }

    const REF: &str = "containerd.io/snapshot.ref";

    #[test]
    fn metadata_store_lookup_of_an_existing_root_snapshot() {
        let filter = r#"labels."containerd.io/snapshot.ref"==sha256:1f3c9a,parent=="""#;
        let root = Snap::new("7", "", "committed").label(REF, "sha256:1f3c9a");
        let child = Snap::new("8", "7", "committed").label(REF, "sha256:1f3c9a");
        let other = Snap::new("9", "", "committed").label(REF, "sha256:0000");
        let unlabelled = Snap::new("10", "", "committed");
        assert!(matches(&[filter], &root));
        assert!(!matches(&[filter], &child));
        assert!(!matches(&[filter], &other));
        assert!(!matches(&[filter], &unlabelled));
    }

    #[test]
    fn metadata_store_lookup_of_an_existing_child_snapshot() {
        let filter = r#"labels."containerd.io/snapshot.ref"==sha256:2b,parent=="default/7/sha256:1f""#;
        let child = Snap::new("8", "default/7/sha256:1f", "committed").label(REF, "sha256:2b");
        let root = Snap::new("9", "", "committed").label(REF, "sha256:2b");
        assert!(matches(&[filter], &child));
        assert!(!matches(&[filter], &root));
        assert_eq!(path_of(filter), ["labels", REF]);
    }

    /// The snapshots and filters of containerd's snapshotter test suite (`checkWalk`).
    #[test]
    fn containerd_walk_suite() {
        const ROOT: &str = "containerd.io/gc.root";
        let snaps = [
            Snap::new("a-np", "", "active").label(ROOT, "check-walk"),
            Snap::new("p", "", "committed").label(ROOT, "check-walk"),
            Snap::new("a", "p", "active").label(ROOT, "check-walk"),
            Snap::new("v", "p", "view").label(ROOT, "check-walk"),
            Snap::new("p-wl", "", "committed").label("l", "1").label(ROOT, "check-walk"),
            Snap::new("a-wl", "p-wl", "active").label("l", "2").label(ROOT, "check-walk"),
            Snap::new("v-wl", "p-wl", "view").label("l", "3").label(ROOT, "check-walk"),
            Snap::new("a-np-wl", "", "active").label("l", "2").label(ROOT, "check-walk"),
        ];
        let cases: &[(&[&str], &[&str])] = &[
            (
                &[r#"labels."containerd.io/gc.root"==check-walk"#],
                &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (&[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#], &["a-np", "a", "a-wl", "a-np-wl"]),
            (&[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#], &["v", "v-wl"]),
            (&[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#], &["p", "p-wl"]),
            (&["name==p", "name==a-np-wl"], &["p", "a-np-wl"]),
            (&["name==a-wl,labels.l"], &["a-wl"]),
            (&["parent==p"], &["a", "v"]),
            (&[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#], &["a", "v", "a-wl", "v-wl"]),
            (&["labels.l"], &["p-wl", "a-wl", "v-wl", "a-np-wl"]),
            (&["labels.l==2"], &["a-wl", "a-np-wl"]),
        ];
        for (filters, expected) in cases {
            let filter = parse(filters);
            let got: Vec<&str> =
                snaps.iter().filter(|snap| filter.matches(&|path| snap.field(path))).map(|snap| snap.name).collect();
            assert_eq!(&got, expected, "filters {filters:?}");
        }
    }

    #[test]
    fn unquoted_values_run_to_the_comma() {
        assert_eq!(value_of("name==sha256:abc"), "sha256:abc");
        assert_eq!(value_of("name==omg_asdf.asdf-qwer"), "omg_asdf.asdf-qwer");
        assert_eq!(value_of("name==a/b=c!d~e'f\"g"), "a/b=c!d~e'f\"g");
        assert_eq!(value_of("name==модель-7"), "модель-7");
        assert_eq!(value_of("name==1"), "1");
        assert_eq!(value_of("name==  spaced"), "spaced");
        let filter = parse(&["name==foo,kind==view"]);
        assert!(filter.matches(&|path| Snap::new("foo", "", "view").field(path)));
        assert!(!filter.matches(&|path| Snap::new("foo", "", "active").field(path)));
    }

    #[test]
    fn quoted_values_and_escapes() {
        assert_eq!(value_of(r#"name=="""#), "");
        assert_eq!(value_of(r#"name=="too complex, yo""#), "too complex, yo");
        assert_eq!(value_of(r#"name=="a\"b\\c""#), "a\"b\\c");
        assert_eq!(value_of(r#"name=="\a\b\f\n\r\t\v""#), "\x07\x08\x0c\n\r\t\x0b");
        assert_eq!(value_of(r#"name=="\x41\101\u00e9\U0001F600""#), "AAé😀");
        assert_eq!(value_of(r#"name=="\xc3\xa9\303\251""#), "éé", "byte escapes may spell out utf-8");
        assert_eq!(value_of(r#"name=="\ud800""#), "\u{fffd}", "a surrogate decodes as Go does");
        assert_eq!(value_of("name==\"tab\tand é\""), "tab\tand é");
        assert_eq!(value_of(r#"name!="x""#), "x");
        let snap = Snap::new("too complex, yo", "", "active");
        assert!(matches(&[r#"name=="too complex, yo""#], &snap));
    }

    #[test]
    fn quoted_fields_may_hold_dots_and_slashes() {
        assert_eq!(path_of(r#"labels."containerd.io/snapshot.ref""#), ["labels", REF]);
        assert_eq!(path_of(r#"labels."with \\ and \"".post"#), ["labels", "with \\ and \"", "post"]);
        assert_eq!(path_of(r#"labels."""#), ["labels", ""]);
        assert_eq!(path_of("labels.a.b"), ["labels", "a", "b"]);
        assert_eq!(path_of("labels. a"), ["labels", "a"]);
        assert_eq!(path_of("  _x.9"), ["_x", "9"]);
        let snap = Snap::new("n", "", "active").label("a.b", "1");
        assert!(matches(&["labels.a.b==1"], &snap));
        assert!(matches(&[r#"labels."a.b"==1"#], &snap));
        assert!(matches(&[r#"labels."a".b==1"#], &snap));
    }

    #[test]
    fn not_equal_compares_a_missing_field_as_empty() {
        let plain = Snap::new("n", "", "active");
        let labelled = Snap::new("n", "p", "active").label("l", "1");
        assert!(matches(&["labels.l!=1"], &plain));
        assert!(!matches(&[r#"labels.l!="""#], &plain));
        assert!(!matches(&["labels.l!=1"], &labelled));
        assert!(matches(&["labels.l!=2"], &labelled));
        assert!(matches(&["nosuchfield!=x"], &plain));
        assert!(!matches(&[r#"parent!="""#], &plain));
        assert!(matches(&[r#"parent!="""#], &labelled));
    }

    #[test]
    fn equal_needs_the_field_present() {
        let plain = Snap::new("n", "", "active");
        assert!(!matches(&[r#"labels.l=="""#], &plain));
        assert!(!matches(&[r#"nosuchfield=="""#], &plain));
        assert!(matches(&[r#"labels.l=="""#], &Snap::new("n", "", "active").label("l", "")));
        assert!(matches(&[r#"parent=="""#], &plain), "a root snapshot's parent is present and empty");
    }

    #[test]
    fn regex_values() {
        let snap = Snap::new("layer-12", "", "active").label("l", "a,b");
        assert!(matches(&["name~=^layer-[0-9]+$"], &snap));
        assert!(matches(&["name~=er-1"], &snap), "a regex searches the value");
        assert!(!matches(&["name~=^er"], &snap));
        assert!(matches(&["name~=/^layer-[0-9]{1,2}$/"], &snap));
        assert!(matches(&["name~=|^layer|"], &snap));
        assert!(matches(&[r#"labels.l~="a,b""#], &snap));
        assert!(matches(&["labels.l~=/^a,b$/,name~=layer"], &snap));
        assert_eq!(value_of(r"name~=/a\/b\\d/"), r"a/b\d");
        assert_eq!(value_of(r"name~=|a\|b|"), "a|b");
        assert!(matches(&["labels.missing~=^$"], &snap), "a missing field is matched as empty");
        assert!(!matches(&[r#"labels.missing~=".""#], &snap));
    }

    #[test]
    fn presence() {
        let root = Snap::new("n", "", "committed").label("empty", "");
        assert!(matches(&["name"], &root));
        assert!(matches(&["parent"], &root), "containerd reports parent present even when empty");
        assert!(matches(&["kind"], &root));
        assert!(matches(&["labels.empty"], &root));
        assert!(!matches(&["labels.missing"], &root));
        assert!(!matches(&["nosuchfield"], &root));
        assert!(matches(&["name,labels.empty"], &root));
        assert!(!matches(&["name,labels.missing"], &root));
    }

    #[test]
    fn any_alternative_matches() {
        let snap = Snap::new("b", "", "view");
        assert!(matches(&["name==a", "name==b"], &snap));
        assert!(matches(&["name==b", "name==a"], &snap));
        assert!(!matches(&["name==a", "name==c"], &snap));
        assert!(matches(&["name==a", "kind==view,parent==\"\""], &snap));
        assert!(!matches(&["name==a", "kind==view,parent==x"], &snap));
    }

    #[test]
    fn empty_filters_match_everything() {
        let snap = Snap::new("b", "", "view");
        assert!(matches(&[], &snap));
        assert!(matches(&[""], &snap));
        assert!(matches(&["name==a", ""], &snap));
    }

    #[test]
    fn the_field_reader_sees_each_path() {
        let filter = parse(&["labels.a.b==1,parent"]);
        let seen = std::cell::RefCell::new(Vec::new());
        filter.matches(&|path| {
            seen.borrow_mut().push(path.join("/"));
            Some("1".to_owned())
        });
        assert_eq!(seen.into_inner(), ["labels/a/b", "parent"]);
    }

    #[test]
    fn whitespace_before_fields_operators_and_values() {
        let snap = Snap::new("foo", "", "view");
        assert!(matches(&["name == foo"], &snap));
        assert!(matches(&[" name==foo, kind==view"], &snap));
        assert!(matches(&["name ==\t\"foo\""], &snap));
        assert!(matches(&["name, kind"], &snap));
        assert!(matches!(parse_err("name==foo "), FilterError::UnexpectedInput { pos: 9, .. }));
        assert!(matches!(parse_err("name==foo ,kind"), FilterError::UnexpectedInput { pos: 9, .. }));
        assert!(matches!(parse_err("name==foo bar"), FilterError::UnexpectedInput { pos: 9, .. }));
        assert!(matches!(parse_err("name ,kind"), FilterError::ExpectedOperator { pos: 5, .. }));
        assert!(matches!(parse_err("labels .x"), FilterError::ExpectedOperator { pos: 7, .. }));
        assert!(matches!(parse_err("   "), FilterError::ExpectedField { pos: 3, .. }));
    }

    #[test]
    fn unterminated_quotes() {
        let err = parse_err(r#"labels."containerd.io/snapshot.ref==x"#);
        assert!(matches!(err, FilterError::UnterminatedQuote { pos: 7, .. }));
        assert_eq!(
            err.to_string(),
            r#"filter "labels.\"containerd.io/snapshot.ref==x" at byte 7: quoted string is not terminated"#
        );
        assert!(matches!(parse_err(r#"name=="abc"#), FilterError::UnterminatedQuote { pos: 6, .. }));
        assert!(matches!(parse_err("name==\"a\nb\""), FilterError::UnterminatedQuote { pos: 6, .. }));
        assert!(matches!(parse_err("labels.key==/value"), FilterError::UnterminatedQuote { pos: 12, .. }));
        assert!(matches!(parse_err("labels.ns/key==value"), FilterError::ExpectedOperator { pos: 9, .. }));
        assert!(matches!(parse_err(r#"name=="abc\"#), FilterError::IllegalEscape { pos: 10, .. }));
    }

    #[test]
    fn missing_values() {
        let err = parse_err("name==");
        assert!(matches!(err, FilterError::ExpectedValue { pos: 6, .. }));
        assert_eq!(err.to_string(), r#"filter "name==" at byte 6: expected a value or a quoted value"#);
        assert!(matches!(parse_err("name==,kind"), FilterError::ExpectedValue { pos: 6, .. }));
        assert!(matches!(parse_err("image~=,id?=?fbaq"), FilterError::ExpectedValue { pos: 7, .. }));
        assert!(matches!(parse_err("name== "), FilterError::ExpectedValue { pos: 7, .. }));
        assert!(matches!(parse_err("name==.x"), FilterError::ExpectedValue { pos: 6, .. }));
    }

    #[test]
    fn trailing_and_empty_selectors() {
        let err = parse_err("name==foo,");
        assert!(matches!(err, FilterError::ExpectedField { pos: 10, .. }));
        assert_eq!(err.to_string(), r#"filter "name==foo," at byte 10: expected a field name or a quoted field"#);
        assert!(matches!(parse_err(",name"), FilterError::ExpectedField { pos: 0, .. }));
        assert!(matches!(parse_err("name,,kind"), FilterError::ExpectedField { pos: 5, .. }));
        assert!(matches!(parse_err("labels."), FilterError::ExpectedField { pos: 7, .. }));
        assert!(matches!(parse_err("labels..x"), FilterError::ExpectedField { pos: 7, .. }));
        assert!(matches!(parse_err("labels.?x"), FilterError::ExpectedField { pos: 7, .. }));
    }

    #[test]
    fn bad_operators() {
        let err = parse_err("name=foo");
        assert!(matches!(&err, FilterError::UnsupportedOperator { pos: 4, op, .. } if op == "="));
        assert_eq!(err.to_string(), r#"filter "name=foo" at byte 4: unsupported operator "=""#);
        assert!(matches!(parse_err("name===foo"), FilterError::UnsupportedOperator { pos: 4, .. }));
        assert!(matches!(parse_err("name=!foo"), FilterError::UnsupportedOperator { pos: 4, .. }));
        assert!(matches!(parse_err("name= =foo"), FilterError::UnsupportedOperator { pos: 4, .. }));
        assert!(matches!(parse_err("name<foo"), FilterError::ExpectedOperator { pos: 4, .. }));
        assert!(matches!(parse_err("name foo"), FilterError::ExpectedOperator { pos: 5, .. }));
        assert!(matches!(parse_err("labels.foo-bar"), FilterError::ExpectedOperator { pos: 10, .. }));
        let err = parse_err("name<foo");
        assert_eq!(err.to_string(), r#"filter "name<foo" at byte 4: expected an operator (`==`, `!=` or `~=`)"#);
    }

    #[test]
    fn regex_quotes_only_around_regex_values() {
        let err = parse_err("labels.|foo|==x");
        assert!(matches!(err, FilterError::RegexQuote { pos: 7, quote: '|', .. }));
        assert_eq!(
            err.to_string(),
            r#"filter "labels.|foo|==x" at byte 7: `|` quotes are only allowed around the value of `~=`"#
        );
        assert!(matches!(parse_err("name==/foo/"), FilterError::RegexQuote { pos: 6, quote: '/', .. }));
        assert!(matches!(parse_err("name!=|foo|"), FilterError::RegexQuote { pos: 6, quote: '|', .. }));
    }

    #[test]
    fn illegal_escapes() {
        for (filter, pos) in [
            (r#"name=="\q""#, 7),
            (r#"name=="\'""#, 7),
            (r#"name=="\/""#, 7),
            (r#"name=="\x4""#, 7),
            (r#"name=="\xg0""#, 7),
            (r#"name=="\12""#, 7),
            (r#"name=="\400""#, 7),
            (r#"name=="\u12""#, 7),
            (r#"name=="\U00110000""#, 7),
            (r"name~=/\d/", 7),
        ] {
            let err = parse_err(filter);
            assert!(matches!(err, FilterError::IllegalEscape { pos: p, .. } if p == pos), "{filter:?}: {err}");
        }
    }

    #[test]
    fn other_malformed_input() {
        assert!(matches!(parse_err(r#"name=="\xff""#), FilterError::NotUtf8 { pos: 6, .. }));
        assert!(matches!(parse_err("name==a\0b"), FilterError::Nul { pos: 7, .. }));
        assert!(matches!(parse_err(r#"name=="a"b"#), FilterError::UnexpectedInput { pos: 9, .. }));
        assert!(matches!(parse_err(r#"labels."a"b==c"#), FilterError::ExpectedOperator { pos: 10, .. }));
        assert!(matches!(parse_err("name==a\u{200b}b"), FilterError::UnexpectedInput { pos: 7, .. }));
        let err = parse_err("name~=[a-");
        assert!(matches!(&err, FilterError::Regex { pos: 6, pattern, .. } if pattern == "[a-"));
        assert_eq!(err.to_string(), r#"filter "name~=[a-" at byte 6: "[a-" is not a valid regular expression"#);
    }

    #[test]
    fn size_limits() {
        let at_limit = format!("name=={}", "v".repeat(MAX_FILTER_BYTES - 6));
        assert_eq!(at_limit.len(), MAX_FILTER_BYTES);
        assert_eq!(value_of(&at_limit).len(), MAX_FILTER_BYTES - 6);
        let over = format!("{at_limit}v");
        let err = parse_err(&over);
        assert!(matches!(err, FilterError::TooLong { len, .. } if len == MAX_FILTER_BYTES + 1), "{err}");
        let msg = err.to_string();
        assert!(msg.len() < 200 && msg.contains("16385 bytes") && msg.contains("limit of 16384"), "{msg}");
        let multibyte = "é".repeat(MAX_FILTER_BYTES);
        assert!(matches!(parse_err(&multibyte), FilterError::TooLong { .. }));

        let many = vec!["name==a".to_owned(); MAX_FILTERS + 1];
        let err = Filter::parse_all(&many).unwrap_err();
        assert_eq!(err.to_string(), "257 filters in one request, more than the limit of 256");
        assert!(Filter::parse_all(&many[..MAX_FILTERS]).is_ok());

        // Compiles within the regex crate's default limit, not within ours.
        let err = parse_err("name~=(a{200}){200}");
        assert!(matches!(err, FilterError::Regex { pos: 6, .. }), "{err}");
        assert!(Regex::new("(a{200}){200}").is_ok());
    }

    #[test]
    fn one_bad_string_fails_the_request() {
        let filters = ["name==a".to_owned(), "name==".to_owned()];
        assert!(matches!(Filter::parse_all(&filters), Err(FilterError::ExpectedValue { .. })));
    }

    /// Truncations and deletions of valid filters must parse or fail, never panic.
    #[test]
    fn mangled_filters_do_not_panic() {
        let seeds = [
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="d\u00e9f\x41\101""#,
            r"name~=/a\/b/,kind!=view,labels.a.b,labels.ü~=|x|",
            "name == модель , kind==😀",
        ];
        for seed in seeds {
            let boundaries: Vec<usize> = seed.char_indices().map(|(i, _)| i).chain([seed.len()]).collect();
            for pair in boundaries.windows(2) {
                let truncated = &seed[..pair[0]];
                let deleted = format!("{}{}", &seed[..pair[0]], &seed[pair[1]..]);
                for filter in [truncated.to_owned(), deleted] {
                    let _ = Filter::parse_all(&[filter]);
                }
            }
        }
    }
}
