//! Temporary bans: a client that keeps failing is shut out for a while.
//!
//! Strikes are what a client chooses to do, never what happens to it:
//! a challenge it was sent (a client that keeps cookies passes with the
//! first), a request refused by its rate limit, a request refused as an
//! attack source. Timeouts, connection refusals and upstream errors are
//! not strikes, so a real user whose requests fail because of an attack
//! is never banned for retrying. `strikes` within `window` ban the client
//! (IPv4 address, IPv6 /64) for `duration`: its connections are closed at
//! accept, and its requests through a trusted proxy get `403`. Trusted
//! proxies themselves are never banned.
//!
//! Memory is bounded: at most `max_tracked` clients (striking or banned)
//! are kept, split evenly over 16 shards (so floods from many sources do
//! not contend on one lock). When a shard is full, a new striker takes the
//! place of a client that is only striking, never of a banned one: filling
//! the table with single strikes from many addresses cannot stop the next
//! ban. Time is passed in (milliseconds), so the tests need no clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnet::IpNet;

use crate::config::BanConfig;

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
enum Entry {
    Striking { since: u64, tally: Tally },
    Banned { until: u64 },
}

/// What a strike was: the evidence a ban rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrikeKind {
    /// A request refused by a route's own `rate_limit` (keyed by the
    /// client address): the operator's limit, not attack mode's.
    RateLimited,
    /// A challenge sent to a client without a valid cookie.
    Challenged,
}

/// The strikes of one client within the window, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub rate_limited: u32,
    pub challenged: u32,
}

impl Tally {
    pub fn total(&self) -> u32 {
        self.rate_limited.saturating_add(self.challenged)
    }

    fn add(&mut self, kind: StrikeKind) {
        match kind {
            StrikeKind::RateLimited => self.rate_limited = self.rate_limited.saturating_add(1),
            StrikeKind::Challenged => self.challenged = self.challenged.saturating_add(1),
        }
    }

    /// The reasons of a ban, for the logs.
    pub fn reasons(&self, window: std::time::Duration) -> String {
        let mut parts = Vec::new();
        if self.rate_limited > 0 {
            parts.push(format!(
                "{} requests refused by the route's rate limit",
                self.rate_limited
            ));
        }
        if self.challenged > 0 {
            parts.push(format!("{} challenges not passed", self.challenged));
        }
        format!(
            "{} strikes within {}s: {}",
            self.total(),
            window.as_secs(),
            parts.join(", ")
        )
    }
}

/// A ban as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanInfo {
    /// The banned network: an IPv4 address or an IPv6 /64.
    pub client: IpAddr,
    /// Milliseconds (same clock as the calls) when it ends.
    pub until: u64,
}

/// What a strike did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strike {
    Counted,
    /// This strike started a ban, on this evidence.
    Banned(Tally),
    /// This strike would have started a ban, but `max_per_minute`
    /// automatic bans were already made this minute (the strikes stay
    /// counted: the next one tries again).
    Capped,
    /// Not tracked: exempt, already banned, or the table is full.
    Ignored,
}

pub struct Bans {
    pub config: BanConfig,
    /// Enforce or shadow: the config's, or the operator's switch.
    pub mode: super::StepMode,
    exempt: Vec<IpNet>,
    shards: [Mutex<HashMap<IpAddr, Entry>>; SHARDS],
    /// Entries in all shards, against `max_tracked`.
    tracked: AtomicUsize,
    /// Bans in force (possibly expired, until housekeeping): lets the
    /// common case, no bans at all, skip every lock.
    banned: AtomicUsize,
    /// IPv6 prefix length of a banned unit.
    v6_bits: u8,
    /// Automatic bans of the current minute: (minute, count).
    this_minute: Mutex<(u64, u32)>,
}

impl Bans {
    /// The unit a ban applies to: an IPv4 address, an IPv6 network of
    /// `protect.ipv6_prefix` bits (a /64 by default: one host usually
    /// holds a whole /64).
    fn ban_key(&self, ip: IpAddr) -> IpAddr {
        super::rate::network(ip, self.v6_bits)
    }

    /// Bans by IPv6 networks of `bits` instead of /64.
    pub fn with_ipv6_prefix(mut self, bits: u8) -> Bans {
        self.v6_bits = bits.clamp(1, 128);
        self
    }

    /// The banned unit of `ip`, as logged.
    pub fn shown(&self, ip: IpAddr) -> String {
        match self.ban_key(ip) {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("{v6}/{}", self.v6_bits),
        }
    }
}

impl Bans {
    /// Bans of `config`; `exempt` (the trusted proxies) and the config's
    /// `never_ban` networks are never banned.
    pub fn new(config: &BanConfig, exempt: &[IpNet]) -> Bans {
        let mut exempt = exempt.to_vec();
        exempt.extend(config.never_ban.iter().copied());
        Bans {
            config: config.clone(),
            mode: super::StepMode::new(config.mode),
            exempt,
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            tracked: AtomicUsize::new(0),
            banned: AtomicUsize::new(0),
            v6_bits: 64,
            this_minute: Mutex::new((0, 0)),
        }
    }

    fn shard(&self, key: IpAddr) -> &Mutex<HashMap<IpAddr, Entry>> {
        let hash = match key {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64,
        };
        let index = (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS;
        &self.shards[index]
    }

    pub fn enforced(&self) -> bool {
        self.mode.enforced()
    }

    /// Takes over the bans in force in `old` (a reload that changed the
    /// ban settings: a ban, made by the ladder or the operator, lasts its
    /// time).
    pub fn carry_over(&self, old: &Bans, now: u64) {
        for ban in old.list(now) {
            self.ban(ban.client, ban.until);
        }
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|net| net.contains(&ip))
    }

    /// Whether `ip` is banned at `now` (milliseconds). A trusted proxy
    /// never is, even inside a banned IPv6 /64.
    pub fn is_banned(&self, ip: IpAddr, now: u64) -> bool {
        if self.banned.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let ip = ip.to_canonical();
        if self.exempt(ip) {
            return false;
        }
        let key = self.ban_key(ip);
        let Ok(shard) = self.shard(key).lock() else {
            return false;
        };
        matches!(shard.get(&key), Some(Entry::Banned { until }) if *until > now)
    }

    /// Counts one strike of `kind` against `ip` at `now`.
    pub fn strike(&self, ip: IpAddr, now: u64, kind: StrikeKind) -> Strike {
        let ip = ip.to_canonical();
        if self.exempt(ip) {
            return Strike::Ignored;
        }
        let key = self.ban_key(ip);
        let window = self.config.window.as_millis() as u64;
        let Ok(mut shard) = self.shard(key).lock() else {
            return Strike::Ignored;
        };
        if !shard.contains_key(&key) {
            let per_shard = (self.config.max_tracked / SHARDS).max(1);
            if shard.len() >= per_shard {
                // Make room from a client that is only striking.
                let victim = shard
                    .iter()
                    .find(|(_, e)| matches!(e, Entry::Striking { .. }))
                    .map(|(k, _)| *k);
                match victim {
                    Some(victim) => {
                        shard.remove(&victim);
                    }
                    None => return Strike::Ignored,
                }
            } else {
                self.tracked.fetch_add(1, Ordering::Relaxed);
            }
        }
        let entry = shard.entry(key).or_insert(Entry::Striking {
            since: now,
            tally: Tally::default(),
        });
        match entry {
            Entry::Banned { until } if *until > now => Strike::Ignored,
            Entry::Banned { .. } => {
                // An expired ban: start counting afresh.
                self.banned.fetch_sub(1, Ordering::Relaxed);
                let mut tally = Tally::default();
                tally.add(kind);
                *entry = Entry::Striking { since: now, tally };
                self.check(entry, now)
            }
            Entry::Striking { since, tally } => {
                if now.saturating_sub(*since) > window {
                    *since = now;
                    *tally = Tally::default();
                }
                tally.add(kind);
                self.check(entry, now)
            }
        }
    }

    fn check(&self, entry: &mut Entry, now: u64) -> Strike {
        match *entry {
            Entry::Striking { tally, .. } if tally.total() >= self.config.strikes => {
                if !self.spend_ban(now) {
                    return Strike::Capped;
                }
                *entry = Entry::Banned {
                    until: now + self.config.duration.as_millis() as u64,
                };
                self.banned.fetch_add(1, Ordering::Relaxed);
                Strike::Banned(tally)
            }
            _ => Strike::Counted,
        }
    }

    /// Takes one of this minute's `max_per_minute` automatic bans.
    fn spend_ban(&self, now: u64) -> bool {
        let minute = now / 60_000;
        let Ok(mut spent) = self.this_minute.lock() else {
            return false;
        };
        if spent.0 != minute {
            *spent = (minute, 0);
        }
        if spent.1 >= self.config.max_per_minute {
            return false;
        }
        spent.1 += 1;
        true
    }

    /// Bans `ip` until `until` (admin API).
    pub fn ban(&self, ip: IpAddr, until: u64) {
        let key = self.ban_key(ip);
        if let Ok(mut shard) = self.shard(key).lock() {
            match shard.insert(key, Entry::Banned { until }) {
                None => {
                    self.tracked.fetch_add(1, Ordering::Relaxed);
                    self.banned.fetch_add(1, Ordering::Relaxed);
                }
                Some(Entry::Striking { .. }) => {
                    self.banned.fetch_add(1, Ordering::Relaxed);
                }
                Some(Entry::Banned { .. }) => {}
            }
        }
    }

    /// Lifts the ban on `ip`; true if there was one (admin API).
    pub fn unban(&self, ip: IpAddr) -> bool {
        let key = self.ban_key(ip);
        let Ok(mut shard) = self.shard(key).lock() else {
            return false;
        };
        match shard.remove(&key) {
            Some(Entry::Banned { .. }) => {
                self.tracked.fetch_sub(1, Ordering::Relaxed);
                self.banned.fetch_sub(1, Ordering::Relaxed);
                true
            }
            Some(Entry::Striking { .. }) => {
                self.tracked.fetch_sub(1, Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    /// How many bans are in force at `now` (for the metrics gauge).
    pub fn active_count(&self, now: u64) -> usize {
        if self.banned.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.shards
            .iter()
            .filter_map(|shard| shard.lock().ok())
            .map(|shard| {
                shard
                    .values()
                    .filter(|e| matches!(e, Entry::Banned { until } if *until > now))
                    .count()
            })
            .sum()
    }

    /// The bans in force at `now`.
    pub fn list(&self, now: u64) -> Vec<BanInfo> {
        let mut out = Vec::new();
        for shard in &self.shards {
            if let Ok(shard) = shard.lock() {
                out.extend(shard.iter().filter_map(|(client, entry)| match entry {
                    Entry::Banned { until } if *until > now => Some(BanInfo {
                        client: *client,
                        until: *until,
                    }),
                    _ => None,
                }));
            }
        }
        out.sort_by_key(|b| b.client);
        out
    }

    /// Forgets expired bans and strike counts older than the window.
    pub fn housekeeping(&self, now: u64) {
        let window = self.config.window.as_millis() as u64;
        for shard in &self.shards {
            let Ok(mut shard) = shard.lock() else { continue };
            shard.retain(|_, entry| {
                let keep = match entry {
                    Entry::Banned { until } => *until > now,
                    Entry::Striking { since, .. } => now.saturating_sub(*since) <= window,
                };
                if !keep {
                    self.tracked.fetch_sub(1, Ordering::Relaxed);
                    if matches!(entry, Entry::Banned { .. }) {
                        self.banned.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                keep
            });
        }
    }

    /// Clients tracked now (striking or banned).
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Bans in force or not yet cleaned up.
    pub fn banned_count(&self) -> usize {
        self.banned.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn bans(strikes: u32) -> Bans {
        Bans::new(
            &BanConfig {
                strikes,
                window: Duration::from_secs(10),
                duration: Duration::from_secs(60),
                max_tracked: 1000,
                ..BanConfig::default()
            },
            &["10.0.0.0/8".parse().expect("net")],
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn strikes_within_the_window_ban_until_the_duration_ends() {
        let b = bans(3);
        let a = ip("192.0.2.1");
        assert_eq!(b.strike(a, 0, StrikeKind::RateLimited), Strike::Counted);
        assert_eq!(b.strike(a, 1000, StrikeKind::RateLimited), Strike::Counted);
        assert!(!b.is_banned(a, 1000));
        assert!(matches!(b.strike(a, 2000, StrikeKind::RateLimited), Strike::Banned(_)));
        assert!(b.is_banned(a, 2000));
        assert!(b.is_banned(a, 61_999));
        assert!(!b.is_banned(a, 62_000), "bans expire");
        assert!(!b.is_banned(ip("192.0.2.2"), 2000), "only the striking client");
        assert_eq!(
            b.list(2000),
            vec![BanInfo {
                client: a,
                until: 62_000
            }]
        );
    }

    #[test]
    fn strikes_spread_over_more_than_the_window_never_ban() {
        let b = bans(3);
        let a = ip("192.0.2.1");
        for i in 0..100u64 {
            // Two strikes per 11 s window: always under three.
            b.strike(a, i * 5_500, StrikeKind::RateLimited);
        }
        assert!(!b.is_banned(a, 550_000));
    }

    #[test]
    fn trusted_proxies_are_never_banned() {
        let b = bans(1);
        assert_eq!(b.strike(ip("10.1.2.3"), 0, StrikeKind::RateLimited), Strike::Ignored);
        assert!(!b.is_banned(ip("10.1.2.3"), 0));
    }

    #[test]
    fn ipv6_clients_are_banned_by_64() {
        let b = bans(2);
        b.strike(ip("2001:db8:1:2::1"), 0, StrikeKind::RateLimited);
        assert!(matches!(
            b.strike(ip("2001:db8:1:2::ffff"), 0, StrikeKind::RateLimited),
            Strike::Banned(_)
        ));
        assert!(b.is_banned(ip("2001:db8:1:2:abcd::9"), 1));
        assert!(!b.is_banned(ip("2001:db8:1:3::1"), 1));
        assert_eq!(b.shown(ip("2001:db8:1:2::1")), "2001:db8:1:2::/64");
        let mapped = ip("::ffff:192.0.2.7");
        b.strike(mapped, 0, StrikeKind::RateLimited);
        b.strike(ip("192.0.2.7"), 0, StrikeKind::RateLimited);
        assert!(b.is_banned(ip("192.0.2.7"), 1), "IPv4-mapped counts as IPv4");
    }

    #[test]
    fn memory_is_bounded_and_housekeeping_frees_it() {
        let b = bans(5);
        for i in 0..5000u32 {
            b.strike(
                IpAddr::from((0xC000_0000u32 + i).to_be_bytes()),
                0,
                StrikeKind::RateLimited,
            );
        }
        assert!(b.tracked() <= 1000, "never more than max_tracked: {}", b.tracked());
        b.housekeeping(20_000);
        assert_eq!(b.tracked(), 0, "stale strike counts are dropped");
        b.strike(ip("192.0.2.1"), 20_000, StrikeKind::RateLimited);
        assert_eq!(b.tracked(), 1);
    }

    #[test]
    fn a_full_table_still_bans_the_next_flooder() {
        let b = bans(3);
        // One strike each from 100,000 addresses fills every shard.
        for i in 0..100_000u32 {
            b.strike(
                IpAddr::from((0xC000_0000u32 + i).to_be_bytes()),
                0,
                StrikeKind::RateLimited,
            );
        }
        let flooder = ip("198.51.100.9");
        for _ in 0..3 {
            b.strike(flooder, 1, StrikeKind::RateLimited);
        }
        assert!(b.is_banned(flooder, 2), "a full table does not stop a ban");
        assert!(b.tracked() <= 1000);
    }

    #[test]
    fn a_trusted_proxy_inside_a_banned_64_is_not_refused() {
        let b = Bans::new(
            &BanConfig {
                strikes: 1,
                ..BanConfig::default()
            },
            &["2001:db8::10/128".parse().expect("net")],
        );
        assert!(matches!(
            b.strike(ip("2001:db8::99"), 0, StrikeKind::RateLimited),
            Strike::Banned(_)
        ));
        assert!(b.is_banned(ip("2001:db8::98"), 1), "the /64 is banned");
        assert!(!b.is_banned(ip("2001:db8::10"), 1), "but not the trusted proxy in it");
        assert_eq!(b.active_count(1), 1);
    }

    #[test]
    fn never_ban_networks_are_never_banned_and_bans_carry_their_evidence() {
        let b = Bans::new(
            &BanConfig {
                strikes: 3,
                never_ban: vec!["203.0.113.0/24".parse().expect("net")],
                ..BanConfig::default()
            },
            &[],
        );
        let partner = ip("203.0.113.8");
        for i in 0..10 {
            assert_eq!(b.strike(partner, i, StrikeKind::RateLimited), Strike::Ignored);
        }
        assert!(!b.is_banned(partner, 10));
        let a = ip("198.51.100.1");
        b.strike(a, 0, StrikeKind::RateLimited);
        b.strike(a, 1, StrikeKind::Challenged);
        let Strike::Banned(tally) = b.strike(a, 2, StrikeKind::RateLimited) else {
            panic!("the third strike bans");
        };
        assert_eq!(
            tally,
            Tally {
                rate_limited: 2,
                challenged: 1
            }
        );
        assert_eq!(
            tally.reasons(Duration::from_secs(60)),
            "3 strikes within 60s: 2 requests refused by the route's rate limit, 1 challenges not passed"
        );
    }

    #[test]
    fn automatic_bans_are_capped_per_minute() {
        let b = Bans::new(
            &BanConfig {
                strikes: 1,
                max_per_minute: 5,
                ..BanConfig::default()
            },
            &[],
        );
        let results: Vec<Strike> = (0..8u32)
            .map(|i| {
                b.strike(
                    IpAddr::from((0xC633_6400u32 + i).to_be_bytes()),
                    1_000,
                    StrikeKind::Challenged,
                )
            })
            .collect();
        assert_eq!(results.iter().filter(|r| matches!(r, Strike::Banned(_))).count(), 5);
        assert_eq!(results.iter().filter(|r| **r == Strike::Capped).count(), 3);
        let late = IpAddr::from((0xC633_6400u32 + 7).to_be_bytes());
        assert!(!b.is_banned(late, 1_001), "capped: not banned");
        assert!(
            matches!(b.strike(late, 60_000, StrikeKind::Challenged), Strike::Banned(_)),
            "the next minute bans it: its strikes stayed counted"
        );
        // The operator's bans are never capped.
        b.ban(ip("192.0.2.50"), 100_000);
        assert!(b.is_banned(ip("192.0.2.50"), 60_001));
    }

    #[test]
    fn admin_ban_and_unban() {
        let b = bans(100);
        let a = ip("198.51.100.4");
        b.ban(a, 5000);
        assert!(b.is_banned(a, 10));
        assert_eq!(b.banned_count(), 1);
        assert!(b.unban(a));
        assert!(!b.is_banned(a, 10));
        assert!(!b.unban(a));
        assert_eq!((b.banned_count(), b.tracked()), (0, 0));
        b.ban(a, 5000);
        b.housekeeping(6000);
        assert_eq!((b.banned_count(), b.tracked()), (0, 0), "expired bans are dropped");
    }
}
