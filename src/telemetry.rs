//! Logging set-up and the rules that keep logs safe.
//!
//! Logs use `tracing` key-value fields (`job_id`, `model_version`), never
//! values formatted into the message, so log shippers can index them. Two
//! things never reach a log line: patient data (the decoder never reads
//! patient tags) and credentials (URLs go through [`redact_url`]).

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
/// Calling it twice is harmless (the second call does nothing), which keeps
/// tests that start several services in one process simple.
///
/// Human logs are coloured only on a terminal: in a file, a pipe or a log
/// shipper, escape sequences would only get in the way of `grep`.
/// `NO_COLOR` turns colour off on a terminal too.
pub fn init_tracing(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs(std::io::stderr().is_terminal()));
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Human => builder.with_target(false).try_init(),
    };
}

/// Whether human logs get colour: only on a terminal, and never with
/// `NO_COLOR` set (<https://no-color.org>).
fn colour_logs(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Replaces the password of a URL with `***`, for logging.
///
/// Unparseable input is replaced wholesale: an odd URL is exactly the kind
/// that might carry a secret in an unexpected place.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let r = redact_url("amqp://guest:s3cret@rabbit:5672/%2f");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.contains("guest:***@rabbit"), "{r}");
        let r = redact_url("redis://:hunter2@redis:6379/0");
        assert!(!r.contains("hunter2"), "{r}");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("not a url with pw:x@y"), "<unparseable url>");
    }
}
