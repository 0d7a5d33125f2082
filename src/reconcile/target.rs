//! What the row asks for, and the port and token a container of it needs.
//!
//! Invariant: a port and a token are claimed in `container_status` before
//! any container uses them, so a crash between the two never hands a port
//! to two users or a user two tokens; a stopped or idle user that has no
//! container claims neither.
//!
//! A container taken over from the original service (no clawfleet labels)
//! lends the claim what it can: its gateway token when the user has none
//! sealed, its host port when that is in range, unclaimed and (stopped) not
//! held by another process; a port it cannot keep is replaced and the move
//! reported in `message` (README "Taking over from the original service").

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{debug, warn};

use crate::config::PortRange;
use crate::desired::DesiredContainer;
use crate::docker::{Engine, ObservedContainer, RunState};
use crate::naming::UserNames;
use crate::plan::{Blueprint, Claim, Intent, Target};
use crate::quote::quote_short;
use crate::secrets::GatewayToken;
use crate::spec::DesiredSpec;
use crate::status::ContainerStatus;
use crate::store::StoreError;

use super::{Pass, ReconcileError, Reconciler};

impl<E: Engine> Reconciler<E> {
    /// Decides the target of `pass`, whose user's container is `canonical`
    /// under `names`; claims a port and a token when a container will need them.
    pub(super) async fn target(
        &self,
        pass: &mut Pass<'_>,
        names: &UserNames,
        canonical: Option<&ObservedContainer>,
    ) -> Result<Target, ReconcileError> {
        let (user_id, now) = (pass.user_id, pass.now);
        let d = match pass.desired.as_ref() {
            None => {
                let remove_after = if self.store.deleted_revision(user_id).await?.is_some() {
                    None
                } else {
                    let grace =
                        chrono::Duration::from_std(self.options.orphan_grace).unwrap_or_default();
                    Some(self.memory.orphan_since(user_id, now) + grace)
                };
                return Ok(Target::Absent { remove_after });
            }
            Some(Err(invalid)) => {
                return Ok(Target::Failed {
                    message: invalid.status_message(),
                    retry_at: None,
                });
            }
            Some(Ok(d)) => d,
        };
        if let Some(b) = self.memory.blocked(user_id, d.revision, now) {
            // Looked at again when the hold ends, however often this
            // user is reconciled meanwhile (README "What a reconcile does").
            return Ok(Target::Failed {
                message: b.message,
                retry_at: Some(b.until),
            });
        }
        let image = d
            .image
            .clone()
            .unwrap_or_else(|| self.settings.image.clone());
        if !self.settings.image_allowed(&image) {
            return Ok(Target::Failed {
                message: format!(
                    "image {} is not allowed (--allowed-images: {})",
                    quote_short(image.as_str()),
                    self.settings.allowed_images
                ),
                retry_at: None,
            });
        }
        let intent = intent_of(d, now);
        let node = self.volume_node(&mut pass.row, canonical);
        let spec = |port| {
            let mut spec = DesiredSpec::named(
                &self.settings,
                names,
                user_id,
                &image,
                d.restart_nonce,
                port,
            );
            spec.node = node.clone();
            spec
        };
        if intent != Intent::Running && canonical.is_none() {
            let port = pass.row.host_port.filter(|p| self.ports.usable(*p));
            let spec = spec(port);
            return Ok(Target::Resting { intent, spec });
        }
        let sealed_token = self.seal_token(user_id, &mut pass.row, canonical)?;
        let (host_port, moved) = self
            .claim_port(user_id, canonical, &mut pass.row, now)
            .await?;
        if let Some(message) = moved {
            self.memory.note(user_id, d.revision, message);
        }
        let claim = Claim {
            sealed_token,
            host_port,
        };
        let blueprint = Blueprint::new(spec(Some(claim.host_port)), claim);
        Ok(Target::Present {
            intent,
            blueprint: Arc::new(blueprint),
        })
    }

    /// The node holding the user's state volume, where an engine with
    /// node-local volumes keeps them (README "Running on Docker Swarm"): the
    /// one the status row recorded, else the one their agent runs on now,
    /// recorded in `row` from this pass on. `None` on other engines.
    fn volume_node(
        &self,
        row: &mut ContainerStatus,
        canonical: Option<&ObservedContainer>,
    ) -> Option<String> {
        if !self.engine.pins_volumes() {
            return None;
        }
        if row.node.is_none() {
            row.node = canonical
                .filter(|c| c.state == RunState::Running && c.is_managed())
                .and_then(|c| c.placement.node.clone());
        }
        row.node.clone()
    }

    /// The user's sealed token, as the row to claim holds it: the one it
    /// has, else the one of the container taken over (`adopted`), else a
    /// new one. Never logged.
    fn seal_token(
        &self,
        user_id: &str,
        row: &mut ContainerStatus,
        adopted: Option<&ObservedContainer>,
    ) -> Result<String, ReconcileError> {
        let sealed_token = match row.gateway_token.as_deref() {
            None => {
                let token = match adopted.and_then(taken_over_token) {
                    Some(token) => token,
                    None => GatewayToken::generate()?,
                };
                self.keys.seal(user_id, &token)?
            }
            // A v1 token, or one sealed before a rotation, is sealed again as
            // it is: the plaintext, and so the container, stay. One that does
            // not open is left for `create` and `doctor` to report.
            Some(sealed) if self.keys.needs_reseal(sealed) => {
                match self.keys.open(user_id, sealed) {
                    Ok(token) => self.keys.seal(user_id, &token)?,
                    Err(_) => sealed.to_owned(),
                }
            }
            Some(sealed) => sealed.to_owned(),
        };
        row.gateway_token = Some(sealed_token.clone());
        Ok(sealed_token)
    }

    /// The user's port: the one in the status row, else the one the
    /// existing container publishes, else a new one; claimed in the status
    /// row (with the token) before it is used. When a container taken over
    /// cannot keep its port, also says why it moved.
    async fn claim_port(
        &self,
        user_id: &str,
        canonical: Option<&ObservedContainer>,
        row: &mut ContainerStatus,
        now: DateTime<Utc>,
    ) -> Result<(u16, Option<String>), ReconcileError> {
        if let Some(port) = row.host_port.filter(|p| self.ports.usable(*p)) {
            // The user's own port, whatever the probe may have found on it.
            self.ports.note_claimed(port);
            return Ok((port, None));
        }
        // A port out of the range or found busy is given up for another.
        if let Some(old) = row.host_port.take() {
            self.ports.release(old);
        }
        let mut moved = None;
        if let Some((c, port)) = canonical.and_then(|c| Some((c, c.host_port?))) {
            match self.keep_port(port, c, row, now).await? {
                None => return Ok((port, None)),
                Some(why) if !c.is_managed() => moved = Some((port, why)),
                Some(_) => {}
            }
        }
        if !self.ports.is_loaded() {
            self.ports.load(self.store.ports_in_use().await?);
        }
        let claim_row = row.clone();
        let port = self
            .ports
            .allocate(user_id, |port| {
                let mut candidate = claim_row.clone();
                candidate.host_port = Some(port);
                let store = self.store.clone();
                async move { store.write_status(&candidate, now).await }
            })
            .await?;
        row.host_port = Some(port);
        debug!(port, user = %quote_short(user_id), "claimed host port");
        let note = moved.map(|(old, why)| {
            warn!(from = old, to = port, reason = %why, "taken-over container moves to another host port");
            format!("host port {old} of the taken-over container {why}; moved to {port}")
        });
        Ok((port, note))
    }

    /// Claims `port`, which container `c` publishes, for the user; `None`
    /// when claimed, else why it cannot be kept.
    async fn keep_port(
        &self,
        port: u16,
        c: &ObservedContainer,
        row: &mut ContainerStatus,
        now: DateTime<Utc>,
    ) -> Result<Option<Unkept>, ReconcileError> {
        if !self.ports.range().contains(port) {
            return Ok(Some(Unkept::OutOfRange(self.ports.range())));
        }
        if !self.ports.usable(port) {
            return Ok(Some(Unkept::Refused));
        }
        // A running container holds its port itself; a stopped one taken
        // over holds nothing, and another process may have taken it since.
        let running = matches!(c.state, RunState::Running | RunState::Paused);
        if !c.is_managed() && !running && self.ports.held_elsewhere(port) {
            return Ok(Some(Unkept::HeldElsewhere));
        }
        row.host_port = Some(port);
        match self.store.write_status(row, now).await {
            Ok(()) => {
                self.ports.note_claimed(port);
                Ok(None)
            }
            Err(StoreError::PortTaken(_)) => {
                self.ports.note_claimed(port);
                row.host_port = None;
                Ok(Some(Unkept::ClaimedByAnother))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Why a container taken over does not keep its published host port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unkept {
    /// The port is outside `--port-range`.
    OutOfRange(PortRange),
    /// The engine refused it lately (quarantined).
    Refused,
    /// Another process listens on it.
    HeldElsewhere,
    /// Another user's status row holds it.
    ClaimedByAnother,
}

impl std::fmt::Display for Unkept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OutOfRange(range) => write!(f, "is outside --port-range {range}"),
            Self::Refused => f.write_str("was lately refused by the engine as taken"),
            Self::HeldElsewhere => f.write_str("is held by another process"),
            Self::ClaimedByAnother => f.write_str("is claimed by another user"),
        }
    }
}

/// The gateway token of a container clawfleet did not make (README "Taking
/// over from the original service"): `OPENCLAW_GATEWAY_TOKEN`, else
/// `AGENT_TOKEN`; `None` for one of ours or one without a token.
fn taken_over_token(c: &ObservedContainer) -> Option<GatewayToken> {
    if c.is_managed() {
        return None;
    }
    ["OPENCLAW_GATEWAY_TOKEN", "AGENT_TOKEN"]
        .iter()
        .filter_map(|key| c.env.get(*key))
        .find(|value| !value.expose().is_empty())
        .map(|value| GatewayToken::from_plaintext(value.expose().to_owned()))
}

/// Whether the row's container should run at `now`, and if not, why.
pub(super) fn intent_of(d: &DesiredContainer, now: DateTime<Utc>) -> Intent {
    d.intent(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::DesiredState;
    use crate::desired::InvalidRow;
    use crate::docker::SecretString;
    use crate::reconcile::memory::Blocked;
    use crate::reconcile::testing::{
        container, desired, names, now, pass, reconciler, secs, StubEngine, FIRST_PORT,
    };

    fn blueprint(target: &Target) -> &Arc<Blueprint> {
        match target {
            Target::Present { blueprint, .. } => blueprint,
            other => panic!("expected a present target, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_running_user_claims_a_port_and_a_token_in_its_status_row() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let mut p = pass(Some(desired(DesiredState::Running, 1)), None);
        let target = r.target(&mut p, &names(), None).await.unwrap();
        let b = blueprint(&target);
        assert_eq!(b.claim.host_port, FIRST_PORT);
        assert_eq!(b.spec.host_port, Some(FIRST_PORT));
        assert!(r.keys.open("alice", &b.claim.sealed_token).is_ok());
        let stored = r.store.status("alice").await.unwrap().expect("claimed");
        assert_eq!(stored.host_port, Some(FIRST_PORT));
        assert_eq!(stored.gateway_token.as_ref(), Some(&b.claim.sealed_token));
        assert_eq!(p.row.host_port, Some(FIRST_PORT));
    }

    #[tokio::test]
    async fn a_claimed_port_and_token_are_kept_on_later_passes() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let mut first = pass(Some(desired(DesiredState::Running, 1)), None);
        let claimed = blueprint(&r.target(&mut first, &names(), None).await.unwrap()).clone();
        let previous = r.store.status("alice").await.unwrap();
        let mut again = pass(Some(desired(DesiredState::Running, 2)), previous);
        let target = r.target(&mut again, &names(), None).await.unwrap();
        assert_eq!(blueprint(&target).claim, claimed.claim);
    }

    #[tokio::test]
    async fn an_existing_container_keeps_the_port_it_publishes() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let mut c = container(RunState::Exited, now());
        c.host_port = Some(FIRST_PORT + 3);
        let mut p = pass(Some(desired(DesiredState::Stopped, 1)), None);
        let target = r.target(&mut p, &names(), Some(&c)).await.unwrap();
        assert!(matches!(
            target,
            Target::Present {
                intent: Intent::Stopped,
                ..
            }
        ));
        assert_eq!(blueprint(&target).claim.host_port, FIRST_PORT + 3);
    }

    /// Alice's container as the original service left it: no labels, its
    /// token in `env`, publishing `port`.
    fn taken_over(state: RunState, port: u16, env: &[(&str, &str)]) -> ObservedContainer {
        let mut c = container(state, now());
        c.labels.clear();
        c.host_port = Some(port);
        c.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), SecretString::new(*v)))
            .collect();
        c
    }

    #[test]
    fn a_taken_over_token_is_the_openclaw_one_else_the_agent_one_and_never_ours() {
        let token = |env: &[(&str, &str)]| {
            taken_over_token(&taken_over(RunState::Running, FIRST_PORT, env))
                .map(|t| t.expose().to_owned())
        };
        assert_eq!(token(&[("AGENT_TOKEN", "a")]).as_deref(), Some("a"));
        let both = [("AGENT_TOKEN", "a"), ("OPENCLAW_GATEWAY_TOKEN", "o")];
        assert_eq!(token(&both).as_deref(), Some("o"));
        let empty = [("AGENT_TOKEN", "a"), ("OPENCLAW_GATEWAY_TOKEN", "")];
        assert_eq!(token(&empty).as_deref(), Some("a"));
        assert_eq!(token(&[]), None);
        let mut ours = taken_over(RunState::Running, FIRST_PORT, &[("AGENT_TOKEN", "a")]);
        ours.labels = crate::docker::object_labels("default", "alice");
        assert!(
            taken_over_token(&ours).is_none(),
            "ours gets the row's token"
        );
    }

    #[tokio::test]
    async fn a_taken_over_container_keeps_its_token_and_its_port_stopped() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let c = taken_over(
            RunState::Exited,
            FIRST_PORT + 4,
            &[("AGENT_TOKEN", "old-token")],
        );
        let mut p = pass(Some(desired(DesiredState::Stopped, 1)), None);
        let target = r.target(&mut p, &names(), Some(&c)).await.unwrap();
        assert!(matches!(
            target,
            Target::Present {
                intent: Intent::Stopped,
                ..
            }
        ));
        let b = blueprint(&target);
        assert_eq!(b.claim.host_port, FIRST_PORT + 4);
        let token = r.keys.open("alice", &b.claim.sealed_token).unwrap();
        assert_eq!(token.expose(), "old-token");
        assert_eq!(r.memory.note_for("alice", 1), None, "nothing moved");
    }

    #[tokio::test]
    async fn a_sealed_token_of_the_row_wins_over_the_taken_over_one() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let c = taken_over(
            RunState::Running,
            FIRST_PORT,
            &[("AGENT_TOKEN", "old-token")],
        );
        let mut first = pass(Some(desired(DesiredState::Running, 1)), None);
        let mut row = first.row.clone();
        let ours = r.seal_token("alice", &mut row, None).unwrap();
        first.row.gateway_token = Some(ours.clone());
        let target = r.target(&mut first, &names(), Some(&c)).await.unwrap();
        assert_eq!(blueprint(&target).claim.sealed_token, ours);
    }

    #[tokio::test]
    async fn a_taken_over_port_claimed_by_another_user_moves_and_says_why() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let mut bob = ContainerStatus::pending("bob", now());
        bob.host_port = Some(FIRST_PORT);
        r.store.write_status(&bob, now()).await.unwrap();
        let c = taken_over(RunState::Running, FIRST_PORT, &[]);
        let mut p = pass(Some(desired(DesiredState::Running, 1)), None);
        let target = r.target(&mut p, &names(), Some(&c)).await.unwrap();
        assert_eq!(blueprint(&target).claim.host_port, FIRST_PORT + 1);
        let note = r.memory.note_for("alice", 1).expect("a note");
        assert_eq!(
            note,
            "host port 19000 of the taken-over container is claimed by another user; moved to 19001"
        );
        assert_eq!(
            r.memory.note_for("alice", 2),
            None,
            "a changed row drops it"
        );
    }

    #[tokio::test]
    async fn a_taken_over_port_outside_the_range_moves_and_says_why() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let c = taken_over(RunState::Running, 8080, &[]);
        let mut p = pass(Some(desired(DesiredState::Running, 1)), None);
        let target = r.target(&mut p, &names(), Some(&c)).await.unwrap();
        assert_eq!(blueprint(&target).claim.host_port, FIRST_PORT);
        let note = r.memory.note_for("alice", 1).expect("a note");
        assert!(
            note.contains("8080") && note.contains("outside --port-range 19000-19009"),
            "{note}"
        );
    }

    #[tokio::test]
    async fn a_stopped_user_without_a_container_claims_nothing() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let mut p = pass(Some(desired(DesiredState::Stopped, 1)), None);
        let target = r.target(&mut p, &names(), None).await.unwrap();
        let Target::Resting { intent, spec } = target else {
            panic!("expected a resting target, got {target:?}");
        };
        assert_eq!(intent, Intent::Stopped);
        assert_eq!(spec.host_port, None);
        assert_eq!((p.row.host_port, p.row.gateway_token), (None, None));
        assert_eq!(r.store.status("alice").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_blocked_revision_fails_without_a_claim_until_the_row_changes() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let blocked = Blocked {
            revision: 1,
            until: now() + secs(300),
            message: "image not found".into(),
        };
        r.memory.block("alice", blocked);
        let mut p = pass(Some(desired(DesiredState::Running, 1)), None);
        let target = r.target(&mut p, &names(), None).await.unwrap();
        assert_eq!(
            target,
            Target::Failed {
                message: "image not found".into(),
                retry_at: Some(now() + secs(300)),
            }
        );
        assert_eq!(p.row.host_port, None);
        let mut changed = pass(Some(desired(DesiredState::Running, 2)), None);
        let target = r.target(&mut changed, &names(), None).await.unwrap();
        assert_eq!(blueprint(&target).claim.host_port, FIRST_PORT);
    }

    #[tokio::test]
    async fn an_invalid_row_fails_with_what_is_wrong() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let invalid = InvalidRow {
            user_id: "alice".into(),
            field: "state",
            reason: "\"banana\" is not running or stopped".into(),
            revision: 4,
        };
        let mut p = pass(Some(Err(invalid.clone())), None);
        let target = r.target(&mut p, &names(), None).await.unwrap();
        assert_eq!(
            target,
            Target::Failed {
                message: invalid.status_message(),
                retry_at: None,
            }
        );
        assert_eq!(p.row.observed_revision, Some(4));
    }

    #[tokio::test]
    async fn a_user_without_a_row_or_tombstone_is_removed_after_the_orphan_grace() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let mut p = pass(None, None);
        let target = r.target(&mut p, &names(), None).await.unwrap();
        let grace = chrono::Duration::from_std(r.options.orphan_grace).unwrap();
        assert_eq!(
            target,
            Target::Absent {
                remove_after: Some(now() + grace)
            }
        );
    }
}
