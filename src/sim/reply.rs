//! Error answers in the vendor's shapes: the API's `{"errorCode","errorMessage"}`, the gateway's
//! `{"fault":{...}}` (401 900901, 429 900800), the short 503 form, OAuth's `{"error"}`, and the error
//! codes the simulator uses.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Malformed JSON, a missing or mistyped field (our name: the vendor does not document one).
pub const BAD_REQUEST: &str = "INPUT_INVALID.BadRequest";
/// Missing, unknown, ended or idle-expired session token.
pub const SESSION_EXPIRED: &str = "REQUEST_FAILED.SessionToken.Expired";
/// Wrong username or password.
pub const LOGIN_FAILED: &str = "REQUEST_FAILED.UnexpectedError";
/// Five consecutive failed logins happened.
pub const ACCOUNT_LOCKED: &str = "REQUEST_FAILED.AccountLocked";
/// Account name not among `sim.accounts`.
pub const ACCOUNT_NOT_FOUND: &str = "REQUEST_FAILED.AccountNotFound";
/// Deleting a callback service that is not registered (our name).
pub const CALLBACK_NOT_REGISTERED: &str = "INPUT_INVALID.Callback.NotRegistered";

/// An error answer, in the shape the vendor's gateway or API gives it.
#[derive(Debug)]
pub enum ApiError {
    /// 400 `{"errorCode","errorMessage"}`.
    Vendor { code: &'static str, message: String },
    /// 401 gateway fault 900901.
    InvalidCredentials,
    /// 429 gateway fault 900800 with `Retry-After`.
    Throttled { retry_after_secs: u64 },
    /// 503 in the short form whose errorCode is the HTTP status.
    Unavailable,
    /// OAuth errors: `{"error","error_description"}`.
    OAuth {
        status: StatusCode,
        error: &'static str,
        description: &'static str,
    },
}

impl ApiError {
    pub fn vendor(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Vendor {
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Vendor { code, message } => (
                StatusCode::BAD_REQUEST,
                Json(json!({"errorCode": code, "errorMessage": message})),
            )
                .into_response(),
            ApiError::InvalidCredentials => (
                StatusCode::UNAUTHORIZED,
                Json(json!({"fault": {
                    "code": 900901,
                    "message": "Invalid Credentials",
                    "description": "Invalid Credentials. Make sure you have given the correct access token"
                }})),
            )
                .into_response(),
            ApiError::Throttled { retry_after_secs } => {
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({"fault": {
                        "code": 900800,
                        "message": "Message throttled out",
                        "description": "You have exceeded your quota"
                    }})),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                response
            }
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"errorCode": "503", "errorMessage": "Service Unavailable"})),
            )
                .into_response(),
            ApiError::OAuth {
                status,
                error,
                description,
            } => (
                status,
                Json(json!({"error": error, "error_description": description})),
            )
                .into_response(),
        }
    }
}

/// Any other path: 404 in the short form.
pub async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"errorCode": "404", "errorMessage": "Not Found"})),
    )
        .into_response()
}

/// What is wrong with a JSON body, without echoing any of it (it may hold credentials).
pub fn json_problem(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match e.classify() {
        serde_json::error::Category::Data if text.starts_with("missing field") => text
            .split(" at line ")
            .next()
            .unwrap_or("missing field")
            .to_owned(),
        serde_json::error::Category::Data => "a field has the wrong type".to_owned(),
        _ => "not valid JSON".to_owned(),
    }
}
