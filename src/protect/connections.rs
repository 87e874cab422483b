//! The connection table: who may open a connection, decided at accept
//! before a byte is read.
//!
//! In order: the IP allow / deny lists, the per-IP new-connection rate,
//! the global cap, the per-IP cap. A refused connection is closed at once
//! and counted by reason. An admitted one holds a [`ConnSlot`] until it
//! closes, which gives its place back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::rate::{Limiter, key_hash};
use crate::config::{IpFilter, ProtectConfig};

/// Why a connection was refused; the name is the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    IpDenied,
    NewConnectionRate,
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::IpDenied => "ip_denied",
            Refusal::NewConnectionRate => "new_connection_rate",
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// Open connections, process-wide (all listeners).
pub struct ConnTable {
    filter: IpFilter,
    max_total: Option<usize>,
    max_per_ip: Option<u32>,
    new_connections: Option<Limiter>,
    total: AtomicUsize,
    /// Open connections per IP; only IPs with one open are kept, so the map
    /// is bounded by the number of open connections.
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable").field("open", &self.open()).finish()
    }
}

impl ConnTable {
    pub fn new(config: &ProtectConfig) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            filter: config.ip_filter.clone(),
            max_total: config.max_connections,
            max_per_ip: config.max_connections_per_ip,
            new_connections: config.new_connections_per_ip.map(Limiter::new),
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let ip = ip.to_canonical();
        if !self.filter.permits(ip) {
            return Err(Refusal::IpDenied);
        }
        if let Some(limiter) = &self.new_connections {
            let key = match ip {
                IpAddr::V4(v4) => key_hash(&[&v4.octets()]),
                IpAddr::V6(v6) => key_hash(&[&v6.octets()]),
            };
            if limiter.check(key).is_err() {
                return Err(Refusal::NewConnectionRate);
            }
        }
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        if self.max_total.is_some_and(|max| total > max) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::MaxConnections);
        }
        if let Some(max) = self.max_per_ip {
            let Ok(mut map) = self.per_ip.lock() else {
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::MaxConnectionsPerIp);
            };
            let count = map.entry(ip).or_insert(0);
            if *count >= max {
                drop(map);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::MaxConnectionsPerIp);
            }
            *count += 1;
        }
        Ok(ConnSlot {
            table: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Forgets idle new-connection rate keys.
    pub fn housekeeping(&self) {
        if let Some(limiter) = &self.new_connections {
            limiter.housekeeping();
        }
    }
}

/// An admitted connection's place in the table, given back on drop.
pub struct ConnSlot {
    table: Arc<ConnTable>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.table.total.fetch_sub(1, Ordering::AcqRel);
        if self.table.max_per_ip.is_some() {
            if let Ok(mut map) = self.table.per_ip.lock() {
                if let Some(count) = map.get_mut(&self.ip) {
                    *count -= 1;
                    if *count == 0 {
                        map.remove(&self.ip);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(total: Option<usize>, per_ip: Option<u32>) -> Arc<ConnTable> {
        ConnTable::new(&ProtectConfig {
            max_connections: total,
            max_connections_per_ip: per_ip,
            ..ProtectConfig::default()
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn per_ip_cap_counts_each_address_alone() {
        let t = table(None, Some(2));
        let a1 = t.admit(ip(2)).expect("first");
        let _a2 = t.admit(ip(2)).expect("second");
        assert_eq!(t.admit(ip(2)).err(), Some(Refusal::MaxConnectionsPerIp));
        let _b = t.admit(ip(3)).expect("another address");
        drop(a1);
        let _a3 = t.admit(ip(2)).expect("a place came back");
        assert_eq!(t.open(), 3);
    }

    #[test]
    fn global_cap_and_slots_give_back() {
        let t = table(Some(2), None);
        let a = t.admit(ip(2)).expect("1");
        let _b = t.admit(ip(3)).expect("2");
        assert_eq!(t.admit(ip(4)).err(), Some(Refusal::MaxConnections));
        assert_eq!(t.open(), 2, "a refusal takes no place");
        drop(a);
        assert!(t.admit(ip(4)).is_ok());
    }

    #[test]
    fn the_per_ip_map_forgets_closed_addresses() {
        let t = table(None, Some(1));
        for last in 0..=255u8 {
            drop(t.admit(ip(last)).expect("admit"));
        }
        assert!(t.per_ip.lock().expect("lock").is_empty());
        assert_eq!(t.open(), 0);
    }

    #[test]
    fn denied_addresses_are_refused_first() {
        let t = ConnTable::new(&ProtectConfig {
            ip_filter: IpFilter {
                allow: Vec::new(),
                deny: vec!["127.0.0.66/32".parse().expect("net")],
            },
            ..ProtectConfig::default()
        });
        assert_eq!(t.admit(ip(66)).err(), Some(Refusal::IpDenied));
        assert!(t.admit(ip(67)).is_ok());
        let mapped: IpAddr = "::ffff:127.0.0.66".parse().expect("ip");
        assert_eq!(t.admit(mapped).err(), Some(Refusal::IpDenied));
    }
}
