//! Everything a sandbox can send the gateway's parsers: link frames (the
//! classifier in front of smoltcp), DNS questions, and the first bytes
//! of a connection admitted by name (TLS ClientHello, HTTP request head).
//! Run: `cargo fuzz run sandbox_input` in net/fuzz (a nightly toolchain).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = airlock_net::gateway::classify(data);
    let _ = airlock_net::dns::parse_question(data);
    let _ = airlock_net::inspect::tls_sni(data);
    let _ = airlock_net::inspect::http_host(data);
});
