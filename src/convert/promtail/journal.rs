//! `journal` scrape configs as a ztail journal source (`[sources.journal]`).
//!
//! Promtail hands a journal entry's fields to the relabelling only, each as a label
//! `__journal_<field in lower case>`; a relabelling that copies one into a label becomes a
//! `fields` entry (the journal field, named for the stages) and a `labels` stage here, and a
//! `keep`/`drop` on one a `keep`/`drop` stage. Matches on `_SYSTEMD_UNIT` and
//! `SYSLOG_IDENTIFIER` become the source's `units` and `identifiers`; other matches are `keep`
//! stages.

use std::collections::{BTreeMap, BTreeSet};

use super::model::{Journal, ScrapeConfig};
use super::out::{Item, Source, Table, inline, strings};
use super::{Converter, stages};
use crate::journal::config::valid_field;

/// Promtail's `max_age` when none is set.
const DEFAULT_MAX_AGE: &str = "7h";

/// The source, or `None` (reported) when the job would ship nothing ztail can give a label.
pub(super) fn source(
    c: &mut Converter,
    at: &str,
    sc: &ScrapeConfig,
    j: &Journal,
) -> Option<Source> {
    let jat = format!("{at}.journal");
    c.report.rest(&jat, &j.rest, |_| None);
    let mut s = Source::default();
    let mut table = Table::new("promtail: ".to_owned() + &jat);
    let mut given = Given::default();

    match &j.max_age {
        Some(age) => c.report.changed(
            format!("{jat}.max_age"),
            format!("Promtail's first start read only the last {}; ztail has no age limit and reads every entry the journal holds (set start_at = \"end\" to skip them), and a restart resumes at ztail's cursor however old it is", age.0),
        ),
        None => c.report.changed(
            jat.clone(),
            format!("Promtail's first start read only the last {DEFAULT_MAX_AGE} (its default max_age); ztail has no age limit and reads every entry the journal holds (set start_at = \"end\" to skip them)"),
        ),
    }
    if let Some(path) = &j.path {
        table.set("directories", strings([path])).note = Some(format!("promtail: {jat}.path"));
    }
    if j.json {
        c.report.changed(
            format!("{jat}.json"),
            "ztail's line is MESSAGE, not every field as JSON: name the fields your queries read in journal.fields and make them labels or structured metadata with a stage",
        );
    }
    if let Some(m) = &j.matches {
        matches(
            c,
            &format!("{jat}.matches"),
            m,
            &mut table,
            &mut s,
            &mut given,
        );
    }

    // Static labels, then what the relabelling makes of the journal's fields.
    for (k, v) in &j.labels {
        if k.starts_with("__") {
            c.report.not_converted(
                format!("{jat}.labels.{k}"),
                "labels starting with __ are Promtail's own and are not shipped",
            );
            continue;
        }
        s.labels
            .push(Item::new(k, v.as_str()).note(format!("promtail: {jat}.labels.{k}")));
    }
    let labels = relabel(c, at, sc, &mut s, &mut given);
    if s.labels.is_empty() && labels.is_empty() {
        c.report.not_converted(
            at,
            "the job gives its entries no label, and Promtail drops an entry without labels: it ships nothing",
        );
        return None;
    }

    if !given.fields.is_empty() {
        table.set("fields", inline(given.fields)).note =
            Some("the journal fields the stages below read, by the names they use".into());
    }
    if !labels.is_empty() {
        let mut t = Table::new(format!("promtail: {at}.relabel_configs"));
        t.set("type", "labels");
        t.set("set", inline(labels.clone()));
        c.report
            .changed(format!("{at}.relabel_configs"), stages::MAX_VALUES_CHANGED);
        s.stages.push(t);
    }

    let name = c.name(&sc.job_name);
    s.table.origin = format!("promtail: {at} (job_name: {}, journal)", sc.job_name);
    s.table.set("name", name);
    s.table.set("start_at", "beginning").note = Some(
        "a journal with no saved cursor is read from its oldest entry (Promtail: the last max_age)"
            .into(),
    );
    s.journal = Some(table);
    let known: BTreeSet<String> = s
        .labels
        .iter()
        .map(|i| i.key.clone())
        .chain(labels.keys().cloned())
        .collect();
    stages::pipeline(c, at, &sc.pipeline_stages, &mut s, known);
    Some(s)
}

/// The journal fields the stages read: stage field name → journal field.
#[derive(Default)]
struct Given {
    fields: BTreeMap<String, String>,
}

impl Given {
    /// The stage field name for `field`, taking `preferred` (a label's name) when it is new.
    fn name(&mut self, field: &str, preferred: Option<&str>) -> String {
        if let Some((name, _)) = self.fields.iter().find(|(_, f)| *f == field) {
            return name.clone();
        }
        let fallback = field.trim_start_matches('_').to_ascii_lowercase();
        let mut name = preferred.unwrap_or(&fallback).to_owned();
        let mut n = 2;
        while self.fields.contains_key(&name) {
            name = format!("{fallback}_{n}");
            n += 1;
        }
        self.fields.insert(name.clone(), field.to_owned());
        name
    }
}

/// `matches`: `FIELD=value` terms; the same field's values are alternatives, different fields
/// must all match (`+` between groups is a disjunction ztail cannot express).
fn matches(
    c: &mut Converter,
    at: &str,
    text: &str,
    table: &mut Table,
    s: &mut Source,
    given: &mut Given,
) {
    if text.split_whitespace().any(|t| t == "+") {
        c.report.not_converted(
            at,
            "a disjunction (+) of match groups: ztail's units, identifiers and keep stages all apply together; split the job in two sources",
        );
        return;
    }
    let mut by_field: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for term in text.split_whitespace() {
        match term.split_once('=') {
            Some((f, v)) if valid_field(f) => by_field.entry(f).or_default().push(v),
            _ => c.report.not_converted(
                at,
                format!("{term:?} is not a FIELD=value match; it was left out"),
            ),
        }
    }
    for (field, values) in by_field {
        match field {
            "_SYSTEMD_UNIT" => {
                table.set("units", strings(&values)).note = Some(format!("promtail: {at}"));
                c.report.changed(
                    at,
                    "ztail's units select the unit's own entries (_SYSTEMD_UNIT) and systemd's about it (UNIT), as journalctl -u does",
                );
            }
            "SYSLOG_IDENTIFIER" => {
                table.set("identifiers", strings(&values)).note = Some(format!("promtail: {at}"));
            }
            _ => {
                let name = given.name(field, None);
                let alternatives: Vec<String> = values.iter().map(|v| regex::escape(v)).collect();
                let mut t = Table::new(format!("promtail: {at} ({field})"));
                t.set("type", "keep");
                t.set("field", name);
                t.set("value", format!("^(?:{})$", alternatives.join("|")));
                t.set("reason", "journal match");
                s.stages.push(t);
            }
        }
    }
}

/// `relabel_configs`: the labels made of journal fields (label → stage field name), with the
/// `keep`/`drop` stages they imply pushed onto the source.
fn relabel(
    c: &mut Converter,
    at: &str,
    sc: &ScrapeConfig,
    s: &mut Source,
    given: &mut Given,
) -> BTreeMap<String, String> {
    // What each label the relabelling writes holds: a journal field, or a constant.
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut constants: BTreeMap<String, (String, String)> = BTreeMap::new();
    let resolve = |fields: &BTreeMap<String, String>, name: &str| -> Option<String> {
        match name.strip_prefix("__journal_") {
            Some(f) => Some(f.to_ascii_uppercase()).filter(|f| valid_field(f)),
            None => fields.get(name).cloned(),
        }
    };
    let mut tests: Vec<Table> = Vec::new();
    for (i, r) in sc.relabel_configs.iter().enumerate() {
        let rat = format!("{at}.relabel_configs[{i}]");
        c.report.rest(&rat, &r.rest, |_| None);
        let action = r.action();
        let replacement = r.replacement();
        let (default_regex, plain) = (r.takes_all(), r.plain_replacement());
        match action.as_str() {
            "replace" => {
                let Some(target) = r.target_label.as_deref() else {
                    c.report.not_converted(rat, "replace without target_label");
                    continue;
                };
                match r.source_labels.as_slice() {
                    [] if !replacement.contains('$') => {
                        fields.remove(target);
                        if !target.starts_with("__") {
                            constants.insert(target.to_owned(), (replacement.to_owned(), rat));
                        }
                    }
                    [one] if default_regex && plain => match resolve(&fields, one) {
                        Some(mut field) => {
                            if field == "PRIORITY_KEYWORD" {
                                field = "PRIORITY".into();
                                c.report.changed(
                                    &rat,
                                    "the label holds the priority's number (0-7), not Promtail's keyword (error, info...)",
                                );
                            }
                            constants.remove(target);
                            fields.insert(target.to_owned(), field);
                        }
                        None if target.starts_with("__") => c.report.not_converted(
                            rat,
                            "writes a label of Promtail's own (__...) from one that is not a journal field: nothing is shipped from it",
                        ),
                        None => c.report.not_converted(
                            rat,
                            format!("{one} is not a journal field (__journal_<field>) or a label set above"),
                        ),
                    },
                    _ => c.report.not_converted(
                        rat,
                        "a relabelling ztail cannot express: a ztail label takes one journal field as it is (no regex, no joined labels)",
                    ),
                }
            }
            "keep" | "drop" => {
                let field = match r.source_labels.as_slice() {
                    [one] => resolve(&fields, one),
                    _ => None,
                };
                match field {
                    _ if r.matches_empty() => c.report.not_converted(
                        rat,
                        "the regex matches an empty value: Promtail tests a missing field as \"\", ztail's stages never match a missing field",
                    ),
                    Some(field) if field != "PRIORITY_KEYWORD" => {
                        let name = given.name(&field, None);
                        let mut t = Table::new(format!("promtail: {rat}"));
                        t.set("type", action.as_str());
                        t.set("field", name);
                        t.set("value", r.anchored());
                        tests.push(t);
                    }
                    _ => c.report.not_converted(
                        rat,
                        format!("{action} on anything but one journal field: ztail's {action} stage tests one field"),
                    ),
                }
            }
            "labeldrop" | "labelkeep" => {
                if let Err(e) = r.filter_labels(&mut fields, &mut constants) {
                    c.report
                        .not_converted(rat, format!("not a regex ztail reads: {e}"));
                }
            }
            "labelmap" => c.report.not_converted(
                rat,
                "ztail makes labels only of the journal fields it names: add each to journal.fields and a labels stage",
            ),
            other => c
                .report
                .not_converted(rat, format!("action {other:?} has no ztail counterpart")),
        }
    }
    s.stages.extend(tests);
    for (label, (value, rat)) in constants {
        s.labels.retain(|l| l.key != label);
        s.labels
            .push(Item::new(&label, value.as_str()).note(format!("promtail: {rat}")));
    }
    let mut labels = BTreeMap::new();
    for (label, field) in fields {
        if label.starts_with("__") {
            continue;
        }
        // A relabelled label replaces a static one of the same name.
        s.labels.retain(|l| l.key != label);
        let name = given.name(&field, Some(&label));
        labels.insert(label, name);
    }
    labels
}
