//! The `stages` of a `[[sources]]` table: raw serde types and their validation into a
//! [`Pipeline`]. Every regex, template, field, label name and tenant is checked here, with the
//! key path in the error, so that nothing about a stage can fail while lines flow.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

use super::redact::Redactor;
use super::template::Template;
use super::{
    Cond, Field, Limit, LimitAction, Parser, ParserKind, Pipeline, Stage, TenantFrom, TenantRule,
};
use crate::config::{ByteSize, ConfigError, Validator, humantime_serde};
use crate::loki::labels;

/// One `[[sources.stages]]` table, tagged by `type`.
#[derive(Deserialize, Debug, Clone)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawStage {
    Drop(RawCond),
    Keep(RawCond),
    Json {
        fields: Vec<String>,
    },
    Logfmt {
        fields: Vec<String>,
    },
    Regex {
        expression: String,
        field: Option<String>,
    },
    Labels {
        #[serde(default)]
        fields: Vec<String>,
        #[serde(default)]
        set: BTreeMap<String, String>,
        max_values: Option<usize>,
        overflow_value: Option<String>,
    },
    Metadata {
        #[serde(default)]
        fields: Vec<String>,
        #[serde(default)]
        set: BTreeMap<String, String>,
    },
    Output {
        field: String,
    },
    Template {
        line: String,
    },
    Replace {
        expression: String,
        replace: String,
    },
    Decolorize {},
    Redact {
        #[serde(default = "default_true")]
        builtin: bool,
        #[serde(default)]
        rules: Vec<RawRule>,
    },
    Tenant {
        field: Option<String>,
        label: Option<String>,
        map: BTreeMap<String, String>,
        default: Option<String>,
        #[serde(default)]
        drop_unmapped: bool,
    },
    Limit {
        lines_per_second: Option<f64>,
        bytes_per_second: Option<ByteSize>,
        burst_lines: Option<f64>,
        burst_bytes: Option<ByteSize>,
        #[serde(default)]
        action: LimitAction,
    },
}

/// The condition of a `drop` or `keep` stage: every key given must hold.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCond {
    line: Option<String>,
    field: Option<String>,
    label: Option<String>,
    value: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    older_than: Option<Duration>,
    longer_than: Option<ByteSize>,
    reason: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    name: String,
    regex: String,
}

fn default_true() -> bool {
    true
}

/// Distinct values a label set by a stage may take per source before further values overflow.
pub const DEFAULT_MAX_VALUES: usize = 100;

/// What the rest of the source's config fixes that stages must respect.
pub struct Context<'a> {
    /// Label names every stream of the source already has (static, `filename`, `host`, path
    /// captures, `stream`).
    pub taken_labels: &'a [String],
    /// Metadata names the framing sets.
    pub framing_meta: &'a [String],
    /// Fields the source gives with each entry (the journal's), which stages may read like
    /// parsed ones; the key path that names them.
    pub given: (&'a [String], &'a str),
}

/// Validates a source's stages. `key` is the source's key path (`sources[0]`).
pub fn validate(
    v: &Validator,
    key: &str,
    raw: Vec<RawStage>,
    ctx: &Context,
) -> Result<Option<Pipeline>, ConfigError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let mut b = Builder {
        v,
        p: Pipeline::empty(),
        producer: HashMap::new(),
        used: HashSet::new(),
        label_names: ctx.taken_labels.iter().cloned().collect(),
        meta_names: ctx.framing_meta.iter().cloned().collect(),
        rules: Vec::new(),
        builtin: false,
        redact_key: None,
    };
    if !ctx.given.0.is_empty() {
        b.produce(ctx.given.1, 0, ctx.given.0)?;
        b.p.parsers
            .push(Parser::new(ParserKind::Given, ctx.given.0.to_vec()));
    }
    for (i, stage) in raw.into_iter().enumerate() {
        let k = format!("{key}.stages[{i}]");
        b.stage(&k, i, stage)?;
    }
    b.finish(key)
}

struct Builder<'a> {
    v: &'a Validator<'a>,
    p: Pipeline,
    /// Field name → the parser producing it.
    producer: HashMap<String, (usize, String)>,
    used: HashSet<String>,
    label_names: HashSet<String>,
    meta_names: HashSet<String>,
    rules: Vec<(String, String)>,
    builtin: bool,
    redact_key: Option<String>,
}

impl Builder<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        self.v.err(key, reason)
    }

    fn regex(&self, key: &str, re: &str) -> Result<regex::bytes::Regex, ConfigError> {
        regex::bytes::Regex::new(re).map_err(|e| self.err(key, format!("invalid regex: {e}")))
    }

    /// A field a stage reads: some earlier stage must produce it.
    fn field(&mut self, key: &str, name: &str) -> Result<Field, ConfigError> {
        match self.producer.get(name) {
            Some((parser, _)) => {
                self.used.insert(name.to_owned());
                let parser = *parser;
                Ok(self.p.field_id(name, parser))
            }
            None => Err(self.err(
                key,
                format!(
                    "field {name:?} is produced by no earlier stage: add a json, logfmt or regex stage before this one that extracts it (a journal source's fields are named in journal.fields)"
                ),
            )),
        }
    }

    /// Declares the fields a parser produces.
    fn produce(&mut self, key: &str, parser: usize, names: &[String]) -> Result<(), ConfigError> {
        if names.is_empty() {
            return Err(self.err(key, "names no field to extract"));
        }
        for name in names {
            if name.is_empty() || name.len() > 256 {
                return Err(self.err(key, format!("invalid field name {name:?}")));
            }
            if let Some((_, by)) = self.producer.get(name) {
                return Err(self.err(
                    key,
                    format!("field {name:?} is already produced by {by}: name each field once"),
                ));
            }
            self.producer.insert(name.clone(), (parser, key.to_owned()));
        }
        Ok(())
    }

    fn label_name(&mut self, key: &str, name: &str) -> Result<u16, ConfigError> {
        labels::validate_name(name).map_err(|r| self.err(key, r))?;
        if !self.label_names.insert(name.to_owned()) {
            return Err(self.err(
                key,
                format!("label {name:?} is already set by the source or an earlier stage"),
            ));
        }
        self.p.label_names.push(name.to_owned());
        Ok((self.p.label_names.len() - 1) as u16)
    }

    fn meta_name(&mut self, key: &str, name: &str) -> Result<u16, ConfigError> {
        labels::validate_name(name).map_err(|r| self.err(key, r))?;
        if name == crate::loki::encode::AGENT_ID || !self.meta_names.insert(name.to_owned()) {
            return Err(self.err(key, format!("{name:?} is already a metadata field")));
        }
        self.p.meta_names.push(name.to_owned());
        Ok((self.p.meta_names.len() - 1) as u16)
    }

    fn cond(&mut self, key: &str, i: usize, c: RawCond, kind: &str) -> Result<Cond, ConfigError> {
        let line = match &c.line {
            Some(re) => Some(self.regex(&format!("{key}.line"), re)?),
            None => None,
        };
        let target = match (&c.field, &c.label) {
            (Some(_), Some(_)) => {
                return Err(self.err(key, "set field or label, not both"));
            }
            (Some(f), None) => Some(super::Target::Field(
                self.field(&format!("{key}.field"), f)?,
            )),
            (None, Some(l)) => {
                labels::validate_name(l).map_err(|r| self.err(&format!("{key}.label"), r))?;
                Some(super::Target::Label(l.clone()))
            }
            (None, None) => None,
        };
        let target = match (target, &c.value) {
            (Some(t), Some(re)) => Some((t, self.regex(&format!("{key}.value"), re)?)),
            (Some(_), None) => {
                return Err(self.err(
                    &format!("{key}.value"),
                    "missing: a regex the field or label must match",
                ));
            }
            (None, Some(_)) => {
                return Err(self.err(&format!("{key}.value"), "needs field or label"));
            }
            (None, None) => None,
        };
        if line.is_none() && target.is_none() && c.older_than.is_none() && c.longer_than.is_none() {
            return Err(self.err(
                key,
                format!(
                    "a {kind} stage needs a condition: line, field and value, label and value, older_than or longer_than"
                ),
            ));
        }
        if let Some(d) = c.older_than
            && d.is_zero()
        {
            return Err(self.err(&format!("{key}.older_than"), "must be above zero"));
        }
        let reason = c.reason.unwrap_or_else(|| format!("stages[{i}]"));
        if reason.is_empty() || reason.len() > 64 {
            return Err(self.err(&format!("{key}.reason"), "1 to 64 characters"));
        }
        self.p.reasons.push(reason);
        Ok(Cond {
            line,
            target,
            older_than: match c.older_than {
                Some(d) => Some(i64::try_from(d.as_nanos()).map_err(|_| {
                    self.err(
                        &format!("{key}.older_than"),
                        "too large (at most about 292 years)",
                    )
                })?),
                None => None,
            },
            longer_than: c.longer_than.map(|b| b.0 as usize),
            reason: (self.p.reasons.len() - 1) as u16,
        })
    }

    fn stage(&mut self, key: &str, i: usize, raw: RawStage) -> Result<(), ConfigError> {
        let stage = match raw {
            RawStage::Drop(c) => Stage::Drop(self.cond(key, i, c, "drop")?),
            RawStage::Keep(c) => Stage::Keep(self.cond(key, i, c, "keep")?),
            RawStage::Json { fields } => {
                let parser = self.p.parsers.len();
                self.produce(&format!("{key}.fields"), parser, &fields)?;
                for (j, f) in fields.iter().enumerate() {
                    if f.split('.').any(str::is_empty) {
                        return Err(self.err(
                            &format!("{key}.fields[{j}]"),
                            format!("{f:?}: a path of keys separated by dots, like \"user.id\""),
                        ));
                    }
                }
                self.p.parsers.push(Parser::new(ParserKind::Json, fields));
                return Ok(());
            }
            RawStage::Logfmt { fields } => {
                let parser = self.p.parsers.len();
                self.produce(&format!("{key}.fields"), parser, &fields)?;
                self.p.parsers.push(Parser::new(ParserKind::Logfmt, fields));
                return Ok(());
            }
            RawStage::Regex { expression, field } => {
                let k = format!("{key}.expression");
                let re = self.regex(&k, &expression)?;
                let names: Vec<String> = re.capture_names().flatten().map(str::to_owned).collect();
                if names.is_empty() {
                    return Err(self.err(
                        &k,
                        "has no named capture group: name the parts that become fields, e.g. (?P<level>\\w+)",
                    ));
                }
                let source = match field {
                    Some(f) => Some(self.field(&format!("{key}.field"), &f)?),
                    None => None,
                };
                let parser = self.p.parsers.len();
                self.produce(&k, parser, &names)?;
                self.p
                    .parsers
                    .push(Parser::new(ParserKind::Regex { re, source }, names));
                return Ok(());
            }
            RawStage::Labels {
                fields,
                set,
                max_values,
                overflow_value,
            } => {
                let pairs = self.pairs(key, fields, set)?;
                let max_values = max_values.unwrap_or(DEFAULT_MAX_VALUES);
                if max_values == 0 || max_values > 100_000 {
                    return Err(self.err(&format!("{key}.max_values"), "between 1 and 100000"));
                }
                if let Some(o) = &overflow_value {
                    labels::validate_value(o)
                        .map_err(|r| self.err(&format!("{key}.overflow_value"), r))?;
                }
                let mut set = Vec::new();
                for (label, field) in pairs {
                    let k = format!("{key}.set.{label}");
                    let field = self.field(&k, &field)?;
                    let id = self.label_name(&k, &label)?;
                    // An overflowing value is kept as metadata of the label's name, unless
                    // a fixed overflow value replaces it.
                    let meta = match overflow_value {
                        Some(_) => None,
                        None => Some(self.meta_name(&k, &label)?),
                    };
                    set.push((id, field, meta));
                }
                Stage::Labels {
                    set,
                    max_values,
                    overflow: overflow_value,
                }
            }
            RawStage::Metadata { fields, set } => {
                let pairs = self.pairs(key, fields, set)?;
                let mut out = Vec::new();
                for (name, field) in pairs {
                    let k = format!("{key}.set.{name}");
                    let field = self.field(&k, &field)?;
                    out.push((self.meta_name(&k, &name)?, field));
                }
                Stage::Metadata(out)
            }
            RawStage::Output { field } => {
                Stage::Output(self.field(&format!("{key}.field"), &field)?)
            }
            RawStage::Template { line } => {
                let k = format!("{key}.line");
                let t = Template::parse(&line).map_err(|r| self.err(&k, r))?;
                let mut fields = Vec::new();
                for name in t.field_names() {
                    fields.push(self.field(&k, name)?);
                }
                Stage::Template(t.resolve(&fields))
            }
            RawStage::Replace {
                expression,
                replace,
            } => {
                let re = self.regex(&format!("{key}.expression"), &expression)?;
                Stage::Replace { re, with: replace }
            }
            RawStage::Decolorize {} => Stage::Decolorize,
            RawStage::Redact { builtin, rules } => {
                if !builtin && rules.is_empty() {
                    return Err(self.err(key, "no rules and builtin = false: redacts nothing"));
                }
                self.builtin |= builtin;
                let base = self.rules.len();
                self.rules
                    .extend(rules.into_iter().map(|r| (r.name, r.regex)));
                // Compiled here for the error's key; the pipeline compiles all rules at once.
                Redactor::new(false, &self.rules[base..])
                    .map_err(|(j, r)| self.err(&format!("{key}.rules[{j}]"), r))?;
                self.redact_key.get_or_insert_with(|| key.to_owned());
                return Ok(());
            }
            RawStage::Tenant {
                field,
                label,
                map,
                default,
                drop_unmapped,
            } => {
                if self.p.tenant.is_some() {
                    return Err(self.err(key, "a source has at most one tenant stage"));
                }
                let from = match (field, label) {
                    (Some(f), None) => TenantFrom::Field(self.field(&format!("{key}.field"), &f)?),
                    // The label must be set by then: by the source or an earlier stage.
                    (None, Some(l)) if self.label_names.contains(&l) => TenantFrom::Label(l),
                    (None, Some(l)) => {
                        return Err(self.err(
                            &format!("{key}.label"),
                            format!(
                                "label {l:?} is set neither by the source nor by an earlier stage"
                            ),
                        ));
                    }
                    _ => {
                        return Err(self.err(
                            key,
                            "set exactly one of field or label: where the entry's tenant key comes from",
                        ));
                    }
                };
                if map.len() > 1000 {
                    return Err(self.err(&format!("{key}.map"), "at most 1000 values"));
                }
                if map.is_empty() {
                    return Err(self.err(&format!("{key}.map"), "is empty: map values to tenants"));
                }
                let default = match (default, drop_unmapped) {
                    (Some(_), true) => {
                        return Err(self.err(key, "set default or drop_unmapped, not both"));
                    }
                    (None, false) => {
                        return Err(self.err(
                            key,
                            "set default = \"tenant\" or drop_unmapped = true: say where an entry whose value is not in the map goes",
                        ));
                    }
                    (d, _) => d,
                };
                let mut tenants: Vec<String> = Vec::new();
                let mut index = |t: &str, k: String| -> Result<u16, ConfigError> {
                    validate_tenant(t).map_err(|r| self.v.err(k, r))?;
                    Ok(match tenants.iter().position(|x| x == t) {
                        Some(i) => i as u16,
                        None => {
                            tenants.push(t.to_owned());
                            (tenants.len() - 1) as u16
                        }
                    })
                };
                let mut m = HashMap::new();
                for (value, tenant) in &map {
                    m.insert(
                        value.as_bytes().to_vec().into_boxed_slice(),
                        index(tenant, format!("{key}.map.{value}"))?,
                    );
                }
                let default = match default {
                    Some(d) => Some(index(&d, format!("{key}.default"))?),
                    None => None,
                };
                self.p.reasons.push("tenant_unmapped".into());
                self.p.tenant = Some(TenantRule {
                    from,
                    map: m,
                    default,
                    tenants: tenants.into_iter().map(Into::into).collect(),
                    reason: (self.p.reasons.len() - 1) as u16,
                });
                Stage::Tenant
            }
            RawStage::Limit {
                lines_per_second,
                bytes_per_second,
                burst_lines,
                burst_bytes,
                action,
            } => {
                if self.p.limit.is_some() {
                    return Err(self.err(key, "a source has at most one limit stage"));
                }
                if lines_per_second.is_none() && bytes_per_second.is_none() {
                    return Err(self.err(key, "set lines_per_second, bytes_per_second or both"));
                }
                let rate = |k: &str, r: Option<f64>| match r {
                    Some(r) if !(r >= 0.001 && r.is_finite()) => {
                        Err(self.err(&format!("{key}.{k}"), "must be at least 0.001"))
                    }
                    _ => Ok(r),
                };
                let lines = rate("lines_per_second", lines_per_second)?;
                let bytes = rate("bytes_per_second", bytes_per_second.map(|b| b.0 as f64))?;
                let burst_l = rate("burst_lines", burst_lines)?;
                let burst_b = rate("burst_bytes", burst_bytes.map(|b| b.0 as f64))?;
                if burst_l.is_some() && lines.is_none() {
                    return Err(self.err(&format!("{key}.burst_lines"), "needs lines_per_second"));
                }
                if burst_b.is_some() && bytes.is_none() {
                    return Err(self.err(&format!("{key}.burst_bytes"), "needs bytes_per_second"));
                }
                self.p.reasons.push("limit".into());
                self.p.limit = Some(Limit {
                    lines: lines.map(|r| (r, burst_l.unwrap_or(r).max(1.0))),
                    bytes: bytes.map(|r| (r, burst_b.unwrap_or(r).max(1.0))),
                    action,
                    reason: (self.p.reasons.len() - 1) as u16,
                    buckets: Default::default(),
                });
                return Ok(());
            }
        };
        self.p.stages.push((stage, self.p.parsers.len()));
        Ok(())
    }

    /// `fields = ["a"]` and `set = { name = "field" }` as (name, field) pairs; an empty field
    /// in `set` means the name itself.
    fn pairs(
        &self,
        key: &str,
        fields: Vec<String>,
        set: BTreeMap<String, String>,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out: Vec<(String, String)> = fields.into_iter().map(|f| (f.clone(), f)).collect();
        for (name, field) in set {
            let field = if field.is_empty() {
                name.clone()
            } else {
                field
            };
            out.push((name, field));
        }
        if out.is_empty() {
            return Err(self.err(key, "sets nothing: give fields or set"));
        }
        Ok(out)
    }

    fn finish(mut self, key: &str) -> Result<Option<Pipeline>, ConfigError> {
        if !self.rules.is_empty() || self.builtin {
            self.p.redactor =
                Some(Redactor::new(self.builtin, &self.rules).map_err(|(j, r)| {
                    self.v.err(
                        format!("{}.rules[{j}]", self.redact_key.as_deref().unwrap_or(key)),
                        r,
                    )
                })?);
        }
        // Parsers extract only what later stages read.
        self.p.wire_parsers(&self.used);
        let labels_total = self.label_names.len();
        if labels_total > labels::MAX_LABELS {
            return Err(self.v.err(
                format!("{key}.stages"),
                format!(
                    "{labels_total} labels per stream with those the stages set exceed Loki's default limit of {}",
                    labels::MAX_LABELS
                ),
            ));
        }
        if self.meta_names.len() > 64 {
            return Err(self.v.err(
                format!("{key}.stages"),
                "more than 64 metadata fields per entry: structured metadata counts against Loki's per-entry limits",
            ));
        }
        if self.p.parsers.len() > 64 {
            return Err(self.v.err(
                format!("{key}.stages"),
                "more than 64 json, logfmt and regex stages",
            ));
        }
        Ok(Some(self.p))
    }
}

/// Loki's tenant ID rules: 1 to 150 of `[A-Za-z0-9!._*'()-]`, not `.` or `..`.
pub fn validate_tenant(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 150
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!-_.*'()".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid tenant {t:?}: 1 to 150 of letters, digits and !-_.*'(), not \".\" or \"..\" (Loki's rule)"
        ))
    }
}
