//! `GET /v1/users`: one page of users ordered by id, optionally of one phase.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::Utc;

use super::errors::{ApiError, ErrorBody};
use super::requests::{query, ListQuery, UserList};
use super::{DEFAULT_LIMIT, MAX_LIMIT};
use crate::http::AppState;
use crate::quote::quote_short;
use crate::status::Phase;
use crate::view::UserView;

/// `GET /v1/users`: without `phase` it pages over desired rows; with it,
/// over status rows of that phase (which also shows users whose row is gone
/// and whose container is being removed).
#[utoipa::path(
    get,
    path = "/users",
    summary = "One page of users in id order",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = UserList),
        (status = 400, description = "A bad parameter, named first in the message", body = ErrorBody),
    )
)]
pub(super) async fn list_users(
    State(state): State<Arc<AppState>>,
    params: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<UserList>, ApiError> {
    let params = query(params)?;
    let limit = limit_param(params.limit.as_deref())?;
    let phase = params.phase.as_deref().map(phase_param).transpose()?;
    let after = params.after.as_deref().filter(|a| !a.is_empty());
    let controller = super::users::controller(&state).await?;
    let page = state.store.users_page(phase, after, limit).await?;
    let now = Utc::now();
    Ok(Json(UserList {
        users: page
            .users
            .iter()
            .map(|u| UserView::of(u, now).with_controller(controller))
            .collect(),
        next_after: page.next_after,
    }))
}

/// `limit`: a whole number from 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
fn limit_param(text: Option<&str>) -> Result<u64, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_LIMIT);
    };
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(
                "limit",
                format!(
                    "{} is not a whole number from 1 to {MAX_LIMIT}",
                    quote_short(text)
                ),
            )
        })
}

/// `phase`: one of the phases' names.
fn phase_param(text: &str) -> Result<Phase, ApiError> {
    Phase::parse(text).ok_or_else(|| {
        let names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        ApiError::bad_request(
            "phase",
            format!("{} is not one of {}", quote_short(text), names.join(", ")),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_defaults_to_a_hundred_and_stays_within_one_to_a_thousand() {
        assert_eq!(limit_param(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit_param(Some(" 1000 ")).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "ten"] {
            assert!(limit_param(Some(bad))
                .unwrap_err()
                .to_string()
                .starts_with("limit: "));
        }
    }

    #[test]
    fn an_unknown_phase_is_refused_with_the_known_ones() {
        assert_eq!(phase_param("failed").unwrap(), Phase::Failed);
        let message = phase_param("gone").unwrap_err().to_string();
        assert!(message.starts_with("phase: "), "{message}");
        assert!(message.contains("running"), "{message}");
    }
}
