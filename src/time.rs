//! Time, in the two forms Pleura writes down: milliseconds since the Unix
//! epoch (stream scores, submit stamps, queue times) and RFC 3339 UTC
//! (every document people read).
//!
//! Results, heartbeats and refusals carry milliseconds, since they are
//! compared with each other; manifests and registry records carry whole
//! seconds, since they are compared with nothing finer than a person's
//! memory, and a fixed-precision `created_at` keeps `pleura models init`
//! byte-identical for a seed.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch of `t` (0 for times before it).
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    epoch_ms(SystemTime::now())
}

/// Now, as RFC 3339 UTC with milliseconds (`2026-11-25T21:00:00.123Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Now, as RFC 3339 UTC in whole seconds (`2026-11-25T21:00:00Z`).
pub fn now_rfc3339_seconds() -> String {
    rfc3339_seconds(SystemTime::now())
}

/// `t` as RFC 3339 UTC in whole seconds (`2026-11-25T21:00:00Z`).
pub fn rfc3339_seconds(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whether `s` is an RFC 3339 timestamp.
pub fn is_rfc3339(s: &str) -> bool {
    humantime::parse_rfc3339(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn both_forms_agree_on_the_same_instant() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        assert_eq!(epoch_ms(t), 1_764_000_000_123);
        assert_eq!(rfc3339_seconds(t), "2025-11-24T16:00:00Z");
        assert_eq!(rfc3339_seconds(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert!(is_rfc3339(&now_rfc3339()));
        assert!(now_rfc3339().ends_with('Z'));
        assert!(!is_rfc3339("yesterday"));
        assert_eq!(epoch_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
