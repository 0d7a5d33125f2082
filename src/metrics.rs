//! Prometheus metrics: one registry, names after Prometheus conventions and
//! controller-runtime's, all prefixed `clawfleet_`, plus the standard
//! `process_*` metrics.
//!
//! Invariants: label values come from small fixed sets (never a user id,
//! container name or image); every counter's label combinations are created
//! at start, so `rate()` works from the first scrape; gauges that describe
//! state (queue depth, containers by phase) are computed when scraped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::controller::{Handle, ReconcileObserver};
use crate::docker::{EngineEvent, EngineObserver, Op};
use crate::events::EventObserver;
use crate::queue::{QueueObserver, Trigger};
use crate::reconcile::{Priority, Telemetry, DESIRED_STATES, RESTART_REASONS};
use crate::status::Phase;

/// `result` label values of `clawfleet_reconcile_total`.
pub const RECONCILE_RESULTS: [&str; 4] = ["success", "error", "requeue", "requeue_after"];
/// `kind` label values of `clawfleet_reconcile_errors_total`.
pub const ERROR_KINDS: [&str; 11] = [
    "database",
    "unreachable",
    "not_found",
    "name_conflict",
    "image_not_found",
    "port_allocated",
    "api",
    "secrets",
    "ports_exhausted",
    "panic",
    "isolation",
];
/// `action` label values of `clawfleet_docker_events_total` (Docker's actions, bucketed).
pub const EVENT_ACTIONS: [&str; 11] = [
    "create",
    "start",
    "die",
    "stop",
    "kill",
    "destroy",
    "rename",
    "restart",
    "health_status",
    "oom",
    "other",
];

fn event_action(action: &str) -> &'static str {
    let head = action.split(':').next().unwrap_or(action).trim();
    EVENT_ACTIONS
        .iter()
        .copied()
        .find(|a| *a == head)
        .unwrap_or("other")
}

/// Latency buckets for Docker calls and reconciles (seconds).
const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for waits in the queue and container starts (seconds).
const WAIT: &[f64] = &[
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// All of clawfleet's metrics.
pub struct Metrics {
    registry: Registry,
    reconcile_total: IntCounterVec,
    reconcile_errors_total: IntCounterVec,
    reconcile_triggers_total: IntCounterVec,
    reconcile_duration: Histogram,
    workqueue_depth: IntGauge,
    workqueue_delayed: IntGauge,
    workqueue_adds_total: IntCounter,
    workqueue_retries_total: IntCounter,
    workqueue_queue_duration: Histogram,
    workqueue_work_duration: Histogram,
    workqueue_longest_running: Gauge,
    workqueue_unfinished_work: Gauge,
    containers: IntGaugeVec,
    desired_containers: IntGaugeVec,
    docker_events_total: IntCounterVec,
    docker_event_stream_connected: IntGauge,
    docker_event_stream_reconnects_total: IntCounter,
    docker_requests_total: IntCounterVec,
    docker_request_duration: HistogramVec,
    container_start_duration: Histogram,
    engine_turn_wait: HistogramVec,
    idle_stops_total: IntCounter,
    container_restarts_total: IntCounterVec,
    last_full_resync: Gauge,
    leader: IntGauge,
    build_info: IntGaugeVec,
    swarm_tasks: IntGaugeVec,
    task_states: Mutex<Option<TaskStates>>,
    handle: Mutex<Option<Handle>>,
}

/// The task states `clawfleet_swarm_tasks` always reports (0 on the Docker backend).
const SWARM_TASK_STATES: [&str; 9] = [
    "pending",
    "assigned",
    "preparing",
    "starting",
    "running",
    "complete",
    "shutdown",
    "failed",
    "rejected",
];

/// Reads the Swarm backend's tasks by state at scrape time.
type TaskStates = Box<dyn Fn() -> std::collections::BTreeMap<String, u64> + Send + Sync>;

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

impl Metrics {
    /// A registry with every metric created and every counter initialised.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::build().expect("metric definitions are valid and unique"))
    }

    fn build() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let m = Self {
            reconcile_total: IntCounterVec::new(
                opts("clawfleet_reconcile_total", "Reconciles by result."),
                &["result"],
            )?,
            reconcile_errors_total: IntCounterVec::new(
                opts("clawfleet_reconcile_errors_total", "Failed reconciles by kind of error."),
                &["kind"],
            )?,
            reconcile_triggers_total: IntCounterVec::new(
                opts(
                    "clawfleet_reconcile_triggers_total",
                    "Reconciles by what made them run (row_change, docker_event, timer, retry, resync, api).",
                ),
                &["trigger"],
            )?,
            reconcile_duration: Histogram::with_opts(histogram(
                "clawfleet_reconcile_duration_seconds",
                "Time one reconcile of one user takes.",
                LATENCY,
            ))?,
            workqueue_depth: IntGauge::with_opts(opts(
                "clawfleet_workqueue_depth",
                "Users due for a reconcile and waiting for a worker.",
            ))?,
            workqueue_delayed: IntGauge::with_opts(opts(
                "clawfleet_workqueue_delayed",
                "Users waiting for a timer (idle deadline, back-off, requeue).",
            ))?,
            workqueue_adds_total: IntCounter::with_opts(opts(
                "clawfleet_workqueue_adds_total",
                "Users made due for a reconcile.",
            ))?,
            workqueue_retries_total: IntCounter::with_opts(opts(
                "clawfleet_workqueue_retries_total",
                "Reconciles scheduled again with back-off after a failure.",
            ))?,
            workqueue_queue_duration: Histogram::with_opts(histogram(
                "clawfleet_workqueue_queue_duration_seconds",
                "Time a user waits in the queue between becoming due and being reconciled.",
                WAIT,
            ))?,
            workqueue_work_duration: Histogram::with_opts(histogram(
                "clawfleet_workqueue_work_duration_seconds",
                "Time a worker spends on one user.",
                LATENCY,
            ))?,
            workqueue_longest_running: Gauge::with_opts(opts(
                "clawfleet_workqueue_longest_running_seconds",
                "How long the longest-running reconcile in flight has been running.",
            ))?,
            workqueue_unfinished_work: Gauge::with_opts(opts(
                "clawfleet_workqueue_unfinished_work_seconds",
                "Sum of the time the reconciles in flight have been running.",
            ))?,
            containers: IntGaugeVec::new(
                opts("clawfleet_containers", "Users by the phase last written to container_status."),
                &["phase"],
            )?,
            desired_containers: IntGaugeVec::new(
                opts(
                    "clawfleet_desired_containers",
                    "Desired rows by effective state (running, stopped, idle, invalid).",
                ),
                &["state"],
            )?,
            docker_events_total: IntCounterVec::new(
                opts("clawfleet_docker_events_total", "Docker events received for this instance's containers."),
                &["action"],
            )?,
            docker_event_stream_connected: IntGauge::with_opts(opts(
                "clawfleet_docker_event_stream_connected",
                "1 while the Docker event stream is connected.",
            ))?,
            docker_event_stream_reconnects_total: IntCounter::with_opts(opts(
                "clawfleet_docker_event_stream_reconnects_total",
                "Times the Docker event stream was re-established.",
            ))?,
            docker_requests_total: IntCounterVec::new(
                opts("clawfleet_docker_requests_total", "Docker API calls by operation and result."),
                &["op", "result"],
            )?,
            docker_request_duration: HistogramVec::new(
                histogram(
                    "clawfleet_docker_request_duration_seconds",
                    "Docker API call latency by operation.",
                    LATENCY,
                ),
                &["op"],
            )?,
            container_start_duration: Histogram::with_opts(histogram(
                "clawfleet_container_start_duration_seconds",
                "Time from a user first seen desired running and not running to its container seen running.",
                WAIT,
            ))?,
            engine_turn_wait: HistogramVec::new(
                histogram(
                    "clawfleet_engine_turn_wait_seconds",
                    "Time a create or start waited for its turn at the engine, by priority (wake, bulk).",
                    WAIT,
                ),
                &["priority"],
            )?,
            idle_stops_total: IntCounter::with_opts(opts(
                "clawfleet_idle_stops_total",
                "Containers stopped at their idle deadline.",
            ))?,
            container_restarts_total: IntCounterVec::new(
                opts("clawfleet_container_restarts_total", "Restarts of crashed or unhealthy containers."),
                &["reason"],
            )?,
            last_full_resync: Gauge::with_opts(opts(
                "clawfleet_last_full_resync_timestamp_seconds",
                "Unix time of the last full resync.",
            ))?,
            leader: IntGauge::with_opts(opts(
                "clawfleet_leader",
                "1 when this process is the one reconciling.",
            ))?,
            build_info: IntGaugeVec::new(
                opts("clawfleet_build_info", "Build information; always 1."),
                &["version", "backend"],
            )?,
            swarm_tasks: IntGaugeVec::new(
                opts(
                    "clawfleet_swarm_tasks",
                    "Swarm backend: users' current tasks by Swarm task state, as last listed.",
                ),
                &["state"],
            )?,
            task_states: Mutex::new(None),
            handle: Mutex::new(None),
            registry,
        };
        m.set_backend("docker");
        for state in SWARM_TASK_STATES {
            m.swarm_tasks.with_label_values(&[state]).set(0);
        }
        m.registry.register(Box::new(m.build_info.clone()))?;
        m.registry.register(Box::new(m.swarm_tasks.clone()))?;
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for c in [
            &m.reconcile_total,
            &m.reconcile_errors_total,
            &m.reconcile_triggers_total,
            &m.docker_events_total,
            &m.docker_requests_total,
            &m.container_restarts_total,
        ] {
            m.registry.register(Box::new(c.clone()))?;
        }
        for c in [
            &m.workqueue_adds_total,
            &m.workqueue_retries_total,
            &m.docker_event_stream_reconnects_total,
            &m.idle_stops_total,
        ] {
            m.registry.register(Box::new(c.clone()))?;
        }
        for h in [
            &m.reconcile_duration,
            &m.workqueue_queue_duration,
            &m.workqueue_work_duration,
            &m.container_start_duration,
        ] {
            m.registry.register(Box::new(h.clone()))?;
        }
        m.registry
            .register(Box::new(m.docker_request_duration.clone()))?;
        m.registry.register(Box::new(m.engine_turn_wait.clone()))?;
        for g in [
            &m.workqueue_depth,
            &m.workqueue_delayed,
            &m.docker_event_stream_connected,
            &m.leader,
        ] {
            m.registry.register(Box::new(g.clone()))?;
        }
        for g in [
            &m.workqueue_longest_running,
            &m.workqueue_unfinished_work,
            &m.last_full_resync,
        ] {
            m.registry.register(Box::new(g.clone()))?;
        }
        m.registry.register(Box::new(m.containers.clone()))?;
        m.registry
            .register(Box::new(m.desired_containers.clone()))?;

        for r in RECONCILE_RESULTS {
            m.reconcile_total.with_label_values(&[r]);
        }
        for k in ERROR_KINDS {
            m.reconcile_errors_total.with_label_values(&[k]);
        }
        for p in Priority::ALL {
            m.engine_turn_wait.with_label_values(&[p.as_str()]);
        }
        for t in Trigger::ALL {
            m.reconcile_triggers_total.with_label_values(&[t.as_str()]);
        }
        for a in EVENT_ACTIONS {
            m.docker_events_total.with_label_values(&[a]);
        }
        for op in Op::ALL {
            for result in ["ok", "error"] {
                m.docker_requests_total
                    .with_label_values(&[op.as_str(), result]);
            }
            m.docker_request_duration.with_label_values(&[op.as_str()]);
        }
        for reason in RESTART_REASONS {
            m.container_restarts_total.with_label_values(&[reason]);
        }
        for phase in Phase::ALL {
            m.containers.with_label_values(&[phase.as_str()]);
        }
        for state in DESIRED_STATES {
            m.desired_containers.with_label_values(&[state]);
        }
        Ok(m)
    }

    /// Lets scrapes read the running controller's queue and progress.
    pub fn attach(&self, handle: Handle) {
        *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }

    /// Forgets the controller of a term that ended: a standby reports no
    /// queue, no containers and no event stream of its own.
    pub fn detach(&self) {
        *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for g in [
            &self.workqueue_depth,
            &self.workqueue_delayed,
            &self.docker_event_stream_connected,
        ] {
            g.set(0);
        }
        self.workqueue_longest_running.set(0.0);
        self.workqueue_unfinished_work.set(0.0);
        for phase in Phase::ALL {
            self.containers.with_label_values(&[phase.as_str()]).set(0);
        }
        for state in DESIRED_STATES {
            self.desired_containers.with_label_values(&[state]).set(0);
        }
    }

    /// Sets the `backend` label of `clawfleet_build_info` (`docker` until told).
    pub fn set_backend(&self, backend: &str) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), backend])
            .set(1);
    }

    /// Reports `clawfleet_swarm_tasks` from `swarm`'s task watcher at each
    /// scrape, and `backend="swarm"` in `clawfleet_build_info`.
    pub fn watch_swarm_tasks(&self, swarm: crate::docker::SwarmEngine) {
        self.set_backend("swarm");
        *self.task_states.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Box::new(move || swarm.task_states()));
    }

    /// Sets `clawfleet_leader`.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The Prometheus text exposition of every metric, state gauges freshly computed.
    pub fn render(&self) -> String {
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(handle) = handle {
            let stats = handle.queue.stats();
            self.workqueue_depth.set(stats.ready as i64);
            self.workqueue_delayed.set(stats.delayed as i64);
            self.workqueue_longest_running
                .set(stats.longest_running.as_secs_f64());
            self.workqueue_unfinished_work
                .set(stats.unfinished_work.as_secs_f64());
            let summary = handle.progress.summary();
            for phase in Phase::ALL {
                let n = summary.by_phase.get(&phase).copied().unwrap_or(0);
                self.containers
                    .with_label_values(&[phase.as_str()])
                    .set(n as i64);
            }
            for state in DESIRED_STATES {
                let n = summary.by_desired.get(state).copied().unwrap_or(0);
                self.desired_containers
                    .with_label_values(&[state])
                    .set(n as i64);
            }
        }
        if let Some(states) = self
            .task_states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            self.swarm_tasks.reset();
            for state in SWARM_TASK_STATES {
                self.swarm_tasks.with_label_values(&[state]).set(0);
            }
            for (state, n) in states() {
                self.swarm_tasks
                    .with_label_values(&[state.as_str()])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl QueueObserver for Metrics {
    fn added(&self) {
        self.workqueue_adds_total.inc();
    }
    fn retried(&self) {
        self.workqueue_retries_total.inc();
    }
    fn handed_out(&self, waited: Duration) {
        self.workqueue_queue_duration.observe(waited.as_secs_f64());
    }
    fn finished(&self, worked: Duration) {
        self.workqueue_work_duration.observe(worked.as_secs_f64());
    }
}

impl EventObserver for Metrics {
    fn event(&self, event: &EngineEvent) {
        self.docker_events_total
            .with_label_values(&[event_action(&event.action)])
            .inc();
    }
    fn connected(&self, connected: bool) {
        self.docker_event_stream_connected.set(i64::from(connected));
    }
    fn reconnected(&self) {
        self.docker_event_stream_reconnects_total.inc();
    }
}

impl ReconcileObserver for Metrics {
    fn reconciled(&self, result: &'static str, error_kind: Option<&'static str>, seconds: f64) {
        self.reconcile_total.with_label_values(&[result]).inc();
        if let Some(kind) = error_kind {
            self.reconcile_errors_total.with_label_values(&[kind]).inc();
        }
        self.reconcile_duration.observe(seconds);
    }
    fn resynced(&self, _users: usize) {
        let now = chrono::Utc::now();
        self.last_full_resync
            .set(now.timestamp() as f64 + f64::from(now.timestamp_subsec_millis()) / 1e3);
    }
    fn triggered(&self, trigger: Trigger) {
        self.reconcile_triggers_total
            .with_label_values(&[trigger.as_str()])
            .inc();
    }
}

impl Telemetry for Metrics {
    fn container_started(&self, waited: Duration) {
        self.container_start_duration.observe(waited.as_secs_f64());
    }
    fn idle_stop(&self) {
        self.idle_stops_total.inc();
    }
    fn restarted(&self, reason: &'static str) {
        self.container_restarts_total
            .with_label_values(&[reason])
            .inc();
    }
    fn engine_turn(&self, priority: Priority, waited: Duration) {
        self.engine_turn_wait
            .with_label_values(&[priority.as_str()])
            .observe(waited.as_secs_f64());
    }
}

impl EngineObserver for Metrics {
    fn request(&self, op: Op, ok: bool, seconds: f64) {
        self.docker_requests_total
            .with_label_values(&[op.as_str(), if ok { "ok" } else { "error" }])
            .inc();
        self.docker_request_duration
            .with_label_values(&[op.as_str()])
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_exported_from_the_first_scrape() {
        let m = Metrics::new();
        let text = m.render();
        for line in [
            "clawfleet_reconcile_total{result=\"success\"} 0",
            "clawfleet_reconcile_errors_total{kind=\"database\"} 0",
            "clawfleet_reconcile_triggers_total{trigger=\"row_change\"} 0",
            "clawfleet_reconcile_triggers_total{trigger=\"api\"} 0",
            "clawfleet_docker_events_total{action=\"die\"} 0",
            "clawfleet_docker_requests_total{op=\"create\",result=\"error\"} 0",
            "clawfleet_container_restarts_total{reason=\"crash\"} 0",
            "clawfleet_containers{phase=\"failed\"} 0",
            "clawfleet_desired_containers{state=\"idle\"} 0",
            "clawfleet_workqueue_adds_total 0",
            "clawfleet_idle_stops_total 0",
            "clawfleet_leader 0",
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        assert!(text.contains(&format!(
            "clawfleet_build_info{{backend=\"docker\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("process_resident_memory_bytes"));
    }

    #[test]
    fn docker_actions_are_bucketed_into_a_fixed_set() {
        assert_eq!(event_action("health_status: unhealthy"), "health_status");
        assert_eq!(event_action("die"), "die");
        assert_eq!(event_action("exec_start: sh -c x"), "other");
        assert_eq!(event_action("attach"), "other");
    }

    #[test]
    fn observations_move_the_counters() {
        let m = Metrics::new();
        m.reconciled("error", Some("database"), 0.01);
        m.triggered(Trigger::DockerEvent);
        m.restarted("crash");
        m.request(Op::Create, true, 0.02);
        let text = m.render();
        assert!(text.contains("clawfleet_reconcile_total{result=\"error\"} 1"));
        assert!(text.contains("clawfleet_reconcile_errors_total{kind=\"database\"} 1"));
        assert!(text.contains("clawfleet_reconcile_triggers_total{trigger=\"docker_event\"} 1"));
        assert!(text.contains("clawfleet_container_restarts_total{reason=\"crash\"} 1"));
        assert!(text.contains("clawfleet_docker_requests_total{op=\"create\",result=\"ok\"} 1"));
    }
}
