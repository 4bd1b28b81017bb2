//! Loki stream labels: validation of names and values against Loki's default limits, and
//! rendering to the Prometheus selector syntax Loki parses (`{a="x", b="y"}`).

use std::collections::BTreeMap;
use std::fmt::Write;

/// Label ztail sets to the path of the file a line came from.
pub const FILENAME: &str = "filename";
/// Label ztail sets to the node's host name (unless `host_label = false`).
pub const HOST: &str = "host";
/// Loki's default `max_label_names_per_series`.
pub const MAX_LABELS: usize = 15;
/// Loki's default `max_label_name_length`.
pub const MAX_NAME_LEN: usize = 1024;
/// Loki's default `max_label_value_length`.
pub const MAX_VALUE_LEN: usize = 2048;

/// Checks a label name against `[a-zA-Z_][a-zA-Z0-9_]*`, the reserved `__x__` form and the length
/// limit.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "invalid label name {name:?}: must match [a-zA-Z_][a-zA-Z0-9_]*"
        ));
    }
    if name.starts_with("__") {
        return Err(format!(
            "invalid label name {name:?}: names starting with \"__\" are reserved by Loki"
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "label name is {} bytes, Loki's limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    Ok(())
}

/// Checks a label value: not empty (Loki drops empty labels) and within the length limit.
pub fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("label value is empty: Loki drops empty labels, remove it".to_owned());
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(format!(
            "label value is {} bytes, Loki's limit is {MAX_VALUE_LEN}",
            value.len()
        ));
    }
    Ok(())
}

/// A validated, sorted set of labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSet(BTreeMap<String, String>);

impl LabelSet {
    /// Wraps labels that were validated by the caller (config loading).
    pub fn new(labels: BTreeMap<String, String>) -> Self {
        LabelSet(labels)
    }

    /// This set plus one more label (replacing a label of the same name).
    pub fn with(&self, name: &str, value: &str) -> LabelSet {
        let mut m = self.0.clone();
        m.insert(name.to_owned(), value.to_owned());
        LabelSet(m)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Renders `{a="x", b="y"}` with names sorted and values quoted with Go escapes, as Promtail
    /// does. Empty values are skipped (Loki drops them).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(64);
        out.push('{');
        let mut first = true;
        for (k, v) in self.iter().filter(|(_, v)| !v.is_empty()) {
            if !first {
                out.push_str(", ");
            }
            first = false;
            out.push_str(k);
            out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    '\r' => out.push_str("\\r"),
                    c if c.is_control() => {
                        let _ = write!(out, "\\u{:04x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sorted_and_escaped() {
        let mut m = BTreeMap::new();
        m.insert("job".to_owned(), "a\"b\\c\nd".to_owned());
        m.insert("env".to_owned(), "prod".to_owned());
        let s = LabelSet::new(m).with(FILENAME, "/var/log/x.log");
        assert_eq!(
            s.render(),
            r#"{env="prod", filename="/var/log/x.log", job="a\"b\\c\nd"}"#
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("job").is_ok());
        assert!(validate_name("_x9").is_ok());
        assert!(validate_name("9x").is_err());
        assert!(validate_name("a-b").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("__name__").is_err());
        assert!(validate_value("").is_err());
        assert!(validate_value(&"x".repeat(MAX_VALUE_LEN + 1)).is_err());
    }
}
