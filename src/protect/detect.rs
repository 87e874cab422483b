//! Spike detection: is a surge of traffic a flash crowd or an attack?
//!
//! Every request is reduced to a [`Sample`] (hashes of its client and of its
//! signature, whether it carries cookies) and counted into the current
//! window. When a window closes ([`Detector::tick`]), its rate is compared
//! with a long-term baseline (EWMA); a spike is then classified by what it
//! is made of:
//! - **few sources**: the top 8 clients send most of it;
//! - **one signature**: most requests share one signature (method, path,
//!   header names in order, user agent) across many clients;
//! - **new cookieless clients on one signature**: nearly all requests come
//!   from clients never seen before, without cookies, and look alike;
//! - otherwise a **flash crowd**: many clients, varied requests: legitimate.
//!
//! Attack mode is entered after `enter_after` attack windows in a row and
//! left after `leave_after` calm ones (hysteresis), and every verdict
//! carries its reasons with their numbers.
//!
//! Memory is bounded whatever the number of clients: heavy hitters by
//! space-saving top-k, distinct clients by HyperLogLog, "seen before" by two
//! generations of a Bloom filter. Nothing here reads a clock or does I/O.

use std::collections::HashMap;

/// An exponentially weighted moving average with time constant `tau`.
#[derive(Debug, Clone)]
pub struct Ewma {
    tau: f64,
    value: Option<f64>,
}

impl Ewma {
    pub fn new(tau_secs: f64) -> Ewma {
        Ewma {
            tau: tau_secs.max(1e-9),
            value: None,
        }
    }

    /// Folds in `sample`, observed over `dt` seconds.
    pub fn update(&mut self, sample: f64, dt: f64) {
        let alpha = 1.0 - (-dt / self.tau).exp();
        self.value = Some(match self.value {
            None => sample,
            Some(v) => v + alpha * (sample - v),
        });
    }

    pub fn value(&self) -> f64 {
        self.value.unwrap_or(0.0)
    }

    pub fn is_warm(&self) -> bool {
        self.value.is_some()
    }
}

/// Space-saving top-k (Metwally et al.): at most `capacity` counters; a
/// new key replaces the smallest counter and inherits its count, so every
/// key with more than `total / capacity` occurrences is kept.
#[derive(Debug, Clone)]
pub struct SpaceSaving {
    capacity: usize,
    counts: HashMap<u64, u64>,
    total: u64,
}

impl SpaceSaving {
    pub fn new(capacity: usize) -> SpaceSaving {
        SpaceSaving {
            capacity: capacity.max(1),
            counts: HashMap::with_capacity(capacity.max(1)),
            total: 0,
        }
    }

    pub fn observe(&mut self, key: u64) {
        self.total += 1;
        if let Some(c) = self.counts.get_mut(&key) {
            *c += 1;
            return;
        }
        if self.counts.len() < self.capacity {
            self.counts.insert(key, 1);
            return;
        }
        // Replace the smallest counter (a linear scan: capacity is small).
        if let Some((&min_key, &min)) = self.counts.iter().min_by_key(|(_, c)| **c) {
            self.counts.remove(&min_key);
            self.counts.insert(key, min + 1);
        }
    }

    /// The `n` largest counters, largest first (counts may overestimate by
    /// at most `total / capacity`).
    pub fn top(&self, n: usize) -> Vec<(u64, u64)> {
        let mut all: Vec<(u64, u64)> = self.counts.iter().map(|(k, c)| (*k, *c)).collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Counters in use (never more than the capacity).
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn clear(&mut self) {
        self.counts.clear();
        self.total = 0;
    }
}

/// HyperLogLog with 2^10 registers (about 3% standard error, 1 KiB).
#[derive(Debug, Clone)]
pub struct Hll {
    registers: Vec<u8>,
}

const HLL_BITS: u32 = 10;

impl Default for Hll {
    fn default() -> Self {
        Hll {
            registers: vec![0; 1 << HLL_BITS],
        }
    }
}

impl Hll {
    /// Adds a well-mixed 64-bit hash.
    pub fn add(&mut self, hash: u64) {
        let index = (hash >> (64 - HLL_BITS)) as usize;
        let rest = hash << HLL_BITS | (1 << (HLL_BITS - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if let Some(r) = self.registers.get_mut(index) {
            *r = (*r).max(rank);
        }
    }

    pub fn estimate(&self) -> f64 {
        let m = self.registers.len() as f64;
        let sum: f64 = self.registers.iter().map(|r| 2f64.powi(-i32::from(*r))).sum();
        let raw = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
        let zeros = self.registers.iter().filter(|r| **r == 0).count();
        if raw <= 2.5 * m && zeros > 0 {
            // Small range: linear counting.
            m * (m / zeros as f64).ln()
        } else {
            raw
        }
    }

    pub fn clear(&mut self) {
        self.registers.iter_mut().for_each(|r| *r = 0);
    }
}

/// Two generations of a Bloom filter: "seen within the last one or two
/// periods", in fixed memory. Clients of the current window go into a
/// pending filter, merged when the window closes ([`SeenFilter::commit`]),
/// so a client is "new" for its whole first window.
#[derive(Debug, Clone)]
pub struct SeenFilter {
    current: Vec<u64>,
    previous: Vec<u64>,
    pending: Vec<u64>,
}

const BLOOM_WORDS: usize = 1 << 14; // 2^20 bits = 128 KiB per generation

impl Default for SeenFilter {
    fn default() -> Self {
        SeenFilter {
            current: vec![0; BLOOM_WORDS],
            previous: vec![0; BLOOM_WORDS],
            pending: vec![0; BLOOM_WORDS],
        }
    }
}

impl SeenFilter {
    fn positions(hash: u64) -> [usize; 3] {
        let bits = (BLOOM_WORDS * 64) as u64;
        let h2 = hash.rotate_left(21) ^ 0x9E37_79B9_7F4A_7C15;
        [0u64, 1, 2].map(|i| (hash.wrapping_add(i.wrapping_mul(h2)) % bits) as usize)
    }

    /// Notes a client of the current window (seen from the next one on).
    pub fn insert(&mut self, hash: u64) {
        for p in Self::positions(hash) {
            self.pending[p / 64] |= 1 << (p % 64);
        }
    }

    /// Ends the window: its clients count as seen from now on if `keep`
    /// (clients of an attack window are not remembered as returning).
    pub fn commit(&mut self, keep: bool) {
        if keep {
            for (c, p) in self.current.iter_mut().zip(&self.pending) {
                *c |= *p;
            }
        }
        self.pending.iter_mut().for_each(|w| *w = 0);
    }

    pub fn contains(&self, hash: u64) -> bool {
        let has = |words: &[u64]| {
            Self::positions(hash)
                .iter()
                .all(|p| words[p / 64] & (1 << (p % 64)) != 0)
        };
        has(&self.current) || has(&self.previous)
    }

    /// Starts a new generation; the oldest is forgotten.
    pub fn rotate(&mut self) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.iter_mut().for_each(|w| *w = 0);
    }
}

/// One request, as the detector sees it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Hash of the client address.
    pub client: u64,
    /// Hash of method, path, header names in order and user agent.
    pub signature: u64,
    pub has_cookie: bool,
    /// The route's index, for the per-route judgement (`None`: only the
    /// global one).
    pub route: Option<usize>,
}

/// Thresholds of the classifier.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Seconds per window.
    pub window: f64,
    /// Time constant of the baseline, seconds.
    pub baseline_tau: f64,
    /// A window is a spike above `spike_factor` x baseline and `min_rate`.
    pub spike_factor: f64,
    pub min_rate: f64,
    /// Share of the top 8 clients that makes a spike "few sources".
    pub few_sources_share: f64,
    /// Share of one signature (with at least 50 clients) that makes a
    /// spike "one signature".
    pub one_signature_share: f64,
    /// Windows in a row to enter / leave attack mode.
    pub enter_after: u32,
    pub leave_after: u32,
    /// Windows per generation of the "seen before" filter.
    pub seen_generation: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window: 5.0,
            baseline_tau: 600.0,
            spike_factor: 3.0,
            min_rate: 50.0,
            few_sources_share: 0.5,
            one_signature_share: 0.8,
            enter_after: 2,
            leave_after: 6,
            seen_generation: 360,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    /// A spike made of many varied clients: legitimate.
    FlashCrowd,
    Attack,
}

/// The classification of one window, with its reasons and numbers.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub kind: Kind,
    pub reasons: Vec<String>,
    pub rate: f64,
    pub baseline: f64,
    pub distinct_clients: f64,
    pub top_sources_share: f64,
    pub top_signature_share: f64,
    pub new_client_share: f64,
    pub cookieless_share: f64,
    /// The heaviest clients of the window (hashes), largest first: only
    /// those sending at least 5 times what a typical client sent in calm
    /// windows, so an ordinary client is never among them.
    pub top_sources: Vec<u64>,
}

/// A change of attack mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Entered(Vec<String>),
    Left,
}

/// One scope's window counters and baseline: the whole proxy, or one
/// route. A small route under attack can be drowned in the global
/// numbers, so each route is judged on its own as well.
#[derive(Debug, Clone)]
struct Scope {
    /// `None` for the global scope; the route's name otherwise.
    name: Option<String>,
    baseline: Ewma,
    /// Distinct clients per calm window, for the typical per-client rate.
    baseline_clients: Ewma,
    sources: SpaceSaving,
    signatures: SpaceSaving,
    distinct: Hll,
    requests: u64,
    new_clients: u64,
    cookieless: u64,
}

/// What one scope's window was.
struct ScopeVerdict {
    kind: Kind,
    reasons: Vec<String>,
    rate: f64,
    baseline: f64,
    distinct_clients: f64,
    top_sources_share: f64,
    top_signature_share: f64,
    new_client_share: f64,
    cookieless_share: f64,
    top_sources: Vec<u64>,
}

impl Scope {
    fn new(name: Option<String>, settings: &Settings) -> Scope {
        Scope {
            name,
            baseline: Ewma::new(settings.baseline_tau),
            baseline_clients: Ewma::new(settings.baseline_tau),
            sources: SpaceSaving::new(64),
            signatures: SpaceSaving::new(64),
            distinct: Hll::default(),
            requests: 0,
            new_clients: 0,
            cookieless: 0,
        }
    }

    fn observe(&mut self, sample: &Sample, new: bool) {
        self.requests += 1;
        self.sources.observe(sample.client);
        self.signatures.observe(sample.signature);
        self.distinct.add(sample.client);
        if new {
            self.new_clients += 1;
        }
        if !sample.has_cookie {
            self.cookieless += 1;
        }
    }

    /// Classifies the window; `attack` is whether attack mode is on.
    #[allow(
        clippy::too_many_lines,
        reason = "the classifier's steps in order (documented in docs/protection.md); split, the order is lost"
    )]
    fn close(&mut self, s: &Settings, attack: bool) -> ScopeVerdict {
        let n = self.requests.max(1) as f64;
        let rate = self.requests as f64 / s.window;
        let baseline = self.baseline.value();
        let top = self.sources.top(8);
        let top_sources_share = top.iter().map(|(_, c)| *c as f64).sum::<f64>() / n;
        let top_signature_share = self.signatures.top(1).first().map_or(0.0, |(_, c)| *c as f64 / n);
        let distinct_clients = self.distinct.estimate();
        let new_client_share = self.new_clients as f64 / n;
        let cookieless_share = self.cookieless as f64 / n;
        // Before the baseline has learned anything, any rate over
        // `min_rate` is judged by what it is made of.
        let spike = rate >= s.min_rate && (!self.baseline.is_warm() || rate > s.spike_factor * baseline);

        // What the window is made of, spike or not.
        let mut signs = Vec::new();
        if top_sources_share >= s.few_sources_share {
            signs.push(format!(
                "few sources: the top {} clients sent {:.0}% of requests",
                top.len(),
                top_sources_share * 100.0
            ));
        }
        if top_signature_share >= s.one_signature_share && distinct_clients >= 50.0 {
            signs.push(format!(
                "one signature: {:.0}% of requests look alike across {distinct_clients:.0} clients",
                top_signature_share * 100.0
            ));
        }
        if new_client_share >= 0.9 && cookieless_share >= 0.9 && top_signature_share >= 0.5 {
            signs.push(format!(
                "new clients without cookies: {:.0}% never seen, {:.0}% without cookies, {:.0}% on one signature",
                new_client_share * 100.0,
                cookieless_share * 100.0,
                top_signature_share * 100.0
            ));
        }
        let clean = signs.is_empty();

        let mut reasons = Vec::new();
        let kind = if !spike {
            Kind::Normal
        } else {
            reasons.push(if self.baseline.is_warm() {
                format!("rate {rate:.0}/s against a baseline of {baseline:.0}/s")
            } else {
                format!("rate {rate:.0}/s with no baseline yet")
            });
            if clean {
                reasons.push(format!(
                    "flash crowd: {distinct_clients:.0} clients, top 8 send {:.0}%, top signature {:.0}%",
                    top_sources_share * 100.0,
                    top_signature_share * 100.0
                ));
                Kind::FlashCrowd
            } else {
                reasons.extend(signs);
                Kind::Attack
            }
        };
        if let Some(name) = &self.name {
            for reason in &mut reasons {
                *reason = format!("route {name}: {reason}");
            }
        }

        // The baseline learns only from windows that look legitimate and
        // only outside attack mode, so an attack never becomes the new
        // normal (a lasting flash crowd slowly does).
        if clean && !attack {
            self.baseline.update(rate, s.window);
            self.baseline_clients.update(distinct_clients, s.window);
        }
        // What one client typically sends per second in calm windows
        // (before any: a tenth of min_rate); heavy sources are 5x that.
        let typical = if self.baseline.is_warm() && self.baseline_clients.value() >= 1.0 {
            self.baseline.value() / self.baseline_clients.value()
        } else {
            s.min_rate / 10.0
        };
        let heavy = (5.0 * typical * s.window).max(1.0);
        let top_sources = top
            .iter()
            .filter(|(_, count)| *count as f64 >= heavy)
            .map(|(k, _)| *k)
            .collect();
        self.requests = 0;
        self.new_clients = 0;
        self.cookieless = 0;
        self.sources.clear();
        self.signatures.clear();
        self.distinct.clear();
        ScopeVerdict {
            kind,
            reasons,
            rate,
            baseline,
            distinct_clients,
            top_sources_share,
            top_signature_share,
            new_client_share,
            cookieless_share,
            top_sources,
        }
    }
}

/// The detector: counts samples into the current window, globally and per
/// route, and classifies each window when it closes. A window is an
/// attack if the whole proxy's traffic or any one route's is.
#[derive(Debug, Clone)]
pub struct Detector {
    settings: Settings,
    global: Scope,
    routes: Vec<Scope>,
    seen: SeenFilter,
    windows: u64,
    attack: bool,
    attack_windows: u32,
    calm_windows: u32,
    last: Option<Verdict>,
}

impl Detector {
    /// A detector of the whole proxy's traffic only.
    pub fn new(settings: Settings) -> Detector {
        Detector::with_routes(settings, Vec::new())
    }

    /// A detector that also judges each named route alone (samples carry
    /// the route's index in this list).
    pub fn with_routes(settings: Settings, routes: Vec<String>) -> Detector {
        Detector {
            global: Scope::new(None, &settings),
            routes: routes.into_iter().map(|r| Scope::new(Some(r), &settings)).collect(),
            settings,
            seen: SeenFilter::default(),
            windows: 0,
            attack: false,
            attack_windows: 0,
            calm_windows: 0,
            last: None,
        }
    }

    pub fn observe(&mut self, sample: Sample) {
        let new = !self.seen.contains(sample.client);
        self.global.observe(&sample, new);
        if let Some(route) = sample.route.and_then(|r| self.routes.get_mut(r)) {
            route.observe(&sample, new);
        }
        self.seen.insert(sample.client);
    }

    pub fn in_attack(&self) -> bool {
        self.attack
    }

    /// Whether `client` was seen in a calm window of the last one or two
    /// periods (not counting the current window).
    pub fn is_returning(&self, client: u64) -> bool {
        self.seen.contains(client)
    }

    pub fn last_verdict(&self) -> Option<&Verdict> {
        self.last.as_ref()
    }

    /// Closes the window: classifies it (globally and per route), updates
    /// the baselines and attack mode, and starts the next window.
    pub fn tick(&mut self) -> (Verdict, Option<Transition>) {
        let s = &self.settings;
        let global = self.global.close(s, self.attack);
        let routes: Vec<ScopeVerdict> = self.routes.iter_mut().map(|r| r.close(s, self.attack)).collect();

        // The whole proxy's verdict, with the routes' attacks added: their
        // reasons (named by route) and their heavy sources.
        let mut kind = global.kind;
        let mut reasons = global.reasons;
        let mut top_sources = if global.kind == Kind::Attack {
            global.top_sources
        } else {
            Vec::new()
        };
        for route in routes {
            match route.kind {
                Kind::Attack => {
                    if kind != Kind::Attack {
                        // The route's attack is the story; a global flash
                        // crowd reason would only confuse it.
                        reasons.clear();
                    }
                    kind = Kind::Attack;
                    reasons.extend(route.reasons);
                    for source in route.top_sources {
                        if !top_sources.contains(&source) {
                            top_sources.push(source);
                        }
                    }
                }
                Kind::FlashCrowd if kind == Kind::Normal => {
                    kind = Kind::FlashCrowd;
                    reasons.extend(route.reasons);
                }
                _ => {}
            }
        }

        let transition = if kind == Kind::Attack {
            self.attack_windows += 1;
            self.calm_windows = 0;
            (!self.attack && self.attack_windows >= s.enter_after).then(|| {
                self.attack = true;
                Transition::Entered(reasons.clone())
            })
        } else {
            self.calm_windows += 1;
            self.attack_windows = 0;
            (self.attack && self.calm_windows >= s.leave_after).then(|| {
                self.attack = false;
                Transition::Left
            })
        };

        let verdict = Verdict {
            kind,
            reasons,
            rate: global.rate,
            baseline: global.baseline,
            distinct_clients: global.distinct_clients,
            top_sources_share: global.top_sources_share,
            top_signature_share: global.top_signature_share,
            new_client_share: global.new_client_share,
            cookieless_share: global.cookieless_share,
            top_sources,
        };
        // Clients of attack windows are not remembered as returning.
        self.seen.commit(kind != Kind::Attack && !self.attack);
        self.windows += 1;
        if self.windows % u64::from(s.seen_generation.max(1)) == 0 {
            self.seen.rotate();
        }
        self.last = Some(verdict.clone());
        (verdict, transition)
    }
}

#[cfg(test)]
mod tests;
