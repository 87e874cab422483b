//! The connection table: who may open a connection, decided at accept
//! before a byte is read.
//!
//! In order: the IP allow / deny lists, the per-IP new-connection rate,
//! the global cap, the per-IP cap. A refused connection is closed at once
//! and counted by reason. An admitted one holds a [`ConnSlot`] until it
//! closes, which gives its place back.
//!
//! When the global cap is reached, a new connection first tries to evict
//! one that is doing nothing: no request in flight and quiet for at least
//! `evict_idle_after` (an idle keep-alive connection, or a slowloris that
//! never finishes its request head). Of 16 connections sampled at random
//! the one quiet longest goes (the approximated LRU of Redis), so the cost
//! per accept stays constant however many are open; a connection with a
//! request in flight is never evicted. Only when none qualifies is the new
//! connection refused. So a table filled by idle or slow connections still
//! lets new clients in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// What eviction knows of one open connection; the connection marks
/// itself busy and quiet, and waits on [`Activity::evicted`].
pub struct Activity {
    /// Milliseconds on the table's clock since the connection went quiet
    /// (opened, or finished its last response); `BUSY` while a request is
    /// in flight.
    quiet_since: AtomicU64,
    /// Set once chosen, so two accepts never pick the same one.
    evicting: AtomicBool,
    evict: tokio::sync::Notify,
    /// Position in the registry, kept by the registry's lock.
    index: AtomicUsize,
    clock: Instant,
    /// Tunnels open on the connection: while any is, it is never quiet.
    tunnels: AtomicUsize,
}

const BUSY: u64 = u64::MAX;
/// Connections looked at per eviction.
const EVICTION_SAMPLE: usize = 16;

impl Activity {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// A request arrived.
    pub fn busy(&self) {
        self.quiet_since.store(BUSY, Ordering::Relaxed);
    }

    /// The last request in flight finished (a connection with an open
    /// tunnel stays busy).
    pub fn quiet(&self) {
        if self.tunnels.load(Ordering::Acquire) == 0 {
            self.quiet_since.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A tunnel opened on the connection: busy until the guard is dropped.
    pub fn tunnel(self: &Arc<Self>) -> TunnelGuard {
        self.tunnels.fetch_add(1, Ordering::AcqRel);
        self.busy();
        TunnelGuard(self.clone())
    }
}

/// Keeps a connection busy while one of its tunnels is open.
pub struct TunnelGuard(Arc<Activity>);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        // Quiet again only when the next request on it ends (an HTTP/1.1
        // connection is gone with its tunnel anyway).
        self.0.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// Resolves when the table evicts this connection.
    pub async fn evicted(&self) {
        self.evict.notified().await;
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
    /// How long a connection must have been quiet to be evicted; `None`:
    /// no eviction (no global cap, or turned off).
    evict_after: Option<Duration>,
    /// Every open connection's activity, when eviction is on.
    registry: Mutex<Vec<Arc<Activity>>>,
    clock: Instant,
    /// Sampling state (xorshift), under the registry lock.
    seed: AtomicU64,
    /// IPv6 clients are counted by this prefix (`protect.ipv6_prefix`).
    v6_bits: u8,
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
            evict_after: config.max_connections.and(config.evict_idle_after),
            registry: Mutex::new(Vec::new()),
            clock: Instant::now(),
            seed: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            v6_bits: config.ipv6_prefix,
        })
    }

    /// Picks the connection quiet longest among a random sample, if one has
    /// been quiet for `evict_after`, and tells it to close.
    fn evict_one(&self) -> bool {
        let Some(after) = self.evict_after else { return false };
        let Ok(registry) = self.registry.lock() else {
            return false;
        };
        if registry.is_empty() {
            return false;
        }
        let now = self.clock.elapsed().as_millis() as u64;
        let after = after.as_millis() as u64;
        let mut x = self.seed.load(Ordering::Relaxed);
        let mut best: Option<(&Arc<Activity>, u64)> = None;
        for _ in 0..EVICTION_SAMPLE.min(registry.len() * 2) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let candidate = &registry[(x % registry.len() as u64) as usize];
            let since = candidate.quiet_since.load(Ordering::Relaxed);
            if since == BUSY || candidate.evicting.load(Ordering::Relaxed) || now.saturating_sub(since) < after {
                continue;
            }
            if best.is_none_or(|(_, s)| since < s) {
                best = Some((candidate, since));
            }
        }
        self.seed.store(x, Ordering::Relaxed);
        match best {
            Some((victim, _)) => {
                victim.evicting.store(true, Ordering::Relaxed);
                // notify_one keeps the permit if the connection is not
                // waiting yet: it sees it on its first poll.
                victim.evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn register(&self) -> Option<Arc<Activity>> {
        self.evict_after?;
        let mut registry = self.registry.lock().ok()?;
        let activity = Arc::new(Activity {
            quiet_since: AtomicU64::new(self.clock.elapsed().as_millis() as u64),
            evicting: AtomicBool::new(false),
            evict: tokio::sync::Notify::new(),
            index: AtomicUsize::new(registry.len()),
            clock: self.clock,
            tunnels: AtomicUsize::new(0),
        });
        registry.push(activity.clone());
        Some(activity)
    }

    fn unregister(&self, activity: &Arc<Activity>) {
        let Ok(mut registry) = self.registry.lock() else { return };
        let index = activity.index.load(Ordering::Relaxed);
        if registry.get(index).is_some_and(|a| Arc::ptr_eq(a, activity)) {
            registry.swap_remove(index);
            if let Some(moved) = registry.get(index) {
                moved.index.store(index, Ordering::Relaxed);
            }
        }
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let ip = ip.to_canonical();
        if !self.filter.permits(ip) {
            return Err(Refusal::IpDenied);
        }
        // Counted per client network from here on (an IPv6 /64 by default).
        let ip = super::rate::network(ip, self.v6_bits);
        if let Some(limiter) = &self.new_connections {
            let key = match ip {
                IpAddr::V4(v4) => key_hash(&[&v4.octets()]),
                IpAddr::V6(v6) => key_hash(&[&v6.octets()]),
            };
            if limiter.check(key).is_err() {
                return Err(Refusal::NewConnectionRate);
            }
        }
        // The per-IP cap first: a client at its cap must not make room by
        // evicting someone else's connection.
        if let Some(max) = self.max_per_ip {
            let Ok(mut map) = self.per_ip.lock() else {
                return Err(Refusal::MaxConnectionsPerIp);
            };
            let count = map.entry(ip).or_insert(0);
            if *count >= max {
                return Err(Refusal::MaxConnectionsPerIp);
            }
            *count += 1;
        }
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        // Over the cap, a quiet connection makes room (the count stays one
        // over until it has closed).
        if self.max_total.is_some_and(|max| total > max) && !self.evict_one() {
            self.total.fetch_sub(1, Ordering::AcqRel);
            self.release_ip(ip);
            return Err(Refusal::MaxConnections);
        }
        Ok(ConnSlot {
            table: self.clone(),
            ip,
            activity: self.register(),
        })
    }

    /// Gives back one of `ip`'s places under the per-IP cap.
    fn release_ip(&self, ip: IpAddr) {
        if self.max_per_ip.is_none() {
            return;
        }
        if let Ok(mut map) = self.per_ip.lock() {
            if let Some(count) = map.get_mut(&ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    map.remove(&ip);
                }
            }
        }
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
    activity: Option<Arc<Activity>>,
}

impl ConnSlot {
    /// What the connection reports for eviction (when it is on).
    pub fn activity(&self) -> Option<Arc<Activity>> {
        self.activity.clone()
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(activity) = &self.activity {
            self.table.unregister(activity);
        }
        self.table.total.fetch_sub(1, Ordering::AcqRel);
        self.table.release_ip(self.ip);
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

    fn evicting(total: usize) -> Arc<ConnTable> {
        ConnTable::new(&ProtectConfig {
            max_connections: Some(total),
            evict_idle_after: Some(Duration::ZERO),
            ..ProtectConfig::default()
        })
    }

    #[test]
    fn a_full_table_evicts_a_quiet_connection_never_a_busy_one() {
        let t = evicting(2);
        let busy = t.admit(ip(2)).expect("1");
        busy.activity().expect("registered").busy();
        let quiet = t.admit(ip(3)).expect("2");
        let new = t.admit(ip(4)).expect("room made by eviction");
        new.activity().expect("registered").busy();
        let victim = quiet.activity().expect("registered");
        assert!(victim.evicting.load(Ordering::Relaxed), "the quiet one was told to go");
        assert!(!busy.activity().expect("registered").evicting.load(Ordering::Relaxed));
        assert_eq!(t.open(), 3, "one over until the evicted connection closes");
        // Nothing else is quiet and not already leaving: refused.
        assert_eq!(t.admit(ip(5)).err(), Some(Refusal::MaxConnections));
        drop(quiet);
        assert_eq!(t.open(), 2);
        assert_eq!(
            t.registry.lock().expect("lock").len(),
            2,
            "the registry forgets closed ones"
        );
    }

    #[test]
    fn a_client_at_its_own_cap_never_evicts_anyone() {
        let t = ConnTable::new(&ProtectConfig {
            max_connections: Some(2),
            max_connections_per_ip: Some(1),
            evict_idle_after: Some(Duration::ZERO),
            ..ProtectConfig::default()
        });
        let _a = t.admit(ip(2)).expect("1");
        let other = t.admit(ip(3)).expect("2");
        assert_eq!(t.admit(ip(2)).err(), Some(Refusal::MaxConnectionsPerIp));
        assert!(
            !other.activity().expect("registered").evicting.load(Ordering::Relaxed),
            "the refused client made no room at anyone's expense"
        );
        assert_eq!(t.open(), 2);
        assert_eq!(t.per_ip.lock().expect("lock").get(&ip(2)), Some(&1));
    }

    #[test]
    fn connections_quiet_for_less_than_the_threshold_stay() {
        let t = ConnTable::new(&ProtectConfig {
            max_connections: Some(1),
            evict_idle_after: Some(Duration::from_secs(3600)),
            ..ProtectConfig::default()
        });
        let _a = t.admit(ip(2)).expect("1");
        assert_eq!(t.admit(ip(3)).err(), Some(Refusal::MaxConnections));
    }

    #[test]
    fn the_registry_stays_consistent_through_swap_removes() {
        let t = evicting(1000);
        let mut slots: Vec<_> = (0..100u8).map(|i| t.admit(ip(i)).expect("admit")).collect();
        for i in (0..100).step_by(3).rev() {
            slots.remove(i);
        }
        let registry = t.registry.lock().expect("lock");
        assert_eq!(registry.len(), slots.len());
        for (i, a) in registry.iter().enumerate() {
            assert_eq!(a.index.load(Ordering::Relaxed), i);
        }
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
