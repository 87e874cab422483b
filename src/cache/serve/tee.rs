//! The tee: a response body copied into the store while it streams to the
//! client ([`Tee`](super::Tee)), within the object size and the cache's
//! buffering limit, and for a flight's leader read at the origin's pace by
//! a task of its own ([`Tee::feed`](super::Tee::feed)).

use super::*;

impl Drop for Held {
    fn drop(&mut self) {
        self.cache.buffering.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Cache {
    /// Counts `n` bytes against the buffering limit, or `None` past it.
    pub(super) fn reserve(self: &Arc<Self>, n: u64) -> Option<Held> {
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
