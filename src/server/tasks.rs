//! The proxy's periodic tasks: housekeeping of the protection tables, and
//! the attack detector's window ticks (attack mode entered or left).

use super::*;

/// Forgets idle rate-limit keys, expired bans and old strike counts every
/// few seconds, so their memory is bounded by the keys seen recently.
pub(super) async fn housekeeping(connections: Arc<ConnTable>, snapshot: SharedSnapshot, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        connections.housekeeping();
        let current = snapshot.load();
        for limit in current.route_limits.iter().flatten() {
            limit.limiter.housekeeping();
        }
        if let Some(adaptive) = &current.adaptive {
            adaptive.housekeeping();
        }
        if let Some(bans) = &current.bans {
            bans.housekeeping(crate::upstream::health::now_ms());
        }
    }
}

/// Closes a detector window every `window`: logs, audits and counts each
/// change of attack mode with its reasons.
pub(super) async fn attack_watch(
    window: Duration,
    snapshot: SharedSnapshot,
    observe: Arc<Observe>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let current = snapshot.load();
        let Some(adaptive) = &current.adaptive else { return };
        let Some((verdict, transition)) = adaptive.tick() else {
            continue;
        };
        let mode = match adaptive.step.get() {
            crate::config::ProtectMode::Shadow => "shadow",
            crate::config::ProtectMode::Enforce => "enforce",
        };
        let (state, reasons) = match transition {
            None => continue,
            Some(crate::protect::detect::Transition::Entered(reasons)) => {
                tracing::warn!(%mode, reasons = ?reasons, "attack mode entered");
                ("entered", reasons)
            }
            Some(crate::protect::detect::Transition::Left) => {
                tracing::warn!(%mode, rate = verdict.rate, "attack mode left");
                ("left", verdict.reasons.clone())
            }
        };
        if let Some(m) = &observe.metrics {
            m.attack_mode.set(i64::from(state == "entered"));
        }
        observe.audit(Event::AttackMode {
            state: state.into(),
            mode: mode.into(),
            reasons,
        });
    }
}
