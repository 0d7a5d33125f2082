//! Docker object names for a user: the one place a user id becomes a name.
//!
//! Invariants (pinned by the tests below):
//! - an id of only `[a-z0-9]`, at most 64 bytes, is used as it is;
//! - any other id is lowercased, every character outside `[a-z0-9]` becomes
//!   `-`, the result is cut to [`MAX_ESCAPED_BODY`] characters and gets a
//!   `-<20 hex of sha256(id)>` suffix;
//! - a raw body never contains `-` and an escaped body always does, so an
//!   escaped name can never equal a raw one, and two escaped names collide
//!   only if 80 bits of SHA-256 do;
//! - earlier builds gave escaped ids a 12-hex suffix; a user who already has
//!   names of that form keeps them ([`UserNames::resolve`]), so no container
//!   is renamed and no volume left behind by an upgrade;
//! - with a valid prefix (see [`validate_prefix`]) every name is a valid
//!   Docker container and volume name.
//!
//! Names identify; they never match. The controller finds a container by
//! exact name or by label, and checks the `user-id` label (the original
//! service's `name.includes(...)` made user `1` match `mosaic-user-10`).

use sha2::{Digest, Sha256};

/// Longest id used verbatim.
pub const MAX_RAW_ID: usize = 64;
/// Longest escaped body kept before the hash suffix.
pub const MAX_ESCAPED_BODY: usize = 40;
/// Hex digits of SHA-256 appended to an escaped id (80 bits).
pub const HASH_SUFFIX_HEX: usize = 20;
/// Hex digits of the suffix earlier builds appended (48 bits); still honoured.
pub const LEGACY_HASH_SUFFIX_HEX: usize = 12;

/// Suffix of the state volume's name.
const VOLUME_SUFFIX: &str = "-state";
/// Suffix of the replacement container while a recreate is under way.
const REPLACEMENT_SUFFIX: &str = "-next";

/// True when `user_id` is used in a name exactly as it is.
pub fn is_raw_id(user_id: &str) -> bool {
    !user_id.is_empty()
        && user_id.len() <= MAX_RAW_ID
        && user_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The part of a name that stands for the user: the id itself, or its escaped form.
pub fn name_body(user_id: &str) -> String {
    body_with_suffix(user_id, HASH_SUFFIX_HEX)
}

fn body_with_suffix(user_id: &str, suffix_hex: usize) -> String {
    if is_raw_id(user_id) {
        return user_id.to_owned();
    }
    let mut body: String = user_id
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(MAX_ESCAPED_BODY)
        .collect();
    let digest = Sha256::digest(user_id.as_bytes());
    body.push('-');
    body.push_str(&hex::encode(digest)[..suffix_hex]);
    body
}

/// The container name a user gets today: `<prefix><body>`.
pub fn container_name(prefix: &str, user_id: &str) -> String {
    UserNames::current(prefix, user_id).container
}

/// The state volume a user gets today: `<container name>-state`.
pub fn volume_name(prefix: &str, user_id: &str) -> String {
    UserNames::current(prefix, user_id).volume
}

/// The name a replacement for the container `container` takes while a
/// recreate is under way. Never a canonical name: raw bodies hold no `-` and
/// escaped ones end in hex digits.
pub fn replacement_name(container: &str) -> String {
    format!("{container}{REPLACEMENT_SUFFIX}")
}

/// True for the name a replacement container has while a recreate is under way.
pub fn is_replacement_name(container: &str) -> bool {
    container.ends_with(REPLACEMENT_SUFFIX)
}

/// Why a container name does not give back a user id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnnamedError {
    /// The name does not start with the prefix.
    #[error("{name:?} does not start with the name prefix {prefix:?}")]
    OtherPrefix {
        /// The name.
        name: String,
        /// The prefix.
        prefix: String,
    },
    /// An escaped name: lowercased and hashed, the id is lost.
    #[error("{0:?} is an escaped name: the user id cannot be recovered from it")]
    Escaped(String),
    /// A name clawfleet never gives: the id in it (if it is one) would get another name.
    #[error("{0:?} is not a name clawfleet gives (ids of a-z and 0-9 only are used as they are), so the container would not be taken over")]
    Foreign(String),
}

/// The user id whose container is called `container` under `prefix`: the
/// inverse of [`container_name`] where it has one (a raw id). An escaped
/// name does not give its id back.
pub fn user_id_of(prefix: &str, container: &str) -> Result<String, UnnamedError> {
    let Some(body) = container.strip_prefix(prefix) else {
        return Err(UnnamedError::OtherPrefix {
            name: container.to_owned(),
            prefix: prefix.to_owned(),
        });
    };
    if is_raw_id(body) {
        return Ok(body.to_owned());
    }
    let escaped = body.rsplit_once('-').is_some_and(|(_, hash)| {
        matches!(hash.len(), HASH_SUFFIX_HEX | LEGACY_HASH_SUFFIX_HEX)
            && hash
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    });
    if escaped {
        Err(UnnamedError::Escaped(container.to_owned()))
    } else {
        Err(UnnamedError::Foreign(container.to_owned()))
    }
}

/// A user's container and state volume names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserNames {
    /// `<prefix><body>`.
    pub container: String,
    /// `<container>-state`.
    pub volume: String,
}

impl UserNames {
    /// The names a user gets today.
    pub fn current(prefix: &str, user_id: &str) -> Self {
        Self::with_body(prefix, &name_body(user_id))
    }

    /// The names earlier builds gave an escaped id (12-hex suffix); `None`
    /// for a raw id, whose names never changed.
    pub fn legacy(prefix: &str, user_id: &str) -> Option<Self> {
        (!is_raw_id(user_id))
            .then(|| Self::with_body(prefix, &body_with_suffix(user_id, LEGACY_HASH_SUFFIX_HEX)))
    }

    /// The user's names given the container name its status row records:
    /// the legacy names when that is the legacy container name, else the
    /// current ones. Any other recorded name (someone else's, a typo) is
    /// not trusted.
    pub fn resolve(prefix: &str, user_id: &str, recorded: Option<&str>) -> Self {
        match Self::legacy(prefix, user_id) {
            Some(legacy) if recorded == Some(legacy.container.as_str()) => legacy,
            _ => Self::current(prefix, user_id),
        }
    }

    fn with_body(prefix: &str, body: &str) -> Self {
        let container = format!("{prefix}{body}");
        let volume = format!("{container}{VOLUME_SUFFIX}");
        Self { container, volume }
    }
}

/// Why a name prefix was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixError {
    /// The prefix is empty.
    #[error("name prefix must not be empty")]
    Empty,
    /// The prefix does not start with a letter or digit.
    #[error("name prefix {0:?} must start with a letter or digit")]
    BadStart(String),
    /// The prefix holds a character Docker refuses in names.
    #[error(
        "name prefix {prefix:?} holds {bad:?}; only letters, digits, '_', '.' and '-' are allowed"
    )]
    BadCharacter {
        /// The prefix as given.
        prefix: String,
        /// The first character refused.
        bad: char,
    },
    /// The prefix leaves no room for the user part within Docker's name length.
    #[error("name prefix {0:?} is longer than 100 characters")]
    TooLong(String),
}

/// Checks that `prefix` makes valid Docker names (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
pub fn validate_prefix(prefix: &str) -> Result<(), PrefixError> {
    let first = prefix.chars().next().ok_or(PrefixError::Empty)?;
    if !first.is_ascii_alphanumeric() {
        return Err(PrefixError::BadStart(prefix.to_owned()));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(PrefixError::BadCharacter {
            prefix: prefix.to_owned(),
            bad,
        });
    }
    if prefix.len() > 100 {
        return Err(PrefixError::TooLong(prefix.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_raw_name_gives_its_user_id_back_and_an_escaped_one_says_it_cannot() {
        let prefix = "mosaic-user-";
        for id in ["1", "alice", "a1b2"] {
            assert_eq!(
                user_id_of(prefix, &container_name(prefix, id)).as_deref(),
                Ok(id)
            );
        }
        for id in ["Alice B", "user@example.com"] {
            let name = container_name(prefix, id);
            assert_eq!(user_id_of(prefix, &name), Err(UnnamedError::Escaped(name)));
            let legacy = UserNames::legacy(prefix, id).unwrap().container;
            assert_eq!(
                user_id_of(prefix, &legacy),
                Err(UnnamedError::Escaped(legacy))
            );
        }
        assert!(matches!(
            user_id_of(prefix, "mosaic-user-Alice"),
            Err(UnnamedError::Foreign(_))
        ));
        assert!(matches!(
            user_id_of(prefix, "other-1"),
            Err(UnnamedError::OtherPrefix { .. })
        ));
        assert!(is_replacement_name(&replacement_name("mosaic-user-1")));
        assert!(!is_replacement_name("mosaic-user-1"));
    }

    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const PREFIX: &str = "mosaic-user-";

    fn is_valid_docker_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    }

    #[test]
    fn user_1_and_user_10_get_different_names_neither_a_substring_match() {
        // Regression: the original matched containers by `name.includes(...)`.
        let one = container_name(PREFIX, "1");
        let ten = container_name(PREFIX, "10");
        assert_eq!(one, "mosaic-user-1");
        assert_eq!(ten, "mosaic-user-10");
        assert_ne!(one, ten);
    }

    #[test]
    fn plain_lowercase_ids_are_used_verbatim() {
        assert_eq!(container_name(PREFIX, "alice42"), "mosaic-user-alice42");
        assert_eq!(volume_name(PREFIX, "alice42"), "mosaic-user-alice42-state");
    }

    #[test]
    fn email_ids_are_escaped_with_a_hash_suffix() {
        let name = container_name(PREFIX, "Alice@Example.com");
        let digest = hex::encode(Sha256::digest(b"Alice@Example.com"));
        assert_eq!(
            name,
            format!("mosaic-user-alice-example-com-{}", &digest[..20])
        );
        assert!(is_valid_docker_name(&name));
    }

    #[test]
    fn escaped_names_carry_80_bits_of_hash() {
        // Regression: the suffix was 12 hex digits (48 bits).
        let name = container_name(PREFIX, "Bob@Example.com");
        let suffix = name.rsplit('-').next().unwrap();
        assert_eq!(suffix.len(), 20);
    }

    #[test]
    fn a_user_recorded_under_the_12_hex_name_keeps_it_and_its_volume() {
        let id = "Alice@Example.com";
        let digest = hex::encode(Sha256::digest(id.as_bytes()));
        let old = format!("mosaic-user-alice-example-com-{}", &digest[..12]);
        let names = UserNames::resolve(PREFIX, id, Some(&old));
        assert_eq!(names.container, old);
        assert_eq!(names.volume, format!("{old}-state"));
    }

    #[test]
    fn a_user_with_no_recorded_name_gets_the_20_hex_name() {
        let id = "Alice@Example.com";
        let digest = hex::encode(Sha256::digest(id.as_bytes()));
        let new = format!("mosaic-user-alice-example-com-{}", &digest[..20]);
        for recorded in [None, Some(new.as_str()), Some("mosaic-user-someone-else")] {
            let names = UserNames::resolve(PREFIX, id, recorded);
            assert_eq!(names.container, new, "{recorded:?}");
            assert_eq!(names.volume, format!("{new}-state"));
        }
        assert_eq!(UserNames::current(PREFIX, id).container, new);
    }

    #[test]
    fn raw_ids_have_no_legacy_names() {
        assert_eq!(UserNames::legacy(PREFIX, "alice"), None);
        assert_eq!(
            UserNames::resolve(PREFIX, "alice", Some("mosaic-user-alice")),
            UserNames::current(PREFIX, "alice")
        );
    }

    #[test]
    fn ids_differing_only_in_punctuation_or_case_never_collide() {
        let ids = ["a-b", "a_b", "A-B", "ab", "a.b", "A_B", "a b"];
        let names: HashSet<_> = ids.iter().map(|id| container_name(PREFIX, id)).collect();
        assert_eq!(names.len(), ids.len(), "{names:?}");
        assert_eq!(container_name(PREFIX, "ab"), "mosaic-user-ab");
    }

    #[test]
    fn a_128_byte_id_is_cut_short_and_stays_valid() {
        let id = "X".repeat(128);
        let name = container_name(PREFIX, &id);
        assert_eq!(
            name.len(),
            PREFIX.len() + MAX_ESCAPED_BODY + 1 + HASH_SUFFIX_HEX
        );
        assert!(is_valid_docker_name(&name));
        // Two long ids sharing their first 40 characters still differ.
        let other = format!("{}Y", "X".repeat(127));
        assert_ne!(name, container_name(PREFIX, &other));
    }

    #[test]
    fn a_65_byte_lowercase_id_is_escaped_not_raw() {
        let id = "a".repeat(65);
        assert!(!is_raw_id(&id));
        assert!(container_name(PREFIX, &id).contains('-'));
        assert!(is_raw_id(&"a".repeat(64)));
    }

    #[test]
    fn non_ascii_ids_become_valid_distinct_names() {
        let ids = ["josé", "jose", "Jösé", "用户", "用戶", "🦀", "\u{0}"];
        let names: HashSet<_> = ids.iter().map(|id| container_name(PREFIX, id)).collect();
        assert_eq!(names.len(), ids.len());
        for name in &names {
            assert!(is_valid_docker_name(name), "{name}");
        }
        assert!(container_name(PREFIX, "用户").starts_with("mosaic-user---"));
    }

    #[test]
    fn prefixes_that_would_make_invalid_names_are_refused() {
        assert_eq!(validate_prefix(""), Err(PrefixError::Empty));
        assert!(matches!(
            validate_prefix("-x"),
            Err(PrefixError::BadStart(_))
        ));
        assert!(matches!(
            validate_prefix("a/b"),
            Err(PrefixError::BadCharacter { bad: '/', .. })
        ));
        assert!(validate_prefix(PREFIX).is_ok());
    }

    proptest! {
        #[test]
        fn every_name_is_a_valid_docker_name(id in any::<String>()) {
            prop_assert!(is_valid_docker_name(&container_name(PREFIX, &id)));
            prop_assert!(is_valid_docker_name(&volume_name(PREFIX, &id)));
        }

        #[test]
        fn distinct_ids_get_distinct_names(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b);
            prop_assert_ne!(name_body(&a), name_body(&b));
        }

        #[test]
        fn escaped_names_never_equal_raw_ones(a in "[a-z0-9]{1,64}", b in any::<String>()) {
            prop_assume!(!is_raw_id(&b));
            prop_assert_ne!(name_body(&a), name_body(&b));
        }

        #[test]
        fn a_replacement_name_is_never_anyones_container_name(a in any::<String>(), b in any::<String>()) {
            let next = replacement_name(&container_name(PREFIX, &a));
            prop_assert!(next.ends_with("-next"));
            prop_assert_ne!(next, container_name(PREFIX, &b));
        }
    }
}
