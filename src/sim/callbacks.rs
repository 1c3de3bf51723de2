//! Callbacks: the registry of URLs per account and service, and the messages an accepted request turns
//! into, in the shapes of `data/vendor/callback_usage.json` and `callback_completion.json`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::config::{CallbackMode, SimConfig};
use super::faults::Rng;
use super::promo::PromoRequest;
use super::stats::{Counters, add, bump};
use super::{lock, usage_for};

/// The vendor's `maxCallbackThreshold`: delivery attempts per message.
pub const MAX_ATTEMPTS: u32 = 4;
/// The completion message's `comment`.
pub const COMPLETION_COMMENT: &str = "Request Completed Processing";

/// Where one service's callbacks go, with the credentials echoed in each body.
#[derive(Clone)]
pub struct Registration {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// Registered callbacks: one URL per (account, service); registering again replaces it.
#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<HashMap<(String, String), Registration>>,
}

impl Registry {
    pub fn set(&self, account: &str, service: &str, registration: Registration) {
        lock(&self.entries).insert((account.to_owned(), service.to_owned()), registration);
    }

    pub fn get(&self, account: &str, service: &str) -> Option<Registration> {
        lock(&self.entries)
            .get(&(account.to_owned(), service.to_owned()))
            .cloned()
    }

    /// True if there was one to remove.
    pub fn remove(&self, account: &str, service: &str) -> bool {
        lock(&self.entries)
            .remove(&(account.to_owned(), service.to_owned()))
            .is_some()
    }

    /// `(service, registration)` for `account`, sorted by service.
    pub fn list(&self, account: &str) -> Vec<(String, Registration)> {
        let mut out: Vec<(String, Registration)> = lock(&self.entries)
            .iter()
            .filter(|((a, _), _)| a == account)
            .map(|((_, service), r)| (service.clone(), r.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// An accepted request, handed from the promo handler to the dispatcher.
#[derive(Debug, Clone)]
pub struct Job {
    pub request_id: String,
    /// Acceptance order: with `sim.seed`, it seeds this request's callback faults.
    pub seq: u64,
    pub request: PromoRequest,
}

/// One usage record of a data message; every count a string, as the vendor sends them.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    device_identifier_collection: [DeviceId; 1],
    data_usage: String,
    sms_usage: String,
    mo_sms: String,
    mt_sms: String,
    start_date: String,
    end_date: String,
}

#[derive(Debug, Clone, Serialize)]
struct DeviceId {
    id: String,
    kind: &'static str,
}

/// A message's content, before the per-attempt envelope.
#[derive(Debug, Clone)]
pub enum Content {
    Data(Vec<Record>),
    Completion,
}

/// What is POSTed: the envelope around a message's content.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    username: &'a str,
    password: &'a str,
    request_id: &'a str,
    device_response: DeviceResponse<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<&'static str>,
    callback_count: u32,
    max_callback_threshold: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    device_promo_usage_response: Option<&'a [Record]>,
}

impl Content {
    /// The JSON body of delivery attempt `attempt` (1-based) to `registration`.
    pub fn body(
        &self,
        request_id: &str,
        registration: &Registration,
        attempt: u32,
    ) -> serde_json::Result<Vec<u8>> {
        let (records, comment) = match self {
            Content::Data(records) => (Some(records.as_slice()), None),
            Content::Completion => (None, Some(COMPLETION_COMMENT)),
        };
        serde_json::to_vec(&Envelope {
            username: registration.username.as_deref().unwrap_or("null"),
            password: registration.password.as_deref().unwrap_or("null"),
            request_id,
            device_response: DeviceResponse {
                device_promo_usage_response: records,
            },
            comment,
            callback_count: attempt,
            max_callback_threshold: MAX_ATTEMPTS,
        })
    }
}

/// The vendor's callback date form: `2021-08-15T00:00:00.0000000`, UTC, no offset.
pub fn vendor_date(t: DateTime<Utc>) -> String {
    format!(
        "{}.{:07}",
        t.format("%Y-%m-%dT%H:%M:%S"),
        t.timestamp_subsec_nanos() / 100
    )
}

/// The messages for `job`: data messages (per device or batched; ICCIDs without usage get no record),
/// then the completion message. Dirty values are applied here; drops and copies are the dispatcher's.
pub fn build_messages(
    config: &SimConfig,
    job: &Job,
    rng: &mut Rng,
    counters: &Counters,
) -> Vec<Content> {
    let request = &job.request;
    let (start_date, end_date) = (vendor_date(request.start), vendor_date(request.end));
    let records: Vec<Record> = request
        .iccids
        .iter()
        .filter_map(|iccid| {
            let usage = usage_for(iccid, request.start, request.end)?;
            let data_usage = if rng.chance(config.dirty_fraction) {
                bump(&counters.records_dirtied);
                rng.dirty_value().to_owned()
            } else {
                usage.data_bytes.to_string()
            };
            Some(Record {
                device_identifier_collection: [DeviceId {
                    id: iccid.clone(),
                    kind: "ICCID",
                }],
                data_usage,
                sms_usage: usage.sms.to_string(),
                mo_sms: usage.mo_sms.to_string(),
                mt_sms: usage.mt_sms.to_string(),
                start_date: start_date.clone(),
                end_date: end_date.clone(),
            })
        })
        .collect();
    let per_message = match config.callback_mode {
        CallbackMode::PerDevice => 1,
        CallbackMode::Batched => usize::try_from(config.callback_batch_size)
            .unwrap_or(usize::MAX)
            .max(1),
    };
    let mut messages: Vec<Content> = records
        .chunks(per_message)
        .map(|chunk| Content::Data(chunk.to_vec()))
        .collect();
    messages.push(Content::Completion);
    add(&counters.callback_messages, messages.len() as u64);
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn job(n: u32) -> Job {
        let day = |d| {
            Utc.with_ymd_and_hms(2021, 8, d, 0, 0, 0)
                .single()
                .expect("date")
        };
        Job {
            request_id: "595f5c44-c31c-4552-8670-020a1545a84d".into(),
            seq: 0,
            request: PromoRequest {
                account: "0000123456-00001".into(),
                iccids: (0..n).map(|i| format!("8914800000{i:010}")).collect(),
                start: day(15),
                end: day(16),
            },
        }
    }

    #[test]
    fn completion_matches_the_sample_shape() {
        let reg = Registration {
            url: "http://x".into(),
            username: None,
            password: None,
        };
        let body = Content::Completion
            .body("595f5c44-c31c-4552-8670-020a1545a84d", &reg, 1)
            .expect("serializes");
        let got: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let want = serde_json::json!({
            "username": "null", "password": "null",
            "requestId": "595f5c44-c31c-4552-8670-020a1545a84d",
            "deviceResponse": {}, "comment": "Request Completed Processing",
            "callbackCount": 1, "maxCallbackThreshold": 4
        });
        assert_eq!(got, want);
    }

    #[test]
    fn vendor_date_has_seven_fraction_digits_and_no_offset() {
        let t = Utc
            .with_ymd_and_hms(2021, 8, 15, 0, 0, 0)
            .single()
            .expect("date");
        assert_eq!(vendor_date(t), "2021-08-15T00:00:00.0000000");
    }

    #[test]
    fn batches_hold_at_most_the_batch_size() {
        let config = SimConfig {
            callback_mode: CallbackMode::Batched,
            callback_batch_size: 7,
            ..SimConfig::default()
        };
        let messages = build_messages(&config, &job(40), &mut Rng::new(1), &Counters::default());
        let sizes: Vec<usize> = messages
            .iter()
            .filter_map(|m| match m {
                Content::Data(r) => Some(r.len()),
                Content::Completion => None,
            })
            .collect();
        assert!(sizes.iter().all(|&n| (1..=7).contains(&n)), "{sizes:?}");
        assert!(matches!(messages.last(), Some(Content::Completion)));
    }
}
