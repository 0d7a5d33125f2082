//! The routes on one user: show, put, delete, touch, stop and restart.
//! They write `desired_containers` exactly as any other service would and
//! answer with the user's [`UserView`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;

use super::errors::{ApiError, ErrorBody};
use super::requests::{PutBody, RestartRequested, Touched, UserId};
use crate::desired::DesiredState;
use crate::http::AppState;
use crate::quote::quote_short;
use crate::view::{ControllerView, UserView};

/// `GET /v1/users/{id}`.
#[utoipa::path(
    get,
    path = "/users/{id}",
    summary = "A user's desired and observed state (never the token)",
    params(UserId),
    responses(
        (status = 200, description = "The user", body = UserView),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub(super) async fn show_user(
    State(state): State<Arc<AppState>>,
    UserId { id }: UserId,
) -> Result<Json<UserView>, ApiError> {
    view_of(&state, &id).await.map(Json)
}

/// The view of one user; 404 when there is neither a desired nor a status row.
async fn view_of(state: &AppState, user_id: &str) -> Result<UserView, ApiError> {
    let controller = controller(state).await?;
    let rows = state
        .store
        .user(user_id)
        .await?
        .ok_or_else(|| ApiError::NoSuchUser(quote_short(user_id)))?;
    Ok(UserView::of(&rows, Utc::now()).with_controller(controller))
}

/// What the views say about this instance's controller: `Some` once it has
/// gone quiet (README "JSON API").
pub(super) async fn controller(state: &AppState) -> Result<Option<ControllerView>, ApiError> {
    Ok(ControllerView::of(
        state.store.controller_seen(&state.instance).await?,
    ))
}

/// `PUT /v1/users/{id}`: creates or updates the desired row.
#[utoipa::path(
    put,
    path = "/users/{id}",
    summary = "Create or update a user's desired row (absent fields keep their value, null clears)",
    params(UserId),
    request_body(content = PutBody, description = "All fields optional; an empty body changes nothing"),
    responses(
        (status = 200, description = "The user as written", body = UserView),
        (status = 400, description = "A bad field, named first in the message", body = ErrorBody),
    )
)]
pub(super) async fn put_user(
    State(state): State<Arc<AppState>>,
    UserId { id }: UserId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<UserView>, ApiError> {
    let body = body.map_err(|e| ApiError::bad_request("body", e.body_text()))?;
    let update = PutBody::parse(&body)?.into_update(id.clone())?;
    state.store.upsert_desired(&update).await?;
    state.nudge.user(&id);
    tracing::info!(user_id = %quote_short(&id), "desired row written through the api");
    view_of(&state, &id).await.map(Json)
}

/// `DELETE /v1/users/{id}`: the container is removed, its volume kept.
#[utoipa::path(
    delete,
    path = "/users/{id}",
    summary = "Delete the desired row: the container is removed, its volume kept",
    params(UserId),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub(super) async fn delete_user(
    State(state): State<Arc<AppState>>,
    UserId { id }: UserId,
) -> Result<StatusCode, ApiError> {
    if !state.store.delete_desired(&id).await? {
        return Err(ApiError::NoSuchUser(quote_short(&id)));
    }
    tracing::info!(user_id = %quote_short(&id), "desired row deleted through the api");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/users/{id}/touch`: records activity now.
#[utoipa::path(
    post,
    path = "/users/{id}/touch",
    summary = "Record activity now (moves the idle deadline)",
    params(UserId),
    responses(
        (status = 200, description = "Activity recorded", body = Touched),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub(super) async fn touch_user(
    State(state): State<Arc<AppState>>,
    UserId { id }: UserId,
) -> Result<Json<Touched>, ApiError> {
    let now = Utc::now();
    state.store.touch(&id, now).await?;
    Ok(Json(Touched {
        user_id: id,
        last_active_at: now,
    }))
}

/// `POST /v1/users/{id}/stop`: sets `state = stopped` on an existing row.
#[utoipa::path(
    post,
    path = "/users/{id}/stop",
    summary = "Set state = stopped on an existing row (never creates one)",
    params(UserId),
    responses(
        (status = 200, description = "The user as written", body = UserView),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub(super) async fn stop_user(
    State(state): State<Arc<AppState>>,
    UserId { id }: UserId,
) -> Result<Json<UserView>, ApiError> {
    state.store.set_state(&id, DesiredState::Stopped).await?;
    tracing::info!(user_id = %quote_short(&id), "stop requested through the api");
    view_of(&state, &id).await.map(Json)
}

/// `POST /v1/users/{id}/restart`: bumps `restart_nonce`, so the controller
/// recreates the container with fresh configuration.
#[utoipa::path(
    post,
    path = "/users/{id}/restart",
    summary = "Recreate the container with fresh configuration (bumps restart_nonce)",
    params(UserId),
    responses(
        (status = 202, description = "Restart requested", body = RestartRequested),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub(super) async fn restart_user(
    State(state): State<Arc<AppState>>,
    UserId { id }: UserId,
) -> Result<(StatusCode, Json<RestartRequested>), ApiError> {
    state.store.request_restart(&id).await?;
    tracing::info!(user_id = %quote_short(&id), "restart requested through the api");
    let restart_nonce = match state.store.desired(&id).await? {
        Some(Ok(d)) => Some(d.restart_nonce),
        _ => None,
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(RestartRequested {
            user_id: id,
            restart_nonce,
        }),
    ))
}
