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
    generations: [AtomicU64; 64],
}

/// What the log and the metrics call the way a request was served.
pub mod outcome {
    /// Answered from the store, fresh (or 304 / 206 from it).
    pub const HIT: &str = "hit";
    /// Fetched from the origin: nothing usable was stored.
    pub const MISS: &str = "miss";
    /// A stored response was revalidated with the origin (304).
    pub const REVALIDATED: &str = "revalidated";
    /// Answered stale (`stale-while-revalidate`, `stale-if-error`).
    pub const STALE: &str = "stale";
    /// Not cacheable as asked (method, range, preconditions).
    pub const BYPASS: &str = "bypass";
    pub const ALL: [&str; 5] = [HIT, MISS, REVALIDATED, STALE, BYPASS];
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
    /// Answered by the cache; the string is the [`outcome`].
    Answer(Response<ProxyBody>, &'static str),
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
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
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
        for g in &self.generations {
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
                    return Lookup::Answer(serve(&v, method, headers, age, status, options), outcome::HIT);
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
            return Lookup::Answer(response, outcome::STALE);
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

impl Pending {
    /// The upstream request of a request that goes to the origin:
    /// revalidation of a stale stored response, or a full fetch to store.
    /// Responses to ranges and origin-only preconditions (206, 412, 416...)
    /// are never stored, nor let replace a stored one.
    fn prepare(
        &mut self,
        headers: &mut HeaderMap,
        stale: Option<Arc<Stored>>,
        ranged: bool,
        origin_only: bool,
        shareable: bool,
    ) {
        self.may_store = self.method == Method::GET && !ranged && !origin_only;
        match stale {
            Some(v) => {
                self.stale = Some(v);
                if !origin_only && !ranged {
                    self.prepare_revalidation(headers);
                }
            }
            None if shareable => self.prepare_full_fetch(headers),
            None => {}
        }
    }

    /// Revalidation (RFC 9111 section 4.3.1): the stored response's
    /// validators go upstream, unless the client sent its own conditional
    /// (which the origin then answers for both). A range request keeps its
    /// range and gets no validators.
    fn prepare_revalidation(&mut self, headers: &mut HeaderMap) {
        let Some(v) = self.stale.clone() else { return };
        if headers.contains_key(IF_NONE_MATCH) || headers.contains_key(IF_MODIFIED_SINCE) {
            // The client's own validators go to the origin; a 304 from it
            // cannot refresh the stored response unless they match it, so
            // ask for the full response instead and answer them here.
            self.prepare_full_fetch(headers);
        }
        if let Some(etag) = v.headers.get(ETAG) {
            headers.insert(IF_NONE_MATCH, etag.clone());
        }
        if let Some(modified) = v.headers.get(LAST_MODIFIED) {
            headers.insert(IF_MODIFIED_SINCE, modified.clone());
        }
        self.revalidating = v.headers.contains_key(ETAG) || v.headers.contains_key(LAST_MODIFIED);
    }

    /// The client's conditionals are answered here, from the full response
    /// the origin is asked for.
    fn prepare_full_fetch(&mut self, headers: &mut HeaderMap) {
        if headers.contains_key(IF_NONE_MATCH) || headers.contains_key(IF_MODIFIED_SINCE) {
            headers.remove(IF_NONE_MATCH);
            headers.remove(IF_MODIFIED_SINCE);
            headers.remove(IF_RANGE);
            self.answer_conditionals = true;
        }
    }

    /// The log's word for a forwarded request answered with `status`.
    fn outcome_on_response(&self, status: StatusCode) -> &'static str {
        match (self.fwd, status) {
            (Fwd::Stale | Fwd::Request, StatusCode::NOT_MODIFIED) if self.stale.is_some() => outcome::REVALIDATED,
            (Fwd::Method | Fwd::Bypass, _) => outcome::BYPASS,
            _ => outcome::MISS,
        }
    }

    /// The origin failed: a stale response may answer (RFC 5861 section
    /// 4, or the route's `stale_if_error` grace).
    pub fn on_error(self, error: ProxyError) -> Result<Response<ProxyBody>, ProxyError> {
        match self.stale_for_error(None) {
            Some(response) => Ok(response),
            None => Err(error),
        }
    }

    fn stale_for_error(&self, status: Option<StatusCode>) -> Option<Response<ProxyBody>> {
        let v = self.stale.as_ref()?;
        let age = v.current_age(SystemTime::now());
        let mut rc = request_control(&self.request);
        if self.options.ignore_client_no_cache {
            rc.no_cache = FieldScope::Absent;
        }
        let allowed =
            freshness::may_serve_stale_if_error(age, v.lifetime, &rc, &v.control) || self.grace_allows(v, age, &rc);
        if !allowed {
            return None;
        }
        let mut status_text = format!("portcullis; fwd={}; ttl={}", self.fwd.token(), ttl(v, age));
        if let Some(s) = status {
            let _ = write!(status_text, "; fwd-status={}", s.as_u16());
        }
        status_text.push_str("; detail=stale-if-error");
        Some(serve(v, &self.method, &self.request, age, status_text, &self.options))
    }

    /// The route's `stale_if_error` grace: like the directive, it never
    /// overrides what forbids stale service in a shared cache
    /// (`must-revalidate`, `proxy-revalidate`, `no-cache`, `s-maxage`;
    /// sections 4.2.4 and 5.2.2.10), nor a request that refuses stale
    /// responses (`no-cache`, `max-age`, `min-fresh`).
    fn grace_allows(&self, v: &Stored, age: u64, rc: &super::control::CacheControl) -> bool {
        let grace = self.options.stale_if_error.as_secs();
        if grace == 0 || freshness::is_fresh(v.lifetime, age) || freshness::request_refuses_stale(age, rc) {
            return false;
        }
        let c = &v.control;
        let forbidden = c.must_revalidate
            || c.proxy_revalidate
            || c.no_cache.is_whole()
            || c.s_maxage.is_some()
            || c.s_maxage_invalid;
        !forbidden && freshness::staleness(age, v.lifetime) <= grace
    }

    /// Handles the origin's response head: refreshes or stores, sets
    /// `Cache-Status`, and says what the client gets. A response to store
    /// comes with a [`Tee`] for its body.
    pub fn on_response(mut self, parts: &mut http::response::Parts) -> Handled {
        let status = parts.status;
        let outcome = self.outcome_on_response(status);
        if status.is_server_error() {
            if let Some(response) = self.stale_for_error(Some(status)) {
                return Handled::replace(response, outcome::STALE, None);
            }
        }
        let response_time = SystemTime::now();
        if status == StatusCode::NOT_MODIFIED && self.revalidating {
            if let Some(v) = self.stale.take() {
                return self.refresh(&v, parts, response_time, outcome);
            }
        }
        let mut status_text = format!("portcullis; fwd={}; fwd-status={}", self.fwd.token(), status.as_u16());
        if self.collapsed {
            status_text.push_str("; collapsed");
        }
        match self.storable(parts) {
            Err(detail) => {
                if let Some(flight) = self.flight.take() {
                    flight.land(Landing::Pass);
                }
                if self.replaces_stored(status, detail) {
                    // A new response that cannot be stored makes the old
                    // one obsolete (section 4.3.3).
                    self.cache.store.remove(&self.key);
                }
                let _ = write!(status_text, "; detail={detail}");
                set_status(&mut parts.headers, &status_text);
                strip_cache_fields(&mut parts.headers, &self.options);
                Handled::origin(outcome, None)
            }
            Ok(mut stored) => {
                let age = stored.current_age(response_time);
                let _ = write!(status_text, "; stored; ttl={}", ttl(&stored, age));
                set_status(&mut parts.headers, &status_text);
                stored.response_time = response_time;
                let not_modified = self.answer_conditionals
                    && parts.status == StatusCode::OK
                    && validators::not_modified(&self.method, &self.request, &stored.headers, response_time);
                let replacement = not_modified.then(|| {
                    let shown = Stored {
                        body: Bytes::new(),
                        ..stored.clone()
                    };
                    serve(
                        &shown,
                        &self.method,
                        &self.request,
                        age,
                        status_text.clone(),
                        &self.options,
                    )
                });
                strip_cache_fields(&mut parts.headers, &self.options);
                let tee = Tee {
                    generation: self.generation,
                    cache: self.cache.clone(),
                    key: std::mem::take(&mut self.key),
                    stored: Some(stored),
                    buffer: BytesMut::new(),
                    reserved: 0,
                    flight: self.flight.take(),
                };
                match replacement {
                    Some(response) => Handled::replace(response, outcome, Some(tee)),
                    None => Handled::origin(outcome, Some(tee)),
                }
            }
        }
    }

    /// A 304 to the stored validators (section 4.3.4): the stored response
    /// gets the 304's fields and a new age. If the fields now forbid
    /// sharing it (`no-store`, `private`, a cookie), it leaves the store
    /// and only this client gets it.
    fn refresh(
        &mut self,
        v: &Stored,
        parts: &http::response::Parts,
        response_time: SystemTime,
        outcome: &'static str,
    ) -> Handled {
        let mut fresh = v.clone();
        storable::update_from_304(&mut fresh.headers, &parts.headers);
        fresh.request_time = self.request_time;
        fresh.response_time = response_time;
        self.cache.refresh_metadata(&mut fresh);
        let age = fresh.current_age(response_time);
        let control = response_control(&fresh.headers).directives;
        let unshareable = if control.no_store && !control.must_understand {
            Some("no-store")
        } else if control.private.is_whole() {
            Some("private")
        } else if !self.options.store_set_cookie && fresh.headers.contains_key(header::SET_COOKIE) {
            Some("set-cookie")
        } else {
            None
        };
        let mut status_text = format!("portcullis; fwd={}; fwd-status=304", self.fwd.token());
        let landing = match unshareable {
            Some(detail) => {
                self.cache.store.remove(&self.key);
                let _ = write!(status_text, "; detail={detail}");
                Landing::Pass
            }
            None => {
                let _ = write!(status_text, "; stored; ttl={}", ttl(&fresh, age));
                Landing::Stored
            }
        };
        let response = serve(&fresh, &self.method, &self.request, age, status_text, &self.options);
        // Not stored when the URL was invalidated meanwhile, or when this
        // request said `no-store` (section 5.2.1.5).
        let keep = self.cache.generation(&self.key) == self.generation && !request_control(&self.request).no_store;
        let landing = match landing {
            Landing::Stored if !(keep && self.cache.put(&self.key, fresh)) => Landing::Pass,
            other => other,
        };
        if let Some(flight) = self.flight.take() {
            flight.land(landing);
        }
        Handled::replace(response, outcome, None)
    }

    /// True when a response that may not be stored makes the stored one
    /// obsolete: a successful answer to a plain GET that the origin marked
    /// unstorable (not a reason on the request's side, which any client
    /// could use to evict entries).
    fn replaces_stored(&self, status: StatusCode, detail: &str) -> bool {
        let response_side = matches!(
            detail,
            "no-store" | "private" | "vary-star" | "no-freshness" | "must-understand" | "set-cookie" | "too-big"
        );
        self.stale.is_some()
            && self.may_store
            && status.is_success()
            && response_side
            && !request_control(&self.request).no_store
    }

    /// The stored form of a response, or why it may not be stored (the
    /// `Cache-Status` detail).
    fn storable(&self, parts: &http::response::Parts) -> Result<Stored, &'static str> {
        if self.fwd == Fwd::Method || self.method != Method::GET {
            return Err("method");
        }
        if !self.may_store {
            return Err(if self.request.contains_key(RANGE) {
                "range"
            } else {
                "precondition"
            });
        }
        let settings = StoreSettings { heuristic: true };
        let decision = storable::storable(&self.method, &self.request, parts.status, &parts.headers, &settings)
            .map_err(|e| e.detail())?;
        if !self.options.store_set_cookie && parts.headers.contains_key(header::SET_COOKIE) {
            return Err("set-cookie");
        }
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.cache.max_object) {
            return Err("too-big");
        }
        let secondary = vary::secondary_key(&decision.vary, &self.request).unwrap_or_default();
        if secondary.size() > MAX_SECONDARY_BYTES {
            // Every client could store its own variant with long values.
            return Err("vary-too-large");
        }
        let shared = is_shared(&decision.control);
        if !self.credentials.allows(shared, &decision.vary) {
            return Err("credentials");
        }
        let mut headers = parts.headers.clone();
        for name in &decision.omit {
            headers.remove(name);
        }
        let mut stored = Stored {
            status: parts.status,
            tags: tags(&headers),
            headers,
            body: Bytes::new(),
            request_time: self.request_time,
            response_time: SystemTime::now(),
            secondary,
            vary: decision.vary,
            control: decision.control.directives,
            lifetime: 0,
            initial_age: 0,
            explicit: false,
            shared,
        };
        self.cache.refresh_metadata(&mut stored);
        Ok(stored)
    }
}

/// What [`Pending::on_response`] decided.
pub struct Handled {
    pub answer: Answer,
    /// The access log's and metrics' word for it.
    pub outcome: &'static str,
    /// Copies the origin's body into the store: the pipeline puts it on the
    /// body, or reads ahead with it when it leads a flight.
    pub tee: Option<Tee>,
}

impl Handled {
    fn origin(outcome: &'static str, tee: Option<Tee>) -> Handled {
        Handled {
            answer: Answer::Origin,
            outcome,
            tee,
        }
    }

    fn replace(response: Response<ProxyBody>, outcome: &'static str, tee: Option<Tee>) -> Handled {
        Handled {
            answer: Answer::Replace(Box::new(response)),
            outcome,
            tee,
        }
    }
}

/// Adds our `Cache-Status` member after any an upstream cache wrote
/// (RFC 9211 section 2: the list runs from the origin to the client).
fn set_status(headers: &mut HeaderMap, text: &str) {
    if let Ok(value) = HeaderValue::from_str(text) {
        headers.append(CACHE_STATUS.clone(), value);
    }
}

impl Cache {
    /// Works out the directives, lifetime and initial age of a stored
    /// response from its fields and times.
    fn refresh_metadata(&self, v: &mut Stored) {
        let control = response_control(&v.headers);
        let lifetime = freshness::freshness_lifetime(v.status, &v.headers, &control, v.response_time, &self.heuristic);
        v.lifetime = lifetime.seconds;
        v.explicit = lifetime.is_explicit();
        v.initial_age = freshness::initial_age(&v.headers, v.request_time, v.response_time);
        v.shared = is_shared(&control);
        v.control = control.directives;
    }
}

/// The most bytes of request values (those `Vary` names) one variant may
/// be stored under.
const MAX_SECONDARY_BYTES: u64 = 4096;

/// True when the origin marked a response for shared caches: `public`, a
/// valid `s-maxage`, or directives in a field targeted at this cache
/// (RFC 9213: `Portcullis-Cache-Control`, `CDN-Cache-Control`).
fn is_shared(control: &super::control::ResponseControl) -> bool {
    let cc = &control.directives;
    cc.public || (cc.s_maxage.is_some() && !cc.s_maxage_invalid) || control.source.is_targeted()
}

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

impl Drop for Held {
    fn drop(&mut self) {
        self.cache.buffering.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Cache {
    /// Counts `n` bytes against the buffering limit, or `None` past it.
    fn reserve(self: &Arc<Self>, n: u64) -> Option<Held> {
        let before = self.buffering.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.buffering_limit {
            self.buffering.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        Some(Held {
            cache: self.clone(),
            bytes: n,
        })
    }
}

impl Tee {
    /// True when this body lands a flight other requests may wait on.
    pub fn leads(&self) -> bool {
        self.flight.is_some()
    }

    /// Copies a chunk; false, copying nothing, when it does not fit (the
    /// object would pass `max_object_size`, or all copies together the
    /// buffering limit). The caller then gives the copy up.
    pub fn copy(&mut self, chunk: &Bytes) -> bool {
        if self.stored.is_none() {
            return false;
        }
        let n = chunk.len() as u64;
        if self.buffer.len() as u64 + n > self.cache.max_object {
            return false;
        }
        let before = self.cache.buffering.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.cache.buffering_limit {
            self.cache.buffering.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.reserved += n;
        self.buffer.extend_from_slice(chunk);
        true
    }

    /// The response cannot be shared after all (too big): the waiters go
    /// to the origin on their own.
    pub fn give_up(mut self) {
        self.clear();
        if let Some(flight) = self.flight.take() {
            flight.land(Landing::Pass);
        }
    }

    fn clear(&mut self) {
        self.stored = None;
        self.buffer = BytesMut::new();
        let n = std::mem::take(&mut self.reserved);
        self.cache.buffering.fetch_sub(n, Ordering::Relaxed);
    }

    /// The body ended cleanly: store it, unless its URL was invalidated
    /// since the request was looked up. Returns the whole body.
    pub fn store(mut self) -> Option<Bytes> {
        let mut stored = self.stored.take()?;
        let body = std::mem::take(&mut self.buffer).freeze();
        self.clear();
        stored.headers.remove(header::TRANSFER_ENCODING);
        if stored.status != StatusCode::NO_CONTENT {
            stored.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        stored.body = body.clone();
        let current = self.cache.generation(&self.key) == self.generation;
        let admitted = current && self.cache.put(&self.key, stored);
        if let Some(flight) = self.flight.take() {
            flight.land(if admitted { Landing::Stored } else { Landing::Pass });
        }
        Some(body)
    }

    /// For a flight's leader: a task reads the body at the origin's pace,
    /// copying it for the store and passing each frame on to the client at
    /// once, so the requests waiting on the flight are held up neither by
    /// a slow client nor by one that left (the copy is finished without
    /// it). Frames the client has not taken yet count against the
    /// buffering limit. When the copy is given up (too big, or the limit
    /// is reached) the rest of the body goes to the client directly, at
    /// its own pace.
    pub fn feed(self, mut body: ProxyBody) -> ProxyBody {
        use http_body_util::BodyExt;
        if http_body::Body::is_end_stream(&body) {
            // Nothing to read (an empty body): stored at once.
            self.store();
            return body;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cache = self.cache.clone();
        let mut tee = Some(self);
        tokio::spawn(async move {
            loop {
                match body.frame().await {
                    None => {
                        if let Some(tee) = tee.take() {
                            tee.store();
                        }
                        let _ = tx.send(Feed::End);
                        return;
                    }
                    Some(Ok(frame)) => {
                        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                        let counted = cache.reserve(n);
                        // Trailers are not stored: they end the copy too.
                        let kept = counted.is_some()
                            && tee
                                .as_mut()
                                .is_some_and(|t| frame.data_ref().is_some_and(|d| t.copy(d)));
                        // The client's server may not poll again after the
                        // last frame: it is marked so.
                        let last = http_body::Body::is_end_stream(&body);
                        match (kept, last) {
                            (true, false) => {
                                // The copy goes on even if the client left.
                                let _ = tx.send(Feed::Frame(Ok(frame), counted.map(guard), false));
                            }
                            (true, true) => {
                                if let Some(tee) = tee.take() {
                                    tee.store();
                                }
                                let _ = tx.send(Feed::Frame(Ok(frame), counted.map(guard), true));
                                return;
                            }
                            (false, _) => {
                                if let Some(tee) = tee.take() {
                                    tee.give_up();
                                }
                                let _ = tx.send(Feed::Frame(Ok(frame), counted.map(guard), last));
                                if !last {
                                    // Nobody waits any more: the client's pace.
                                    let _ = tx.send(Feed::Rest(body));
                                }
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        // The origin failed: dropping the tee abandons the
                        // flight, and one of the waiters tries again.
                        drop(tee.take());
                        let _ = tx.send(Feed::Frame(Err(e), None, false));
                        return;
                    }
                }
            }
        });
        ProxyBody::fed(rx)
    }
}

/// The body's side of a tee: it copies what streams by and stores it when
/// the body ends whole.
impl crate::body::Tap for Tee {
    fn data(&mut self, chunk: &Bytes) -> bool {
        self.copy(chunk)
    }

    fn finish(self: Box<Self>) {
        (*self).store();
    }

    fn pass(self: Box<Self>) {
        (*self).give_up();
    }
}

/// Boxes bytes counted against the buffering limit as a body guard.
fn guard(held: Held) -> crate::body::Guard {
    Box::new(held)
}

impl Drop for Tee {
    fn drop(&mut self) {
        self.clear();
    }
}
