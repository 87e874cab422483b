//! Load balancing algorithms: pure functions over a slice of candidate
//! servers, with randomness and time passed in, so each is unit-tested alone.
//!
//! One `enum` ([`Algorithm`]), one `match` ([`pick`]). The caller (the
//! upstream group) decides which servers are candidates (healthy, not
//! ejected, not draining, not already tried by this request) and what each
//! one's effective weight, load and latency are.

use std::net::IpAddr;

/// How a group spreads requests over its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Algorithm {
    /// Smooth weighted round robin (nginx's): weights 5,1,1 give
    /// `a a b a c a a`, never a burst of five to `a`.
    RoundRobin,
    /// Fewest requests in flight relative to weight; ties broken at random.
    LeastRequests,
    /// Power of two random choices, scored by peak-EWMA latency times
    /// (in flight + 1), divided by weight: the latency-aware default.
    P2cEwma,
    /// A ketama ring keyed on part of the request: removing one of N
    /// servers remaps only that server's keys (about 1/N).
    ConsistentHash(HashKey),
    /// Weighted random.
    Random,
}

/// What a consistent hash is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Path,
}

/// What the balancer knows of one candidate server.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Index of the server in its group.
    pub index: usize,
    /// Effective weight (configured weight, reduced during slow start), >= 1.
    pub weight: u32,
    pub in_flight: u32,
    /// Peak-EWMA latency in microseconds.
    pub latency_us: f64,
}

/// A small, fast, seedable generator (xorshift64*): the balancer needs
/// speed and, in tests, repeatability, not cryptographic strength.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A generator seeded from the process's random hasher keys.
    pub fn from_entropy() -> Rng {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(&h as *const _ as usize);
        Rng::seeded(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (no modulo bias worth
    /// mentioning for the n a balancer sees).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// State of smooth weighted round robin: one running weight per server.
#[derive(Debug, Default)]
pub struct RoundRobinState {
    current: Vec<i64>,
}

/// Picks one of `candidates` (non-empty) and returns its server index.
pub fn pick(
    algorithm: &Algorithm,
    candidates: &[Candidate],
    rr: Option<&mut RoundRobinState>,
    ring: &Ring,
    hash: Option<u64>,
    rng: &mut Rng,
) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    match algorithm {
        // The caller holds the round-robin state only for this algorithm.
        Algorithm::RoundRobin => Some(match rr {
            Some(state) => smooth_round_robin(candidates, state),
            None => weighted_random(candidates, rng),
        }),
        Algorithm::LeastRequests => Some(least_requests(candidates, rng)),
        Algorithm::P2cEwma => Some(p2c(candidates, rng)),
        Algorithm::Random => Some(weighted_random(candidates, rng)),
        Algorithm::ConsistentHash(_) => match hash {
            Some(h) => ring.lookup(h, |i| candidates.iter().any(|c| c.index == i)),
            None => Some(weighted_random(candidates, rng)),
        },
    }
}

fn smooth_round_robin(candidates: &[Candidate], state: &mut RoundRobinState) -> usize {
    let needed = candidates.iter().map(|c| c.index).max().unwrap_or(0) + 1;
    if state.current.len() < needed {
        state.current.resize(needed, 0);
    }
    let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
    let mut best = candidates[0].index;
    let mut best_weight = i64::MIN;
    for c in candidates {
        let current = &mut state.current[c.index];
        *current += i64::from(c.weight);
        if *current > best_weight {
            best_weight = *current;
            best = c.index;
        }
    }
    state.current[best] -= total;
    best
}

fn least_requests(candidates: &[Candidate], rng: &mut Rng) -> usize {
    // Compare (in_flight + 1) / weight without division: a/b < c/d <=> a*d < c*b.
    let mut best: Vec<usize> = Vec::with_capacity(2);
    let mut best_score = (u64::MAX, 1u64);
    for c in candidates {
        let score = (u64::from(c.in_flight) + 1, u64::from(c.weight.max(1)));
        let lhs = u128::from(score.0) * u128::from(best_score.1);
        let rhs = u128::from(best_score.0) * u128::from(score.1);
        if lhs < rhs {
            best.clear();
            best.push(c.index);
            best_score = score;
        } else if lhs == rhs {
            best.push(c.index);
        }
    }
    best[rng.below(best.len() as u64) as usize]
}

fn p2c_score(c: &Candidate) -> f64 {
    c.latency_us.max(1.0) * f64::from(c.in_flight + 1) / f64::from(c.weight.max(1))
}

/// The two choices are drawn by weight (the second among the others), so
/// a heavy server is offered as often as its weight asks; the score then
/// steers away from the slower or busier of the two.
fn p2c(candidates: &[Candidate], rng: &mut Rng) -> usize {
    if candidates.len() == 1 {
        return candidates[0].index;
    }
    let a = weighted_position(candidates, None, rng);
    let b = weighted_position(candidates, Some(a), rng);
    let (a, b) = (&candidates[a], &candidates[b]);
    if p2c_score(b) < p2c_score(a) { b.index } else { a.index }
}

/// Position in `candidates` drawn by weight, skipping `except`.
fn weighted_position(candidates: &[Candidate], except: Option<usize>, rng: &mut Rng) -> usize {
    let weight = |i: usize| {
        if Some(i) == except {
            0
        } else {
            u64::from(candidates[i].weight.max(1))
        }
    };
    let total: u64 = (0..candidates.len()).map(weight).sum();
    let mut point = rng.below(total.max(1));
    for i in 0..candidates.len() {
        let w = weight(i);
        if point < w {
            return i;
        }
        point -= w;
    }
    (0..candidates.len()).rev().find(|&i| Some(i) != except).unwrap_or(0)
}

fn weighted_random(candidates: &[Candidate], rng: &mut Rng) -> usize {
    candidates[weighted_position(candidates, None, rng)].index
}

/// A ketama ring: every server owns `points_per_weight * weight` points.
#[derive(Debug, Default, Clone)]
pub struct Ring {
    /// (point, server index), sorted by point.
    points: Vec<(u64, usize)>,
}

/// Points per unit of weight: enough for an even spread over a few dozen
/// servers, few enough to build fast.
pub const POINTS_PER_WEIGHT: u32 = 160;

impl Ring {
    /// `servers` are (stable identity, weight); the identity (the server's
    /// address as configured) decides its points, so adding or removing one
    /// server leaves every other server's points where they were.
    pub fn new(servers: &[(String, u32)]) -> Ring {
        let mut points = Vec::new();
        for (index, (id, weight)) in servers.iter().enumerate() {
            for replica in 0..POINTS_PER_WEIGHT * (*weight).max(1) {
                points.push((hash64(format!("{id}#{replica}").as_bytes()), index));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The first server clockwise from `hash` that `usable` accepts.
    pub fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < hash);
        let n = self.points.len();
        (0..n).map(|i| self.points[(start + i) % n].1).find(|&s| usable(s))
    }
}

/// FNV-1a, then a splitmix64 finalizer for avalanche: stable across builds
/// and machines, so every proxy instance maps a key to the same server.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The hash of a request for [`HashKey`], or `None` when the key is absent
/// (the request is then balanced at random).
pub fn request_hash(key: &HashKey, client: IpAddr, headers: &http::HeaderMap, path: &str) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match client.to_canonical() {
            IpAddr::V4(v4) => hash64(&v4.octets()),
            IpAddr::V6(v6) => hash64(&v6.octets()),
        }),
        HashKey::Path => Some(hash64(path.as_bytes())),
        HashKey::Header(name) => headers.get(name).map(|v| hash64(v.as_bytes())),
        HashKey::Cookie(name) => cookie(headers, name).map(|v| hash64(v.as_bytes())),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

#[cfg(test)]
mod tests;
