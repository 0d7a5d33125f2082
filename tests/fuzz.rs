//! Property-based fuzzing of everything that parses input from outside:
//! desired rows as the database hands them over (SQLite lets a writer store
//! any type in any column), sealed tokens, image references, user ids. No
//! input may panic; every refusal names the field at fault; no tampered
//! token ever opens.

mod support;

use clawfleet::desired::{validate, RawDesiredRow, RawValue};
use clawfleet::image_ref::ImageRef;
use clawfleet::naming::container_name;
use clawfleet::secrets::{EncryptionKey, GatewayToken, KeyRing};
use proptest::prelude::*;
use support::{Backend, TestDb};

const FIELDS: [&str; 6] = [
    "user_id",
    "state",
    "idle_timeout_secs",
    "last_active_at",
    "image",
    "restart_nonce",
];

/// An SQL literal of any SQLite storage class, including hostile text.
fn sql_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("NULL".to_owned()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        Just("99999999999999999999999999".to_owned()),
        "[ -~]{0,40}".prop_map(|s| format!("'{}'", s.replace('\'', "''"))),
        any::<String>().prop_map(|s| format!("'{}'", s.replace('\'', "''").replace('\0', ""))),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(|b| format!("X'{}'", hex_of(&b))),
        Just("'running'".to_owned()),
        Just("'2026-11-29 10:00:00'".to_owned()),
        Just("char(0)".to_owned()),
    ]
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The real decode path: rows of random types written by raw SQL are read
    /// back without an error, each valid or refused naming a real column.
    #[test]
    fn rows_of_any_type_written_to_sqlite_decode_without_error(
        rows in prop::collection::vec((sql_literal(), sql_literal(), sql_literal(), sql_literal(), sql_literal()), 1..8)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let db = TestDb::new(Backend::Sqlite).await;
            let store = db.store().await;
            for (i, (state, idle, active, image, nonce)) in rows.iter().enumerate() {
                db.exec(&format!(
                    "INSERT INTO desired_containers (user_id, state, idle_timeout_secs, last_active_at, image, restart_nonce) \
                     VALUES ('u{i}', coalesce({state}, 'running'), {idle}, {active}, {image}, coalesce({nonce}, 0))"
                )).await;
            }
            let read = store.desired_all().await.expect("reading never fails on bad rows");
            prop_assert_eq!(read.len(), rows.len());
            for row in read {
                if let Err(e) = row {
                    prop_assert!(FIELDS.contains(&e.field), "{}", e);
                    prop_assert!(e.status_message().len() < 1024);
                }
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn validating_any_raw_row_never_panics_and_names_a_column(
        user_id in prop_oneof![any::<String>(), "[a-z0-9]{1,200}", Just("x".repeat(10_000))],
        state in any::<String>(),
        idle in any::<i64>(),
        active in any::<String>(),
        image in prop_oneof![any::<String>(), "[a-zA-Z0-9./:@_-]{0,600}"],
        nonce in any::<i64>(),
    ) {
        let raw = RawDesiredRow {
            user_id,
            state: RawValue::Text(state),
            idle_timeout_secs: RawValue::Integer(idle),
            last_active_at: RawValue::Text(active),
            image: RawValue::Text(image),
            restart_nonce: RawValue::Integer(nonce),
            revision: 1,
        };
        if let Err(e) = validate(raw) {
            prop_assert!(FIELDS.contains(&e.field));
            prop_assert!(e.to_string().len() < 1024, "messages stay short");
        }
    }

    #[test]
    fn no_altered_sealed_token_opens(flip in any::<prop::sample::Index>(), bit in 0u8..8, text in any::<String>()) {
        let ring = KeyRing::new(vec![EncryptionKey::generate("k1").unwrap()]).unwrap();
        let token = GatewayToken::from_plaintext(text);
        let sealed = ring.seal("u", &token).unwrap();
        prop_assert_eq!(ring.open("u", &sealed).unwrap(), token.clone());
        let mut bytes = sealed.clone().into_bytes();
        let i = flip.index(bytes.len());
        bytes[i] ^= 1 << bit;
        if let Ok(altered) = String::from_utf8(bytes) {
            if altered != sealed {
                // Base64 padding bits can change without changing the bytes:
                // such a text may open, but only to the same token.
                if let Ok(opened) = ring.open("u", &altered) {
                    prop_assert_eq!(opened, token);
                }
            }
        }
    }

    #[test]
    fn opening_arbitrary_text_never_panics(text in any::<String>(), prefix in prop_oneof![Just(""), Just("v1:"), Just("v1:k1:"), Just("v2:k1:")]) {
        let ring = KeyRing::new(vec![EncryptionKey::generate("k1").unwrap()]).unwrap();
        let _ = ring.open("u", &format!("{prefix}{text}"));
    }

    #[test]
    fn image_parsing_and_naming_never_panic(text in any::<String>()) {
        let _ = ImageRef::parse(&text);
        let name = container_name("mosaic-user-", &text);
        // A raw id is at most 64 bytes; an escaped one 40 characters plus "-" and 12 hex.
        prop_assert!(name.len() <= "mosaic-user-".len() + 64);
    }
}
