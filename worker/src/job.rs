//! Turning a delivery's properties into a job.
//!
//! Only metadata is read here; the body goes to the inference pool untouched.

use lapin::types::AMQPValue;
use lapin::BasicProperties;
use std::collections::BTreeMap;

use pleura::wire::{self, JobIdError, Priority, HEADER_PRIORITY, HEADER_SUBMITTED_MS};

/// What the worker knows about a job before decoding it.
#[derive(Debug)]
pub(crate) struct Job {
    /// The job id, or why the message has no usable one.
    pub(crate) job_id: Result<String, JobIdError>,
    /// STAT or routine, from the priority property or header.
    pub(crate) priority: Priority,
    /// Correlation headers to echo back.
    pub(crate) correlation: BTreeMap<String, String>,
    /// Milliseconds between submission and now, when the submitter said when.
    pub(crate) queue_ms: Option<f64>,
}

impl Job {
    /// Reads a job from AMQP properties.
    pub(crate) fn from_properties(p: &BasicProperties) -> Job {
        let job_id = match p.message_id() {
            None => Err(JobIdError::Missing),
            Some(id) => wire::validate_job_id(id.as_str()).map(|_| id.as_str().to_string()),
        };
        let headers: Vec<(String, String)> = p
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter_map(|(k, v)| header_string(v).map(|v| (k.as_str().to_string(), v)))
                    .collect()
            })
            .unwrap_or_default();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let priority = Priority::from_markers(*p.priority(), header(HEADER_PRIORITY));
        let now_ms = pleura::time::now_ms() as f64;
        let submitted_ms = header(HEADER_SUBMITTED_MS)
            .and_then(|v| v.parse::<f64>().ok())
            .or_else(|| p.timestamp().map(|s| s as f64 * 1e3));
        let queue_ms = submitted_ms.map(|s| (now_ms - s).max(0.0));
        let correlation =
            wire::correlation_headers(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Job {
            job_id,
            priority,
            correlation,
            queue_ms,
        }
    }
}

fn header_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::LongLongInt(i) => Some(i.to_string()),
        AMQPValue::LongInt(i) => Some(i.to_string()),
        AMQPValue::LongUInt(i) => Some(i.to_string()),
        AMQPValue::ShortInt(i) => Some(i.to_string()),
        AMQPValue::ShortUInt(i) => Some(i.to_string()),
        AMQPValue::ShortShortInt(i) => Some(i.to_string()),
        AMQPValue::ShortShortUInt(i) => Some(i.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    fn props(id: Option<&str>, priority: Option<u8>, headers: &[(&str, &str)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), AMQPValue::LongString((*v).into()));
        }
        let mut p = BasicProperties::default().with_headers(t);
        if let Some(id) = id {
            p = p.with_message_id(id.into());
        }
        if let Some(pr) = priority {
            p = p.with_priority(pr);
        }
        p
    }

    #[test]
    fn reads_id_priority_and_correlation() {
        let j = Job::from_properties(&props(
            Some("j-1"),
            Some(7),
            &[("x-pleura-accession", "A9"), ("x-pleura-submitted-ms", "0")],
        ));
        assert_eq!(j.job_id, Ok("j-1".to_string()));
        assert_eq!(j.priority, Priority::Stat);
        assert_eq!(
            j.correlation.get("x-pleura-accession").map(String::as_str),
            Some("A9")
        );
        assert!(!j.correlation.contains_key("x-pleura-submitted-ms"));
        assert!(j.queue_ms.unwrap() > 0.0);
    }

    #[test]
    fn header_alone_marks_stat_and_missing_id_is_an_error() {
        let j = Job::from_properties(&props(None, None, &[("x-pleura-priority", "stat")]));
        assert_eq!(j.job_id, Err(JobIdError::Missing));
        assert_eq!(j.priority, Priority::Stat);
        let j = Job::from_properties(&props(Some("bad id"), None, &[]));
        assert_eq!(j.job_id, Err(JobIdError::BadCharacter(' ')));
        assert_eq!(j.priority, Priority::Routine);
        assert_eq!(j.queue_ms, None);
    }
}
