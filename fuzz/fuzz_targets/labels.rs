//! Label validation and rendering: whatever the values (paths and data are hostile), the
//! rendered selector parses back to exactly the same labels, so no value can inject a label.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use ztail::loki::labels::{LabelSet, validate_name, validate_value};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut labels = BTreeMap::new();
    // name=value pairs separated by NUL; names that fail validation are rejected, as the
    // config does.
    for pair in text.split('\0') {
        let (name, value) = pair.split_once('=').unwrap_or(("app", pair));
        if validate_name(name).is_ok() && validate_value(value).is_ok() {
            labels.insert(name.to_owned(), value.to_owned());
        }
    }
    let rendered = LabelSet::new(labels.clone()).render();
    // Loki's parser refuses raw control characters in a selector: every one must be escaped.
    assert!(
        !rendered.chars().any(char::is_control),
        "unescaped control character: {rendered:?}"
    );
    let parsed = parse(&rendered).unwrap_or_else(|e| panic!("{e}: {rendered:?}"));
    assert_eq!(parsed, labels, "{rendered:?}");
});

/// Prometheus selector syntax as Loki parses it: `{a="x", b="y"}` with Go string escapes.
fn parse(s: &str) -> Result<BTreeMap<String, String>, String> {
    let inner = s
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or("no braces")?;
    let mut out = BTreeMap::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            name.push(c);
            chars.next();
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            return Err(format!("expected =\" after {name:?}"));
        }
        let mut value = String::new();
        loop {
            match chars.next().ok_or("unterminated value")? {
                '"' => break,
                '\\' => match chars.next().ok_or("dangling escape")? {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    't' => value.push('\t'),
                    'r' => value.push('\r'),
                    'u' => {
                        let hex: String = (0..4).filter_map(|_| chars.next()).collect();
                        let n = u32::from_str_radix(&hex, 16).map_err(|e| e.to_string())?;
                        value.push(char::from_u32(n).ok_or("bad \\u")?);
                    }
                    c => return Err(format!("unknown escape \\{c}")),
                },
                c => value.push(c),
            }
        }
        if validate_name(&name).is_err() {
            return Err(format!("bad name {name:?}"));
        }
        if out.insert(name, value).is_some() {
            return Err("duplicate label".into());
        }
        match chars.next() {
            None => break,
            Some(',') if chars.next() == Some(' ') => {}
            _ => return Err("expected \", \" between labels".into()),
        }
    }
    Ok(out)
}
