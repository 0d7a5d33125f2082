//! Gateway tokens and the key ring that seals them.
//!
//! A token is 32 random bytes (hex-encoded, as the container receives it),
//! generated once per user. At rest it is sealed with AES-256-GCM under a
//! fresh 96-bit nonce and stored as `v2:<key id>:<base64(nonce || ciphertext)>`,
//! the user id's bytes being the associated data, so a sealed token copied
//! into another user's row does not open (README "Keys and tokens"). `v1`
//! tokens (no associated data) still open, and [`KeyRing::needs_reseal`]
//! says to seal them again.
//! The key ring holds one or more keys: the first seals, every key opens, so
//! keys can be rotated by putting a new key first and re-sealing at leisure.
//!
//! The key file is written once, atomically, and never replaced: a crash
//! leaves no key file or a complete one, and an empty or unreadable key file
//! is an error, never a reason to make a new key (the tokens sealed with the
//! old one would no longer open).
//!
//! Invariants: no secret type prints its secret through `Debug` or `Display`;
//! no error message carries key material or a plaintext token.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::TryRngCore;
use zeroize::Zeroizing;

/// Version tag of the sealed format: the user id is the associated data.
const SEALED_VERSION: &str = "v2";
/// Version tag of the earlier format, without the user id; still opened.
const LEGACY_VERSION: &str = "v1";
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
    /// The sealed text does not have the `v2:<key id>:<base64>` shape.
    #[error("sealed token is malformed: {0}")]
    MalformedSealed(&'static str),
    /// The sealed text names a format version this build does not know.
    #[error("sealed token has unsupported version {0:?} (this build reads v1 and v2)")]
    UnsupportedVersion(String),
    /// The sealed text names a key the ring does not hold.
    #[error("sealed token was sealed with key {key_id:?}, which is not configured (configured: {configured})")]
    UnknownKeyId {
        /// The key id in the sealed text.
        key_id: String,
        /// The ids the ring holds.
        configured: String,
    },
    /// Authentication failed: the text was altered, sealed for another user,
    /// or the key under that id is not the one that sealed it.
    #[error("sealed token failed authentication with key {0:?}: it was altered, sealed for another user, or that key id now holds a different key")]
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
    /// A key file exists but holds no usable key; it is never replaced by a new one.
    #[error("key file {path} holds no usable key ({reason}): restore it from a backup, or remove it only if no stored token was sealed with it; it is never replaced silently, since tokens sealed with it would no longer open")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (never key material).
        reason: String,
    },
    /// A database shared by a group of controllers, and no keys in the environment.
    #[error("{}", shared_database_without_keys(.key_file.as_deref()))]
    SharedDatabaseWithoutKeys {
        /// A key file an earlier build made in the data folder, if there is one.
        key_file: Option<PathBuf>,
    },
}

fn shared_database_without_keys(key_file: Option<&Path>) -> String {
    let mut message = String::from(
        "no encryption key configured: on PostgreSQL every replica of the group needs the same keys, \
         so set CLAWFLEET_ENCRYPTION_KEYS to one value on all of them (make a key with `clawfleet keygen`); \
         no key file is made or read on PostgreSQL",
    );
    if let Some(path) = key_file {
        message.push_str(&format!(
            "; {} exists from an earlier build: put its entries (and those of the other replicas' key files) into CLAWFLEET_ENCRYPTION_KEYS",
            path.display()
        ));
    }
    message
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

    /// The associated data the first `v1` builds sealed with; their tokens
    /// still open.
    fn legacy_aad(&self) -> Vec<u8> {
        format!("clawfleet-gateway-token:{LEGACY_VERSION}:{}", self.id).into_bytes()
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

    /// Seals `user_id`'s `token` with the first key under a fresh random
    /// nonce, the user id's bytes as associated data (`v2`).
    pub fn seal(&self, user_id: &str, token: &GatewayToken) -> Result<String, SecretsError> {
        let key = self.sealing_key();
        let nonce = random_bytes::<NONCE_BYTES>()?;
        let ciphertext = key
            .cipher
            .encrypt(
                Nonce::from_slice(nonce.as_ref()),
                Payload {
                    msg: token.expose().as_bytes(),
                    aad: user_id.as_bytes(),
                },
            )
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

    /// Opens `user_id`'s sealed token with whichever configured key sealed it.
    pub fn open(&self, user_id: &str, sealed: &str) -> Result<GatewayToken, SecretsError> {
        let header = SealedHeader::parse(sealed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == header.key_id)
            .ok_or_else(|| SecretsError::UnknownKeyId {
                key_id: truncate(header.key_id, 32),
                configured: self.key_ids().join(", "),
            })?;
        let blob = BASE64
            .decode(header.payload)
            .map_err(|_| SecretsError::MalformedSealed("payload is not valid base64"))?;
        if blob.len() < NONCE_BYTES + 16 {
            return Err(SecretsError::MalformedSealed(
                "payload shorter than a nonce and a tag",
            ));
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_BYTES);
        let nonce = Nonce::from_slice(nonce);
        let decrypt = |aad: &[u8]| {
            key.cipher.decrypt(
                nonce,
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
        };
        let opened = if header.version == SEALED_VERSION {
            decrypt(user_id.as_bytes())
        } else {
            decrypt(&[]).or_else(|_| decrypt(&key.legacy_aad()))
        };
        let plaintext = Zeroizing::new(opened.map_err(|_| SecretsError::Tampered(key.id.clone()))?);
        let token = String::from_utf8(plaintext.to_vec())
            .map_err(|_| SecretsError::MalformedSealed("plaintext is not UTF-8"))?;
        Ok(GatewayToken::from_plaintext(token))
    }

    /// True when `sealed` is not in the current format under the sealing key
    /// (a `v1` token, or one sealed before a rotation): seal it again.
    pub fn needs_reseal(&self, sealed: &str) -> bool {
        SealedHeader::parse(sealed).map_or(true, |h| {
            h.version != SEALED_VERSION || h.key_id != self.sealing_key().id
        })
    }
}

/// The clear part of a sealed token: its format version and key id. Its
/// `Debug` leaves the sealed payload out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SealedHeader<'a> {
    /// `v2`, or `v1` for a token sealed by an earlier build.
    pub version: &'a str,
    /// The id of the key that sealed it.
    pub key_id: &'a str,
    payload: &'a str,
}

impl fmt::Debug for SealedHeader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedHeader")
            .field("version", &self.version)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl<'a> SealedHeader<'a> {
    /// Splits `sealed` into version, key id and payload; opens nothing.
    pub fn parse(sealed: &'a str) -> Result<Self, SecretsError> {
        const SHAPE: &str = "expected v2:<key id>:<base64>";
        let (version, rest) = sealed
            .split_once(':')
            .ok_or(SecretsError::MalformedSealed(SHAPE))?;
        if version != SEALED_VERSION && version != LEGACY_VERSION {
            return Err(SecretsError::UnsupportedVersion(truncate(version, 16)));
        }
        let (key_id, payload) = rest
            .split_once(':')
            .ok_or(SecretsError::MalformedSealed(SHAPE))?;
        Ok(Self {
            version,
            key_id,
            payload,
        })
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

/// Whether keys may come from the key file in the data folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFileUse {
    /// Read it, and make it when it is missing (`clawfleet run` on SQLite).
    Create,
    /// Read it when it is there (the other commands on SQLite).
    Read,
    /// Never: a PostgreSQL database is shared by a group of controllers whose
    /// replicas must all seal with the same keys, and a key file is one
    /// host's; keys come only from the environment.
    Never,
}

/// Loads the key ring from the environment value if given, else, as `file`
/// allows, from the key file in `data_dir`, made (mode 0600, atomically)
/// holding one new key when it is missing and `file` is [`KeyFileUse::Create`].
pub fn load_key_ring(
    env_value: Option<&str>,
    data_dir: &Path,
    file: KeyFileUse,
) -> Result<(KeyRing, KeySource), SecretsError> {
    if let Some(list) = env_value.filter(|v| !v.trim().is_empty()) {
        return Ok((KeyRing::parse(list)?, KeySource::Environment));
    }
    let path = data_dir.join(KEY_FILE_NAME);
    if file == KeyFileUse::Never {
        return Err(SecretsError::SharedDatabaseWithoutKeys {
            key_file: path.exists().then_some(path),
        });
    }
    match read_key_file(&path) {
        Err(SecretsError::KeyFile { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            if file == KeyFileUse::Create {
                create_key_file(data_dir, &path)
            } else {
                Err(SecretsError::NoKeys)
            }
        }
        read => read.map(|ring| (ring, KeySource::File(path))),
    }
}

/// The ring in an existing key file; an empty or malformed one is an error.
fn read_key_file(path: &Path) -> Result<KeyRing, SecretsError> {
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| SecretsError::KeyFile {
                path: path.to_owned(),
                source,
            })?,
        );
    let bad = |reason: String| SecretsError::BadKeyFile {
        path: path.to_owned(),
        reason,
    };
    if text.trim().is_empty() {
        return Err(bad("it is empty".into()));
    }
    KeyRing::parse(&text).map_err(|e| match e {
        SecretsError::NoKeys => bad("it holds only comments".into()),
        other => bad(other.to_string()),
    })
}

/// Writes a key file holding one new key: a temporary file (mode 0600 from
/// its creation) in the same folder, synced, then moved into place without
/// replacing anything, then the folder synced. A crash leaves no key file or
/// a whole one; a process that made its own at the same moment loses the
/// race and reads the winner's.
fn create_key_file(data_dir: &Path, path: &Path) -> Result<(KeyRing, KeySource), SecretsError> {
    let io_err = |source| SecretsError::KeyFile {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io_err)?;
    let key = EncryptionKey::generate(&default_key_id())?;
    let mut contents = Zeroizing::new(String::from(
        "# clawfleet encryption keys: id:base64key, first seals. Keep this file secret and backed up.\n",
    ));
    contents.push_str(&key.to_config_entry());
    contents.push('\n');
    let mut temporary = tempfile::Builder::new()
        .prefix(&format!(".{KEY_FILE_NAME}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(data_dir)
        .map_err(io_err)?;
    temporary.write_all(contents.as_bytes()).map_err(io_err)?;
    temporary.as_file().sync_all().map_err(io_err)?;
    match temporary.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            return Ok((read_key_file(path)?, KeySource::File(path.to_owned())));
        }
        Err(e) => return Err(io_err(e.error)),
    }
    std::fs::File::open(data_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err)?;
    Ok((
        KeyRing::new(vec![key])?,
        KeySource::Created(path.to_owned()),
    ))
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

    /// A `v1` token as builds before v2 sealed it: no associated data.
    fn seal_v1(key: &EncryptionKey, token: &GatewayToken) -> String {
        let nonce = [7u8; NONCE_BYTES];
        let ciphertext = key
            .cipher
            .encrypt(Nonce::from_slice(&nonce), token.expose().as_bytes())
            .unwrap();
        format!(
            "v1:{}:{}",
            key.id,
            BASE64.encode([&nonce[..], &ciphertext].concat())
        )
    }

    #[test]
    fn sealed_token_round_trips_and_has_the_v2_shape() {
        let ring = ring(&["k1"]);
        let token = GatewayToken::generate().unwrap();
        assert_eq!(token.expose().len(), 64);
        let sealed = ring.seal("alice", &token).unwrap();
        assert!(sealed.starts_with("v2:k1:"), "{sealed}");
        assert!(!sealed.contains(token.expose()));
        assert_eq!(ring.open("alice", &sealed).unwrap(), token);
        assert!(!ring.needs_reseal(&sealed));
    }

    #[test]
    fn a_v2_token_opens_only_for_the_user_it_was_sealed_for() {
        // Regression: v1 bound no user, so a sealed token copied into another
        // user's row opened there.
        let ring = ring(&["k1"]);
        let sealed = ring
            .seal("alice", &GatewayToken::generate().unwrap())
            .unwrap();
        for other in ["bob", "", "alice ", "Alice", "alic"] {
            assert!(
                matches!(ring.open(other, &sealed), Err(SecretsError::Tampered(id)) if id == "k1"),
                "{other:?}"
            );
        }
        assert!(ring.open("alice", &sealed).is_ok());
    }

    #[test]
    fn sealing_twice_uses_a_fresh_nonce() {
        let ring = ring(&["k1"]);
        let token = GatewayToken::generate().unwrap();
        assert_ne!(
            ring.seal("u", &token).unwrap(),
            ring.seal("u", &token).unwrap()
        );
    }

    #[test]
    fn any_flipped_byte_of_a_sealed_token_is_detected() {
        let ring = ring(&["k1"]);
        let sealed = ring.seal("u", &GatewayToken::generate().unwrap()).unwrap();
        let blob = BASE64
            .decode(sealed.strip_prefix("v2:k1:").unwrap())
            .unwrap();
        for i in 0..blob.len() {
            let mut altered = blob.clone();
            altered[i] ^= 0x01;
            let text = format!("v2:k1:{}", BASE64.encode(&altered));
            assert!(
                matches!(ring.open("u", &text), Err(SecretsError::Tampered(_))),
                "byte {i}"
            );
        }
    }

    #[test]
    fn a_sealed_token_opens_with_plain_aes_256_gcm_the_key_and_the_user_id() {
        // What another service does with the README's description: split the
        // nonce off, decrypt with the user id's bytes as associated data.
        let ring = ring(&["k1"]);
        let token = GatewayToken::generate().unwrap();
        let user = "ünïcode user\u{1}";
        let sealed = ring.seal(user, &token).unwrap();
        let blob = BASE64
            .decode(sealed.strip_prefix("v2:k1:").unwrap())
            .unwrap();
        let (nonce, ciphertext) = blob.split_at(12);
        let key = ring.sealing_key();
        let plain = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.material.as_ref()))
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: user.as_bytes(),
                },
            )
            .expect("opens with the user id as associated data");
        assert_eq!(plain, token.expose().as_bytes());
    }

    #[test]
    fn a_v1_token_still_opens_for_any_user_and_asks_to_be_resealed() {
        let ring = ring(&["k1"]);
        let token = GatewayToken::generate().unwrap();
        let sealed = seal_v1(ring.sealing_key(), &token);
        assert_eq!(ring.open("alice", &sealed).unwrap(), token);
        assert!(ring.needs_reseal(&sealed));
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
        assert_eq!(ring.open("u", &sealed).unwrap(), token);
    }

    #[test]
    fn a_v2_token_relabelled_v1_does_not_open() {
        let ring = ring(&["k1"]);
        let sealed = ring.seal("u", &GatewayToken::generate().unwrap()).unwrap();
        let relabelled = sealed.replacen("v2:", "v1:", 1);
        assert!(matches!(
            ring.open("u", &relabelled),
            Err(SecretsError::Tampered(_))
        ));
    }

    #[test]
    fn a_token_moved_under_another_key_id_does_not_open() {
        let ring = ring(&["k1", "k2"]);
        let sealed = ring.seal("u", &GatewayToken::generate().unwrap()).unwrap();
        let moved = sealed.replacen("v2:k1:", "v2:k2:", 1);
        assert!(matches!(ring.open("u", &moved), Err(SecretsError::Tampered(id)) if id == "k2"));
    }

    #[test]
    fn rotation_keeps_old_tokens_readable_and_seals_with_the_new_key() {
        let old = EncryptionKey::generate("old").unwrap();
        let new = EncryptionKey::generate("new").unwrap();
        let before = KeyRing::new(vec![old.clone()]).unwrap();
        let token = GatewayToken::generate().unwrap();
        let sealed_old = before.seal("u", &token).unwrap();

        let after = KeyRing::new(vec![new, old]).unwrap();
        assert_eq!(after.open("u", &sealed_old).unwrap(), token);
        assert!(after.needs_reseal(&sealed_old));
        let resealed = after.seal("u", &token).unwrap();
        assert!(resealed.starts_with("v2:new:"));
        assert!(!after.needs_reseal(&resealed));
    }

    #[test]
    fn the_header_names_version_and_key_id_without_opening() {
        let header = SealedHeader::parse("v1:k7:AAAA").unwrap();
        assert_eq!((header.version, header.key_id), ("v1", "k7"));
        assert!(SealedHeader::parse("v3:k7:AAAA").is_err());
    }

    #[test]
    fn unknown_key_id_names_the_id_and_the_configured_ones() {
        let sealed = ring(&["gone"])
            .seal("u", &GatewayToken::generate().unwrap())
            .unwrap();
        let err = ring(&["k1", "k2"]).open("u", &sealed).unwrap_err();
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
            ("v3:k1:AAAA", "unsupported version"),
            ("v2:k1", "malformed"),
            ("v1:k1:not base64!", "not valid base64"),
            ("v2:k1:AAAA", "shorter than a nonce"),
        ] {
            let err = ring.open("u", text).unwrap_err().to_string();
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
        let sealed = ring.seal("u", &token).unwrap();
        let header = SealedHeader::parse(&sealed).unwrap();
        for shown in [
            format!("{token:?}"),
            format!("{token}"),
            format!("{key:?}"),
            format!("{ring:?}"),
            format!("{header:?}"),
            ring.open("v", &sealed).unwrap_err().to_string(),
        ] {
            assert!(!shown.contains(token.expose()), "{shown}");
            assert!(!shown.contains(secret_part), "{shown}");
            assert!(!shown.contains(header.payload), "{shown}");
        }
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600_complete_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, source) = load_key_ring(None, dir.path(), KeyFileUse::Create).unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        assert_eq!(source, KeySource::Created(path.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!key_file_is_shared(&path));
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, [KEY_FILE_NAME], "no temporary file is left");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'), "written whole: {}", text.len());
        let written = KeyRing::parse(&text).unwrap();
        assert_eq!(written.key_ids(), ring.key_ids());

        let token = GatewayToken::generate().unwrap();
        let sealed = ring.seal("u", &token).unwrap();
        assert_eq!(written.open("u", &sealed).unwrap(), token);
        let (again, source) = load_key_ring(None, dir.path(), KeyFileUse::Create).unwrap();
        assert_eq!(source, KeySource::File(path));
        assert_eq!(again.open("u", &sealed).unwrap(), token);
    }

    #[test]
    fn processes_making_the_key_file_at_once_all_get_the_same_whole_key() {
        // Regression: the file was created empty and then written, so a
        // second process could read it empty, or fail on its existence.
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let barrier = std::sync::Barrier::new(4);
            let rings: Vec<KeyRing> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            load_key_ring(None, dir.path(), KeyFileUse::Create)
                                .map(|(ring, _)| ring)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap().expect("every process gets a key"))
                    .collect()
            });
            let token = GatewayToken::generate().unwrap();
            let sealed = rings[0].seal("u", &token).unwrap();
            for ring in &rings {
                assert_eq!(ring.open("u", &sealed).unwrap(), token);
            }
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }

    #[test]
    fn an_empty_or_corrupt_key_file_is_an_error_naming_it_never_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        for (contents, expected) in [
            ("", "it is empty"),
            ("\n  \n", "it is empty"),
            ("# only a comment\n", "only comments"),
            ("k1:not-base64!\n", "not valid base64"),
        ] {
            std::fs::write(&path, contents).unwrap();
            for file in [KeyFileUse::Create, KeyFileUse::Read] {
                let err = load_key_ring(None, dir.path(), file).unwrap_err();
                let text = err.to_string();
                assert!(matches!(err, SecretsError::BadKeyFile { .. }), "{text}");
                assert!(text.contains(&path.display().to_string()), "{text}");
                assert!(text.contains(expected), "{contents:?}: {text}");
                assert_eq!(
                    std::fs::read_to_string(&path).unwrap(),
                    contents,
                    "the file is left alone"
                );
            }
        }
    }

    #[test]
    fn without_keys_and_without_create_the_error_says_how_to_configure() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_key_ring(None, dir.path(), KeyFileUse::Read).unwrap_err();
        assert!(err.to_string().contains("CLAWFLEET_ENCRYPTION_KEYS"));
    }

    #[test]
    fn a_shared_database_takes_keys_only_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_key_ring(None, dir.path(), KeyFileUse::Never).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("every replica"), "{text}");
        assert!(text.contains("clawfleet keygen"), "{text}");
        assert!(!text.contains(KEY_FILE_NAME), "{text}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        // A key file an earlier build made is named, not read.
        load_key_ring(None, dir.path(), KeyFileUse::Create).unwrap();
        let text = load_key_ring(None, dir.path(), KeyFileUse::Never)
            .unwrap_err()
            .to_string();
        assert!(text.contains(KEY_FILE_NAME), "{text}");

        let env = EncryptionKey::generate("env").unwrap().to_config_entry();
        let (ring, source) = load_key_ring(Some(&env), dir.path(), KeyFileUse::Never).unwrap();
        assert_eq!(source, KeySource::Environment);
        assert_eq!(ring.key_ids(), ["env"]);
    }

    #[test]
    fn the_environment_wins_over_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        load_key_ring(None, dir.path(), KeyFileUse::Create).unwrap();
        let env = EncryptionKey::generate("env").unwrap().to_config_entry();
        let (ring, source) = load_key_ring(Some(&env), dir.path(), KeyFileUse::Create).unwrap();
        assert_eq!(source, KeySource::Environment);
        assert_eq!(ring.key_ids(), ["env"]);
    }

    proptest! {
        #[test]
        fn opening_arbitrary_text_never_panics(text in any::<String>()) {
            let ring = ring(&["k1"]);
            let _ = ring.open("u", &text);
            let _ = ring.open("u", &format!("v1:k1:{text}"));
            let _ = ring.open("u", &format!("v2:k1:{text}"));
        }

        #[test]
        fn any_token_text_round_trips_for_any_user(text in any::<String>(), user in any::<String>()) {
            let ring = ring(&["k1"]);
            let token = GatewayToken::from_plaintext(text);
            prop_assert_eq!(ring.open(&user, &ring.seal(&user, &token).unwrap()).unwrap(), token);
        }
    }
}
