//! Quoting of untrusted text for messages and logs.
//!
//! Values from rows, requests and labels are written by others and may be
//! any length: a message quotes them (`Debug`-escaped, so control characters
//! cannot forge log lines) and cuts them, so one 10 KB value cannot flood a
//! log line or a status message.

/// Most characters of a value shown before it is cut.
const MAX_CHARS: usize = 64;

/// Quotes `text` for a message, cutting it to 64 characters so a 10 KB value
/// cannot flood a log line.
pub fn quote_short(text: &str) -> String {
    if text.chars().count() <= MAX_CHARS {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX_CHARS).collect();
        format!("{head:?}… ({} bytes)", text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted_whole_and_long_text_is_cut_with_its_length() {
        assert_eq!(quote_short("alice"), "\"alice\"");
        assert_eq!(quote_short("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(10_000);
        let quoted = quote_short(&long);
        assert_eq!(quoted, format!("{:?}… (10000 bytes)", "x".repeat(64)));
    }
}
