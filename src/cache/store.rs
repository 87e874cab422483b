//! Where cached responses live: the [`Storage`] trait, the plug point for
//! a disk tier later, and [`MemoryStore`], an in-memory store with a byte
//! budget.
//!
//! A primary key (the method-independent URI key the pipeline builds) maps
//! to the variants stored under it, one per secondary key (RFC 9111
//! section 4.1: the request fields `Vary` names). Storing a variant whose
//! secondary key is already there replaces it. Every variant is counted
//! at its body length plus its header bytes plus a fixed overhead; when a
//! store would pass the budget, the least recently used keys go first
//! (approximately: see `Inner::touch`). An
//! object bigger than `max_object_bytes` is never admitted (the pipeline
//! streams such responses through without buffering them whole).
//!
//! Purges remove by exact key, by URL (the key and the keys with extra
//! parts built on it, found through an index), by key prefix and by tag
//! (`Surrogate-Key` / `Cache-Tag` values the origin attached). Purging by
//! prefix or tag scans every key: they are operator actions, not
//! request-path work; invalidation by an unsafe request removes by URL.
//!
//! A variant counts its secondary key (the request values `Vary` named)
//! in its size, and a key keeps at most [`MAX_VARIANTS`] variants.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::control::CacheControl;
use super::key::EXTRA_SEPARATOR;
use super::vary::{SecondaryKey, Vary};

/// One stored response, as the cache serves it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub status: StatusCode,
    /// The response fields, without the ones a cache must not store.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the request that fetched it was sent and its response head
    /// arrived (RFC 9111 section 4.2.3's request_time and response_time).
    pub request_time: SystemTime,
    pub response_time: SystemTime,
    pub vary: Vary,
    /// The request's values of the fields `vary` names.
    pub secondary: SecondaryKey,
    /// Purge tags.
    pub tags: Vec<String>,
    /// The directives the cache obeys for it (RFC 9213 targeted fields
    /// first), its freshness lifetime and its `corrected_initial_age`,
    /// all worked out once when it is stored or refreshed.
    pub control: CacheControl,
    pub lifetime: u64,
    pub initial_age: u64,
    /// The lifetime is the origin's (`s-maxage`, `max-age`, `Expires`),
    /// not a heuristic: only then may a client's `max-stale` stretch it.
    pub explicit: bool,
    /// The origin marked it for shared caches (`public`, `s-maxage`, or a
    /// targeted field): it may answer requests that carry credentials.
    pub shared: bool,
}

/// Bytes counted for every stored variant besides its body and fields:
/// the entry's own structures.
const ENTRY_OVERHEAD: u64 = 256;

impl Stored {
    /// What the variant costs against the budget.
    pub fn size(&self) -> u64 {
        let fields: u64 = self
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().len() + value.len() + 32) as u64)
            .sum();
        let tags: u64 = self.tags.iter().map(|t| t.len() as u64 + 24).sum();
        self.body.len() as u64 + fields + tags + self.secondary.size() + ENTRY_OVERHEAD
    }
}

/// What a key costs besides its variants: its bytes, twice for a key with
/// extra parts (the URL index holds a copy).
fn key_cost(key: &str) -> u64 {
    let copies = if key.contains(EXTRA_SEPARATOR) { 2 } else { 1 };
    key.len() as u64 * copies
}

/// Most variants kept per key: beyond it the least recently stored goes.
/// Each lookup compares the request with every variant, so their number
/// must not be the client's to choose.
pub const MAX_VARIANTS: usize = 32;

/// What a store does; a disk tier implements it too.
pub trait Storage: Send + Sync {
    /// The variants stored under `key` (most recently stored first), and
    /// marks the key as used.
    fn get(&self, key: &str) -> Vec<Arc<Stored>>;
    /// Stores a variant under `key`, replacing one with the same secondary
    /// key; `false` when it is not admitted (too big).
    fn put(&self, key: &str, stored: Stored) -> bool;
    /// Removes every variant of `key`; true if there was one.
    fn remove(&self, key: &str) -> bool;
    /// Removes the key `url` and every key made of it and extra parts
    /// (route key headers or cookies); how many keys went. Exact lookups
    /// only, no scan: invalidation runs on the request path.
    fn remove_url(&self, url: &str) -> usize;
    /// Removes every key starting with `prefix`; how many keys went.
    fn purge_prefix(&self, prefix: &str) -> usize;
    /// Removes every variant carrying `tag`; how many variants went.
    fn purge_tag(&self, tag: &str) -> usize;
    /// Bytes counted now.
    fn bytes(&self) -> u64;
    /// Keys stored now.
    fn keys(&self) -> usize;
    /// Takes a new budget and object limit (a reload); past the budget,
    /// the least recently used keys go at once. How many keys went.
    fn resize(&self, budget: u64, max_object: u64) -> usize;
}

struct Entry {
    variants: Vec<Arc<Stored>>,
    bytes: u64,
    /// Position in the recency order.
    used: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// URL part -> the keys with extra parts made of it.
    extras: HashMap<String, std::collections::HashSet<String>>,
    /// Recency order: use tick -> key; the smallest tick is the least
    /// recently used.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
}

impl Inner {
    /// Marks `key` as used now. A key already among the most recently
    /// used half is left where it is: the order stays close to LRU, and a
    /// hot key's hits cost no reordering (nor an allocation) at all.
    fn touch(&mut self, key: &str) {
        // Strictly fewer than half the keys (at least one) were used after
        // it, so it is never the least recently used one (which has every
        // other key after it).
        let recent = (self.entries.len() as u64 / 2).max(1);
        if self
            .entries
            .get(key)
            .is_some_and(|e| self.tick.saturating_sub(e.used) < recent)
        {
            return;
        }
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.entries.get_mut(key) {
            self.order.remove(&entry.used);
            entry.used = tick;
            self.order.insert(tick, key.to_owned());
        }
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.used);
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        if let Some((url, _)) = key.split_once(EXTRA_SEPARATOR) {
            if let Some(keys) = self.extras.get_mut(url) {
                keys.remove(key);
                if keys.is_empty() {
                    self.extras.remove(url);
                }
            }
        }
        Some(entry)
    }

    /// Records a new key in the URL index (keys with extra parts only).
    fn index(&mut self, key: &str) {
        if let Some((url, _)) = key.split_once(EXTRA_SEPARATOR) {
            self.extras.entry(url.to_owned()).or_default().insert(key.to_owned());
        }
    }

    /// Evicts least recently used keys, never `keep`, until `incoming`
    /// more bytes fit in `budget`.
    fn make_room(&mut self, budget: u64, incoming: u64, keep: &str) {
        while self.bytes + incoming > budget {
            let Some(victim) = self.order.values().find(|k| k.as_str() != keep).cloned() else {
                return;
            };
            self.remove(&victim);
        }
    }
}

/// The in-memory store: one lock around a map and a recency order. The
/// lock is held for map operations only, never across I/O.
pub struct MemoryStore {
    /// Changed by a reload only, read under the lock.
    budget: AtomicU64,
    max_object: AtomicU64,
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// A store of at most `budget` bytes that admits objects of at most
    /// `max_object` bytes.
    pub fn new(budget: u64, max_object: u64) -> MemoryStore {
        MemoryStore {
            budget: AtomicU64::new(budget),
            max_object: AtomicU64::new(max_object.min(budget)),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated
        // in a way later calls would trip on: every update is one step.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keys stored now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Storage for MemoryStore {
    fn get(&self, key: &str) -> Vec<Arc<Stored>> {
        let mut inner = self.lock();
        let variants = match inner.entries.get(key) {
            Some(entry) => entry.variants.clone(),
            None => return Vec::new(),
        };
        inner.touch(key);
        variants
    }

    fn put(&self, key: &str, stored: Stored) -> bool {
        let size = stored.size() + key_cost(key);
        if size > self.max_object.load(Ordering::Relaxed) {
            return false;
        }
        let mut inner = self.lock();
        let budget = self.budget.load(Ordering::Relaxed);
        // The variant it replaces gives its bytes back first.
        let replaced = inner.entries.get(key).and_then(|entry| {
            entry
                .variants
                .iter()
                .position(|v| v.secondary == stored.secondary)
                .map(|i| (i, entry.variants[i].size() + key_cost(key)))
        });
        if let Some((index, old_size)) = replaced {
            if let Some(entry) = inner.entries.get_mut(key) {
                entry.variants.remove(index);
                entry.bytes = entry.bytes.saturating_sub(old_size);
            }
            inner.bytes = inner.bytes.saturating_sub(old_size);
        }
        inner.make_room(budget, size, key);
        if inner.bytes + size > budget {
            // Even alone with its own key the object does not fit.
            if inner.entries.get(key).is_some_and(|e| e.variants.is_empty()) {
                inner.remove(key);
            }
            return false;
        }
        inner.bytes += size;
        inner.tick += 1;
        let tick = inner.tick;
        match inner.entries.get_mut(key) {
            Some(entry) => {
                entry.variants.insert(0, Arc::new(stored));
                entry.bytes += size;
                let mut freed = 0;
                while entry.variants.len() > MAX_VARIANTS {
                    if let Some(oldest) = entry.variants.pop() {
                        let n = oldest.size() + key_cost(key);
                        entry.bytes = entry.bytes.saturating_sub(n);
                        freed += n;
                    }
                }
                inner.bytes = inner.bytes.saturating_sub(freed);
            }
            None => {
                inner.entries.insert(
                    key.to_owned(),
                    Entry {
                        variants: vec![Arc::new(stored)],
                        bytes: size,
                        used: tick,
                    },
                );
                inner.order.insert(tick, key.to_owned());
                inner.index(key);
                return true;
            }
        }
        inner.touch(key);
        true
    }

    fn remove(&self, key: &str) -> bool {
        self.lock().remove(key).is_some()
    }

    fn remove_url(&self, url: &str) -> usize {
        let mut inner = self.lock();
        let mut removed = usize::from(inner.remove(url).is_some());
        for key in inner.extras.remove(url).unwrap_or_default() {
            removed += usize::from(inner.remove(&key).is_some());
        }
        removed
    }

    fn purge_prefix(&self, prefix: &str) -> usize {
        let mut inner = self.lock();
        let keys: Vec<String> = inner
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for key in &keys {
            inner.remove(key);
        }
        keys.len()
    }

    fn purge_tag(&self, tag: &str) -> usize {
        let mut inner = self.lock();
        let mut removed = 0;
        let mut emptied = Vec::new();
        let mut freed = 0u64;
        for (key, entry) in inner.entries.iter_mut() {
            let before = entry.variants.len();
            let mut kept = Vec::with_capacity(before);
            for variant in entry.variants.drain(..) {
                if variant.tags.iter().any(|t| t == tag) {
                    let size = variant.size() + key_cost(key);
                    entry.bytes = entry.bytes.saturating_sub(size);
                    freed += size;
                } else {
                    kept.push(variant);
                }
            }
            removed += before - kept.len();
            entry.variants = kept;
            if entry.variants.is_empty() {
                emptied.push(key.clone());
            }
        }
        inner.bytes = inner.bytes.saturating_sub(freed);
        for key in emptied {
            inner.remove(&key);
        }
        removed
    }

    fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn keys(&self) -> usize {
        self.len()
    }

    fn resize(&self, budget: u64, max_object: u64) -> usize {
        let mut inner = self.lock();
        self.budget.store(budget, Ordering::Relaxed);
        self.max_object.store(max_object.min(budget), Ordering::Relaxed);
        let before = inner.entries.len();
        inner.make_room(budget, 0, "");
        before - inner.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn stored(body: usize, secondary: &str, tags: &[&str]) -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        Stored {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(vec![b'x'; body]),
            request_time: SystemTime::UNIX_EPOCH,
            response_time: SystemTime::UNIX_EPOCH,
            vary: Vary::Fields(vec![http::header::ACCEPT_ENCODING]),
            secondary: SecondaryKey(vec![(
                http::header::ACCEPT_ENCODING,
                Some(secondary.as_bytes().to_vec()),
            )]),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            control: CacheControl::default(),
            lifetime: 60,
            initial_age: 0,
            explicit: true,
            shared: false,
        }
    }

    #[test]
    fn variants_of_one_key_coexist_and_replace_by_secondary_key() {
        let s = MemoryStore::new(1 << 20, 1 << 20);
        assert!(s.put("http://a/x", stored(10, "gzip", &[])));
        assert!(s.put("http://a/x", stored(20, "br", &[])));
        assert_eq!(s.get("http://a/x").len(), 2);
        let before = s.bytes();
        assert!(s.put("http://a/x", stored(30, "gzip", &[])));
        let variants = s.get("http://a/x");
        assert_eq!(variants.len(), 2, "the gzip variant was replaced, not added");
        assert_eq!(variants[0].body.len(), 30, "most recently stored first");
        assert_eq!(s.bytes(), before + 20, "the replaced variant gave its bytes back");
    }

    #[test]
    fn the_budget_holds_and_the_least_recently_used_go_first() {
        let one = stored(1000, "a", &[]).size() + "k00".len() as u64;
        let s = MemoryStore::new(one * 3, one);
        for key in ["k00", "k01", "k02"] {
            assert!(s.put(key, stored(1000, "a", &[])));
        }
        // k00 is used again: k01 is now the least recently used.
        assert_eq!(s.get("k00").len(), 1);
        assert!(s.put("k03", stored(1000, "a", &[])));
        assert!(s.bytes() <= one * 3);
        assert_eq!(s.get("k01").len(), 0, "evicted");
        assert_eq!(s.get("k00").len(), 1, "kept: used recently");
        assert_eq!(s.len(), 3);
    }

    /// Hits on a recent key skip reordering, but never so that the key
    /// just used is evicted first, whatever the number of keys.
    #[test]
    fn skipped_reordering_never_evicts_the_key_just_used() {
        for keys in 2..8usize {
            let one = stored(1000, "a", &[]).size() + "k00".len() as u64;
            let s = MemoryStore::new(one * keys as u64, one);
            let names: Vec<String> = (0..keys).map(|i| format!("k{i:02}")).collect();
            for name in &names {
                assert!(s.put(name, stored(1000, "a", &[])));
            }
            for _ in 0..3 {
                assert_eq!(s.get(&names[0]).len(), 1);
            }
            assert!(s.put("new", stored(1000, "a", &[])));
            assert_eq!(s.get(&names[0]).len(), 1, "{keys} keys: the key just used stays");
            assert_eq!(s.get(&names[1]).len(), 0, "{keys} keys: the least recently used went");
        }
    }

    #[test]
    fn a_flood_of_distinct_keys_never_passes_the_budget() {
        let s = MemoryStore::new(100_000, 10_000);
        for i in 0..10_000 {
            s.put(&format!("http://a/{i}"), stored(i % 3000, "a", &[]));
            assert!(s.bytes() <= 100_000);
        }
        let counted: u64 = {
            let inner = s.lock();
            inner.entries.values().map(|e| e.bytes).sum()
        };
        assert_eq!(counted, s.bytes(), "the total matches the entries");
    }

    #[test]
    fn objects_over_the_maximum_are_not_admitted() {
        let s = MemoryStore::new(1 << 20, 4096);
        assert!(!s.put("big", stored(5000, "a", &[])));
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn variants_per_key_are_capped_and_their_values_counted() {
        let s = MemoryStore::new(1 << 30, 1 << 20);
        let value = "v".repeat(1000);
        for i in 0..100 {
            assert!(s.put("http://a/x", stored(10, &format!("{value}{i}"), &[])));
        }
        let variants = s.get("http://a/x");
        assert_eq!(variants.len(), MAX_VARIANTS);
        assert!(
            variants[0].secondary.0[0]
                .1
                .as_deref()
                .is_some_and(|v| v.ends_with(b"99")),
            "newest first"
        );
        assert!(
            s.bytes() >= MAX_VARIANTS as u64 * 1000,
            "the request values are counted: {}",
            s.bytes()
        );
        let counted: u64 = variants.iter().map(|v| v.size() + "http://a/x".len() as u64).sum();
        assert_eq!(counted, s.bytes(), "evicted variants gave their bytes back");
    }

    #[test]
    fn remove_url_finds_the_keys_with_extra_parts_without_a_scan() {
        let s = MemoryStore::new(1 << 20, 1 << 20);
        s.put("http://a/x", stored(10, "a", &[]));
        s.put("http://a/x\nx-tenant:1\n", stored(10, "a", &[]));
        s.put("http://a/x\nx-tenant:2\n", stored(10, "a", &[]));
        s.put("http://a/xy\nx-tenant:1\n", stored(10, "a", &[]));
        s.put("http://a/xy", stored(10, "a", &[]));
        assert_eq!(s.remove_url("http://a/x"), 3);
        assert_eq!(s.len(), 2, "http://a/xy and its extra-keyed entry stay");
        assert_eq!(s.remove_url("http://a/x"), 0);
        assert!(s.remove("http://a/xy\nx-tenant:1\n"));
        assert_eq!(s.remove_url("http://a/xy"), 1);
        assert!(s.is_empty());
        assert!(s.lock().extras.is_empty(), "the index holds no removed key");
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn purge_by_key_prefix_and_tag() {
        let s = MemoryStore::new(1 << 20, 1 << 20);
        s.put("http://a/blog/1", stored(10, "a", &["blog", "post-1"]));
        s.put("http://a/blog/2", stored(10, "a", &["blog"]));
        s.put("http://a/blog/2", stored(10, "b", &["post-2"]));
        s.put("http://a/shop/1", stored(10, "a", &["shop"]));
        assert!(s.remove("http://a/shop/1"));
        assert!(!s.remove("http://a/shop/1"));
        assert_eq!(s.purge_tag("blog"), 2);
        assert_eq!(s.get("http://a/blog/1").len(), 0, "its only variant went");
        assert_eq!(s.get("http://a/blog/2").len(), 1, "the untagged variant stays");
        assert_eq!(s.purge_prefix("http://a/blog/"), 1);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }
}
