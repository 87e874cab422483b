//! Server health: the state each server carries (in flight, latency, active
//! check result, passive ejection, drain), the outlier-ejection rules, the
//! retry budget, and the active health check task.
//!
//! The rules are pure functions of a millisecond clock passed in, so tests
//! drive them without sleeping; the request path only touches atomics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

pub use crate::config::{CheckKind, CheckSettings, OutlierSettings, RetrySettings};

/// Milliseconds on a process-wide monotonic clock.
pub fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

/// The statuses that count as a server failing for passive health: the
/// gateway errors (502, 503, 504), which say the server or what is behind
/// it is not working. Not 500, which a request can provoke.
pub fn is_gateway_failure(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// Slow start and the latency estimator's decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    pub weight: u32,
    pub slow_start: Duration,
}

/// The live state of one server; shared by requests, checks and the admin.
#[derive(Debug)]
pub struct ServerHealth {
    pub in_flight: AtomicU32,
    /// Peak-EWMA latency in microseconds, as f64 bits.
    latency_bits: AtomicU64,
    latency_at_ms: AtomicU64,
    /// Result of active checks (true when none are configured).
    pub checked_healthy: AtomicBool,
    /// When the server last became healthy (for slow start), 0 = from start.
    healthy_since_ms: AtomicU64,
    /// Passive health: failures in a row, times ejected, ejected until.
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Set by the operator: no new requests, in-flight ones finish.
    pub draining: AtomicBool,
    /// A weight set by the operator (admin API) in place of the
    /// configured one, with the configured weight it replaced:
    /// `override << 32 | configured`; 0 = none. It applies only while the
    /// configured weight is still that one, so a reload that changes the
    /// file's weight ends it without anyone writing here.
    weight_override: AtomicU64,
    /// Failed tries (connect errors, resets, timeouts, 5xx) since start.
    pub failures: AtomicU64,
}

/// Where a server stands, for logs, metrics and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStatus {
    Healthy,
    /// Failed its active health checks.
    Unhealthy,
    /// Ejected by outlier detection until the given time.
    Ejected,
    Draining,
}

/// Latency decay time of the peak EWMA.
const DECAY_MS: f64 = 10_000.0;
/// Latency assumed before the first answer (1 ms).
const DEFAULT_LATENCY_US: f64 = 1_000.0;

impl Default for ServerHealth {
    fn default() -> Self {
        ServerHealth {
            in_flight: AtomicU32::new(0),
            latency_bits: AtomicU64::new(DEFAULT_LATENCY_US.to_bits()),
            latency_at_ms: AtomicU64::new(0),
            checked_healthy: AtomicBool::new(true),
            healthy_since_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            weight_override: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }
}

impl ServerHealth {
    pub fn status(&self, now: u64) -> ServerStatus {
        if self.draining.load(Ordering::Relaxed) {
            ServerStatus::Draining
        } else if !self.checked_healthy.load(Ordering::Relaxed) {
            ServerStatus::Unhealthy
        } else if self.ejected_until_ms.load(Ordering::Relaxed) > now {
            ServerStatus::Ejected
        } else {
            ServerStatus::Healthy
        }
    }

    pub fn latency_us(&self) -> f64 {
        f64::from_bits(self.latency_bits.load(Ordering::Relaxed))
    }

    /// Peak EWMA: a slower answer is taken at once, a faster one decays the
    /// estimate towards it with time constant `DECAY_MS`.
    pub fn observe_latency(&self, sample_us: f64, now: u64) {
        let previous = self.latency_us();
        let last = self.latency_at_ms.swap(now, Ordering::Relaxed);
        let next = if sample_us > previous {
            sample_us
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / DECAY_MS).exp();
            previous * w + sample_us * (1.0 - w)
        };
        self.latency_bits.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Effective weight: ramps linearly from 1 to `weight` over `slow_start`
    /// after the server (re)joined.
    pub fn effective_weight(&self, settings: &ServerSettings, now: u64) -> u32 {
        let weight = self.weight(settings);
        let since = self.healthy_since_ms.load(Ordering::Relaxed);
        let window = settings.slow_start.as_millis() as u64;
        if since == 0 || window == 0 {
            return weight;
        }
        let elapsed = now.saturating_sub(since);
        if elapsed >= window {
            return weight;
        }
        let scaled = u64::from(weight) * elapsed / window;
        (scaled as u32).clamp(1, weight)
    }

    /// The weight in use: the operator's, else the configured one.
    pub fn weight(&self, settings: &ServerSettings) -> u32 {
        let packed = self.weight_override.load(Ordering::Relaxed);
        let (weight, replaced) = ((packed >> 32) as u32, packed as u32);
        if weight > 0 && replaced == settings.weight {
            weight
        } else {
            settings.weight.max(1)
        }
    }

    /// Sets the operator's weight in place of `configured` (`None`: none).
    pub fn set_weight(&self, weight: Option<u32>, configured: u32) {
        let packed = weight.map_or(0, |w| (u64::from(w) << 32) | u64::from(configured));
        self.weight_override.store(packed, Ordering::Relaxed);
    }

    /// Marks the start of a slow-start ramp (server came back).
    pub fn rejoined(&self, now: u64) {
        self.healthy_since_ms.store(now, Ordering::Relaxed);
    }

    /// Passive success: resets the failure streak.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Passive failure. Returns `Some(duration)` when this failure ejects
    /// the server; `can_eject` says whether the group's cap allows it.
    pub fn record_failure(&self, settings: &OutlierSettings, now: u64, can_eject: bool) -> Option<Duration> {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if settings.consecutive_failures == 0 {
            return None;
        }
        let streak = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < settings.consecutive_failures || !can_eject {
            return None;
        }
        if self.ejected_until_ms.load(Ordering::Relaxed) > now {
            return None;
        }
        let times = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = ejection_time(settings, times);
        self.ejected_until_ms
            .store(now + duration.as_millis() as u64, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        // Back after the ejection: ramp up again.
        self.healthy_since_ms
            .store(now + duration.as_millis() as u64, Ordering::Relaxed);
        Some(duration)
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }
}

/// Ejection time for the `times`-th ejection: base x times, capped.
pub fn ejection_time(settings: &OutlierSettings, times: u32) -> Duration {
    settings
        .base_ejection
        .saturating_mul(times.max(1))
        .min(settings.max_ejection)
}

/// May one more server of a group of `total` with `ejected` already out be
/// ejected? Never the last available one, whatever the percentage.
pub fn may_eject(total: usize, ejected: usize, max_percent: u32) -> bool {
    if total <= 1 || ejected + 1 >= total {
        return false;
    }
    (ejected + 1) * 100 <= total * max_percent as usize
}

/// A sliding window of requests and retries, one-second buckets over ten
/// seconds: retries stay under `budget_percent` of requests, with a floor.
#[derive(Debug)]
pub struct RetryBudget {
    settings: RetrySettings,
    /// (second, requests, retries) per bucket.
    buckets: [Bucket; WINDOW],
}

const WINDOW: usize = 10;

#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    pub fn new(settings: RetrySettings) -> Self {
        RetryBudget {
            settings,
            buckets: Default::default(),
        }
    }

    pub fn settings(&self) -> &RetrySettings {
        &self.settings
    }

    fn bucket(&self, now_ms: u64) -> &Bucket {
        let second = now_ms / 1000;
        let bucket = &self.buckets[(second as usize) % WINDOW];
        if bucket.second.swap(second, Ordering::Relaxed) != second {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    pub fn record_request(&self, now_ms: u64) {
        self.bucket(now_ms).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a retry from the budget if one is left.
    pub fn try_retry(&self, now_ms: u64) -> bool {
        let current = now_ms / 1000;
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let second = b.second.load(Ordering::Relaxed);
            if second + WINDOW as u64 > current && second <= current {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = (requests * u64::from(self.settings.budget_percent) / 100)
            .max(u64::from(self.settings.min_per_second) * WINDOW as u64);
        if retries >= allowed {
            return false;
        }
        self.bucket(now_ms).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Consecutive results of one server's checks and the state they decide.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CheckCounter {
    ok_streak: u32,
    fail_streak: u32,
}

impl CheckCounter {
    /// Records a result; returns the new health when it changes.
    pub fn record(&mut self, ok: bool, currently_healthy: bool, settings: &CheckSettings) -> Option<bool> {
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
            (!currently_healthy && self.ok_streak >= settings.healthy_threshold).then_some(true)
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
            (currently_healthy && self.fail_streak >= settings.unhealthy_threshold).then_some(false)
        }
    }
}

/// Runs one check against the first address of a server; any failure
/// (refused, timeout, wrong status, missing body text) is `false`.
pub async fn run_check(
    settings: &CheckSettings,
    addrs: &[std::net::SocketAddr],
    server: &crate::config::ServerAddr,
) -> bool {
    let Some(addr) = addrs.first().copied() else {
        return false;
    };
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let CheckKind::Http {
            method,
            path,
            host,
            status,
            body_contains,
        } = &settings.kind
        else {
            return Some(true);
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
        // The connection ends when `sender` is dropped at the end of the check.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = host.clone().unwrap_or_else(|| server.to_string());
        let request = http::Request::builder()
            .method(method.clone())
            .uri(path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "portcullis-health-check")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let code = response.status().as_u16();
        if code < status.0 || code > status.1 {
            return Some(false);
        }
        let Some(needle) = body_contains else { return Some(true) };
        // Read at most 64 KiB of the body looking for the text.
        use http_body_util::BodyExt;
        let mut body = response.into_body();
        let mut seen: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.ok()?.data_ref() {
                seen.extend_from_slice(data);
                if seen.windows(needle.len().max(1)).any(|w| w == needle.as_bytes()) {
                    return Some(true);
                }
                if seen.len() > 64 << 10 {
                    break;
                }
            }
        }
        Some(false)
    };
    matches!(tokio::time::timeout(settings.timeout, attempt).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier() -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(45),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejection_backs_off_and_is_capped() {
        let s = outlier();
        let table = [(1, 10), (2, 20), (3, 30), (4, 40), (5, 45), (9, 45)];
        for (times, secs) in table {
            assert_eq!(ejection_time(&s, times), Duration::from_secs(secs), "ejection {times}");
        }
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets() {
        let s = outlier();
        let h = ServerHealth::default();
        let t = 1_000;
        assert_eq!(h.record_failure(&s, t, true), None);
        assert_eq!(h.record_failure(&s, t, true), None);
        h.record_success();
        assert_eq!(h.record_failure(&s, t, true), None);
        assert_eq!(h.record_failure(&s, t, true), None);
        assert_eq!(h.record_failure(&s, t, true), Some(Duration::from_secs(10)));
        assert_eq!(h.status(t + 9_999), ServerStatus::Ejected);
        assert_eq!(h.status(t + 10_000), ServerStatus::Healthy);
        // Back, fails again: ejected twice as long.
        let t2 = t + 10_000;
        for _ in 0..2 {
            assert_eq!(h.record_failure(&s, t2, true), None);
        }
        assert_eq!(h.record_failure(&s, t2, true), Some(Duration::from_secs(20)));
        assert_eq!(h.ejections(), 2);
    }

    #[test]
    fn the_cap_keeps_part_of_the_group() {
        let table = [
            // total, already ejected, max %, allowed
            (1, 0, 100, false),
            (2, 0, 50, true),
            (2, 1, 100, false),
            (3, 1, 50, false),
            (4, 1, 50, true),
            (4, 2, 50, false),
            (10, 0, 10, true),
            (10, 1, 10, false),
        ];
        for (total, ejected, percent, allowed) in table {
            assert_eq!(
                may_eject(total, ejected, percent),
                allowed,
                "{total} {ejected} {percent}"
            );
        }
        let h = ServerHealth::default();
        for _ in 0..10 {
            assert_eq!(h.record_failure(&outlier(), 5, false), None, "the cap forbids ejection");
        }
    }

    #[test]
    fn retry_budget_arithmetic() {
        let budget = RetryBudget::new(RetrySettings {
            max_retries: 2,
            budget_percent: 20,
            min_per_second: 1,
        });
        let t = 100_000;
        // Floor: 1 per second over the 10 s window = 10 retries with no traffic.
        for i in 0..10 {
            assert!(budget.try_retry(t), "retry {i} within the floor");
        }
        assert!(!budget.try_retry(t));
        // 1000 requests allow 20% = 200 retries in the window (10 used).
        for _ in 0..1000 {
            budget.record_request(t + 1_000);
        }
        let granted = (0..500).filter(|_| budget.try_retry(t + 1_000)).count();
        assert_eq!(granted, 190);
        // Eleven seconds later the window has moved on: the floor again.
        let granted = (0..50).filter(|_| budget.try_retry(t + 12_000)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn slow_start_ramps_the_weight() {
        let h = ServerHealth::default();
        let s = ServerSettings {
            weight: 10,
            slow_start: Duration::from_secs(10),
        };
        assert_eq!(
            h.effective_weight(&s, 5_000),
            10,
            "no ramp for a server up from the start"
        );
        h.rejoined(10_000);
        let table = [
            (10_000, 1),
            (11_000, 1),
            (15_000, 5),
            (19_000, 9),
            (20_000, 10),
            (60_000, 10),
        ];
        for (now, weight) in table {
            assert_eq!(h.effective_weight(&s, now), weight, "at {now}");
        }
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let h = ServerHealth::default();
        h.observe_latency(5_000.0, 1_000);
        assert_eq!(h.latency_us(), 5_000.0);
        h.observe_latency(1_000.0, 1_000 + 10_000);
        let decayed = h.latency_us();
        assert!(decayed > 1_000.0 && decayed < 5_000.0 * 0.5, "{decayed}");
    }

    #[test]
    fn check_thresholds() {
        let settings = CheckSettings {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        };
        let mut c = CheckCounter::default();
        assert_eq!(c.record(false, true, &settings), None);
        assert_eq!(c.record(false, true, &settings), None);
        assert_eq!(c.record(false, true, &settings), Some(false));
        assert_eq!(c.record(true, false, &settings), None);
        assert_eq!(c.record(false, false, &settings), None);
        assert_eq!(c.record(true, false, &settings), None);
        assert_eq!(c.record(true, false, &settings), Some(true));
    }
}
