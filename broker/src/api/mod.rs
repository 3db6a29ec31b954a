//! The /v1 HTTP API: HTTP/1.1 + JSON on a Unix socket, callers identified
//! by SO_PEERCRED. Errors map to status codes here and only here.

pub mod attach;
pub mod files;
pub mod server;
pub mod types;
pub mod wire;
