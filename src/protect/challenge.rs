//! The challenge cookie: proof that a client took one extra round trip
//! and keeps cookies, as browsers do and simple flood tools do not.
//!
//! A cookie value is `v1.<issued unix seconds>.<MAC>`, where MAC is the
//! first 128 bits of HMAC-SHA256 over the issue time and the client's
//! address (the whole IPv4 address; the /64 of an IPv6 one, which clients
//! rotate within). It is valid for `lifetime` from its issue time, only
//! from the address it was issued to, and only under the current key or
//! the one before it: the key rotates every `lifetime`, so no cookie
//! outlives two rotations whatever its claimed time.

use std::net::IpAddr;
use std::sync::Mutex;

use aws_lc_rs::hmac;

use crate::secret::hex;

/// Why a cookie was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieError {
    Malformed,
    /// Not made by this key (or its predecessor), or for another address.
    BadSignature,
    Expired,
    /// Issued later than now (beyond a minute of clock skew).
    FromTheFuture,
}

struct Keys {
    current: hmac::Key,
    previous: Option<hmac::Key>,
    /// When `current` was made (unix seconds).
    since: u64,
}

/// Issues and checks challenge cookies. The clock is an argument (unix
/// seconds), so tests control time.
pub struct Challenge {
    keys: Mutex<Keys>,
    lifetime: u64,
    /// A fixed key (shared by several instances) does not rotate.
    fixed: bool,
}

fn random_key() -> hmac::Key {
    let mut bytes = [0u8; 32];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // No system randomness: a key from the clock is still better than a
        // constant; cookies then only survive until restart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes[..16].copy_from_slice(&nanos.to_le_bytes());
    }
    hmac::Key::new(hmac::HMAC_SHA256, &bytes)
}

/// What a cookie is bound to: the IPv4 address, or the IPv6 /64.
fn binding(ip: IpAddr) -> [u8; 17] {
    let mut out = [0u8; 17];
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out[0] = 6;
            out[1..9].copy_from_slice(&v6.octets()[..8]);
        }
    }
    out
}

fn mac(key: &hmac::Key, issued: u64, ip: IpAddr) -> [u8; 16] {
    let mut message = Vec::with_capacity(25);
    message.extend_from_slice(&issued.to_be_bytes());
    message.extend_from_slice(&binding(ip));
    let tag = hmac::sign(key, &message);
    let mut out = [0u8; 16];
    out.copy_from_slice(&tag.as_ref()[..16]);
    out
}

fn unhex(text: &str) -> Option<[u8; 16]> {
    let bytes = text.as_bytes();
    if bytes.len() != 32 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 16];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

impl Challenge {
    /// A challenge with a random key rotated every `lifetime` seconds, or a
    /// fixed `key` (at least 16 bytes) shared with other instances.
    pub fn new(lifetime: u64, key: Option<&[u8]>, now: u64) -> Challenge {
        let (current, fixed) = match key {
            Some(k) => (hmac::Key::new(hmac::HMAC_SHA256, k), true),
            None => (random_key(), false),
        };
        Challenge {
            keys: Mutex::new(Keys {
                current,
                previous: None,
                since: now,
            }),
            lifetime: lifetime.max(1),
            fixed,
        }
    }

    pub fn lifetime(&self) -> u64 {
        self.lifetime
    }

    fn rotate_if_due(&self, keys: &mut Keys, now: u64) {
        if self.fixed || now < keys.since + self.lifetime {
            return;
        }
        let old = std::mem::replace(&mut keys.current, random_key());
        // After a long pause both keys are stale: drop the old one too.
        keys.previous = (now < keys.since + 2 * self.lifetime).then_some(old);
        keys.since = now;
    }

    /// A cookie value for `ip`, issued `now`.
    pub fn issue(&self, ip: IpAddr, now: u64) -> String {
        let Ok(mut keys) = self.keys.lock() else {
            return String::new();
        };
        self.rotate_if_due(&mut keys, now);
        format!("v1.{now}.{}", hex(&mac(&keys.current, now, ip)))
    }

    /// Checks a cookie value presented by `ip` at `now`.
    pub fn verify(&self, value: &str, ip: IpAddr, now: u64) -> Result<(), CookieError> {
        let mut parts = value.split('.');
        let (Some("v1"), Some(issued), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CookieError::Malformed);
        };
        let issued: u64 = issued.parse().map_err(|_| CookieError::Malformed)?;
        let tag = unhex(tag).ok_or(CookieError::Malformed)?;
        if issued > now + 60 {
            return Err(CookieError::FromTheFuture);
        }
        if now >= issued.saturating_add(self.lifetime) {
            return Err(CookieError::Expired);
        }
        let Ok(mut keys) = self.keys.lock() else {
            return Err(CookieError::BadSignature);
        };
        self.rotate_if_due(&mut keys, now);
        let matches = |key: &hmac::Key| constant_time_eq(&mac(key, issued, ip), &tag);
        if matches(&keys.current) || keys.previous.as_ref().is_some_and(matches) {
            Ok(())
        } else {
            Err(CookieError::BadSignature)
        }
    }
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_cookie_verifies_for_its_address_until_it_expires() {
        let c = Challenge::new(3600, None, 1_000);
        let cookie = c.issue(ip("192.0.2.7"), 1_000);
        assert!(cookie.starts_with("v1.1000."), "{cookie}");
        assert_eq!(c.verify(&cookie, ip("192.0.2.7"), 1_000), Ok(()));
        assert_eq!(c.verify(&cookie, ip("192.0.2.7"), 4_599), Ok(()));
        assert_eq!(c.verify(&cookie, ip("192.0.2.7"), 4_600), Err(CookieError::Expired));
        assert_eq!(
            c.verify(&cookie, ip("192.0.2.8"), 1_001),
            Err(CookieError::BadSignature),
            "bound to the address"
        );
    }

    #[test]
    fn ipv6_cookies_are_bound_to_the_64() {
        let c = Challenge::new(3600, None, 0);
        let cookie = c.issue(ip("2001:db8:1:2::10"), 5);
        assert_eq!(c.verify(&cookie, ip("2001:db8:1:2:aaaa::1"), 6), Ok(()));
        assert_eq!(
            c.verify(&cookie, ip("2001:db8:1:3::10"), 6),
            Err(CookieError::BadSignature)
        );
        let mapped = c.issue(ip("::ffff:192.0.2.7"), 5);
        assert_eq!(c.verify(&mapped, ip("192.0.2.7"), 6), Ok(()), "IPv4-mapped is IPv4");
    }

    #[test]
    fn forged_edited_and_malformed_cookies_fail() {
        let c = Challenge::new(3600, None, 0);
        let other = Challenge::new(3600, None, 0);
        let a = ip("192.0.2.1");
        let cookie = c.issue(a, 100);
        assert_eq!(
            other.verify(&cookie, a, 101),
            Err(CookieError::BadSignature),
            "another key"
        );
        // Moving the issue time forward to extend the cookie breaks the MAC.
        let extended = cookie.replacen("v1.100.", "v1.3000.", 1);
        assert_eq!(c.verify(&extended, a, 3001), Err(CookieError::BadSignature));
        let mut flipped = cookie.clone();
        let last = flipped.pop().expect("char");
        flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(c.verify(&flipped, a, 101), Err(CookieError::BadSignature));
        for bad in [
            "",
            "v1",
            "v1.100",
            "v2.100.00",
            "v1.x.00000000000000000000000000000000",
            "v1.100.zz",
            "v1.100.00.00",
        ] {
            assert_eq!(c.verify(bad, a, 101), Err(CookieError::Malformed), "{bad:?}");
        }
        let future = c.issue(a, 10_000);
        assert_eq!(c.verify(&future, a, 100), Err(CookieError::FromTheFuture));
    }

    #[test]
    fn keys_rotate_and_old_cookies_die_after_two_rotations() {
        let c = Challenge::new(100, None, 0);
        let a = ip("192.0.2.1");
        let early = c.issue(a, 50);
        // One rotation at 100: the previous key still verifies.
        let later = c.issue(a, 120);
        assert_eq!(c.verify(&early, a, 120), Ok(()));
        assert_eq!(c.verify(&later, a, 120), Ok(()));
        // Expired by lifetime anyway at 150.
        assert_eq!(c.verify(&early, a, 150), Err(CookieError::Expired));
        // The second rotation (at 220) drops the first key.
        let _ = c.issue(a, 220);
        assert_eq!(c.verify(&later, a, 219), Ok(()));
    }

    #[test]
    fn a_fixed_key_is_shared_between_instances() {
        let key = b"0123456789abcdef0123456789abcdef";
        let one = Challenge::new(3600, Some(key), 0);
        let two = Challenge::new(3600, Some(key), 0);
        let a = ip("192.0.2.1");
        assert_eq!(two.verify(&one.issue(a, 10), a, 20), Ok(()));
    }
}
