//! The detector's bounded-memory building blocks: an EWMA, space-saving
//! top-k, HyperLogLog, a Bloom filter, and the client [`Memory`] (who
//! returns, who has earned trust) built from Bloom filters.

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

    /// Takes `other`'s value (a rebuilt detector), keeping this time constant.
    pub fn carry(&mut self, other: &Ewma) {
        self.value = other.value;
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

/// A Bloom filter of 2^20 bits (128 KiB) with 3 hashes: about 1.7% false
/// positives at 100,000 entries.
#[derive(Debug, Clone)]
pub struct Bloom {
    words: Vec<u64>,
}

const BLOOM_WORDS: usize = 1 << 14;

impl Default for Bloom {
    fn default() -> Self {
        Bloom {
            words: vec![0; BLOOM_WORDS],
        }
    }
}

impl Bloom {
    fn positions(hash: u64) -> [usize; 3] {
        let bits = (BLOOM_WORDS * 64) as u64;
        let h2 = hash.rotate_left(21) ^ 0x9E37_79B9_7F4A_7C15;
        [0u64, 1, 2].map(|i| (hash.wrapping_add(i.wrapping_mul(h2)) % bits) as usize)
    }

    pub fn insert(&mut self, hash: u64) {
        for p in Self::positions(hash) {
            self.words[p / 64] |= 1 << (p % 64);
        }
    }

    pub fn contains(&self, hash: u64) -> bool {
        Self::positions(hash)
            .iter()
            .all(|p| self.words[p / 64] & (1 << (p % 64)) != 0)
    }

    fn merge(&mut self, other: &Bloom) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= *o;
        }
    }

    fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }
}

/// Generations of calm-window clients kept (trust lasts at most this many
/// generations of absence).
pub const TRUST_GENERATIONS: usize = 6;
/// Distinct generations a client must have been seen in to be trusted.
pub const TRUST_SEEN_IN: usize = 2;
/// Distinct clients of one window remembered by name, to taint those of a
/// spike; past it, the rest of a spike window's clients simply earn
/// nothing from it.
const PENDING_LIST_CAP: usize = 65_536;

/// The detector's memory of clients, in fixed memory: who was seen in calm
/// windows (one Bloom filter per generation of `generation_windows`
/// windows) and who took part in a spike before being trusted (the taint,
/// two generations of `TRUST_GENERATIONS` generations each).
///
/// - **returning**: seen in any calm window of the kept generations;
/// - **trusted**: seen in calm windows of at least [`TRUST_SEEN_IN`]
///   distinct generations, and not tainted. Trust takes at least one
///   generation to earn (a single visit in a quiet minute earns nothing),
///   decays when the client stops coming, and a client that was part of a
///   spike (a flood, or a flash crowd) before it was trusted is never
///   trusted until the taint has expired.
///
/// Clients of the current window are pending: they count from the next
/// window on, as calm or tainted depending on how the window is judged.
#[derive(Debug, Clone)]
pub struct Memory {
    pending: Bloom,
    pending_list: Vec<u64>,
    /// Newest first.
    calm: std::collections::VecDeque<Bloom>,
    taint: [Bloom; 2],
    generation_windows: u32,
    windows: u32,
    generations: u32,
}

impl Memory {
    /// A memory whose generation is `generation_windows` windows long.
    pub fn new(generation_windows: u32) -> Memory {
        Memory {
            pending: Bloom::default(),
            pending_list: Vec::new(),
            calm: (0..TRUST_GENERATIONS).map(|_| Bloom::default()).collect(),
            taint: [Bloom::default(), Bloom::default()],
            generation_windows: generation_windows.max(1),
            windows: 0,
            generations: 0,
        }
    }

    /// Notes a client of the current window.
    pub fn insert(&mut self, hash: u64) {
        if !self.pending.contains(hash) {
            self.pending.insert(hash);
            if self.pending_list.len() < PENDING_LIST_CAP {
                self.pending_list.push(hash);
            }
        }
    }

    pub fn is_returning(&self, hash: u64) -> bool {
        self.calm.iter().any(|b| b.contains(hash))
    }

    pub fn is_trusted(&self, hash: u64) -> bool {
        self.calm.iter().filter(|b| b.contains(hash)).count() >= TRUST_SEEN_IN
            && !self.taint.iter().any(|b| b.contains(hash))
    }

    /// Ends the window: a calm window's clients are remembered in the
    /// current generation; a spike's clients that were not yet trusted
    /// are tainted.
    pub fn commit(&mut self, calm: bool) {
        if calm {
            if let Some(current) = self.calm.front_mut() {
                current.merge(&self.pending);
            }
        } else {
            let list = std::mem::take(&mut self.pending_list);
            for &client in &list {
                if !self.is_trusted(client) {
                    self.taint[0].insert(client);
                }
            }
            self.pending_list = list;
        }
        self.pending.clear();
        self.pending_list.clear();
        self.windows += 1;
        if self.windows >= self.generation_windows {
            self.windows = 0;
            self.rotate();
        }
    }

    /// Changes the generation's length (a reload that changed the window
    /// or `trust_after`).
    pub fn set_generation(&mut self, windows: u32) {
        self.generation_windows = windows.max(1);
    }

    /// Starts a new generation; the oldest is forgotten.
    pub fn rotate(&mut self) {
        if let Some(mut oldest) = self.calm.pop_back() {
            oldest.clear();
            self.calm.push_front(oldest);
        }
        self.generations += 1;
        if self.generations as usize >= TRUST_GENERATIONS {
            self.generations = 0;
            self.taint.swap(0, 1);
            self.taint[0].clear();
        }
    }
}
