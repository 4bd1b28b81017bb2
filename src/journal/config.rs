//! The `[sources.journal]` table: which journal files a source reads, which entries it
//! selects and which of their fields its stages may read.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{ConfigError, Validator};

/// The journal directories read unless `directories` is set: the persistent and the volatile
/// journal (a host uses one of them, or both around the flush at boot).
pub const DEFAULT_DIRECTORIES: [&str; 2] = ["/var/log/journal", "/run/log/journal"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJournal {
    directories: Option<Vec<PathBuf>>,
    #[serde(default)]
    units: Vec<String>,
    #[serde(default)]
    identifiers: Vec<String>,
    priority: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
}

/// A validated journal source.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Directories searched for `*.journal` files, and their subdirectories one level down
    /// (`/var/log/journal/<machine-id>/`).
    pub directories: Vec<PathBuf>,
    /// `_SYSTEMD_UNIT` or `UNIT` must be one of these (what `journalctl -u` selects), if any.
    pub units: Vec<String>,
    /// `SYSLOG_IDENTIFIER` must be one of these (`journalctl -t`), if any.
    pub identifiers: Vec<String>,
    /// `PRIORITY` must be at most this (`journalctl -p`): 0 emerg … 7 debug.
    pub priority: Option<u8>,
    /// (stage field name, journal field name): what the source's stages may read.
    pub fields: Vec<(String, String)>,
}

impl JournalConfig {
    /// The stage field names, in the order [`crate::stage::Given`] numbers them.
    pub fn field_names(&self) -> Vec<String> {
        self.fields.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Journal field names: what journald accepts (`A-Z`, `0-9`, `_`, not starting with a digit),
/// at most 64 bytes.
pub fn valid_field(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// `journalctl -p`'s names and numbers.
pub fn parse_priority(p: &str) -> Option<u8> {
    const NAMES: [&[&str]; 8] = [
        &["emerg"],
        &["alert"],
        &["crit"],
        &["err", "error"],
        &["warning", "warn"],
        &["notice"],
        &["info"],
        &["debug"],
    ];
    if let Ok(n) = p.parse::<u8>() {
        return (n <= 7).then_some(n);
    }
    NAMES
        .iter()
        .position(|names| names.contains(&p))
        .map(|i| i as u8)
}

pub fn validate(v: &Validator, key: &str, raw: RawJournal) -> Result<JournalConfig, ConfigError> {
    let directories = match raw.directories {
        None => DEFAULT_DIRECTORIES.iter().map(PathBuf::from).collect(),
        Some(d) if d.is_empty() => {
            return Err(v.err(
                format!("{key}.directories"),
                "is empty: leave it out to read /var/log/journal and /run/log/journal",
            ));
        }
        Some(d) => d.iter().map(|p| v.path(p)).collect(),
    };
    let priority = match raw.priority {
        None => None,
        Some(p) => Some(parse_priority(&p).ok_or_else(|| {
            v.err(
                format!("{key}.priority"),
                format!("unknown priority {p:?}: use emerg, alert, crit, err, warning, notice, info, debug or 0 to 7"),
            )
        })?),
    };
    for (list, what) in [(&raw.units, "units"), (&raw.identifiers, "identifiers")] {
        if let Some(j) = list.iter().position(|u| u.is_empty() || u.contains('\n')) {
            return Err(v.err(
                format!("{key}.{what}[{j}]"),
                "must be a non-empty name on one line",
            ));
        }
    }
    let mut fields = Vec::with_capacity(raw.fields.len());
    for (name, field) in raw.fields {
        let k = format!("{key}.fields.{name}");
        if name.is_empty() || name.len() > 256 {
            return Err(v.err(&k, "a stage field name of 1 to 256 bytes"));
        }
        if let Some((other, _)) = fields.iter().find(|(_, f)| *f == field) {
            return Err(v.err(
                &k,
                format!("{field:?} is already read as {other:?}: name each journal field once"),
            ));
        }
        if !valid_field(&field) {
            return Err(v.err(
                &k,
                format!("{field:?} is not a journal field name: upper-case letters, digits and _, like \"_SYSTEMD_UNIT\" (see `journalctl -o verbose`)"),
            ));
        }
        fields.push((name, field));
    }
    if fields.len() > 32 {
        return Err(v.err(
            format!("{key}.fields"),
            "at most 32 fields: each is read from every entry",
        ));
    }
    Ok(JournalConfig {
        directories,
        units: raw.units,
        identifiers: raw.identifiers,
        priority,
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_read_like_journalctl() {
        assert_eq!(parse_priority("info"), Some(6));
        assert_eq!(parse_priority("warn"), Some(4));
        assert_eq!(parse_priority("0"), Some(0));
        assert_eq!(parse_priority("8"), None);
        assert_eq!(parse_priority("loud"), None);
        assert!(valid_field("_SYSTEMD_UNIT") && valid_field("MESSAGE_ID"));
        assert!(!valid_field("unit") && !valid_field("9A") && !valid_field(""));
    }
}
