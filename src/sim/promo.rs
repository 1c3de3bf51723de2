//! `POST /m2m/v1/devices/usage/actions/promoaggregateusage`: faults, checks and validation, in the
//! order a gateway and then the API would apply them, and the hand-off of accepted requests.
//!
//! Order: arrival (counted, in flight) → `latency_ms` → bearer (401) → throttle (429) →
//! `error_5xx_fraction` (503) → session (400) → body validation (400) → 200 `{"requestId"}`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::auth::uuid_v4;
use super::callbacks::Job;
use super::reply::{ACCOUNT_NOT_FOUND, ApiError, BAD_REQUEST, json_problem};
use super::server::Shared;
use super::stats::{add, bump};
use super::{SimConfig, lock};

/// Empty `accountName`.
pub const ACCOUNT_NOT_DEFINED: &str = "INPUT_INVALID.Account.NotDefined";
/// A device whose `kind` is not `iccid` or whose `id` is not 19–20 ASCII digits.
pub const DEVICE_INVALID: &str = "INPUT_INVALID.Device.Identifier.Invalid";
/// No devices, or more than `sim.max_devices`.
pub const NUMBER_OF_DEVICES: &str = "INPUT_INVALID.NumberofDevices";
/// An unparsable `startTime`/`endTime`, or `startTime` not before `endTime` (our name).
pub const DATE_INVALID: &str = "INPUT_INVALID.Date.Invalid";
/// A window longer than `sim.max_window_days` (our name).
pub const DATE_RANGE_EXCEEDED: &str = "INPUT_INVALID.Date.RangeExceeded";

/// A validated promo request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromoRequest {
    pub account: String,
    /// ICCIDs in request order, repeats removed.
    pub iccids: Vec<String>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

pub async fn promo_aggregate_usage(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let elapsed_ms = u64::try_from(sim.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    sim.counters.promo_arrived(elapsed_ms);
    let _in_flight = sim.counters.promo_in_flight();
    if sim.config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sim.config.latency_ms)).await;
    }
    let response = match answer(&sim, &headers, &body).await {
        Ok(request_id) => Json(json!({ "requestId": request_id })).into_response(),
        Err(e) => e.into_response(),
    };
    let c = &sim.counters;
    match response.status() {
        StatusCode::OK => bump(&c.promo_accepted),
        StatusCode::TOO_MANY_REQUESTS => {
            c.promo_throttled(u64::try_from(sim.started.elapsed().as_millis()).unwrap_or(u64::MAX))
        }
        StatusCode::BAD_REQUEST => bump(&c.promo_rejected_400),
        StatusCode::UNAUTHORIZED => bump(&c.promo_rejected_401),
        s if s.is_server_error() => bump(&c.promo_rejected_5xx),
        _ => {}
    }
    response
}

/// The requestId of an accepted request, or why it is refused.
async fn answer(sim: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<String, ApiError> {
    sim.check_bearer(headers)?;
    if !lock(&sim.throttle).admit(Instant::now()) {
        return Err(ApiError::Throttled {
            retry_after_secs: sim.config.retry_after_secs,
        });
    }
    if lock(&sim.faults).chance(sim.config.error_5xx_fraction) {
        return Err(ApiError::Unavailable);
    }
    sim.check_session(headers)?;
    let request = validate(&sim.config, body)?;
    sim.counters.promo_accepted_request(
        u64::try_from(sim.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        request.start.format("%Y-%m-%d").to_string(),
        request.iccids.first().cloned().unwrap_or_default(),
        request.iccids.len(),
    );
    let request_id = uuid_v4(&mut lock(&sim.ids));
    let seq = sim.next_seq.fetch_add(1, Ordering::Relaxed);
    add(
        &sim.counters.promo_devices_accepted,
        request.iccids.len() as u64,
    );
    tracing::debug!(
        request_id = %request_id,
        devices = request.iccids.len(),
        "sim: promo request accepted"
    );
    let job = Job {
        request_id: request_id.clone(),
        seq,
        request,
    };
    if sim.jobs.send(job).await.is_err() {
        tracing::warn!("sim: callback dispatcher has stopped");
        return Err(ApiError::Unavailable);
    }
    Ok(request_id)
}

/// Validates a request body as the vendor's example gives it (`data/vendor/usage_request.json`).
pub fn validate(config: &SimConfig, body: &[u8]) -> Result<PromoRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::vendor(BAD_REQUEST, json_problem(&e)))?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::vendor(BAD_REQUEST, "body must be a JSON object"));
    };
    let text = |field: &'static str| -> Result<&str, ApiError> {
        object.get(field).and_then(Value::as_str).ok_or_else(|| {
            ApiError::vendor(BAD_REQUEST, format!("{field} is missing or not a string"))
        })
    };
    let account = text("accountName")?;
    if account.trim().is_empty() {
        return Err(ApiError::vendor(
            ACCOUNT_NOT_DEFINED,
            "accountName is not defined",
        ));
    }
    if !config.accounts.is_empty() && !config.accounts.iter().any(|a| a == account) {
        return Err(ApiError::vendor(ACCOUNT_NOT_FOUND, "Account not found"));
    }
    let Some(devices) = object.get("deviceIds").and_then(Value::as_array) else {
        return Err(ApiError::vendor(
            BAD_REQUEST,
            "deviceIds is missing or not a list",
        ));
    };
    let max = usize::try_from(config.max_devices).unwrap_or(usize::MAX);
    if devices.is_empty() || devices.len() > max {
        return Err(ApiError::vendor(
            NUMBER_OF_DEVICES,
            format!(
                "{} devices: a request holds 1 to {max} devices",
                devices.len()
            ),
        ));
    }
    let mut iccids: Vec<String> = Vec::with_capacity(devices.len());
    let mut seen = std::collections::HashSet::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        let field = |name: &str| device.get(name).and_then(Value::as_str);
        let (Some(kind), Some(id)) = (field("kind"), field("id")) else {
            return Err(ApiError::vendor(
                BAD_REQUEST,
                format!("deviceIds[{i}] needs string fields kind and id"),
            ));
        };
        if !kind.eq_ignore_ascii_case("iccid") {
            return Err(ApiError::vendor(
                DEVICE_INVALID,
                format!("deviceIds[{i}]: kind must be iccid"),
            ));
        }
        if !(19..=20).contains(&id.len()) || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::vendor(
                DEVICE_INVALID,
                format!("deviceIds[{i}]: an ICCID is 19 or 20 digits"),
            ));
        }
        if seen.insert(id) {
            iccids.push(id.to_owned());
        }
    }
    let time = |field: &'static str| -> Result<DateTime<Utc>, ApiError> {
        let raw = text(field)?;
        DateTime::parse_from_rfc3339(raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                ApiError::vendor(
                    DATE_INVALID,
                    format!("{field} is not a date-time like 2021-08-15T00:00:00Z"),
                )
            })
    };
    let (start, end) = (time("startTime")?, time("endTime")?);
    if start >= end {
        return Err(ApiError::vendor(
            DATE_INVALID,
            "startTime must be before endTime",
        ));
    }
    if end - start > chrono::Duration::days(i64::from(config.max_window_days)) {
        return Err(ApiError::vendor(
            DATE_RANGE_EXCEEDED,
            format!(
                "the window may span at most {} days",
                config.max_window_days
            ),
        ));
    }
    Ok(PromoRequest {
        account: account.to_owned(),
        iccids,
        start,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> String {
        match validate(&SimConfig::default(), body.as_bytes()) {
            Ok(_) => "ok".to_owned(),
            Err(ApiError::Vendor { code, .. }) => code.to_owned(),
            Err(other) => format!("{other:?}"),
        }
    }

    fn body(account: &str, devices: &str, start: &str, end: &str) -> String {
        format!(
            r#"{{"accountName":"{account}","deviceIds":{devices},"startTime":"{start}","endTime":"{end}"}}"#
        )
    }

    const DEV: &str = r#"[{"kind":"iccid","id":"89148000000800139708"}]"#;
    const S: &str = "2021-08-15T00:00:00Z";
    const E: &str = "2021-08-16T00:00:00Z";

    #[test]
    fn accepts_the_vendor_example() {
        let sample = r#"{"accountName":"0000123456-00001","deviceIds":[{"kind":"iccid","id":"89148000000800139708"}],"startTime":"2021-08-15T00:00:00Z","endTime":"2021-08-16T00:00:00Z"}"#;
        let r = validate(&SimConfig::default(), sample.as_bytes()).expect("valid");
        assert_eq!(r.account, "0000123456-00001");
        assert_eq!(r.iccids, ["89148000000800139708"]);
    }

    #[test]
    fn each_problem_has_its_code() {
        assert_eq!(code("{"), BAD_REQUEST);
        assert_eq!(code(r#"{"deviceIds":[]}"#), BAD_REQUEST);
        assert_eq!(code(&body("", DEV, S, E)), ACCOUNT_NOT_DEFINED);
        assert_eq!(
            code(&body(
                "a",
                r#"[{"kind":"imei","id":"89148000000800139708"}]"#,
                S,
                E
            )),
            DEVICE_INVALID
        );
        assert_eq!(
            code(&body(
                "a",
                r#"[{"kind":"ICCID","id":"8914800000080013970"}]"#,
                S,
                E
            )),
            "ok"
        );
        assert_eq!(
            code(&body("a", r#"[{"kind":"iccid","id":"8.91480E+19"}]"#, S, E)),
            DEVICE_INVALID
        );
        assert_eq!(code(&body("a", "[]", S, E)), NUMBER_OF_DEVICES);
        assert_eq!(code(&body("a", DEV, E, S)), DATE_INVALID);
        assert_eq!(code(&body("a", DEV, "2021-08-15", E)), DATE_INVALID);
        assert_eq!(
            code(&body("a", DEV, S, "2021-09-16T00:00:00Z")),
            DATE_RANGE_EXCEEDED
        );
        assert_eq!(code(&body("a", DEV, S, "2021-09-15T00:00:00Z")), "ok");
    }

    #[test]
    fn repeated_iccids_are_kept_once() {
        let devices = r#"[{"kind":"iccid","id":"89148000000800139708"},{"kind":"iccid","id":"89148000000800139708"}]"#;
        let r =
            validate(&SimConfig::default(), body("a", devices, S, E).as_bytes()).expect("valid");
        assert_eq!(r.iccids.len(), 1);
    }
}
