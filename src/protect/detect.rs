//! Spike detection: is a surge of traffic a flash crowd or an attack?
//!
//! Every request is reduced to a [`Sample`] (hashes of its client and of its
//! signature, whether it carries cookies) and counted into the current
//! window. When a window closes ([`Detector::tick`]), its rate is compared
//! with a long-term baseline (EWMA), once the scope has learned its
//! traffic (`learn`: before that, only an operator's `max_rate` makes a
//! spike); a spike is then classified by what it is made of:
//! - **few sources**: heavy clients whose rate changed against their own
//!   history (or that have none) send most of it: a heavy client sending
//!   what it always sent is never a sign;
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
//! space-saving top-k, distinct clients by HyperLogLog, "seen before" and
//! "trusted" by generations of Bloom filters ([`Memory`]), heavy clients'
//! own histories by a capped table. Nothing here reads a clock or does I/O.

use std::collections::HashMap;

mod sketches;
pub use sketches::{Bloom, Ewma, Hll, Memory, SpaceSaving, TRUST_GENERATIONS, TRUST_SEEN_IN};

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
    /// Windows per generation of the client memory ([`Memory`]): trust
    /// takes at least one generation to earn.
    pub trust_generation: u32,
    /// Seconds of traffic (windows with at least one request) a scope
    /// learns from before it judges spikes against its baseline; until
    /// then only `max_rate` makes a spike.
    pub learn: f64,
    /// An absolute ceiling (requests per second): a window above it is a
    /// spike whatever the baseline, learned or not.
    pub max_rate: Option<f64>,
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
            trust_generation: 60,
            learn: 60.0,
            max_rate: None,
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
    /// The suspects of the window (hashes), largest first: heavy clients
    /// (at least 5 times what a typical client sent in calm windows) whose
    /// rate changed against their own history (`spike_factor` times what
    /// they sent in calm windows, or new). An ordinary client, or a heavy
    /// one sending what it always sent, is never among them.
    pub top_sources: Vec<u64>,
    /// The whole proxy's traffic is still being learned (no verdict but
    /// `max_rate`).
    pub learning: bool,
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
    /// Windows with traffic so far, until the scope has learned.
    active_windows: u32,
    /// Heavy clients of calm windows: requests per window (EWMA), at most
    /// [`HEAVY_CAP`] of them.
    heavy: HashMap<u64, f64>,
}

/// Heavy clients whose own history is kept, per scope.
pub const HEAVY_CAP: usize = 1024;

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
    learning: bool,
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
            active_windows: 0,
            heavy: HashMap::new(),
        }
    }

    fn learned(&self, s: &Settings) -> bool {
        f64::from(self.active_windows) * s.window >= s.learn
    }

    /// Takes over what `old` learned (a reload that rebuilt the detector).
    fn carry_over(&mut self, old: &Scope, scale: f64) {
        self.baseline.carry(&old.baseline);
        self.baseline_clients.carry(&old.baseline_clients);
        self.active_windows = (f64::from(old.active_windows) / scale).round() as u32;
        self.heavy = old.heavy.iter().map(|(k, v)| (*k, v * scale)).collect();
    }

    /// Folds a calm window's heavy clients into their own history: every
    /// known one (absent: 0 this window), and the new ones sending at
    /// least `heavy` requests. The smallest histories go first when full.
    fn learn_heavy(&mut self, top: &[(u64, u64)], heavy: f64, s: &Settings) {
        let alpha = 1.0 - (-s.window / s.baseline_tau.max(1e-9)).exp();
        let counts: HashMap<u64, u64> = top.iter().copied().collect();
        self.heavy.retain(|client, value| {
            let count = counts.get(client).copied().unwrap_or(0) as f64;
            *value += alpha * (count - *value);
            *value >= 0.5
        });
        for &(client, count) in top {
            if count as f64 >= heavy && !self.heavy.contains_key(&client) {
                if self.heavy.len() >= HEAVY_CAP {
                    let smallest = self
                        .heavy
                        .iter()
                        .min_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(k, v)| (*k, *v));
                    match smallest {
                        Some((k, v)) if v < count as f64 => {
                            self.heavy.remove(&k);
                        }
                        _ => continue,
                    }
                }
                self.heavy.insert(client, count as f64);
            }
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
        let learning = !self.learned(s);
        let over_ceiling = s.max_rate.is_some_and(|max| rate > max);
        // A scope that has not learned its traffic judges nothing but the
        // operator's ceiling; once learned, a spike is a rate over
        // `spike_factor` x baseline and `min_rate` (with `learn = 0`, any
        // rate over `min_rate` until a baseline exists).
        let spike = over_ceiling
            || (!learning && rate >= s.min_rate && (!self.baseline.is_warm() || rate > s.spike_factor * baseline));

        // What one client typically sends per second in calm windows
        // (before any: a tenth of min_rate); heavy sources are 5x that.
        let typical = if self.baseline.is_warm() && self.baseline_clients.value() >= 1.0 {
            self.baseline.value() / self.baseline_clients.value()
        } else {
            s.min_rate / 10.0
        };
        let heavy = (5.0 * typical * s.window).max(1.0);
        // Suspects: heavy sources whose rate changed against their own
        // history (new ones have none). A heavy client sending what it
        // always sent is not a suspect, however large its share.
        let suspects: Vec<(u64, u64)> = top
            .iter()
            .filter(|(client, count)| {
                let own = self.heavy.get(client).copied().unwrap_or(0.0);
                let count = *count as f64;
                count >= heavy && count > s.spike_factor * own.max(typical * s.window)
            })
            .copied()
            .collect();
        let suspect_share = suspects.iter().map(|(_, c)| *c as f64).sum::<f64>() / n;

        // What the window is made of, spike or not.
        let mut signs = Vec::new();
        if suspect_share >= s.few_sources_share {
            signs.push(format!(
                "few sources: {} new or changed clients sent {:.0}% of requests",
                suspects.len(),
                suspect_share * 100.0
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
            reasons.push(if learning {
                format!(
                    "rate {rate:.0}/s above max_rate {:.0}/s while learning",
                    s.max_rate.unwrap_or(0.0)
                )
            } else if over_ceiling {
                format!("rate {rate:.0}/s above max_rate {:.0}/s", s.max_rate.unwrap_or(0.0))
            } else if self.baseline.is_warm() {
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

        // The baseline and the heavy clients' histories learn from calm
        // windows only and only outside attack mode, so an attack never
        // becomes the new normal (a lasting flash crowd slowly does).
        // While learning, every window under the ceiling teaches.
        if learning && self.requests > 0 && !over_ceiling {
            self.active_windows = self.active_windows.saturating_add(1);
        }
        let teaches = if learning { !over_ceiling } else { clean && !attack };
        if teaches {
            self.baseline.update(rate, s.window);
            self.baseline_clients.update(distinct_clients, s.window);
            let known = self.sources.top(64);
            self.learn_heavy(&known, heavy, s);
        }
        let top_sources = if kind == Kind::Attack {
            suspects.iter().map(|(k, _)| *k).collect()
        } else {
            Vec::new()
        };
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
            learning,
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
    memory: Memory,
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
            memory: Memory::new(settings.trust_generation),
            settings,
            attack: false,
            attack_windows: 0,
            calm_windows: 0,
            last: None,
        }
    }

    pub fn observe(&mut self, sample: Sample) {
        let new = !self.memory.is_returning(sample.client);
        self.global.observe(&sample, new);
        if let Some(route) = sample.route.and_then(|r| self.routes.get_mut(r)) {
            route.observe(&sample, new);
        }
        self.memory.insert(sample.client);
    }

    pub fn in_attack(&self) -> bool {
        self.attack
    }

    /// Whether `client` was seen in a calm window of the kept generations
    /// (not counting the current window).
    pub fn is_returning(&self, client: u64) -> bool {
        self.memory.is_returning(client)
    }

    /// Whether `client` has earned trust ([`Memory`]): seen in calm
    /// windows of two generations or more, never part of a spike before.
    pub fn is_trusted(&self, client: u64) -> bool {
        self.memory.is_trusted(client)
    }

    /// Whether `client` is a heavy client the whole proxy's traffic has a
    /// calm history of (an API partner, a crawler, a NAT).
    pub fn is_known_heavy(&self, client: u64) -> bool {
        self.global.heavy.contains_key(&client)
    }

    /// Takes over what `old` learned: the baselines and heavy clients of
    /// the whole proxy and of each route of the same name, the client
    /// memory and attack mode (a reload that rebuilt the detector, for
    /// instance because routes changed). A route `old` did not know
    /// learns from scratch.
    pub fn carry_over(&mut self, old: &Detector) {
        // Per-window numbers are rescaled when the window changed.
        let scale = self.settings.window / old.settings.window.max(1e-9);
        self.global.carry_over(&old.global, scale);
        for scope in &mut self.routes {
            if let Some(before) = old.routes.iter().find(|r| r.name == scope.name) {
                scope.carry_over(before, scale);
            }
        }
        let generation = self.settings.trust_generation;
        self.memory = old.memory.clone();
        self.memory.set_generation(generation);
        self.attack = old.attack;
        self.attack_windows = old.attack_windows;
        self.calm_windows = old.calm_windows;
        self.last = old.last.clone();
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
            learning: global.learning,
        };
        // Clients of spikes and of attack mode are not remembered as
        // returning, and cannot earn trust from them.
        self.memory.commit(kind == Kind::Normal && !self.attack);
        self.last = Some(verdict.clone());
        (verdict, transition)
    }
}

#[cfg(test)]
mod tests;
