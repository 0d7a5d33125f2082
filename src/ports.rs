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

    /// Marks `port` busy for [`QUARANTINE`] (the engine said it is taken).
    pub fn quarantine(&self, port: u16) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.quarantined.insert(port, Instant::now() + QUARANTINE);
    }

    /// True when `port` may be used: in range and not quarantined.
    pub fn usable(&self, port: u16) -> bool {
        if !self.range.contains(port) {
            return false;
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .quarantined
            .get(&port)
            .is_none_or(|until| *until <= Instant::now())
    }

    /// Picks a free port and claims it with `claim`, which writes it to the
    /// user's status row. `in_use` are the ports other rows hold.
    pub async fn allocate<F, Fut>(&self, in_use: &[u16], mut claim: F) -> Result<u16, PortError>
    where
        F: FnMut(u16) -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        let mut taken: HashSet<u16> = in_use.iter().copied().collect();
        loop {
            let port = self.choose(&taken)?;
            match claim(port).await {
                Ok(()) => return Ok(port),
                Err(StoreError::PortTaken(_)) => {
                    taken.insert(port);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn choose(&self, taken: &HashSet<u16>) -> Result<u16, PortError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
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
        Err(PortError::Exhausted {
            range: self.range,
            claimed: taken.len(),
            busy: state.quarantined.len(),
        })
    }

    fn bindable(&self, port: u16) -> bool {
        TcpListener::bind(SocketAddr::new(self.publish_ip, port)).is_ok()
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
        let port = a
            .allocate(&[41000, 41001], |_| async { Ok(()) })
            .await
            .unwrap();
        assert_eq!(port, 41002);
    }

    #[tokio::test]
    async fn a_claim_lost_to_another_writer_moves_on_to_the_next_port() {
        let a = allocator(41000, 41010).without_probe();
        let port = a
            .allocate(&[], |p| async move {
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
        let got = a.allocate(&[], |_| async { Ok(()) }).await.unwrap();
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
                let in_use: Vec<u16> = claimed.lock().unwrap().iter().copied().collect();
                a.allocate(&in_use, |p| {
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
        let err = a
            .allocate(&[43000, 43001], |_| async { Ok(()) })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("widen --port-range"), "{err}");
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
