//! The end of a pass: the status row written (or deleted), and when to look
//! again.
//!
//! Invariants: a row is written only when it changed; a pass that failed
//! part-way keeps the revision the row last showed, so `ensure-running`
//! never takes the old container for the one asked for.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{debug, info};

use crate::docker::{Engine, RunState};
use crate::plan::{Plan, StatusIntent, Target};
use crate::status::{ContainerStatus, Phase};

use super::{Blocked, Outcome, Pass, ReconcileError, Reconciler};

impl<E: Engine> Reconciler<E> {
    /// Writes what `plan` for `target` left of `pass` and says when to look again.
    pub(super) async fn finish(
        &self,
        plan: &Plan,
        target: &Target,
        pass: Pass<'_>,
    ) -> Result<Outcome, ReconcileError> {
        let Pass {
            user_id,
            desired,
            previous,
            mut row,
            current,
            now,
            ..
        } = pass;
        let acted = !plan.actions.is_empty();
        let phase = match &plan.status {
            StatusIntent::Delete => {
                if let Some(previous) = previous {
                    self.store.delete_status(user_id).await?;
                    if let Some(port) = previous.host_port {
                        self.ports.release(port);
                    }
                    info!("user gone; status removed");
                }
                self.memory.forget(user_id);
                return Ok(Outcome {
                    requeue_after: plan.requeue_after,
                    converged: !acted,
                    phase: None,
                    actions: plan.actions.len(),
                    desired_state: None,
                });
            }
            StatusIntent::Write { phase, message } => {
                // A container just started is not yet seen running: the look
                // that follows at once says `running` (with its health).
                let phase = match (*phase, acted) {
                    (Phase::Running, true) => Phase::Starting,
                    (phase, _) => phase,
                };
                set_phase(&mut row, phase, now);
                let revision = desired.as_ref().and_then(|d| d.as_ref().ok());
                row.message = message
                    .clone()
                    .or_else(|| revision.and_then(|d| self.memory.note_for(user_id, d.revision)));
                phase
            }
        };
        row.container_id = current.as_ref().map(|c| c.id.clone());
        row.container_name = current.as_ref().map(|c| c.name.clone());
        // After acting, what the engine now holds is seen on the next look.
        // Docker keeps the last health result of a stopped container; only a
        // running one has a health worth reporting.
        row.health = match &current {
            Some(c) if !acted && c.state == RunState::Running => {
                crate::status::Health::of_container(c.health)
            }
            _ => None,
        };
        if let Some(spec) = target.spec() {
            row.url = current.as_ref().map(|_| spec.url());
            // On Swarm in host publish mode the port answers only on the
            // user's node (README "Running on Docker Swarm").
            let node_addr = current
                .as_ref()
                .and_then(|c| c.placement.node_addr.as_deref());
            row.host_url = match (node_addr.and_then(|a| a.parse().ok()), spec.host_port) {
                (Some(std::net::IpAddr::V6(ip)), Some(port)) => {
                    Some(format!("http://[{ip}]:{port}"))
                }
                (Some(ip), Some(port)) => Some(format!("http://{ip}:{port}")),
                _ => spec.host_url(&self.settings),
            };
        }
        self.write(&row, previous.as_ref(), now).await?;

        let mut requeue = plan.requeue_after;
        if acted {
            // Look again at once: the next reconcile observes what the actions did.
            requeue = Some(Duration::ZERO);
        } else if let Some(deadline) = desired
            .as_ref()
            .and_then(|d| d.as_ref().ok())
            .and_then(|d| d.idle_deadline())
        {
            if deadline > now {
                let wait = (deadline - now).to_std().unwrap_or_default();
                requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
            }
        }
        let converged = !acted && plan.requeue_after.is_none() && phase != Phase::Failed;
        Ok(Outcome {
            requeue_after: requeue,
            converged,
            phase: Some(phase),
            actions: plan.actions.len(),
            desired_state: None,
        })
    }

    /// Reports an error that needs a human (`failed`, with its message) after
    /// `actions` planned actions; the row's revision is not tried again
    /// before the slow retry unless the row changes.
    pub(super) async fn needs_human(
        &self,
        mut pass: Pass<'_>,
        error: ReconcileError,
        actions: usize,
    ) -> Result<Outcome, ReconcileError> {
        let row_names_image = matches!(&pass.desired, Some(Ok(d)) if d.image.is_some());
        let message = error.status_message(row_names_image);
        if let Some(Ok(d)) = pass.desired.as_ref() {
            let retry = chrono::Duration::from_std(self.options.needs_human_retry);
            let blocked = Blocked {
                revision: d.revision,
                until: pass.now + retry.unwrap_or_default(),
                message: message.clone(),
            };
            self.memory.block(pass.user_id, blocked);
        }
        pass.row.message = Some(message);
        set_phase(&mut pass.row, Phase::Failed, pass.now);
        self.write(&pass.row, pass.previous.as_ref(), pass.now)
            .await?;
        Ok(Outcome {
            requeue_after: Some(self.options.needs_human_retry),
            converged: false,
            phase: Some(Phase::Failed),
            actions,
            desired_state: None,
        })
    }

    /// Writes the row when it differs from what is stored.
    pub(super) async fn write(
        &self,
        row: &ContainerStatus,
        previous: Option<&ContainerStatus>,
        now: DateTime<Utc>,
    ) -> Result<(), ReconcileError> {
        let unchanged = previous.is_some_and(|p| {
            ContainerStatus {
                updated_at: p.updated_at,
                ..row.clone()
            } == *p
        });
        if !unchanged {
            self.store.write_status(row, now).await?;
        }
        Ok(())
    }

    /// Reports a transient error in the status row (best effort) and hands it back.
    ///
    /// The row keeps the revision it last showed: this reconcile did not
    /// finish acting on the revision it read, and `ensure-running` takes an
    /// `observed_revision` at or past its own as "this container is the one
    /// you asked for" (regression: it handed out the old container).
    pub(super) async fn record_error(
        &self,
        pass: Pass<'_>,
        error: ReconcileError,
    ) -> ReconcileError {
        let Pass {
            previous,
            mut row,
            now,
            ..
        } = pass;
        row.observed_revision = previous.as_ref().and_then(|p| p.observed_revision);
        row.message = Some(error.to_string());
        if let Err(e) = self.write(&row, previous.as_ref(), now).await {
            debug!(error = %e, "could not record the error in the status row");
        }
        error
    }
}

/// Moves `row` to `phase`, dating the transition only when the phase changes.
pub(super) fn set_phase(row: &mut ContainerStatus, phase: Phase, now: DateTime<Utc>) {
    if row.phase != phase {
        row.phase = phase;
        row.last_transition_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::DesiredState;
    use crate::plan::Action;
    use crate::reconcile::testing::{desired, now, pass, reconciler, secs, StubEngine};

    fn write(phase: Phase, message: Option<&str>) -> Plan {
        Plan {
            actions: Vec::new(),
            status: StatusIntent::Write {
                phase,
                message: message.map(str::to_owned),
            },
            requeue_after: None,
        }
    }

    fn failed() -> Target {
        Target::Failed {
            message: "boom".into(),
            retry_at: None,
        }
    }

    #[tokio::test]
    async fn the_phase_message_and_revision_read_are_written() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let p = pass(Some(desired(DesiredState::Running, 3)), None);
        let plan = write(Phase::Failed, Some("boom"));
        let outcome = r.finish(&plan, &failed(), p).await.unwrap();
        assert_eq!(outcome.phase, Some(Phase::Failed));
        assert!(!outcome.converged, "a failure is not converged");
        let stored = r.store.status("alice").await.unwrap().unwrap();
        assert_eq!(stored.phase, Phase::Failed);
        assert_eq!(stored.message.as_deref(), Some("boom"));
        assert_eq!(stored.observed_revision, Some(3));
        assert_eq!(stored.last_transition_at, now());
    }

    #[tokio::test]
    async fn running_right_after_acting_is_written_as_starting_and_looked_at_at_once() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let p = pass(Some(desired(DesiredState::Running, 1)), None);
        let mut plan = write(Phase::Running, None);
        plan.actions.push(Action::RemoveStray {
            id: "s1".into(),
            name: "mosaic-user-alice-next".into(),
        });
        let outcome = r.finish(&plan, &failed(), p).await.unwrap();
        assert_eq!(outcome.phase, Some(Phase::Starting));
        assert_eq!(outcome.requeue_after, Some(Duration::ZERO));
        assert!(!outcome.converged);
    }

    #[tokio::test]
    async fn an_unchanged_row_is_not_written_again() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let row = pass(None, None).row;
        r.write(&row, None, now()).await.unwrap();
        let stored = r.store.status("alice").await.unwrap().unwrap();
        r.write(&row, Some(&stored), now() + secs(60))
            .await
            .unwrap();
        let again = r.store.status("alice").await.unwrap().unwrap();
        assert_eq!(again.updated_at, now(), "not rewritten");
        let changed = ContainerStatus {
            message: Some("pulling image".into()),
            ..row
        };
        r.write(&changed, Some(&stored), now() + secs(60))
            .await
            .unwrap();
        let after = r.store.status("alice").await.unwrap().unwrap();
        assert_eq!(after.updated_at, now() + secs(60));
    }

    #[tokio::test]
    async fn a_transient_error_keeps_the_revision_the_row_last_showed() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let mut shown = pass(Some(desired(DesiredState::Running, 2)), None).row;
        shown.phase = Phase::Running;
        r.write(&shown, None, now()).await.unwrap();
        let previous = r.store.status("alice").await.unwrap();
        let p = pass(Some(desired(DesiredState::Running, 3)), previous);
        let error = ReconcileError::ForeignVolume {
            volume: "v".into(),
            holder: "h".into(),
        };
        let message = error.to_string();
        r.record_error(p, error).await;
        let stored = r.store.status("alice").await.unwrap().unwrap();
        assert_eq!(stored.observed_revision, Some(2));
        assert_eq!(stored.message, Some(message));
        assert_eq!(stored.phase, Phase::Running);
    }

    #[tokio::test]
    async fn a_failure_that_needs_a_human_blocks_its_revision() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let p = pass(Some(desired(DesiredState::Running, 5)), None);
        let error = ReconcileError::ForeignVolume {
            volume: "v".into(),
            holder: "h".into(),
        };
        let message = error.to_string();
        let outcome = r.needs_human(p, error, 2).await.unwrap();
        assert_eq!(outcome.phase, Some(Phase::Failed));
        assert_eq!(outcome.actions, 2);
        assert_eq!(outcome.requeue_after, Some(r.options.needs_human_retry));
        let blocked = r.memory.blocked("alice", 5, now()).expect("blocked");
        assert_eq!(blocked.message, message);
        let stored = r.store.status("alice").await.unwrap().unwrap();
        assert_eq!(
            (stored.phase, stored.message),
            (Phase::Failed, Some(message))
        );
    }

    #[tokio::test]
    async fn a_gone_user_loses_its_status_row_and_what_is_remembered() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        r.write(&pass(None, None).row, None, now()).await.unwrap();
        r.memory.orphan_since("alice", now());
        let previous = r.store.status("alice").await.unwrap();
        let plan = Plan {
            actions: Vec::new(),
            status: StatusIntent::Delete,
            requeue_after: None,
        };
        let target = Target::Absent { remove_after: None };
        let outcome = r
            .finish(&plan, &target, pass(None, previous))
            .await
            .unwrap();
        assert_eq!((outcome.phase, outcome.converged), (None, true));
        assert_eq!(r.store.status("alice").await.unwrap(), None);
        assert_eq!(
            r.memory.orphan_since("alice", now() + secs(9)),
            now() + secs(9)
        );
    }

    #[test]
    fn a_transition_is_dated_only_when_the_phase_changes() {
        let mut row = ContainerStatus::pending("alice", now());
        set_phase(&mut row, Phase::Pending, now() + secs(5));
        assert_eq!(row.last_transition_at, now());
        set_phase(&mut row, Phase::Creating, now() + secs(5));
        assert_eq!(
            (row.phase, row.last_transition_at),
            (Phase::Creating, now() + secs(5))
        );
    }
}
