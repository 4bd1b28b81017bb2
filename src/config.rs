//! The configuration file: raw serde types, then one validation pass into [`Config`], whose
//! values cannot hold an invalid state.
//!
//! Every error names the file, the key path (`sources[0].labels.job`) and what is expected.
//! Relative paths in the file are resolved against the directory of the file itself, so a config
//! means the same thing whatever the working directory. Loading has no side effects: nothing is
//! created, opened for writing or connected to.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::identity::PeerPolicy;
use crate::identity::files::FilesConfig;
use crate::identity::workload::WorkloadConfig;
use crate::loki::labels::{self, LabelSet};
use crate::tail::format::{self, Format, Framing, Multiline, StreamAs, TimestampRule};
use crate::tail::timestamp::{TsFormat, parse_zone};

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

/// Where lines of a file found at ztail's very first start begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    Beginning,
    End,
}

/// The push body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// Protobuf `PushRequest`, snappy block compressed (what Promtail and Alloy send).
    Protobuf,
    /// Loki's JSON body.
    Json,
}

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
    pub sink: SinkConfig,
    pub sources: Vec<SourceConfig>,
    pub tail: TailConfig,
    pub probes: Vec<crate::probe::ProbeConfig>,
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

#[derive(Debug)]
pub enum IdentityConfig {
    /// PEM files written by spiffe-helper, `spire-agent api fetch x509 -write` or `certs-dev/`.
    Files(FilesConfig),
    /// The SPIFFE Workload API of a SPIRE agent.
    Spiffe(WorkloadConfig),
}

#[derive(Debug)]
pub struct SinkConfig {
    pub url: reqwest::Url,
    pub tenant: Option<String>,
    pub body: BodyFormat,
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
    /// Accept TLS 1.2 as well as 1.3 (off by default: TLS 1.2 sends ztail's certificate, with
    /// its SPIFFE ID, in the clear). Applies to every connection ztail makes.
    pub allow_tls12: bool,
}

#[derive(Debug, Clone)]
pub struct TailConfig {
    pub rescan_interval: Duration,
    pub checkpoint_interval: Duration,
    pub read_buffer: usize,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    /// Absolute glob patterns.
    pub include: Vec<String>,
    pub exclude: GlobSet,
    pub start_at: StartAt,
    /// Static labels; `filename` (and `host` unless disabled) are added per file.
    pub labels: LabelSet,
    pub partial_line_timeout: Duration,
    pub rotate_wait: Duration,
    /// What a line becomes: format, multiline, timestamps, metadata.
    pub framing: Arc<Framing>,
    /// Labels captured from each file's path by the regex's named groups.
    pub path_labels: Option<regex::Regex>,
    /// A symlink the globs match is followed only if its target matches them too or lies under
    /// one of these directories (`/var/log/containers` links into `/var/log/pods`).
    pub follow_symlinks_under: Vec<PathBuf>,
}

impl Config {
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
        let policy = &self.sink.policy;
        if policy.ids().is_empty() && policy.path_prefixes().is_empty() {
            out.push(format!(
                "sink.peer allows any workload of trust domain(s) {:?} to act as Loki and receive every log line: name Loki with allowed_ids or allowed_path_prefixes",
                policy.trust_domains().collect::<Vec<_>>()
            ));
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
    sink: RawSink,
    #[serde(default)]
    tail: RawTail,
    #[serde(default = "default_true")]
    host_label: bool,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    probes: Vec<crate::probe::RawProbe>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "source", rename_all = "lowercase")]
enum RawIdentity {
    Files {
        cert: PathBuf,
        key: PathBuf,
        bundle: PathBuf,
    },
    Spiffe {
        socket: Option<String>,
        hint: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    url: String,
    tenant: Option<String>,
    #[serde(default = "default_body")]
    body: BodyFormat,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTail {
    #[serde(default = "default_rescan", with = "humantime_serde")]
    rescan_interval: Duration,
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    checkpoint_interval: Duration,
    #[serde(default = "default_read_buffer")]
    read_buffer: ByteSize,
}

impl Default for RawTail {
    fn default() -> Self {
        RawTail {
            rescan_interval: default_rescan(),
            checkpoint_interval: default_checkpoint_interval(),
            read_buffer: default_read_buffer(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default = "default_start_at")]
    start_at: StartAt,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "default_max_line")]
    max_line_bytes: ByteSize,
    #[serde(default = "default_partial_timeout", with = "humantime_serde")]
    partial_line_timeout: Duration,
    #[serde(default = "default_rotate_wait", with = "humantime_serde")]
    rotate_wait: Duration,
    #[serde(default)]
    format: Format,
    #[serde(default)]
    stream_as: StreamAs,
    path_labels: Option<String>,
    multiline: Option<RawMultiline>,
    timestamp: Option<RawTimestamp>,
    #[serde(default)]
    metadata_fields: Vec<String>,
    #[serde(default = "default_max_future", with = "humantime_serde")]
    max_future: Duration,
    #[serde(default)]
    follow_symlinks_under: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMultiline {
    start: String,
    #[serde(default = "default_multiline_lines")]
    max_lines: usize,
    max_bytes: Option<ByteSize>,
    #[serde(default = "default_multiline_timeout", with = "humantime_serde")]
    timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimestamp {
    regex: String,
    #[serde(default = "default_ts_format")]
    format: String,
    #[serde(default = "default_zone")]
    zone: String,
}

/// The `path_labels` of `cri` and `docker` sources unless set: namespace, pod and container of
/// the kubelet's `/var/log/pods/<namespace>_<pod>_<uid>/<container>/<n>.log` (the pod UID is
/// left out: a label per pod restart would multiply streams).
pub const KUBERNETES_PATH_LABELS: &str =
    r"^/var/log/pods/(?P<namespace>[^/_]+)_(?P<pod>[^/_]+)_[^/]+/(?P<container>[^/]+)/";

fn default_multiline_lines() -> usize {
    500
}
fn default_multiline_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_ts_format() -> String {
    "rfc3339".into()
}
fn default_zone() -> String {
    "UTC".into()
}
fn default_max_future() -> Duration {
    format::DEFAULT_MAX_FUTURE
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
fn default_rescan() -> Duration {
    Duration::from_secs(10)
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_read_buffer() -> ByteSize {
    ByteSize(256 << 10)
}
fn default_start_at() -> StartAt {
    StartAt::End
}
fn default_max_line() -> ByteSize {
    ByteSize(256 << 10)
}
fn default_partial_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_rotate_wait() -> Duration {
    Duration::from_secs(10)
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
}

/// Whether others could replace the Workload API socket with one of their own (which would
/// hand ztail their SVID and trust bundle): its directory writable by its group or others, or
/// the socket or its directory owned by someone other than root, the agent (the socket's owner)
/// and ztail's user. The socket's own mode does not matter: every workload must connect to it.
fn socket_warning(socket: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = socket.parent()?;
    let dir_meta = std::fs::metadata(dir).ok()?;
    let agent = std::fs::symlink_metadata(socket).ok().map(|m| m.uid());
    let me = rustix::process::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me || Some(uid) == agent;
    if dir_meta.mode() & 0o022 != 0 {
        return Some(format!(
            "the Workload API socket's directory {} is writable by its group or others (mode {:o}): they could replace the socket and hand ztail an identity and trust bundle of their own (chmod go-w)",
            dir.display(),
            dir_meta.mode() & 0o777
        ));
    }
    if !trusted(dir_meta.uid()) {
        return Some(format!(
            "the Workload API socket's directory {} belongs to uid {}, neither root, the agent nor ztail's user: that user could replace the socket",
            dir.display(),
            dir_meta.uid()
        ));
    }
    None
}

// ---- validation ----

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

struct Validator<'a> {
    file: &'a Path,
    base: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: None,
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
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
        let identity = match raw.identity {
            RawIdentity::Files { cert, key, bundle } => IdentityConfig::Files(FilesConfig {
                cert: self.path(&cert),
                key: self.path(&key),
                bundle: self.path(&bundle),
            }),
            RawIdentity::Spiffe { socket, hint } => {
                let endpoint = match socket {
                    Some(s) => s,
                    None => std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|_| {
                        self.err(
                            "identity.socket",
                            "not set and SPIFFE_ENDPOINT_SOCKET is empty: name the SPIRE agent's Workload API socket, e.g. \"unix:///tmp/spire-agent/public/api.sock\"",
                        )
                    })?,
                };
                let endpoint = self
                    .workload_endpoint(&endpoint)
                    .map_err(|reason| self.err("identity.socket", reason))?;
                if hint.as_deref() == Some("") {
                    return Err(self.err(
                        "identity.hint",
                        "must not be empty (omit it to take the default SVID)",
                    ));
                }
                IdentityConfig::Spiffe(WorkloadConfig { endpoint, hint })
            }
        };
        let sink = self.sink(raw.sink)?;
        let tail = TailConfig {
            rescan_interval: self.positive("tail.rescan_interval", raw.tail.rescan_interval)?,
            checkpoint_interval: self
                .positive("tail.checkpoint_interval", raw.tail.checkpoint_interval)?,
            read_buffer: self.size_between(
                "tail.read_buffer",
                raw.tail.read_buffer,
                4 << 10,
                64 << 20,
            )?,
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
            sources.push(self.source(&key, s, raw.host_label)?);
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
        Ok(Config {
            file: self.file.to_owned(),
            state_dir,
            probes,
            log: LogConfig {
                format: raw.log.format,
                level: raw.log.level,
            },
            admin,
            identity,
            sink,
            sources,
            tail,
        })
    }

    fn sink(&self, raw: RawSink) -> Result<SinkConfig, ConfigError> {
        let url = reqwest::Url::parse(&raw.url).map_err(|e| {
            self.err(
                "sink.url",
                format!("invalid URL {:?}: {e}", without_userinfo(&raw.url)),
            )
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.err(
                "sink.url",
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
                    self.err(
                        "sink.proxy",
                        format!("invalid URL {:?}: {e}", without_userinfo(p)),
                    )
                })?;
                if !matches!(proxy.scheme(), "http" | "https") || proxy.host().is_none() {
                    return Err(self.err(
                        "sink.proxy",
                        format!(
                            "{:?} is not an http:// or https:// proxy address",
                            without_userinfo(p)
                        ),
                    ));
                }
                if !proxy.username().is_empty() || proxy.password().is_some() {
                    return Err(self.err(
                        "sink.proxy",
                        "a user name or password in the proxy URL is not supported (it would be printed and kept in memory as text); use a proxy that admits ztail's host",
                    ));
                }
                Some(proxy)
            }
        };
        if url.scheme() != "https" {
            return Err(self.err(
                "sink.url",
                format!(
                    "{:?} is not https: ztail only ships over mutual TLS, use https://host:port/loki/api/v1/push",
                    raw.url
                ),
            ));
        }
        if url.host().is_none() {
            return Err(self.err("sink.url", format!("{:?} has no host", raw.url)));
        }
        if let Some(t) = &raw.tenant
            && (t.is_empty() || t.len() > 150 || t.contains(['|', '\n', '\r']))
        {
            return Err(self.err(
                "sink.tenant",
                format!("invalid tenant {t:?}: 1 to 150 characters, no '|' or line breaks"),
            ));
        }
        let peer = raw.peer.ok_or_else(|| {
            self.err(
                "sink.peer",
                "missing: set allowed_ids, allowed_trust_domains or allowed_path_prefixes \
                 (ztail never trusts a peer by address; the default is deny)",
            )
        })?;
        let policy = PeerPolicy::new(
            peer.allowed_ids,
            peer.allowed_trust_domains,
            peer.allowed_path_prefixes,
        )
        .map_err(|reason| self.err("sink.peer", reason))?;
        if raw.max_in_flight == 0 || raw.max_in_flight > 64 {
            return Err(self.err("sink.max_in_flight", "must be between 1 and 64"));
        }
        if raw.min_backoff.is_zero() || raw.min_backoff > raw.max_backoff {
            return Err(self.err(
                "sink.min_backoff",
                "must be above zero and not above sink.max_backoff",
            ));
        }
        Ok(SinkConfig {
            url,
            tenant: raw.tenant,
            body: raw.body,
            batch_bytes: self.size_between(
                "sink.batch_bytes",
                raw.batch_bytes,
                1 << 10,
                64 << 20,
            )?,
            batch_wait: self.positive("sink.batch_wait", raw.batch_wait)?,
            max_in_flight: raw.max_in_flight,
            timeout: self.positive("sink.timeout", raw.timeout)?,
            min_backoff: raw.min_backoff,
            max_backoff: raw.max_backoff,
            shutdown_timeout: raw.shutdown_timeout,
            provenance: raw.provenance,
            policy,
            proxy,
            allow_tls12: raw.allow_tls12,
        })
    }

    fn source(
        &self,
        key: &str,
        s: RawSource,
        host_label: bool,
    ) -> Result<SourceConfig, ConfigError> {
        if s.name.is_empty() {
            return Err(self.err(format!("{key}.name"), "must not be empty"));
        }
        if s.include.is_empty() {
            return Err(self.err(format!("{key}.include"), "needs at least one glob pattern"));
        }
        let mut include = Vec::with_capacity(s.include.len());
        for (j, pattern) in s.include.iter().enumerate() {
            let abs = self.path(Path::new(pattern));
            let abs = abs.to_str().ok_or_else(|| {
                self.err(format!("{key}.include[{j}]"), "pattern is not valid UTF-8")
            })?;
            glob::Pattern::new(abs).map_err(|e| {
                self.err(
                    format!("{key}.include[{j}]"),
                    format!("invalid glob {pattern:?}: {e}"),
                )
            })?;
            include.push(abs.to_owned());
        }
        let mut exclude = GlobSetBuilder::new();
        for (j, pattern) in s.exclude.iter().enumerate() {
            let abs = self.path(Path::new(pattern));
            let glob = Glob::new(&abs.to_string_lossy()).map_err(|e| {
                self.err(
                    format!("{key}.exclude[{j}]"),
                    format!("invalid glob {pattern:?}: {e}"),
                )
            })?;
            exclude.add(glob);
        }
        let exclude = exclude
            .build()
            .map_err(|e| self.err(format!("{key}.exclude"), e.to_string()))?;

        let mut reserved = vec![labels::FILENAME];
        if host_label {
            reserved.push(labels::HOST);
        }
        let mut set = BTreeMap::new();
        for (name, value) in s.labels {
            let k = format!("{key}.labels.{name}");
            labels::validate_name(&name).map_err(|r| self.err(&k, r))?;
            if reserved.contains(&name.as_str()) {
                return Err(self.err(&k, format!("{name:?} is set by ztail for every file")));
            }
            labels::validate_value(&value).map_err(|r| self.err(&k, r))?;
            set.insert(name, value);
        }
        if host_label {
            set.insert(labels::HOST.to_owned(), hostname());
        }
        let max_line_bytes = self.size_between(
            &format!("{key}.max_line_bytes"),
            s.max_line_bytes,
            64,
            64 << 20,
        )?;

        let multiline = match s.multiline {
            None => None,
            Some(m) => {
                let start = regex::bytes::Regex::new(&m.start).map_err(|e| {
                    self.err(
                        format!("{key}.multiline.start"),
                        format!("invalid regex: {e}"),
                    )
                })?;
                if m.max_lines == 0 {
                    return Err(
                        self.err(format!("{key}.multiline.max_lines"), "must be above zero")
                    );
                }
                let max_bytes = match m.max_bytes {
                    None => max_line_bytes.max(1 << 20),
                    Some(b) => self.size_between(
                        &format!("{key}.multiline.max_bytes"),
                        b,
                        max_line_bytes as u64,
                        64 << 20,
                    )?,
                };
                Some(Multiline {
                    start,
                    max_lines: m.max_lines,
                    max_bytes,
                    timeout: self.positive(&format!("{key}.multiline.timeout"), m.timeout)?,
                })
            }
        };
        let timestamp = match s.timestamp {
            None => None,
            Some(_) if s.format != Format::Raw => {
                return Err(self.err(
                    format!("{key}.timestamp"),
                    "applies to raw sources only: cri and docker entries carry the runtime's timestamp",
                ));
            }
            Some(t) => {
                let regex = regex::bytes::Regex::new(&t.regex).map_err(|e| {
                    self.err(
                        format!("{key}.timestamp.regex"),
                        format!("invalid regex: {e}"),
                    )
                })?;
                let group = regex
                    .capture_names()
                    .position(|n| n == Some("ts"))
                    .unwrap_or(if regex.captures_len() > 1 { 1 } else { 0 });
                let format = TsFormat::from_name(&t.format).ok_or_else(|| {
                    self.err(
                        format!("{key}.timestamp.format"),
                        format!("unknown format {:?}: use rfc3339, unix_seconds, unix_millis, unix_micros or unix_nanos", t.format),
                    )
                })?;
                let zone = parse_zone(&t.zone).ok_or_else(|| {
                    self.err(
                        format!("{key}.timestamp.zone"),
                        format!("invalid zone {:?}: use \"UTC\" or a fixed offset like \"+02:00\" (named zones with daylight saving are not supported; such logs must carry their offset)", t.zone),
                    )
                })?;
                Some(TimestampRule {
                    regex,
                    group,
                    format,
                    zone,
                })
            }
        };
        let framing = Framing {
            format: s.format,
            stream_as: s.stream_as,
            multiline,
            timestamp,
            json_fields: s.metadata_fields,
            max_future: s.max_future,
            max_line: max_line_bytes,
        };
        let mut seen = HashSet::new();
        for (j, name) in framing.json_fields.iter().enumerate() {
            let k = format!("{key}.metadata_fields[{j}]");
            labels::validate_name(name).map_err(|r| self.err(&k, r))?;
            if (framing.stream_meta() && name == format::STREAM)
                || name == crate::loki::encode::AGENT_ID
                || !seen.insert(name.as_str())
            {
                return Err(self.err(&k, format!("{name:?} is already a metadata field")));
            }
        }
        if framing.json_fields.len() > 32 {
            return Err(self.err(
                format!("{key}.metadata_fields"),
                "at most 32 fields: structured metadata counts against Loki's per-entry limits",
            ));
        }

        // Labels captured from the path: their names are known now, so collisions and the
        // label count are checked here rather than discovered as Loki 400s.
        let path_labels = match (&s.path_labels, s.format) {
            (Some(re), _) if re.is_empty() => None,
            (Some(re), _) => Some(re.as_str()),
            (None, Format::Cri | Format::Docker) => Some(KUBERNETES_PATH_LABELS),
            (None, Format::Raw) => None,
        };
        let path_labels = match path_labels {
            None => None,
            Some(re) => {
                let k = format!("{key}.path_labels");
                let re = regex::Regex::new(re)
                    .map_err(|e| self.err(&k, format!("invalid regex: {e}")))?;
                for name in re.capture_names().flatten() {
                    labels::validate_name(name)
                        .map_err(|r| self.err(&k, format!("capture group: {r}")))?;
                    if reserved.contains(&name) || set.contains_key(name) {
                        return Err(self.err(
                            &k,
                            format!(
                                "capture group {name:?} would replace the label of the same name"
                            ),
                        ));
                    }
                }
                if re.capture_names().flatten().next().is_none() {
                    return Err(self.err(
                        &k,
                        "has no named capture group: name the parts that become labels, e.g. (?P<app>[^/]+)",
                    ));
                }
                Some(re)
            }
        };
        let stream_label = framing.stream_label();
        if stream_label && set.contains_key(format::STREAM) {
            return Err(self.err(
                format!("{key}.labels.stream"),
                "is set by ztail from the CRI/Docker stream; set stream_as = \"metadata\" to keep this label",
            ));
        }
        let captured = path_labels
            .as_ref()
            .map_or(0, |re| re.capture_names().flatten().count());
        let total = set.len() + 1 + captured + stream_label as usize;
        if total > labels::MAX_LABELS {
            return Err(self.err(
                format!("{key}.labels"),
                format!(
                    "{total} labels per stream (static, filename, host, path_labels captures, stream) exceed Loki's default limit of {}",
                    labels::MAX_LABELS
                ),
            ));
        }

        Ok(SourceConfig {
            name: s.name,
            include,
            exclude,
            start_at: s.start_at,
            labels: LabelSet::new(set),
            partial_line_timeout: self.positive(
                &format!("{key}.partial_line_timeout"),
                s.partial_line_timeout,
            )?,
            rotate_wait: s.rotate_wait,
            framing: Arc::new(framing),
            path_labels,
            follow_symlinks_under: s
                .follow_symlinks_under
                .iter()
                .map(|root| self.path(root))
                .collect(),
        })
    }

    /// A Workload API address in the `unix:///abs` or `tcp://ip:port` form the spiffe crate
    /// takes; `unix:relative/path` is resolved against the config file's directory. TCP is
    /// taken on loopback only: the Workload API is plaintext gRPC, so over a network the SVID's
    /// private key would cross it in the clear, and whoever answered could hand ztail a trust
    /// bundle of its own and then pose as Loki.
    fn workload_endpoint(&self, endpoint: &str) -> Result<String, String> {
        let invalid = || {
            format!(
                "invalid Workload API address {endpoint:?}: expected unix:///absolute/path.sock, unix:relative/path.sock (relative to this file) or tcp://127.0.0.1:port"
            )
        };
        if let Some(rest) = endpoint.strip_prefix("tcp://") {
            let addr = rest
                .parse::<std::net::SocketAddr>()
                .map_err(|_| invalid())?;
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "{endpoint:?} is not on loopback: the Workload API is plaintext gRPC, so ztail's private key and trust bundle would cross the network in the clear and whoever answers could hand ztail a bundle of its own; use the SPIRE agent's unix socket (mount it into the container) or tcp://127.0.0.1:port"
                ));
            }
            return Ok(endpoint.to_owned());
        }
        let path = endpoint
            .strip_prefix("unix://")
            .or_else(|| endpoint.strip_prefix("unix:"))
            .ok_or_else(invalid)?;
        if path.is_empty() || (endpoint.starts_with("unix://") && !path.starts_with('/')) {
            return Err(invalid());
        }
        Ok(format!("unix://{}", self.path(Path::new(path)).display()))
    }

    fn positive(&self, key: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            return Err(self.err(key, "must be above zero"));
        }
        Ok(d)
    }

    fn size_between(
        &self,
        key: &str,
        v: ByteSize,
        min: u64,
        max: u64,
    ) -> Result<usize, ConfigError> {
        if v.0 < min || v.0 > max {
            return Err(self.err(
                key,
                format!("must be between {min} and {max} bytes, got {}", v.0),
            ));
        }
        Ok(v.0 as usize)
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
    fn good_config_resolves_relative_paths_against_its_directory() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/ztail/state"));
        assert_eq!(
            c.sources[0].include,
            vec!["/etc/ztail/logs/*.log".to_owned()]
        );
        assert_eq!(c.sink.batch_bytes, 1 << 20);
        assert_eq!(c.sink.batch_wait, Duration::from_secs(1));
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
    fn the_proxy_and_tls12_are_off_unless_configured() {
        let c = parse(GOOD).unwrap();
        assert!(c.sink.proxy.is_none() && !c.sink.allow_tls12);
        let c = parse(&GOOD.replace(
            "[sink]\n",
            "[sink]\nproxy = \"http://proxy.internal:3128\"\nallow_tls12 = true\n",
        ))
        .unwrap();
        assert_eq!(
            c.sink.proxy.unwrap().as_str(),
            "http://proxy.internal:3128/"
        );
        assert!(c.sink.allow_tls12);
        let msg = error_of(&GOOD.replace("[sink]\n", "[sink]\nproxy = \"socks5://p:1\"\n"));
        assert!(msg.contains(": sink.proxy: "), "{msg}");
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
