//! `pipeline_stages`: Promtail's stages as a source's framing (`cri`, `docker`, `multiline`,
//! `timestamp`), static labels and ztail stages.
//!
//! Promtail's stages share an "extracted" map of named values; ztail's parsers produce fields
//! named by what they read (a JSON key, a logfmt key, a regex group). The converter keeps the
//! map from Promtail's names to ztail's fields, so that a later stage reading `msg` reads the
//! field of the JSON key `message` that Promtail called `msg`.

use std::collections::{BTreeMap, BTreeSet};

use toml::Value;

use super::model::{self, Stage};
use super::out::{Item, Source, Table, inline, strings};
use super::{Converter, bytes};
use crate::stage::template::{Part, Template};

/// Where a field's value comes from, for a `timestamp` stage that must read it from the line.
#[derive(Clone)]
enum Producer {
    /// A regex over the line: its expression.
    Regex(String),
    JsonKey(String),
    LogfmtKey(String),
    Other,
}

struct Job<'c, 'a> {
    c: &'c mut Converter<'a>,
    at: String,
    /// Promtail's extracted name → ztail's field.
    fields: BTreeMap<String, (String, Producer)>,
    /// Labels the source's entries carry at this point.
    labels: BTreeSet<String>,
    /// The target's labels, which Promtail also puts in the extracted map (stage-made labels
    /// are not there).
    initial: BTreeSet<String>,
    /// `match` stages that only set a tenant for one label value: label → (value → tenant),
    /// the first one's index, and where in the source's stages it goes.
    tenants: Option<(String, BTreeMap<String, String>, usize, usize)>,
    /// Stages written so far (framing must come before them).
    written: usize,
}

/// What a converted `labels` stage changes: ztail's cardinality guard.
pub(super) const MAX_VALUES_CHANGED: &str = "ztail keeps at most 100 values per label and source (later values go to structured metadata, counted): set max_values to change it";

pub(super) fn pipeline(
    c: &mut Converter,
    at: &str,
    stages: &[Stage],
    s: &mut Source,
    labels: BTreeSet<String>,
) {
    let mut job = Job {
        c,
        at: format!("{at}.pipeline_stages"),
        fields: BTreeMap::new(),
        initial: labels.clone(),
        labels,
        tenants: None,
        written: 0,
    };
    let mut skip_next = false;
    for (i, stage) in stages.iter().enumerate() {
        if skip_next {
            skip_next = false;
            continue;
        }
        let sat = format!("{}[{i}].{}", job.at, stage.name());
        let next = stages.get(i + 1);
        let position = s.stages.len();
        match job.stage(&sat, stage, next, s, position) {
            Ok(Converted::Stage(mut t)) => {
                t.origin = format!("promtail: {}[{i}] ({})", job.at, stage.name());
                job.written += 1;
                s.stages.push(t);
            }
            Ok(Converted::StageAndNext(mut t)) => {
                // The template's field is the line now; a later stage reading it is not converted.
                if let Stage::Template(tpl) = stage {
                    job.fields.remove(&tpl.source);
                }
                t.origin = format!(
                    "promtail: {}[{i}] ({}) with [{}] ({})",
                    job.at,
                    stage.name(),
                    i + 1,
                    next.map(Stage::name).unwrap_or_default()
                );
                job.written += 1;
                s.stages.push(t);
                skip_next = true;
            }
            Ok(Converted::Elsewhere) => {}
            Err(reason) => job.c.report.not_converted(sat, reason),
        }
    }
    if let Some((label, map, at, position)) = job.tenants.take() {
        let default = job
            .c
            .doc
            .sink
            .items
            .iter()
            .find(|i| i.key == "tenant")
            .and_then(|i| i.value.as_str().map(str::to_owned));
        let mut t = Table::new(format!(
            "promtail: {}[{at}] (match stages that set a tenant by {label})",
            job.at
        ));
        t.set("type", "tenant");
        t.set("label", label.as_str());
        t.set("map", inline(map));
        match default {
            Some(d) => {
                t.set("default", d).note = Some("the client's tenant_id".into());
            }
            None => {
                t.set("default", "fake").note = Some("Loki's tenant when auth is off".into());
                job.c.report.changed(
                    format!("{}[{at}].match", job.at),
                    "entries no selector matched go to tenant \"fake\" (Promtail sent them without X-Scope-OrgID)",
                );
            }
        }
        s.stages.insert(position.min(s.stages.len()), t);
    }
}

enum Converted {
    Stage(Table),
    /// The stage and the next one became one ztail stage (`template` + `output`).
    StageAndNext(Table),
    /// It became part of the source (framing, labels).
    Elsewhere,
}

fn ty(t: &str) -> Table {
    let mut table = Table::default();
    table.set("type", t);
    table
}

/// Promtail's stage options this converter does not read.
fn unread(c: &mut Converter, at: &str, rest: &model::Rest) {
    c.report.rest(at, rest, |_| None);
}

/// A Go duration as ztail reads it.
fn duration(d: &model::Duration) -> Result<String, String> {
    humantime::parse_duration(&d.0)
        .map(|_| d.0.clone())
        .map_err(|e| format!("{:?} is not a duration ztail reads: {e}", d.0))
}

impl Job<'_, '_> {
    fn field(&self, name: &str) -> Option<String> {
        self.fields.get(name).map(|(f, _)| f.clone())
    }

    fn no_field(&self, name: &str) -> String {
        format!("reads {name:?}, which no converted stage before it extracts")
    }

    fn stage(
        &mut self,
        at: &str,
        stage: &Stage,
        next: Option<&Stage>,
        s: &mut Source,
        position: usize,
    ) -> Result<Converted, String> {
        match stage {
            Stage::Cri(rest) | Stage::Docker(rest) => {
                let format = stage.name();
                if s.table.has("format") {
                    return Err("the source already has a format".into());
                }
                if self.written > 0 {
                    self.c.report.changed(
                        at,
                        "ztail decodes the container runtime's format before every stage",
                    );
                }
                s.table.set("format", format).note = Some(format!("promtail: {at}"));
                if let Some(rest) = rest {
                    self.c.report.rest(at, rest, |k| match k {
                        "max_partial_lines" | "max_partial_line_size" | "max_partial_line_size_truncate" => Some(
                            "ztail joins a line's partial pieces up to the source's max_line_bytes and truncates beyond",
                        ),
                        _ => None,
                    });
                }
                // The runtime's stream becomes a label in both.
                self.labels.insert("stream".into());
                Ok(Converted::Elsewhere)
            }
            Stage::Multiline(m) => {
                unread(self.c, at, &m.rest);
                if s.multiline.is_some() {
                    return Err("the source already has a multiline".into());
                }
                let mut t = Table::new(format!("promtail: {at}"));
                t.set("start", m.firstline.as_str());
                match &m.max_wait_time {
                    Some(d) if humantime::parse_duration(&d.0).is_ok_and(|d| d.is_zero()) => {
                        self.c.report.changed(
                            format!("{at}.max_wait_time"),
                            "0: ztail completes a group after 3s without a line",
                        );
                    }
                    Some(d) => {
                        t.set("timeout", duration(d)?);
                    }
                    None => {}
                }
                // Promtail's default is 128 lines, ztail's 500; 0 is no limit in Promtail.
                match m.max_lines {
                    Some(0) => self.c.report.changed(
                        format!("{at}.max_lines"),
                        "0 (no limit): ztail completes a group at 500 lines or 1MiB",
                    ),
                    n => {
                        t.set("max_lines", n.unwrap_or(128) as i64);
                    }
                }
                if self.written > 0 {
                    self.c.report.changed(
                        at,
                        "ztail groups lines before every stage (after the container format)",
                    );
                }
                s.multiline = Some(t);
                Ok(Converted::Elsewhere)
            }
            Stage::Regex(r) => {
                unread(self.c, at, &r.rest);
                let re = regex::Regex::new(&r.expression)
                    .map_err(|e| format!("the expression is not a regex ztail reads: {e}"))?;
                let mut t = ty("regex");
                t.set("expression", r.expression.as_str());
                let producer = match &r.source {
                    None => Producer::Regex(r.expression.clone()),
                    Some(src) => {
                        let f = self.field(src).ok_or_else(|| self.no_field(src))?;
                        t.set("field", f);
                        Producer::Other
                    }
                };
                let names: Vec<&str> = re.capture_names().flatten().collect();
                if names.is_empty() {
                    return Err("the expression has no named group: it extracts nothing".into());
                }
                for n in names {
                    self.fields
                        .insert(n.to_owned(), (n.to_owned(), producer.clone()));
                }
                Ok(Converted::Stage(t))
            }
            Stage::Json(j) => {
                unread(self.c, at, &j.rest);
                if j.source.is_some() {
                    return Err("JSON inside an extracted value: ztail's json stage reads the line".into());
                }
                let mut paths = Vec::new();
                for (name, expr) in &j.expressions {
                    let expr = expr.as_deref().filter(|e| !e.is_empty()).unwrap_or(name);
                    match json_path(expr) {
                        Some(p) => {
                            if !paths.contains(&p) {
                                paths.push(p.clone());
                            }
                            let producer = if p.contains('.') {
                                Producer::Other
                            } else {
                                Producer::JsonKey(p.clone())
                            };
                            self.fields.insert(name.clone(), (p, producer));
                        }
                        None => self.c.report.not_converted(
                            format!("{at}.expressions.{name}"),
                            format!("JMESPath {expr:?}: ztail's json stage reads keys and dotted paths only"),
                        ),
                    }
                }
                if paths.is_empty() {
                    return Err("no expression ztail can read".into());
                }
                let mut t = ty("json");
                t.set("fields", strings(&paths));
                Ok(Converted::Stage(t))
            }
            Stage::Logfmt(l) => {
                unread(self.c, at, &l.rest);
                if l.source.is_some() {
                    return Err("logfmt inside an extracted value: ztail's logfmt stage reads the line".into());
                }
                let mut keys = Vec::new();
                for (name, key) in &l.mapping {
                    let key = key.as_deref().filter(|k| !k.is_empty()).unwrap_or(name);
                    if !keys.iter().any(|k| k == key) {
                        keys.push(key.to_owned());
                    }
                    self.fields
                        .insert(name.clone(), (key.to_owned(), Producer::LogfmtKey(key.to_owned())));
                }
                if keys.is_empty() {
                    return Err("the mapping is empty".into());
                }
                let mut t = ty("logfmt");
                t.set("fields", strings(&keys));
                Ok(Converted::Stage(t))
            }
            Stage::Labels(m) | Stage::StructuredMetadata(m) => {
                let is_labels = matches!(stage, Stage::Labels(_));
                let mut set = BTreeMap::new();
                for (name, src) in m.iter().flatten() {
                    let src = src.as_deref().filter(|s| !s.is_empty()).unwrap_or(name);
                    match self.field(src) {
                        Some(f) => {
                            set.insert(name.clone(), f);
                        }
                        // Promtail's extracted map starts with the entry's labels.
                        None if self.labels.contains(src) && src == name && is_labels => {}
                        None => self
                            .c
                            .report
                            .not_converted(format!("{at}.{name}"), self.no_field(src)),
                    }
                }
                if set.is_empty() {
                    return Err("sets nothing ztail can set".into());
                }
                if is_labels {
                    self.labels.extend(set.keys().cloned());
                    self.c.report.changed(
                        at,
                        MAX_VALUES_CHANGED,
                    );
                }
                let mut t = ty(if is_labels { "labels" } else { "metadata" });
                t.set("set", inline(set));
                Ok(Converted::Stage(t))
            }
            Stage::StaticLabels(m) => {
                for (k, v) in m.iter().flatten() {
                    // Promtail skips an empty value.
                    let Some(v) = v.as_ref().filter(|v| !v.is_empty()) else {
                        continue;
                    };
                    s.labels.retain(|i| i.key != *k);
                    s.labels
                        .push(Item::new(k, v.as_str()).note(format!("promtail: {at}.{k}")));
                    self.labels.insert(k.clone());
                }
                Ok(Converted::Elsewhere)
            }
            Stage::Labeldrop(names) => {
                for n in names {
                    self.drop_label(at, n, s);
                }
                Ok(Converted::Elsewhere)
            }
            Stage::Labelallow(allowed) => {
                let all: Vec<String> = self.labels.iter().cloned().collect();
                for n in all.iter().filter(|n| !allowed.contains(n)) {
                    self.drop_label(at, n, s);
                }
                Ok(Converted::Elsewhere)
            }
            Stage::Timestamp(ts) => self.timestamp(at, ts, s),
            Stage::Output(o) => {
                unread(self.c, at, &o.rest);
                let f = self.field(&o.source).ok_or_else(|| self.no_field(&o.source))?;
                let mut t = ty("output");
                t.set("field", f);
                Ok(Converted::Stage(t))
            }
            Stage::Template(tpl) => {
                unread(self.c, at, &tpl.rest);
                let Some(Stage::Output(o)) = next.filter(|n| match n {
                    Stage::Output(o) => o.source == tpl.source,
                    _ => false,
                }) else {
                    return Err(
                        "ztail's template writes the line: only a template that an output stage right after it makes the line converts"
                            .into(),
                    );
                };
                unread(self.c, at, &o.rest);
                let parsed = Template::parse(&tpl.template).map_err(|e| {
                    format!("ztail templates have {{{{ .field }}}} and {{{{ .Entry }}}} only: {e}")
                })?;
                let mut line = String::new();
                for part in parsed.parts {
                    match part {
                        Part::Text(t) => line.push_str(&t),
                        Part::Line => line.push_str("{{ .Entry }}"),
                        Part::Field(name) => {
                            let name = if name == "Value" { tpl.source.clone() } else { name };
                            let f = self.field(&name).ok_or_else(|| self.no_field(&name))?;
                            line.push_str(&format!("{{{{ .{f} }}}}"));
                        }
                    }
                }
                let mut t = ty("template");
                t.set("line", line);
                Ok(Converted::StageAndNext(t))
            }
            Stage::Replace(r) => {
                unread(self.c, at, &r.rest);
                if r.source.is_some() {
                    return Err("replace in an extracted value: ztail's replace rewrites the line".into());
                }
                let with = r.replace.as_deref().unwrap_or("");
                if with.contains("{{") {
                    return Err("a templated replacement: ztail replaces with text and $group references".into());
                }
                let (expression, replace) = replace_groups(&r.expression, with)?;
                let mut t = ty("replace");
                t.set("expression", expression);
                t.set("replace", replace);
                Ok(Converted::Stage(t))
            }
            Stage::Match(m) => self.matcher(at, m, position),
            Stage::Drop(d) => self.drop(at, d),
            Stage::Tenant(tn) => {
                unread(self.c, at, &tn.rest);
                Err(match (&tn.source, &tn.value, &tn.label) {
                    (_, Some(_), _) => "a fixed tenant per job: ztail's tenants are allow-listed in a `tenant` stage's map (or `sink.tenant` for everything)",
                    _ => "a tenant taken from an entry's value: ztail sends only to tenants the config names; write a `tenant` stage with a map of the values you expect",
                }
                .into())
            }
            Stage::Limit(l) => {
                unread(self.c, at, &l.rest);
                let mut t = ty("limit");
                t.set("lines_per_second", l.rate);
                t.set("burst_lines", l.burst.max(1.0));
                t.set("action", if l.drop { "drop" } else { "hold" });
                self.c.report.changed(
                    at,
                    match &l.by_label_name {
                        Some(_) => "ztail limits each stream (every label combination), not each value of one label",
                        None => "ztail limits each stream of the source, not the whole pipeline together",
                    },
                );
                Ok(Converted::Stage(t))
            }
            Stage::Decolorize(rest) => {
                if let Some(rest) = rest {
                    unread(self.c, at, rest);
                }
                Ok(Converted::Stage(ty("decolorize")))
            }
            Stage::Pack(_) => Err("ztail does not pack labels into the line; keep them as labels or structured metadata".into()),
            Stage::Metrics(_) => Err("ztail makes no metrics from log lines".into()),
            Stage::Sampling(_) => Err("ztail does not sample: every line is shipped or dropped by a rule".into()),
            Stage::Geoip(_) => Err("ztail has no GeoIP database".into()),
            Stage::Eventlogmessage(_) => Err("Windows event logs: ztail runs on Linux".into()),
        }
    }

    fn drop_label(&mut self, at: &str, name: &str, s: &mut Source) {
        let before = s.labels.len();
        s.labels.retain(|i| i.key != name);
        let mut found = s.labels.len() != before;
        for t in s.stages.iter_mut() {
            let is_labels = t.kind() == Some("labels");
            for item in t.items.iter_mut().filter(|i| is_labels && i.key == "set") {
                if let Value::Table(m) = &mut item.value {
                    found |= m.remove(name).is_some();
                }
            }
        }
        // A labels stage left empty sets nothing.
        s.stages.retain(|t| {
            t.kind() != Some("labels")
                || !t
                    .get("set")
                    .and_then(|v| v.as_table())
                    .is_some_and(|m| m.is_empty())
        });
        let framed = s.table.has("format");
        if name == "stream" && framed && !s.table.has("stream_as") {
            s.table.set("stream_as", "drop").note = Some(format!("promtail: {at}.stream"));
            found = true;
        }
        if found {
            self.labels.remove(name);
            return;
        }
        let reason = match name {
            "filename" => "ztail labels every entry with its file (`filename`), as Promtail does unless told otherwise; it cannot be removed".to_owned(),
            "namespace" | "pod" | "container" if framed => "ztail's cri and docker sources take namespace, pod and container from the kubelet's path together; `path_labels = \"\"` on the source removes all three".to_owned(),
            _ if self
                .c
                .doc
                .kubernetes
                .as_ref()
                .is_some_and(|k| k.labels.iter().any(|i| i.key == name)) =>
            {
                format!("{name:?} is a [kubernetes.labels] label, which applies to every pod source: remove it there")
            }
            _ => format!("ztail cannot remove the label {name:?}: no part of this config sets it"),
        };
        self.c.report.not_converted(format!("{at}.{name}"), reason);
    }

    fn timestamp(
        &mut self,
        at: &str,
        ts: &model::Timestamp,
        s: &mut Source,
    ) -> Result<Converted, String> {
        unread(self.c, at, &ts.rest);
        if s.table.has("format") {
            return Err(
                "cri and docker sources take each entry's timestamp from the container runtime"
                    .into(),
            );
        }
        let format = match ts.format.as_str() {
            "RFC3339"
            | "RFC3339Nano"
            | "2006-01-02T15:04:05Z07:00"
            | "2006-01-02T15:04:05.999999999Z07:00"
            | "2006-01-02T15:04:05.000Z07:00" => "rfc3339",
            "Unix" => "unix_seconds",
            "UnixMs" => "unix_millis",
            "UnixUs" => "unix_micros",
            "UnixNs" => "unix_nanos",
            other => {
                return Err(format!(
                    "format {other:?}: ztail reads RFC 3339 and Unix timestamps only; entries get the time they are read"
                ));
            }
        };
        let (_, producer) = self
            .fields
            .get(&ts.source)
            .cloned()
            .ok_or_else(|| self.no_field(&ts.source))?;
        if matches!(producer, Producer::JsonKey(_) | Producer::LogfmtKey(_)) {
            self.c.report.changed(
                at,
                "ztail reads the timestamp with a regex over the line: the first occurrence of the key, also inside a nested object or a quoted value",
            );
        }
        if self.written > 0 {
            self.c.report.changed(
                at,
                "ztail reads the timestamp before every stage, so a stage before it (a drop by older_than) sees it",
            );
        }
        let rfc = format == "rfc3339";
        let regex = match producer {
            Producer::Regex(expr) => rename_group(&expr, &ts.source)
                .ok_or("the regex that extracts it cannot be reused")?,
            Producer::JsonKey(k) => {
                let value = if rfc { r#"[^"]+"# } else { r"[0-9.]+" };
                format!(r#""{}"\s*:\s*"?(?P<ts>{value})"#, regex::escape(&k))
            }
            Producer::LogfmtKey(k) => {
                let value = if rfc { r#"[^"\s]+"# } else { r"[0-9.]+" };
                format!(r#"(?:^|\s){}="?(?P<ts>{value})"#, regex::escape(&k))
            }
            Producer::Other => {
                return Err(
                    "its source is not read from the line by a regex, a JSON key or a logfmt key"
                        .into(),
                );
            }
        };
        if s.timestamp.is_some() {
            return Err("the source already has a timestamp".into());
        }
        let mut t = Table::new(format!("promtail: {at}"));
        t.set("regex", regex);
        t.set("format", format);
        // `location` does not apply: every format converted carries its zone or is Unix time.
        if !ts.fallback_formats.is_empty() {
            self.c.report.not_converted(
                format!("{at}.fallback_formats"),
                "ztail reads one format; entries whose timestamp does not parse get the time they are read",
            );
        }
        if ts.action_on_failure.as_deref() != Some("skip") {
            self.c.report.changed(
                format!("{at}.action_on_failure"),
                "an entry whose timestamp does not parse gets the time it is read (Promtail's fudge gave the last good timestamp plus 1ns)",
            );
        }
        s.timestamp = Some(t);
        Ok(Converted::Elsewhere)
    }

    fn drop(&mut self, at: &str, d: &model::Drop) -> Result<Converted, String> {
        unread(self.c, at, &d.rest);
        let mut t = ty("drop");
        let source = match &d.source {
            None => None,
            Some(model::OneOrMany::Many(v)) if v.is_empty() => None,
            Some(model::OneOrMany::One(s)) => Some(s.clone()),
            Some(model::OneOrMany::Many(v)) if v.len() == 1 => Some(v[0].clone()),
            Some(model::OneOrMany::Many(_)) => {
                return Err("several sources joined: ztail's drop tests one field or label".into());
            }
        };
        let value = match (&d.expression, &d.value) {
            (Some(_), Some(_)) => {
                return Err("both expression and value (Promtail refuses it too)".into());
            }
            (Some(e), None) => Some(e.clone()),
            (None, Some(v)) => Some(format!("^{}$", regex::escape(v))),
            (None, None) => None,
        };
        let empty = value
            .as_ref()
            .is_some_and(|v| regex::Regex::new(v).is_ok_and(|re| re.is_match("")));
        if empty && source.is_some() {
            return Err(
                "the value matches an empty one: Promtail drops entries without the field, ztail never tests a missing field"
                    .into(),
            );
        }
        if d.value.is_some() && source.is_none() {
            return Err("value without source (Promtail refuses it)".into());
        }
        match (source, value) {
            (Some(src), value) => {
                if let Some(f) = self.field(&src) {
                    t.set("field", f);
                } else if self.initial.contains(&src) {
                    t.set("label", src);
                } else {
                    return Err(self.no_field(&src));
                }
                // Promtail drops on the source's presence alone.
                t.set("value", value.unwrap_or_else(|| "".into()));
            }
            (None, Some(expr)) => {
                t.set("line", expr);
            }
            (None, None) => {}
        }
        if let Some(o) = &d.older_than {
            t.set("older_than", duration(o)?);
        }
        if let Some(l) = &d.longer_than {
            let n = bytes(l).ok_or("longer_than is not a size")?;
            t.set("longer_than", n as i64);
        }
        if t.items.len() == 1 {
            return Err("no condition: it would drop every entry".into());
        }
        // Promtail counts drops under this reason unless told otherwise.
        t.set(
            "reason",
            d.drop_counter_reason.as_deref().unwrap_or("drop_stage"),
        );
        Ok(Converted::Stage(t))
    }

    fn matcher(
        &mut self,
        at: &str,
        m: &model::Match,
        position: usize,
    ) -> Result<Converted, String> {
        unread(self.c, at, &m.rest);
        let sel =
            Selector::parse(&m.selector).map_err(|e| format!("selector {:?}: {e}", m.selector))?;
        let action = m.action.as_deref().unwrap_or("keep");
        if action == "keep" {
            // The multi-tenant shape: a selector on one label's value whose only stage names
            // a tenant.
            if let ([(label, Op::Eq, value)], [], [Stage::Tenant(tn)]) = (
                sel.matchers.as_slice(),
                sel.filters.as_slice(),
                m.stages.as_slice(),
            ) && let (Some(tenant), None, None) = (&tn.value, &tn.source, &tn.label)
            {
                let index = at
                    .rsplit_once('[')
                    .and_then(|(_, r)| r.split(']').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let entry = self
                    .tenants
                    .get_or_insert_with(|| (label.clone(), BTreeMap::new(), index, position));
                if entry.0 == *label && !entry.1.contains_key(value) {
                    entry.1.insert(value.clone(), tenant.clone());
                    return Ok(Converted::Elsewhere);
                }
                return Err(
                    "tenants by more than one label: ztail's tenant stage maps one label".into(),
                );
            }
            return Err(
                "match with nested stages: ztail's stages are flat; conditions live on drop and keep stages"
                    .into(),
            );
        }
        if action != "drop" {
            return Err(format!("action {action:?}"));
        }
        if !m.stages.is_empty() {
            self.c.report.not_converted(
                format!("{at}.stages"),
                "a match that drops has no stages (Promtail refuses the config)",
            );
        }
        let mut t = ty("drop");
        match (sel.matchers.as_slice(), sel.filters.as_slice()) {
            ([(l, op, v)], filters) => {
                let re = match op {
                    Op::Eq | Op::Ne => format!("^{}$", regex::escape(v)),
                    Op::Re | Op::Nre => format!("^(?:{v})$"),
                };
                if regex::Regex::new(&re).is_ok_and(|r| r.is_match("")) {
                    return Err("a matcher that matches an empty value: Promtail tests a missing label as \"\", ztail's stages never match a missing label".into());
                }
                if matches!(op, Op::Ne | Op::Nre) {
                    if !filters.is_empty() {
                        return Err("a negative matcher with a line filter".into());
                    }
                    t = ty("keep");
                }
                t.set("label", l.as_str());
                t.set("value", re);
                if let [(positive, f)] = filters {
                    if !positive {
                        return Err("a negative line filter with a label matcher".into());
                    }
                    t.set("line", f.as_str());
                } else if filters.len() > 1 {
                    return Err("several line filters".into());
                }
            }
            ([], [(positive, f)]) => {
                if !positive {
                    t = ty("keep");
                }
                t.set("line", f.as_str());
            }
            _ => {
                return Err("several matchers: ztail's drop tests one label".into());
            }
        }
        t.set(
            "reason",
            m.drop_counter_reason.as_deref().unwrap_or("match_stage"),
        );
        Ok(Converted::Stage(t))
    }
}

/// A key or dotted path from a JMESPath expression, when it is only that.
fn json_path(expr: &str) -> Option<String> {
    let e = expr.trim();
    // A quoted identifier: "@timestamp".
    if let Some(inner) = e.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return (!inner.is_empty() && !inner.contains(['"', '\\', '.'])).then(|| inner.to_owned());
    }
    let ok = !e.is_empty()
        && e.split('.').all(|seg| {
            let mut cs = seg.chars();
            cs.next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    ok.then(|| e.to_owned())
}

/// The regex with its group `name` renamed `ts`, for `timestamp.regex`.
fn rename_group(expr: &str, name: &str) -> Option<String> {
    if name == "ts" {
        return Some(expr.to_owned());
    }
    for open in ["(?P<", "(?<"] {
        let from = format!("{open}{name}>");
        if expr.contains(&from) {
            let renamed = expr.replacen(&from, "(?P<ts>", 1);
            // Another group named ts would clash.
            return regex::Regex::new(&renamed).ok().map(|_| renamed);
        }
    }
    None
}

/// Promtail's `replace` rewrites what each capture group matched; ztail's rewrites the whole
/// match. So the text between the groups becomes groups of its own that the replacement puts
/// back: `password (\S+)` with `****` becomes `(password )(?:\S+)()` with `${1}****${2}`.
fn replace_groups(expr: &str, with: &str) -> Result<(String, String), String> {
    let groups = |re: &str| regex::Regex::new(re).map(|r| r.captures_len() - 1);
    match groups(expr) {
        Err(e) => return Err(format!("the expression is not a regex ztail reads: {e}")),
        Ok(0) => return Err("no capture group: Promtail replaces nothing".into()),
        Ok(_) => {}
    }
    // Split the top level into text, group, text, group, ..., text.
    let mut texts = vec![String::new()];
    let mut bodies = Vec::new();
    let mut prefix = "";
    let mut i = 0;
    while i < expr.len() {
        let rest = &expr[i..];
        let c = rest.chars().next().unwrap_or_default();
        let len = match c {
            '\\' => 1 + rest[1..].chars().next().map_or(0, char::len_utf8),
            '[' => class_len(rest).ok_or("an unclosed [")?,
            '(' => {
                let g = &rest[..group_len(rest).ok_or("an unclosed (")?];
                let inner = &g[1..g.len() - 1];
                let named = inner
                    .strip_prefix("?P<")
                    .or_else(|| inner.strip_prefix("?<"))
                    .and_then(|r| r.split_once('>'))
                    .map(|(_, body)| body);
                match named.or((!inner.starts_with('?')).then_some(inner)) {
                    Some(body) => {
                        if rest[g.len()..].starts_with(['?', '*', '+', '{']) {
                            return Err("a capture group with a quantifier".into());
                        }
                        if groups(body).map_err(|e| e.to_string())? > 0 {
                            return Err("a capture group inside another group".into());
                        }
                        bodies.push(body.to_owned());
                        texts.push(String::new());
                    }
                    None if !inner.contains(':') => {
                        // A flag group such as `(?i)` applies to what follows: only at the start.
                        if i > 0 {
                            return Err("inline flags inside the expression".into());
                        }
                        prefix = g;
                    }
                    None => {
                        if groups(g).map_err(|e| e.to_string())? > 0 {
                            return Err("a capture group inside another group".into());
                        }
                        texts.last_mut().expect("never empty").push_str(g);
                    }
                }
                g.len()
            }
            '|' => return Err("an alternation at the top level".into()),
            _ => c.len_utf8(),
        };
        if !matches!(c, '(') {
            texts
                .last_mut()
                .expect("never empty")
                .push_str(&rest[..len]);
        }
        i += len;
    }
    let literal = with.replace('$', "$$");
    let mut expression = prefix.to_owned();
    let mut replace = String::new();
    for (n, text) in texts.iter().enumerate() {
        expression.push_str(&format!("({text})"));
        replace.push_str(&format!("${{{}}}", n + 1));
        if let Some(body) = bodies.get(n) {
            expression.push_str(&format!("(?:{body})"));
            replace.push_str(&literal);
        }
    }
    regex::Regex::new(&expression).map_err(|e| format!("cannot rewrite the expression: {e}"))?;
    Ok((expression, replace))
}

/// The length of the character class `[...]` at the start of `s`.
fn class_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 1;
    if b.get(i) == Some(&b'^') {
        i += 1;
    }
    if b.get(i) == Some(&b']') {
        i += 1;
    }
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'[' if b.get(i + 1) == Some(&b':') => {
                // A POSIX class such as [:alpha:].
                i += s[i..].find(":]").map_or(1, |p| p + 2);
            }
            b']' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The length of the group `(...)` at the start of `s`.
fn group_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'[' => i += class_len(&s[i..])?,
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[derive(Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Re,
    Nre,
}

/// A LogQL stream selector with optional line filters: `{app="a", env=~"p.*"} |= "x"`.
#[derive(Debug)]
struct Selector {
    matchers: Vec<(String, Op, String)>,
    /// (positive, regex).
    filters: Vec<(bool, String)>,
}

impl Selector {
    fn parse(s: &str) -> Result<Selector, String> {
        let s = s.trim();
        let rest = s.strip_prefix('{').ok_or("it does not start with {")?;
        let mut rest = rest.trim_start();
        let mut matchers = Vec::new();
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .ok_or("unclosed {")?;
            let (name, r) = rest.split_at(end);
            if name.is_empty() {
                return Err("a matcher without a label name".into());
            }
            let r = r.trim_start();
            let (op, r) = if let Some(r) = r.strip_prefix("=~") {
                (Op::Re, r)
            } else if let Some(r) = r.strip_prefix("!~") {
                (Op::Nre, r)
            } else if let Some(r) = r.strip_prefix("!=") {
                (Op::Ne, r)
            } else if let Some(r) = r.strip_prefix('=') {
                (Op::Eq, r)
            } else {
                return Err(format!("no operator after {name}"));
            };
            let (value, r) = quoted(r.trim_start())?;
            matchers.push((name.to_owned(), op, value));
            rest = r.trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r.trim_start();
            }
        }
        let mut filters = Vec::new();
        loop {
            rest = rest.trim_start();
            if rest.is_empty() {
                break;
            }
            let (positive, is_regex, r) = if let Some(r) = rest.strip_prefix("|=") {
                (true, false, r)
            } else if let Some(r) = rest.strip_prefix("|~") {
                (true, true, r)
            } else if let Some(r) = rest.strip_prefix("!=") {
                (false, false, r)
            } else if let Some(r) = rest.strip_prefix("!~") {
                (false, true, r)
            } else {
                return Err(format!("{rest:?} is not a line filter (|=, |~, !=, !~)"));
            };
            let (value, r) = quoted(r.trim_start())?;
            filters.push((
                positive,
                if is_regex {
                    value
                } else {
                    regex::escape(&value)
                },
            ));
            rest = r;
        }
        Ok(Selector { matchers, filters })
    }
}

/// A double-quoted (with escapes) or backquoted string, and what follows it.
fn quoted(s: &str) -> Result<(String, &str), String> {
    if let Some(r) = s.strip_prefix('`') {
        let end = r.find('`').ok_or("unclosed `")?;
        return Ok((r[..end].to_owned(), &r[end + 1..]));
    }
    let r = s.strip_prefix('"').ok_or("a value must be quoted")?;
    let mut out = String::new();
    let mut chars = r.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &r[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, c)) => out.push(c),
                None => break,
            },
            c => out.push(c),
        }
    }
    Err("unclosed \"".into())
}

#[cfg(test)]
pub(super) fn test_replace(expr: &str, with: &str) -> Result<(String, String), String> {
    replace_groups(expr, with)
}

#[cfg(test)]
pub(super) fn test_selector(s: &str) -> Result<usize, String> {
    Selector::parse(s).map(|s| s.matchers.len() + s.filters.len())
}
