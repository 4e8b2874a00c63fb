//! Submitting a training request: checked, recorded, then queued.
//!
//! The record is written before the message is published, so a trainer never
//! takes a request it cannot find; a request that then fails to publish is
//! recorded as failed, so nothing stays "queued" that no queue holds.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

use super::runs::{event, RunStore};
use super::{data, TrainingError};
use crate::fleet::BrokerError;
use crate::time;
use crate::wire::{
    valid_run_id, Names, RunEventKind, RunRecord, RunState, TrainRequest, TRAIN_SCHEMA_VERSION,
};

/// What a submission did.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The queued run.
    pub record: RunRecord,
    /// What the dataset holds.
    pub data: data::DataSummary,
}

/// A fresh run id: `run-<UTC time>-<8 hex>`, sortable by submission time
/// and unique without coordination.
pub fn new_run_id() -> String {
    let now = time::now_rfc3339_seconds(); // 2026-12-05T21:12:15Z
    let compact: String = now.chars().filter(|c| c.is_ascii_digit()).collect();
    let tail = uuid::Uuid::new_v4().simple().to_string();
    format!("run-{}-{}", &compact[..14.min(compact.len())], &tail[..8])
}

/// Declares the training queue: durable, quorum, rejected requests to the
/// fleet's dead-letter exchange. Idempotent.
pub async fn declare_train_queue(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    // The dead-letter exchange and queue are the fleet's; declaring the
    // whole topology keeps one definition of them.
    crate::fleet::broker::declare_topology(channel, names, crate::fleet::DEFAULT_DELIVERY_LIMIT)
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.dead_letter_exchange().into()),
    );
    channel
        .queue_declare(
            names.train_queue().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    Ok(())
}

/// Everything wrong with `request` that can be known without running it.
pub fn problems(request: &TrainRequest) -> Vec<String> {
    let mut out = request.flags.problems();
    if request.v != TRAIN_SCHEMA_VERSION {
        out.push(format!(
            "request version {} (this build reads {TRAIN_SCHEMA_VERSION})",
            request.v
        ));
    }
    if !valid_run_id(&request.run_id) {
        out.push(format!(
            "run id {:?} must be 1..=64 characters of [A-Za-z0-9._-]",
            request.run_id
        ));
    }
    if request.force
        && request
            .reason
            .as_deref()
            .is_none_or(|r| r.trim().is_empty())
    {
        out.push("--force needs a --reason, which the history records".into());
    }
    if request.force && !request.publish {
        out.push("--force only means something with --publish".into());
    }
    out
}

/// Checks `request` and its dataset, records it as queued, and puts it on
/// the training queue (publisher-confirmed).
pub async fn submit(
    runs: &RunStore,
    conn: &Connection,
    request: TrainRequest,
) -> Result<Submitted, TrainingError> {
    let issues = problems(&request);
    if !issues.is_empty() {
        return Err(TrainingError::Invalid(issues));
    }
    let summary = data::check(&request.data).await?;
    let record = RunRecord::queued(request, time::now_rfc3339_seconds());
    runs.create(&record).await?;
    if let Err(e) = publish(conn, runs.names(), &record.request).await {
        // Nothing will ever take it: say so rather than leave it "queued".
        let mut failed = record.clone();
        failed.state = RunState::Failed;
        failed.error = Some(format!("could not be queued: {e}"));
        let _ = runs
            .fail_unqueued(
                &failed,
                &event(
                    record.run_id(),
                    RunEventKind::Finished {
                        state: RunState::Failed,
                        model_version: None,
                        activated: None,
                        error: failed.error.clone(),
                    },
                ),
            )
            .await;
        return Err(e.into());
    }
    Ok(Submitted {
        record,
        data: summary,
    })
}

async fn publish(
    conn: &Connection,
    names: &Names,
    request: &TrainRequest,
) -> Result<(), BrokerError> {
    let channel = conn.create_channel().await?;
    declare_train_queue(&channel, names).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = serde_json::to_vec(request).expect("a request serialises");
    let confirm = channel
        .basic_publish(
            "".into(),
            names.train_queue().as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            BasicProperties::default()
                .with_message_id(request.run_id.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(time::now_ms() / 1000),
        )
        .await?
        .await?;
    let _ = channel.close(200, "submitted".into()).await;
    if confirm.is_nack() || confirm.take_message().is_some() {
        return Err(BrokerError::Nacked {
            job_id: request.run_id.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::TrainFlags;

    fn request() -> TrainRequest {
        TrainRequest {
            v: TRAIN_SCHEMA_VERSION,
            run_id: new_run_id(),
            data: "file:///nowhere".into(),
            flags: TrainFlags::default(),
            publish: false,
            force: false,
            reason: None,
            submitted_by: "t@h".into(),
            submitted_at: time::now_rfc3339_seconds(),
        }
    }

    #[test]
    fn run_ids_are_valid_and_distinct() {
        let (a, b) = (new_run_id(), new_run_id());
        assert!(valid_run_id(&a), "{a}");
        assert_ne!(a, b);
        assert!(a.starts_with("run-20"), "{a}");
    }

    #[test]
    fn requests_are_checked_before_anything_is_queued() {
        assert!(problems(&request()).is_empty());
        let mut r = request();
        r.force = true;
        r.flags.epochs = 0;
        r.run_id = "a/b".into();
        let p = problems(&r).join("\n");
        for needle in ["--epochs", "run id", "--reason", "--publish"] {
            assert!(p.contains(needle), "{needle}: {p}");
        }
    }
}
