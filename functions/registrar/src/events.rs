//! The archive events in a Lambda payload, read with `aws_lambda_events`' types: S3
//! notifications sent to the function directly, or SQS messages whose bodies are S3
//! notifications. S3's test event (sent through SQS when a notification is set up) and
//! events other than `ObjectCreated:*` / `ObjectRemoved:*` are skipped.

use aws_lambda_events::event::s3::{S3Event, S3EventRecord};
use aws_lambda_events::event::sqs::SqsMessage;
use serde_json::Value;
use torchfn_store::registrar::{decode_key, ArchiveEvent, RegistrarError};

fn bad(what: impl std::fmt::Display) -> RegistrarError {
    RegistrarError::BadEvent(what.to_string())
}

/// The archive events of `payload`, in order.
pub fn archive_events(payload: Value) -> Result<Vec<ArchiveEvent>, RegistrarError> {
    let Value::Object(mut payload) = payload else {
        return Err(bad("the payload is not a JSON object"));
    };
    let Some(Value::Array(records)) = payload.remove("Records") else {
        return Err(bad("no Records array"));
    };
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        if is_sqs_message(&record) {
            let message: SqsMessage = serde_json::from_value(record)
                .map_err(|e| bad(format_args!("not an SQS message: {e}")))?;
            out.extend(from_sqs(&message)?);
        } else {
            let record: S3EventRecord = serde_json::from_value(record)
                .map_err(|e| bad(format_args!("not an S3 event record: {e}")))?;
            out.extend(from_s3(&record)?);
        }
    }
    Ok(out)
}

/// SQS messages come from `aws:sqs` and carry a body; S3 records have neither.
fn is_sqs_message(record: &Value) -> bool {
    record.get("eventSource").and_then(Value::as_str) == Some("aws:sqs")
        || record.get("body").is_some()
}

/// An SQS message's S3 notification (none for S3's test event).
fn from_sqs(message: &SqsMessage) -> Result<Vec<ArchiveEvent>, RegistrarError> {
    let body = message
        .body
        .as_deref()
        .ok_or_else(|| bad("an SQS message has no body"))?;
    let body: Value =
        serde_json::from_str(body).map_err(|e| bad(format_args!("SQS body is not JSON: {e}")))?;
    // `{"Service": "Amazon S3", "Event": "s3:TestEvent", …}`, which aws_lambda_events has no
    // type for.
    if body.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(Vec::new());
    }
    let event: S3Event = serde_json::from_value(body)
        .map_err(|e| bad(format_args!("SQS body is not an S3 notification: {e}")))?;
    let mut out = Vec::with_capacity(event.records.len());
    for record in &event.records {
        out.extend(from_s3(record)?);
    }
    Ok(out)
}

/// One S3 record's archive event; `None` for events other than creations and removals.
fn from_s3(record: &S3EventRecord) -> Result<Option<ArchiveEvent>, RegistrarError> {
    let name = record
        .event_name
        .as_deref()
        .ok_or_else(|| bad("a record has no eventName"))?;
    let created = name.starts_with("ObjectCreated");
    if !created && !name.starts_with("ObjectRemoved") {
        return Ok(None);
    }
    let bucket = record
        .s3
        .bucket
        .name
        .clone()
        .ok_or_else(|| bad("no s3.bucket.name"))?;
    let key = record
        .s3
        .object
        .key
        .as_deref()
        .ok_or_else(|| bad("no s3.object.key"))?;
    Ok(Some(ArchiveEvent {
        created,
        bucket,
        key: decode_key(key),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    /// The committed example notification, for `key` in `bucket`, with `event_name`.
    fn s3_event(event_name: &str, bucket: &str, key: &str) -> Value {
        let text = include_str!("../../../tests/data/s3-object-created.json");
        let mut event: Value = serde_json::from_str(text).unwrap();
        event["Records"][0]["eventName"] = json!(event_name);
        event["Records"][0]["s3"]["bucket"]["name"] = json!(bucket);
        event["Records"][0]["s3"]["object"]["key"] = json!(key);
        event
    }

    fn archive(created: bool, bucket: &str, key: &str) -> ArchiveEvent {
        ArchiveEvent {
            created,
            bucket: bucket.into(),
            key: key.into(),
        }
    }

    #[test]
    fn direct_notifications() {
        let created = s3_event("ObjectCreated:Put", "models", "archives/my+model%2B1.mar");
        assert_eq!(
            archive_events(created).unwrap(),
            [archive(true, "models", "archives/my model+1.mar")]
        );
        let removed = s3_event("ObjectRemoved:Delete", "models", "archives/m.mar");
        assert_eq!(
            archive_events(removed).unwrap(),
            [archive(false, "models", "archives/m.mar")]
        );
        let restored = s3_event("ObjectRestore:Completed", "models", "archives/m.mar");
        assert!(archive_events(restored).unwrap().is_empty());
    }

    #[test]
    fn notifications_through_sqs() {
        let test_event = json!({
            "Service": "Amazon S3",
            "Event": "s3:TestEvent",
            "Time": "2026-11-25T12:00:00.000Z",
            "Bucket": "models",
            "RequestId": "EXAMPLE",
            "HostId": "EXAMPLE"
        });
        let sqs = json!({"Records": [
            {"messageId": "m1", "eventSource": "aws:sqs", "body": test_event.to_string()},
            {"messageId": "m2", "eventSource": "aws:sqs",
             "body": s3_event("ObjectCreated:Put", "models", "archives/a.mar").to_string()},
            {"messageId": "m3", "eventSource": "aws:sqs",
             "body": s3_event("ObjectRemoved:Delete", "models", "archives/b.mar").to_string()},
        ]});
        assert_eq!(
            archive_events(sqs).unwrap(),
            [
                archive(true, "models", "archives/a.mar"),
                archive(false, "models", "archives/b.mar")
            ]
        );
    }

    #[test]
    fn other_payloads_are_bad_events() {
        for (payload, says) in [
            (json!({"hello": "world"}), "no Records array"),
            (json!([1, 2]), "not a JSON object"),
            (
                json!({"Records": [{"eventName": "ObjectCreated:Put"}]}),
                "not an S3 event record",
            ),
            (
                json!({"Records": [{"eventSource": "aws:sqs", "body": "{"}]}),
                "SQS body is not JSON",
            ),
            (
                json!({"Records": [{"eventSource": "aws:sqs", "body": "{\"Records\": 1}"}]}),
                "not an S3 notification",
            ),
        ] {
            let error = archive_events(payload.clone()).unwrap_err();
            assert!(
                matches!(&error, RegistrarError::BadEvent(m) if m.contains(says)),
                "{payload}: {error}"
            );
        }
    }
}
