//! What happens to the origin's answer to a request the cache sent on
//! ([`Pending`](super::Pending)): a 304 refreshes the stored response, a
//! storable response is stored while it streams (through a tee), a
//! failure is answered stale when allowed; and how a response's metadata
//! (lifetime, age, sharing) is worked out.

use super::*;

impl Pending {
    /// The upstream request of a request that goes to the origin:
    /// revalidation of a stale stored response, or a full fetch to store.
    /// Responses to ranges and origin-only preconditions (206, 412, 416...)
    /// are never stored, nor let replace a stored one.
    pub(super) fn prepare(
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
    pub(super) fn prepare_revalidation(&mut self, headers: &mut HeaderMap) {
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
    pub(super) fn prepare_full_fetch(&mut self, headers: &mut HeaderMap) {
        if headers.contains_key(IF_NONE_MATCH) || headers.contains_key(IF_MODIFIED_SINCE) {
            headers.remove(IF_NONE_MATCH);
            headers.remove(IF_MODIFIED_SINCE);
            headers.remove(IF_RANGE);
            self.answer_conditionals = true;
        }
    }

    /// The log's word for a forwarded request answered with `status`.
    pub(super) fn outcome_on_response(&self, status: StatusCode) -> Outcome {
        match (self.fwd, status) {
            (Fwd::Stale | Fwd::Request, StatusCode::NOT_MODIFIED) if self.stale.is_some() => Outcome::Revalidated,
            (Fwd::Method | Fwd::Bypass, _) => Outcome::Bypass,
            _ => Outcome::Miss,
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

    pub(super) fn stale_for_error(&self, status: Option<StatusCode>) -> Option<Response<ProxyBody>> {
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
    pub(super) fn grace_allows(&self, v: &Stored, age: u64, rc: &crate::cache::control::CacheControl) -> bool {
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
                return Handled::replace(response, Outcome::Stale, None);
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
    pub(super) fn refresh(
        &mut self,
        v: &Stored,
        parts: &http::response::Parts,
        response_time: SystemTime,
        outcome: Outcome,
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
    pub(super) fn replaces_stored(&self, status: StatusCode, detail: &str) -> bool {
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
    pub(super) fn storable(&self, parts: &http::response::Parts) -> Result<Stored, &'static str> {
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

impl Handled {
    fn origin(outcome: Outcome, tee: Option<Tee>) -> Handled {
        Handled {
            answer: Answer::Origin,
            outcome,
            tee,
        }
    }

    fn replace(response: Response<ProxyBody>, outcome: Outcome, tee: Option<Tee>) -> Handled {
        Handled {
            answer: Answer::Replace(Box::new(response)),
            outcome,
            tee,
        }
    }
}

/// Adds our `Cache-Status` member after any an upstream cache wrote
/// (RFC 9211 section 2: the list runs from the origin to the client).
pub(super) fn set_status(headers: &mut HeaderMap, text: &str) {
    if let Ok(value) = HeaderValue::from_str(text) {
        headers.append(CACHE_STATUS.clone(), value);
    }
}

impl Cache {
    /// Works out the directives, lifetime and initial age of a stored
    /// response from its fields and times.
    pub(super) fn refresh_metadata(&self, v: &mut Stored) {
        let control = response_control(&v.headers);
        let lifetime = freshness::freshness_lifetime(v.status, &v.headers, &control, v.response_time, &self.heuristic);
        v.lifetime = lifetime.seconds;
        v.explicit = lifetime.is_explicit();
        v.initial_age = freshness::initial_age(&v.headers, v.request_time, v.response_time);
        v.shared = is_shared(&control);
        v.control = control.directives;
    }
}

/// True when the origin marked a response for shared caches: `public`, a
/// valid `s-maxage`, or directives in a field targeted at this cache
/// (RFC 9213: `Portcullis-Cache-Control`, `CDN-Cache-Control`).
pub(super) fn is_shared(control: &crate::cache::control::ResponseControl) -> bool {
    let cc = &control.directives;
    cc.public || (cc.s_maxage.is_some() && !cc.s_maxage_invalid) || control.source.is_targeted()
}
