//! What every request passes through: the origin and host checks, the body-size guard,
//! and the conversion of every error into JSON.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::app::App;
use crate::error::{clip, ApiError};

type AppState = State<Arc<App>>;

/// Refuses a body whose declared length is over the limit before reading it. The body is
/// drained first (up to a bound), so that the client, still sending, reads the answer
/// instead of a reset connection; a client that sent `Expect: 100-continue` is answered
/// at once and sends nothing.
pub async fn guard_body(State(app): AppState, req: Request, next: Next) -> Response {
    let limit = app.limits.max_body_bytes as u64;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit) {
        let expects_continue = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects_continue && n <= limit.saturating_mul(4).max(64 << 20) {
            let mut body = req.into_body().into_data_stream();
            let drain = async { while let Some(Ok(_)) = body.next().await {} };
            let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
        }
        return ApiError::too_large(format!(
            "the request body has {n} bytes; this server takes at most {limit}"
        ))
        .into_response();
    }
    next.run(req).await
}

/// Other web sites must not drive this service through a visitor's browser: requests that
/// change something must come from the page's own origin (a browser sends `Origin` with
/// them), and a server on a loopback address answers only to loopback host names, which
/// defeats DNS rebinding.
pub async fn guard_origin(State(app): AppState, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    if app.local_only && !is_local_host(&host) {
        return ApiError::forbidden(format!(
            "this server answers only to localhost or its loopback address, not to host `{}`",
            clip(&host, 100)
        ))
        .into_response();
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(&host));
            if !same {
                return ApiError::forbidden(format!(
                    "requests from {} are not accepted; use the page this server serves",
                    clip(origin.to_str().unwrap_or("another origin"), 100)
                ))
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Every error leaves as JSON, including the framework's own (bad JSON, bad multipart,
/// unknown method); and no response is content-sniffed.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = clip(req.uri().path(), 100);
    let mut res = next.run(req).await;
    res.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return res;
    }
    let keep: Vec<_> = [header::RETRY_AFTER, header::ALLOW]
        .into_iter()
        .filter_map(|h| res.headers().get(&h).cloned().map(|v| (h, v)))
        .collect();
    let body = axum::body::to_bytes(res.into_body(), 16 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        format!("{method} is not allowed on {path}")
    } else if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, ApiError::code_for(status), message).into_response();
    for (h, v) in keep {
        out.headers_mut().insert(h, v);
    }
    out.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_hosts() {
        for h in [
            "localhost:7860",
            "LOCALHOST",
            "127.0.0.1:80",
            "127.1.2.3",
            "[::1]:7860",
        ] {
            assert!(super::is_local_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example:7860",
            "localhost.evil.example",
            "10.0.0.1:7860",
            "[::2]:1",
        ] {
            assert!(!super::is_local_host(h), "{h}");
        }
    }
}
