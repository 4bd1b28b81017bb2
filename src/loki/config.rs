//! The `[sink]` table: where and how ztail pushes, and which peers it accepts as Loki.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{ByteSize, ConfigError, Validator, humantime_serde};
use crate::identity::PeerPolicy;

/// The push body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// Protobuf `PushRequest`, snappy block compressed (what Promtail and Alloy send).
    Protobuf,
    /// Loki's JSON body.
    Json,
}

/// How a protobuf body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Snappy, what Promtail and Alloy send: a third of the bytes, about 60 % of ztail's CPU.
    Snappy,
    /// Snappy's format with nothing compressed (Loki reads every protobuf body as snappy): no
    /// compression CPU, about three times the bytes.
    None,
}

#[derive(Debug)]
pub struct SinkConfig {
    /// `default` for the `[sink]` table; names the sink's checkpoint file and metrics.
    pub name: String,
    pub url: reqwest::Url,
    pub tenant: Option<String>,
    pub body: BodyFormat,
    /// For protobuf bodies; JSON bodies are sent as they are.
    pub compression: Compression,
    pub batch_bytes: usize,
    pub batch_wait: Duration,
    pub max_in_flight: usize,
    pub timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub shutdown_timeout: Duration,
    /// Attach ztail's own SPIFFE ID to every entry as structured metadata.
    pub provenance: bool,
    pub policy: PeerPolicy,
    /// An HTTP(S) proxy for pushes (CONNECT; TLS stays end to end). Never from the environment.
    pub proxy: Option<reqwest::Url>,
    /// Tenants bound to peers: when set, this sink sends only these tenants, each only to a
    /// peer whose SPIFFE ID is listed for it (checked in the handshake).
    pub tenants: Option<std::collections::BTreeMap<String, PeerPolicy>>,
    /// Accept TLS 1.2 as well as 1.3 (off by default: TLS 1.2 sends ztail's certificate, with
    /// its SPIFFE ID, in the clear). Applies to every connection ztail makes.
    pub allow_tls12: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSink {
    pub(crate) name: Option<String>,
    url: String,
    tenant: Option<String>,
    #[serde(default = "default_body")]
    body: BodyFormat,
    compression: Option<Compression>,
    #[serde(default = "default_batch_bytes")]
    batch_bytes: ByteSize,
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    batch_wait: Duration,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: usize,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_min_backoff", with = "humantime_serde")]
    min_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    max_backoff: Duration,
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    shutdown_timeout: Duration,
    #[serde(default)]
    provenance: bool,
    peer: Option<RawPeer>,
    proxy: Option<String>,
    #[serde(default)]
    allow_tls12: bool,
    #[serde(default)]
    tenants: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    #[serde(default)]
    allowed_ids: Vec<String>,
    #[serde(default)]
    allowed_trust_domains: Vec<String>,
    #[serde(default)]
    allowed_path_prefixes: Vec<String>,
}

fn default_body() -> BodyFormat {
    BodyFormat::Protobuf
}
fn default_batch_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_batch_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_max_in_flight() -> usize {
    4
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_min_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}

impl SinkConfig {
    pub(crate) fn validate(
        v: &Validator,
        key: &str,
        name: String,
        raw: RawSink,
    ) -> Result<SinkConfig, ConfigError> {
        let url = reqwest::Url::parse(&raw.url).map_err(|e| {
            v.err(
                format!("{key}.url"),
                format!("invalid URL {:?}: {e}", without_userinfo(&raw.url)),
            )
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(v.err(
                format!("{key}.url"),
                format!(
                    "{:?} carries a user name or password: ztail authenticates to Loki with its SPIFFE identity over mutual TLS, never with a password in a URL; remove it (and change the password, it was in a config file)",
                    without_userinfo(&raw.url)
                ),
            ));
        }
        let proxy = match &raw.proxy {
            None => None,
            Some(p) => {
                let proxy = reqwest::Url::parse(p).map_err(|e| {
                    v.err(
                        format!("{key}.proxy"),
                        format!("invalid URL {:?}: {e}", without_userinfo(p)),
                    )
                })?;
                if !matches!(proxy.scheme(), "http" | "https") || proxy.host().is_none() {
                    return Err(v.err(
                        format!("{key}.proxy"),
                        format!(
                            "{:?} is not an http:// or https:// proxy address",
                            without_userinfo(p)
                        ),
                    ));
                }
                if !proxy.username().is_empty() || proxy.password().is_some() {
                    return Err(v.err(
                format!("{key}.proxy"),
                        "a user name or password in the proxy URL is not supported (it would be printed and kept in memory as text); use a proxy that admits ztail's host",
                    ));
                }
                Some(proxy)
            }
        };
        if url.scheme() != "https" {
            return Err(v.err(
                format!("{key}.url"),
                format!(
                    "{:?} is not https: ztail only ships over mutual TLS, use https://host:port/loki/api/v1/push",
                    raw.url
                ),
            ));
        }
        if url.host().is_none() {
            return Err(v.err(format!("{key}.url"), format!("{:?} has no host", raw.url)));
        }
        if let Some(t) = &raw.tenant
            && (t.is_empty() || t.len() > 150 || t.contains(['|', '\n', '\r']))
        {
            return Err(v.err(
                format!("{key}.tenant"),
                format!("invalid tenant {t:?}: 1 to 150 characters, no '|' or line breaks"),
            ));
        }
        let peer = raw.peer.ok_or_else(|| {
            v.err(
                format!("{key}.peer"),
                "missing: set allowed_ids, allowed_trust_domains or allowed_path_prefixes \
                 (ztail never trusts a peer by address; the default is deny)",
            )
        })?;
        let policy = PeerPolicy::new(
            peer.allowed_ids,
            peer.allowed_trust_domains,
            peer.allowed_path_prefixes,
        )
        .map_err(|reason| v.err(format!("{key}.peer"), reason))?;
        if raw.max_in_flight == 0 || raw.max_in_flight > 64 {
            return Err(v.err(format!("{key}.max_in_flight"), "must be between 1 and 64"));
        }
        if raw.min_backoff.is_zero() || raw.min_backoff > raw.max_backoff {
            return Err(v.err(
                format!("{key}.min_backoff"),
                format!("must be above zero and not above {key}.max_backoff"),
            ));
        }
        let compression = match (raw.body, raw.compression) {
            (BodyFormat::Json, Some(Compression::Snappy)) => {
                return Err(v.err(
                    format!("{key}.compression"),
                    "snappy applies to protobuf bodies; JSON bodies are sent uncompressed \
                     (remove compression, or use body = \"protobuf\")",
                ));
            }
            (BodyFormat::Json, _) => Compression::None,
            (BodyFormat::Protobuf, c) => c.unwrap_or(Compression::Snappy),
        };
        let mut tenants = std::collections::BTreeMap::new();
        for (tenant, ids) in raw.tenants {
            let k = format!("{key}.tenants.{tenant}");
            crate::stage::config::validate_tenant(&tenant).map_err(|r| v.err(&k, r))?;
            if ids.is_empty() {
                return Err(v.err(
                    &k,
                    "lists no SPIFFE ID: name the Loki (or gateway) that may receive this tenant",
                ));
            }
            let bound = PeerPolicy::new(ids, vec![], vec![]).map_err(|r| v.err(&k, r))?;
            for id in bound.ids() {
                if let Err(refusal) = policy.check(id) {
                    return Err(v.err(
                        &k,
                        format!(
                            "{id} is not allowed by {key}.peer ({}): a tenant can only be bound to a peer the sink accepts",
                            refusal.reason()
                        ),
                    ));
                }
            }
            tenants.insert(tenant, bound);
        }
        Ok(SinkConfig {
            tenants: (!tenants.is_empty()).then_some(tenants),
            name,
            url,
            tenant: raw.tenant,
            body: raw.body,
            compression,
            batch_bytes: v.size_between(
                &format!("{key}.batch_bytes"),
                raw.batch_bytes,
                1 << 10,
                64 << 20,
            )?,
            batch_wait: v.positive(&format!("{key}.batch_wait"), raw.batch_wait)?,
            max_in_flight: raw.max_in_flight,
            timeout: v.positive(&format!("{key}.timeout"), raw.timeout)?,
            min_backoff: raw.min_backoff,
            max_backoff: raw.max_backoff,
            shutdown_timeout: raw.shutdown_timeout,
            provenance: raw.provenance,
            policy,
            proxy,
            allow_tls12: raw.allow_tls12,
        })
    }
}

/// A URL as it may be printed: any `user:password@` replaced by `***@`.
fn without_userinfo(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let host_start = url[scheme_end + 3..]
                .find('/')
                .map_or(url.len(), |i| i + scheme_end + 3);
            if at < host_start {
                return format!("{}***{}", &url[..scheme_end + 3], &url[at..]);
            }
            url.to_owned()
        }
        _ => url.to_owned(),
    }
}
