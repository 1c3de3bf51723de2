//! The one callback parser: a JSON body → credentials stripped → [`Callback`] (usage, completion, fault).
//!
//! Both callback sources (the HTTP listener and the drop directory) and the journal replay go through
//! [`strip_credentials`] and [`parse_callback`], so a payload means the same thing wherever it came from.
//!
//! A body is read in one pass in the usual case: the top level with `deviceResponse` straight into
//! typed records and the small members kept as raw text. The hand-written reader ([`super::scan`])
//! tries first; at anything it was not written for it gives up and serde's one pass reads the body.
//! Anything unusual (a record of another shape, an escaped or duplicate top-level key, a body that
//! is not a JSON object) makes that pass fail too, and the body is read again the older way (top
//! level raw, then typed or record-by-record records), which also gives the errors: all readings
//! give the same results, the earlier ones are only faster.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::record::{Records, TypedRecord};
use super::scan::{Scan, is_ws};

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

/// The top level read in one pass: `deviceResponse` typed, every other member raw. Fails on anything
/// the older reading would treat differently or reject (escaped or duplicate keys included).
struct OnePass<'a> {
    members: Vec<(&'a str, &'a RawValue)>,
    device: Option<DeviceResponse<TypedRecord<'a>>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for OnePass<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OnePass<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members: Vec<(&'de str, &'de RawValue)> = Vec::with_capacity(6);
                let mut device = None;
                // A key written with escapes is not a borrowed str: the older reading takes it.
                while let Some(key) = map.next_key::<&'de str>()? {
                    if key == "deviceResponse" {
                        if device.is_some() {
                            return Err(de::Error::duplicate_field("deviceResponse"));
                        }
                        device = Some(map.next_value()?);
                    } else {
                        if members.iter().any(|(k, _)| *k == key) {
                            return Err(de::Error::custom("duplicate key"));
                        }
                        members.push((key, map.next_value()?));
                    }
                }
                Ok(OnePass { members, device })
            }
        }
        d.deserialize_map(V)
    }
}

/// The hand-written reading of the usual body ([`super::scan`]): what [`OnePass`] gives, faster,
/// or `None` (then serde reads it). `deviceResponse` must hold only `devicePromoUsageResponse`, a
/// list of records [`TypedRecord::scan`] reads; every other member is checked by serde_json.
fn scan_body(text: &str) -> Option<OnePass<'_>> {
    let mut scan = Scan::new(text);
    let mut members: Vec<(&str, &RawValue)> = Vec::with_capacity(6);
    let mut device = None;
    if !scan.open(b'{', b'}')? {
        loop {
            let key = scan.key()?;
            if key == "deviceResponse" {
                if device.is_some() {
                    return None;
                }
                device = Some(scan_device(&mut scan)?);
            } else {
                if members.iter().any(|(k, _)| *k == key) {
                    return None;
                }
                let raw: &RawValue = serde_json::from_str(scan.value_span()?).ok()?;
                members.push((key, raw));
            }
            if !scan.next_or(b'}')? {
                break;
            }
        }
    }
    scan.at_end().then_some(OnePass { members, device })
}

/// `deviceResponse` for [`scan_body`].
fn scan_device<'a>(scan: &mut Scan<'a>) -> Option<DeviceResponse<TypedRecord<'a>>> {
    let mut records = None;
    if !scan.open(b'{', b'}')? {
        loop {
            if scan.key()? != "devicePromoUsageResponse" || records.is_some() {
                return None;
            }
            let mut list = Vec::with_capacity(16);
            if !scan.open(b'[', b']')? {
                loop {
                    list.push(TypedRecord::scan(scan)?);
                    if !scan.next_or(b']')? {
                        break;
                    }
                }
            }
            records = Some(list);
            if !scan.next_or(b'}')? {
                break;
            }
        }
    }
    Some(DeviceResponse {
        records,
        other: Vec::new(),
    })
}

/// How a body was read.
#[derive(Debug)]
enum Read<'a> {
    /// In one pass: every member but `deviceResponse` raw (keys exactly as written), that one typed.
    /// `device` is `None` when there is no `deviceResponse`, or once it was taken.
    OnePass {
        members: Vec<(&'a str, &'a RawValue)>,
        device: Option<DeviceResponse<TypedRecord<'a>>>,
    },
    /// The older reading: every member raw, keys decoded.
    Raw(Vec<(Cow<'a, str>, &'a RawValue)>),
}

/// A JSON object body read once: its top-level members (values kept as raw text) and, in the usual
/// case, its usage records already typed.
///
/// Stripping the credentials and recognizing the callback both work from this reading, so a body
/// is scanned once whatever is asked of it.
#[derive(Debug)]
pub struct Body<'a> {
    text: &'a str,
    read: Read<'a>,
}

/// `deviceResponse` as [`Body::callback`] finds it.
enum Device<'a> {
    Typed(DeviceResponse<TypedRecord<'a>>),
    Raw(&'a RawValue),
}

impl<'a> Body<'a> {
    /// Reads `text`: it must be a JSON object without duplicate top-level keys.
    pub fn parse(text: &'a str) -> Result<Body<'a>, BodyError> {
        if let Some(OnePass { members, device }) = scan_body(text) {
            return Ok(Body {
                text,
                read: Read::OnePass { members, device },
            });
        }
        Body::parse_serde(text)
    }

    /// The readings [`Body::parse`] has when the hand-written one gives up: serde's one pass, then
    /// the older reading. Public for the fuzz harness, which checks the readings agree.
    #[doc(hidden)]
    pub fn parse_serde(text: &'a str) -> Result<Body<'a>, BodyError> {
        match serde_json::from_str::<OnePass<'a>>(text) {
            Ok(OnePass { members, device }) => Ok(Body {
                text,
                read: Read::OnePass { members, device },
            }),
            Err(_) => Body::parse_two_pass(text),
        }
    }

    /// The older reading, which [`Body::parse`] falls back to: the top level raw, records read
    /// later. Public for the fuzz harness, which checks both readings agree.
    #[doc(hidden)]
    pub fn parse_two_pass(text: &'a str) -> Result<Body<'a>, BodyError> {
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
        Ok(Body {
            text,
            read: Read::Raw(top.0),
        })
    }

    /// Whether the hand-written reading takes `text` (for tests and benchmarks).
    #[doc(hidden)]
    pub fn is_scanned(text: &str) -> bool {
        scan_body(text).is_some()
    }

    /// Whether the body was read in the one pass (for tests and the fuzz harness).
    #[doc(hidden)]
    pub fn is_one_pass(&self) -> bool {
        matches!(self.read, Read::OnePass { .. })
    }

    /// A raw top-level member. In the one-pass reading `deviceResponse` is not kept raw (`None`).
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        match &self.read {
            Read::OnePass { members, .. } => members.iter().find(|(k, _)| *k == key).map(|m| m.1),
            Read::Raw(members) => members.iter().find(|(k, _)| k == key).map(|m| m.1),
        }
    }

    /// A top-level string member (`username`, `password`), decoded; `None` when absent or not a string.
    pub fn string(&self, key: &str) -> Option<Cow<'a, str>> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }

    /// The body without the top-level `username` and `password`: what the journal stores. Every other
    /// byte is kept as received (see [`Body::stripped_text`]).
    pub fn stripped(&self) -> String {
        self.stripped_text().into_owned()
    }

    /// [`Body::stripped`], borrowing the body when it holds no credentials.
    ///
    /// Each credential member is cut out by its byte span: key, colon, value and one adjoining
    /// comma (the following one, or the preceding one for the last member), with any whitespace
    /// between those; everything else is kept as it was. When the text is not as expected (a key
    /// written with escapes), the body is rebuilt from its members instead, `{"key":value,...}`.
    pub fn stripped_text(&self) -> Cow<'a, str> {
        match self.credential_cuts() {
            Some(cuts) if cuts.is_empty() => Cow::Borrowed(self.text),
            Some(cuts) => {
                let removed: usize = cuts.iter().map(|c| c.len()).sum();
                let mut out = String::with_capacity(self.text.len() - removed);
                let mut at = 0;
                for cut in cuts {
                    out.push_str(&self.text[at..cut.start]);
                    at = cut.end;
                }
                out.push_str(&self.text[at..]);
                Cow::Owned(out)
            }
            None => Cow::Owned(self.rebuilt()),
        }
    }

    /// The byte ranges of `text` that stripping cuts out, in order; empty when there are no
    /// credentials; `None` when the spans cannot be found as expected (then the body is rebuilt).
    #[doc(hidden)]
    pub fn credential_cuts(&self) -> Option<Vec<Range<usize>>> {
        let values: Vec<(&str, &RawValue)> = CREDENTIAL_KEYS
            .iter()
            .filter_map(|k| Some((*k, self.get(k)?)))
            .collect();
        if values.is_empty() {
            return Some(Vec::new());
        }
        credential_cuts(self.text, &values)
    }

    /// Today's rebuild: `{"key":value,...}` without the credentials, values byte for byte.
    fn rebuilt(&self) -> String {
        let members = match &self.read {
            Read::Raw(members) => members,
            // The one pass kept no raw deviceResponse: read the top level raw (rare: only when
            // the spans were not as expected).
            Read::OnePass { .. } => {
                return Body::parse_two_pass(self.text)
                    .map(|b| b.rebuilt())
                    .unwrap_or_default();
            }
        };
        let size: usize = members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = String::with_capacity(size + 2);
        out.push('{');
        for (key, value) in members
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
        if let Read::OnePass { .. } = self.read {
            return Body::parse_two_pass(self.text).ok()?.raw_records();
        }
        let text = self.get("deviceResponse")?.get();
        serde_json::from_str::<DeviceResponse<&'a RawValue>>(text)
            .ok()?
            .records
    }

    /// Recognizes the callback: usage, completion or fault. After the one-pass reading this copies
    /// the typed records (borrowed text is not copied); [`Body::into_callback`] moves them.
    pub fn callback(&self) -> Result<Callback<'a>, BodyError> {
        let device = match &self.read {
            Read::OnePass { device, .. } => device.clone().map(Device::Typed),
            Read::Raw(_) => self.get("deviceResponse").map(Device::Raw),
        };
        self.recognize(device)
    }

    /// [`Body::callback`], without copying the typed records.
    pub fn into_callback(mut self) -> Result<Callback<'a>, BodyError> {
        let device = self.take_device();
        self.recognize(device)
    }

    /// [`Body::callback`] and [`Body::stripped_text`] at once, without copying the typed records.
    pub fn into_callback_stripped(mut self) -> Result<(Callback<'a>, Cow<'a, str>), BodyError> {
        let device = self.take_device();
        let callback = self.recognize(device)?;
        Ok((callback, self.stripped_text()))
    }

    fn take_device(&mut self) -> Option<Device<'a>> {
        match &mut self.read {
            Read::OnePass { device, .. } => device.take().map(Device::Typed),
            Read::Raw(_) => self.get("deviceResponse").map(Device::Raw),
        }
    }

    /// The top-level members as written (keys decoded), in order, from the older reading; `None`
    /// for a one-pass reading. For the fuzz harness.
    #[doc(hidden)]
    pub fn raw_members(&self) -> Option<Vec<(&str, &'a str)>> {
        match &self.read {
            Read::OnePass { .. } => None,
            Read::Raw(members) => {
                Some(members.iter().map(|(k, v)| (k.as_ref(), v.get())).collect())
            }
        }
    }

    fn recognize(&self, device: Option<Device<'a>>) -> Result<Callback<'a>, BodyError> {
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
        let kind = match (device, fault) {
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
            (Some(device), None) => {
                let (records, other) = match device {
                    Device::Typed(typed) => (typed.records.map(Records::Typed), typed.other),
                    Device::Raw(raw) => {
                        let text = raw.get();
                        // One typed pass when every record has the usual shape; otherwise record by record.
                        match serde_json::from_str::<DeviceResponse<TypedRecord<'a>>>(text) {
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
                        }
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

/// The cuts that remove the top-level members `values` (key, raw value) from `text`, in order.
/// `None` when something is not as expected: a value not inside `text`, a key not written as
/// `"key"` right before its colon, or separators other than whitespace, `,`, `{` and `}`.
fn credential_cuts(text: &str, values: &[(&str, &RawValue)]) -> Option<Vec<Range<usize>>> {
    let bytes = text.as_bytes();
    let base = text.as_ptr() as usize;
    // Each member's span, key start to value end, with what precedes and follows it.
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(values.len());
    for (key, raw) in values {
        let value = raw.get();
        let start = (value.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(value.len())?;
        if end > bytes.len() || value.is_empty() {
            return None;
        }
        let mut at = start;
        while at > 0 && is_ws(bytes[at - 1]) {
            at -= 1;
        }
        at = at.checked_sub(1).filter(|&c| bytes[c] == b':')?;
        while at > 0 && is_ws(bytes[at - 1]) {
            at -= 1;
        }
        let quoted = key.len() + 2;
        let key_start = at.checked_sub(quoted)?;
        let written = &bytes[key_start..at];
        if written[0] != b'"'
            || written[quoted - 1] != b'"'
            || &written[1..quoted - 1] != key.as_bytes()
        {
            return None;
        }
        spans.push(key_start..end);
    }
    spans.sort_by_key(|s| s.start);
    // Members next to each other (only whitespace and one comma between) go as one run.
    let mut runs: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    for span in spans {
        if let Some(last) = runs.last_mut() {
            let between = bytes.get(last.end..span.start)?;
            let mut commas = 0;
            if between.iter().all(|&b| {
                commas += usize::from(b == b',');
                b == b',' || is_ws(b)
            }) && commas == 1
            {
                last.end = span.end;
                continue;
            }
        }
        runs.push(span);
    }
    let mut cuts = Vec::with_capacity(runs.len());
    for run in runs {
        let mut after = run.end;
        while after < bytes.len() && is_ws(bytes[after]) {
            after += 1;
        }
        let mut before = run.start;
        while before > 0 && is_ws(bytes[before - 1]) {
            before -= 1;
        }
        let opens = before.checked_sub(1).map(|b| bytes[b])?;
        let closes = *bytes.get(after)?;
        let cut = match (opens, closes) {
            (b'{' | b',', b',') => run.start..after + 1,
            (b',', b'}') => before - 1..run.end,
            (b'{', b'}') => run.start..run.end,
            _ => return None,
        };
        cuts.push(cut);
    }
    Some(cuts)
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
#[derive(Debug, Clone)]
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
    Body::parse(body)?.into_callback()
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

    /// A record's identifiers are usually one ICCID; a list of several (the ICCID among them) or
    /// of none reads the same by the hand-written reader, serde's one pass and the older reading.
    #[test]
    fn identifier_lists_of_any_length_read_the_same_by_every_reading() {
        let body = |ids: &str| {
            format!(
                r#"{{"requestId":"r1","deviceResponse":{{"devicePromoUsageResponse":[{{"deviceIdentifierCollection":[{ids}],"dataUsage":"7","smsUsage":"1","moSms":"1","mtSms":"0","startDate":"2021-08-15T00:00:00.0000000","endDate":"2021-08-16T00:00:00.0000000"}}]}}}}"#
            )
        };
        let iccid = r#"{"id":"89148000000800139702","kind":"ICCID"}"#;
        let mdn = r#"{"id":"5551234567","kind":"MDN"}"#;
        let read = |text: &str, body: Result<Body<'_>, BodyError>| {
            let body = body.unwrap_or_else(|e| panic!("{text}: {e}"));
            let cb = body.callback().expect("a callback");
            let CallbackKind::Usage(records) = &cb.kind else {
                panic!("{text}: not usage")
            };
            records
                .parsed(false)
                .map(|r| r.map(|r| r.iccid.to_string()).map_err(|e| e.code))
                .collect::<Vec<_>>()
        };
        for (ids, expected) in [
            (iccid.to_owned(), Ok("89148000000800139702")),
            (format!("{mdn},{iccid}"), Ok("89148000000800139702")),
            (format!("{iccid},{mdn},{mdn}"), Ok("89148000000800139702")),
            (mdn.to_owned(), Err("iccid_missing")),
            (String::new(), Err("iccid_missing")),
        ] {
            let text = body(&ids);
            assert!(
                Body::is_scanned(&text),
                "the hand-written reader takes {ids}"
            );
            let got = read(&text, Body::parse(&text));
            assert_eq!(got, vec![expected.map(str::to_owned)], "{ids}");
            assert_eq!(read(&text, Body::parse_serde(&text)), got, "serde: {ids}");
            assert_eq!(
                read(&text, Body::parse_two_pass(&text)),
                got,
                "two pass: {ids}"
            );
        }
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

    /// What a reading of `text` comes to, comparable.
    fn summary(body: Result<Body<'_>, BodyError>) -> Result<String, BodyError> {
        let body = body?;
        let cb = body.callback()?;
        let kind = match &cb.kind {
            CallbackKind::Usage(records) => {
                format!("usage {:?}", records.parsed(false).collect::<Vec<_>>())
            }
            other => format!("{other:?}"),
        };
        Ok(format!(
            "{:?} {:?} {kind}",
            cb.request_id, cb.callback_count
        ))
    }

    const ID: &str = r#"[{"id":"89148000000800139702","kind":"ICCID"}]"#;
    const DATES: &str =
        r#""startDate":"2021-08-15T00:00:00.0000000","endDate":"2021-08-16T00:00:00.0000000""#;

    fn bodies() -> Vec<String> {
        let good = format!(
            r#"{{"deviceIdentifierCollection":{ID},"dataUsage":"3072","smsUsage":"4","moSms":"1","mtSms":"3",{DATES}}}"#
        );
        let odd = format!(
            r#"{{"deviceIdentifierCollection":"nope","dataUsage":"3072","smsUsage":"4","moSms":"1","mtSms":"3",{DATES}}}"#
        );
        let mut out: Vec<String> = vec![USAGE.into(), COMPLETION.into()];
        for body in [
            format!(r#"{{"username":"u","password":"p","requestId":"r","deviceResponse":{{"devicePromoUsageResponse":[{good},{good}]}}}}"#),
            format!(r#"{{"requestId":"r","deviceResponse":{{"devicePromoUsageResponse":[{good},{odd},7]}},"password":"p"}}"#),
            format!(r#"{{"requestId":"r","callbackCount":" 3 ","deviceResponse":{{"devicePromoUsageResponse":[{good}],"x":1}}}}"#),
            r#"{"requestId":"r","callbackCount":"x","deviceResponse":{"devicePromoUsageResponse":null}}"#.into(),
            format!(r#"{{"requestId":"r","deviceResponse":{{"devicePromoUsageResponse":[{good}]}},"faultResponse":{{"faultcode":1}}}}"#),
            r#"{"requestId":"r","deviceResponse":{"devicePromoUsageResponse":[]},"faultResponse":null}"#.into(),
            r#"{"requestId":"r","deviceResponse":null}"#.into(),
            r#"{"requestId":"r","deviceResponse":[]}"#.into(),
            r#"{"requestId":"r","deviceResponse":{"devicePromoUsageResponse":{}}}"#.into(),
            r#"{"requestId":"r","deviceResponse":{"devicePromoUsageResponse":[],"devicePromoUsageResponse":[]}}"#.into(),
            r#"{"requestId":"r","deviceResponse":{"a":1,"b":2}}"#.into(),
            r#"{"requestId":"r","faultResponse":"boom"}"#.into(),
            r#"{"requestId":"r\u0001","deviceResponse":{}}"#.into(),
            r#"{"request\u0049d":"r","deviceResponse":{}}"#.into(),
            r#"{"requestId":"r","deviceResponse":{},"deviceResponse":{}}"#.into(),
            r#"{"requestId":"r","deviceResponse":{},"request\u0049d":"s"}"#.into(),
            r#"{"requestId":"r","deviceResponse":{}} x"#.into(),
            r#"{"requestId":"r","deviceResponse":{"devicePromoUsageResponse":[}}"#.into(),
            r#"{"username":7,"password":null,"requestId":"r","deviceResponse":{}}"#.into(),
            "[]".into(),
            "".into(),
        ] {
            out.push(body);
        }
        out
    }

    #[test]
    fn one_pass_and_two_pass_readings_agree() {
        for body in bodies() {
            assert_eq!(
                summary(Body::parse(&body)),
                summary(Body::parse_two_pass(&body)),
                "for {body}"
            );
            if let Ok(b) = Body::parse(&body) {
                let two = Body::parse_two_pass(&body).expect("two-pass");
                for key in CREDENTIAL_KEYS {
                    assert_eq!(b.string(key), two.string(key), "for {body}");
                }
                assert_eq!(
                    b.raw_records()
                        .map(|r| r.iter().map(|v| v.get()).collect::<Vec<_>>()),
                    Body::parse_two_pass(&body)
                        .expect("two-pass")
                        .raw_records()
                        .map(|r| r.iter().map(|v| v.get()).collect::<Vec<_>>()),
                    "for {body}"
                );
                let (cb, stripped) = Body::parse(&body)
                    .expect("parses")
                    .into_callback_stripped()
                    .map_or((None, None), |(c, s)| (Some(c), Some(s)));
                if let Some(cb) = cb {
                    assert_eq!(b.callback().expect("callback").request_id, cb.request_id);
                    assert_eq!(stripped.as_deref(), Some(b.stripped().as_str()));
                }
            }
        }
        // The usual shape takes the one pass; an odd record or an escaped key the older reading.
        assert!(Body::parse(USAGE).expect("usage").is_one_pass());
        let b = bodies();
        assert!(Body::parse(&b[2]).expect("good").is_one_pass());
        assert!(!Body::parse(&b[3]).expect("odd record").is_one_pass());
        assert!(
            !Body::parse(r#"{"request\u0049d":"r"}"#)
                .expect("escaped")
                .is_one_pass()
        );
    }

    #[test]
    fn the_hand_written_reading_takes_the_usual_body_and_agrees_with_serde() {
        let good = format!(
            r#"{{"deviceIdentifierCollection":{ID},"dataUsage":"3072","smsUsage":"4","moSms":"1","mtSms":"3",{DATES}}}"#
        );
        let with = |records: &str, tail: &str| {
            format!(
                r#"{{"username":"u","password":"p","requestId":"r","deviceResponse":{{"devicePromoUsageResponse":[{records}]}}{tail}}}"#
            )
        };
        let pretty = serde_json::to_string_pretty(
            &serde_json::from_str::<serde_json::Value>(USAGE).expect("json"),
        )
        .expect("pretty");
        // (body, whether the hand-written reading takes it)
        let mut cases: Vec<(String, bool)> = vec![
            (USAGE.into(), true),
            (COMPLETION.into(), true),
            (pretty, true),
            (with(&format!("{good},{good}"), ""), true),
            (
                with(&good, r#","comment":"a \"quoted\" word","callbackCount":2"#),
                true,
            ),
            (with(&good.replace(ID, "[]"), ""), true),
            (with(&good.replace(ID, "[{}]"), ""), true),
            (with(&good.replace(r#""smsUsage":"4","#, ""), ""), true),
            (with(&good.replace(r#""3072""#, "3072"), ""), false),
            (
                with(&good.replace(r#""3072""#, r#""30\u00372""#), ""),
                false,
            ),
            (with(&good.replace(r#""3072""#, "\"30\t72\""), ""), false),
            (
                with(&good.replace(r#""3072""#, r#""3072","extra":1"#), ""),
                false,
            ),
            (
                with(&good.replace(r#""4""#, r#""4","smsUsage":"5""#), ""),
                false,
            ),
            (
                with(&good.replace(r#""ICCID""#, r#""ICCID","x":"y""#), ""),
                false,
            ),
            (with(&good, r#","requestId":"s""#), false),
            (with(&good, ","), false),
            (with(&format!("{good},"), ""), false),
            (format!("{} x", with(&good, "")), false),
            ("{}".into(), true),
            (" { } ".into(), true),
        ];
        let own = cases.len();
        cases.extend(bodies().into_iter().map(|b| (b, false)));
        for (body, scanned) in &cases {
            assert_eq!(
                summary(Body::parse(body)),
                summary(Body::parse_serde(body)),
                "for {body}"
            );
            assert_eq!(
                summary(Body::parse(body)),
                summary(Body::parse_two_pass(body)),
                "for {body}"
            );
            if let (Ok(a), Ok(b)) = (Body::parse(body), Body::parse_serde(body)) {
                assert_eq!(a.stripped(), b.stripped(), "for {body}");
            }
            if *scanned {
                assert!(Body::is_scanned(body), "not read by hand: {body}");
            }
        }
        for (body, scanned) in &cases[..own] {
            assert_eq!(Body::is_scanned(body), *scanned, "for {body}");
        }
    }

    #[test]
    fn strips_credentials_by_byte_span() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"username":"u","password":"p","requestId":"r1","deviceResponse":{}}"#,
                r#"{"requestId":"r1","deviceResponse":{}}"#,
            ),
            (
                r#"{"requestId":"r1","username":"u","deviceResponse":{},"password":"p","callbackCount":1}"#,
                r#"{"requestId":"r1","deviceResponse":{},"callbackCount":1}"#,
            ),
            (
                r#"{"requestId":"r1","deviceResponse":{},"username":"u","password":"p"}"#,
                r#"{"requestId":"r1","deviceResponse":{}}"#,
            ),
            (
                r#"{"requestId":"r1","password":"p" ,"deviceResponse":{},"username":{"a":[1]}}"#,
                r#"{"requestId":"r1","deviceResponse":{}}"#,
            ),
            (r#"{"username":"u","password":"p"}"#, "{}"),
            (r#" { "password" : "p" } "#, " {  } "),
            (
                "{\n  \"requestId\": \"r1\",\n  \"username\": \"u\",\n  \"deviceResponse\": {},\n  \"password\": \"p\"\n}\n",
                "{\n  \"requestId\": \"r1\",\n  \n  \"deviceResponse\": {}\n}\n",
            ),
            (
                "{\"username\"\t:\r\n\"u\"\n,\n\"password\":\"p\",\"requestId\":\"r1\"}",
                "{\"requestId\":\"r1\"}",
            ),
            // Escapes in other keys and values are kept as written (the older reading, same spans).
            (
                r#"{"username":"u\"x","request\u0049d":"r1","deviceResponse":{}}"#,
                r#"{"request\u0049d":"r1","deviceResponse":{}}"#,
            ),
            // No credentials: the body as it came, whitespace and all.
            (
                "{ \"requestId\" : \"r1\", \"deviceResponse\" : { } }",
                "{ \"requestId\" : \"r1\", \"deviceResponse\" : { } }",
            ),
        ];
        for (body, want) in cases {
            let parsed = Body::parse(body).expect("object");
            assert!(parsed.credential_cuts().is_some(), "for {body}");
            assert_eq!(parsed.stripped(), *want, "for {body}");
            let again = Body::parse(want).expect("stripped parses");
            assert!(again.string("username").is_none() && again.string("password").is_none());
            assert_eq!(
                summary(Body::parse(want)),
                summary(Body::parse(body)),
                "for {body}"
            );
        }
        let plain = r#"{"requestId":"r1"}"#;
        assert!(matches!(
            Body::parse(plain).expect("object").stripped_text(),
            Cow::Borrowed(b) if std::ptr::eq(b, plain)
        ));
    }

    #[test]
    fn an_escaped_credential_key_is_rebuilt() {
        let body = r#"{"user\u006eame":"u", "requestId":"r1", "deviceResponse":{}}"#;
        let parsed = Body::parse(body).expect("object");
        assert_eq!(parsed.string("username").as_deref(), Some("u"));
        assert_eq!(parsed.credential_cuts(), None);
        assert_eq!(
            parsed.stripped(),
            r#"{"requestId":"r1","deviceResponse":{}}"#
        );
    }

    #[test]
    fn duplicate_keys_are_still_rejected() {
        for (body, key) in [
            (r#"{"username":"a","username":"b"}"#, "username"),
            (r#"{"username":"a","user\u006eame":"b"}"#, "username"),
            (
                r#"{"deviceResponse":{},"requestId":"r","deviceResponse":{}}"#,
                "deviceResponse",
            ),
            (
                r#"{"requestId":"r","deviceResponse":{"devicePromoUsageResponse":[]},"requestId":"r"}"#,
                "requestId",
            ),
        ] {
            assert_eq!(
                Body::parse(body).map(|_| ()),
                Err(BodyError::DuplicateKey(key.into())),
                "for {body}"
            );
        }
    }
}
