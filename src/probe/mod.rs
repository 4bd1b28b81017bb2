//! Health probes (design §6): HTTP and TCP checks on their own intervals, with per-attempt
//! timeouts, retries with backoff, and optional TLS that verifies the target's SPIFFE ID with
//! ztail's own SVID. Each run yields one result, appended as a JSON line to a per-probe spool
//! file in the state directory; the spool is an ordinary source for the tailer, so results reach
//! Loki through the same durable path as log lines (a Loki outage or a restart loses none).

mod run;
mod spool;

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::PeerPolicy;
use crate::loki::labels::{self, LabelSet};
use crate::tail::config::{SourceConfig, StartAt};
use crate::tail::format::{Framing, TimestampRule};
use crate::tail::timestamp::TsFormat;

pub use run::{ProbeStatus, spawn};

/// Label values of every probe stream.
pub const JOB: &str = "ztail-probe";

// ---- raw config: the `[[probes]]` tables ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub name: String,
    kind: Kind,
    target: String,
    #[serde(with = "crate::config::humantime_serde")]
    interval: Duration,
    #[serde(with = "crate::config::humantime_serde")]
    timeout: Duration,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    backoff: RawBackoff,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    method: Option<String>,
    #[serde(default)]
    expect_status: Vec<String>,
    expect_body: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    reuse_connections: bool,
    tls: Option<RawTls>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Http,
    Tcp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
enum RawBackoff {
    Fixed {
        #[serde(with = "crate::config::humantime_serde")]
        delay: Duration,
    },
    Exponential {
        #[serde(with = "crate::config::humantime_serde")]
        initial: Duration,
        #[serde(with = "crate::config::humantime_serde")]
        max: Duration,
    },
}

impl Default for RawBackoff {
    fn default() -> Self {
        RawBackoff::Fixed {
            delay: Duration::from_millis(100),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "lowercase")]
enum RawTls {
    /// Mutual TLS with ztail's SVID; the target must pass this peer policy.
    Spiffe {
        #[serde(default)]
        allowed_ids: Vec<String>,
        #[serde(default)]
        allowed_trust_domains: Vec<String>,
        #[serde(default)]
        allowed_path_prefixes: Vec<String>,
    },
    /// Server-only TLS against a CA bundle (for targets without SPIFFE identities).
    Server { ca: PathBuf },
}

// ---- validated ----

/// Backoff between the attempts of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    Fixed(Duration),
    Exponential { initial: Duration, max: Duration },
}

impl Backoff {
    /// The wait after failed attempt `n` (1-based).
    pub fn after(&self, n: u32) -> Duration {
        match *self {
            Backoff::Fixed(d) => d,
            Backoff::Exponential { initial, max } => initial
                .saturating_mul(1u32 << (n.saturating_sub(1)).min(20))
                .min(max),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Tls {
    Spiffe(PeerPolicy),
    Server(Arc<rustls::ClientConfig>),
}

#[derive(Debug, Clone)]
pub enum Check {
    Tcp {
        host: String,
        port: u16,
    },
    Http {
        url: reqwest::Url,
        host: String,
        port: u16,
        method: hyper::Method,
        expect_status: Vec<RangeInclusive<u16>>,
        expect_body: Option<String>,
        headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    },
}

/// One validated probe.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub name: String,
    pub kind: Kind,
    pub target: String,
    pub check: Check,
    pub interval: Duration,
    pub timeout: Duration,
    pub attempts: u32,
    pub backoff: Backoff,
    pub labels: LabelSet,
    pub tls: Option<Tls>,
    pub reuse_connections: bool,
}

type Invalid = (String, String);

fn invalid(field: &str, reason: impl Into<String>) -> Invalid {
    (format!(".{field}"), reason.into())
}

impl ProbeConfig {
    /// Validates a `[[probes]]` table. Errors are (`.field`, reason); `path` anchors relative
    /// paths at the config file.
    pub fn validate(
        raw: RawProbe,
        path: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<ProbeConfig, Invalid> {
        let name_ok = !raw.name.is_empty()
            && raw.name.len() <= 64
            && raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !raw.name.starts_with('.');
        if !name_ok {
            return Err(invalid(
                "name",
                format!(
                    "invalid probe name {:?}: 1 to 64 of [A-Za-z0-9_.-], not starting with '.'",
                    raw.name
                ),
            ));
        }
        if raw.interval < Duration::from_millis(100) {
            return Err(invalid("interval", "must be at least 100ms"));
        }
        if raw.timeout.is_zero() {
            return Err(invalid("timeout", "must be above zero"));
        }
        if raw.retries > 10 {
            return Err(invalid("retries", "at most 10"));
        }
        let backoff = match raw.backoff {
            RawBackoff::Fixed { delay } => Backoff::Fixed(delay),
            RawBackoff::Exponential { initial, max } => {
                if initial.is_zero() || initial > max {
                    return Err(invalid(
                        "backoff",
                        "initial must be above zero and not above max",
                    ));
                }
                Backoff::Exponential { initial, max }
            }
        };
        let attempts = raw.retries + 1;
        let worst =
            raw.timeout * attempts + (1..attempts).map(|n| backoff.after(n)).sum::<Duration>();
        if worst > raw.interval {
            return Err(invalid(
                "interval",
                format!(
                    "{} is shorter than the worst case of one run ({} = timeout × {attempts} attempts + backoffs): a probe must never overlap itself; raise interval or lower timeout/retries",
                    humantime::format_duration(raw.interval),
                    humantime::format_duration(worst)
                ),
            ));
        }
        let check = match raw.kind {
            Kind::Tcp => {
                for (field, set) in [
                    ("method", raw.method.is_some()),
                    ("expect_status", !raw.expect_status.is_empty()),
                    ("expect_body", raw.expect_body.is_some()),
                    ("headers", !raw.headers.is_empty()),
                ] {
                    if set {
                        return Err(invalid(field, "only for kind = \"http\""));
                    }
                }
                let (host, port) = split_host_port(&raw.target).ok_or_else(|| {
                    invalid(
                        "target",
                        format!("invalid TCP target {:?}: expected host:port", raw.target),
                    )
                })?;
                Check::Tcp { host, port }
            }
            Kind::Http => Self::http_check(&raw)?,
        };
        if let Check::Http { url, .. } = &check
            && (url.scheme() == "https") != raw.tls.is_some()
        {
            return Err(invalid(
                "tls",
                "https targets need a [probes.tls] table (mode = \"spiffe\" or \"server\"), http targets must not have one",
            ));
        }
        let tls = match raw.tls {
            None => None,
            Some(RawTls::Spiffe {
                allowed_ids,
                allowed_trust_domains,
                allowed_path_prefixes,
            }) => Some(Tls::Spiffe(
                PeerPolicy::new(allowed_ids, allowed_trust_domains, allowed_path_prefixes)
                    .map_err(|r| invalid("tls", r))?,
            )),
            Some(RawTls::Server { ca }) => Some(Tls::Server(Arc::new(
                server_tls(&path(&ca)).map_err(|r| invalid("tls.ca", r))?,
            ))),
        };
        let mut set = BTreeMap::new();
        for (name, value) in raw.labels {
            labels::validate_name(&name).map_err(|r| invalid(&format!("labels.{name}"), r))?;
            labels::validate_value(&value).map_err(|r| invalid(&format!("labels.{name}"), r))?;
            if matches!(
                name.as_str(),
                "job" | "probe" | labels::FILENAME | labels::HOST
            ) {
                return Err(invalid(
                    &format!("labels.{name}"),
                    format!("{name:?} is set by ztail for probe results"),
                ));
            }
            set.insert(name, value);
        }
        set.insert("job".to_owned(), JOB.to_owned());
        set.insert("probe".to_owned(), raw.name.clone());
        if set.len() + 2 > labels::MAX_LABELS {
            return Err(invalid(
                "labels",
                "too many labels for Loki's limit of 15 per stream",
            ));
        }
        Ok(ProbeConfig {
            name: raw.name,
            kind: raw.kind,
            target: raw.target,
            check,
            interval: raw.interval,
            timeout: raw.timeout,
            attempts,
            backoff,
            labels: LabelSet::new(set),
            tls,
            reuse_connections: raw.reuse_connections,
        })
    }

    fn http_check(raw: &RawProbe) -> Result<Check, Invalid> {
        let url = reqwest::Url::parse(&raw.target)
            .map_err(|e| invalid("target", format!("invalid URL {:?}: {e}", raw.target)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "target",
                format!("{:?}: only http:// and https:// targets", raw.target),
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| invalid("target", "URL without a host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let method = match raw.method.as_deref().unwrap_or("GET") {
            "GET" => hyper::Method::GET,
            "HEAD" => hyper::Method::HEAD,
            other => return Err(invalid("method", format!("{other:?}: GET or HEAD"))),
        };
        let mut expect_status = Vec::new();
        for s in if raw.expect_status.is_empty() {
            vec!["200-299".to_owned()]
        } else {
            raw.expect_status.clone()
        } {
            let parse = |v: &str| {
                v.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
            };
            let range = match s.split_once('-') {
                Some((a, b)) => parse(a)
                    .zip(parse(b))
                    .filter(|(a, b)| a <= b)
                    .map(|(a, b)| a..=b),
                None => parse(&s).map(|c| c..=c),
            };
            expect_status.push(range.ok_or_else(|| {
                invalid(
                    "expect_status",
                    format!("{s:?}: a status like \"200\" or a range like \"200-299\""),
                )
            })?);
        }
        if method == hyper::Method::HEAD && raw.expect_body.is_some() {
            return Err(invalid("expect_body", "a HEAD response has no body"));
        }
        let mut headers = Vec::new();
        for (k, v) in &raw.headers {
            let name = hyper::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| invalid(&format!("headers.{k}"), "invalid header name"))?;
            let value = hyper::header::HeaderValue::from_str(v)
                .map_err(|_| invalid(&format!("headers.{k}"), "invalid header value"))?;
            headers.push((name, value));
        }
        Ok(Check::Http {
            url,
            host,
            port,
            method,
            expect_status,
            expect_body: raw.expect_body.clone(),
            headers,
        })
    }

    /// Where this probe's results are spooled.
    pub fn spool_path(&self, state_dir: &Path) -> PathBuf {
        state_dir.join("probes").join(format!("{}.log", self.name))
    }

    /// The source that ships this probe's spool (an ordinary file source).
    pub fn spool_source(&self, state_dir: &Path, host_label: bool) -> SourceConfig {
        let mut labels = self.labels.clone();
        if host_label {
            labels = labels.with(labels::HOST, &crate::config::hostname());
        }
        SourceConfig {
            name: format!("probe:{}", self.name),
            include: vec![glob::Pattern::escape(
                &self.spool_path(state_dir).to_string_lossy(),
            )],
            exclude: globset::GlobSet::empty(),
            start_at: StartAt::Beginning,
            labels,
            partial_line_timeout: Duration::from_secs(1),
            rotate_wait: Duration::from_secs(10),
            framing: Arc::new(spool_framing()),
            path_labels: None,
            follow_symlinks_under: Vec::new(),
            stages: None,
            kubernetes: false,
            formats: Vec::new(),
            journal: None,
            sinks: Vec::new(),
        }
    }
}

/// Results keep the time their run started, also when they are shipped late (after an outage).
fn spool_framing() -> Framing {
    let mut framing = Framing::raw(64 << 10);
    framing.timestamp = Some(TimestampRule {
        // ProbeResult serializes `ts` first.
        regex: regex::bytes::Regex::new(r#"^\{"ts":"([^"]+)""#).expect("a valid constant regex"),
        group: 1,
        format: TsFormat::Rfc3339,
        zone: 0,
    });
    framing
}

fn split_host_port(target: &str) -> Option<(String, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

fn server_tls(ca: &Path) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no CA certificate", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// One run's result, as spooled and shipped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeResult {
    /// Start of the run (RFC 3339, UTC).
    pub ts: String,
    pub probe: String,
    pub kind: Kind,
    pub target: String,
    pub ok: bool,
    pub attempts: u32,
    /// HTTP status of the last attempt, if one was received.
    pub status: Option<u16>,
    /// Error kind of the last attempt when not ok: refused, timeout, tls_peer_refused,
    /// tls_error, status_mismatch, body_mismatch, dns, connect_error, http_error.
    pub error: Option<String>,
    /// Latency of the successful or last attempt.
    pub latency_ms: f64,
    /// The peer's SPIFFE ID when TLS was used and the peer had one.
    pub peer_spiffe_id: Option<String>,
}

/// Last results, shared with `/status`.
pub type LastResults = Arc<Mutex<BTreeMap<String, ProbeResult>>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(extra: &str) -> Result<ProbeConfig, Invalid> {
        let text = format!(
            "name = \"api\"\nkind = \"http\"\ntarget = \"http://127.0.0.1:8080/healthz\"\ninterval = \"10s\"\ntimeout = \"1s\"\n{extra}"
        );
        let raw: RawProbe = toml::from_str(&text).map_err(|e| (String::new(), e.to_string()))?;
        ProbeConfig::validate(raw, &|p| p.to_owned())
    }

    #[test]
    fn worst_case_must_fit_in_the_interval() {
        assert!(raw("retries = 2\nbackoff = { kind = \"fixed\", delay = \"1s\" }").is_ok());
        let (field, reason) = raw(
            "retries = 5\nbackoff = { kind = \"exponential\", initial = \"1s\", max = \"4s\" }",
        )
        .unwrap_err();
        assert_eq!(field, ".interval");
        assert!(reason.contains("worst case"), "{reason}");
    }

    #[test]
    fn targets_statuses_and_tls_are_checked() {
        assert_eq!(
            raw("expect_status = [\"200\", \"300-399\"]")
                .unwrap()
                .attempts,
            1
        );
        assert_eq!(
            raw("expect_status = [\"2xx\"]").unwrap_err().0,
            ".expect_status"
        );
        assert_eq!(raw("method = \"POST\"").unwrap_err().0, ".method");
        let e = raw("").map(|_| ()).and_then(|_| {
            let text = "name = \"a b\"\nkind = \"tcp\"\ntarget = \"x:1\"\ninterval = \"1s\"\ntimeout = \"100ms\"";
            ProbeConfig::validate(toml::from_str(text).unwrap(), &|p| p.to_owned()).map(|_| ())
        });
        assert_eq!(e.unwrap_err().0, ".name");
        let https = "name = \"s\"\nkind = \"http\"\ntarget = \"https://127.0.0.1/\"\ninterval = \"1s\"\ntimeout = \"100ms\"";
        let e =
            ProbeConfig::validate(toml::from_str(https).unwrap(), &|p| p.to_owned()).unwrap_err();
        assert_eq!(e.0, ".tls");
        let tcp = "name = \"t\"\nkind = \"tcp\"\ntarget = \"localhost\"\ninterval = \"1s\"\ntimeout = \"100ms\"";
        assert_eq!(
            ProbeConfig::validate(toml::from_str(tcp).unwrap(), &|p| p.to_owned())
                .unwrap_err()
                .0,
            ".target"
        );
    }

    #[test]
    fn exponential_backoff_doubles_up_to_its_cap() {
        let b = Backoff::Exponential {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
        };
        let waits: Vec<u128> = (1..5).map(|n| b.after(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
    }
}
