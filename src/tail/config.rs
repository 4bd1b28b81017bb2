//! The `[tail]` table and the `[[sources]]`: which files are read and what their lines become.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use super::format::{self, Format, Framing, Multiline, StreamAs, TimestampRule};
use super::timestamp::{TsFormat, parse_zone};
use crate::config::{ByteSize, ConfigError, Validator, hostname, humantime_serde};
use crate::loki::labels::{self, LabelSet};
use crate::stage::Pipeline;
use crate::stage::config::RawStage;

/// Where lines of a file found at ztail's very first start begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    Beginning,
    End,
}

#[derive(Debug, Clone)]
pub struct TailConfig {
    pub rescan_interval: Duration,
    pub checkpoint_interval: Duration,
    pub read_buffer: usize,
    /// How long a file renamed or deleted away may stay open for a sink that has not read it
    /// to its end (a sink that is down); `None`: until it has.
    pub max_rotated_hold: Option<Duration>,
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
    /// What happens to entries between framing and batching.
    pub stages: Option<Arc<Pipeline>>,
    /// Whether files are matched to their pods for Kubernetes metadata.
    pub kubernetes: bool,
    /// Formats a pod may choose by annotation, each a framing and stages of its own.
    pub formats: Vec<NamedFormat>,
    /// A journal source reads the systemd journal instead of files (`include` is empty).
    pub journal: Option<Arc<crate::journal::config::JournalConfig>>,
    /// The sinks that get this source's entries, by name; empty: every sink.
    pub sinks: Vec<String>,
}

/// A format of a source that a pod's `format` annotation may choose.
#[derive(Debug, Clone)]
pub struct NamedFormat {
    pub name: String,
    pub framing: Arc<Framing>,
    pub stages: Option<Arc<Pipeline>>,
}

impl SourceConfig {
    /// Structured metadata names of the source's entries: the framing's, then the stages'.
    pub fn meta_names(&self) -> Vec<String> {
        let mut names = self.framing.meta_names();
        if let Some(p) = &self.stages {
            names.extend(p.meta_names().iter().cloned());
        }
        names
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTail {
    #[serde(default = "default_rescan", with = "humantime_serde")]
    rescan_interval: Duration,
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    checkpoint_interval: Duration,
    #[serde(default = "default_read_buffer")]
    read_buffer: ByteSize,
    #[serde(default, with = "humantime_serde::option")]
    max_rotated_hold: Option<Duration>,
}

impl Default for RawTail {
    fn default() -> Self {
        RawTail {
            rescan_interval: default_rescan(),
            checkpoint_interval: default_checkpoint_interval(),
            read_buffer: default_read_buffer(),
            max_rotated_hold: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    pub(crate) name: String,
    #[serde(default)]
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
    #[serde(default)]
    stages: Vec<RawStage>,
    kubernetes: Option<bool>,
    #[serde(default)]
    formats: BTreeMap<String, RawFormat>,
    journal: Option<crate::journal::config::RawJournal>,
    #[serde(default)]
    pub(crate) sinks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFormat {
    multiline: Option<RawMultiline>,
    /// The source's stages unless set.
    stages: Option<Vec<RawStage>>,
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

impl TailConfig {
    pub(crate) fn validate(v: &Validator, raw: RawTail) -> Result<TailConfig, ConfigError> {
        Ok(TailConfig {
            rescan_interval: v.positive("tail.rescan_interval", raw.rescan_interval)?,
            checkpoint_interval: v.positive("tail.checkpoint_interval", raw.checkpoint_interval)?,
            read_buffer: v.size_between("tail.read_buffer", raw.read_buffer, 4 << 10, 64 << 20)?,
            max_rotated_hold: match raw.max_rotated_hold {
                None => None,
                Some(d) => Some(v.positive("tail.max_rotated_hold", d)?),
            },
        })
    }
}

impl SourceConfig {
    pub(crate) fn validate(
        v: &Validator,
        key: &str,
        mut s: RawSource,
        host_label: bool,
        k8s: Option<&crate::k8s::KubernetesConfig>,
    ) -> Result<SourceConfig, ConfigError> {
        if s.name.is_empty() {
            return Err(v.err(format!("{key}.name"), "must not be empty"));
        }
        let journal = match s.journal.take() {
            Some(j) => {
                let j = crate::journal::config::validate(v, &format!("{key}.journal"), j)?;
                // What a journal entry is leaves nothing for these to do.
                let file_only = [
                    ("include", !s.include.is_empty()),
                    ("exclude", !s.exclude.is_empty()),
                    ("format", s.format != Format::Raw),
                    ("multiline", s.multiline.is_some()),
                    ("timestamp", s.timestamp.is_some()),
                    ("path_labels", s.path_labels.is_some()),
                    ("metadata_fields", !s.metadata_fields.is_empty()),
                    ("follow_symlinks_under", !s.follow_symlinks_under.is_empty()),
                    ("kubernetes", s.kubernetes == Some(true)),
                    ("formats", !s.formats.is_empty()),
                ];
                if let Some((name, _)) = file_only.iter().find(|(_, set)| *set) {
                    return Err(v.err(
                        format!("{key}.{name}"),
                        "applies to file sources only: a journal source reads whole entries with their own timestamps (journal fields reach the stages through journal.fields)",
                    ));
                }
                s.kubernetes = Some(false);
                Some(Arc::new(j))
            }
            None => None,
        };
        if s.include.is_empty() && journal.is_none() {
            return Err(v.err(
                format!("{key}.include"),
                "needs at least one glob pattern (or a [sources.journal] table to read the systemd journal)",
            ));
        }
        let mut include = Vec::with_capacity(s.include.len());
        for (j, pattern) in s.include.iter().enumerate() {
            let abs = v.path(Path::new(pattern));
            let abs = abs.to_str().ok_or_else(|| {
                v.err(format!("{key}.include[{j}]"), "pattern is not valid UTF-8")
            })?;
            glob::Pattern::new(abs).map_err(|e| {
                v.err(
                    format!("{key}.include[{j}]"),
                    format!("invalid glob {pattern:?}: {e}"),
                )
            })?;
            include.push(abs.to_owned());
        }
        let mut exclude = GlobSetBuilder::new();
        for (j, pattern) in s.exclude.iter().enumerate() {
            let abs = v.path(Path::new(pattern));
            let glob = Glob::new(&abs.to_string_lossy()).map_err(|e| {
                v.err(
                    format!("{key}.exclude[{j}]"),
                    format!("invalid glob {pattern:?}: {e}"),
                )
            })?;
            exclude.add(glob);
        }
        let exclude = exclude
            .build()
            .map_err(|e| v.err(format!("{key}.exclude"), e.to_string()))?;

        // A journal source has no file name: its streams are its labels and host.
        let mut reserved = if journal.is_some() {
            vec![]
        } else {
            vec![labels::FILENAME]
        };
        if host_label {
            reserved.push(labels::HOST);
        }
        let mut set = BTreeMap::new();
        for (name, value) in s.labels {
            let k = format!("{key}.labels.{name}");
            labels::validate_name(&name).map_err(|r| v.err(&k, r))?;
            if reserved.contains(&name.as_str()) {
                return Err(v.err(&k, format!("{name:?} is set by ztail for every file")));
            }
            labels::validate_value(&value).map_err(|r| v.err(&k, r))?;
            set.insert(name, value);
        }
        if host_label {
            set.insert(labels::HOST.to_owned(), hostname());
        }
        let max_line_bytes = v.size_between(
            &format!("{key}.max_line_bytes"),
            s.max_line_bytes,
            64,
            64 << 20,
        )?;

        let multiline = match s.multiline {
            None => None,
            Some(m) => Some(validate_multiline(
                v,
                &format!("{key}.multiline"),
                m,
                max_line_bytes,
            )?),
        };
        let timestamp = match s.timestamp {
            None => None,
            Some(_) if s.format != Format::Raw => {
                return Err(v.err(
                    format!("{key}.timestamp"),
                    "applies to raw sources only: cri and docker entries carry the runtime's timestamp",
                ));
            }
            Some(t) => {
                let regex = regex::bytes::Regex::new(&t.regex).map_err(|e| {
                    v.err(
                        format!("{key}.timestamp.regex"),
                        format!("invalid regex: {e}"),
                    )
                })?;
                let group = regex
                    .capture_names()
                    .position(|n| n == Some("ts"))
                    .unwrap_or(if regex.captures_len() > 1 { 1 } else { 0 });
                let format = TsFormat::from_name(&t.format).ok_or_else(|| {
                    v.err(
                        format!("{key}.timestamp.format"),
                        format!("unknown format {:?}: use rfc3339, unix_seconds, unix_millis, unix_micros or unix_nanos", t.format),
                    )
                })?;
                let zone = parse_zone(&t.zone).ok_or_else(|| {
                    v.err(
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
            labels::validate_name(name).map_err(|r| v.err(&k, r))?;
            if (framing.stream_meta() && name == format::STREAM)
                || name == crate::loki::encode::AGENT_ID
                || !seen.insert(name.as_str())
            {
                return Err(v.err(&k, format!("{name:?} is already a metadata field")));
            }
        }
        if framing.json_fields.len() > 32 {
            return Err(v.err(
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
                let re =
                    regex::Regex::new(re).map_err(|e| v.err(&k, format!("invalid regex: {e}")))?;
                for name in re.capture_names().flatten() {
                    labels::validate_name(name)
                        .map_err(|r| v.err(&k, format!("capture group: {r}")))?;
                    if reserved.contains(&name) || set.contains_key(name) {
                        return Err(v.err(
                            &k,
                            format!(
                                "capture group {name:?} would replace the label of the same name"
                            ),
                        ));
                    }
                }
                if re.capture_names().flatten().next().is_none() {
                    return Err(v.err(
                        &k,
                        "has no named capture group: name the parts that become labels, e.g. (?P<app>[^/]+)",
                    ));
                }
                Some(re)
            }
        };
        let stream_label = framing.stream_label();
        if stream_label && set.contains_key(format::STREAM) {
            return Err(v.err(
                format!("{key}.labels.stream"),
                "is set by ztail from the CRI/Docker stream; set stream_as = \"metadata\" to keep this label",
            ));
        }
        let kubernetes = s
            .kubernetes
            .unwrap_or(k8s.is_some() && s.format != Format::Raw);
        let k8s = match (kubernetes, k8s) {
            (false, _) => None,
            (true, Some(k)) => Some(k),
            (true, None) => {
                return Err(v.err(
                    format!("{key}.kubernetes"),
                    "needs a [kubernetes] table: where the API server is and what pod metadata becomes",
                ));
            }
        };
        let k8s_labels: Vec<&str> = k8s.map(|k| k.label_names().collect()).unwrap_or_default();
        for name in &k8s_labels {
            let path_capture = path_labels
                .as_ref()
                .is_some_and(|re| re.capture_names().flatten().any(|n| n == *name));
            let stream = framing.stream_label() && *name == format::STREAM;
            if reserved.contains(name) || set.contains_key(*name) || path_capture || stream {
                return Err(v.err(
                    format!("{key}.labels"),
                    format!("{name:?} is set by [kubernetes] and by this source (its labels or path_labels): drop one of them"),
                ));
            }
        }
        let captured = path_labels
            .as_ref()
            .map_or(0, |re| re.capture_names().flatten().count());
        if journal.is_some() && set.is_empty() {
            return Err(v.err(
                format!("{key}.labels"),
                "a journal source needs at least one label (Loki refuses a stream without one): add labels = { job = \"journal\" } or keep the host label",
            ));
        }
        let total = set.len()
            + journal.is_none() as usize
            + captured
            + stream_label as usize
            + k8s_labels.len();
        if total > labels::MAX_LABELS {
            return Err(v.err(
                format!("{key}.labels"),
                format!(
                    "{total} labels per stream (static, filename, host, path_labels captures, stream, kubernetes) exceed Loki's default limit of {}",
                    labels::MAX_LABELS
                ),
            ));
        }
        // Stages see every label name a stream of this source has (host is in `set`).
        let mut taken: Vec<String> = set.keys().cloned().collect();
        if journal.is_none() {
            taken.push(labels::FILENAME.to_owned());
        }
        if let Some(re) = &path_labels {
            taken.extend(re.capture_names().flatten().map(str::to_owned));
        }
        if stream_label {
            taken.push(format::STREAM.to_owned());
        }
        taken.extend(k8s_labels.iter().map(|n| (*n).to_owned()));
        // The framing's metadata, then Kubernetes', then the stages'.
        let mut framing_meta = framing.meta_names();
        if let Some(k) = k8s {
            for (name, _) in &k.metadata {
                if framing_meta.contains(name) {
                    return Err(v.err(
                        format!("{key}.metadata_fields"),
                        format!("{name:?} is also set by kubernetes.metadata"),
                    ));
                }
                framing_meta.push(name.clone());
            }
        }
        // What the stages of the source and of its formats may refer to.
        let given = journal
            .as_ref()
            .map(|j| j.field_names())
            .unwrap_or_default();
        let given_key = format!("{key}.journal.fields");
        let stage_ctx = crate::stage::config::Context {
            taken_labels: &taken,
            framing_meta: &framing_meta,
            given: (&given, &given_key),
        };
        let stages = crate::stage::config::validate(v, key, s.stages, &stage_ctx)?.map(Arc::new);
        if !s.formats.is_empty() && k8s.is_none() {
            return Err(v.err(
                format!("{key}.formats"),
                "formats are chosen by a pod's annotation: the source needs kubernetes = true",
            ));
        }
        let mut formats = Vec::with_capacity(s.formats.len());
        for (name, f) in s.formats {
            let k = format!("{key}.formats.{name}");
            labels::validate_name(&name).map_err(|r| v.err(&k, format!("format name: {r}")))?;
            let mut fr = framing.clone();
            if let Some(m) = f.multiline {
                fr.multiline = Some(validate_multiline(
                    v,
                    &format!("{k}.multiline"),
                    m,
                    max_line_bytes,
                )?);
            }
            let stages = match f.stages {
                None => stages.clone(),
                Some(raw) => crate::stage::config::validate(v, &k, raw, &stage_ctx)?.map(Arc::new),
            };
            formats.push(NamedFormat {
                name,
                framing: Arc::new(fr),
                stages,
            });
        }

        Ok(SourceConfig {
            name: s.name,
            include,
            exclude,
            start_at: s.start_at,
            labels: LabelSet::new(set),
            partial_line_timeout: v.positive(
                &format!("{key}.partial_line_timeout"),
                s.partial_line_timeout,
            )?,
            rotate_wait: s.rotate_wait,
            framing: Arc::new(framing),
            path_labels,
            follow_symlinks_under: s
                .follow_symlinks_under
                .iter()
                .map(|root| v.path(root))
                .collect(),
            stages,
            kubernetes: k8s.is_some(),
            formats,
            journal,
            sinks: s.sinks,
        })
    }
}

fn validate_multiline(
    v: &Validator,
    key: &str,
    m: RawMultiline,
    max_line_bytes: usize,
) -> Result<Multiline, ConfigError> {
    let start = regex::bytes::Regex::new(&m.start)
        .map_err(|e| v.err(format!("{key}.start"), format!("invalid regex: {e}")))?;
    if m.max_lines == 0 {
        return Err(v.err(format!("{key}.max_lines"), "must be above zero"));
    }
    let max_bytes = match m.max_bytes {
        None => max_line_bytes.max(1 << 20),
        Some(b) => v.size_between(
            &format!("{key}.max_bytes"),
            b,
            max_line_bytes as u64,
            64 << 20,
        )?,
    };
    Ok(Multiline {
        start,
        max_lines: m.max_lines,
        max_bytes,
        timeout: v.positive(&format!("{key}.timeout"), m.timeout)?,
    })
}
