//! Host port bindings: a running container holds its published port, a
//! foreign process can hold one too, and no two overlapping bindings (the
//! same address, or a wildcard covering it) are ever held at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;

use super::ids::render_id;
use super::state::State;
use super::MemoryEngine;

/// The unspecified IPv4 address: "all interfaces".
const ANY_V4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// The `(port, address)` keys whose binding conflicts with binding `ip:port`:
/// the same address, or a wildcard covering either (`0.0.0.0` covers IPv4,
/// dual-stack `::` covers everything). Each range is a cheap index probe.
fn overlapping_bindings(ip: IpAddr, port: u16) -> Vec<RangeInclusive<(u16, IpAddr)>> {
    const ANY_V6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    const LAST_V4: IpAddr = IpAddr::V4(Ipv4Addr::BROADCAST);
    const LAST_V6: IpAddr = IpAddr::V6(Ipv6Addr::from_bits(u128::MAX));
    let only = |ip: IpAddr| (port, ip)..=(port, ip);
    match ip {
        IpAddr::V6(v6) if v6.is_unspecified() => vec![(port, ANY_V4)..=(port, LAST_V6)],
        IpAddr::V4(v4) if v4.is_unspecified() => {
            vec![(port, ANY_V4)..=(port, LAST_V4), only(ANY_V6)]
        }
        IpAddr::V4(_) => vec![only(ip), only(ANY_V4), only(ANY_V6)],
        IpAddr::V6(_) => vec![only(ip), only(ANY_V6)],
    }
}

impl State {
    /// Why `slot` cannot bind `ip:port`, in the engine's words, if it cannot.
    pub(super) fn port_conflict(&self, slot: u32, ip: IpAddr, port: u16) -> Option<String> {
        let ranges = overlapping_bindings(ip, port);
        let address = SocketAddr::new(ip, port);
        let held_by_container = ranges.iter().any(|range| {
            self.bound_ports
                .range(range.clone())
                .any(|(_, &holder)| holder != slot)
        });
        if held_by_container {
            let container = self.container(slot);
            return Some(format!(
                "driver failed programming external connectivity on endpoint {} ({}): Bind for {address} failed: port is already allocated",
                container.name(),
                render_id(container.key),
            ));
        }
        let held_by_process = ranges
            .into_iter()
            .any(|range| self.foreign_ports.range(range).next().is_some());
        held_by_process
            .then(|| format!("failed to bind host port for {address}: address already in use"))
    }
}

impl MemoryEngine {
    /// Marks `port` on `ip` (all interfaces when `None`) as held by a process
    /// outside Docker, so a container publishing it cannot start.
    pub fn occupy_port(&self, ip: Option<IpAddr>, port: u16) {
        self.lock()
            .foreign_ports
            .insert((port, ip.unwrap_or(ANY_V4)));
    }

    /// Frees a port taken with [`occupy_port`](Self::occupy_port).
    pub fn release_port(&self, ip: Option<IpAddr>, port: u16) {
        self.lock()
            .foreign_ports
            .remove(&(port, ip.unwrap_or(ANY_V4)));
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::fixtures::*;
    use clawfleet::docker::{Engine, EngineError, RunState};

    #[tokio::test]
    async fn start_fails_while_a_running_container_publishes_the_same_port() {
        let engine = engine().await;
        let holder = running(&engine, &published(spec("alice"), LOCALHOST, 19000)).await;
        let blocked = engine
            .create_container(&published(spec("bob"), LOCALHOST, 19000))
            .await
            .unwrap();

        let error = engine.start_container(&blocked).await.unwrap_err();
        assert!(matches!(
            error,
            EngineError::PortAllocated {
                port: Some(19000),
                ..
            }
        ));
        assert!(error.is_transient());
        let observed = inspect(&engine, &blocked).await;
        assert_eq!(observed.state, RunState::Created);
        assert_eq!(observed.exit_code, Some(128));

        engine.stop_container(&holder, STOP).await.unwrap();
        engine.start_container(&blocked).await.unwrap();
        assert_eq!(inspect(&engine, &blocked).await.host_port, Some(19000));
    }

    #[tokio::test]
    async fn only_overlapping_addresses_conflict_on_a_port() {
        let engine = engine().await;
        running(&engine, &published(spec("alice"), LOCALHOST, 19000)).await;
        let other_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let all_v4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let all_v6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

        running(&engine, &published(spec("bob"), other_ip, 19000)).await;
        running(&engine, &published(spec("carol"), LOCALHOST, 19001)).await;
        running(
            &engine,
            &published(spec("v6"), IpAddr::V6(Ipv6Addr::LOCALHOST), 19000),
        )
        .await;
        for (user, ip) in [("wild4", all_v4), ("wild6", all_v6)] {
            let id = engine
                .create_container(&published(spec(user), ip, 19000))
                .await
                .unwrap();
            let result = engine.start_container(&id).await;
            assert!(
                matches!(result, Err(EngineError::PortAllocated { .. })),
                "{ip}"
            );
        }
    }

    #[tokio::test]
    async fn created_and_exited_containers_hold_no_port() {
        let engine = engine().await;
        engine
            .create_container(&published(spec("created"), LOCALHOST, 19000))
            .await
            .unwrap();
        let exited = running(&engine, &published(spec("exited"), LOCALHOST, 19000)).await;
        engine.crash(&exited, 1).unwrap();

        running(&engine, &published(spec("alice"), LOCALHOST, 19000)).await;
    }

    #[tokio::test]
    async fn start_fails_on_a_port_held_by_a_foreign_process_until_it_is_released() {
        let engine = engine().await;
        engine.occupy_port(None, 19000);
        engine.occupy_port(Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))), 19001);
        let id = engine
            .create_container(&published(spec("alice"), LOCALHOST, 19000))
            .await
            .unwrap();

        let error = engine.start_container(&id).await.unwrap_err();
        assert!(matches!(
            error,
            EngineError::PortAllocated {
                port: Some(19000),
                ..
            }
        ));
        running(&engine, &published(spec("bob"), LOCALHOST, 19001)).await;

        engine.release_port(None, 19000);
        engine.start_container(&id).await.unwrap();
    }

    #[test]
    fn wildcards_overlap_their_family_and_dual_stack_overlaps_all() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let overlap = |a: IpAddr, b: IpAddr| {
            overlapping_bindings(a, 80)
                .iter()
                .any(|range| range.contains(&(80, b)))
        };
        for (a, b, expected) in [
            (v4, v4, true),
            (v4, LOCALHOST, false),
            (v4, any4, true),
            (v4, any6, true),
            (v4, v6, false),
            (v6, any4, false),
            (v6, any6, true),
            (any4, v4, true),
            (any4, v6, false),
            (any6, v4, true),
            (any6, v6, true),
        ] {
            assert_eq!(overlap(a, b), expected, "{a} vs {b}");
            assert_eq!(overlap(b, a), expected, "{b} vs {a}");
        }
        assert!(!overlapping_bindings(v4, 80)
            .iter()
            .any(|range| range.contains(&(81, v4))));
    }
}
