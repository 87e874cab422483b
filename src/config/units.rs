//! Parsers for the human-friendly values of the config file: durations
//! (`"250ms"`, `"5s"`, `"2m"`, `"1h"`) and byte sizes (`"64KiB"`, `"100MiB"`,
//! or a plain integer of bytes).
//!
//! They are pure and return a message naming what was wrong, so the config
//! reader can prefix it with the field's path.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

/// Parses a duration such as `"250ms"`, `"5s"`, `"1.5s"`, `"2m"`, `"1h"`.
///
/// A bare number is refused: `timeout = 5` is ambiguous (seconds or
/// milliseconds?) and the operator must say which.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("invalid duration \"{text}\": missing unit (ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "invalid duration \"{text}\": expected a number then a unit, like \"5s\""
        ));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration \"{text}\": \"{number}\" is not a number"))?;
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => {
            return Err(format!(
                "invalid duration \"{text}\": unknown unit \"{other}\" (use ms, s, m, h or d)"
            ));
        }
    };
    let seconds = value * seconds_per_unit;
    // Thirty years is more than any timeout means; beyond it is a typo.
    if !seconds.is_finite() || seconds > 1.0e9 {
        return Err(format!("invalid duration \"{text}\": too large"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a byte size: a non-negative integer of bytes, or a number with a
/// unit `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024) or `KB`, `MB`, `GB`
/// (powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "invalid size \"{text}\": expected a number then a unit, like \"64KiB\""
        ));
    }
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid size \"{text}\": \"{number}\" is too large"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size \"{text}\": unknown unit \"{other}\" (use B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size \"{text}\": too large"))
}

/// Formats a byte count with the largest exact binary unit: `1KiB`, `1536`.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// An IP network (`10.0.0.0/8`) or a single address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_units() {
        let cases = [
            ("250ms", 250),
            ("5s", 5_000),
            ("1.5s", 1_500),
            ("2m", 120_000),
            ("1h", 3_600_000),
            (" 10s ", 10_000),
            ("0s", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)), "{text}");
        }
    }

    #[test]
    fn bad_durations_name_the_problem() {
        let cases = [
            ("5", "missing unit"),
            ("", "missing unit"),
            ("s", "expected a number"),
            ("5x", "unknown unit \"x\""),
            ("1.2.3s", "is not a number"),
            ("-5s", "expected a number"),
            ("99999999999999h", "too large"),
        ];
        for (text, needle) in cases {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn sizes_format_back() {
        assert_eq!(format_size(1024), "1KiB");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(10 << 20), "10MiB");
        assert_eq!(format_size(20), "20");
    }

    #[test]
    fn sizes_with_units() {
        let cases = [
            ("0", 0),
            ("1024", 1024),
            ("64KiB", 64 << 10),
            ("100MiB", 100 << 20),
            ("2GiB", 2 << 30),
            ("10KB", 10_000),
            ("8 KiB", 8 << 10),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn bad_sizes_name_the_problem() {
        let cases = [
            ("KiB", "expected a number"),
            ("12XB", "unknown unit"),
            ("-1", "expected a number"),
            ("99999999999999999999", "too large"),
            ("99999999999TiB", "too large"),
            ("1.5MiB", "unknown unit"),
        ];
        for (text, needle) in cases {
            let err = parse_size(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
