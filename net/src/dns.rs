//! The gateway's resolver, as message transformations: what a sandbox
//! asked, the query sent upstream for it, and the answer handed back.
//!
//! The resolver never forwards a query for a name the policy does not
//! allow (data encoded in query names never leaves), serves only address
//! lookups (A and AAAA; every other type gets an empty answer), and hands
//! out only addresses the policy accepts for that name; those addresses
//! are then pinned to the name (see the gateway).

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Largest DNS message the resolver reads or writes (UDP, EDNS-sized).
pub const MAX_MESSAGE: usize = 4096;

/// Shortest and longest time an address stays pinned to a name.
pub const MIN_PIN_SECS: u32 = 60;
/// See [`MIN_PIN_SECS`].
pub const MAX_PIN_SECS: u32 = 3600;

/// A sandbox's question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The query id the sandbox chose.
    pub id: u16,
    /// The name, normalized (lowercase, no trailing dot).
    pub name: String,
    /// The record type asked for.
    pub qtype: RecordType,
    /// The question as asked (for echoing it back).
    query: Query,
}

impl Question {
    /// The record type as text, for the audit log.
    pub fn qtype_text(&self) -> String {
        self.qtype.to_string()
    }

    /// Whether the resolver looks this type up at all (A, AAAA).
    pub fn is_address(&self) -> bool {
        matches!(self.qtype, RecordType::A | RecordType::AAAA)
    }
}

/// Why a message from the sandbox is not a question the resolver takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuestionError {
    /// It does not parse.
    #[error("malformed DNS message")]
    Malformed,
    /// It is a response, an update, or has no or several questions.
    #[error("not a single standard query")]
    NotAQuery {
        /// Its id, to answer with FORMERR.
        id: u16,
    },
    /// The name is not a valid hostname.
    #[error("invalid name {name:?}")]
    BadName {
        /// Its id.
        id: u16,
        /// The name as sent (cut to 255 bytes).
        name: String,
    },
}

/// Parses a sandbox's query.
pub fn parse_question(bytes: &[u8]) -> Result<Question, QuestionError> {
    let msg = Message::from_vec(bytes).map_err(|_| QuestionError::Malformed)?;
    let id = msg.metadata.id;
    if msg.metadata.message_type != MessageType::Query
        || msg.metadata.op_code != OpCode::Query
        || msg.queries.len() != 1
    {
        return Err(QuestionError::NotAQuery { id });
    }
    let Some(query) = msg.queries.first().cloned() else {
        return Err(QuestionError::NotAQuery { id });
    };
    let raw = query.name().to_ascii();
    let Some(name) = crate::policy::normalize_name(&raw) else {
        return Err(QuestionError::BadName {
            id,
            name: raw.chars().take(255).collect(),
        });
    };
    Ok(Question {
        id,
        name,
        qtype: query.query_type(),
        query,
    })
}

/// A response to `q` with `code` and no records.
pub fn empty_answer(q: &Question, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    m.add_query(q.query.clone());
    m.to_vec().unwrap_or_default()
}

/// A bare error response to a message that did not parse as a question.
pub fn error_answer(id: u16, code: ResponseCode) -> Vec<u8> {
    Message::error_msg(id, OpCode::Query, code)
        .to_vec()
        .unwrap_or_default()
}

/// The query the resolver sends upstream for `q`, with its own `id`.
pub fn upstream_query(q: &Question, id: u16) -> Option<Vec<u8>> {
    let name = Name::from_ascii(format!("{}.", q.name)).ok()?;
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, q.qtype));
    m.to_vec().ok()
}

/// What the upstream answered, reduced to what may reach the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The upstream's response code.
    pub code: ResponseCode,
    /// Address records: (address, ttl).
    pub addresses: Vec<(IpAddr, u32)>,
    /// The CNAME chain, as records to hand back beside the addresses.
    cnames: Vec<Record>,
}

/// Parses the upstream's response to the query with id `id`; `None` if it
/// is not that response.
pub fn parse_upstream(bytes: &[u8], id: u16) -> Option<Upstream> {
    let msg = Message::from_vec(bytes).ok()?;
    if msg.metadata.id != id || msg.metadata.message_type != MessageType::Response {
        return None;
    }
    let mut addresses = Vec::new();
    let mut cnames = Vec::new();
    for r in &msg.answers {
        match &r.data {
            RData::A(a) => addresses.push((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => addresses.push((IpAddr::V6(a.0), r.ttl)),
            RData::CNAME(_) => cnames.push(r.clone()),
            _ => {}
        }
    }
    Some(Upstream {
        code: msg.metadata.response_code,
        addresses,
        cnames,
    })
}

/// The answer to `q`: the upstream's CNAME chain and the `kept` addresses
/// (those the policy accepted), with `ttl` each.
pub fn answer(q: &Question, up: &Upstream, kept: &[(IpAddr, u32)]) -> Vec<u8> {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.metadata.response_code = up.code;
    m.add_query(q.query.clone());
    for c in &up.cnames {
        m.add_answer(c.clone());
    }
    // Address records carry the last name of the chain (or the question's).
    let owner = up
        .cnames
        .last()
        .and_then(|c| match &c.data {
            RData::CNAME(t) => Some(t.0.clone()),
            _ => None,
        })
        .unwrap_or_else(|| q.query.name().clone());
    for (addr, ttl) in kept {
        let data = match addr {
            IpAddr::V4(a) => RData::A((*a).into()),
            IpAddr::V6(a) => RData::AAAA((*a).into()),
        };
        m.add_answer(Record::from_rdata(owner.clone(), *ttl, data));
    }
    m.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn query(name: &str, t: RecordType, id: u16) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn a_question_is_parsed_and_normalized() {
        let q = parse_question(&query("PyPI.Org.", RecordType::A, 7)).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype),
            (7, "pypi.org", RecordType::A)
        );
        assert!(q.is_address());
    }

    #[test]
    fn garbage_and_responses_are_not_questions() {
        assert_eq!(parse_question(b"\x00\x01"), Err(QuestionError::Malformed));
        let resp = empty_answer(
            &parse_question(&query("a.b.", RecordType::A, 9)).unwrap(),
            ResponseCode::NoError,
        );
        assert_eq!(
            parse_question(&resp),
            Err(QuestionError::NotAQuery { id: 9 })
        );
    }

    #[test]
    fn upstream_answers_are_reduced_to_kept_addresses() {
        let q = parse_question(&query("x.test.", RecordType::A, 3)).unwrap();
        let up_q = upstream_query(&q, 77).unwrap();
        let mut resp = Message::from_vec(&up_q).unwrap();
        resp.metadata.message_type = MessageType::Response;
        let name = Name::from_ascii("x.test.").unwrap();
        for a in ["203.0.113.5", "10.0.0.1"] {
            let ip: std::net::Ipv4Addr = a.parse().unwrap();
            resp.add_answer(Record::from_rdata(name.clone(), 30, RData::A(ip.into())));
        }
        let up = parse_upstream(&resp.to_vec().unwrap(), 77).unwrap();
        assert_eq!(up.addresses.len(), 2);
        assert!(parse_upstream(&resp.to_vec().unwrap(), 78).is_none());
        let kept = [("203.0.113.5".parse().unwrap(), 60)];
        let out = Message::from_vec(&answer(&q, &up, &kept)).unwrap();
        assert_eq!(out.metadata.id, 3);
        assert_eq!(out.answers.len(), 1);
    }
}
