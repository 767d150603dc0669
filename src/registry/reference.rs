//! Image references (`[registry/]repository[:tag][@digest]`), parsed by the grammar of
//! the distribution project's reference package, with Docker Hub's normalisation
//! (`docker.io`, `library/`) — the same answers as `oci-client`'s own parser, which
//! compiles one large regular expression on first use: about 40 ms of every `mount`
//! command's start on an idle machine, more than the rest of a cached mount together.

use oci_client::Reference;

/// Longest repository name the grammar allows.
const NAME_MAX: usize = 255;
/// Docker Hub's name in references, and its legacy alias.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";

/// Parses `s`; the error says what is wrong with it.
pub fn parse(s: &str) -> Result<Reference, &'static str> {
    if s.is_empty() {
        return Err("repository name must have at least one component");
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (s, None),
    };
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    if let Some(digest) = digest {
        check_digest(digest)?;
    }
    let (registry, repository) = split_domain(name)?;
    if repository.len() > NAME_MAX {
        return Err("repository name must not be more than 255 characters");
    }
    let tag = tag.map(str::to_owned).or_else(|| digest.is_none().then(|| "latest".to_owned()));
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => Reference::with_tag_and_digest(registry, repository, tag, digest.to_owned()),
        (Some(tag), None) => Reference::with_tag(registry, repository, tag),
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.to_owned()),
        (None, None) => unreachable!("a reference without a digest gets the default tag"),
    })
}

/// A tag: a word character, then up to 127 word characters, dots and dashes.
fn check_tag(tag: &str) -> Result<(), &'static str> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let first_ok = chars.next().is_some_and(word);
    if !first_ok || tag.len() > 128 || !chars.all(|c| word(c) || c == '.' || c == '-') {
        return Err("invalid reference format");
    }
    Ok(())
}

/// A digest of a supported algorithm, hex of the algorithm's length.
fn check_digest(digest: &str) -> Result<(), &'static str> {
    let Some((algorithm, hex)) = digest.split_once(':') else { return Err("invalid reference format") };
    let algorithm_ok = algorithm.split(['-', '_', '+', '.']).all(|part| {
        part.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) && part.chars().all(|c| c.is_ascii_alphanumeric())
    });
    if !algorithm_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("invalid reference format");
    }
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != want {
        return Err("invalid checksum digest length");
    }
    Ok(())
}

/// The registry and repository of a name (valid as `domain/path` or as a path): the
/// first component is the registry when it has a dot or a colon or is `localhost`;
/// otherwise the registry is Docker Hub, whose one-component names live under
/// `library/`.
fn split_domain(name: &str) -> Result<(String, String), &'static str> {
    let with_domain = name.split_once('/').is_some_and(|(domain, path)| is_domain(domain) && is_path(path));
    if !with_domain && !is_path(name) {
        return Err(if name.chars().any(|c| c.is_ascii_uppercase()) && is_path(&name.to_ascii_lowercase()) {
            "repository name must be lowercase"
        } else {
            "invalid reference format"
        });
    }
    // Decided by the first component's text alone, whichever way the grammar matched.
    let (mut registry, mut repository) = match name.split_once('/') {
        Some((domain, path)) if domain.contains(['.', ':']) || domain == "localhost" => {
            (domain.to_owned(), path.to_owned())
        }
        _ => (DOCKER_HUB.to_owned(), name.to_owned()),
    };
    if registry == DOCKER_HUB_LEGACY {
        registry = DOCKER_HUB.to_owned();
    }
    if registry == DOCKER_HUB && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    Ok((registry, repository))
}

/// `host[:port]`: dot-separated components of letters, digits and inner dashes.
fn is_domain(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    };
    let component = |c: &str| {
        let bytes = c.as_bytes();
        !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
    };
    host.split('.').all(component) && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Slash-separated path components.
fn is_path(s: &str) -> bool {
    s.split('/').all(is_path_component)
}

/// Lowercase letters and digits, with single separators between them: `.`, `_`, `__`,
/// or a run of dashes.
fn is_path_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(&bytes[0]) || !alnum(&bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(&bytes[i]) {
            i += 1;
            continue;
        }
        let run = bytes[i..].iter().take_while(|b| !alnum(b)).count();
        let sep = &s[i..i + run];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-')) {
            return false;
        }
        i += run;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ours and `oci-client`'s parser agree: both fail, or both give the same parts.
    fn agree(s: &str) {
        let theirs = s.parse::<Reference>();
        let ours = parse(s);
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => {
                assert_eq!(
                    (a.registry(), a.repository(), a.tag(), a.digest()),
                    (b.registry(), b.repository(), b.tag(), b.digest()),
                    "{s:?}"
                );
            }
            (Err(_), Err(_)) => {}
            _ => panic!("{s:?}: ours {ours:?}, oci-client's {theirs:?}"),
        }
    }

    #[test]
    fn the_same_answers_as_oci_client() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for s in [
            "busybox",
            "busybox:1.36",
            "library/busybox",
            "docker.io/busybox",
            "index.docker.io/busybox:latest",
            "127.0.0.1:5000/models/m:v1",
            "localhost/m",
            "localhost:5000/a/b/c:t",
            "test.com:tag",
            "test.com:5000",
            "foo_bar.com:8080",
            "lowercase:Uppercase",
            "Uppercase:tag",
            "ghcr.io/Org/model:v1",
            "registry.example.com/a__b/c-d/e.f/g---h:t_1.2-3",
            "a..b",
            "a___b",
            "a-",
            "-a",
            "a/",
            "/a",
            "",
            ":tag",
            "a:",
            "a:-x",
            "a@sha256:abc",
            "a@md5:0123456789abcdef0123456789abcdef",
            "-host.com/a",
            "host-.com/a",
            "host.com:/a",
            "host.com:5x/a",
            "[::1]:5000/a",
        ] {
            agree(s);
        }
        agree(&format!("127.0.0.1:5000/models/m@{digest}"));
        agree(&format!("127.0.0.1:5000/models/m:v1@{digest}"));
        agree(&format!("m@sha256:{}", "A".repeat(64)));
        agree(&format!("m@sha512:{}", "0".repeat(128)));
        agree(&format!("m@sha256:{}", "0".repeat(63)));
        agree(&format!("{}/m", "a".repeat(300)));
        agree(&format!("m:{}", "t".repeat(129)));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]
        #[test]
        fn agrees_with_oci_client_on_any_string(s in "[a-zA-Z0-9._:/@-]{0,24}") {
            agree(&s);
        }

        #[test]
        fn agrees_on_reference_shaped_strings(
            host in "(localhost|[a-z0-9-]{1,6}(\\.[a-zA-Z0-9-]{1,4}){0,2})(:[0-9]{1,5})?",
            path in "[a-z0-9._-]{1,8}(/[a-z0-9._-]{1,8}){0,2}",
            tag in "(:[a-zA-Z0-9_.-]{1,6})?",
        ) {
            agree(&format!("{host}/{path}{tag}"));
            agree(&format!("{path}{tag}"));
        }
    }
}
