//! Gateway tokens and the key ring that seals them.
//!
//! A token is 32 random bytes (hex-encoded, as the container receives it),
//! generated once per user. At rest it is sealed with AES-256-GCM under a
//! fresh 96-bit nonce and stored as `v1:<key id>:<base64(nonce || ciphertext)>`.
//! The key ring holds one or more keys: the first seals, every key opens, so
//! keys can be rotated by putting a new key first and re-sealing at leisure.
//!
//! Invariants: no secret type prints its secret through `Debug` or `Display`;
//! no error message carries key material or a plaintext token.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::TryRngCore;
use zeroize::Zeroizing;

/// Version tag of the sealed format.
const SEALED_VERSION: &str = "v1";
/// Bytes of a generated gateway token.
const TOKEN_BYTES: usize = 32;
/// Bytes of an AES-256 key.
const KEY_BYTES: usize = 32;
/// Bytes of an AES-GCM nonce.
const NONCE_BYTES: usize = 12;
/// Name of the key file created in the data folder when no key is configured.
pub const KEY_FILE_NAME: &str = "encryption.keys";

/// What went wrong with a key, a key ring or a sealed token.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// An entry of the key list could not be parsed; the key itself is never shown.
    #[error(
        "encryption key entry {position} is malformed: {reason} (expected `id:base64-of-32-bytes`)"
    )]
    MalformedKey {
        /// 1-based position of the entry in the list.
        position: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Two keys share an id.
    #[error("encryption key id {0:?} appears twice")]
    DuplicateKeyId(String),
    /// The key list is empty.
    #[error(
        "no encryption key configured: set CLAWFLEET_ENCRYPTION_KEYS (see `clawfleet keygen`)"
    )]
    NoKeys,
    /// The sealed text does not have the `v1:<key id>:<base64>` shape.
    #[error("sealed token is malformed: {0}")]
    MalformedSealed(&'static str),
    /// The sealed text names a format version this build does not know.
    #[error("sealed token has unsupported version {0:?} (this build reads v1)")]
    UnsupportedVersion(String),
    /// The sealed text names a key the ring does not hold.
    #[error("sealed token was sealed with key {key_id:?}, which is not configured (configured: {configured})")]
    UnknownKeyId {
        /// The key id in the sealed text.
        key_id: String,
        /// The ids the ring holds.
        configured: String,
    },
    /// Authentication failed: the text was altered, or the key under that id is not the one that sealed it.
    #[error("sealed token failed authentication with key {0:?}: it was altered, or that key id now holds a different key")]
    Tampered(String),
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>, SecretsError> {
    let mut bytes = Zeroizing::new([0u8; N]);
    rand::rngs::OsRng
        .try_fill_bytes(bytes.as_mut())
        .map_err(|e| SecretsError::Random(e.to_string()))?;
    Ok(bytes)
}

/// A plaintext gateway token. Its `Debug` and `Display` are redacted; read it
/// with [`GatewayToken::expose`] only where it must leave the process (the
/// container's environment, an API answer to its owner).
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayToken(Zeroizing<String>);

impl GatewayToken {
    /// A fresh token of 32 random bytes, hex-encoded.
    pub fn generate() -> Result<Self, SecretsError> {
        let bytes = random_bytes::<TOKEN_BYTES>()?;
        Ok(Self(Zeroizing::new(hex::encode(bytes.as_ref()))))
    }

    /// Wraps an existing token (e.g. one opened from storage).
    pub fn from_plaintext(token: String) -> Self {
        Self(Zeroizing::new(token))
    }

    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for GatewayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayToken(<redacted>)")
    }
}

impl fmt::Display for GatewayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One AES-256-GCM key with its id.
#[derive(Clone)]
pub struct EncryptionKey {
    id: String,
    cipher: Aes256Gcm,
    material: Zeroizing<[u8; KEY_BYTES]>,
}

impl EncryptionKey {
    /// A new random key with the given id.
    pub fn generate(id: &str) -> Result<Self, SecretsError> {
        validate_key_id(id).map_err(|reason| SecretsError::MalformedKey {
            position: 1,
            reason,
        })?;
        Ok(Self::from_material(
            id.to_owned(),
            random_bytes::<KEY_BYTES>()?,
        ))
    }

    fn from_material(id: String, material: Zeroizing<[u8; KEY_BYTES]>) -> Self {
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(material.as_ref()));
        Self {
            id,
            cipher,
            material,
        }
    }

    /// The key's id, as it appears in sealed tokens.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The `id:base64key` form used by `CLAWFLEET_ENCRYPTION_KEYS` and key files.
    /// This is key material: print it only where the operator asked for it.
    pub fn to_config_entry(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{}:{}",
            self.id,
            BASE64.encode(self.material.as_ref())
        ))
    }

    /// The associated data builds before DESIGN.md's plain format sealed
    /// with; their tokens still open.
    fn legacy_aad(&self) -> Vec<u8> {
        format!("clawfleet-gateway-token:{SEALED_VERSION}:{}", self.id).into_bytes()
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("id", &self.id)
            .field("material", &"<redacted>")
            .finish()
    }
}

fn validate_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 32 {
        return Err("key id must be 1 to 32 characters".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err("key id may hold only letters, digits, '_', '-' and '.'".into());
    }
    Ok(())
}

/// The configured keys: the first seals, all of them open.
#[derive(Clone, Debug)]
pub struct KeyRing {
    keys: Vec<EncryptionKey>,
}

impl KeyRing {
    /// A ring of the given keys, the first sealing.
    pub fn new(keys: Vec<EncryptionKey>) -> Result<Self, SecretsError> {
        if keys.is_empty() {
            return Err(SecretsError::NoKeys);
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.id == key.id) {
                return Err(SecretsError::DuplicateKeyId(key.id.clone()));
            }
        }
        Ok(Self { keys })
    }

    /// Parses `id:base64key,id:base64key,...` (commas or newlines between
    /// entries; blank lines and `#` comments ignored).
    pub fn parse(list: &str) -> Result<Self, SecretsError> {
        let mut keys = Vec::new();
        let entries = list
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .flat_map(|line| line.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for (index, entry) in entries.enumerate() {
            let position = index + 1;
            let malformed = |reason: &str| SecretsError::MalformedKey {
                position,
                reason: reason.to_owned(),
            };
            let (id, encoded) = entry
                .split_once(':')
                .ok_or_else(|| malformed("missing ':' between id and key"))?;
            validate_key_id(id).map_err(|reason| malformed(&reason))?;
            let decoded = Zeroizing::new(
                BASE64
                    .decode(encoded.trim())
                    .map_err(|_| malformed("key is not valid base64"))?,
            );
            let material: [u8; KEY_BYTES] = decoded.as_slice().try_into().map_err(|_| {
                malformed(&format!(
                    "key is {} bytes, AES-256 needs {KEY_BYTES}",
                    decoded.len()
                ))
            })?;
            keys.push(EncryptionKey::from_material(
                id.to_owned(),
                Zeroizing::new(material),
            ));
        }
        Self::new(keys)
    }

    /// The key that seals.
    pub fn sealing_key(&self) -> &EncryptionKey {
        &self.keys[0]
    }

    /// Ids of all keys, sealing key first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Seals `token` with the first key under a fresh random nonce.
    pub fn seal(&self, token: &GatewayToken) -> Result<String, SecretsError> {
        let key = self.sealing_key();
        let nonce = random_bytes::<NONCE_BYTES>()?;
        // No associated data: any AES-256-GCM implementation holding the key
        // opens it, as DESIGN.md describes the format.
        let ciphertext = key
            .cipher
            .encrypt(Nonce::from_slice(nonce.as_ref()), token.expose().as_bytes())
            // Encryption fails only for plaintexts beyond GCM's limit (64 GiB).
            .map_err(|_| SecretsError::MalformedSealed("token too long to seal"))?;
        let mut blob = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        blob.extend_from_slice(nonce.as_ref());
        blob.extend_from_slice(&ciphertext);
        Ok(format!(
            "{SEALED_VERSION}:{}:{}",
            key.id,
            BASE64.encode(blob)
        ))
    }

    /// Opens a sealed token with whichever configured key sealed it.
    pub fn open(&self, sealed: &str) -> Result<GatewayToken, SecretsError> {
        let (version, rest) = sealed.split_once(':').ok_or(SecretsError::MalformedSealed(
            "expected v1:<key id>:<base64>",
        ))?;
        if version != SEALED_VERSION {
            return Err(SecretsError::UnsupportedVersion(truncate(version, 16)));
        }
        let (key_id, encoded) = rest.split_once(':').ok_or(SecretsError::MalformedSealed(
            "expected v1:<key id>:<base64>",
        ))?;
        let key = self.keys.iter().find(|k| k.id == key_id).ok_or_else(|| {
            SecretsError::UnknownKeyId {
                key_id: truncate(key_id, 32),
                configured: self.key_ids().join(", "),
            }
        })?;
        let blob = BASE64
            .decode(encoded)
            .map_err(|_| SecretsError::MalformedSealed("payload is not valid base64"))?;
        if blob.len() < NONCE_BYTES + 16 {
            return Err(SecretsError::MalformedSealed(
                "payload shorter than a nonce and a tag",
            ));
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_BYTES);
        let nonce = Nonce::from_slice(nonce);
        let plaintext = Zeroizing::new(
            key.cipher
                .decrypt(nonce, ciphertext)
                .or_else(|_| {
                    let aad = key.legacy_aad();
                    key.cipher.decrypt(
                        nonce,
                        Payload {
                            msg: ciphertext,
                            aad: &aad,
                        },
                    )
                })
                .map_err(|_| SecretsError::Tampered(key.id.clone()))?,
        );
        let token = String::from_utf8(plaintext.to_vec())
            .map_err(|_| SecretsError::MalformedSealed("plaintext is not UTF-8"))?;
        Ok(GatewayToken::from_plaintext(token))
    }

    /// True when `sealed` was sealed with a key other than the sealing key
    /// (so it should be re-sealed after a rotation).
    pub fn needs_reseal(&self, sealed: &str) -> bool {
        let prefix = format!("{SEALED_VERSION}:{}:", self.sealing_key().id);
        !sealed.starts_with(&prefix)
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Where the key ring came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The `CLAWFLEET_ENCRYPTION_KEYS` environment variable.
    Environment,
    /// An existing key file.
    File(PathBuf),
    /// A key file created just now.
    Created(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Environment => f.write_str("CLAWFLEET_ENCRYPTION_KEYS"),
            Self::File(path) => write!(f, "key file {}", path.display()),
            Self::Created(path) => write!(f, "new key file {}", path.display()),
        }
    }
}

/// Loads the key ring from the environment value if given, else from the key
/// file in `data_dir`; with `create` set and neither present, creates a key
/// file (mode 0600) holding one new key.
pub fn load_key_ring(
    env_value: Option<&str>,
    data_dir: &Path,
    create: bool,
) -> Result<(KeyRing, KeySource), SecretsError> {
    if let Some(list) = env_value.filter(|v| !v.trim().is_empty()) {
        return Ok((KeyRing::parse(list)?, KeySource::Environment));
    }
    let path = data_dir.join(KEY_FILE_NAME);
    let io_err = |source| SecretsError::KeyFile {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => return Ok((KeyRing::parse(&text)?, KeySource::File(path))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SecretsError::NoKeys),
        Err(e) => return Err(io_err(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(io_err)?;
    let key = EncryptionKey::generate(&default_key_id())?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err)?;
    let mut contents = Zeroizing::new(String::from(
        "# clawfleet encryption keys: id:base64key, first seals. Keep this file secret and backed up.\n",
    ));
    contents.push_str(&key.to_config_entry());
    contents.push('\n');
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    Ok((KeyRing::new(vec![key])?, KeySource::Created(path)))
}

/// True when a key file may be read by users other than its owner.
pub fn key_file_is_shared(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o077 != 0)
        .unwrap_or(false)
}

/// A key id derived from today's date, e.g. `k20261129`.
pub fn default_key_id() -> String {
    format!("k{}", chrono::Utc::now().format("%Y%m%d"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring(ids: &[&str]) -> KeyRing {
        KeyRing::new(
            ids.iter()
                .map(|id| EncryptionKey::generate(id).unwrap())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn sealed_token_round_trips_and_has_the_v1_shape() {
        let ring = ring(&["k1"]);
        let token = GatewayToken::generate().unwrap();
        assert_eq!(token.expose().len(), 64);
        let sealed = ring.seal(&token).unwrap();
        assert!(sealed.starts_with("v1:k1:"), "{sealed}");
        assert!(!sealed.contains(token.expose()));
        assert_eq!(ring.open(&sealed).unwrap(), token);
    }

    #[test]
    fn sealing_twice_uses_a_fresh_nonce() {
        let ring = ring(&["k1"]);
        let token = GatewayToken::generate().unwrap();
        assert_ne!(ring.seal(&token).unwrap(), ring.seal(&token).unwrap());
    }

    #[test]
    fn any_flipped_byte_of_a_sealed_token_is_detected() {
        let ring = ring(&["k1"]);
        let sealed = ring.seal(&GatewayToken::generate().unwrap()).unwrap();
        let blob = BASE64
            .decode(sealed.strip_prefix("v1:k1:").unwrap())
            .unwrap();
        for i in 0..blob.len() {
            let mut altered = blob.clone();
            altered[i] ^= 0x01;
            let text = format!("v1:k1:{}", BASE64.encode(&altered));
            assert!(
                matches!(ring.open(&text), Err(SecretsError::Tampered(_))),
                "byte {i}"
            );
        }
    }

    #[test]
    fn a_sealed_token_opens_with_plain_aes_256_gcm_and_the_key_alone() {
        // What another service does with DESIGN.md's description: split the
        // nonce off, decrypt with no associated data.
        let ring = ring(&["k1"]);
        let token = GatewayToken::generate().unwrap();
        let sealed = ring.seal(&token).unwrap();
        let blob = BASE64
            .decode(sealed.strip_prefix("v1:k1:").unwrap())
            .unwrap();
        let (nonce, ciphertext) = blob.split_at(12);
        let key = ring.sealing_key();
        let plain = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.material.as_ref()))
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .expect("opens without associated data");
        assert_eq!(plain, token.expose().as_bytes());
    }

    #[test]
    fn a_token_sealed_with_the_earlier_associated_data_still_opens() {
        let ring = ring(&["k1"]);
        let token = GatewayToken::generate().unwrap();
        let key = ring.sealing_key();
        let nonce = [7u8; NONCE_BYTES];
        let aad = key.legacy_aad();
        let ciphertext = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: token.expose().as_bytes(),
                    aad: &aad,
                },
            )
            .unwrap();
        let sealed = format!(
            "v1:k1:{}",
            BASE64.encode([&nonce[..], &ciphertext].concat())
        );
        assert_eq!(ring.open(&sealed).unwrap(), token);
    }

    #[test]
    fn a_token_moved_under_another_key_id_does_not_open() {
        let ring = ring(&["k1", "k2"]);
        let sealed = ring.seal(&GatewayToken::generate().unwrap()).unwrap();
        let moved = sealed.replacen("v1:k1:", "v1:k2:", 1);
        assert!(matches!(ring.open(&moved), Err(SecretsError::Tampered(id)) if id == "k2"));
    }

    #[test]
    fn rotation_keeps_old_tokens_readable_and_seals_with_the_new_key() {
        let old = EncryptionKey::generate("old").unwrap();
        let new = EncryptionKey::generate("new").unwrap();
        let before = KeyRing::new(vec![old.clone()]).unwrap();
        let token = GatewayToken::generate().unwrap();
        let sealed_old = before.seal(&token).unwrap();

        let after = KeyRing::new(vec![new, old]).unwrap();
        assert_eq!(after.open(&sealed_old).unwrap(), token);
        assert!(after.needs_reseal(&sealed_old));
        let resealed = after.seal(&token).unwrap();
        assert!(resealed.starts_with("v1:new:"));
        assert!(!after.needs_reseal(&resealed));
    }

    #[test]
    fn unknown_key_id_names_the_id_and_the_configured_ones() {
        let sealed = ring(&["gone"])
            .seal(&GatewayToken::generate().unwrap())
            .unwrap();
        let err = ring(&["k1", "k2"]).open(&sealed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sealed token was sealed with key \"gone\", which is not configured (configured: k1, k2)"
        );
    }

    #[test]
    fn malformed_sealed_texts_are_clear_errors() {
        let ring = ring(&["k1"]);
        for (text, expected) in [
            ("", "malformed"),
            ("plaintext-token", "malformed"),
            ("v2:k1:AAAA", "unsupported version"),
            ("v1:k1", "malformed"),
            ("v1:k1:not base64!", "not valid base64"),
            ("v1:k1:AAAA", "shorter than a nonce"),
        ] {
            let err = ring.open(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn key_lists_parse_with_commas_newlines_and_comments() {
        let a = EncryptionKey::generate("a").unwrap();
        let b = EncryptionKey::generate("b").unwrap();
        let list = format!(
            "# keys\n{}, {}\n",
            a.to_config_entry().as_str(),
            b.to_config_entry().as_str()
        );
        let ring = KeyRing::parse(&list).unwrap();
        assert_eq!(ring.key_ids(), ["a", "b"]);
    }

    #[test]
    fn malformed_keys_are_refused_without_showing_the_key() {
        let short = format!("k1:{}", BASE64.encode([7u8; 16]));
        for (list, expected) in [
            ("", "no encryption key configured"),
            ("nocolon", "missing ':'"),
            ("k1:***", "not valid base64"),
            (short.as_str(), "16 bytes"),
            ("bad id:AAAA", "key id may hold only"),
        ] {
            let err = KeyRing::parse(list).unwrap_err().to_string();
            assert!(err.contains(expected), "{list:?}: {err}");
            assert!(!err.contains(&BASE64.encode([7u8; 16])));
        }
        let dup = EncryptionKey::generate("k1").unwrap();
        let list = format!(
            "{},{}",
            dup.to_config_entry().as_str(),
            dup.to_config_entry().as_str()
        );
        assert!(matches!(
            KeyRing::parse(&list),
            Err(SecretsError::DuplicateKeyId(_))
        ));
    }

    #[test]
    fn debug_and_display_of_secrets_are_redacted() {
        let token = GatewayToken::generate().unwrap();
        let key = EncryptionKey::generate("k1").unwrap();
        let ring = KeyRing::new(vec![key.clone()]).unwrap();
        let material = key.to_config_entry();
        let secret_part = material.split_once(':').unwrap().1;
        for shown in [
            format!("{token:?}"),
            format!("{token}"),
            format!("{key:?}"),
            format!("{ring:?}"),
        ] {
            assert!(!shown.contains(token.expose()), "{shown}");
            assert!(!shown.contains(secret_part), "{shown}");
        }
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, source) = load_key_ring(None, dir.path(), true).unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        assert_eq!(source, KeySource::Created(path.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!key_file_is_shared(&path));

        let token = GatewayToken::generate().unwrap();
        let sealed = ring.seal(&token).unwrap();
        let (again, source) = load_key_ring(None, dir.path(), true).unwrap();
        assert_eq!(source, KeySource::File(path));
        assert_eq!(again.open(&sealed).unwrap(), token);
    }

    #[test]
    fn without_keys_and_without_create_the_error_says_how_to_configure() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_key_ring(None, dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("CLAWFLEET_ENCRYPTION_KEYS"));
    }

    #[test]
    fn the_environment_wins_over_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        load_key_ring(None, dir.path(), true).unwrap();
        let env = EncryptionKey::generate("env").unwrap().to_config_entry();
        let (ring, source) = load_key_ring(Some(&env), dir.path(), true).unwrap();
        assert_eq!(source, KeySource::Environment);
        assert_eq!(ring.key_ids(), ["env"]);
    }

    proptest! {
        #[test]
        fn opening_arbitrary_text_never_panics(text in any::<String>()) {
            let ring = ring(&["k1"]);
            let _ = ring.open(&text);
            let _ = ring.open(&format!("v1:k1:{text}"));
        }

        #[test]
        fn any_token_text_round_trips(text in any::<String>()) {
            let ring = ring(&["k1"]);
            let token = GatewayToken::from_plaintext(text);
            prop_assert_eq!(ring.open(&ring.seal(&token).unwrap()).unwrap(), token);
        }
    }
}
