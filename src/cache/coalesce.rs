//! Request coalescing: concurrent requests that would all go to the origin
//! for one key become one. The first becomes the leader and holds a
//! [`Flight`]; the others wait on its outcome (bounded by `lock_timeout`),
//! then look in the store again: after `Stored` they are answered from
//! it, after `Pass` (the response could not be stored) they go to the
//! origin alone, and after `Abandoned` (the leader failed or its client
//! left) one of them leads the next try.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// How a flight ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// Still in the air.
    Pending,
    /// The response is in the store.
    Stored,
    /// The response cannot be shared (not storable, too big).
    Pass,
    /// The leader gave up without an answer.
    Abandoned,
}

/// Counts for tests and the dashboard: requests waiting on a flight now,
/// and flights landed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlightStats {
    pub waiting: usize,
    pub landed: u64,
}

/// The flights in progress, by primary key.
pub struct Flights {
    map: Mutex<HashMap<String, watch::Receiver<Landing>>>,
    stats: watch::Sender<FlightStats>,
}

impl Default for Flights {
    fn default() -> Self {
        Flights {
            map: Mutex::default(),
            stats: watch::Sender::new(FlightStats::default()),
        }
    }
}

/// What a request does about a key other requests may be fetching.
pub enum Join {
    /// Fetch it; land the flight when the outcome is known.
    Lead(Flight),
    /// Wait for the leader.
    Wait(watch::Receiver<Landing>),
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<Landing>>> {
        // Every update is one map operation: a poisoned map is consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leads the flight for `key`, or joins the one in the air.
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut map = self.lock();
        if let Some(rx) = map.get(key) {
            if *rx.borrow() == Landing::Pending {
                return Join::Wait(rx.clone());
            }
        }
        let (tx, rx) = watch::channel(Landing::Pending);
        map.insert(key.to_owned(), rx);
        Join::Lead(Flight {
            flights: self.clone(),
            key: key.to_owned(),
            tx,
            landed: false,
        })
    }

    /// Follows [`FlightStats`].
    pub fn stats(&self) -> watch::Receiver<FlightStats> {
        self.stats.subscribe()
    }

    /// Waits up to `limit` for a flight to land; `None` on timeout.
    pub async fn wait(&self, rx: watch::Receiver<Landing>, limit: Duration) -> Option<Landing> {
        /// Counts the waiter out even when its request is cancelled.
        struct Waiting<'a>(&'a watch::Sender<FlightStats>);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.send_modify(|s| s.waiting -= 1);
            }
        }
        self.stats.send_modify(|s| s.waiting += 1);
        let _counted = Waiting(&self.stats);
        wait(rx, limit).await
    }

    /// Flights in the air now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits up to `limit` for a flight to land; `None` on timeout.
pub async fn wait(mut rx: watch::Receiver<Landing>, limit: Duration) -> Option<Landing> {
    let landed = tokio::time::timeout(limit, rx.wait_for(|l| *l != Landing::Pending)).await;
    match landed {
        Ok(Ok(landing)) => Some(*landing),
        // The sender went away without landing: treat as abandoned.
        Ok(Err(_)) => Some(Landing::Abandoned),
        Err(_) => None,
    }
}

/// The leader's side of a flight; dropping it unlanded abandons it.
pub struct Flight {
    flights: Arc<Flights>,
    key: String,
    tx: watch::Sender<Landing>,
    landed: bool,
}

impl Flight {
    pub fn land(mut self, landing: Landing) {
        self.finish(landing);
    }

    fn finish(&mut self, landing: Landing) {
        if self.landed {
            return;
        }
        self.landed = true;
        let mut map = self.flights.lock();
        // Remove the entry only if it is still this flight's.
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
        }
        drop(map);
        self.tx.send_replace(landing);
        self.flights.stats.send_modify(|s| s.landed += 1);
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.finish(Landing::Abandoned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_and_waiters_see_its_landing() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(flight) = flights.join("k") else {
            panic!("the first request leads");
        };
        let waiters: Vec<_> = (0..10)
            .map(|_| match flights.join("k") {
                Join::Wait(rx) => tokio::spawn(wait(rx, Duration::from_secs(60))),
                Join::Lead(_) => panic!("only one leader"),
            })
            .collect();
        assert!(matches!(flights.join("other"), Join::Lead(_)), "keys are independent");
        flight.land(Landing::Stored);
        for w in waiters {
            assert_eq!(w.await.expect("join"), Some(Landing::Stored));
        }
        assert!(flights.is_empty(), "a landed flight leaves the map");
        assert!(matches!(flights.join("k"), Join::Lead(_)), "the next miss leads again");
    }

    #[tokio::test]
    async fn a_dropped_leader_abandons_and_a_new_one_can_lead() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(flight) = flights.join("k") else {
            panic!("leads");
        };
        let Join::Wait(rx) = flights.join("k") else {
            panic!("waits");
        };
        drop(flight);
        assert_eq!(wait(rx, Duration::from_secs(60)).await, Some(Landing::Abandoned));
        assert!(matches!(flights.join("k"), Join::Lead(_)));
    }

    /// Bounded by the lock timeout (paused time): nothing else lands it.
    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(_flight) = flights.join("k") else {
            panic!("leads");
        };
        let Join::Wait(rx) = flights.join("k") else {
            panic!("waits");
        };
        let started = tokio::time::Instant::now();
        assert_eq!(wait(rx, Duration::from_secs(5)).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
