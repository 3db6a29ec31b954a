//! The first bytes of a connection admitted by name: which name the client
//! asks the server for. On TCP 443 that is the TLS ClientHello's SNI, on
//! TCP 80 the HTTP Host header; the gateway holds the sandbox's bytes until
//! one is read and refuses a name the destination was not resolved for
//! (domain fronting), or a ClientHello without one.
//!
//! A ClientHello may be split across TCP segments and across TLS records:
//! records are reassembled here up to [`MAX_HELD`] bytes before deciding.

use tls_parser::{
    TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType, parse_tls_extensions,
    parse_tls_message_handshake, parse_tls_raw_record,
};

/// Bytes held back at most while looking for the name.
pub const MAX_HELD: usize = 16 * 1024;

/// What the held bytes say so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Not enough bytes yet.
    Need,
    /// The name the client asks for (normalized).
    Name(String),
    /// A refusal, with why ("no SNI", "not TLS", "no Host header"...).
    Refuse(String),
}

/// The SNI of the TLS ClientHello at the start of `buf`.
pub fn tls_sni(buf: &[u8]) -> Seen {
    // A TLS record starts with content type 22 (handshake) and major
    // version 3; anything else is refused before waiting for more.
    match (buf.first(), buf.get(1)) {
        (None, _) => return Seen::Need,
        (Some(22), None | Some(3)) => {}
        _ => return Seen::Refuse("not TLS".into()),
    }
    let mut handshake: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        if handshake.len() >= 4 {
            let len = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if handshake[0] != 1 {
                return Seen::Refuse("the first handshake message is not a ClientHello".into());
            }
            if len + 4 > MAX_HELD {
                return Seen::Refuse("ClientHello too large".into());
            }
            if handshake.len() >= len + 4 {
                return hello_sni(handshake.get(..len + 4).unwrap_or_default());
            }
        }
        match parse_tls_raw_record(rest) {
            Ok((r, rec)) => {
                if rec.hdr.record_type != TlsRecordType::Handshake {
                    return Seen::Refuse("not a TLS handshake".into());
                }
                handshake.extend_from_slice(rec.data);
                rest = r;
            }
            Err(tls_parser::Err::Incomplete(_)) => {
                return if buf.len() >= MAX_HELD {
                    Seen::Refuse("ClientHello too large".into())
                } else {
                    Seen::Need
                };
            }
            Err(_) => return Seen::Refuse("not TLS".into()),
        }
    }
}

fn hello_sni(msg: &[u8]) -> Seen {
    let ch = match parse_tls_message_handshake(msg) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)))) => ch,
        _ => return Seen::Refuse("malformed ClientHello".into()),
    };
    let Some(ext) = ch.ext else {
        return Seen::Refuse("ClientHello without SNI".into());
    };
    let Ok((_, exts)) = parse_tls_extensions(ext) else {
        return Seen::Refuse("malformed ClientHello extensions".into());
    };
    let mut names = exts.iter().filter_map(|e| match e {
        TlsExtension::SNI(v) => v
            .iter()
            .find(|(t, _)| t.0 == 0)
            .map(|(_, n)| String::from_utf8_lossy(n).into_owned()),
        _ => None,
    });
    match (names.next(), names.next()) {
        (Some(n), None) => match crate::policy::normalize_name(&n) {
            Some(n) => Seen::Name(n),
            None => Seen::Refuse(format!("SNI {n:?} is not a hostname")),
        },
        (Some(_), Some(_)) => Seen::Refuse("several SNI extensions".into()),
        (None, _) => Seen::Refuse("ClientHello without SNI".into()),
    }
}

/// The Host of the HTTP request at the start of `buf` (port removed).
pub fn http_host(buf: &[u8]) -> Seen {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() < MAX_HELD => Seen::Need,
        Ok(httparse::Status::Partial) => Seen::Refuse("HTTP request head too large".into()),
        Err(_) => Seen::Refuse("not an HTTP request".into()),
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            let (Some(h), None) = (hosts.next(), hosts.next()) else {
                return Seen::Refuse("not exactly one Host header".into());
            };
            let v = String::from_utf8_lossy(h.value);
            let host = v.trim();
            // host, host:port, [v6]:port
            let name = match host.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            };
            match crate::policy::normalize_name(name) {
                Some(n) => Seen::Name(n),
                None => Seen::Refuse(format!("Host {host:?} is not a hostname")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A minimal TLS 1.2 ClientHello record for `sni` (None: no SNI).
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(n) = sni {
            let n = n.as_bytes();
            let list_len = 3 + n.len();
            ext.extend_from_slice(&[0, 0]); // server_name
            ext.extend_from_slice(&u16::try_from(list_len + 2).unwrap().to_be_bytes());
            ext.extend_from_slice(&u16::try_from(list_len).unwrap().to_be_bytes());
            ext.push(0); // host_name
            ext.extend_from_slice(&u16::try_from(n.len()).unwrap().to_be_bytes());
            ext.extend_from_slice(n);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&u16::try_from(ext.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        record(&hs)
    }

    fn record(data: &[u8]) -> Vec<u8> {
        let mut r = vec![22, 3, 1];
        r.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    #[test]
    fn the_sni_is_read_whole_or_split_across_segments_and_records() {
        let hello = client_hello(Some("Allowed.Test"));
        assert_eq!(tls_sni(&hello), Seen::Name("allowed.test".into()));
        for cut in [1, 5, 10, hello.len() - 1] {
            assert_eq!(tls_sni(&hello[..cut]), Seen::Need, "cut at {cut}");
        }
        // The handshake message split over two records.
        let hs = &hello[5..];
        let mut split = record(&hs[..20]);
        split.extend_from_slice(&record(&hs[20..]));
        assert_eq!(tls_sni(&split), Seen::Name("allowed.test".into()));
    }

    #[test]
    fn a_hello_without_sni_or_not_tls_is_refused() {
        assert!(matches!(tls_sni(&client_hello(None)), Seen::Refuse(_)));
        assert!(matches!(
            tls_sni(b"GET / HTTP/1.1\r\n\r\n"),
            Seen::Refuse(_)
        ));
        let huge = vec![22u8, 3, 1, 0x3f, 0xff];
        let mut buf = huge.clone();
        buf.resize(MAX_HELD + 10, 0);
        assert!(matches!(tls_sni(&buf), Seen::Refuse(_)));
    }

    #[test]
    fn the_host_header_is_read_without_its_port() {
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: Allowed.test:8080\r\n\r\n"),
            Seen::Name("allowed.test".into())
        );
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHo"), Seen::Need);
        assert!(matches!(
            http_host(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Seen::Refuse(_)
        ));
        assert!(matches!(
            http_host(b"GET / HTTP/1.1\r\n\r\n"),
            Seen::Refuse(_)
        ));
        assert!(matches!(http_host(b"\x16\x03\x01garbage"), Seen::Refuse(_)));
    }
}
