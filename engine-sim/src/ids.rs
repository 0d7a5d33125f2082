//! Docker-style ids: 64 lowercase hex digits, rendered on demand from a
//! 64-bit key, so indexes keep the key and never the string.
//!
//! Distinct counters give distinct keys (the mix is a bijection), and the
//! same calls give the same ids, run after run.

/// Salts that keep container and network ids apart.
pub(super) const CONTAINER_SALT: u64 = 0x6d65_6d6f_7279_6374;
pub(super) const NETWORK_SALT: u64 = 0x6d65_6d6f_7279_6e77;

/// SplitMix64's finalizer: a bijection of `u64`, so distinct counters give distinct keys.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(super) fn id_key(salt: u64, counter: u64) -> u64 {
    mix(counter ^ salt)
}

/// The four 64-bit words of the id whose first word is `key`.
fn id_parts(key: u64) -> [u64; 4] {
    [
        key,
        mix(key ^ 0x1111_1111_1111_1111),
        mix(key ^ 0x2222_2222_2222_2222),
        mix(key ^ 0x3333_3333_3333_3333),
    ]
}

/// The 64-hex-digit id of `key`.
pub(super) fn render_id(key: u64) -> String {
    let [a, b, c, d] = id_parts(key);
    format!("{a:016x}{b:016x}{c:016x}{d:016x}")
}

pub(super) fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The key of a full id (lowercase hex, 64 digits).
pub(super) fn id_head(id: &str) -> u64 {
    u64::from_str_radix(&id[..16], 16).unwrap_or(0)
}

/// The keys whose ids can start with `prefix` (lowercase hex, 1 to 63 digits).
pub(super) fn id_head_range(prefix: &str) -> (u64, u64) {
    let head = &prefix[..prefix.len().min(16)];
    let value = u64::from_str_radix(head, 16).unwrap_or(0);
    let free_bits = 64 - 4 * head.len() as u32;
    if free_bits == 0 {
        return (value, value);
    }
    let low = value << free_bits;
    (low, low | (u64::MAX >> (64 - free_bits)))
}

/// True when the id of `key` starts with `prefix` (lowercase hex, at most 64 digits).
pub(super) fn id_has_prefix(key: u64, prefix: &str) -> bool {
    prefix
        .as_bytes()
        .chunks(16)
        .zip(id_parts(key))
        .all(|(chunk, word)| {
            let value = std::str::from_utf8(chunk)
                .ok()
                .and_then(|text| u64::from_str_radix(text, 16).ok());
            let shift = 64 - 4 * chunk.len() as u32;
            value == Some(word >> shift)
        })
}
