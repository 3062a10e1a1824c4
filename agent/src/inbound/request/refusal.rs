//! A refusal: what any step answers instead of passing the request on. The
//! pipeline's one exit ([`super::Exchange::refuse`]) turns it into the
//! client's response (HTTP or gRPC shaped) and the audit event.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// Why the agent answers a request itself.
#[derive(Debug)]
pub(crate) struct Refusal<'p> {
    pub status: u16,
    /// The stable reason code of the audit event.
    pub reason: &'static str,
    /// The rule, limit or filter that decided, when one did.
    pub rule: Option<&'p str>,
    /// Headers the answer carries besides the fixed ones (`Retry-After`,
    /// `RateLimit-*`, `Deprecation`, ...); boxed, as most refusals have none.
    headers: Option<Box<HeaderMap>>,
    /// A 401 carries `WWW-Authenticate: Bearer`.
    pub www_authenticate: bool,
    /// No further request is read from this connection (its framing can
    /// no longer be trusted).
    pub close: bool,
}

impl<'p> Refusal<'p> {
    pub fn new(status: u16, reason: &'static str) -> Self {
        Self {
            status,
            reason,
            rule: None,
            headers: None,
            www_authenticate: false,
            close: false,
        }
    }

    pub fn rule(mut self, rule: Option<&'p str>) -> Self {
        self.rule = rule;
        self
    }

    pub fn close(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn challenge(mut self, www_authenticate: bool) -> Self {
        self.www_authenticate = www_authenticate;
        self
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers_mut().insert(name, value);
        self
    }

    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        self.headers.get_or_insert_with(Box::default)
    }

    pub fn take_headers(&mut self) -> Option<Box<HeaderMap>> {
        self.headers.take()
    }
}
