//! The vendor's wire shapes for the calls tsusage makes: every field name in one place.
//!
//! The request body follows the vendor's example (`deviceIds[{kind,id}]`, `accountName`), not the
//! page's field table (`deviceId[{kind,value}]`) nor the generated SDK (`accountId`): the example is
//! what the endpoint is documented to accept.

use serde::{Deserialize, Serialize};

/// `POST /m2m/v1/devices/usage/actions/promoaggregateusage` body.
#[derive(Debug, Clone, Serialize)]
pub struct UsageRequest<'a> {
    #[serde(rename = "accountName")]
    pub account_name: &'a str,
    #[serde(rename = "deviceIds")]
    pub device_ids: Vec<DeviceId<'a>>,
    #[serde(rename = "startTime")]
    pub start_time: String,
    #[serde(rename = "endTime")]
    pub end_time: String,
}

/// One entry of `deviceIds`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceId<'a> {
    pub kind: &'static str,
    pub id: &'a str,
}

/// The identifier kind for ICCIDs, as the vendor's example writes it.
pub const KIND_ICCID: &str = "iccid";

/// `{"requestId": "..."}`
#[derive(Debug, Clone, Deserialize)]
pub struct RequestAccepted {
    #[serde(rename = "requestId")]
    pub request_id: String,
}

/// OAuth token response.
#[derive(Debug, Clone, Deserialize)]
pub struct OAuthToken {
    pub access_token: String,
    /// Seconds the token stays valid.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// `POST /m2m/v1/session/login` body.
#[derive(Serialize)]
pub struct LoginRequest<'a> {
    pub username: &'a str,
    pub password: &'a str,
}

impl std::fmt::Debug for LoginRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginRequest { [redacted] }")
    }
}

/// `{"sessionToken": "..."}`
#[derive(Debug, Clone, Deserialize)]
pub struct Session {
    #[serde(rename = "sessionToken")]
    pub session_token: String,
}

/// The M2M error shape: `{"errorCode": "...", "errorMessage": "..."}`.
#[derive(Debug, Clone, Deserialize)]
pub struct M2mError {
    #[serde(rename = "errorCode")]
    pub error_code: serde_json::Value,
    #[serde(rename = "errorMessage", default)]
    pub error_message: Option<String>,
}

/// The API gateway's error shape: `{"fault": {"code": 900901, "message": "..."}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct GatewayFault {
    pub fault: GatewayFaultBody,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GatewayFaultBody {
    pub code: serde_json::Value,
    #[serde(default)]
    pub message: Option<String>,
}

/// The error code that means "log in again".
pub const SESSION_EXPIRED_SUFFIX: &str = "SessionToken.Expired";

/// `POST /m2m/v1/callbacks/{account}` body.
#[derive(Serialize)]
pub struct RegisterCallback<'a> {
    pub name: &'a str,
    pub url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<&'a str>,
}

impl std::fmt::Debug for RegisterCallback<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterCallback")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("credentials", &"[redacted]")
            .finish()
    }
}

/// One entry of `GET /m2m/v1/callbacks/{account}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct RegisteredCallback {
    #[serde(rename = "accountName", default)]
    pub account_name: Option<String>,
    pub name: String,
    pub url: String,
}

/// The header carrying the M2M session token.
pub const SESSION_HEADER: &str = "VZ-M2M-Token";
/// OAuth lives below `{base_url}/ts/v1`, everything else below `{base_url}/m2m/v1`.
pub const OAUTH_TOKEN_PATH: &str = "/ts/v1/oauth2/token";
pub const LOGIN_PATH: &str = "/m2m/v1/session/login";
pub const LOGOUT_PATH: &str = "/m2m/v1/session/logout";
pub const USAGE_PATH: &str = "/m2m/v1/devices/usage/actions/promoaggregateusage";
pub const CALLBACKS_PATH: &str = "/m2m/v1/callbacks";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body_is_exactly_the_vendor_example() {
        let body = UsageRequest {
            account_name: "0000123456-00001",
            device_ids: vec![DeviceId {
                kind: KIND_ICCID,
                id: "89148000000800139708",
            }],
            start_time: "2021-08-15T00:00:00Z".into(),
            end_time: "2021-08-16T00:00:00Z".into(),
        };
        let ours = serde_json::to_value(&body).expect("serialize");
        let sample: serde_json::Value =
            serde_json::from_str(include_str!("../../data/vendor/usage_request.json")).expect("sample");
        assert_eq!(ours, sample);
    }
}
