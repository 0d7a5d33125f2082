//! Validation of Docker image references (`[registry[:port]/]path[:tag][@digest]`),
//! following the grammar of the distribution project's `reference` package,
//! and glob patterns over them for the allow-list.

use std::fmt;

use crate::quote::quote_short;

/// Longest reference name Docker accepts (registry and path, without tag or digest).
const MAX_NAME_LEN: usize = 255;
/// Longest tag Docker accepts.
const MAX_TAG_LEN: usize = 128;

/// A syntactically valid image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef(String);

impl ImageRef {
    /// Parses and validates `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        validate(text)?;
        Ok(Self(text.to_owned()))
    }

    /// The reference as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The repository: the reference without its tag and digest
    /// (`registry:5000/team/agent` of `registry:5000/team/agent:1@sha256:…`).
    pub fn repository(&self) -> &str {
        let name = self.0.split('@').next().unwrap_or(&self.0);
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        match name[last_slash..].find(':') {
            Some(i) => &name[..last_slash + i],
            None => name,
        }
    }

    /// True when the reference names neither a tag nor a digest (Docker then means `:latest`).
    pub fn is_untagged(&self) -> bool {
        let last = self.0.rsplit('/').next().unwrap_or(&self.0);
        !last.contains(':') && !self.0.contains('@')
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn validate(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("image reference is empty".into());
    }
    if let Some(c) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "image reference holds whitespace or a control character ({c:?})"
        ));
    }
    let (rest, digest) = match text.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (text, None),
    };
    if let Some(digest) = digest {
        validate_digest(digest)?;
    }
    // A ':' after the last '/' starts the tag; one before it is a registry port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].find(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        validate_tag(tag)?;
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "image name is {} characters, the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 && looks_like_domain(components[0]) {
        validate_domain(components.remove(0))?;
    }
    for component in components {
        validate_path_component(component)?;
    }
    Ok(())
}

fn looks_like_domain(first: &str) -> bool {
    first.contains('.')
        || first.contains(':')
        || first == "localhost"
        || first.chars().any(|c| c.is_ascii_uppercase())
}

fn validate_domain(domain: &str) -> Result<(), String> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "registry port {} is not a number",
                quote_short(port)
            ));
        }
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "registry host {} is not a valid host name",
                quote_short(host)
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn validate_path_component(component: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "image path component {} is invalid: use lowercase letters, digits and single '.', '_', '__' or '-' separators",
            quote_short(component)
        )
    };
    let bytes = component.as_bytes();
    if bytes.is_empty() {
        return Err("image reference has an empty path component".into());
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let valid = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !valid {
            return Err(bad());
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`
fn validate_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let first_ok = chars.next().is_some_and(word);
    if !first_ok || !chars.all(|c| word(c) || c == '.' || c == '-') || tag.len() > MAX_TAG_LEN {
        return Err(format!(
            "image tag {} is invalid: 1 to {MAX_TAG_LEN} of letters, digits, '_', '.', '-', not starting with '.' or '-'",
            quote_short(tag)
        ));
    }
    Ok(())
}

/// `algorithm:hex` with at least 32 hex digits.
fn validate_digest(digest: &str) -> Result<(), String> {
    let ok = digest.split_once(':').is_some_and(|(algo, hex)| {
        !algo.is_empty()
            && algo
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
            && hex.len() >= 32
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "image digest {} is invalid (expected e.g. sha256:<64 hex>)",
            quote_short(digest)
        ))
    }
}

/// A glob over image references for the allow-list: `*` matches any run of
/// characters (including `/` and `:`), everything else matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagePattern(String);

impl ImagePattern {
    /// A pattern; any text is accepted.
    pub fn new(pattern: &str) -> Self {
        Self(pattern.trim().to_owned())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `image` matches the whole pattern.
    pub fn matches(&self, image: &str) -> bool {
        glob_match(self.0.as_bytes(), image.as_bytes())
    }
}

/// The images rows may ask for (`--allowed-images`): one or more patterns;
/// the pattern `*` alone allows any image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageAllowList(Vec<ImagePattern>);

impl ImageAllowList {
    /// Parses comma-separated patterns. An empty list is refused: it used to
    /// mean "any image", which must now be asked for explicitly with `*`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for pattern in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some(c) = pattern
                .chars()
                .find(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!(
                    "image pattern {} holds whitespace or a control character ({c:?}); separate patterns with commas",
                    quote_short(pattern)
                ));
            }
            patterns.push(ImagePattern::new(pattern));
        }
        if patterns.is_empty() {
            return Err(format!(
                "{} names no image pattern; write e.g. alpine/openclaw:*, or * to allow any image",
                quote_short(text)
            ));
        }
        Ok(Self(patterns))
    }

    /// Any tag or digest of `image`'s repository: `repo`, `repo:*` and `repo@*`
    /// (the default list, derived from the default image).
    pub fn of_repository(image: &ImageRef) -> Self {
        let repository = image.repository();
        Self(
            [
                repository.to_owned(),
                format!("{repository}:*"),
                format!("{repository}@*"),
            ]
            .iter()
            .map(|p| ImagePattern::new(p))
            .collect(),
        )
    }

    /// Every image: the list `*`.
    pub fn any() -> Self {
        Self(vec![ImagePattern::new("*")])
    }

    /// True when the list holds the pattern `*`, which allows every image.
    pub fn allows_any(&self) -> bool {
        self.0.iter().any(|p| p.as_str() == "*")
    }

    /// True when `image` matches one of the patterns.
    pub fn allows(&self, image: &ImageRef) -> bool {
        self.0.iter().any(|p| p.matches(image.as_str()))
    }

    /// The patterns, in the order given.
    pub fn patterns(&self) -> &[ImagePattern] {
        &self.0
    }
}

impl fmt::Display for ImageAllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pattern) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(pattern.as_str())?;
        }
        Ok(())
    }
}

fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with single-star backtracking: O(p·t) worst case.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn common_references_are_valid() {
        for image in [
            "alpine/openclaw:latest",
            "alpine",
            "clawfleet-agent-stub:dev",
            "registry.example.com:5000/team/agent:1.2.3",
            "localhost/agent",
            "ghcr.io/org/agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a__b/c-d---e/f.g:v1_2",
        ] {
            assert!(ImageRef::parse(image).is_ok(), "{image}");
        }
    }

    #[test]
    fn bad_references_are_refused_with_a_reason() {
        for (image, why) in [
            ("", "empty"),
            ("../etc/passwd", "not a valid host name"),
            ("a/../b", "path component"),
            ("Alpine/OpenClaw", "path component"),
            ("UPPER", "path component"),
            ("alpine:", "tag"),
            ("alpine:-x", "tag"),
            ("alpine/", "empty path component"),
            ("a b", "whitespace"),
            ("a\0b", "control"),
            ("alpine@sha256:xyz", "digest"),
            ("host:port/x", "port"),
        ] {
            let err = ImageRef::parse(image).unwrap_err();
            assert!(err.contains(why), "{image:?}: {err}");
        }
        let long = "a".repeat(500);
        assert!(ImageRef::parse(&long).unwrap_err().contains("limit is 255"));
    }

    #[test]
    fn untagged_references_are_recognised() {
        assert!(ImageRef::parse("alpine").unwrap().is_untagged());
        assert!(ImageRef::parse("host:5000/alpine").unwrap().is_untagged());
        assert!(!ImageRef::parse("alpine:3").unwrap().is_untagged());
    }

    #[test]
    fn patterns_match_whole_references() {
        let p = ImagePattern::new("alpine/openclaw:*");
        assert!(p.matches("alpine/openclaw:latest"));
        assert!(!p.matches("alpine/openclaw-evil:latest"));
        assert!(!p.matches("evil/alpine/openclaw:latest"));
        assert!(ImagePattern::new("registry.example.com/*").matches("registry.example.com/a/b:c"));
        assert!(ImagePattern::new("exact:tag").matches("exact:tag"));
        assert!(!ImagePattern::new("exact:tag").matches("exact:tag2"));
        assert!(ImagePattern::new("*").matches(""));
    }

    #[test]
    fn the_repository_drops_tag_and_digest_but_keeps_a_registry_port() {
        for (image, repository) in [
            ("alpine/openclaw:latest", "alpine/openclaw"),
            ("alpine", "alpine"),
            (
                "registry.example.com:5000/team/agent:1.2",
                "registry.example.com:5000/team/agent",
            ),
            ("localhost:5000/agent", "localhost:5000/agent"),
            (
                "ghcr.io/org/agent:1@sha256:0123456789abcdef0123456789abcdef",
                "ghcr.io/org/agent",
            ),
        ] {
            assert_eq!(ImageRef::parse(image).unwrap().repository(), repository);
        }
    }

    #[test]
    fn the_default_allow_list_is_any_tag_or_digest_of_the_default_repository() {
        let list = ImageAllowList::of_repository(&ImageRef::parse("myreg:5000/agent:1").unwrap());
        assert_eq!(
            list.to_string(),
            "myreg:5000/agent, myreg:5000/agent:*, myreg:5000/agent@*"
        );
        for allowed in [
            "myreg:5000/agent",
            "myreg:5000/agent:2",
            "myreg:5000/agent@sha256:0123456789abcdef0123456789abcdef",
        ] {
            assert!(list.allows(&ImageRef::parse(allowed).unwrap()), "{allowed}");
        }
        for refused in [
            "myreg:5000/agent-evil:1",
            "myreg:5000/agent/evil:1",
            "10.0.0.1:5000/agent:1",
            "agent:1",
        ] {
            assert!(
                !list.allows(&ImageRef::parse(refused).unwrap()),
                "{refused}"
            );
        }
        assert!(!list.allows_any());
    }

    #[test]
    fn an_allow_list_is_never_empty_and_star_alone_allows_any_image() {
        for empty in ["", " ", ",", " , ,"] {
            let err = ImageAllowList::parse(empty).unwrap_err();
            assert!(err.contains("no image pattern"), "{empty:?}: {err}");
        }
        assert!(ImageAllowList::parse("a:* b:*")
            .unwrap_err()
            .contains("whitespace"));
        let any = ImageAllowList::parse("*").unwrap();
        assert!(any.allows_any());
        assert!(any.allows(&ImageRef::parse("10.0.0.1:5000/x:1").unwrap()));
        let list = ImageAllowList::parse("alpine/openclaw:*, clawfleet-agent-stub:*").unwrap();
        assert_eq!(list.patterns().len(), 2);
        assert!(list.allows(&ImageRef::parse("clawfleet-agent-stub:dev").unwrap()));
        assert!(!list.allows(&ImageRef::parse("evil:latest").unwrap()));
    }

    proptest! {
        #[test]
        fn parsing_any_text_never_panics(text in any::<String>()) {
            let _ = ImageRef::parse(&text);
        }

        #[test]
        fn a_literal_pattern_matches_only_itself(a in "[a-z:/.]{0,12}", b in "[a-z:/.]{0,12}") {
            prop_assert_eq!(ImagePattern::new(&a).matches(&b), a.trim() == b);
        }
    }
}
