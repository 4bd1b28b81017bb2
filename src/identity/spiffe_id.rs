//! SPIFFE IDs (`spiffe://trust-domain/path`), parsed and validated per the SPIFFE ID standard.
//!
//! This module owns the syntax only: whether an ID is *allowed* is the peer policy's business
//! (`policy.rs`), and whether a certificate carries a valid ID is the verifier's (`verifier.rs`).

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID the standard allows, in bytes (SPIFFE ID §2.3).
const MAX_ID_BYTES: usize = 2048;
/// The longest trust domain name the standard allows, in bytes (SPIFFE ID §2.1).
const MAX_TRUST_DOMAIN_BYTES: usize = 255;
const SCHEME: &str = "spiffe://";

/// A valid SPIFFE ID.
///
/// The trust domain is lowercase `[a-z0-9._-]`; the path is empty (a trust domain ID such as
/// `spiffe://example.org`) or `/`-separated segments of `[A-Za-z0-9._-]`, none empty, `.` or `..`,
/// and without a trailing slash. Query, fragment, port, userinfo and percent-encoding are refused.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

impl SpiffeId {
    /// The trust domain name, without scheme (`example.org`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, empty or starting with `/` (`/ns/logs/loki`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether this ID is `prefix` or lies below it, matching whole path segments.
    ///
    /// `spiffe://td/loki` contains `spiffe://td/loki` and `spiffe://td/loki/x`, never
    /// `spiffe://td/loki-evil` (the raw string prefix trap) nor any ID of another trust domain.
    /// A trust domain ID (`spiffe://td`) contains every ID of that trust domain.
    pub fn is_within(&self, prefix: &SpiffeId) -> bool {
        if self.trust_domain != prefix.trust_domain {
            return false;
        }
        match self.path.strip_prefix(prefix.path.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// Why a string is not a valid SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    reason: String,
}

impl ParseError {
    fn new(reason: impl Into<String>) -> Self {
        ParseError {
            reason: reason.into(),
        }
    }

    /// The human reason, e.g. `path has a trailing slash`.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl FromStr for SpiffeId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ParseError::new("empty"));
        }
        if s.len() > MAX_ID_BYTES {
            return Err(ParseError::new(format!("longer than {MAX_ID_BYTES} bytes")));
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(ParseError::new("scheme must be \"spiffe://\" (lowercase)"));
        };
        if rest.contains('?') {
            return Err(ParseError::new("query is not allowed"));
        }
        if rest.contains('#') {
            return Err(ParseError::new("fragment is not allowed"));
        }
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        validate_path(path)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

/// Validates a bare trust domain name (`example.org`), as found in a SPIFFE ID or a config list.
pub fn validate_trust_domain(td: &str) -> Result<(), ParseError> {
    if td.is_empty() {
        return Err(ParseError::new("trust domain is empty"));
    }
    if td.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(ParseError::new(format!(
            "trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
        )));
    }
    if td.contains('@') {
        return Err(ParseError::new("userinfo is not allowed"));
    }
    if td.contains(':') {
        return Err(ParseError::new("port is not allowed"));
    }
    if let Some(c) = td.chars().find(|c| !is_trust_domain_char(*c)) {
        let hint = if c.is_ascii_uppercase() {
            " (trust domains are lowercase)"
        } else {
            ""
        };
        return Err(ParseError::new(format!(
            "trust domain has invalid character {c:?}{hint}; allowed: a-z 0-9 . - _"
        )));
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), ParseError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(ParseError::new("path has a trailing slash"));
    }
    // `path` starts with '/' (it was split at the first one), so the first piece is "".
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err(ParseError::new("path has an empty segment")),
            "." | ".." => {
                return Err(ParseError::new(format!("path has a {segment:?} segment")));
            }
            _ => {}
        }
        if let Some(c) = segment.chars().find(|c| !is_path_char(*c)) {
            return Err(ParseError::new(format!(
                "path has invalid character {c:?}; allowed: A-Z a-z 0-9 . - _"
            )));
        }
    }
    Ok(())
}

fn is_trust_domain_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn err(s: &str) -> String {
        s.parse::<SpiffeId>().unwrap_err().reason().to_owned()
    }

    #[test]
    fn parses_valid_ids() {
        let a = id("spiffe://example.org/ns/logs/loki");
        assert_eq!(a.trust_domain(), "example.org");
        assert_eq!(a.path(), "/ns/logs/loki");
        assert_eq!(a.to_string(), "spiffe://example.org/ns/logs/loki");

        let td = id("spiffe://example.org");
        assert_eq!(td.path(), "");
        assert_eq!(td.to_string(), "spiffe://example.org");

        for ok in [
            "spiffe://a-b_c.9/x",
            "spiffe://td/A.b-C_d/..x/x..",
            "spiffe://td/...",
        ] {
            assert_eq!(id(ok).to_string(), ok);
        }
    }

    #[test]
    fn refuses_invalid_ids_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("https://example.org/x", "scheme"),
            ("SPIFFE://example.org/x", "scheme"),
            ("spiffe:/example.org/x", "scheme"),
            ("spiffe://", "trust domain is empty"),
            ("spiffe:///x", "trust domain is empty"),
            ("spiffe://Example.org/x", "lowercase"),
            ("spiffe://exa mple/x", "invalid character"),
            ("spiffe://example.org:8080/x", "port"),
            ("spiffe://user@example.org/x", "userinfo"),
            ("spiffe://example.org/", "trailing slash"),
            ("spiffe://example.org/x/", "trailing slash"),
            ("spiffe://example.org//x", "empty segment"),
            ("spiffe://example.org/x//y", "empty segment"),
            ("spiffe://example.org/./x", "\".\" segment"),
            ("spiffe://example.org/x/..", "\"..\" segment"),
            ("spiffe://example.org/x?y=1", "query"),
            ("spiffe://example.org/x#frag", "fragment"),
            ("spiffe://example.org/x%20y", "invalid character"),
            ("spiffe://example.org/x y", "invalid character"),
        ];
        for (input, want) in cases {
            let got = err(input);
            assert!(got.contains(want), "{input:?}: got {got:?}, want {want:?}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_BYTES));
        assert!(err(&long).contains("longer than"));
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        assert!(err(&long_td).contains("longer than 255"));
    }

    #[test]
    fn is_within_matches_whole_segments() {
        let prefix = id("spiffe://example.org/loki");
        assert!(id("spiffe://example.org/loki").is_within(&prefix));
        assert!(id("spiffe://example.org/loki/x").is_within(&prefix));
        assert!(id("spiffe://example.org/loki/x/y").is_within(&prefix));
        assert!(!id("spiffe://example.org/loki-evil").is_within(&prefix));
        assert!(!id("spiffe://example.org/lok").is_within(&prefix));
        assert!(!id("spiffe://example.org/other/loki").is_within(&prefix));
        assert!(!id("spiffe://example.org").is_within(&prefix));
        assert!(!id("spiffe://other.org/loki").is_within(&prefix));
        assert!(!id("spiffe://other.org/loki/x").is_within(&prefix));
    }

    #[test]
    fn trust_domain_prefix_contains_all_its_ids() {
        let td = id("spiffe://example.org");
        assert!(id("spiffe://example.org/anything").is_within(&td));
        assert!(id("spiffe://example.org").is_within(&td));
        assert!(!id("spiffe://example.org.evil/x").is_within(&td));
    }
}
