//! `ztail convert promtail`: a Promtail config file as a ztail config, with a comment beside
//! every converted part naming its Promtail origin, and a report of every part that was not
//! converted (or was converted with a changed meaning) and why.
//!
//! The converted config is checked by ztail's own validation before it is written: a part that
//! ztail refuses (a Go regex the `regex` crate does not take, a field no earlier stage
//! produces) is taken out and reported with ztail's reason, so the output always passes
//! `ztail check`.

mod env;
mod journal;
mod kube;
mod model;
mod out;
mod stages;

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use model::{Client, Promtail, ScrapeConfig, Size};
use out::{Doc, Item, Source, Table, strings};

/// What the caller decides that a Promtail file does not say.
#[derive(Debug, Clone)]
pub struct Options {
    /// ztail's `state_dir`.
    pub state_dir: String,
    /// Loki's SPIFFE ID, for `sink.peer.allowed_ids`.
    pub peer_id: Option<String>,
    /// Expand `${VAR}` as Promtail's `-config.expand-env` does.
    pub expand_env: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            state_dir: "/var/lib/ztail".into(),
            peer_id: None,
            expand_env: false,
        }
    }
}

/// The ztail source name for a Promtail job (the first of its name; later ones get `-2`...).
pub fn source_name(job: &str) -> String {
    let base: String = job
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if base.is_empty() {
        "job".to_owned()
    } else {
        base
    }
}

/// The placeholder peer ID when none is given: a config that refuses every Loki until the
/// operator names theirs, never one that trusts by address.
pub const PLACEHOLDER_PEER: &str = "spiffe://example.org/CHANGE-ME-loki";

/// Every part of the Promtail file that did not become its exact ztail counterpart.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    /// Parts with no ztail counterpart: left out.
    pub not_converted: Vec<Note>,
    /// Parts converted with a different meaning: read before shipping.
    pub changed: Vec<Note>,
    /// Settings ztail needs that Promtail's file does not give.
    pub to_do: Vec<Note>,
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone)]
pub struct Note {
    /// The YAML path in Promtail's file (`scrape_configs[0].pipeline_stages[2].match`).
    pub path: String,
    pub reason: String,
}

impl Report {
    pub fn not_converted(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        add(&mut self.not_converted, path.into(), reason.into());
    }

    pub fn changed(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        add(&mut self.changed, path.into(), reason.into());
    }

    pub fn to_do(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        add(&mut self.to_do, path.into(), reason.into());
    }

    /// Keys read by no converter, each reported with the reason `reasons` gives for it.
    fn rest(&mut self, at: &str, rest: &model::Rest, reasons: fn(&str) -> Option<&'static str>) {
        for key in rest.keys() {
            let reason = reasons(key).unwrap_or("not a Promtail setting this converter knows");
            self.not_converted(join(at, key), reason);
        }
    }

    /// One line per note, as printed on stderr.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (what, notes) in [
            ("not converted", &self.not_converted),
            ("changed", &self.changed),
            ("to do", &self.to_do),
        ] {
            for n in notes {
                lines.push(format!("{what}: {}: {}", n.path, n.reason));
            }
        }
        lines
    }
}

/// A note once: a job's stages are converted once per static config.
fn add(notes: &mut Vec<Note>, path: String, reason: String) {
    let note = Note { path, reason };
    if !notes.contains(&note) {
        notes.push(note);
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

/// A Promtail file that cannot be read as a Promtail config.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {}{reason}", line.map(|l| format!(":{l}")).unwrap_or_default(), if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConvertError {
    pub file: String,
    pub line: Option<usize>,
    /// The YAML path of the part in error.
    pub path: String,
    pub reason: String,
    /// What the conversion found before it gave up, when it got that far.
    pub report: Option<Box<Report>>,
}

/// The converted config and its report.
#[derive(Debug)]
pub struct Conversion {
    pub toml: String,
    pub report: Report,
}

/// Converts Promtail's config `text` (named `file` in errors and comments). `out` is where the
/// ztail config will be written: relative paths in it are checked from there.
pub fn convert(
    file: &str,
    text: &str,
    out: &Path,
    opts: &Options,
) -> Result<Conversion, ConvertError> {
    let mut report = Report::default();
    let text = if opts.expand_env {
        env::expand(text, &mut report).map_err(|e| ConvertError {
            file: file.to_owned(),
            line: Some(e.line),
            path: String::new(),
            reason: e.reason,
            report: None,
        })?
    } else {
        text.to_owned()
    };
    let promtail = parse(file, &text)?;
    let doc = Converter {
        report: &mut report,
        opts,
        doc: Doc::default(),
        taken_names: BTreeSet::new(),
        pod_labels: Vec::new(),
    }
    .run(file, promtail);
    let toml = doc
        .and_then(|mut doc| {
            settle(&mut doc, out, &mut report)
                .map_err(|e| format!("the converted config does not pass `ztail check`: {e}"))
        })
        .map_err(|reason| ConvertError {
            file: file.to_owned(),
            line: None,
            path: String::new(),
            reason,
            report: Some(Box::new(std::mem::take(&mut report))),
        })?;
    Ok(Conversion { toml, report })
}

/// Promtail's file as its serde types: a YAML error, an unknown stage or a wrong type is an
/// error with the YAML path and line.
fn parse(file: &str, text: &str) -> Result<Promtail, ConvertError> {
    if text.trim().is_empty() {
        return Ok(Promtail::default());
    }
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.location().map(|l| l.line());
        let mut reason = inner.to_string();
        // yaml_serde appends " at line L column C"; the line is given separately.
        if let Some(at) = reason.find(" at line ") {
            reason.truncate(at);
        }
        // yaml_serde starts its message with the path of the part it was reading.
        if let Some((head, tail)) = reason.split_once(": ")
            && !head.is_empty()
            && path.starts_with(head)
        {
            reason = tail.to_owned();
        }
        ConvertError {
            file: file.to_owned(),
            line,
            path: if path == "." { String::new() } else { path },
            reason,
            report: None,
        }
    })
}

/// Renders the document and lets ztail's validation judge it; a part it refuses is taken out
/// and reported, until the config passes.
fn settle(doc: &mut Doc, out: &Path, report: &mut Report) -> Result<String, String> {
    loop {
        let (text, parts) = doc.render();
        let e = match crate::config::Config::parse(out, &text) {
            Ok(_) => return Ok(text),
            Err(e) => e,
        };
        // The longest recorded key path that the error's key starts with.
        let found = parts
            .iter()
            .filter(|(k, _)| {
                e.key == *k
                    || e.key
                        .strip_prefix(k.as_str())
                        .is_some_and(|r| r.starts_with(['.', '[']))
            })
            .max_by_key(|(k, _)| k.len());
        let Some((_, part)) = found else {
            return Err(e.to_string());
        };
        let origin = doc.origin(part);
        report.not_converted(origin, format!("ztail refuses it: {}", e.reason));
        doc.remove(&part.clone());
    }
}

impl Doc {
    /// The Promtail path a removable part was converted from (the first line of its comment).
    fn origin(&self, part: &out::Part) -> String {
        let text = match *part {
            out::Part::Stage(s, g) => self.sources[s].stages[g].origin.clone(),
            out::Part::SourceLabel(s, l) => {
                self.sources[s].labels[l].note.clone().unwrap_or_default()
            }
            out::Part::KubernetesLabel(i) => self
                .kubernetes
                .as_ref()
                .and_then(|k| k.labels[i].note.clone())
                .unwrap_or_default(),
        };
        let first = text.lines().next().unwrap_or_default();
        let path = first.strip_prefix("promtail: ").unwrap_or(first);
        path.split(" (").next().unwrap_or(path).to_owned()
    }
}

struct Converter<'a> {
    report: &'a mut Report,
    opts: &'a Options,
    doc: Doc,
    taken_names: BTreeSet<String>,
    /// The `[kubernetes.labels]` names each pod job's relabelling set.
    pod_labels: Vec<BTreeSet<String>>,
}

fn top_reason(key: &str) -> Option<&'static str> {
    Some(match key {
        "server" => {
            "ztail's admin endpoint (`admin.listen`, loopback only) serves /metrics, /healthz, /readyz and /status; ztail receives no logs over HTTP"
        }
        "target_config" => {
            "ztail rescans its globs every `tail.rescan_interval` (10s) and on inotify events"
        }
        "options" => "stream lag labels: ztail exports ztail_file_lag_bytes per source instead",
        "tracing" => "ztail exports no traces",
        "global" => "ztail watches files with inotify and its rescan interval",
        "wal" => {
            "ztail needs no WAL: the file is the buffer, and checkpoints advance only over what Loki acknowledged"
        }
        _ => return None,
    })
}

fn client_reason(key: &str) -> Option<&'static str> {
    Some(match key {
        "basic_auth" | "bearer_token" | "bearer_token_file" | "authorization" | "oauth2" => {
            "refused: ztail authenticates to Loki with its SPIFFE certificate over mutual TLS and sends no passwords or tokens; have Loki's gateway verify client certificates (and map the SPIFFE ID to a tenant) instead"
        }
        "headers" => {
            "ztail sends no custom headers; X-Scope-OrgID comes from `sink.tenant` and `tenant` stages"
        }
        "drop_rate_limited_batches" => {
            "ztail never drops a rate-limited batch: it retries with backoff and the file is the buffer"
        }
        "stream_lag_labels" => "ztail exports ztail_file_lag_bytes per source instead",
        "follow_redirects" => {
            "ztail never follows redirects: point `sink.url` at the push endpoint"
        }
        "enable_http2" => "ztail speaks HTTP/1.1 to Loki",
        "no_proxy" | "proxy_connect_header" | "proxy_from_environment" => {
            "ztail uses only `sink.proxy`; proxy environment variables are ignored"
        }
        _ => return None,
    })
}

fn tls_reason(key: &str) -> Option<&'static str> {
    Some(match key {
        "insecure_skip_verify" => "refused: ztail always verifies Loki's certificate and SPIFFE ID",
        "server_name" => "ztail checks Loki's SPIFFE ID (`sink.peer`), not a DNS name",
        _ => return None,
    })
}

fn scrape_reason(key: &str) -> Option<&'static str> {
    Some(match key {
        "syslog" => "ztail receives no syslog; have rsyslog or journald write files ztail tails",
        "loki_push_api" => "ztail receives no pushes; it tails files",
        "windows_events" => "ztail runs on Linux and tails files",
        "docker_sd_configs" => {
            "ztail reads container logs from their files (format = \"docker\" or \"cri\"), not through the Docker API"
        }
        "gcplog" | "kafka" | "gelf" | "cloudflare" | "heroku_drain" | "azure_event_hubs" => {
            "ztail tails files only; this target has no ztail counterpart"
        }
        "file_sd_configs"
        | "consul_sd_configs"
        | "consulagent_sd_configs"
        | "dns_sd_configs"
        | "ec2_sd_configs"
        | "openstack_sd_configs"
        | "serverset_sd_configs"
        | "triton_sd_configs"
        | "marathon_sd_configs"
        | "nerve_sd_configs" => {
            "ztail has no service discovery besides static globs and Kubernetes pods: list the paths in a source's `include`"
        }
        "encoding" => {
            "ztail reads UTF-8 (invalid bytes are replaced); convert the file's encoding upstream"
        }
        "decompression" => "ztail does not read compressed files",
        "limits_config" => "per-job limits: use a `limit` stage",
        _ => return None,
    })
}

impl Converter<'_> {
    fn run(mut self, file: &str, p: Promtail) -> Result<Doc, String> {
        self.doc.header = vec![
            format!("ztail config converted by `ztail convert promtail` from {file}."),
            "Each part names the Promtail setting it comes from; what was not converted is in the report.".into(),
        ];
        self.report.rest("", &p.rest, top_reason);
        // state_dir and host label.
        let mut state = Item::new("state_dir", self.opts.state_dir.as_str());
        if let Some(pos) = &p.positions {
            let note = match &pos.filename {
                Some(f) => format!(
                    "promtail: positions.filename = {f} (carry its positions over with `ztail convert promtail-positions {f} --state-dir {}`)",
                    self.opts.state_dir
                ),
                None => "promtail: positions".into(),
            };
            state = state.note(note);
            self.report.rest("positions", &pos.rest, |k| match k {
                "sync_period" => Some("ztail checkpoints what Loki acknowledged every `tail.checkpoint_interval` (1s)"),
                "ignore_invalid_yaml" => Some("ztail's checkpoint file is written atomically and never half-written"),
                _ => None,
            });
        }
        self.doc.top.push(state);
        self.doc
            .top
            .push(Item::new("host_label", false).note("Promtail adds no host label"));

        let mut clients: Vec<(String, &Client)> = p
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("clients[{i}]"), c))
            .collect();
        if let Some(c) = &p.client {
            clients.insert(0, ("client".into(), c));
        }
        let Some((at, client)) = clients.first().cloned() else {
            return Err("the file has no `clients`: ztail needs Loki's URL".into());
        };
        for (at, _) in clients.iter().skip(1) {
            self.report.not_converted(
                at.clone(),
                "ztail ships to one Loki (`[sink]`); this client was left out",
            );
        }
        let external = self.client(&at, client);

        let mut sources = Vec::new();
        for (j, sc) in p.scrape_configs.iter().enumerate() {
            let at = format!("scrape_configs[{j}]");
            sources.extend(self.scrape(&at, sc));
        }
        if let Some(limits) = &p.limits_config {
            self.limits(limits, &mut sources);
        }
        self.external_labels(&external, &mut sources);
        self.kubernetes_differences();
        if sources.is_empty() {
            return Err(
                "no scrape config could be converted, so the ztail config would ship nothing (see the report)"
                    .into(),
            );
        }
        self.doc.sources = sources;
        Ok(self.doc)
    }

    /// `clients[0]`: the sink, the identity and the peer policy. Returns the external labels.
    fn client(&mut self, at: &str, c: &Client) -> Vec<Item> {
        self.report.rest(at, &c.rest, client_reason);
        let sink = &mut self.doc.sink;
        sink.origin = format!("promtail: {at}");
        let url = match c.url.strip_prefix("http://") {
            Some(rest) => {
                self.report.changed(
                    format!("{at}.url"),
                    "http:// became https://: ztail pushes only over mutual TLS, so Loki (or a gateway in front of it) must serve TLS and verify client certificates",
                );
                format!("https://{rest}")
            }
            None => c.url.clone(),
        };
        // A user name and password in the URL are left out (never copied into the config).
        let url = match url.split_once("://") {
            Some((scheme, rest)) => {
                let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
                match authority.rsplit_once('@') {
                    Some((_, host)) => {
                        self.report.not_converted(
                            format!("{at}.url"),
                            "refused: the user name and password in the URL were left out; ztail authenticates with its SPIFFE certificate (change the password: it was in a config file)",
                        );
                        format!("{scheme}://{host}{}", &rest[authority.len()..])
                    }
                    None => url,
                }
            }
            None => url,
        };
        let sink = &mut self.doc.sink;
        sink.set("url", url).note = Some(format!("promtail: {at}.url"));
        if let Some(t) = c.tenant_id.as_ref().filter(|t| !t.is_empty()) {
            sink.set("tenant", t.as_str()).note = Some(format!("promtail: {at}.tenant_id"));
        }
        if let Some(w) = &c.batchwait {
            self.duration(&format!("{at}.batchwait"), &w.0, "batch_wait");
        }
        if let Some(s) = &c.batchsize {
            match bytes(s) {
                Some(n) => {
                    self.doc.sink.set("batch_bytes", n as i64).note =
                        Some(format!("promtail: {at}.batchsize"));
                }
                None => self
                    .report
                    .not_converted(format!("{at}.batchsize"), "not a size"),
            }
        }
        if let Some(t) = &c.timeout {
            self.duration(&format!("{at}.timeout"), &t.0, "timeout");
        }
        if let Some(b) = &c.backoff_config {
            let bat = format!("{at}.backoff_config");
            if let Some(d) = &b.min_period {
                self.duration(&format!("{bat}.min_period"), &d.0, "min_backoff");
            }
            if let Some(d) = &b.max_period {
                self.duration(&format!("{bat}.max_period"), &d.0, "max_backoff");
            }
            self.report.rest(&bat, &b.rest, |k| match k {
                "max_retries" => Some(
                    "ztail never gives a batch up: it retries until Loki accepts it, and the file is the buffer meanwhile",
                ),
                _ => None,
            });
        }
        if let Some(proxy) = &c.proxy_url {
            self.doc.sink.set("proxy", proxy.as_str()).note =
                Some(format!("promtail: {at}.proxy_url"));
        }

        // Identity: the SVID from the Workload API, or the files Promtail presented.
        let id = &mut self.doc.identity;
        match &c.tls_config {
            Some(tls) if tls.cert_file.is_some() && tls.key_file.is_some() => {
                let tat = format!("{at}.tls_config");
                id.origin = format!(
                    "promtail: {tat} (ztail presents these files as its identity and watches them for rotation)"
                );
                id.set("source", "files");
                id.set("cert", tls.cert_file.clone().unwrap_or_default());
                id.set("key", tls.key_file.clone().unwrap_or_default());
                match &tls.ca_file {
                    Some(ca) => {
                        id.set("bundle", ca.as_str());
                    }
                    None => {
                        id.set("bundle", "/etc/ztail/bundle.pem");
                        self.report.to_do(
                            format!("{tat}.ca_file"),
                            "ztail verifies Loki with a trust bundle: set `identity.bundle`",
                        );
                    }
                }
                self.report.rest(&tat, &tls.rest, tls_reason);
            }
            other => {
                id.origin = "ztail's identity: an X.509-SVID from the SPIRE agent's Workload API ($SPIFFE_ENDPOINT_SOCKET)".into();
                id.set("source", "spiffe");
                id.set("socket", "unix:///tmp/spire-agent/public/api.sock")
                    .note = Some(
                    "the SPIRE agent's default; set where your agent's socket is mounted".into(),
                );
                if let Some(tls) = other {
                    let tat = format!("{at}.tls_config");
                    if tls.ca_file.is_some() {
                        self.report.changed(
                            format!("{tat}.ca_file"),
                            "ztail verifies Loki against the trust bundle from the Workload API",
                        );
                    }
                    if tls.cert_file.is_some() != tls.key_file.is_some() {
                        self.report.not_converted(
                            tat.clone(),
                            "a client certificate needs both cert_file and key_file; ztail's identity comes from the Workload API",
                        );
                    }
                    self.report.rest(&tat, &tls.rest, tls_reason);
                }
            }
        }
        let peer = &mut self.doc.peer;
        peer.origin =
            "Which Loki ztail sends to: its SPIFFE ID (Promtail had no equivalent)".into();
        match &self.opts.peer_id {
            Some(id) => {
                peer.set("allowed_ids", strings([id]));
            }
            None => {
                peer.set("allowed_ids", strings([PLACEHOLDER_PEER])).note =
                    Some("CHANGE ME: Loki's SPIFFE ID (or convert with --peer-id)".into());
                self.report.to_do(
                    format!("{at}.url"),
                    "ztail sends only to a Loki whose SPIFFE ID the config allows: set `sink.peer.allowed_ids` (or convert with --peer-id); until then ztail refuses every Loki",
                );
            }
        }

        c.external_labels
            .iter()
            .map(|(k, v)| {
                Item::new(k, v.as_str()).note(format!("promtail: {at}.external_labels.{k}"))
            })
            .collect()
    }

    /// A Go duration setting of the sink.
    fn duration(&mut self, at: &str, text: &str, key: &str) {
        match humantime::parse_duration(text) {
            Ok(_) => {
                self.doc.sink.set(key, text).note = Some(format!("promtail: {at}"));
            }
            Err(e) => self
                .report
                .not_converted(at, format!("not a duration ztail reads: {e}")),
        }
    }

    /// A unique source name from a job name.
    fn name(&mut self, job: &str) -> String {
        let base = source_name(job);
        let mut name = base.clone();
        let mut n = 2;
        while !self.taken_names.insert(name.clone()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        name
    }

    /// Promtail adds `external_labels` after the pipeline, and an entry's own label of the same
    /// name wins: static labels keep theirs; a label a stage sets is the stage's.
    fn external_labels(&mut self, external: &[Item], sources: &mut [Source]) {
        for s in sources.iter_mut() {
            for item in external {
                if s.labels.iter().any(|l| l.key == item.key) {
                    continue;
                }
                let by_stage = s.stages.iter().any(|t| {
                    t.kind() == Some("labels")
                        && t.get("set")
                            .and_then(|v| v.as_table())
                            .is_some_and(|m| m.contains_key(&item.key))
                });
                if by_stage {
                    let path = item.note.clone().unwrap_or_default();
                    self.report.changed(
                        path.trim_start_matches("promtail: "),
                        "a labels stage sets the same label: its entries get the stage's value, or none where the field is missing (Promtail fell back to the external label)",
                    );
                    continue;
                }
                s.labels.push(item.clone());
            }
        }
    }

    /// ztail's `[kubernetes.labels]` apply to every pod source: say so where jobs differ.
    fn kubernetes_differences(&mut self) {
        if self.pod_labels.windows(2).any(|w| w[0] != w[1]) {
            self.report.changed(
                "scrape_configs",
                "ztail's [kubernetes.labels] apply to every pod source: a label one job's relabelling set is now on every job's entries",
            );
        }
    }

    fn scrape(&mut self, at: &str, sc: &ScrapeConfig) -> Vec<Source> {
        self.report.rest(at, &sc.rest, scrape_reason);
        if let Some(j) = &sc.journal {
            if !sc.static_configs.is_empty() || !sc.kubernetes_sd_configs.is_empty() {
                self.report.not_converted(
                    at,
                    "a job with a journal and other targets: only its journal was converted; give the files a job of their own",
                );
            }
            return journal::source(self, at, sc, j).into_iter().collect();
        }
        let mut sources = Vec::new();
        if !sc.kubernetes_sd_configs.is_empty() {
            if let Some(s) = kube::source(self, at, sc) {
                sources.push(s);
            }
        } else if !sc.relabel_configs.is_empty() {
            self.report.not_converted(
                format!("{at}.relabel_configs"),
                "relabelling of static targets: put the labels in the static config",
            );
        }
        for (i, st) in sc.static_configs.iter().enumerate() {
            let sat = format!("{at}.static_configs[{i}]");
            self.report.rest(&sat, &st.rest, |k| match k {
                "targets" => {
                    Some("ztail reads local files only (Promtail accepts only localhost here too)")
                }
                _ => None,
            });
            let Some(path) = st.labels.get("__path__") else {
                self.report.not_converted(
                    sat,
                    "no __path__: Promtail reads nothing for this target either",
                );
                continue;
            };
            let mut s = Source::default();
            let name = self.name(&sc.job_name);
            s.table.origin = format!("promtail: {sat} (job_name: {})", sc.job_name);
            s.table.set("name", name);
            s.table.set("include", strings(braces(path))).note =
                Some(format!("promtail: {sat}.labels.__path__"));
            if let Some(ex) = st.labels.get("__path_exclude__") {
                s.table.set("exclude", strings(braces(ex))).note =
                    Some(format!("promtail: {sat}.labels.__path_exclude__"));
            }
            s.table.set("start_at", "beginning").note =
                Some("Promtail reads a file it has no position for from its start".into());
            for (k, v) in &st.labels {
                if k.starts_with("__") {
                    let reason = match k.as_str() {
                        "__path__" | "__path_exclude__" => continue,
                        "__host__" => "ztail reads the files of the host it runs on",
                        _ => "labels starting with __ are Promtail's own and are not shipped",
                    };
                    self.report
                        .not_converted(format!("{sat}.labels.{k}"), reason);
                    continue;
                }
                s.labels
                    .push(Item::new(k, v.as_str()).note(format!("promtail: {sat}.labels.{k}")));
            }
            let known: BTreeSet<String> = s
                .labels
                .iter()
                .map(|i| i.key.clone())
                .chain(["filename".to_owned()])
                .collect();
            stages::pipeline(self, at, &sc.pipeline_stages, &mut s, known);
            if s.table.has("format") {
                // Promtail's static jobs get no labels from the kubelet's path or the pod.
                s.table.set("path_labels", "").note =
                    Some("Promtail's static jobs take no labels from the path".into());
                s.table.set("kubernetes", false);
            }
            sources.push(s);
        }
        if sc.static_configs.is_empty() && sc.kubernetes_sd_configs.is_empty() && sc.rest.is_empty()
        {
            self.report.not_converted(
                at,
                "no static_configs or kubernetes_sd_configs: nothing to read",
            );
        }
        sources
    }

    /// `limits_config`: what applies to every file.
    fn limits(&mut self, l: &model::LimitsConfig, sources: &mut [Source]) {
        self.report.rest("limits_config", &l.rest, |k| match k {
            "max_streams" => {
                Some("ztail bounds streams per label with the `labels` stage's max_values instead")
            }
            "max_line_size_truncate" => None,
            _ => None,
        });
        if l.readline_rate_enabled {
            let rate = l.readline_rate.unwrap_or(10_000.0);
            let burst = l.readline_burst.unwrap_or(10_000.0);
            let drop = l.readline_rate_drop.unwrap_or(true);
            let mut applied = false;
            for s in sources.iter_mut() {
                let has_limit = s.stages.iter().any(|t| t.kind() == Some("limit"));
                if has_limit {
                    let name = s.table.items[0]
                        .value
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    self.report.not_converted(
                        "limits_config.readline_rate",
                        format!(
                            "source {name:?} keeps its own limit stage (ztail runs one per source)"
                        ),
                    );
                    continue;
                }
                let mut t = Table::new("promtail: limits_config.readline_rate (per stream)");
                t.set("type", "limit");
                t.set("lines_per_second", rate);
                t.set("burst_lines", burst);
                t.set("action", if drop { "drop" } else { "hold" });
                s.stages.push(t);
                applied = true;
            }
            if applied {
                self.report.changed(
                    "limits_config.readline_rate",
                    "became a `limit` stage on every source: ztail limits each stream, Promtail limited the whole agent",
                );
            }
        }
        if let Some(size) = &l.max_line_size {
            match bytes(size) {
                Some(0) => {}
                Some(n) => {
                    for s in sources.iter_mut() {
                        if l.max_line_size_truncate {
                            s.table.set("max_line_bytes", n as i64).note =
                                Some("promtail: limits_config.max_line_size".into());
                        } else {
                            let mut t = Table::new(
                                "promtail: limits_config.max_line_size (lines longer are dropped)",
                            );
                            t.set("type", "drop");
                            t.set("longer_than", n as i64);
                            t.set("reason", "max_line_size");
                            s.stages.push(t);
                        }
                    }
                }
                None => self
                    .report
                    .not_converted("limits_config.max_line_size", "not a size"),
            }
        }
    }
}

/// A size in bytes: Promtail's sizes count `kb`, `mb`, `gb` in 1024s.
fn bytes(s: &Size) -> Option<u64> {
    match s {
        Size::Bytes(n) => Some(*n),
        Size::Text(t) => {
            let t = t.trim().to_ascii_lowercase();
            let split = t
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: f64 = num.parse().ok()?;
            let mult = match unit.trim() {
                "" | "b" => 1u64,
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                _ => return None,
            };
            Some((n * mult as f64) as u64)
        }
    }
}

/// A glob with `{a,b}` alternatives as the plain globs it stands for (ztail's globs have no
/// braces).
fn braces(glob: &str) -> Vec<String> {
    let mut out = expand_braces(glob);
    // An absurd number of alternatives is kept as written (and matches nothing).
    if out.len() > 256 {
        out = vec![glob.to_owned()];
    }
    out
}

fn expand_braces(glob: &str) -> Vec<String> {
    if glob.matches('{').count() > 16 {
        return vec![glob.to_owned()];
    }
    let Some(open) = glob.find('{') else {
        return vec![glob.to_owned()];
    };
    let mut depth = 0;
    let mut close = None;
    let mut commas = Vec::new();
    for (i, c) in glob[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            ',' if depth == 1 => commas.push(open + i),
            _ => {}
        }
    }
    let Some(close) = close else {
        return vec![glob.to_owned()];
    };
    let mut cuts = vec![open];
    cuts.extend(commas);
    cuts.push(close);
    let (head, tail) = (&glob[..open], &glob[close + 1..]);
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let alt = &glob[w[0] + 1..w[1]];
        out.extend(expand_braces(&format!("{head}{alt}{tail}")));
    }
    out
}

#[cfg(test)]
mod tests;
