//! The JSON API under `/v1`: what other services call instead of writing
//! `desired_containers` themselves.
//!
//! Every route but `GET /v1/openapi.json` needs
//! `Authorization: Bearer $CLAWFLEET_API_TOKEN` (compared in constant time);
//! with no token configured every such route answers 503. The
//! API writes desired rows exactly as any other service would and reads
//! status rows; it never calls the engine. Errors are always
//! `{"error": <code>, "message": <text>}` with a matching status, and a
//! message never holds a token.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/users?phase=&limit=&after=` | 200 `{"users": [view], "next_after"}` |
//! | `GET /v1/users/{id}` | 200 view, 404 |
//! | `PUT /v1/users/{id}` `{"state", "idle_timeout", "image"}` | 200 view |
//! | `DELETE /v1/users/{id}` | 204, 404 |
//! | `POST /v1/users/{id}/ensure-running?wait=30s` | 200 `{"url", "host_url", "token", ...}`, 409 failed, 504 |
//! | `POST /v1/users/{id}/touch` | 200 `{"user_id", "last_active_at"}`, 404 |
//! | `POST /v1/users/{id}/stop` | 200 view, 404 |
//! | `POST /v1/users/{id}/restart` | 202 `{"user_id", "restart_nonce"}`, 404 |
//! | `GET /v1/openapi.json` | 200 the OpenAPI 3.1 document of these routes (no token needed) |
//!
//! A view is [`crate::view::UserView`], the object `clawfleet users show
//! --json` prints; it never holds the gateway token. Only `ensure-running`
//! hands the token out, to the caller that asked for the container.
//!
//! Limits (README "JSON API"): at most `--api-max-inflight` requests are
//! served at once, past that 503 with `Retry-After`; a request is answered
//! within [`REQUEST_TIMEOUT`] (`ensure-running` within its `wait` plus that).
//! The API reads and writes through a pool of its own, and its
//! `ensure-running` waiters share one watcher per user, so API traffic
//! cannot take the reconcilers' connections.

//!
//! One file per concept: [`errors`] (the error body), [`auth`], [`limits`],
//! [`requests`] (the typed requests and answers), [`users`] (the routes on
//! one user), [`list`] and [`ensure_running`] (the wait). The routes are
//! listed once, in [`documented_routes`]: the router and the OpenAPI
//! document are both built from that list, so neither can miss a route.

mod auth;
mod ensure_running;
mod errors;
mod limits;
mod list;
mod requests;
#[cfg(test)]
mod tests;
mod users;

use std::sync::Arc;
use std::time::Duration;

use axum::middleware;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    InfoBuilder, LicenseBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, SecurityRequirement,
};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use super::AppState;
use limits::Inflight;

use errors::ErrorBody;

/// How long `ensure-running` waits when the caller names no `wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest `wait` a caller may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long any `/v1` request may take, beyond the `wait` of `ensure-running`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What `Retry-After` says when the API is busy (seconds).
const RETRY_AFTER_SECS: u64 = 1;
/// The default of `--api-max-inflight`.
pub const DEFAULT_MAX_INFLIGHT: usize = 1024;
/// Page size of `GET /v1/users` when the caller names none.
pub const DEFAULT_LIMIT: u64 = 100;
/// The largest page of `GET /v1/users`.
pub const MAX_LIMIT: u64 = 1000;
/// Where the API is mounted.
pub const PREFIX: &str = "/v1";
/// The path of the OpenAPI document under [`PREFIX`].
pub const OPENAPI_PATH: &str = "/openapi.json";
/// The name of the bearer-token security scheme in the document.
const BEARER: &str = "bearer";

/// The `/v1` routes: the OpenAPI document, open; every other route behind
/// the bearer-token check and the in-flight limit.
pub fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let inflight = Inflight::new(state.max_inflight);
    let (guarded, _) = documented_routes().split_for_parts();
    let guarded = guarded
        .fallback(errors::no_route)
        .method_not_allowed_fallback(errors::method_not_allowed)
        // Layers (not route layers) so unknown routes are refused alike; the
        // last added runs first: authentication, then the in-flight limit.
        .layer(middleware::from_fn_with_state(
            inflight,
            limits::limit_inflight,
        ))
        .layer(middleware::from_fn_with_state(state, auth::authenticate));
    Router::new()
        .route(OPENAPI_PATH, get(|| async { Json(openapi()) }))
        .merge(guarded)
}

/// Every `/v1` route but the document itself, each with its time limit:
/// the one list both the router and the document are built from.
fn documented_routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(time_limited(routes!(list::list_users), REQUEST_TIMEOUT))
        .routes(time_limited(
            routes!(users::show_user, users::put_user, users::delete_user),
            REQUEST_TIMEOUT,
        ))
        .routes(time_limited(routes!(users::touch_user), REQUEST_TIMEOUT))
        .routes(time_limited(routes!(users::stop_user), REQUEST_TIMEOUT))
        .routes(time_limited(routes!(users::restart_user), REQUEST_TIMEOUT))
        // Bounded by its own `wait`, so by a longer limit.
        .routes(time_limited(
            routes!(ensure_running::ensure_running),
            ensure_running_time_limit(),
        ))
}

/// `route` answering 503 `request_timeout` past `limit`.
fn time_limited(
    route: UtoipaMethodRouter<Arc<AppState>>,
    limit: Duration,
) -> UtoipaMethodRouter<Arc<AppState>> {
    let (schemas, paths, method_router) = route;
    let method_router =
        method_router.route_layer(middleware::from_fn_with_state(limit, limits::time_limit));
    (schemas, paths, method_router)
}

/// The time limit of `ensure-running`: its longest `wait`, plus the time
/// any request may take.
pub fn ensure_running_time_limit() -> Duration {
    MAX_WAIT + REQUEST_TIMEOUT
}

/// The OpenAPI 3.1 document of the `/v1` routes, generated from the
/// handlers and the typed requests and answers (README "JSON API").
pub fn openapi() -> OpenApi {
    let info = InfoBuilder::new()
        .title("clawfleet")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "The JSON API of clawfleet: per-user agent containers on a Docker engine \
             (README \"JSON API\"). Every route needs `Authorization: Bearer \
             $CLAWFLEET_API_TOKEN`.",
        ))
        .license(Some(
            LicenseBuilder::new()
                .name(env!("CARGO_PKG_LICENSE"))
                .identifier(Some(env!("CARGO_PKG_LICENSE")))
                .build(),
        ))
        .build();
    let mut document =
        OpenApiRouter::<Arc<AppState>>::with_openapi(OpenApiBuilder::new().info(info).build())
            .nest(PREFIX, documented_routes())
            .into_openapi();
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    components
        .schemas
        .entry("ErrorBody".to_owned())
        .or_insert_with(<ErrorBody as utoipa::PartialSchema>::schema);
    let error = |description: &str| {
        RefOr::T(
            utoipa::openapi::ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    for item in document.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            operation.tags = Some(vec!["users".to_owned()]);
            operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            let responses = &mut operation.responses.responses;
            responses
                .entry("401".to_owned())
                .or_insert_with(|| error("Missing or wrong bearer token (`unauthorized`)"));
            responses.entry("503".to_owned()).or_insert_with(|| {
                error(
                    "`api_disabled`, `busy`, `request_timeout` or `unavailable`; with Retry-After",
                )
            });
        }
    }
    document
}
