//! The configuration file: raw serde types, then one validation pass into [`Config`], whose
//! values cannot hold an invalid state.
//!
//! This module owns the file as a whole (the top-level keys, `[log]`, `[admin]`) and the
//! shared checks ([`Validator`]); each other table belongs to the module it configures, raw
//! type and validation together: `[sink]` in `loki/config.rs`, `[identity]` in
//! `identity/config.rs`, `[tail]` and `[[sources]]` in `tail/config.rs`, their `stages` in
//! `stage/config.rs`, `[kubernetes]` in `k8s/config.rs`, `[[probes]]` in `probe/mod.rs`.
//!
//! Every error names the file, the key path (`sources[0].labels.job`) and what is expected.
//! Relative paths in the file are resolved against the directory of the file itself, so a config
//! means the same thing whatever the working directory. Loading has no side effects: nothing is
//! created, opened for writing or connected to.

mod check;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::config::{IdentityConfig, RawIdentity, socket_warning};
use crate::loki::config::{RawSink, SinkConfig};
use crate::tail::config::{RawSource, RawTail, SourceConfig, TailConfig};

pub use check::Validator;

/// A configuration error: where it is and what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line of the offending value, when the parser knows it.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `sources[0].start_at`; empty for file-level errors.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub state_dir: PathBuf,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub identity: IdentityConfig,
    /// At least one; the first holds the settings every connection shares (`allow_tls12`) and
    /// the peer policy the identity is checked against.
    pub sinks: Vec<SinkConfig>,
    pub sources: Vec<SourceConfig>,
    pub tail: TailConfig,
    pub probes: Vec<crate::probe::ProbeConfig>,
    pub kubernetes: Option<crate::k8s::KubernetesConfig>,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: std::net::SocketAddr,
}

impl Config {
    /// The first sink: its peer policy is the one the identity is checked against, and its
    /// `allow_tls12` (the same on every sink) applies to the whole process.
    pub fn sink(&self) -> &SinkConfig {
        &self.sinks[0]
    }

    /// Which tenants each source may send to each sink, for every sink the source goes to:
    /// (source, sink, tenants). `None` stands for entries sent without a tenant header.
    pub fn routes(&self) -> Vec<(&SourceConfig, &SinkConfig, Vec<Option<String>>)> {
        let mut out = Vec::new();
        for source in &self.sources {
            let pipelines =
                std::iter::once(&source.stages).chain(source.formats.iter().map(|f| &f.stages));
            for sink in &self.sinks {
                if !(source.sinks.is_empty() || source.sinks.contains(&sink.name)) {
                    continue;
                }
                let mut tenants: Vec<Option<String>> = Vec::new();
                for p in pipelines.clone() {
                    match p.as_ref().map(|p| p.tenants()).unwrap_or_default() {
                        // Without a tenant stage: the pod's choice, or the sink's tenant.
                        [] => {
                            if source.kubernetes
                                && let Some(k) = &self.kubernetes
                            {
                                tenants.extend(k.tenants.iter().cloned().map(Some));
                            }
                            tenants.push(sink.tenant.clone());
                        }
                        staged => tenants.extend(staged.iter().map(|t| Some(t.to_string()))),
                    }
                }
                tenants.sort();
                tenants.dedup();
                out.push((source, sink, tenants));
            }
        }
        out
    }

    /// What is valid but unsafe about the files this config names: a config others can
    /// rewrite (they would choose what ztail trusts), a key others can read (they could
    /// impersonate ztail), a state directory others can write (they could rewind or forge
    /// checkpoints). `ztail check` prints these; `ztail run` logs them at start.
    pub fn permission_warnings(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).ok().map(|m| m.permissions().mode());
        let mut out = Vec::new();
        if let Some(m) = mode(&self.file)
            && m & 0o002 != 0
        {
            out.push(format!(
                "{} is world-writable: anyone on this host can change what ztail trusts (chmod o-w)",
                self.file.display()
            ));
        }
        if let IdentityConfig::Files(files) = &self.identity
            && let Some(m) = mode(&files.key)
            && m & 0o044 != 0
        {
            out.push(format!(
                "the key file {} is readable by its group or others (mode {:o}): they can impersonate ztail (chmod 600)",
                files.key.display(),
                m & 0o777
            ));
        }
        for sink in &self.sinks {
            let policy = &sink.policy;
            if policy.ids().is_empty() && policy.path_prefixes().is_empty() {
                out.push(format!(
                    "sink {:?}: peer allows any workload of trust domain(s) {:?} to act as Loki and receive every log line: name Loki with allowed_ids or allowed_path_prefixes",
                    sink.name,
                    policy.trust_domains().collect::<Vec<_>>()
                ));
            }
        }
        if let IdentityConfig::Spiffe(w) = &self.identity
            && let Some(socket) = w.endpoint.strip_prefix("unix://")
        {
            out.extend(socket_warning(Path::new(socket)));
        }
        if let Some(m) = mode(&self.state_dir)
            && m & 0o022 != 0
        {
            out.push(format!(
                "the state directory {} is writable by its group or others (mode {:o}): they can rewind or forge checkpoints (chmod 700)",
                self.state_dir.display(),
                m & 0o777
            ));
        }
        out
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            key: String::new(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates config text; `path` names the file in errors and anchors relative
    /// paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw = parse_raw(path, text)?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
        Validator {
            file: path,
            base: &base,
        }
        .config(raw)
    }
}

fn parse_raw(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    let err = |line, key: String, reason: String| ConfigError {
        file: path.to_owned(),
        line,
        key,
        reason,
    };
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| err(line_of(e.span()), String::new(), e.message().to_owned()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let key = if key == "." { String::new() } else { key };
        err(line_of(inner.span()), key, inner.message().to_owned())
    })
}

// ---- raw serde types: exactly the file's shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: RawAdmin,
    identity: RawIdentity,
    sink: Option<RawSink>,
    #[serde(default)]
    sinks: Vec<RawSink>,
    #[serde(default)]
    tail: RawTail,
    #[serde(default = "default_true")]
    host_label: bool,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    probes: Vec<crate::probe::RawProbe>,
    kubernetes: Option<crate::k8s::config::RawKubernetes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "default_log_format")]
    format: LogFormat,
    #[serde(default = "default_log_level")]
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_log_format() -> LogFormat {
    LogFormat::Human
}
fn default_log_level() -> String {
    "info".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9311".into()
}

/// A byte size written `"1MiB"`, `"256KiB"`, `"512"` or as a bare integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number and a unit like \"1MiB\"")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}: use B, KiB, MiB, GiB, KB, MB or GB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Int(n)) => Ok(ByteSize(n)),
            Ok(Raw::Str(s)) => s.parse().map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "expected a size such as \"1MiB\" or an integer number of bytes",
            )),
        }
    }
}

// humantime-serde is a one-function crate; this is it, with a message that shows the format.
pub(crate) mod humantime_serde {
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}): expected a value like \"500ms\", \"5s\" or \"2m\""
            ))
        })
    }

    /// For `Option<Duration>` keys (with `#[serde(default)]`).
    pub mod option {
        use std::time::Duration;

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

impl Validator<'_> {
    /// `[sink]` (one sink, named `default`) or `[[sinks]]`, each named.
    fn sinks(
        &self,
        one: Option<RawSink>,
        many: Vec<RawSink>,
    ) -> Result<Vec<SinkConfig>, ConfigError> {
        let named = match (one, many.is_empty()) {
            (Some(_), false) => {
                return Err(self.err(
                    "sinks",
                    "both [sink] and [[sinks]] are set: keep [sink] for one sink, or move it into [[sinks]] with name = \"default\" (that name keeps its positions)",
                ));
            }
            (None, true) => {
                return Err(self.err(
                    "sink",
                    "missing: add a [sink] table (or one [[sinks]] table per Loki)",
                ));
            }
            (Some(mut raw), true) => {
                let name = raw.name.take().unwrap_or_else(|| "default".to_owned());
                vec![("sink".to_owned(), name, raw)]
            }
            (None, false) => {
                let mut out = Vec::with_capacity(many.len());
                for (i, mut raw) in many.into_iter().enumerate() {
                    let key = format!("sinks[{i}]");
                    let name = raw.name.take().ok_or_else(|| {
                        self.err(
                            format!("{key}.name"),
                            "missing: each of several sinks needs a name (it names its positions in the state directory)",
                        )
                    })?;
                    out.push((key, name, raw));
                }
                out
            }
        };
        let mut sinks: Vec<SinkConfig> = Vec::with_capacity(named.len());
        for (key, name, raw) in named {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("invalid sink name {name:?}: 1 to 64 letters, digits, '-' or '_'"),
                ));
            }
            if sinks.iter().any(|s| s.name == name) {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("duplicate sink name {name:?}"),
                ));
            }
            let sink = SinkConfig::validate(self, &key, name, raw)?;
            if let Some(first) = sinks.first()
                && sink.allow_tls12 != first.allow_tls12
            {
                return Err(self.err(
                    format!("{key}.allow_tls12"),
                    "applies to every connection ztail makes: set it the same on every sink",
                ));
            }
            sinks.push(sink);
        }
        Ok(sinks)
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.state_dir.as_os_str().is_empty() {
            return Err(self.err("state_dir", "must name a directory"));
        }
        let admin = AdminConfig {
            listen: raw.admin.listen.parse().map_err(|_| {
                self.err(
                    "admin.listen",
                    format!(
                        "invalid address {:?}: expected ip:port such as \"127.0.0.1:9311\"",
                        raw.admin.listen
                    ),
                )
            })?,
        };
        if !admin.listen.ip().is_loopback() {
            return Err(self.err(
                "admin.listen",
                format!(
                    "{} is not a loopback address: the admin endpoint is unauthenticated, bind it to 127.0.0.1 or ::1",
                    admin.listen
                ),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
            return Err(self.err(
                "log.level",
                format!(
                    "invalid level {:?}: expected error, warn, info, debug or trace",
                    raw.log.level
                ),
            ));
        }
        let identity = IdentityConfig::validate(self, raw.identity)?;
        let sinks = self.sinks(raw.sink, raw.sinks)?;
        let tail = TailConfig::validate(self, raw.tail)?;
        let kubernetes = match raw.kubernetes {
            Some(k) => Some(crate::k8s::KubernetesConfig::validate(self, k, &|name| {
                std::env::var(name).ok()
            })?),
            None => None,
        };
        if raw.sources.is_empty() && raw.probes.is_empty() {
            return Err(self.err(
                "sources",
                "nothing to ship: add a [[sources]] or a [[probes]] table",
            ));
        }
        let mut names = HashSet::new();
        let mut sources = Vec::with_capacity(raw.sources.len());
        for (i, s) in raw.sources.into_iter().enumerate() {
            let key = format!("sources[{i}]");
            if !names.insert(s.name.clone()) {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("duplicate source name {:?}", s.name),
                ));
            }
            for (j, name) in s.sinks.iter().enumerate() {
                if !sinks.iter().any(|k| &k.name == name) {
                    let known: Vec<&str> = sinks.iter().map(|k| k.name.as_str()).collect();
                    return Err(self.err(
                        format!("{key}.sinks[{j}]"),
                        format!("no sink is named {name:?} (the sinks are {known:?})"),
                    ));
                }
            }
            sources.push(SourceConfig::validate(
                self,
                &key,
                s,
                raw.host_label,
                kubernetes.as_ref(),
            )?);
        }
        let state_dir = self.path(&raw.state_dir);
        let mut probes = Vec::with_capacity(raw.probes.len());
        for (i, p) in raw.probes.into_iter().enumerate() {
            let key = format!("probes[{i}]");
            if !names.insert(format!("probe:{}", p.name)) {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("duplicate probe name {:?}", p.name),
                ));
            }
            let probe = crate::probe::ProbeConfig::validate(p, &|rel| self.path(rel))
                .map_err(|(field, reason)| self.err(format!("{key}{field}"), reason))?;
            sources.push(probe.spool_source(&state_dir, raw.host_label));
            probes.push(probe);
        }
        let config = Config {
            file: self.file.to_owned(),
            state_dir,
            probes,
            log: LogConfig {
                format: raw.log.format,
                level: raw.log.level,
            },
            admin,
            identity,
            sinks,
            sources,
            tail,
            kubernetes,
        };
        // A sink with tenants bound to peers sends no other tenant: refuse a route to one.
        for (source, sink, tenants) in config.routes() {
            let Some(bound) = &sink.tenants else { continue };
            let key = match config.sinks.len() {
                1 => "sink.tenants".to_owned(),
                _ => format!(
                    "sinks[{}].tenants",
                    config
                        .sinks
                        .iter()
                        .position(|s| s.name == sink.name)
                        .unwrap_or(0)
                ),
            };
            for t in tenants {
                let why = match &t {
                    Some(t) if bound.contains_key(t) => continue,
                    Some(t) => format!("tenant {t:?} is not bound to a peer"),
                    None => "entries without a tenant (no tenant stage, no pod tenant, no sink tenant) cannot be bound to a peer; set the sink's tenant".to_owned(),
                };
                return Err(self.err(
                    key,
                    format!(
                        "source {:?} may send sink {:?} entries it must not get: {why}. Bind the tenant, or route the source elsewhere with sources[].sinks",
                        source.name, sink.name
                    ),
                ));
            }
        }
        Ok(config)
    }
}

/// The node's host name, for the `host` label.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tail::config::StartAt;
    use crate::tail::timestamp::TsFormat;
    use std::time::Duration;

    const GOOD: &str = r#"
state_dir = "state"
[identity]
source = "files"
cert = "certs/ztail.crt"
key = "certs/ztail.key"
bundle = "certs/ca.crt"
[sink]
url = "https://127.0.0.1:3100/loki/api/v1/push"
[sink.peer]
allowed_ids = ["spiffe://example.org/loki"]
[[sources]]
name = "app"
include = ["logs/*.log"]
labels = { job = "app" }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/ztail/ztail.toml"), text)
    }

    #[test]
    fn journal_sources_are_checked_like_file_sources() {
        let base = GOOD.replace("include = [\"logs/*.log\"]\n", "")
            + "[sources.journal]\nunits = [\"kubelet.service\"]\npriority = \"warning\"\nfields = { unit = \"_SYSTEMD_UNIT\" }\n";
        let c = parse(&base).unwrap();
        let j = c.sources[0].journal.as_ref().expect("a journal source");
        assert!(c.sources[0].include.is_empty());
        assert_eq!(j.priority, Some(4));
        assert_eq!(j.directories[0], Path::new("/var/log/journal"));
        // Stages read the journal's fields by the names given to them.
        let staged = base.clone() + "[[sources.stages]]\ntype = \"labels\"\nfields = [\"unit\"]\n";
        assert!(parse(&staged).is_ok());
        let cases = [
            (
                base.replace("[sources.journal]", "include = [\"x\"]\n[sources.journal]"),
                "sources[0].include",
            ),
            (
                base.replace("\"warning\"", "\"loud\""),
                "sources[0].journal.priority",
            ),
            (
                base.replace("\"_SYSTEMD_UNIT\"", "\"unit\""),
                "sources[0].journal.fields.unit",
            ),
            (
                format!(
                    "host_label = false\n{}",
                    base.replace("labels = { job = \"app\" }", "")
                ),
                "sources[0].labels",
            ),
            (
                base.clone() + "[[sources.stages]]\ntype = \"labels\"\nfields = [\"pid\"]\n",
                "sources[0].stages[0].set.pid",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"));
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn good_config_resolves_relative_paths_against_its_directory() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/ztail/state"));
        assert_eq!(
            c.sources[0].include,
            vec!["/etc/ztail/logs/*.log".to_owned()]
        );
        assert_eq!(c.sink().batch_bytes, 1 << 20);
        assert_eq!(c.sink().batch_wait, Duration::from_secs(1));
        assert_eq!(c.sources[0].framing.max_line, 256 << 10);
        assert_eq!(c.sources[0].start_at, StartAt::End);
    }

    #[test]
    fn cri_sources_label_pods_from_the_kubelet_path_by_default() {
        let c = parse(&format!("{GOOD}format = \"cri\"\n")).unwrap();
        let src = &c.sources[0];
        assert!(src.framing.stream_label());
        let re = src.path_labels.as_ref().expect("the kubernetes default");
        let caps = re
            .captures("/var/log/pods/shop_web-7f9c4_0f1e2d3c-aaaa-bbbb/nginx/0.log")
            .unwrap();
        assert_eq!(&caps["namespace"], "shop");
        assert_eq!(&caps["pod"], "web-7f9c4");
        assert_eq!(&caps["container"], "nginx");
        // Raw sources have no path labels unless asked; an empty regex turns them off.
        assert!(parse(GOOD).unwrap().sources[0].path_labels.is_none());
        let off = parse(&format!("{GOOD}format = \"cri\"\npath_labels = \"\"\n")).unwrap();
        assert!(off.sources[0].path_labels.is_none());
    }

    #[test]
    fn kubernetes_metadata_cannot_claim_ztails_own_names() {
        let k8s = "[kubernetes]\nnode_name = \"n\"\napi_server = \"https://10.0.0.1\"\n";
        let cases = [
            (
                format!("{GOOD}format = \"cri\"\n{k8s}[kubernetes.labels]\nstream = \"pod\"\n"),
                "sources[0].labels",
            ),
            (
                format!("{GOOD}format = \"cri\"\n{k8s}annotation_labels = [\"stream\"]\n"),
                "sources[0].labels",
            ),
            (
                format!(
                    "{GOOD}format = \"cri\"\n{k8s}[kubernetes.metadata]\nagent_spiffe_id = \"pod\"\n"
                ),
                "kubernetes.metadata.agent_spiffe_id",
            ),
            (
                format!("{GOOD}format = \"cri\"\n{k8s}wait = \"5m\"\n"),
                "kubernetes.wait",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text).expect_err(&text);
            assert_eq!(e.key, key, "{e}");
        }
        let ok = parse(&format!(
            "{GOOD}format = \"cri\"\n{k8s}[kubernetes.labels]\napp = \"pod_label:app\"\n"
        ))
        .unwrap();
        assert!(ok.sources[0].kubernetes);
    }

    #[test]
    fn multiline_and_timestamp_settings_are_validated_into_the_framing() {
        let c = parse(&format!(
            "{GOOD}metadata_fields = [\"trace_id\"]\n[sources.multiline]\nstart = '^\\d'\nmax_lines = 50\n[sources.timestamp]\nregex = 'at=(?P<ts>\\S+)'\nformat = \"unix_seconds\"\nzone = \"+02:00\"\n"
        ))
        .unwrap();
        let f = &c.sources[0].framing;
        let ml = f.multiline.as_ref().unwrap();
        assert_eq!((ml.max_lines, ml.max_bytes), (50, 1 << 20));
        assert_eq!(ml.timeout, Duration::from_secs(3));
        let ts = f.timestamp.as_ref().unwrap();
        assert_eq!(
            (ts.group, ts.format, ts.zone),
            (1, TsFormat::UnixSeconds, 7200)
        );
        assert_eq!(f.meta_names(), ["trace_id"]);
        assert!(!f.is_plain());
        assert!(parse(GOOD).unwrap().sources[0].framing.is_plain());
    }

    fn error_of(text: &str) -> String {
        parse(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    #[test]
    fn errors_name_the_key_and_the_reason() {
        let cases = [
            (
                GOOD.replace("name = \"app\"", "name = \"app\"\nbogus = 1"),
                "sources[0].bogus",
                "unknown field `bogus`",
            ),
            (GOOD.replace("https://", "http://"), "sink.url", "not https"),
            (
                GOOD.replace(
                    "[sink.peer]\nallowed_ids = [\"spiffe://example.org/loki\"]\n",
                    "",
                ),
                "sink.peer",
                "never trusts a peer by address",
            ),
            (
                GOOD.replace("job = \"app\"", "\"1job\" = \"app\""),
                "sources[0].labels.1job",
                "invalid label name",
            ),
            (
                GOOD.replace("[sink]\n", "[sink]\nbatch_wait = \"soon\"\n"),
                "sink.batch_wait",
                "invalid duration",
            ),
            (
                GOOD.replace("[sink]\n", "[sink]\nbatch_bytes = \"1 parsec\"\n"),
                "sink.batch_bytes",
                "invalid size unit",
            ),
            (
                GOOD.replace("logs/*.log", "logs/[.log"),
                "sources[0].include[0]",
                "invalid glob",
            ),
            (
                GOOD.replace("spiffe://example.org/loki", "spiffe://Example.org/"),
                "sink.peer",
                "spiffe://Example.org/",
            ),
        ];
        for (text, key, reason) in cases {
            let msg = error_of(&text);
            assert!(msg.starts_with("/etc/ztail/ztail.toml"), "{msg}");
            assert!(
                msg.contains(&format!(": {key}: ")),
                "expected key {key} in: {msg}"
            );
            assert!(msg.contains(reason), "expected {reason:?} in: {msg}");
        }
    }

    #[test]
    fn syntax_errors_carry_a_line_number() {
        let msg = error_of("state_dir = \"x\"\n[sink\n");
        assert!(msg.starts_with("/etc/ztail/ztail.toml:2: "), "{msg}");
    }

    #[test]
    fn workload_api_addresses_are_normalised() {
        let spiffe = |socket: &str| {
            GOOD.replace(
                "source = \"files\"\ncert = \"certs/ztail.crt\"\nkey = \"certs/ztail.key\"\nbundle = \"certs/ca.crt\"",
                &format!("source = \"spiffe\"\nsocket = \"{socket}\"\nhint = \"ztail\""),
            )
        };
        let endpoint = |socket: &str| match parse(&spiffe(socket)).map(|c| c.identity) {
            Ok(IdentityConfig::Spiffe(w)) => Ok(w.endpoint),
            Ok(_) => panic!("not spiffe"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            endpoint("unix:///run/spire/api.sock").unwrap(),
            "unix:///run/spire/api.sock"
        );
        assert_eq!(
            endpoint("unix:/run/spire/api.sock").unwrap(),
            "unix:///run/spire/api.sock"
        );
        assert_eq!(
            endpoint("unix:.demo/api.sock").unwrap(),
            "unix:///etc/ztail/.demo/api.sock"
        );
        assert_eq!(
            endpoint("tcp://127.0.0.1:8081").unwrap(),
            "tcp://127.0.0.1:8081"
        );
        for bad in [
            "unix://relative/api.sock",
            "tcp://localhost:1",
            "http://x",
            "unix:",
        ] {
            let e = endpoint(bad).expect_err(bad);
            assert!(e.contains("identity.socket"), "{e}");
        }
        assert_eq!(endpoint("tcp://[::1]:8081").unwrap(), "tcp://[::1]:8081");
        // Plaintext gRPC carrying the private key: never off the host.
        for remote in ["tcp://10.0.0.5:8081", "tcp://0.0.0.0:8081"] {
            let e = endpoint(remote).expect_err(remote);
            assert!(
                e.contains("identity.socket") && e.contains("not on loopback"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_password_in_a_url_is_refused_and_never_printed() {
        for (text, key) in [
            (GOOD.replace("https://", "https://user:s3cr3t@"), "sink.url"),
            (
                GOOD.replace(
                    "[sink]\n",
                    "[sink]\nproxy = \"http://user:s3cr3t@proxy:3128\"\n",
                ),
                "sink.proxy",
            ),
        ] {
            let msg = error_of(&text);
            assert!(msg.contains(&format!(": {key}: ")), "{msg}");
            assert!(!msg.contains("s3cr3t"), "the password is printed: {msg}");
        }
        let msg = error_of(&GOOD.replace("https://", "https://user:s3cr3t@:bad"));
        assert!(!msg.contains("s3cr3t"), "the password is printed: {msg}");
    }

    #[test]
    fn several_sinks_are_named_and_sources_choose_among_them() {
        let many = GOOD
            .replace("[sink]\n", "[[sinks]]\nname = \"ops\"\n")
            .replace("[sink.peer]", "[sinks.peer]")
            + "sinks = [\"team\"]\n[[sinks]]\nname = \"team\"\nurl = \"https://team:3100/loki/api/v1/push\"\ntenant = \"team\"\n[sinks.peer]\nallowed_ids = [\"spiffe://example.org/team-loki\"]\n";
        let c = parse(&many).unwrap();
        let names: Vec<&str> = c.sinks.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ops", "team"]);
        assert_eq!(c.sinks[1].tenant.as_deref(), Some("team"));
        assert_eq!(c.sources[0].sinks, ["team"]);
        // `[sink]` is the sink named `default`.
        assert_eq!(parse(GOOD).unwrap().sink().name, "default");
        for (text, key, why) in [
            (
                many.replace("sinks = [\"team\"]", "sinks = [\"tema\"]"),
                "sources[0].sinks[0]",
                "no sink is named \"tema\"",
            ),
            (
                many.replace("name = \"team\"", "name = \"ops\""),
                "sinks[1].name",
                "duplicate sink name",
            ),
            (
                many.replace("name = \"team\"", "name = \"a/b\""),
                "sinks[1].name",
                "invalid sink name",
            ),
            (
                many.replace("[[sinks]]\nname = \"team\"\n", "[[sinks]]\n"),
                "sinks[1].name",
                "missing",
            ),
            (
                many.replace("name = \"team\"\n", "name = \"team\"\nallow_tls12 = true\n"),
                "sinks[1].allow_tls12",
                "the same on every sink",
            ),
            (
                many.replace("https://team:3100", "http://team:3100"),
                "sinks[1].url",
                "is not https",
            ),
            (
                format!("{GOOD}[[sinks]]\nname = \"x\"\nurl = \"https://x/\"\n"),
                "sinks",
                "both [sink] and [[sinks]]",
            ),
        ] {
            let msg = error_of(&text);
            assert!(
                msg.contains(&format!(": {key}: ")) && msg.contains(why),
                "{key}: {msg}"
            );
        }
    }

    #[test]
    fn the_proxy_and_tls12_are_off_unless_configured() {
        let c = parse(GOOD).unwrap();
        assert!(c.sink().proxy.is_none() && !c.sink().allow_tls12);
        let c = parse(&GOOD.replace(
            "[sink]\n",
            "[sink]\nproxy = \"http://proxy.internal:3128\"\nallow_tls12 = true\n",
        ))
        .unwrap();
        assert_eq!(
            c.sink().proxy.as_ref().unwrap().as_str(),
            "http://proxy.internal:3128/"
        );
        assert!(c.sink().allow_tls12);
        let msg = error_of(&GOOD.replace("[sink]\n", "[sink]\nproxy = \"socks5://p:1\"\n"));
        assert!(msg.contains(": sink.proxy: "), "{msg}");
    }

    #[test]
    fn compression_is_snappy_for_protobuf_unless_turned_off_and_never_for_json() {
        use crate::loki::config::Compression;
        let with = |sink: &str| GOOD.replace("[sink]\n", &format!("[sink]\n{sink}\n"));
        assert_eq!(parse(GOOD).unwrap().sink().compression, Compression::Snappy);
        let c = parse(&with("compression = \"none\"")).unwrap();
        assert_eq!(c.sink().compression, Compression::None);
        let c = parse(&with("body = \"json\"")).unwrap();
        assert_eq!(c.sink().compression, Compression::None);
        let msg = error_of(&with("body = \"json\"\ncompression = \"snappy\""));
        assert!(
            msg.contains(": sink.compression: ") && msg.contains("protobuf"),
            "{msg}"
        );
        let msg = error_of(&with("compression = \"gzip\""));
        assert!(
            msg.contains("sink.compression") && msg.contains("gzip"),
            "{msg}"
        );
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("256KiB".parse::<ByteSize>().unwrap().0, 256 << 10);
        assert_eq!("10MB".parse::<ByteSize>().unwrap().0, 10_000_000);
        assert_eq!("512".parse::<ByteSize>().unwrap().0, 512);
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("5 parsecs".parse::<ByteSize>().is_err());
    }
}
