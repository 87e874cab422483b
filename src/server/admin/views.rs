//! The admin API's read side: each `GET` answer built from the current
//! snapshot as JSON. Nothing here changes anything.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::super::Control;
use crate::change::{Step, mode_name_str};
use crate::upstream::health::{ServerStatus, now_ms};

pub fn status(control: &Control) -> Value {
    let snapshot = control.snapshot();
    let source = snapshot.config.source.as_ref();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_seconds": control.uptime().as_secs(),
        "ready": control.ready(),
        "generation": control.generation(),
        "config_file": source.map(|(p, _)| p.display().to_string()),
        "config_sha256": source.map(|(_, h)| h.clone()),
        "listeners": snapshot.config.listeners.iter().map(|l| json!({
            "name": l.name,
            "bind": l.bind.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "tls": l.tls.is_some(),
        })).collect::<Vec<_>>(),
        "routes": snapshot.config.routes.len(),
        "upstreams": snapshot.config.upstreams.len(),
    })
}

/// The running config as the text it was read from. Keys and tokens are
/// files it names, never its content, but header values it sets may be
/// credentials: the endpoint needs an operator token.
pub fn config(control: &Control) -> Value {
    let snapshot = control.snapshot();
    let source = snapshot.config.source.as_ref();
    json!({
        "file": source.map(|(p, _)| p.display().to_string()),
        "sha256": source.map(|(_, h)| h.clone()),
        "generation": control.generation(),
        "text": snapshot.config.text.as_deref(),
    })
}

fn status_name(status: ServerStatus) -> &'static str {
    match status {
        ServerStatus::Healthy => "healthy",
        ServerStatus::Unhealthy => "unhealthy",
        ServerStatus::Ejected => "ejected",
        ServerStatus::Draining => "draining",
    }
}

pub fn upstreams(control: &Control) -> Value {
    let snapshot = control.snapshot();
    let now = now_ms();
    let groups: Vec<Value> = snapshot
        .upstreams
        .iter()
        .map(|u| {
            let servers: Vec<Value> = u
                .servers
                .iter()
                .map(|s| {
                    let h = &s.health;
                    json!({
                        "server": s.label,
                        "status": status_name(h.status(now)),
                        "draining": h.draining.load(Ordering::Relaxed),
                        "in_flight": h.in_flight.load(Ordering::Relaxed),
                        "latency_ms": (h.latency_us() / 1000.0 * 1000.0).round() / 1000.0,
                        "ejections": h.ejections(),
                        "failures": h.failures.load(Ordering::Relaxed),
                        "weight": s.weight(),
                        "configured_weight": s.addr.weight,
                        "idle_connections": s.pool.idle_count(),
                    })
                })
                .collect();
            json!({
                "name": u.config.name,
                "in_flight": u.in_flight(),
                "servers": servers,
            })
        })
        .collect();
    json!({ "upstreams": groups })
}

pub fn cache(control: &Control) -> Value {
    let snapshot = control.snapshot();
    match &snapshot.cache {
        None => json!({ "enabled": false }),
        Some(cache) => {
            let flights = *cache.flight_stats().borrow();
            json!({
                "enabled": true,
                "keys": cache.store().keys(),
                "bytes": cache.store().bytes(),
                "memory": snapshot.config.cache.memory,
                "buffering": cache.buffering(),
                "requests_waiting": flights.waiting,
                "flights_landed": flights.landed,
            })
        }
    }
}

pub fn bans(control: &Control) -> Value {
    let snapshot = control.snapshot();
    match &snapshot.bans {
        None => json!({ "enabled": false, "bans": [] }),
        Some(bans) => {
            let now = now_ms();
            let list: Vec<Value> = bans
                .list(now)
                .iter()
                .map(|b| {
                    json!({
                        "client": bans.shown(b.client),
                        "seconds_left": b.until.saturating_sub(now).div_ceil(1000),
                    })
                })
                .collect();
            json!({ "enabled": true, "mode": mode_name_str(bans.mode.get()), "bans": list })
        }
    }
}

pub fn protection(control: &Control) -> Value {
    let snapshot = control.snapshot();
    let mode = |step: Step| -> Value {
        let mode = match step {
            Step::Adaptive => snapshot.adaptive.as_ref().map(|a| a.step.get()),
            Step::Bans => snapshot.bans.as_ref().map(|b| b.mode.get()),
            Step::LoadShedding => snapshot.shedders.iter().flatten().next().map(|s| s.mode.get()),
        };
        mode.map_or(Value::from("off"), |m| Value::from(mode_name_str(m)))
    };
    let steps: serde_json::Map<String, Value> = Step::ALL.iter().map(|s| (s.name().to_owned(), mode(*s))).collect();
    let attack = snapshot.adaptive.as_ref().map(|a| {
        let state = a.state();
        json!({
            "attack_mode": state.attack,
            "last_window": state.last.map(|v| json!({
                "kind": format!("{:?}", v.kind).to_lowercase(),
                "reasons": v.reasons,
                "rate": v.rate,
                "baseline": v.baseline,
                "distinct_clients": v.distinct_clients,
                "top_sources_share": v.top_sources_share,
                "top_sources": v.top_sources.iter().map(|h| format!("{h:016x}")).collect::<Vec<_>>(),
            })),
        })
    });
    let shedding: Vec<Value> = snapshot
        .upstreams
        .iter()
        .zip(&snapshot.shedders)
        .filter_map(|(u, s)| {
            let s = s.as_ref()?;
            Some(json!({
                "upstream": u.config.name,
                "limit": s.limit(),
                "open_limit": s.open_limit(),
                "waiting": s.waiting(),
            }))
        })
        .collect();
    json!({
        "modes": steps,
        "adaptive": attack,
        "load_shedding": shedding,
        "bans_active": snapshot.bans.as_ref().map_or(0, |b| b.active_count(now_ms())),
    })
}

pub fn certificates(control: &Control) -> Value {
    let now = crate::state::unix_now() as i64;
    let listeners: Vec<Value> = control
        .certificates()
        .stores()
        .iter()
        .map(|store| {
            let table = store.current();
            let certs: Vec<Value> = table
                .certs
                .iter()
                .map(|c| {
                    json!({
                        "fingerprint": c.fingerprint,
                        "names": c.names,
                        "not_after": c.not_after,
                        "days_left": (c.not_after - now).div_euclid(86_400),
                    })
                })
                .collect();
            json!({ "listener": store.listener, "certificates": certs })
        })
        .collect();
    json!({ "listeners": listeners })
}
