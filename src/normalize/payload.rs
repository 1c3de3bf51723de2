//! The one callback parser: a JSON body → credentials stripped → [`Callback`] (usage, completion, fault).
//!
//! Both callback sources (the HTTP listener and the drop directory) and the journal replay go through
//! [`strip_credentials`] and [`parse_callback`], so a payload means the same thing wherever it came from.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::record::{Records, TypedRecord};

/// The echoed registration credentials: removed before anything rests on disk.
pub const CREDENTIAL_KEYS: &[&str] = &["username", "password"];

/// Longest accepted requestId.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Why a whole body was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("not a callback: the top level is not a JSON object")]
    NotObject,
    #[error("duplicate key `{0}` at the top level")]
    DuplicateKey(String),
    #[error("not a callback: {0}")]
    NotCallback(String),
}

impl BodyError {
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::Json(_) => "body_not_json",
            BodyError::NotObject => "body_not_object",
            BodyError::DuplicateKey(_) => "body_duplicate_key",
            BodyError::NotCallback(_) => "body_not_callback",
        }
    }
}

/// The top-level members of a JSON object, in order, values kept as raw text.
struct TopLevel<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for TopLevel<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if members.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format_args!("\u{0}dup:{key}")));
                    }
                    let value: &'de RawValue = map.next_value()?;
                    members.push((key, value));
                }
                Ok(TopLevel(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON object body read once: its top-level members, values kept as raw text.
///
/// Stripping the credentials and recognizing the callback both work from these members, so a body
/// is scanned once at the top level whatever is asked of it.
#[derive(Debug)]
pub struct Body<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> Body<'a> {
    /// Reads the top level of `text`: it must be a JSON object without duplicate keys.
    pub fn parse(text: &'a str) -> Result<Body<'a>, BodyError> {
        let top: TopLevel<'a> = serde_json::from_str(text).map_err(|e| {
            let message = e.to_string();
            if let Some(key) = message.strip_prefix("\u{0}dup:") {
                let key = key.split(" at line").next().unwrap_or(key);
                BodyError::DuplicateKey(key.to_owned())
            } else if e.classify() == serde_json::error::Category::Data {
                BodyError::NotObject
            } else {
                BodyError::Json(message)
            }
        })?;
        Ok(Body { members: top.0 })
    }

    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// A top-level string member (`username`, `password`), decoded; `None` when absent or not a string.
    pub fn string(&self, key: &str) -> Option<Cow<'a, str>> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }

    /// The body without the top-level `username` and `password`: what the journal stores. Every other
    /// member is kept byte for byte.
    pub fn stripped(&self) -> String {
        let size: usize = self
            .members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = String::with_capacity(size + 2);
        out.push('{');
        for (key, value) in self
            .members
            .iter()
            .filter(|(k, _)| !CREDENTIAL_KEYS.contains(&k.as_ref()))
        {
            if out.len() > 1 {
                out.push(',');
            }
            // Serializing a str cannot fail.
            out.push_str(&serde_json::to_string(key.as_ref()).unwrap_or_default());
            out.push(':');
            out.push_str(value.get());
        }
        out.push('}');
        out
    }

    /// The usage records read one by one (never the one-pass typed reading): for checking that both
    /// readings agree. `None` when there is no record list.
    pub fn raw_records(&self) -> Option<Vec<&'a RawValue>> {
        let text = self.get("deviceResponse")?.get();
        serde_json::from_str::<DeviceResponse<&'a RawValue>>(text)
            .ok()?
            .records
    }

    /// Recognizes the callback: usage, completion or fault.
    pub fn callback(&self) -> Result<Callback<'a>, BodyError> {
        let request_id = match self.get("requestId") {
            None => return Err(BodyError::NotCallback("no requestId".into())),
            Some(raw) => match serde_json::from_str::<Cow<'a, str>>(raw.get()) {
                Ok(id) if valid_request_id(&id) => id,
                _ => {
                    return Err(BodyError::NotCallback(
                        "requestId is not a non-empty string of printable characters".into(),
                    ));
                }
            },
        };
        let callback_count = self.get("callbackCount").and_then(|raw| {
            serde_json::from_str::<u32>(raw.get()).ok().or_else(|| {
                serde_json::from_str::<&str>(raw.get())
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
        });
        let fault = self.get("faultResponse").filter(|f| f.get() != "null");
        let kind = match (self.get("deviceResponse"), fault) {
            (_, Some(fault)) => {
                let fault: WireFault = serde_json::from_str(fault.get())
                    .map_err(|_| BodyError::NotCallback("faultResponse is not an object".into()))?;
                let text = |v: Option<serde_json::Value>| match v {
                    Some(serde_json::Value::String(s)) => Some(s),
                    Some(serde_json::Value::Null) | None => None,
                    Some(other) => Some(other.to_string()),
                };
                CallbackKind::Fault {
                    code: text(fault.faultcode),
                    message: text(fault.faultstring),
                }
            }
            (Some(device_response), None) => {
                let text = device_response.get();
                // One typed pass when every record has the usual shape; otherwise record by record.
                let (records, other) = match serde_json::from_str::<DeviceResponse<TypedRecord<'a>>>(
                    text,
                ) {
                    Ok(typed) => (typed.records.map(Records::Typed), typed.other),
                    Err(_) => {
                        let raw = serde_json::from_str::<DeviceResponse<&'a RawValue>>(text)
                                .map_err(|_| {
                                    BodyError::NotCallback(
                                        "deviceResponse is not an object with a devicePromoUsageResponse list"
                                            .into(),
                                    )
                                })?;
                        (raw.records.map(Records::Raw), raw.other)
                    }
                };
                match records {
                    Some(records) => CallbackKind::Usage(records),
                    None if other.is_empty() => CallbackKind::Completion,
                    None => {
                        return Err(BodyError::NotCallback(format!(
                            "deviceResponse holds {} but no devicePromoUsageResponse",
                            other.join(", ")
                        )));
                    }
                }
            }
            (None, None) => {
                return Err(BodyError::NotCallback(
                    "neither deviceResponse nor faultResponse".into(),
                ));
            }
        };
        Ok(Callback {
            request_id,
            callback_count,
            kind,
        })
    }
}

/// Removes the top-level `username` and `password` members and returns the body to journal.
///
/// ```
/// use tsusage::normalize::payload::strip_credentials;
/// let body = r#"{"username":"u","password":"p","requestId":"r1","deviceResponse":{}}"#;
/// assert_eq!(strip_credentials(body).unwrap(), r#"{"requestId":"r1","deviceResponse":{}}"#);
/// ```
pub fn strip_credentials(body: &str) -> Result<String, BodyError> {
    Body::parse(body).map(|b| b.stripped())
}

/// A recognized callback.
#[derive(Debug)]
pub struct Callback<'a> {
    pub request_id: Cow<'a, str>,
    /// Delivery attempt (1 for the first); redeliveries carry higher numbers.
    pub callback_count: Option<u32>,
    pub kind: CallbackKind<'a>,
}

/// What a callback says.
#[derive(Debug)]
pub enum CallbackKind<'a> {
    /// Usage records (`deviceResponse.devicePromoUsageResponse[]`), each still raw: a bad record is
    /// rejected on its own by [`super::record::parse_record`] while the rest of the callback lands.
    Usage(Records<'a>),
    /// "Request Completed Processing": `deviceResponse` is empty.
    Completion,
    /// `faultResponse`: the vendor could not process the request.
    Fault {
        code: Option<String>,
        message: Option<String>,
    },
}

impl CallbackKind<'_> {
    /// A short name for the journal and for counting.
    pub fn name(&self) -> &'static str {
        match self {
            CallbackKind::Usage(_) => "usage",
            CallbackKind::Completion => "completion",
            CallbackKind::Fault { .. } => "fault",
        }
    }
}

/// `deviceResponse`: its record list (`R` raw or typed) and the names of any other members.
struct DeviceResponse<R> {
    records: Option<Vec<R>>,
    other: Vec<String>,
}

impl<'de, R: Deserialize<'de>> Deserialize<'de> for DeviceResponse<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<R>(std::marker::PhantomData<R>);
        impl<'de, R: Deserialize<'de>> Visitor<'de> for V<R> {
            type Value = DeviceResponse<R>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut records, mut seen) = (None, false);
                let mut other = Vec::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "devicePromoUsageResponse" {
                        if seen {
                            return Err(de::Error::duplicate_field("devicePromoUsageResponse"));
                        }
                        seen = true;
                        records = map.next_value::<Option<Vec<R>>>()?;
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                        other.push(key.into_owned());
                    }
                }
                Ok(DeviceResponse { records, other })
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct WireFault {
    #[serde(default)]
    faultcode: Option<serde_json::Value>,
    #[serde(default)]
    faultstring: Option<serde_json::Value>,
}

/// Recognizes a (credential-stripped or raw) callback body.
///
/// ```
/// use tsusage::normalize::payload::{parse_callback, CallbackKind};
/// let cb = parse_callback(r#"{"requestId":"r1","deviceResponse":{},"comment":"Request Completed Processing"}"#).unwrap();
/// assert_eq!(cb.request_id, "r1");
/// assert!(matches!(cb.kind, CallbackKind::Completion));
/// ```
pub fn parse_callback(body: &str) -> Result<Callback<'_>, BodyError> {
    Body::parse(body)?.callback()
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && !id.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: &str = include_str!("../../data/vendor/callback_usage.json");
    const COMPLETION: &str = include_str!("../../data/vendor/callback_completion.json");

    #[test]
    fn strips_only_the_credentials() {
        let stripped = strip_credentials(USAGE).expect("sample is an object");
        assert!(!stripped.contains("username") && !stripped.contains("password"));
        let original: serde_json::Value = serde_json::from_str(USAGE).expect("json");
        let mut expected = original.as_object().cloned().expect("object");
        expected.remove("username");
        expected.remove("password");
        let got: serde_json::Value = serde_json::from_str(&stripped).expect("still json");
        assert_eq!(got, serde_json::Value::Object(expected));
    }

    #[test]
    fn recognizes_the_vendor_samples() {
        let usage = parse_callback(USAGE).expect("usage sample");
        assert_eq!(usage.request_id, "595f5c44-c31c-4552-8670-020a1545a84d");
        assert_eq!(usage.callback_count, Some(1));
        assert!(matches!(usage.kind, CallbackKind::Usage(ref r) if r.len() == 1));
        let done = parse_callback(COMPLETION).expect("completion sample");
        assert!(matches!(done.kind, CallbackKind::Completion));
    }

    #[test]
    fn recognizes_fault_responses() {
        let body = r#"{"requestId":"r9","faultResponse":{"faultcode":"REQUEST_FAILED.UnexpectedError","faultstring":"boom","status":"Failed"}}"#;
        let cb = parse_callback(body).expect("fault");
        let CallbackKind::Fault { code, message } = cb.kind else {
            panic!("not a fault: {:?}", cb.kind);
        };
        assert_eq!(code.as_deref(), Some("REQUEST_FAILED.UnexpectedError"));
        assert_eq!(message.as_deref(), Some("boom"));
    }

    #[test]
    fn rejects_bodies_that_are_not_callbacks() {
        let cases: &[(&str, &str)] = &[
            ("{\"requestId\":", "body_not_json"),
            ("[1,2]", "body_not_object"),
            ("\"text\"", "body_not_object"),
            (r#"{"deviceResponse":{}}"#, "body_not_callback"),
            (
                r#"{"requestId":"","deviceResponse":{}}"#,
                "body_not_callback",
            ),
            (
                r#"{"requestId":42,"deviceResponse":{}}"#,
                "body_not_callback",
            ),
            (r#"{"requestId":"r"}"#, "body_not_callback"),
            (
                r#"{"requestId":"r","deviceResponse":{"other":[]}}"#,
                "body_not_callback",
            ),
        ];
        for (body, code) in cases {
            let err = strip_credentials(body).and_then(|s| parse_callback(&s).map(|_| ()));
            assert_eq!(err.map_err(|e| e.code()), Err(*code), "for {body}");
        }
        let dup = strip_credentials(r#"{"requestId":"a","requestId":"b"}"#);
        assert_eq!(dup, Err(BodyError::DuplicateKey("requestId".into())));
    }
}
