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
//! The allocator keeps its own view of the claimed ports, loaded once from
//! the table and kept up to date as ports are claimed and released, so an
//! allocation costs no table scan. The view may only err on the side of
//! "taken": a port claimed elsewhere is discovered by the failed claim.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::PortRange;
use crate::store::StoreError;

/// How long a port found busy is skipped before it is tried again.
pub const QUARANTINE: Duration = Duration::from_secs(600);

/// Allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Every port of the range is in use, claimed or quarantined.
    #[error("no free host port in {range}: {claimed} claimed by users, {busy} held by other processes; widen --port-range")]
    Exhausted {
        /// The configured range.
        range: PortRange,
        /// Ports held by status rows.
        claimed: usize,
        /// Ports found busy (quarantined).
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
}

#[derive(Debug, Default)]
struct State {
    /// Ports held by status rows, once loaded.
    claimed: Option<HashSet<u16>>,
    quarantined: HashMap<u16, Instant>,
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
                claimed: None,
                quarantined: HashMap::new(),
                cursor: range.start(),
            }),
        }
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

    /// Records a port claimed outside [`allocate`](Self::allocate) (a user keeping its port).
    pub fn note_claimed(&self, port: u16) {
        if let Some(claimed) = self.lock().claimed.as_mut() {
            claimed.insert(port);
        }
    }

    /// Records that no status row holds `port` any more.
    pub fn release(&self, port: u16) {
        if let Some(claimed) = self.lock().claimed.as_mut() {
            claimed.remove(&port);
        }
    }

    /// Marks `port` busy for [`QUARANTINE`] (the engine said it is taken).
    pub fn quarantine(&self, port: u16) {
        self.lock()
            .quarantined
            .insert(port, Instant::now() + QUARANTINE);
    }

    /// True when `port` may be used: in range and not quarantined.
    pub fn usable(&self, port: u16) -> bool {
        if !self.range.contains(port) {
            return false;
        }
        self.lock()
            .quarantined
            .get(&port)
            .is_none_or(|until| *until <= Instant::now())
    }

    /// Picks a free port and claims it with `claim`, which writes it to the
    /// user's status row. Call [`load`](Self::load) first.
    pub async fn allocate<F, Fut>(&self, mut claim: F) -> Result<u16, PortError>
    where
        F: FnMut(u16) -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        loop {
            let port = self.choose()?;
            match claim(port).await {
                Ok(()) => return Ok(port),
                Err(StoreError::PortTaken(_)) => {}
                Err(e) => {
                    self.release(port);
                    return Err(e.into());
                }
            }
        }
    }

    /// Picks a port and marks it claimed in the view (so no concurrent
    /// allocation in this process picks it too).
    fn choose(&self) -> Result<u16, PortError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let now = Instant::now();
        let taken = state.claimed.get_or_insert_with(HashSet::new);
        state.quarantined.retain(|_, until| *until > now);
        let len = self.range.len();
        let offset = usize::from(state.cursor.saturating_sub(self.range.start())) % len;
        for i in 0..len {
            let port = self.range.start() + ((offset + i) % len) as u16;
            if taken.contains(&port) || state.quarantined.contains_key(&port) {
                continue;
            }
            if self.probe && !self.bindable(port) {
                state.quarantined.insert(port, now + QUARANTINE);
                continue;
            }
            state.cursor = port
                .checked_add(1)
                .filter(|p| self.range.contains(*p))
                .unwrap_or(self.range.start());
            return Ok(port);
        }
        let claimed = taken.len();
        Err(PortError::Exhausted {
            range: self.range,
            claimed,
            busy: state.quarantined.len(),
        })
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
    use std::sync::Arc;

    fn allocator(start: u16, end: u16) -> PortAllocator {
        PortAllocator::new(
            PortRange::new(start, end).unwrap(),
            "127.0.0.1".parse().unwrap(),
        )
    }

    #[tokio::test]
    async fn ports_held_by_other_rows_are_skipped() {
        let a = allocator(41000, 41010).without_probe();
        a.load([41000, 41001]);
        let port = a.allocate(|_| async { Ok(()) }).await.unwrap();
        assert_eq!(port, 41002);
        a.release(41000);
        let next = a.allocate(|_| async { Ok(()) }).await.unwrap();
        assert_eq!(
            next, 41003,
            "the search goes on from the last port, not back to a freed one"
        );
    }

    #[tokio::test]
    async fn a_claim_lost_to_another_writer_moves_on_to_the_next_port() {
        let a = allocator(41000, 41010).without_probe();
        let port = a
            .allocate(|p| async move {
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
    async fn a_port_a_foreign_process_listens_on_is_stepped_over() {
        // Regression: the original never noticed a port held outside its table.
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let a = allocator(port, port.saturating_add(5));
        let got = a.allocate(|_| async { Ok(()) }).await.unwrap();
        assert_ne!(got, port);
        assert!(!a.usable(port), "the busy port is quarantined");
    }

    #[tokio::test]
    async fn concurrent_allocations_in_one_process_never_share_a_port() {
        let a = Arc::new(allocator(42000, 42099).without_probe());
        let claimed = Arc::new(Mutex::new(HashSet::new()));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (a, claimed) = (a.clone(), claimed.clone());
            tasks.push(tokio::spawn(async move {
                a.allocate(|p| {
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
    async fn an_exhausted_range_says_how_to_fix_it() {
        let a = allocator(43000, 43001).without_probe();
        a.load([43000, 43001]);
        let err = a.allocate(|_| async { Ok(()) }).await.unwrap_err();
        assert!(err.to_string().contains("widen --port-range"), "{err}");
    }

    #[tokio::test]
    async fn a_publish_address_that_is_not_local_does_not_make_every_port_look_taken() {
        // 192.0.2.1 (TEST-NET-1) is never a local address: binding it fails
        // with "address not available", which says nothing about the port.
        let a = PortAllocator::new(
            PortRange::new(45500, 45501).unwrap(),
            "192.0.2.1".parse().unwrap(),
        );
        assert_eq!(a.allocate(|_| async { Ok(()) }).await.unwrap(), 45500);
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
