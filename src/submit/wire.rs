//! The vendor's wire shapes for the calls tsusage makes: every field name in one place.
//!
//! The request body follows the vendor's example (`deviceIds[{kind,id}]`, `accountName`), not the
//! page's field table (`deviceId[{kind,value}]`) nor the generated SDK (`accountId`): the example is
//! what the endpoint is documented to accept.

use serde::de::DeserializeOwned;
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

/// One entry of `GET /m2m/v1/callbacks/{account}` (`data/vendor/callback_list.json`).
///
/// The page spells it `{"accountName","serviceName","url","username","password"}`; other ThingSpace
/// APIs' list pages spell it `{"aname","name","url"}`: both are read, `serviceName` and `accountName`
/// preferred when both spellings appear. The echoed `username`/`password` are deliberately not read,
/// so nothing can print or log them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "Spelled")]
pub struct RegisteredCallback {
    #[serde(rename = "accountName")]
    pub account_name: Option<String>,
    #[serde(rename = "serviceName")]
    pub service_name: String,
    pub url: String,
}

/// A callback entry or answer as received, in either spelling (`serviceName`/`name`,
/// `accountName`/`aname`); list entries also carry the `url`.
#[derive(Deserialize)]
struct Spelled {
    #[serde(rename = "accountName", default)]
    account_name: Option<String>,
    #[serde(default)]
    aname: Option<String>,
    #[serde(rename = "serviceName", default)]
    service_name: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

impl Spelled {
    /// `(account, service)`, `serviceName` preferred.
    fn names(self) -> Result<(Option<String>, String, Option<String>), &'static str> {
        let service = self
            .service_name
            .or(self.name)
            .ok_or(MISSING_SERVICE_NAME)?;
        Ok((self.account_name.or(self.aname), service, self.url))
    }
}

impl TryFrom<Spelled> for RegisteredCallback {
    type Error = &'static str;

    fn try_from(listed: Spelled) -> Result<Self, Self::Error> {
        let (account_name, service_name, url) = listed.names()?;
        Ok(RegisteredCallback {
            account_name,
            service_name,
            url: url.ok_or("missing field `url`")?,
        })
    }
}

/// The answer of register and of delete (`data/vendor/callback_register.json`, `callback_delete.json`):
/// `{"accountName","serviceName"}`, read in either spelling like [`RegisteredCallback`].
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "Spelled")]
pub struct CallbackAck {
    pub account_name: Option<String>,
    pub service_name: String,
}

impl TryFrom<Spelled> for CallbackAck {
    type Error = &'static str;

    fn try_from(acked: Spelled) -> Result<Self, Self::Error> {
        let (account_name, service_name, _) = acked.names()?;
        Ok(CallbackAck {
            account_name,
            service_name,
        })
    }
}

const MISSING_SERVICE_NAME: &str = "missing field `serviceName` (or `name`)";

/// Parses a vendor answer: strictly, and when that fails, once more without trailing commas.
///
/// The vendor's own example of the usage answer is `{"requestId": "…",}` (see
/// `data/vendor/usage_accepted.json`): an answer shaped like the documentation is accepted. The error is
/// the strict parse's.
///
/// ```
/// use tsusage::submit::wire::{RequestAccepted, parse_answer};
/// let ok: RequestAccepted = parse_answer(br#"{"requestId": "r1",}"#).unwrap();
/// assert_eq!(ok.request_id, "r1");
/// ```
pub fn parse_answer<T: DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(body).or_else(|strict| match without_trailing_commas(body) {
        Some(relaxed) => serde_json::from_slice(&relaxed).map_err(|_| strict),
        None => Err(strict),
    })
}

/// `text` without the commas that stand before a `}` or `]` (whitespace between allowed), outside
/// strings; `None` when there is none.
fn without_trailing_commas(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped, mut removed) = (false, false, false);
    for (i, &b) in text.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b',' {
            let next = text[i + 1..].iter().find(|c| !c.is_ascii_whitespace());
            if matches!(next, Some(b'}' | b']')) {
                removed = true;
                continue;
            }
        }
        out.push(b);
    }
    removed.then_some(out)
}

/// The answer of `POST /m2m/v1/devices/usage/actions/promoaggregateusage`.
pub fn parse_request_accepted(body: &[u8]) -> Result<RequestAccepted, serde_json::Error> {
    parse_answer(body)
}

/// The answer of register or delete.
pub fn parse_callback_ack(body: &[u8]) -> Result<CallbackAck, serde_json::Error> {
    parse_answer(body)
}

/// The answer of `GET /m2m/v1/callbacks/{account}`. An empty (or whitespace-only) body means that no
/// callback is registered: the page says so.
pub fn parse_callback_list(body: &[u8]) -> Result<Vec<RegisteredCallback>, serde_json::Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    parse_answer(body)
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
    fn accepts_the_vendors_usage_answer_with_its_trailing_comma() {
        let page = include_bytes!("../../data/vendor/usage_accepted.json");
        assert!(serde_json::from_slice::<serde_json::Value>(page).is_err());
        let accepted = parse_request_accepted(page).expect("the documented example");
        assert_eq!(accepted.request_id, "595f5c44-c31c-4552-8670-020a1545a84d");
    }

    #[test]
    fn trailing_commas_are_dropped_only_outside_strings() {
        let text = br#"{"a": "x,}", "b": [1, 2 , ], "c": "\",]" ,}"#;
        let relaxed = without_trailing_commas(text).expect("two commas to drop");
        assert_eq!(relaxed, br#"{"a": "x,}", "b": [1, 2  ], "c": "\",]" }"#);
        assert_eq!(
            without_trailing_commas(br#"{"a": [1, 2], "b": ",}"}"#),
            None
        );
    }

    #[test]
    fn a_body_still_invalid_without_trailing_commas_keeps_the_strict_error() {
        let strict = serde_json::from_slice::<RequestAccepted>(b"{\"requestId\": ,}")
            .expect_err("invalid")
            .to_string();
        let ours = parse_request_accepted(b"{\"requestId\": ,}")
            .expect_err("invalid")
            .to_string();
        assert_eq!(ours, strict);
    }

    #[test]
    fn callback_list_reads_both_spellings_and_an_empty_body() {
        assert_eq!(parse_callback_list(b"").expect("empty"), vec![]);
        assert_eq!(parse_callback_list(b" \r\n").expect("blank"), vec![]);
        let want = vec![RegisteredCallback {
            account_name: Some("0000123456-00001".into()),
            service_name: "DeviceUsage".into(),
            url: "https://x/cb".into(),
        }];
        let vendor = br#"[{"accountName":"0000123456-00001","serviceName":"DeviceUsage","url":"https://x/cb","username":"","password":""}]"#;
        assert_eq!(parse_callback_list(vendor).expect("serviceName"), want);
        let other = br#"[{"aname":"0000123456-00001","name":"DeviceUsage","url":"https://x/cb"}]"#;
        assert_eq!(parse_callback_list(other).expect("name"), want);
        let both = br#"[{"accountName":"0000123456-00001","serviceName":"DeviceUsage","name":"Other","url":"https://x/cb"}]"#;
        assert_eq!(parse_callback_list(both).expect("both"), want);
        let neither = parse_callback_list(br#"[{"url":"https://x/cb"}]"#).expect_err("no name");
        assert!(neither.to_string().contains("serviceName"), "{neither}");
    }

    #[test]
    fn register_and_delete_answers_read_in_both_spellings() {
        let want = CallbackAck {
            account_name: Some("0000123456-00001".into()),
            service_name: "DeviceUsage".into(),
        };
        let vendor = br#"{"accountName":"0000123456-00001","serviceName":"DeviceUsage"}"#;
        assert_eq!(parse_callback_ack(vendor).expect("serviceName"), want);
        let other = br#"{"aname":"0000123456-00001","name":"DeviceUsage"}"#;
        assert_eq!(parse_callback_ack(other).expect("name"), want);
        assert!(parse_callback_ack(b"").is_err());
    }

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
            serde_json::from_str(include_str!("../../data/vendor/usage_request.json"))
                .expect("sample");
        assert_eq!(ours, sample);
    }
}
