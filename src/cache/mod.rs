//! HTTP caching for a shared cache (RFC 9111). The rules are pure
//! functions over `http` types with no I/O, no storage and no clock, so
//! each can be tested alone against the RFC text:
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
//! - [`key`]: the primary key (method-independent URI, route options);
//! - [`range`]: single byte ranges answered from a stored body.
//!
//! Around them:
//!
//! - [`store`]: the [`store::Storage`] trait and the in-memory store with
//!   a byte budget and least-recently-used eviction;
//! - [`coalesce`]: concurrent misses for one key become one origin request;
//! - [`serve`]: the cache phase of the pipeline ([`Cache::lookup`], then
//!   [`serve::Pending`] for what the origin answers), `Cache-Status`, `Age`,
//!   the body [`serve::Tee`] that stores a response while it streams, and
//!   purges.

pub mod coalesce;
pub mod control;
pub mod freshness;
pub mod key;
pub mod range;
pub mod serve;
pub mod storable;
pub mod store;
pub mod validators;
pub mod vary;

pub use serve::Cache;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
