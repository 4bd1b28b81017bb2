//! Environment expansion as Promtail's `-config.expand-env=true` does it (drone/envsubst over
//! the whole file text, comments included, before YAML): `${VAR}`; `${VAR:-d}`, `${VAR=d}`,
//! `${VAR:=d}`, `${VAR:?d}` and `${VAR:+d}` all give `d` when VAR is unset or empty; `$$` is
//! `$`; `$VAR` without braces stays as written; and every `\\` becomes `\`, `\/` becomes `/`.
//! A variable that is not set expands to nothing, as in Promtail, and is reported.

use super::Report;

/// A reference Promtail refuses too (`${VAR-d}`, an unclosed `${`), at a line.
pub(super) struct EnvError {
    pub line: usize,
    pub reason: String,
}

pub(super) fn expand(text: &str, report: &mut Report) -> Result<String, EnvError> {
    expand_with(text, report, &|name: &str| std::env::var(name).ok())
}

pub(super) fn expand_with(
    text: &str,
    report: &mut Report,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<String, EnvError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let line = |rest: &str| text[..text.len() - rest.len()].matches('\n').count() + 1;
    while let Some(pos) = rest.find(['$', '\\']) {
        out.push_str(&rest[..pos]);
        let at = &rest[pos..];
        if let Some(r) = at.strip_prefix("\\\\") {
            out.push('\\');
            rest = r;
        } else if let Some(r) = at.strip_prefix("\\/") {
            out.push('/');
            rest = r;
        } else if let Some(r) = at.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some(body) = at.strip_prefix("${") {
            let err = |reason: &str| EnvError {
                line: line(at),
                reason: reason.to_owned(),
            };
            // The closing brace of this reference: a default may hold references itself.
            let mut depth = 1;
            let mut end = None;
            let mut i = 0;
            let bytes = body.as_bytes();
            while i < bytes.len() {
                if bytes[i..].starts_with(b"${") {
                    depth += 1;
                    if depth > 16 {
                        return Err(err("references nested more than 16 deep"));
                    }
                    i += 2;
                    continue;
                }
                if bytes[i] == b'}' {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                i += 1;
            }
            let end = end.ok_or_else(|| err("`${` without a closing brace"))?;
            let inner = &body[..end];
            let name_end = inner
                .find([':', '=', '-', '?', '+', '#', '%', '/', '^', ','])
                .unwrap_or(inner.len());
            let (name, op) = inner.split_at(name_end);
            if name.is_empty() {
                return Err(err(&format!("`${{{inner}}}` names no variable")));
            }
            let default = ["=", ":-", ":=", ":?", ":+"]
                .iter()
                .find_map(|p| op.strip_prefix(p));
            let value = get(name).filter(|v| !v.is_empty());
            let expanded = match (op, default, value) {
                ("", _, Some(v)) | (_, Some(_), Some(v)) => v,
                (_, Some(d), None) => expand_with(d, report, get).map_err(|e| EnvError {
                    line: line(at) + e.line - 1,
                    reason: e.reason,
                })?,
                ("", _, None) => {
                    report.changed(
                        format!("${{{name}}}"),
                        "the environment variable is not set: it expanded to nothing, as in Promtail",
                    );
                    String::new()
                }
                (op, None, _) => {
                    return Err(err(&format!(
                        "`${{{inner}}}`: the converter expands ${{VAR}} and ${{VAR:-default}} only ({op:?} is not one of them)"
                    )));
                }
            };
            out.push_str(&expanded);
            rest = &body[end + 1..];
        } else {
            // A `$` or `\` that starts nothing stays.
            out.push_str(&at[..1]);
            rest = &at[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}
