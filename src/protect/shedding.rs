//! Origin load shedding: an adaptive concurrency limit per upstream group.
//!
//! A distributed flood whose every source stays under any per-IP limit
//! still adds up to more than the origin can serve; once the origin's
//! queue grows, every client waits behind the flood. Shedding keeps the
//! origin out of that regime: the proxy estimates how many requests the
//! group can have in flight before its latency degrades ([`Gradient`],
//! a latency-gradient estimator in the manner of Netflix's
//! concurrency-limits), and answers the excess at once with `503` and
//! `Retry-After` instead of queueing it.
//!
//! Part of the limit (`reserve`) is kept for clients the proxy already
//! trusts: those seen in a calm window before the spike (the detector's
//! returning-client filter) or presenting a valid challenge cookie. So
//! when the origin is full, new cookieless sources are shed first and
//! the clients of before the spike keep being served.
//!
//! [`Gradient`] is pure (samples in, limit out) and unit-tested alone;
//! [`Shedder`] wraps it for concurrent use: the limit is read from an
//! atomic on every request, the estimator is updated under a short lock
//! once per upstream response.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::config::LoadSheddingConfig;

/// The latency-gradient estimator of a concurrency limit.
///
/// It keeps a fast average of response latency (`short`) and the no-load
/// baseline: the lowest of the mean latencies of the last
/// [`BASELINE_WINDOWS`] one-second windows (means over whole windows, so
/// a few fast answers do not make a low baseline). Each sample moves the
/// limit toward `limit * gradient + sqrt(limit)`, with `gradient =
/// allowed / short` clamped to 0.5..=1, where `allowed` is `tolerance x
/// baseline` but at least the baseline plus 2 ms (below that, latency
/// differences are noise, not queueing): while the origin
/// answers within tolerance the limit grows by about `sqrt(limit)`; once
/// latency passes it, the limit shrinks in proportion. The `sqrt(limit)`
/// term is the queue the origin may hold; the limit settles where latency
/// is a little above `tolerance x baseline`.
///
/// A change in the origin's own speed (or a sustained overload) becomes
/// the baseline once it has lasted `BASELINE_WINDOWS` windows, a minute:
/// long enough that an attack is handled by the other layers first, short
/// enough that a slower release of the origin is not throttled for long.
/// Time is passed in (seconds), no clock is read.
#[derive(Debug, Clone)]
pub struct Gradient {
    limit: f64,
    min: f64,
    max: f64,
    tolerance: f64,
    short: Option<f64>,
    /// Mean latency of each closed window, oldest first.
    windows: std::collections::VecDeque<f64>,
    window_start: f64,
    window_sum: f64,
    window_count: u32,
    /// A request timed out since the last sample.
    timed_out_last: bool,
}

/// How far each sample moves the limit toward its target.
const SMOOTHING: f64 = 0.2;
/// Weight of one sample in the fast latency average.
const SHORT_WEIGHT: f64 = 0.1;
/// A timed-out request shrinks the limit by this factor.
const TIMEOUT_BACKOFF: f64 = 0.9;
/// Windows (one second each) the baseline remembers.
pub const BASELINE_WINDOWS: usize = 60;
/// Samples a window needs to count.
const WINDOW_MIN_SAMPLES: u32 = 10;
/// Requests waiting with no response head for this long (milliseconds):
/// the group is stalled, which is overload whatever the last latency.
const STALL_MS: u64 = 1000;
/// Once overload was seen, the limit holds this long (milliseconds) after
/// the last sign of it: a flood held at the limit brings latency back to
/// normal, and letting everyone in at that moment would refill the
/// origin's queue at once, over and over.
const HOLD_MS: u64 = 3000;
/// Trusted requests that may wait in line at once, whatever the limit:
/// each is a request the proxy holds anyway, and a limit of a few must
/// not turn a handful of regular clients away.
const MIN_LINE: u32 = 64;
/// Latency within this much of the baseline is never overload, whatever
/// the ratio: against a baseline of 0.1 ms, a context switch would
/// otherwise look like a tripled latency.
const NOISE_FLOOR: f64 = 0.002;

impl Gradient {
    pub fn new(initial: u32, min: u32, max: u32, tolerance: f64) -> Gradient {
        let (min, max) = (f64::from(min.max(1)), f64::from(max.max(min.max(1))));
        Gradient {
            limit: f64::from(initial).clamp(min, max),
            min,
            max,
            tolerance: tolerance.max(1.0),
            short: None,
            windows: std::collections::VecDeque::with_capacity(BASELINE_WINDOWS),
            window_start: 0.0,
            window_sum: 0.0,
            window_count: 0,
            timed_out_last: false,
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit as u32
    }

    /// Whether the last sample showed overload: latency past `tolerance`
    /// (or the noise floor) above the baseline, or a timeout since. No
    /// sample yet is no evidence either way, counted as overload (the
    /// limit holds until the group has answered once).
    pub fn congested(&self) -> bool {
        let Some(short) = self.short else { return true };
        if self.timed_out_last {
            return true;
        }
        let baseline = self.baseline().unwrap_or(short);
        short > (self.tolerance * baseline).max(baseline + NOISE_FLOOR)
    }

    /// The no-load latency estimate, if any window has closed.
    pub fn baseline(&self) -> Option<f64> {
        self.windows.iter().copied().reduce(f64::min)
    }

    /// One response's latency (seconds) at `now` (seconds on any steady
    /// clock), with the group's requests waiting for headers when it
    /// arrived; returns the new limit.
    pub fn sample(&mut self, latency: f64, in_flight: u32, now: f64) -> u32 {
        if !latency.is_finite() || latency < 0.0 || !now.is_finite() {
            return self.limit();
        }
        let latency = latency.max(1e-6);
        self.timed_out_last = false;
        let short = match self.short {
            None => latency,
            Some(s) => s + SHORT_WEIGHT * (latency - s),
        };
        self.short = Some(short);
        if now - self.window_start >= 1.0 {
            if self.window_count >= WINDOW_MIN_SAMPLES {
                if self.windows.len() == BASELINE_WINDOWS {
                    self.windows.pop_front();
                }
                self.windows.push_back(self.window_sum / f64::from(self.window_count));
            }
            self.window_start = now;
            self.window_sum = 0.0;
            self.window_count = 0;
        }
        self.window_sum += latency;
        self.window_count += 1;
        // Before the first window closes, the fast average stands in.
        let baseline = self.baseline().unwrap_or(short);
        let allowed = (self.tolerance * baseline).max(baseline + NOISE_FLOOR);
        let gradient = (allowed / short).clamp(0.5, 1.0);
        // Growing needs evidence that the limit is what holds traffic
        // back: a group using less than half of it learns nothing.
        if gradient >= 1.0 && f64::from(in_flight) < self.limit / 2.0 {
            return self.limit();
        }
        let target = self.limit * gradient + self.limit.sqrt();
        self.limit = (self.limit + SMOOTHING * (target - self.limit)).clamp(self.min, self.max);
        self.limit()
    }

    /// A request that got no answer in time: the origin is past its limit.
    pub fn timed_out(&mut self) -> u32 {
        self.timed_out_last = true;
        self.limit = (self.limit * TIMEOUT_BACKOFF).clamp(self.min, self.max);
        self.limit()
    }
}

/// The load shedding of one upstream group.
pub struct Shedder {
    /// Enforce or shadow: the config's, or the operator's switch.
    pub mode: super::StepMode,
    /// The current limit, read by every request.
    limit: AtomicU32,
    /// Requests admitted and waiting for their response headers. Only
    /// these count against the limit: a response streaming a long body
    /// (a download, server-sent events, a client that stopped reading)
    /// no longer loads the origin the way a waiting request does.
    waiting: AtomicU32,
    clock: std::time::Instant,
    gradient: Mutex<Gradient>,
    /// Share of the limit only trusted clients may use.
    reserve: f64,
    /// The estimator saw overload at its last sample ([`Gradient::congested`]).
    congested: std::sync::atomic::AtomicBool,
    /// Milliseconds (on `clock`) until which the limit holds after the
    /// last sample that showed overload ([`HOLD_MS`]).
    held_until_ms: std::sync::atomic::AtomicU64,
    /// Milliseconds (on `clock`) of the last response head sampled, and
    /// of the last time the group went from idle to busy: a group busy
    /// for `STALL_MS` without an answer is stalled.
    last_sample_ms: std::sync::atomic::AtomicU64,
    busy_since_ms: std::sync::atomic::AtomicU64,
    pub retry_after: u32,
    /// Trusted requests waiting for room ([`Shedder::queue`]): while there
    /// are any, untrusted clients get none, and each request that leaves
    /// wakes one of them.
    queued: AtomicU32,
    freed: tokio::sync::Notify,
    trusted_wait: Duration,
}

impl Shedder {
    pub fn new(config: &LoadSheddingConfig) -> Shedder {
        let gradient = Gradient::new(
            config.initial_limit,
            config.min_limit,
            config.max_limit,
            config.tolerance,
        );
        Shedder {
            mode: super::StepMode::new(config.mode),
            limit: AtomicU32::new(gradient.limit()),
            waiting: AtomicU32::new(0),
            clock: std::time::Instant::now(),
            gradient: Mutex::new(gradient),
            reserve: config.reserve,
            congested: std::sync::atomic::AtomicBool::new(true),
            held_until_ms: std::sync::atomic::AtomicU64::new(0),
            last_sample_ms: std::sync::atomic::AtomicU64::new(0),
            busy_since_ms: std::sync::atomic::AtomicU64::new(0),
            retry_after: config.retry_after.as_secs().max(1) as u32,
            queued: AtomicU32::new(0),
            freed: tokio::sync::Notify::new(),
            trusted_wait: config.trusted_wait,
        }
    }

    /// Requests the group may have in flight (trusted clients).
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Requests in flight above which untrusted clients are shed.
    pub fn open_limit(&self) -> u32 {
        let limit = self.limit();
        ((f64::from(limit) * (1.0 - self.reserve)) as u32).max(1)
    }

    /// Whether a request may join `in_flight` others; `trusted` clients
    /// may use the reserve.
    pub fn admits(&self, in_flight: u32, trusted: bool) -> bool {
        in_flight < if trusted { self.limit() } else { self.open_limit() }
    }

    /// Counts a request as waiting if fewer than the limit (`trusted`) or
    /// its open share are waiting, in one atomic step: concurrent arrivals
    /// cannot all see room and overshoot together. The limit holds only
    /// while the group shows overload (its latency past tolerance, a
    /// timeout, no answer yet, or no answer for a second while requests
    /// wait): a group that answers at its usual speed is never shed, so
    /// a flash crowd the origin can serve is served.
    pub fn try_wait(self: &std::sync::Arc<Self>, trusted: bool) -> Option<Waiting> {
        let cap = if trusted {
            self.limit()
        } else if self.queued.load(Ordering::Relaxed) > 0 {
            // Trusted requests wait for room: none for the others.
            0
        } else {
            self.open_limit()
        };
        if let Ok(before) = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |w| (w < cap).then_some(w + 1))
        {
            self.busy_from(before);
            return Some(Waiting(self.clone()));
        }
        if self.overloaded() {
            return None;
        }
        Some(self.wait())
    }

    /// A trusted request that found no room waits for it, in line, up to
    /// `trusted_wait`: each request that leaves wakes the next, and no
    /// untrusted client is admitted while one waits. At most the limit,
    /// or `MIN_LINE` if that is more, wait at once; `None` when the line
    /// is full or the wait is over.
    pub async fn queue(self: &std::sync::Arc<Self>) -> Option<Waiting> {
        if self.trusted_wait.is_zero() {
            return None;
        }
        let limit = self.limit().max(MIN_LINE);
        // SeqCst here, on the waiting count and in `Waiting::drop`: a
        // request that leaves must see this waiter, or this waiter the
        // room it left (a store-buffer handshake).
        if self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| (q < limit).then_some(q + 1))
            .is_err()
        {
            return None;
        }
        let _in_line = InLine(self);
        let deadline = tokio::time::Instant::now() + self.trusted_wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a slot freed in between wakes
            // this waiter.
            freed.as_mut().enable();
            if let Some(waiting) = self.try_wait(true) {
                return Some(waiting);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.try_wait(true);
            }
        }
    }

    /// Trusted requests waiting for room now.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether the group shows overload now.
    pub fn overloaded(&self) -> bool {
        if self.congested.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.clock.elapsed().as_millis() as u64;
        if now < self.held_until_ms.load(Ordering::Relaxed) {
            return true;
        }
        let since = self
            .last_sample_ms
            .load(Ordering::Relaxed)
            .max(self.busy_since_ms.load(Ordering::Relaxed));
        now.saturating_sub(since) > STALL_MS
    }

    /// Notes when the group went from idle to busy (`before` waiting).
    fn busy_from(&self, before: u32) {
        if before == 0 {
            self.busy_since_ms
                .store(self.clock.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Requests waiting for their response headers now.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Counts an admitted request as waiting until the guard is dropped
    /// (when its response headers arrived or it failed).
    pub fn wait(self: &std::sync::Arc<Self>) -> Waiting {
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        self.busy_from(before);
        Waiting(self.clone())
    }

    /// One response head after `latency`. Only 2xx and 3xx answers teach
    /// the limit: errors are often fast and would make a low baseline.
    pub fn sample(&self, latency: Duration, status: u16) {
        if !(200..400).contains(&status) {
            return;
        }
        let elapsed = self.clock.elapsed();
        if let Ok(mut g) = self.gradient.lock() {
            let limit = g.sample(latency.as_secs_f64(), self.waiting(), elapsed.as_secs_f64());
            self.limit.store(limit, Ordering::Relaxed);
            let congested = g.congested();
            self.congested.store(congested, Ordering::Relaxed);
            if congested {
                self.held_until_ms
                    .store(elapsed.as_millis() as u64 + HOLD_MS, Ordering::Relaxed);
            }
        }
        self.last_sample_ms.store(elapsed.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn timed_out(&self) {
        if let Ok(mut g) = self.gradient.lock() {
            let limit = g.timed_out();
            self.limit.store(limit, Ordering::Relaxed);
            self.congested.store(true, Ordering::Relaxed);
            self.held_until_ms
                .store(self.clock.elapsed().as_millis() as u64 + HOLD_MS, Ordering::Relaxed);
        }
    }
}

/// A request counted as waiting for its response headers.
pub struct Waiting(std::sync::Arc<Shedder>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        if self.0.queued.load(Ordering::SeqCst) > 0 {
            self.0.freed.notify_one();
        }
    }
}

/// A place in the trusted line, given up when dropped.
struct InLine<'a>(&'a Shedder);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `n` samples from a simulated origin whose latency grows with
    /// the load above its capacity (a queue): `base` seconds up to
    /// `capacity` requests in flight, then proportionally more. The
    /// offered load keeps the limit full. Returns the last limit.
    /// ... 100 samples a second, time running on from `g`'s last sample.
    fn run(g: &mut Gradient, n: usize, base: f64, capacity: f64) -> u32 {
        let mut limit = g.limit();
        for _ in 0..n {
            let in_flight = f64::from(limit);
            let latency = base * (in_flight / capacity).max(1.0);
            limit = tick(g, latency, limit);
        }
        limit
    }

    /// One sample, 10 ms after the previous one.
    fn tick(g: &mut Gradient, latency: f64, in_flight: u32) -> u32 {
        let now = g.window_start + 0.01 * f64::from(g.window_count);
        g.sample(latency, in_flight, now)
    }

    #[test]
    fn grows_while_latency_stays_at_the_baseline() {
        let mut g = Gradient::new(20, 5, 1000, 2.0);
        let limit = run(&mut g, 500, 0.002, 10_000.0);
        assert_eq!(limit, 1000, "no sign of overload: the limit reaches its maximum");
    }

    #[test]
    fn settles_near_capacity_when_latency_rises() {
        // Capacity 100: the limit settles where latency is about twice the
        // baseline (tolerance 2), i.e. near 2 x capacity, not at the max.
        let mut g = Gradient::new(50, 5, 5000, 2.0);
        // Three calm seconds first (light load: the baseline is learned,
        // the limit does not move), then load that keeps the limit full.
        for _ in 0..300 {
            assert_eq!(tick(&mut g, 0.002, 3), 50);
        }
        let limit = run(&mut g, 5000, 0.002, 100.0);
        assert!((150..=300).contains(&limit), "limit {limit}");
    }

    #[test]
    fn shrinks_when_the_origin_slows_down() {
        let mut g = Gradient::new(500, 5, 1000, 1.5);
        run(&mut g, 200, 0.001, 10_000.0);
        let before = g.limit();
        // The origin becomes 10x slower at the same load: well past the
        // tolerance, the limit drops within a few dozen responses.
        for _ in 0..50 {
            let limit = g.limit();
            tick(&mut g, 0.010, limit);
        }
        assert!(g.limit() < before / 4, "{before} -> {}", g.limit());
        assert!(g.limit() >= 5, "never below the minimum");
    }

    #[test]
    fn a_permanently_slower_origin_is_learned_within_a_minute() {
        let mut g = Gradient::new(200, 5, 1000, 2.0);
        run(&mut g, 200, 0.001, 10_000.0);
        // 5x slower whatever the load: the limit falls to its floor ...
        for _ in 0..200 {
            let limit = g.limit();
            tick(&mut g, 0.005, limit);
        }
        assert!(g.limit() <= 7, "{}", g.limit());
        // ... and once the fast windows have left the baseline (60 s at
        // 100 samples a second), the limit grows back.
        let limit = run(&mut g, 100 * (BASELINE_WINDOWS + 2), 0.005, 10_000.0);
        assert_eq!(limit, 1000, "not stuck at the floor");
    }

    #[test]
    fn a_mix_of_fast_and_slow_answers_does_not_sink_the_limit() {
        // Half the answers take 1 ms (cache hits), half 20 ms, shuffled
        // in runs: window means are steady, so the baseline is too, and
        // a group far below its capacity keeps its limit.
        let mut g = Gradient::new(200, 5, 1000, 2.0);
        for i in 0..6000u32 {
            let latency = if (i / 7) % 2 == 0 { 0.001 } else { 0.020 };
            let limit = g.limit();
            tick(&mut g, latency, limit);
        }
        assert_eq!(g.limit(), 1000, "no overload, no shrinking");
    }

    #[test]
    fn sub_millisecond_jitter_is_not_overload() {
        // An origin answering in 0.1 ms with jitter up to 1 ms: a ratio of
        // 10, but no queue. The limit stays.
        let mut g = Gradient::new(100, 5, 1000, 2.0);
        for i in 0..3000u32 {
            let latency = if i % 5 == 0 { 0.001 } else { 0.0001 };
            tick(&mut g, latency, 10);
        }
        assert_eq!(g.limit(), 100);
    }

    #[test]
    fn an_idle_group_does_not_grow() {
        let mut g = Gradient::new(40, 5, 1000, 2.0);
        for _ in 0..1000 {
            tick(&mut g, 0.001, 3);
        }
        assert_eq!(g.limit(), 40, "3 in flight of 40 says nothing about capacity");
    }

    #[test]
    fn timeouts_back_off_to_the_minimum() {
        let mut g = Gradient::new(100, 10, 1000, 2.0);
        assert_eq!(g.timed_out(), 90);
        for _ in 0..100 {
            g.timed_out();
        }
        assert_eq!(g.limit(), 10);
    }

    #[test]
    fn bad_samples_change_nothing() {
        let mut g = Gradient::new(100, 10, 1000, 2.0);
        for latency in [f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(g.sample(latency, 100, 0.0), 100);
        }
        assert_eq!(g.sample(0.001, 100, f64::NAN), 100);
    }

    /// A shedder whose limit stays at `limit`.
    fn fixed(limit: u32, reserve: f64, trusted_wait: Duration) -> std::sync::Arc<Shedder> {
        std::sync::Arc::new(Shedder::new(&LoadSheddingConfig {
            initial_limit: limit,
            min_limit: limit,
            max_limit: limit,
            reserve,
            trusted_wait,
            ..LoadSheddingConfig::default()
        }))
    }

    #[test]
    fn trusted_clients_keep_the_reserve() {
        let shedder = std::sync::Arc::new(Shedder::new(&LoadSheddingConfig {
            initial_limit: 100,
            reserve: 0.25,
            ..LoadSheddingConfig::default()
        }));
        assert_eq!(shedder.open_limit(), 75);
        let waiting = shedder.wait();
        assert_eq!(shedder.waiting(), 1);
        drop(waiting);
        assert_eq!(shedder.waiting(), 0);
        let held: Vec<_> = (0..75).map(|_| shedder.try_wait(false).expect("open share")).collect();
        assert!(shedder.try_wait(false).is_none(), "the open share is full");
        let reserve: Vec<_> = (0..25).map(|_| shedder.try_wait(true).expect("reserve")).collect();
        assert!(shedder.try_wait(true).is_none(), "the whole limit is full");
        drop((held, reserve));
        assert_eq!(shedder.waiting(), 0);
        assert!(shedder.admits(74, false));
        assert!(!shedder.admits(75, false));
        assert!(shedder.admits(99, true));
        assert!(!shedder.admits(100, true));
    }

    #[test]
    fn a_group_answering_at_its_usual_speed_is_never_shed() {
        let shedder = fixed(10, 0.5, Duration::from_secs(1));
        // No answer yet: no evidence, the limit holds.
        let held: Vec<_> = (0..5).map(|_| shedder.try_wait(false).expect("open share")).collect();
        assert!(shedder.try_wait(false).is_none());
        drop(held);
        // Answers at 1 ms: a flash crowd of 50 at once is admitted whole.
        for _ in 0..20 {
            shedder.sample(Duration::from_millis(1), 200);
        }
        assert!(!shedder.overloaded());
        let crowd: Vec<_> = (0..50).filter_map(|_| shedder.try_wait(false)).collect();
        assert_eq!(crowd.len(), 50, "nothing is shed while latency is usual");
        drop(crowd);
        // (Latency past tolerance is overload: `Gradient::congested`,
        // tested with time below.)
        // A timeout is overload too.
        let shedder = std::sync::Arc::new(Shedder::new(&LoadSheddingConfig::default()));
        shedder.sample(Duration::from_millis(1), 200);
        assert!(!shedder.overloaded());
        shedder.timed_out();
        assert!(shedder.overloaded());
    }

    #[test]
    fn overload_holds_the_limit_for_a_while_after_latency_recovers() {
        let shedder = fixed(10, 0.5, Duration::from_secs(1));
        for _ in 0..20 {
            shedder.sample(Duration::from_millis(1), 200);
        }
        assert!(!shedder.overloaded());
        shedder.timed_out();
        // Answers at the usual speed again: the limit still holds, so the
        // flood it holds back is not let in at once.
        shedder.sample(Duration::from_millis(1), 200);
        assert!(!shedder.congested.load(Ordering::Relaxed));
        assert!(shedder.overloaded(), "held after overload");
        let held: Vec<_> = (0..5).map(|_| shedder.try_wait(false).expect("open share")).collect();
        assert!(shedder.try_wait(false).is_none(), "the limit holds");
        drop(held);
        // HOLD_MS after the last sign of overload, everyone is let in.
        let now = shedder.clock.elapsed().as_millis() as u64;
        shedder.held_until_ms.store(now, Ordering::Relaxed);
        shedder.last_sample_ms.store(now, Ordering::Relaxed);
        assert!(!shedder.overloaded());
    }

    #[tokio::test(start_paused = true)]
    async fn trusted_requests_wait_in_line_for_room_and_untrusted_ones_get_none() {
        let shedder = fixed(4, 0.25, Duration::from_secs(1));
        // No answer yet: the limit holds.
        let mut held: Vec<_> = (0..4).map(|_| shedder.try_wait(true).expect("room")).collect();
        assert!(shedder.try_wait(true).is_none());
        let (s, t) = (shedder.clone(), shedder.clone());
        let first = tokio::spawn(async move { s.queue().await });
        let second = tokio::spawn(async move { t.queue().await });
        while shedder.queued() < 2 {
            tokio::task::yield_now().await;
        }
        // A request leaves: its room goes to a trusted waiter, not to an
        // untrusted newcomer, although the open share has room now.
        drop(held.pop());
        assert!(
            shedder.try_wait(false).is_none(),
            "none for untrusted clients while trusted ones wait"
        );
        while shedder.queued() > 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(shedder.waiting(), 4, "the freed room was taken in line");
        // The other waits no longer than trusted_wait.
        let (first, second) = (first.await.expect("task"), second.await.expect("task"));
        assert!(first.is_some() ^ second.is_some(), "one got room, one gave up");
        assert_eq!(shedder.queued(), 0);
        drop((held, first, second));
        assert!(
            shedder.try_wait(false).is_some(),
            "room again for untrusted clients once nobody waits"
        );
        // Off with trusted_wait = 0.
        let none = fixed(1, 0.25, Duration::ZERO);
        let _full = none.try_wait(true).expect("room");
        assert!(none.queue().await.is_none());
    }

    #[test]
    fn latency_past_tolerance_is_congestion() {
        let mut g = Gradient::new(10, 10, 10, 2.0);
        assert!(g.congested(), "no sample: no evidence");
        for _ in 0..300 {
            tick(&mut g, 0.001, 5);
        }
        assert!(!g.congested(), "at the baseline");
        for _ in 0..100 {
            tick(&mut g, 0.040, 10);
        }
        assert!(g.congested(), "40 ms against 1 ms");
        for _ in 0..100 {
            tick(&mut g, 0.001, 5);
        }
        assert!(!g.congested(), "back at the baseline");
        g.timed_out();
        assert!(g.congested(), "a timeout");
    }
}
