//! Wall-clock timestamps as the logs write them, in UTC.

use std::time::SystemTime;

use time::OffsetDateTime;

/// RFC 3339 with milliseconds: `2026-11-28T14:03:13.123Z`.
pub fn rfc3339_ms(at: SystemTime) -> String {
    let t = OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The Common Log Format time: `28/Nov/2026:14:03:13 +0000`.
pub fn clf(at: SystemTime) -> String {
    let t = OffsetDateTime::from(at);
    format!(
        "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000",
        t.day(),
        MONTHS[usize::from(u8::from(t.month())) - 1],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats() {
        // 2026-11-28T14:03:13.045Z
        let at = UNIX_EPOCH + Duration::from_millis(1_795_874_593_045);
        assert_eq!(rfc3339_ms(at), "2026-11-28T14:03:13.045Z");
        assert_eq!(clf(at), "28/Nov/2026:14:03:13 +0000");
        assert_eq!(rfc3339_ms(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
