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
            ..Settings::default()
        };
        Adaptive {
            config: config.clone(),
            step: super::StepMode::new(config.mode),
            detector: Mutex::new(Detector::with_routes(settings, routes)),
            attack: AtomicBool::new(false),
            suspects: ArcSwap::from_pointee(Vec::new()),
            mode: tokio::sync::watch::Sender::new(false),
            suspect_limiter: Limiter::new(config.suspect_rate),
        }
    }

    /// Spends one request of a suspect's tightened allowance; the wait
    /// until the next one when it is spent.
    pub fn check_suspect(&self, client: u64) -> Result<(), std::time::Duration> {
        self.suspect_limiter.check(client)
    }

    /// Whether `client` was seen in a calm window before now (a returning
    /// client, trusted by load shedding).
    pub fn is_returning(&self, client: u64) -> bool {
        self.detector.lock().is_ok_and(|d| d.is_returning(client))
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
