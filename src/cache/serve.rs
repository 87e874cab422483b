//! The cache phase of the request pipeline: the one place where the pure
//! rules of this module meet a request, the store and the origin.
//!
//! [`Cache::lookup`] decides, for a GET or HEAD on a caching route, whether
//! the store can answer (fresh hit, 304 to a conditional request, 206 for a
//! range, stale while revalidating) or the request goes to the origin; in
//! that case it joins the key's [flight](super::coalesce) and returns a
//! [`Pending`], which prepares the upstream request (validators for a
//! stale entry, no client conditionals when a full response is wanted to
//! store) and then handles what the origin answered: a 304 refreshes the
//! stored entry, a storable response is stored while it streams to the
//! client (a [`Tee`] on the body), a failure is answered stale when
//! `stale-if-error` or the route's grace allows it.
//!
//! Every response of a caching route carries `Cache-Status` (RFC 9211);
//! every response served from the store carries `Age`.
//!
//! `pending.rs` handles the origin's answer, `tee.rs` copies a body into
//! the store while it streams.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{
    self, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_RANGE, ETAG, HeaderName, HeaderValue, IF_MATCH, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, LOCATION, RANGE,
};
use http::{HeaderMap, Method, Response, StatusCode};

use super::coalesce::{Flight, FlightStats, Flights, Join, Landing};
use super::control::{FieldScope, PORTCULLIS_CACHE_CONTROL, request_control, response_control};
use super::freshness::{self, HeuristicSettings};
use super::range::{self, RangeAnswer};
use super::storable::{self, StoreSettings};
use super::store::{MemoryStore, Storage, Stored};
use super::validators;
use super::vary;
use crate::body::{Feed, ProxyBody};
use crate::config::{CacheConfig, CredentialsPolicy, RouteCache};
use crate::error::ProxyError;

mod pending;
mod tee;

use pending::set_status;

pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
static CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// How many times a request may look again after waiting on a flight.
const MAX_ROUNDS: u32 = 3;

/// The shared cache: the store and the flights in progress.
pub struct Cache {
    store: Arc<dyn Storage>,
    flights: Arc<Flights>,
    lock_timeout: Duration,
    heuristic: HeuristicSettings,
    max_object: u64,
    /// Bytes held by tees for responses still arriving, and the most they
    /// may hold together (the store's budget): past it a response streams
    /// through without being copied.
    buffering: AtomicU64,
    buffering_limit: u64,
    /// Bumped when URLs are invalidated or purged (by URL hash, 64 ways), so
    /// a response that was arriving meanwhile is not stored afterwards.
    generations: Arc<[AtomicU64; 64]>,
}

/// How a request was served on a caching route: the access log's `cache`
/// field and the `result` label of the cache metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the store, fresh (or 304 / 206 from it).
    Hit,
    /// Fetched from the origin: nothing usable was stored.
    Miss,
    /// A stored response was revalidated with the origin (304).
    Revalidated,
    /// Answered stale (`stale-while-revalidate`, `stale-if-error`).
    Stale,
    /// Not cacheable as asked (method, range, preconditions).
    Bypass,
}

impl Outcome {
    /// Every outcome, in the order of [`Outcome::index`].
    pub const ALL: [Outcome; 5] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Revalidated,
        Outcome::Stale,
        Outcome::Bypass,
    ];

    /// The word logs and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
        }
    }

    /// The position in [`Outcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a request went to the origin (RFC 9211 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fwd {
    UriMiss,
    VaryMiss,
    Stale,
    Request,
    Method,
    Bypass,
}

impl Fwd {
    fn token(self) -> &'static str {
        match self {
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Stale => "stale",
            Fwd::Request => "request",
            Fwd::Method => "method",
            Fwd::Bypass => "bypass",
        }
    }
}

/// The result of a lookup.
pub enum Lookup {
    /// Answered by the cache, and how.
    Answer(Response<ProxyBody>, Outcome),
    /// Answered stale; fetch in the background with this to refresh.
    AnswerAndRefresh(Response<ProxyBody>, Box<Pending>),
    /// Go to the origin.
    Forward(Box<Pending>),
    /// `only-if-cached` and nothing suitable is stored: 504 (the status
    /// text to send is [`ONLY_IF_CACHED_STATUS`]).
    OnlyIfCached,
}

/// `Cache-Status` of an `only-if-cached` request answered 504.
pub const ONLY_IF_CACHED_STATUS: &str = "portcullis; detail=only-if-cached";

/// A request that goes to the origin, and what to do with the answer.
pub struct Pending {
    cache: Arc<Cache>,
    options: Arc<RouteCache>,
    key: String,
    fwd: Fwd,
    method: Method,
    /// The client's request fields as received (the secondary key and the
    /// client's conditionals are read from them).
    request: HeaderMap,
    request_time: SystemTime,
    /// The stored response being revalidated, or kept for `stale-if-error`.
    stale: Option<Arc<Stored>>,
    flight: Option<Flight>,
    /// Waited for another request's flight before coming here.
    collapsed: bool,
    /// The client's `If-None-Match` / `If-Modified-Since` were taken out of
    /// the upstream request (a full response is wanted, to store); the
    /// cache answers them.
    answer_conditionals: bool,
    /// The upstream request carries the stored response's validators, so
    /// a 304 is about the stored response (RFC 9111 section 4.3.4).
    revalidating: bool,
    /// The response may be stored (or replace the stored one).
    may_store: bool,
    /// The key's invalidation generation at lookup: a response to a request
    /// sent before an invalidation is not stored after it.
    generation: u64,
    /// The request carried credentials the route's policy cares about.
    credentials: Credentials,
}

/// A request's credentials (`Cookie`, `Authorization`) as the route's
/// `credentials` policy sees them: with `public-only` (the default) a
/// response is shared between such a request and any other only when the
/// origin marked it for shared caches, or varies on those very fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Credentials {
    cookie: bool,
    authorization: bool,
}

impl Credentials {
    fn of(headers: &HeaderMap, options: &RouteCache) -> Credentials {
        if options.credentials == CredentialsPolicy::Rfc9111 {
            return Credentials::default();
        }
        Credentials {
            cookie: headers.contains_key(header::COOKIE),
            authorization: headers.contains_key(header::AUTHORIZATION),
        }
    }

    fn present(self) -> bool {
        self.cookie || self.authorization
    }

    /// True when a response with this sharing mark and `Vary` may answer
    /// (or be stored from) a request with these credentials.
    fn allows(self, shared: bool, vary: &vary::Vary) -> bool {
        shared
            || ((!self.cookie || vary.names(&header::COOKIE))
                && (!self.authorization || vary.names(&header::AUTHORIZATION)))
    }

    fn may_use(self, v: &Stored) -> bool {
        self.allows(v.shared, &v.vary)
    }
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Cache {
        Cache {
            store: Arc::new(MemoryStore::new(config.memory, config.max_object_size)),
            flights: Arc::new(Flights::default()),
            lock_timeout: config.lock_timeout,
            heuristic: HeuristicSettings {
                fraction: config.heuristic_fraction,
                max_seconds: config.heuristic_max.as_secs(),
            },
            max_object: config.max_object_size,
            buffering: AtomicU64::new(0),
            buffering_limit: config.memory,
            generations: Arc::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    /// The cache of `config` that takes over `old`'s store, flights and
    /// purge generations (a reload that changed `[cache]`): entries and
    /// requests waiting on a fetch survive. The store keeps its budget
    /// until [`fit_store`](Self::fit_store), which the reload calls once
    /// this cache is in use (a dry run builds one and changes nothing).
    pub fn carried_over(old: &Cache, config: &CacheConfig) -> Cache {
        Cache {
            store: old.store.clone(),
            flights: old.flights.clone(),
            generations: old.generations.clone(),
            ..Cache::new(config)
        }
    }

    /// Gives the (shared) store this cache's budget: a smaller `memory`
    /// evicts the least recently used entries down to it at once.
    pub fn fit_store(&self) {
        let evicted = self.store.resize(self.buffering_limit, self.max_object);
        if evicted > 0 {
            tracing::info!(
                evicted,
                memory = self.buffering_limit,
                "cache memory reduced: entries evicted"
            );
        }
    }

    pub fn store(&self) -> &dyn Storage {
        &*self.store
    }

    /// Follows the requests waiting on flights and the flights landed.
    pub fn flight_stats(&self) -> tokio::sync::watch::Receiver<FlightStats> {
        self.flights.stats()
    }

    /// Removes every stored response of the URL `url` (as
    /// `scheme://host/path?query`, the form keys take); how many keys went.
    pub fn purge_url(&self, url: &str) -> usize {
        self.generations[generation_slot(url)].fetch_add(1, Ordering::SeqCst);
        self.store.remove_url(url)
    }

    /// Removes every key starting with `prefix`.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        self.bump_all();
        self.store.purge_prefix(prefix)
    }

    /// Removes every response tagged `tag` (`Surrogate-Key`, `Cache-Tag`).
    pub fn purge_tag(&self, tag: &str) -> usize {
        self.bump_all();
        self.store.purge_tag(tag)
    }

    fn bump_all(&self) {
        for g in self.generations.iter() {
            g.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn generation(&self, key: &str) -> u64 {
        self.generations[generation_slot(key)].load(Ordering::SeqCst)
    }

    /// Bytes tees hold now (responses being copied into the store).
    pub fn buffering(&self) -> u64 {
        self.buffering.load(Ordering::Relaxed)
    }

    /// The cache phase for a GET or HEAD: answer from the store or say how
    /// to go to the origin. `headers` are the client's; they are edited
    /// for the upstream request when the answer is [`Lookup::Forward`].
    pub async fn lookup(
        self: &Arc<Self>,
        method: &Method,
        headers: &mut HeaderMap,
        key: String,
        options: &Arc<RouteCache>,
    ) -> Lookup {
        let mut rc = request_control(headers);
        if options.ignore_client_no_cache {
            rc.no_cache = FieldScope::Absent;
        }
        let origin_only = validators::has_origin_only_preconditions(headers);
        let ranged = headers.contains_key(RANGE);
        let credentials = Credentials::of(headers, options);
        // Served from a flight's stored response.
        let mut collapsed = false;
        // Gave up waiting (too slow, or not shareable): never again.
        let mut waited = false;
        // All waiting together is bounded by `lock_timeout`.
        let deadline = tokio::time::Instant::now() + self.lock_timeout;
        let mut round = 0;
        loop {
            round += 1;
            let now = SystemTime::now();
            let (found, mut fwd) = self.variant(&key, headers, credentials);
            let mut stale = None;
            if let Some(v) = found {
                let age = v.current_age(now);
                if origin_only {
                    // Preconditions only the origin may evaluate (RFC 9111
                    // section 4.3.2).
                    fwd = Fwd::Request;
                } else if freshness::acceptable(age, v.lifetime, v.explicit, &rc, &v.control) {
                    let status = hit_status(&v, age, collapsed);
                    return Lookup::Answer(serve(&v, method, headers, age, status, options), Outcome::Hit);
                } else if freshness::may_serve_stale_while_revalidate(age, v.lifetime, &rc, &v.control) {
                    let status = format!("portcullis; hit; ttl={}; detail=stale-while-revalidate", ttl(&v, age));
                    let response = serve(&v, method, headers, age, status, options);
                    return self.revalidate_in_background(response, v, headers, key, options, credentials);
                } else {
                    // Fresh but refused by the request's directives, or stale.
                    fwd = if rc.no_cache.is_whole() || freshness::is_fresh(v.lifetime, age) {
                        Fwd::Request
                    } else {
                        Fwd::Stale
                    };
                    stale = Some(v);
                }
            }
            if rc.only_if_cached {
                // RFC 9111 section 5.2.1.7: the pipeline answers 504.
                return Lookup::OnlyIfCached;
            }
            // Only requests whose answer can be shared wait for each other.
            let shareable = method == Method::GET
                && !ranged
                && !origin_only
                && !rc.no_store
                && !rc.no_cache.is_whole()
                && !credentials.present();
            let mut flight = None;
            if shareable && !waited && round < MAX_ROUNDS {
                match self.flights.join(&key) {
                    Join::Lead(f) => flight = Some(f),
                    Join::Wait(rx) => {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        match self.flights.wait(rx, left).await {
                            Some(Landing::Stored) => collapsed = true,
                            // The leader gave up: one of the waiters leads.
                            Some(Landing::Abandoned) => {}
                            // Not shareable, or too slow: look once more
                            // (another request may have stored it), then
                            // go alone.
                            Some(Landing::Pass | Landing::Pending) | None => waited = true,
                        }
                        continue;
                    }
                }
            }
            if ranged && fwd != Fwd::Request {
                fwd = Fwd::Bypass;
            }
            let mut pending = self.pending(method, headers, key, options, fwd, false);
            pending.credentials = credentials;
            pending.flight = flight;
            pending.prepare(headers, stale, ranged, origin_only, shareable);
            return Lookup::Forward(Box::new(pending));
        }
    }

    /// The stored variant `headers` select, and why the request would go
    /// to the origin without it (RFC 9211 `fwd`). A request with
    /// credentials gets only a response the origin marked for sharing.
    fn variant(&self, key: &str, headers: &HeaderMap, credentials: Credentials) -> (Option<Arc<Stored>>, Fwd) {
        let variants = self.store.get(key);
        let fwd = if variants.is_empty() {
            Fwd::UriMiss
        } else {
            Fwd::VaryMiss
        };
        match variants.iter().find(|v| vary::matches(&v.vary, &v.secondary, headers)) {
            // RFC 9211: a response was there, the request's semantics did
            // not allow its use.
            Some(v) if !credentials.may_use(v) => (None, Fwd::Request),
            Some(v) => (Some(v.clone()), fwd),
            None => (None, fwd),
        }
    }

    /// `stale-while-revalidate`: `response` (stale) answers at once; the
    /// first such request also leads a background refresh, a plain GET with
    /// the stored validators whatever this client asked.
    fn revalidate_in_background(
        self: &Arc<Self>,
        response: Response<ProxyBody>,
        v: Arc<Stored>,
        headers: &mut HeaderMap,
        key: String,
        options: &Arc<RouteCache>,
        credentials: Credentials,
    ) -> Lookup {
        let Join::Lead(flight) = self.flights.join(&key) else {
            // Another request is refreshing it already.
            return Lookup::Answer(response, Outcome::Stale);
        };
        for name in [
            RANGE,
            IF_RANGE,
            IF_NONE_MATCH,
            IF_MODIFIED_SINCE,
            IF_MATCH,
            IF_UNMODIFIED_SINCE,
        ] {
            headers.remove(name);
        }
        let mut pending = self.pending(&Method::GET, headers, key, options, Fwd::Stale, false);
        pending.may_store = true;
        pending.credentials = credentials;
        pending.stale = Some(v);
        pending.flight = Some(flight);
        pending.prepare_revalidation(headers);
        Lookup::AnswerAndRefresh(response, Box::new(pending))
    }

    fn pending(
        self: &Arc<Self>,
        method: &Method,
        headers: &HeaderMap,
        key: String,
        options: &Arc<RouteCache>,
        fwd: Fwd,
        collapsed: bool,
    ) -> Pending {
        let generation = self.generation(&key);
        Pending {
            cache: self.clone(),
            options: Arc::clone(options),
            key,
            fwd,
            method: method.clone(),
            request: headers.clone(),
            request_time: SystemTime::now(),
            stale: None,
            flight: None,
            collapsed,
            answer_conditionals: false,
            revalidating: false,
            may_store: false,
            generation,
            credentials: Credentials::default(),
        }
    }

    /// A successful unsafe request invalidates its target and the
    /// same-origin `Location` / `Content-Location` (RFC 9111 section 4.4).
    /// `url` is the target's key; `origin` its `scheme://host`.
    pub fn invalidate(&self, url: &str, origin: &str, response: &HeaderMap) {
        self.purge_url(url);
        for name in [LOCATION, CONTENT_LOCATION] {
            let Some(target) = response.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let same_origin = if target.starts_with('/') && !target.starts_with("//") {
                Some(format!("{origin}{target}"))
            } else {
                target
                    .get(..origin.len())
                    .filter(|head| head.eq_ignore_ascii_case(origin))
                    .and_then(|_| {
                        let rest = &target[origin.len()..];
                        (rest.is_empty() || rest.starts_with('/')).then(|| format!("{origin}{rest}"))
                    })
            };
            if let Some(other) = same_origin {
                let other = other.split('#').next().unwrap_or_default();
                self.purge_url(other);
            }
        }
    }

    /// Stores a complete response; true when admitted.
    fn put(&self, key: &str, stored: Stored) -> bool {
        self.store.put(key, stored)
    }
}

/// The generation counter of a key: by its URL part, so a purge of the URL
/// reaches every variant and extra-keyed entry of it.
fn generation_slot(key: &str) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let url = key.split(super::key::EXTRA_SEPARATOR).next().unwrap_or(key);
    (BuildHasherDefault::<DefaultHasher>::default().hash_one(url) % 64) as usize
}

impl Stored {
    /// RFC 9111 section 4.2.3's `current_age` at `now`.
    pub fn current_age(&self, now: SystemTime) -> u64 {
        freshness::current_age(self.initial_age, freshness::resident_time(self.response_time, now))
    }
}

/// Remaining freshness in seconds (negative once stale), for `ttl=`.
fn ttl(v: &Stored, age: u64) -> i64 {
    v.lifetime as i64 - age as i64
}

fn hit_status(v: &Stored, age: u64, collapsed: bool) -> String {
    let mut s = format!("portcullis; hit; ttl={}", ttl(v, age));
    if collapsed {
        s.push_str("; collapsed");
    }
    s
}

/// Builds the client's response from a stored one: 304 for a matching
/// conditional request, 206 / 416 for a range, else the whole response;
/// no body for HEAD. Adds `Age` and `Cache-Status`.
fn serve(
    v: &Stored,
    method: &Method,
    request: &HeaderMap,
    age: u64,
    cache_status: String,
    options: &RouteCache,
) -> Response<ProxyBody> {
    let mut headers = v.headers.clone();
    strip_cache_fields(&mut headers, options);
    headers.insert(header::AGE, HeaderValue::from(age));
    set_status(&mut headers, &cache_status);
    let len = v.body.len() as u64;
    let conditional = request.contains_key(IF_NONE_MATCH) || request.contains_key(IF_MODIFIED_SINCE);
    let (status, body) = if conditional
        && v.status == StatusCode::OK
        && validators::not_modified(method, request, &v.headers, v.response_time)
    {
        // RFC 9110 section 15.4.5: the fields a 200 would have, no content.
        headers.remove(CONTENT_LENGTH);
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else if v.status == StatusCode::OK && method == Method::GET {
        match range::answer(request, &v.headers, len) {
            RangeAnswer::Full => (v.status, v.body.clone()),
            RangeAnswer::Partial { start, end } => {
                let part = v.body.slice(start as usize..=end as usize);
                headers.insert(CONTENT_LENGTH, HeaderValue::from(part.len()));
                if let Ok(value) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                    headers.insert(CONTENT_RANGE, value);
                }
                (StatusCode::PARTIAL_CONTENT, part)
            }
            RangeAnswer::Unsatisfiable => {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(0));
                if let Ok(value) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    headers.insert(CONTENT_RANGE, value);
                }
                (StatusCode::RANGE_NOT_SATISFIABLE, Bytes::new())
            }
        }
    } else {
        (v.status, v.body.clone())
    };
    let body = if method == Method::HEAD || body.is_empty() {
        ProxyBody::empty()
    } else {
        ProxyBody::full(body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Fields for the cache, not the client: the proxy's own targeted field
/// and, unless exposed, the purge tags.
fn strip_cache_fields(headers: &mut HeaderMap, options: &RouteCache) {
    headers.remove(&PORTCULLIS_CACHE_CONTROL);
    if !options.expose_tags {
        headers.remove(&SURROGATE_KEY);
        headers.remove(&CACHE_TAG);
    }
}

/// Purge tags of a response: `Surrogate-Key` (space-separated) and
/// `Cache-Tag` (comma-separated).
fn tags(headers: &HeaderMap) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (name, split) in [(&SURROGATE_KEY, ' '), (&CACHE_TAG, ',')] {
        for line in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
            for tag in line.split(split).map(str::trim).filter(|t| !t.is_empty()) {
                if out.len() < 64 && !out.iter().any(|t| t == tag) {
                    out.push(tag.to_owned());
                }
            }
        }
    }
    out
}

/// What the pipeline does with the origin's answer.
pub enum Answer {
    /// Send this response head (edited in place) with the origin's body.
    Origin,
    /// Send this instead (a stored response). With a [`Tee`] the origin's
    /// body is still read in the background, to be stored.
    Replace(Box<Response<ProxyBody>>),
}

/// What [`Pending::on_response`] decided.
pub struct Handled {
    pub answer: Answer,
    /// The access log's and metrics' word for it.
    pub outcome: Outcome,
    /// Copies the origin's body into the store: the pipeline puts it on the
    /// body, or reads ahead with it when it leads a flight.
    pub tee: Option<Tee>,
}

/// The most bytes of request values (those `Vary` names) one variant may
/// be stored under.
const MAX_SECONDARY_BYTES: u64 = 4096;

/// Copies a response body into the store, up to the maximum object size
/// and within the cache's buffering limit; lands the flight when the body
/// ends (or is given up). Dropped unfinished, it stores nothing and
/// abandons its flight (a waiter leads the next try).
pub struct Tee {
    cache: Arc<Cache>,
    key: String,
    /// The key's invalidation generation when the request was looked up.
    generation: u64,
    stored: Option<Stored>,
    buffer: BytesMut,
    /// Bytes counted in `cache.buffering` for this tee.
    reserved: u64,
    flight: Option<Flight>,
}

/// Bytes counted in the cache's buffering limit for a frame read ahead of
/// its client; released when the frame is taken (or dropped).
pub struct Held {
    cache: Arc<Cache>,
    bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    #[test]
    fn every_outcome_has_its_own_index_and_word() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i);
        }
        let words: std::collections::BTreeSet<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(words.len(), Outcome::ALL.len());
        assert_eq!(Outcome::Revalidated.as_str(), "revalidated");
    }
}
