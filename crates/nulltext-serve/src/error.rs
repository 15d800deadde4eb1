//! Errors of the HTTP API: a status, a stable machine-readable code and a message that
//! names the field or value at fault, always sent as JSON.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn invalid_id(what: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("{what} ids are 32 lowercase hexadecimal digits"),
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The code used for an error status that did not come from this crate (extractor
    /// rejections, unknown routes).
    pub fn code_for(status: StatusCode) -> &'static str {
        match status {
            StatusCode::NOT_FOUND => "no_route",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
            s if s.is_server_error() => "internal",
            _ => "bad_request",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut res = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

/// Library errors: bad input is the client's fault (400), the rest is the server's.
impl From<nulltext::Error> for ApiError {
    fn from(e: nulltext::Error) -> Self {
        match e {
            nulltext::Error::InvalidInput(m) => ApiError::bad_request(api_wording(&m)),
            nulltext::Error::Image { msg, .. } => ApiError::bad_request(msg),
            e => ApiError::internal(e.to_string()),
        }
    }
}

/// The library words its messages for the command line; the API names JSON fields.
pub fn api_wording(msg: &str) -> String {
    let mut s = msg.replace("; pass --force to use it anyway", "");
    for (flag, field) in [
        ("--cross-replace", "cross_replace"),
        ("--self-replace", "self_replace"),
        ("--blend-subtract", "blend_subtract"),
        ("--blend-threshold", "blend_threshold"),
        ("--blend", "blend"),
        ("--attention-downscale", "attention_downscale"),
        ("--reweight", "reweight"),
        ("--mode", "mode"),
        ("--sdedit", "sdedit"),
        ("--inner-steps", "inner_steps"),
        ("--steps", "steps"),
        ("--guidance", "guidance"),
        ("--early-stop", "early_stop"),
        ("--size", "size"),
    ] {
        s = s.replace(flag, field);
    }
    s
}

/// Cut to `n` characters, for echoing client text in messages.
pub(crate) fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}
