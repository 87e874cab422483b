//! HTTP caching for a shared cache (RFC 9111). This first part holds only
//! the rules, as pure functions over `http` types with no I/O, no storage
//! and no clock, so each can be tested alone against the RFC text:
//!
//! - [`control`]: `Cache-Control` and the targeted fields of RFC 9213
//!   (`Portcullis-Cache-Control`, `CDN-Cache-Control`), parsed leniently
//!   where the RFC allows and conservatively where input is broken;
//! - [`freshness`]: freshness lifetime, heuristic freshness, the age
//!   calculation, and whether a stored response may be served fresh or
//!   stale (RFC 5861);
//! - [`validators`]: entity tags and the conditional requests a cache
//!   answers with 304;
//! - [`vary`]: secondary keys from `Vary`;
//! - [`storable`]: whether a response may be stored, which fields to leave
//!   out, and how a 304 updates a stored response;
//! - [`store`]: the [`store::Storage`] trait and the in-memory store with
//!   a byte budget and least-recently-used eviction.
//!
//! Request coalescing and the cache phase of the request pipeline come
//! later and build on these; neither is here yet.

pub mod control;
pub mod freshness;
pub mod storable;
pub mod store;
pub mod validators;
pub mod vary;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
