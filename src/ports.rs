//! Host port allocation: unique among `container_status` rows, and never a
//! port some other process already listens on.
//!
//! Two guards make a port safe to hand out. Within this process a mutex
//! serialises choices, so concurrent reconciles never pick the same port.
//! Across processes the UNIQUE index on `container_status.host_port` does:
//! a port is claimed by writing it, and a losing writer gets
//! [`StoreError::PortTaken`] and tries the next port. Before a port is
//! offered, binding it on the publish address proves no foreign process
//! holds it; a port the engine later reports "already allocated" is
//! quarantined for a while (the original service did neither, and handed two
//! users one port).
//!
//! Invariants:
//! - the allocator keeps its own view of the claimed ports, loaded once from
//!   the table and updated with every port it hands out, every port a lost
//!   claim shows to be held by another row, and every port released, so an
//!   allocation costs no table scan. The view may only err on the side of
//!   "taken": a port claimed elsewhere is discovered by the failed claim;
//! - a port in the view is never probed, so the listener the engine runs for
//!   one of this instance's own containers is never mistaken for a foreign
//!   one; and a port the probe found busy only keeps new users off it: it
//!   never moves a user who already holds it ([`usable`](PortAllocator::usable)
//!   reads only the engine's refusals);
//! - one allocation tries each port of the range at most once, so a full
//!   range ends in [`PortError::Exhausted`], never in a loop of claims;
//! - a user refused for a full range is remembered, and handed back by
//!   [`freed`](PortAllocator::freed) once a port of the range is released
//!   (README, "Operations": an exhausted port range).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::PortRange;
use crate::store::StoreError;

/// How long a port found busy is skipped before it is tried again.
pub const QUARANTINE: Duration = Duration::from_secs(600);

/// Allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Every port of the range is in use, claimed or quarantined.
    #[error("port range {range} is exhausted: {claimed} ports held by users, {busy} by other processes; widen it with --port-range or CLAWFLEET_PORT_RANGE")]
    Exhausted {
        /// The configured range.
        range: PortRange,
        /// Ports of the range held by status rows.
        claimed: usize,
        /// Other ports of the range found busy (quarantined).
        busy: usize,
    },
    /// Reading or claiming in the database failed.
    #[error("port allocation failed: {0}")]
    Store(#[from] StoreError),
}

/// Hands out host ports from a range.
#[derive(Debug)]
pub struct PortAllocator {
    range: PortRange,
    publish_ip: IpAddr,
    /// Probe ports by binding them (off in simulations, where nothing listens).
    probe: bool,
    state: Mutex<State>,
    /// Signalled when a port is released while users wait for one.
    freed: Notify,
    /// Times the quarantines.
    clock: Clock,
}

#[derive(Debug, Default)]
struct State {
    /// Ports held by status rows, once loaded.
    claimed: Option<HashSet<u16>>,
    /// Ports the engine refused ("already allocated"): nobody may use them.
    refused: HashMap<u16, Instant>,
    /// Ports the bind probe found held by another process: not handed out.
    busy: HashMap<u16, Instant>,
    /// Users refused for a full range, to be tried again when a port frees.
    waiting: BTreeSet<String>,
    /// Where the next search starts, so freed ports are not reused at once.
    cursor: u16,
}

impl PortAllocator {
    /// An allocator over `range`, probing ports on `publish_ip`.
    pub fn new(range: PortRange, publish_ip: IpAddr) -> Self {
        Self {
            range,
            publish_ip,
            probe: true,
            state: Mutex::new(State {
                cursor: range.start(),
                ..State::default()
            }),
            freed: Notify::new(),
            clock: Clock::system(),
        }
    }

    /// Times quarantines by `clock` instead of the system clock (give the
    /// reconciler the same one).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Skips the bind probe (for simulated engines, where no real port is involved).
    pub fn without_probe(mut self) -> Self {
        self.probe = false;
        self
    }

    /// The range.
    pub fn range(&self) -> PortRange {
        self.range
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once the claimed ports were loaded from the table.
    pub fn is_loaded(&self) -> bool {
        self.lock().claimed.is_some()
    }

    /// Adds the ports status rows hold to the view.
    pub fn load(&self, in_use: impl IntoIterator<Item = u16>) {
        self.lock()
            .claimed
            .get_or_insert_with(HashSet::new)
            .extend(in_use);
    }

    /// Records a port claimed outside [`allocate`](Self::allocate) (a user
    /// keeping its port, or a port another row was found to hold).
    pub fn note_claimed(&self, port: u16) {
        if let Some(claimed) = self.lock().claimed.as_mut() {
            claimed.insert(port);
        }
    }

    /// Records that no status row holds `port` any more; users waiting for a
    /// port are woken when it can be handed out again.
    pub fn release(&self, port: u16) {
        let mut state = self.lock();
        let Some(claimed) = state.claimed.as_mut() else {
            return;
        };
        let reusable = claimed.remove(&port)
            && self.range.contains(port)
            && !state.refused.contains_key(&port);
        if reusable && !state.waiting.is_empty() {
            self.freed.notify_one();
        }
    }

    /// Marks `port` unusable for [`QUARANTINE`] (the engine said it is taken).
    pub fn quarantine(&self, port: u16) {
        self.lock()
            .refused
            .insert(port, self.clock.now() + QUARANTINE);
    }

    /// True when a user may keep `port`: in range and not refused by the
    /// engine. A port the probe found busy is not a reason to move its owner.
    pub fn usable(&self, port: u16) -> bool {
        if !self.range.contains(port) {
            return false;
        }
        self.lock()
            .refused
            .get(&port)
            .is_none_or(|until| *until <= self.clock.now())
    }

    /// True when the bind probe finds another process listening on `port`,
    /// which no user of this instance is known to hold (a claimed port is
    /// never probed). Always false without the probe.
    pub fn held_elsewhere(&self, port: u16) -> bool {
        let claimed = self
            .lock()
            .claimed
            .as_ref()
            .is_some_and(|claimed| claimed.contains(&port));
        self.probe && !claimed && !self.bindable(port)
    }

    /// Picks a free port for `user` and claims it with `claim`, which writes
    /// it to the user's status row. Tries each port of the range at most
    /// once; when none is left, `user` is remembered until one is released
    /// (see [`freed`](Self::freed)). Call [`load`](Self::load) first.
    pub async fn allocate<F, Fut>(&self, user: &str, mut claim: F) -> Result<u16, PortError>
    where
        F: FnMut(u16) -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        for _ in 0..self.range.len() {
            let port = self.choose(user)?;
            match claim(port).await {
                Ok(()) => return Ok(port),
                // Another row holds it: it stays in the view as taken.
                Err(StoreError::PortTaken(_)) => {}
                Err(e) => {
                    self.release(port);
                    return Err(e.into());
                }
            }
        }
        let mut state = self.lock();
        Err(self.exhausted(&mut state, user))
    }

    /// Waits until a port is released while users wait for one, and hands
    /// those users over (each once) so they can be reconciled again.
    pub async fn freed(&self) -> Vec<String> {
        loop {
            self.freed.notified().await;
            let waiting = std::mem::take(&mut self.lock().waiting);
            if !waiting.is_empty() {
                return waiting.into_iter().collect();
            }
        }
    }

    /// Picks a port and records it claimed in the view (so no concurrent
    /// allocation in this process picks it too).
    fn choose(&self, user: &str) -> Result<u16, PortError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let now = self.clock.now();
        state.refused.retain(|_, until| *until > now);
        state.busy.retain(|_, until| *until > now);
        let taken = state.claimed.get_or_insert_with(HashSet::new);
        let len = self.range.len();
        let offset = usize::from(state.cursor.saturating_sub(self.range.start())) % len;
        for i in 0..len {
            let port = self.range.start() + ((offset + i) % len) as u16;
            if taken.contains(&port)
                || state.refused.contains_key(&port)
                || state.busy.contains_key(&port)
            {
                continue;
            }
            if self.probe && !self.bindable(port) {
                state.busy.insert(port, now + QUARANTINE);
                continue;
            }
            taken.insert(port);
            state.waiting.remove(user);
            state.cursor = port
                .checked_add(1)
                .filter(|p| self.range.contains(*p))
                .unwrap_or(self.range.start());
            return Ok(port);
        }
        Err(self.exhausted(state, user))
    }

    /// The error for a full range; remembers `user` as waiting for a port.
    fn exhausted(&self, state: &mut State, user: &str) -> PortError {
        state.waiting.insert(user.to_owned());
        let claimed: HashSet<u16> = state
            .claimed
            .iter()
            .flatten()
            .copied()
            .filter(|p| self.range.contains(*p))
            .collect();
        let busy = state
            .refused
            .keys()
            .chain(state.busy.keys())
            .filter(|p| !claimed.contains(*p))
            .collect::<HashSet<_>>()
            .len();
        let claimed = claimed.len();
        PortError::Exhausted {
            range: self.range,
            claimed,
            busy,
        }
    }

    /// False only when something listens on the port. Any other failure
    /// (the publish address is not local, as for a controller in a bridged
    /// container) says nothing about the port: the engine's own refusal is
    /// then the guard.
    fn bindable(&self, port: u16) -> bool {
        match TcpListener::bind(SocketAddr::new(self.publish_ip, port)) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_another_process_listens_on_is_held_elsewhere_unless_a_user_claimed_it() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let range = PortRange::new(port, port).unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let ports = PortAllocator::new(range, ip);
        assert!(ports.held_elsewhere(port));
        ports.load([port]);
        assert!(
            !ports.held_elsewhere(port),
            "a claimed port is never probed"
        );
        assert!(!PortAllocator::new(range, ip)
            .without_probe()
            .held_elsewhere(port));
        drop(listener);
        assert!(!PortAllocator::new(range, ip).held_elsewhere(port));
    }
    use futures::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn allocator(start: u16, end: u16) -> PortAllocator {
        PortAllocator::new(
            PortRange::new(start, end).unwrap(),
            "127.0.0.1".parse().unwrap(),
        )
    }

    async fn claim_ok(a: &PortAllocator, user: &str) -> Result<u16, PortError> {
        a.allocate(user, |_| async { Ok(()) }).await
    }

    /// Two consecutive ports nothing listens on.
    fn free_pair() -> u16 {
        loop {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = probe.local_addr().unwrap().port();
            drop(probe);
            let Some(next) = port.checked_add(1) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", port)).is_ok()
                && TcpListener::bind(("127.0.0.1", next)).is_ok()
            {
                return port;
            }
        }
    }

    #[tokio::test]
    async fn ports_held_by_other_rows_are_skipped() {
        let a = allocator(41000, 41010).without_probe();
        a.load([41000, 41001]);
        let port = claim_ok(&a, "u1").await.unwrap();
        assert_eq!(port, 41002);
        a.release(41000);
        let next = claim_ok(&a, "u2").await.unwrap();
        assert_eq!(
            next, 41003,
            "the search goes on from the last port, not back to a freed one"
        );
    }

    #[tokio::test]
    async fn a_claim_lost_to_another_writer_moves_on_to_the_next_port() {
        let a = allocator(41000, 41010).without_probe();
        let port = a
            .allocate("u", |p| async move {
                if p < 41003 {
                    Err(StoreError::PortTaken(p))
                } else {
                    Ok(())
                }
            })
            .await
            .unwrap();
        assert_eq!(port, 41003);
    }

    #[tokio::test]
    async fn a_chosen_port_is_recorded_so_it_is_never_handed_out_twice() {
        // Regression: `choose` did not record the port it handed out, so the
        // view held only what `load` saw and a wrapped cursor offered it again.
        let a = allocator(41100, 41101).without_probe();
        let first = claim_ok(&a, "u1").await.unwrap();
        let second = claim_ok(&a, "u2").await.unwrap();
        assert_ne!(first, second);
        let offered = Mutex::new(Vec::new());
        let third = a
            .allocate("u3", |p| {
                offered.lock().unwrap().push(p);
                async { Ok(()) }
            })
            .await;
        assert!(
            matches!(third, Err(PortError::Exhausted { claimed: 2, .. })),
            "{third:?}"
        );
        assert!(offered.lock().unwrap().is_empty(), "{offered:?}");
    }

    #[tokio::test]
    async fn a_port_lost_to_another_writer_is_recorded_as_taken() {
        // Regression: a port found held by another row after `PortTaken` was
        // offered again on the next allocation.
        let a = allocator(41200, 41202).without_probe();
        let port = a
            .allocate("u1", |p| async move {
                if p == 41200 {
                    Err(StoreError::PortTaken(p))
                } else {
                    Ok(())
                }
            })
            .await
            .unwrap();
        assert_eq!(port, 41201);
        assert_eq!(claim_ok(&a, "u2").await.unwrap(), 41202);
        let offered = Mutex::new(Vec::new());
        let err = a
            .allocate("u3", |p| {
                offered.lock().unwrap().push(p);
                async { Ok(()) }
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, PortError::Exhausted { claimed: 3, .. }),
            "{err}"
        );
        assert!(offered.lock().unwrap().is_empty(), "{offered:?}");
    }

    #[tokio::test]
    async fn allocate_gives_up_after_one_pass_over_a_range_every_other_writer_holds() {
        // Regression: with every claim lost (ports held by rows the view had
        // not loaded, the probe unable to see them), allocate looped forever,
        // one database write per turn.
        let a = allocator(41300, 41303).without_probe();
        let claims = AtomicUsize::new(0);
        let err = a
            .allocate("u", |p| {
                let n = claims.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(n <= 100, "allocate keeps claiming after a whole pass");
                async move { Err(StoreError::PortTaken(p)) }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::Exhausted { .. }), "{err}");
        assert_eq!(claims.load(Ordering::SeqCst), 4, "one claim per port");
    }

    #[tokio::test]
    async fn own_ports_are_never_quarantined_when_their_containers_listen_on_them() {
        // Regression: once the cursor wrapped, the probe found the engine's
        // listener of this instance's own containers, quarantined their
        // ports, and the owners were moved to another port and recreated.
        let start = free_pair();
        let a = allocator(start, start + 1);
        let mut listeners = Vec::new();
        for user in ["u1", "u2"] {
            let port = claim_ok(&a, user).await.unwrap();
            // The container of `user` starts: the engine listens on its port.
            listeners.push(TcpListener::bind(("127.0.0.1", port)).unwrap());
        }
        let err = claim_ok(&a, "u3").await.unwrap_err();
        assert!(
            matches!(
                err,
                PortError::Exhausted {
                    claimed: 2,
                    busy: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            a.usable(start) && a.usable(start + 1),
            "the owners keep their ports"
        );
    }

    #[tokio::test]
    async fn a_port_a_foreign_process_listens_on_is_stepped_over() {
        // Regression: the original never noticed a port held outside its table.
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let a = allocator(port, port.saturating_add(5));
        let got = claim_ok(&a, "u").await.unwrap();
        assert_ne!(got, port);
        let only_busy = PortAllocator::new(
            PortRange::new(port, port).unwrap(),
            "127.0.0.1".parse().unwrap(),
        );
        assert!(
            matches!(
                claim_ok(&only_busy, "v").await,
                Err(PortError::Exhausted {
                    claimed: 0,
                    busy: 1,
                    ..
                })
            ),
            "the busy port is not handed out"
        );
    }

    #[tokio::test]
    async fn a_port_the_engine_refused_is_not_usable_but_one_the_probe_found_busy_is() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let a = PortAllocator::new(
            PortRange::new(port, port).unwrap(),
            "127.0.0.1".parse().unwrap(),
        );
        assert!(claim_ok(&a, "u").await.is_err());
        assert!(
            a.usable(port),
            "the probe alone never moves the port's owner"
        );
        a.quarantine(port);
        assert!(!a.usable(port), "the engine's refusal does");
    }

    #[tokio::test]
    async fn concurrent_allocations_in_one_process_never_share_a_port() {
        let a = Arc::new(allocator(42000, 42099).without_probe());
        let claimed = Arc::new(Mutex::new(HashSet::new()));
        let mut tasks = Vec::new();
        for i in 0..50 {
            let (a, claimed) = (a.clone(), claimed.clone());
            tasks.push(tokio::spawn(async move {
                a.allocate(&format!("u{i}"), |p| {
                    let claimed = claimed.clone();
                    async move {
                        tokio::task::yield_now().await;
                        if claimed.lock().unwrap().insert(p) {
                            Ok(())
                        } else {
                            Err(StoreError::PortTaken(p))
                        }
                    }
                })
                .await
                .unwrap()
            }));
        }
        let mut ports = HashSet::new();
        for t in tasks {
            assert!(ports.insert(t.await.unwrap()));
        }
        assert_eq!(ports.len(), 50);
    }

    #[tokio::test]
    async fn an_exhausted_range_says_how_to_widen_it() {
        let a = allocator(43000, 43001).without_probe();
        a.load([43000, 43001]);
        let err = claim_ok(&a, "u").await.unwrap_err().to_string();
        assert!(err.contains("port range 43000-43001 is exhausted"), "{err}");
        assert!(
            err.contains("--port-range") && err.contains("CLAWFLEET_PORT_RANGE"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_user_refused_for_a_full_range_is_handed_back_when_a_port_is_released() {
        let a = allocator(43100, 43100).without_probe();
        let port = claim_ok(&a, "u1").await.unwrap();
        assert!(claim_ok(&a, "u2").await.is_err());
        assert!(claim_ok(&a, "u3").await.is_err());
        assert!(a.freed().now_or_never().is_none(), "nothing freed yet");
        a.release(port);
        assert_eq!(
            a.freed().now_or_never(),
            Some(vec!["u2".to_owned(), "u3".to_owned()])
        );
        assert!(
            a.freed().now_or_never().is_none(),
            "each waiter is handed back once"
        );
        assert_eq!(claim_ok(&a, "u2").await.unwrap(), port);
        a.quarantine(port);
        assert!(claim_ok(&a, "u3").await.is_err());
        a.release(port);
        assert!(
            a.freed().now_or_never().is_none(),
            "a port the engine refused frees nothing"
        );
    }

    #[tokio::test]
    async fn a_publish_address_that_is_not_local_does_not_make_every_port_look_taken() {
        // 192.0.2.1 (TEST-NET-1) is never a local address: binding it fails
        // with "address not available", which says nothing about the port.
        let a = PortAllocator::new(
            PortRange::new(45500, 45501).unwrap(),
            "192.0.2.1".parse().unwrap(),
        );
        assert_eq!(claim_ok(&a, "u").await.unwrap(), 45500);
    }

    #[test]
    fn quarantined_and_out_of_range_ports_are_not_usable() {
        let a = allocator(44000, 44010);
        assert!(a.usable(44000));
        a.quarantine(44000);
        assert!(!a.usable(44000));
        assert!(!a.usable(45000));
    }
}
