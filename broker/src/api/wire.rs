//! Every error a client gets is the API's JSON, including the ones hyper
//! answers by itself.
//!
//! A request whose head cannot be parsed (a malformed request line, a URI
//! or headers too large) never reaches a handler: hyper answers it with a
//! bare status (`400`, `414`, `431`, `content-length: 0`) and closes.
//! [`JsonErrors`] wraps the connection and, when hyper writes such an
//! answer, writes the same status with a JSON body naming the problem
//! instead. Everything a handler answers passes through untouched: the
//! [`json_errors`] middleware gives each handler error a JSON body with a
//! content type, so it can never look like one of hyper's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::api::types::ErrorBody;

/// What each of hyper's automatic answers means, for the client.
fn reason(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "malformed HTTP request: the request line or a header could not be parsed",
        414 => "request URI too long",
        431 => "request headers too large (too many, or too long)",
        _ => return None,
    })
}

/// The status of `buf` if it is one of hyper's automatic answers: a 4xx
/// head that closes the connection, with no body and no content type.
fn automatic(buf: &[u8]) -> Option<u16> {
    let head = buf.strip_prefix(b"HTTP/1.1 ")?;
    let status: u16 = std::str::from_utf8(head.get(..3)?).ok()?.parse().ok()?;
    reason(status)?;
    let text = String::from_utf8_lossy(buf).to_ascii_lowercase();
    (text.ends_with("\r\n\r\n")
        && text.contains("\r\nconnection: close\r\n")
        && text.contains("\r\ncontent-length: 0\r\n")
        && !text.contains("\r\ncontent-type:"))
    .then_some(status)
}

/// The JSON answer that replaces an automatic one.
fn json_answer(status: u16) -> Vec<u8> {
    let body = serde_json::to_string(&ErrorBody {
        error: reason(status).unwrap_or("bad request").to_string(),
    })
    .unwrap_or_default();
    let text = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A connection whose automatic error answers go out as JSON.
#[derive(Debug)]
pub struct JsonErrors<S> {
    inner: S,
    /// A replacement being written: its bytes, how many went, and how
    /// long the answer it replaces was (reported as written once done).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<S> JsonErrors<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        JsonErrors {
            inner,
            pending: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> JsonErrors<S> {
    /// Writes what is left of a replacement; `Ready(Ok(n))` with the
    /// replaced answer's length once all of it went.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((bytes, done, replaced)) = &mut self.pending {
            if *done >= bytes.len() {
                let n = *replaced;
                self.pending = None;
                return Poll::Ready(Ok(n));
            }
            let rest = bytes.get(*done..).unwrap_or_default();
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *done += n,
                other => return other,
            }
        }
        Poll::Ready(Ok(0))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.pending.is_none()
            && let Some(status) = automatic(buf)
        {
            me.pending = Some((json_answer(status), 0, buf.len()));
        }
        if me.pending.is_some() {
            return me.drive(cx);
        }
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.pending.is_some() {
            match me.drive(cx) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Not vectored: hyper then writes each answer's head as one buffer,
    // which is what `automatic` recognizes.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// Middleware at the API's edge: a body declared larger than the API
/// takes is refused before it is read (413), and an error a handler or
/// the router answers without a JSON body (an extractor's plain-text
/// rejection, an empty 405) gets one, with the text it had or what was
/// wrong with the request.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().chars().take(200).collect::<String>();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Uploads stream into the sandbox and are bounded by its disk quota.
    let upload = path.ends_with("/files/content");
    if let Some(n) = declared
        && n > crate::api::server::MAX_BODY_BYTES as u64
        && !upload
    {
        let mut resp = json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {n} bytes is over the limit of {} bytes",
                crate::api::server::MAX_BODY_BYTES
            ),
        );
        // The body is never read: the connection cannot carry another
        // request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_TEXT_ERROR)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = if status == StatusCode::METHOD_NOT_ALLOWED {
        format!("method {method} is not allowed on {path}")
    } else if !text.is_empty() {
        format!("{method} {path}: {text}")
    } else {
        format!(
            "{method} {path}: {}",
            status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_lowercase()
        )
    };
    let mut out = json_response(status, error);
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// `status` with `{"error": error}`.
fn json_response(status: StatusCode, error: String) -> Response {
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Largest plain-text error body carried into the JSON one.
const MAX_TEXT_ERROR: usize = 4096;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_hypers_bare_answers_are_replaced() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 14:52:15 GMT\r\n\r\n";
        assert_eq!(automatic(bare), Some(431));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 20\r\nconnection: close\r\n\r\n";
        assert_eq!(automatic(ours), None);
        let keep = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(automatic(keep), None);
        let ok = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(automatic(ok), None);
        let answer = String::from_utf8(json_answer(414)).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 414 URI Too Long\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with(r#"{"error":"request URI too long"}"#),
            "{answer}"
        );
    }
}
