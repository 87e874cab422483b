//! The proxy's own diagnostics under load: at most one line per kind and
//! per second.
//!
//! During a flood every refused, shed, challenged or banned request, and
//! every upstream failure, would otherwise be a line on stderr: thousands
//! a second, costing CPU and disk exactly when the proxy can least afford
//! them. Each kind has a [`Quiet`] gate: the first event of a second is
//! written in full, with the count of the same kind left out since the
//! previous line; the others of that second are only counted. The access
//! log keeps its own sampling rules; metrics count every event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// One kind's gate.
#[derive(Debug)]
pub struct Quiet {
    /// The second (Unix time) of the last line written; `u64::MAX`: none.
    second: AtomicU64,
    /// Events of this kind left out since that line.
    left_out: AtomicU64,
}

impl Default for Quiet {
    fn default() -> Self {
        Quiet::new()
    }
}

impl Quiet {
    pub const fn new() -> Quiet {
        Quiet {
            second: AtomicU64::new(u64::MAX),
            left_out: AtomicU64::new(0),
        }
    }

    /// Whether an event at `now` (Unix seconds) is written: `Some(n)`
    /// when it is, `n` being the events of this kind left out since the
    /// previous line; `None` when it is only counted. Lock-free: one load
    /// per event, one compare-and-swap per second.
    pub fn admit(&self, now: u64) -> Option<u64> {
        let last = self.second.load(Ordering::Relaxed);
        if last != now
            && self
                .second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::Relaxed));
        }
        self.left_out.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// [`Quiet::admit`] at the current time.
    pub fn admit_now(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.admit(now)
    }
}

/// Requests shed by load shedding (503).
pub static SHED: Quiet = Quiet::new();
/// Requests refused by protection (rate limits, attack mode, IP lists).
pub static REFUSED: Quiet = Quiet::new();
/// Challenges sent.
pub static CHALLENGED: Quiet = Quiet::new();
/// Requests of banned clients.
pub static BANNED: Quiet = Quiet::new();
/// New bans, and bans left out by `max_per_minute`.
pub static BANS: Quiet = Quiet::new();
/// Requests that failed upstream (other than shedding).
pub static UPSTREAM_FAILED: Quiet = Quiet::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_carrying_the_count_left_out() {
        let q = Quiet::new();
        assert_eq!(q.admit(100), Some(0), "the first event is written");
        for _ in 0..10_000 {
            assert_eq!(q.admit(100), None, "the rest of the second is counted");
        }
        assert_eq!(q.admit(101), Some(10_000), "the next line says how many were left out");
        assert_eq!(q.admit(101), None);
        assert_eq!(q.admit(250), Some(1));
    }

    #[test]
    fn concurrent_events_of_one_second_write_one_line() {
        let q = std::sync::Arc::new(Quiet::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || (0..50_000).filter(|_| q.admit(7).is_some()).count())
            })
            .collect();
        let written: usize = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
        assert_eq!(written, 1);
        assert_eq!(q.admit(8), Some(199_999), "every other event was counted");
    }
}
