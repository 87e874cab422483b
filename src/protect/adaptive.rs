//! Attack mode: the spike detector ([`super::detect`]) fed by every
//! request, ticked once per window, and what attack mode does.
//!
//! In `enforce` mode, while under attack: the heaviest sources of a
//! few-source attack are held to `suspect_rate` (429 beyond it), and routes with
//! `challenge = "attack"` challenge clients without a valid cookie. In
//! `shadow` mode the same decisions are only counted and logged.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use http::HeaderMap;

use super::detect::{Detector, Kind, Sample, Settings, Transition, Verdict};
use super::rate::{Limiter, key_hash};
use crate::config::AdaptiveConfig;

/// The detector and attack mode of a running proxy.
pub struct Adaptive {
    pub config: AdaptiveConfig,
    /// Enforce or shadow: the config's, or the operator's switch.
    pub step: super::StepMode,
    detector: Mutex<Detector>,
    attack: AtomicBool,
    /// Client hashes refused while attack mode is on (the heaviest sources
    /// of a few-source attack); empty otherwise.
    suspects: ArcSwap<Vec<u64>>,
    /// Follows attack mode, for whoever waits on a change (admin API, tests).
    mode: tokio::sync::watch::Sender<bool>,
    /// Windows closed so far, for whoever waits on a verdict (tests).
    windows: tokio::sync::watch::Sender<u64>,
    /// The tightened rate of each suspect (ladder step 1).
    suspect_limiter: Limiter,
}

/// What the admin API and tests can read.
#[derive(Debug, Clone)]
pub struct AdaptiveState {
    pub attack: bool,
    pub last: Option<Verdict>,
}

impl Adaptive {
    /// Attack mode judged on the whole proxy's traffic and on each of
    /// `routes` (names, in config order) alone.
    pub fn new(config: &AdaptiveConfig, routes: Vec<String>) -> Adaptive {
        let settings = Settings {
            window: config.window.as_secs_f64(),
            spike_factor: config.spike_factor,
            min_rate: config.min_rate,
            enter_after: config.enter_after,
            leave_after: config.leave_after,
            learn: config.learn.as_secs_f64(),
            max_rate: config.max_rate,
            trust_generation: (config.trust_after.as_secs_f64() / config.window.as_secs_f64()).ceil() as u32,
            ..Settings::default()
        };
        Adaptive {
            config: config.clone(),
            step: super::StepMode::new(config.mode),
            detector: Mutex::new(Detector::with_routes(settings, routes)),
            attack: AtomicBool::new(false),
            suspects: ArcSwap::from_pointee(Vec::new()),
            mode: tokio::sync::watch::Sender::new(false),
            windows: tokio::sync::watch::Sender::new(0),
            suspect_limiter: Limiter::new(config.suspect_rate),
        }
    }

    /// Spends one request of a suspect's tightened allowance; the wait
    /// until the next one when it is spent.
    pub fn check_suspect(&self, client: u64) -> Result<(), std::time::Duration> {
        self.suspect_limiter.check(client)
    }

    /// Attack mode of `config` that takes over what `old` learned
    /// (baselines, heavy clients' histories, the client memory, attack
    /// mode and its suspects): a reload that rebuilt it. `old` is only
    /// read, so a dry run changes nothing.
    pub fn carried_over(old: &Adaptive, config: &AdaptiveConfig, routes: Vec<String>) -> Adaptive {
        let next = Adaptive::new(config, routes);
        if let (Ok(mut detector), Ok(before)) = (next.detector.lock(), old.detector.lock()) {
            detector.carry_over(&before);
        }
        let attack = old.in_attack();
        next.attack.store(attack, Ordering::Relaxed);
        next.mode.send_replace(attack);
        next.suspects.store(old.suspects.load_full());
        next
    }

    /// Whether `client` has earned trust for load shedding's reserve: seen
    /// in calm windows of two generations (`trust_after` apart), never
    /// part of a spike before that.
    pub fn is_trusted(&self, client: u64) -> bool {
        self.detector.lock().is_ok_and(|d| d.is_trusted(client))
    }

    /// Whether attack mode leaves `client` alone when it challenges: a
    /// client the detector trusts, or a heavy client with a calm history
    /// (an API partner that keeps no cookies would otherwise be shut
    /// out). A suspect is never known: its rate changed.
    pub fn is_known(&self, client: u64) -> bool {
        !self.is_suspect(client)
            && self
                .detector
                .lock()
                .is_ok_and(|d| d.is_trusted(client) || d.is_known_heavy(client))
    }

    /// A receiver of the count of windows closed.
    pub fn windows(&self) -> tokio::sync::watch::Receiver<u64> {
        self.windows.subscribe()
    }

    /// Forgets idle suspect keys.
    pub fn housekeeping(&self) {
        self.suspect_limiter.housekeeping();
    }

    pub fn observe(&self, sample: Sample) {
        if let Ok(mut d) = self.detector.lock() {
            d.observe(sample);
        }
    }

    /// Closes the window; returns its verdict and any change of mode.
    pub fn tick(&self) -> Option<(Verdict, Option<Transition>)> {
        let (verdict, transition) = self.detector.lock().ok()?.tick();
        let attack = match &transition {
            Some(Transition::Entered(_)) => true,
            Some(Transition::Left) => false,
            None => self.attack.load(Ordering::Relaxed),
        };
        self.attack.store(attack, Ordering::Relaxed);
        self.mode.send_if_modified(|on| std::mem::replace(on, attack) != attack);
        self.windows.send_modify(|n| *n += 1);
        let few_sources = verdict.kind == Kind::Attack && verdict.reasons.iter().any(|r| r.contains("few sources"));
        let suspects = if attack && few_sources {
            verdict.top_sources.clone()
        } else if attack {
            // Keep the last suspects until the attack is over.
            self.suspects.load().to_vec()
        } else {
            Vec::new()
        };
        self.suspects.store(std::sync::Arc::new(suspects));
        Some((verdict, transition))
    }

    pub fn in_attack(&self) -> bool {
        self.attack.load(Ordering::Relaxed)
    }

    pub fn is_suspect(&self, client: u64) -> bool {
        self.in_attack() && self.suspects.load().contains(&client)
    }

    /// A receiver that sees every change of attack mode.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.mode.subscribe()
    }

    pub fn state(&self) -> AdaptiveState {
        AdaptiveState {
            attack: self.in_attack(),
            last: self.detector.lock().ok().and_then(|d| d.last_verdict().cloned()),
        }
    }
}

/// The client as the detector counts it.
pub fn client_hash(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => key_hash(&[b"client", &v4.octets()]),
        IpAddr::V6(v6) => key_hash(&[b"client", &v6.octets()]),
    }
}

/// A request's signature: method, path, header names in order, user agent.
pub fn signature(method: &http::Method, path: &str, headers: &HeaderMap) -> u64 {
    let mut names = Vec::with_capacity(headers.len() * 12);
    for name in headers.keys() {
        names.extend_from_slice(name.as_str().as_bytes());
        names.push(b'\n');
    }
    let agent = headers.get(http::header::USER_AGENT).map_or(&b""[..], |v| v.as_bytes());
    key_hash(&[method.as_str().as_bytes(), path.as_bytes(), &names, agent])
}
