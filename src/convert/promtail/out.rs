//! The converted config before it is text: tables of `key = value` items, each part with the
//! Promtail origin its comment names, rendered as TOML. Rendering also records which ztail key
//! path each removable part got, so that a part `ztail check` refuses can be taken out again.

use std::fmt::Write;

use toml::Value;

/// `key = value`, with an optional comment beside it.
#[derive(Clone, Debug)]
pub struct Item {
    pub key: String,
    pub value: Value,
    pub note: Option<String>,
}

impl Item {
    pub fn new(key: &str, value: impl Into<Value>) -> Item {
        Item {
            key: key.to_owned(),
            value: value.into(),
            note: None,
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Item {
        self.note = Some(note.into());
        self
    }
}

/// A table whose parts come from one Promtail part.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// The comment above it: where in Promtail's file it comes from.
    pub origin: String,
    pub items: Vec<Item>,
}

impl Table {
    pub fn new(origin: impl Into<String>) -> Table {
        Table {
            origin: origin.into(),
            items: Vec::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.items.iter().find(|i| i.key == key).map(|i| &i.value)
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A stage's `type`.
    pub fn kind(&self) -> Option<&str> {
        self.get("type").and_then(Value::as_str)
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Item {
        self.items.push(Item::new(key, value));
        self.items.last_mut().expect("just pushed")
    }
}

#[derive(Clone, Debug, Default)]
pub struct Source {
    pub table: Table,
    /// Static labels, each with its origin.
    pub labels: Vec<Item>,
    /// `[sources.journal]`: a journal source.
    pub journal: Option<Table>,
    pub multiline: Option<Table>,
    pub timestamp: Option<Table>,
    pub stages: Vec<Table>,
}

#[derive(Clone, Debug, Default)]
pub struct Kubernetes {
    pub origin: String,
    /// `name = "field"`.
    pub labels: Vec<Item>,
}

#[derive(Clone, Debug, Default)]
pub struct Doc {
    /// The comment at the top of the file.
    pub header: Vec<String>,
    pub top: Vec<Item>,
    pub identity: Table,
    pub sink: Table,
    pub peer: Table,
    pub kubernetes: Option<Kubernetes>,
    pub sources: Vec<Source>,
}

/// A part of the document that `ztail check` may refuse and the converter can take out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Stage(usize, usize),
    SourceLabel(usize, usize),
    KubernetesLabel(usize),
}

impl Doc {
    /// The TOML text, and the ztail key path of every removable part.
    pub fn render(&self) -> (String, Vec<(String, Part)>) {
        let mut out = String::new();
        let mut parts = Vec::new();
        for line in &self.header {
            comment(&mut out, line);
        }
        out.push('\n');
        items(&mut out, &self.top);
        table(&mut out, "[identity]", &self.identity);
        table(&mut out, "[sink]", &self.sink);
        table(&mut out, "[sink.peer]", &self.peer);
        if let Some(k) = &self.kubernetes {
            out.push('\n');
            comment(&mut out, &k.origin);
            out.push_str("[kubernetes]\n");
            if !k.labels.is_empty() {
                out.push_str("[kubernetes.labels]\n");
                for (i, item) in k.labels.iter().enumerate() {
                    parts.push((
                        format!("kubernetes.labels.{}", item.key),
                        Part::KubernetesLabel(i),
                    ));
                    render_item(&mut out, item);
                }
            }
        }
        for (si, s) in self.sources.iter().enumerate() {
            table(&mut out, "[[sources]]", &s.table);
            if !s.labels.is_empty() {
                out.push_str("[sources.labels]\n");
                for (li, item) in s.labels.iter().enumerate() {
                    parts.push((
                        format!("sources[{si}].labels.{}", item.key),
                        Part::SourceLabel(si, li),
                    ));
                    render_item(&mut out, item);
                }
            }
            if let Some(j) = &s.journal {
                table(&mut out, "[sources.journal]", j);
            }
            if let Some(m) = &s.multiline {
                table(&mut out, "[sources.multiline]", m);
            }
            if let Some(t) = &s.timestamp {
                table(&mut out, "[sources.timestamp]", t);
            }
            for (gi, stage) in s.stages.iter().enumerate() {
                parts.push((format!("sources[{si}].stages[{gi}]"), Part::Stage(si, gi)));
                table(&mut out, "[[sources.stages]]", stage);
            }
        }
        (out, parts)
    }

    pub fn remove(&mut self, part: &Part) {
        match *part {
            Part::Stage(s, g) => {
                self.sources[s].stages.remove(g);
            }
            Part::SourceLabel(s, l) => {
                self.sources[s].labels.remove(l);
            }
            Part::KubernetesLabel(i) => {
                if let Some(k) = &mut self.kubernetes {
                    k.labels.remove(i);
                }
            }
        }
    }
}

fn comment(out: &mut String, text: &str) {
    for line in text.lines() {
        let _ = writeln!(out, "# {}", printable(line));
    }
}

/// Text for a comment: TOML allows no control characters there.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
        .collect()
}

fn table(out: &mut String, header: &str, t: &Table) {
    if t.items.is_empty() && t.origin.is_empty() {
        return;
    }
    out.push('\n');
    if !t.origin.is_empty() {
        comment(out, &t.origin);
    }
    out.push_str(header);
    out.push('\n');
    items(out, &t.items);
}

fn items(out: &mut String, items: &[Item]) {
    for item in items {
        render_item(out, item);
    }
}

fn render_item(out: &mut String, item: &Item) {
    let _ = write!(out, "{} = {}", key(&item.key), value(&item.value));
    if let Some(note) = &item.note {
        let _ = write!(out, "  # {}", printable(note));
    }
    out.push('\n');
}

/// A key, quoted unless it is a bare key.
pub fn key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_owned()
    } else {
        basic(k)
    }
}

/// A TOML basic string on one line: control characters escaped.
fn basic(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A value on one line; inline tables with their keys quoted where needed.
fn value(v: &Value) -> String {
    match v {
        Value::Table(t) => {
            let inner: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{} = {}", key(k), value(v)))
                .collect();
            if inner.is_empty() {
                "{}".to_owned()
            } else {
                format!("{{ {} }}", inner.join(", "))
            }
        }
        Value::Array(a) => {
            let inner: Vec<String> = a.iter().map(value).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::String(s) => string(s),
        other => other.to_string(),
    }
}

/// A string as a TOML literal string when it needs no escapes (regexes read better), else a
/// basic string.
fn string(s: &str) -> String {
    if s.contains('\\') && !s.contains('\'') && !s.chars().any(|c| c.is_control()) {
        format!("'{s}'")
    } else {
        Value::String(s.to_owned()).to_string()
    }
}

/// An inline table from pairs.
pub fn inline<K: Into<String>, V: Into<Value>>(pairs: impl IntoIterator<Item = (K, V)>) -> Value {
    Value::Table(
        pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
    )
}

/// An array of strings.
pub fn strings<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Value {
    Value::Array(
        items
            .into_iter()
            .map(|s| Value::String(s.as_ref().to_owned()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_render_as_toml_that_reads_back() {
        let mut t = toml::Table::new();
        for (k, v) in [
            ("plain", Value::String("a b".into())),
            ("regex", Value::String(r"^\d+ (?P<x>\w+)$".into())),
            ("quote", Value::String(r#"it's "x" \d"#.into())),
            ("newline", Value::String("a\nb".into())),
            (
                "map",
                inline([("app.kubernetes.io/name", "x"), ("level", "y")]),
            ),
            ("list", strings(["/var/log/*.log", "b"])),
            ("n", Value::Integer(3)),
        ] {
            t.insert(k.to_owned(), v);
        }
        let mut text = String::new();
        for (k, v) in &t {
            render_item(&mut text, &Item::new(k, v.clone()).note("promtail: x\ny"));
        }
        let back: toml::Table = toml::from_str(&text).expect(&text);
        assert_eq!(back, t, "{text}");
        assert!(text.contains(r"regex = '^\d+ (?P<x>\w+)$'"), "{text}");
    }
}
