//! GCRA rate limits, with governor's keyed limiter.
//!
//! Keys are 64-bit hashes (SipHash with a per-process random key) of what
//! the limit counts by, so every key costs the same few bytes whatever a
//! client sends, and a client cannot choose colliding keys. Idle keys are
//! forgotten by [`Limiter::housekeeping`], which the proxy runs every few
//! seconds.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::HeaderMap;

use crate::config::{Rate, RateKey, RateLimitConfig};

/// A keyed GCRA limiter over `u64` keys, on any clock (tests inject one).
pub struct Limiter<C: Clock = DefaultClock> {
    inner: RateLimiter<u64, DefaultKeyedStateStore<u64>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
}

fn quota(rate: Rate) -> Quota {
    let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    // The interval is at least 1 ns: count <= 1e9 per >= 1 s (config).
    let interval = rate.interval().max(Duration::from_nanos(1));
    Quota::with_period(interval)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl Limiter<DefaultClock> {
    pub fn new(rate: Rate) -> Self {
        Self::with_clock(rate, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limiter<C> {
    pub fn with_clock(rate: Rate, clock: C) -> Self {
        Limiter {
            inner: RateLimiter::new(quota(rate), DefaultKeyedStateStore::default(), clock.clone()),
            clock,
        }
    }

    /// Takes one event for `key`; `Err(wait)` when over the rate, with the
    /// time until one would be allowed.
    pub fn check(&self, key: u64) -> Result<(), Duration> {
        self.inner
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets keys whose allowance is full again (indistinguishable from
    /// new ones); bounds memory by the keys seen within one burst period.
    pub fn housekeeping(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// Hashes key material with the process's random SipHash key.
pub fn key_hash(parts: &[&[u8]]) -> u64 {
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    let mut hasher = STATE
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher();
    for part in parts {
        part.hash(&mut hasher);
    }
    hasher.finish()
}

/// The unit protection counts a client by: an IPv4 address, or the IPv6
/// network of `v6_bits` (`protect.ipv6_prefix`, /64 by default) holding it.
pub fn network(ip: IpAddr, v6_bits: u8) -> IpAddr {
    prefix(ip, 32, v6_bits)
}

/// The network of `ip`: the address with its host bits cleared.
pub fn prefix(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4_bits.min(32))).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6_bits.min(128))).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// A route's rate limit: the limiter and what it counts by.
pub struct RouteLimiter {
    pub limiter: Limiter,
    key: RateKey,
}

impl RouteLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        RouteLimiter {
            limiter: Limiter::new(config.rate),
            key: config.key.clone(),
        }
    }

    /// What the limit counts by.
    pub fn config_key(&self) -> &RateKey {
        &self.key
    }

    /// The key of a request. `client_net` is the client's network as
    /// protection counts it (`super::network`: an IPv6 client by its
    /// /64). A request without the configured header or cookie is counted
    /// by its client network, so leaving it out is no way around the limit.
    pub fn key(&self, client: IpAddr, client_net: IpAddr, headers: &HeaderMap) -> u64 {
        let by_ip = |ip: IpAddr| match ip.to_canonical() {
            IpAddr::V4(v4) => key_hash(&[b"ip", &v4.octets()]),
            IpAddr::V6(v6) => key_hash(&[b"ip", &v6.octets()]),
        };
        match &self.key {
            RateKey::ClientIp => by_ip(client_net),
            RateKey::IpPrefix { v4, v6 } => by_ip(prefix(client, *v4, *v6)),
            RateKey::Header(name) => match headers.get(name) {
                Some(v) => key_hash(&[b"header", v.as_bytes()]),
                None => by_ip(client_net),
            },
            RateKey::Cookie(name) => match crate::upstream::balance::cookie(headers, name) {
                Some(v) => key_hash(&[b"cookie", v.as_bytes()]),
                None => by_ip(client_net),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(count: u32, period_s: u64, burst: u32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(period_s),
            burst,
        }
    }

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(rate(10, 1, 5), clock.clone());
        for i in 0..5 {
            assert_eq!(limiter.check(1), Ok(()), "burst event {i}");
        }
        let wait = limiter.check(1).expect_err("over the burst");
        assert_eq!(wait, Duration::from_millis(100), "one interval at 10/s");
        clock.advance(Duration::from_millis(99));
        assert!(limiter.check(1).is_err(), "not yet");
        clock.advance(Duration::from_millis(1));
        assert_eq!(limiter.check(1), Ok(()));
        assert!(limiter.check(1).is_err(), "one allowance came back, one was spent");
        // Other keys are independent.
        assert_eq!(limiter.check(2), Ok(()));
    }

    #[test]
    fn refused_events_do_not_spend_allowance() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(rate(1, 1, 1), clock.clone());
        assert_eq!(limiter.check(7), Ok(()));
        for _ in 0..100 {
            assert!(limiter.check(7).is_err());
        }
        clock.advance(Duration::from_secs(1));
        assert_eq!(limiter.check(7), Ok(()), "a steady client at the rate always passes");
    }

    #[test]
    fn housekeeping_forgets_idle_keys() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(rate(100, 1, 10), clock.clone());
        for key in 0..10_000u64 {
            let _ = limiter.check(key);
        }
        assert_eq!(limiter.len(), 10_000);
        clock.advance(Duration::from_secs(1));
        limiter.housekeeping();
        assert_eq!(limiter.len(), 0, "every allowance is full again: nothing to remember");
    }

    #[test]
    fn prefixes_clear_host_bits() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(prefix(ip("192.0.2.77"), 24, 64), ip("192.0.2.0"));
        assert_eq!(prefix(ip("192.0.2.77"), 0, 64), ip("0.0.0.0"));
        assert_eq!(prefix(ip("192.0.2.77"), 32, 64), ip("192.0.2.77"));
        assert_eq!(prefix(ip("2001:db8:1:2:3:4:5:6"), 24, 64), ip("2001:db8:1:2::"));
        assert_eq!(prefix(ip("::ffff:192.0.2.77"), 24, 64), ip("192.0.2.0"));
    }

    #[test]
    fn keys_fall_back_to_the_client_ip() {
        let limit = RouteLimiter::new(&RateLimitConfig {
            rate: rate(1, 1, 1),
            key: RateKey::Header(http::HeaderName::from_static("x-api-key")),
        });
        let ip = "192.0.2.1".parse().expect("ip");
        let mut with_key = HeaderMap::new();
        with_key.insert("x-api-key", http::HeaderValue::from_static("k1"));
        let none = HeaderMap::new();
        assert_ne!(limit.key(ip, ip, &with_key), limit.key(ip, ip, &none));
        assert_eq!(limit.key(ip, ip, &none), limit.key(ip, ip, &HeaderMap::new()));
        let other_ip = "192.0.2.2".parse().expect("ip");
        assert_eq!(
            limit.key(ip, ip, &with_key),
            limit.key(other_ip, other_ip, &with_key),
            "the key, not the IP"
        );
    }
}
