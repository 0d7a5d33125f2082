//! What may reach a request: label filters for lists and events, checked
//! again exactly on the answer, and the only strings put into a request path.

use std::collections::HashMap;

use crate::docker::{ContainerFilter, EngineError, LABEL_INSTANCE, LABEL_MANAGED, LABEL_USER_ID};

/// True for a plain Docker name (optionally with its leading `/`) or id: the
/// only strings put into a request path.
pub(in crate::docker) fn is_object_ref(text: &str) -> bool {
    let name = text.strip_prefix('/').unwrap_or(text);
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// [`EngineError::NotFound`] for a string that cannot name a container.
pub(in crate::docker) fn check_object_ref(op: &'static str, id: &str) -> Result<(), EngineError> {
    if is_object_ref(id) {
        Ok(())
    } else {
        Err(EngineError::NotFound {
            op,
            target: id.to_owned(),
        })
    }
}

/// The engine-side label filters of `filter`.
pub(in crate::docker) fn label_filters(filter: &ContainerFilter) -> HashMap<String, Vec<String>> {
    let mut labels = vec![
        format!("{LABEL_MANAGED}=true"),
        format!("{LABEL_INSTANCE}={}", filter.instance),
    ];
    if let Some(user_id) = &filter.user_id {
        labels.push(format!("{LABEL_USER_ID}={user_id}"));
    }
    HashMap::from([("label".to_owned(), labels)])
}

/// The engine-side `name` filter for names containing `prefix`: the engine
/// reads it as a regular expression, so anything but a plain name character
/// is escaped. Unanchored, as engines differ on the leading `/`.
pub(in crate::docker) fn name_pattern(prefix: &str) -> String {
    let mut pattern = String::new();
    for c in prefix.chars() {
        if !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')) {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern
}

/// True when `labels` match `filter` exactly: the check that does not depend
/// on how the engine parses its filter syntax.
pub(in crate::docker) fn filter_matches<'a>(
    filter: &ContainerFilter,
    mut label: impl FnMut(&str) -> Option<&'a str>,
) -> bool {
    label(LABEL_MANAGED) == Some("true")
        && label(LABEL_INSTANCE) == Some(filter.instance.as_str())
        && filter
            .user_id
            .as_deref()
            .is_none_or(|user_id| label(LABEL_USER_ID) == Some(user_id))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::docker::object_labels;

    #[test]
    fn only_plain_names_and_ids_reach_a_request_path() {
        for good in ["mosaic-user-1", "/mosaic-user-1", "abc123", "a_b.c-d"] {
            assert!(is_object_ref(good), "{good}");
        }
        for bad in ["", "../images/json", "a/b", "a b", "-a", "a?b", "é"] {
            assert!(!is_object_ref(bad), "{bad}");
        }
    }

    #[test]
    fn a_name_prefix_filter_escapes_what_a_regular_expression_would_read() {
        assert_eq!(name_pattern("mosaic-user-"), "mosaic-user-");
        assert_eq!(name_pattern("a.b+"), "a\\.b\\+");
    }

    #[test]
    fn label_filter_compares_values_exactly() {
        let filter = ContainerFilter {
            instance: "i".to_owned(),
            user_id: Some("1".to_owned()),
        };
        let labels = |user: &str| {
            let mut labels = object_labels("i", user);
            labels.insert("other".to_owned(), "x".to_owned());
            labels
        };
        let check = |l: &BTreeMap<String, String>| {
            filter_matches(&filter, |k| l.get(k).map(String::as_str))
        };
        assert!(check(&labels("1")));
        assert!(!check(&labels("10")));
        assert!(!check(&object_labels("j", "1")));
    }
}
