//! Promtail's config file as serde types: the parts `ztail convert promtail` reads, each with
//! the keys it converts typed (a wrong type is an error with its YAML path and line) and every
//! other key kept in `rest`, so that the report can name it.

use std::collections::BTreeMap;

use serde::Deserialize;
use yaml_serde::Value;

/// Keys this converter does not read, by name, in file order.
pub type Rest = BTreeMap<String, Value>;

#[derive(Deserialize, Default)]
pub struct Promtail {
    pub positions: Option<Positions>,
    #[serde(default)]
    pub clients: Vec<Client>,
    /// The legacy single-client form.
    pub client: Option<Client>,
    #[serde(default)]
    pub scrape_configs: Vec<ScrapeConfig>,
    pub limits_config: Option<LimitsConfig>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Positions {
    pub filename: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Client {
    pub url: String,
    pub tenant_id: Option<String>,
    pub batchwait: Option<Duration>,
    pub batchsize: Option<Size>,
    #[serde(default)]
    pub external_labels: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    pub backoff_config: Option<Backoff>,
    pub tls_config: Option<Tls>,
    pub proxy_url: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Backoff {
    pub min_period: Option<Duration>,
    pub max_period: Option<Duration>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Tls {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct LimitsConfig {
    pub readline_rate: Option<f64>,
    pub readline_burst: Option<f64>,
    #[serde(default)]
    pub readline_rate_enabled: bool,
    pub readline_rate_drop: Option<bool>,
    pub max_line_size: Option<Size>,
    #[serde(default)]
    pub max_line_size_truncate: bool,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct ScrapeConfig {
    pub job_name: String,
    #[serde(default, with = "yaml_serde::with::singleton_map_recursive")]
    pub pipeline_stages: Vec<Stage>,
    #[serde(default)]
    pub static_configs: Vec<StaticConfig>,
    #[serde(default)]
    pub kubernetes_sd_configs: Vec<KubernetesSd>,
    #[serde(default)]
    pub relabel_configs: Vec<Relabel>,
    pub journal: Option<Journal>,
    #[serde(flatten)]
    pub rest: Rest,
}

/// A `journal` target: systemd's journal through libsystemd.
#[derive(Deserialize)]
pub struct Journal {
    pub max_age: Option<Duration>,
    #[serde(default)]
    pub json: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub path: Option<String>,
    /// `FIELD=value` terms separated by spaces (`+` for a disjunction), as `journalctl` takes.
    pub matches: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct StaticConfig {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct KubernetesSd {
    pub role: String,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize, Clone)]
pub struct Relabel {
    #[serde(default)]
    pub source_labels: Vec<String>,
    pub separator: Option<String>,
    pub target_label: Option<String>,
    pub regex: Option<String>,
    pub replacement: Option<String>,
    pub action: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

impl Relabel {
    /// The action, lower case (`replace` when not given, as in Prometheus).
    pub fn action(&self) -> String {
        self.action
            .as_deref()
            .unwrap_or("replace")
            .to_ascii_lowercase()
    }

    pub fn regex(&self) -> &str {
        self.regex.as_deref().unwrap_or("(.*)")
    }

    /// The regex anchored, as Prometheus applies it: to the whole value.
    pub fn anchored(&self) -> String {
        format!("^(?:{})$", self.regex())
    }

    /// Whether it matches an empty value, which is how Promtail sees a missing label.
    pub fn matches_empty(&self) -> bool {
        regex::Regex::new(&self.anchored()).is_ok_and(|re| re.is_match(""))
    }

    /// `labeldrop` / `labelkeep`: keeps the labels (targets) the action keeps; temporary `__`
    /// targets in `fields` stay. An error if ztail cannot read the regex.
    pub fn filter_labels<V>(
        &self,
        fields: &mut BTreeMap<String, V>,
        constants: &mut BTreeMap<String, (String, String)>,
    ) -> Result<(), regex::Error> {
        let re = regex::Regex::new(&self.anchored())?;
        let drop = self.action() == "labeldrop";
        fields.retain(|t, _| t.starts_with("__") || re.is_match(t) != drop);
        constants.retain(|t, _| re.is_match(t) != drop);
        Ok(())
    }

    /// Whether the regex takes a value whole (the default, or what configs write for it).
    pub fn takes_all(&self) -> bool {
        matches!(self.regex(), "(.*)" | "^(.*)$" | ".*" | "(.+)")
    }

    pub fn replacement(&self) -> &str {
        self.replacement.as_deref().unwrap_or("$1")
    }

    /// Whether the replacement is the first group as it is.
    pub fn plain_replacement(&self) -> bool {
        matches!(self.replacement(), "$1" | "${1}")
    }
}

/// A Go or Prometheus duration (`1s`, `500ms`, `1m30s`), kept as written.
#[derive(Deserialize, Clone)]
#[serde(transparent)]
pub struct Duration(pub String);

/// A size: bytes as a number, or text such as `8kb`.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// `name: source` maps of `labels`, `json`, `logfmt`...: an empty source means the name.
pub type Mapping = BTreeMap<String, Option<String>>;

/// One `pipeline_stages` entry: a map with the stage's name as its only key.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Cri(Option<Rest>),
    Docker(Option<Rest>),
    Multiline(Multiline),
    Regex(Regex),
    Json(Json),
    Logfmt(Logfmt),
    Labels(Option<Mapping>),
    StructuredMetadata(Option<Mapping>),
    Timestamp(Timestamp),
    Output(Output),
    Template(Template),
    Replace(Replace),
    Match(Match),
    Drop(Drop),
    Tenant(Tenant),
    Limit(Limit),
    Decolorize(Option<Rest>),
    StaticLabels(Option<BTreeMap<String, Option<String>>>),
    Labeldrop(Vec<String>),
    Labelallow(Vec<String>),
    Pack(serde::de::IgnoredAny),
    Metrics(serde::de::IgnoredAny),
    Sampling(serde::de::IgnoredAny),
    Geoip(serde::de::IgnoredAny),
    Eventlogmessage(serde::de::IgnoredAny),
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Cri(_) => "cri",
            Stage::Docker(_) => "docker",
            Stage::Multiline(_) => "multiline",
            Stage::Regex(_) => "regex",
            Stage::Json(_) => "json",
            Stage::Logfmt(_) => "logfmt",
            Stage::Labels(_) => "labels",
            Stage::StructuredMetadata(_) => "structured_metadata",
            Stage::Timestamp(_) => "timestamp",
            Stage::Output(_) => "output",
            Stage::Template(_) => "template",
            Stage::Replace(_) => "replace",
            Stage::Match(_) => "match",
            Stage::Drop(_) => "drop",
            Stage::Tenant(_) => "tenant",
            Stage::Limit(_) => "limit",
            Stage::Decolorize(_) => "decolorize",
            Stage::StaticLabels(_) => "static_labels",
            Stage::Labeldrop(_) => "labeldrop",
            Stage::Labelallow(_) => "labelallow",
            Stage::Pack(_) => "pack",
            Stage::Metrics(_) => "metrics",
            Stage::Sampling(_) => "sampling",
            Stage::Geoip(_) => "geoip",
            Stage::Eventlogmessage(_) => "eventlogmessage",
        }
    }
}

#[derive(Deserialize)]
pub struct Multiline {
    pub firstline: String,
    pub max_wait_time: Option<Duration>,
    pub max_lines: Option<u64>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Regex {
    pub expression: String,
    pub source: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Json {
    #[serde(default)]
    pub expressions: Mapping,
    pub source: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Logfmt {
    #[serde(default)]
    pub mapping: Mapping,
    pub source: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Timestamp {
    pub source: String,
    pub format: String,
    #[serde(default)]
    pub fallback_formats: Vec<String>,
    /// Applies only to formats without a zone, none of which convert.
    #[allow(dead_code)]
    pub location: Option<String>,
    pub action_on_failure: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Output {
    pub source: String,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Template {
    pub source: String,
    pub template: String,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Replace {
    pub expression: String,
    pub source: Option<String>,
    pub replace: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Match {
    pub selector: String,
    #[serde(default)]
    pub stages: Vec<Stage>,
    pub action: Option<String>,
    pub drop_counter_reason: Option<String>,
    /// Names the nested pipeline in Promtail's metrics only.
    #[allow(dead_code)]
    pub pipeline_name: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

/// `source` is one name or a list.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct Drop {
    pub source: Option<OneOrMany>,
    /// Joins several sources, which are not converted.
    #[allow(dead_code)]
    pub separator: Option<String>,
    pub expression: Option<String>,
    pub value: Option<String>,
    pub older_than: Option<Duration>,
    pub longer_than: Option<Size>,
    pub drop_counter_reason: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Tenant {
    pub source: Option<String>,
    pub value: Option<String>,
    pub label: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}

#[derive(Deserialize)]
pub struct Limit {
    pub rate: f64,
    pub burst: f64,
    #[serde(default)]
    pub drop: bool,
    pub by_label_name: Option<String>,
    #[serde(flatten)]
    pub rest: Rest,
}
