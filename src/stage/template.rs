//! The `template` stage's line template: literal text and `{{ .field }}` references (the
//! Go-template spelling Promtail users write), `{{ .Entry }}` for the current line. Nothing
//! else of Go templates: no functions, no conditionals, no pipes.

use super::Field;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part<F> {
    Text(String),
    Field(F),
    Line,
}

/// A parsed template; `F` is a field name until the config resolves it to a [`Field`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template<F = Field> {
    pub parts: Vec<Part<F>>,
}

impl Template<String> {
    pub fn parse(text: &str) -> Result<Template<String>, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed {{{{ in {text:?}"))?;
            let inner = after[..close].trim();
            let name = inner.strip_prefix('.').unwrap_or(inner);
            if name == "Entry" {
                parts.push(Part::Line);
            } else if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-'))
            {
                return Err(format!(
                    "{{{{ {inner} }}}} is not a field reference: write {{{{ .field }}}} or {{{{ .Entry }}}} (functions and pipes are not supported)"
                ));
            } else {
                parts.push(Part::Field(name.to_owned()));
            }
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("is empty: an entry's line cannot be empty".into());
        }
        Ok(Template { parts })
    }

    /// The fields the template reads, in order of appearance.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// Replaces the field names by their ids (`ids` in the order of [`Self::field_names`]).
    pub fn resolve(self, ids: &[Field]) -> Template {
        let mut ids = ids.iter();
        Template {
            parts: self
                .parts
                .into_iter()
                .map(|p| match p {
                    Part::Text(t) => Part::Text(t),
                    Part::Line => Part::Line,
                    // field_names and parts are walked in the same order.
                    Part::Field(_) => Part::Field(*ids.next().unwrap_or(&0)),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_the_line_and_text() {
        let t = Template::parse("[{{ .level }}] {{.msg}} ({{ .Entry }})").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Text("[".into()),
                Part::Field("level".into()),
                Part::Text("] ".into()),
                Part::Field("msg".into()),
                Part::Text(" (".into()),
                Part::Line,
                Part::Text(")".into()),
            ]
        );
        assert_eq!(t.field_names().collect::<Vec<_>>(), ["level", "msg"]);
    }

    #[test]
    fn refuses_what_it_cannot_render() {
        assert!(Template::parse("{{ .msg").unwrap_err().contains("unclosed"));
        assert!(
            Template::parse("{{ ToUpper .msg }}")
                .unwrap_err()
                .contains("not a field reference")
        );
        assert!(Template::parse("").is_err());
    }
}
