//! `berth get -o jsonpath=TEMPLATE`: kubectl's template syntax around RFC 9535 JSONPath.
//!
//! A template is text with `{EXPRESSION}` parts: `{.spec.image}`, `{.items[*].metadata.name}`,
//! `{$.metadata.labels.app}`, filters such as `{.items[?(@.spec.replicas > 1)].metadata.name}`,
//! and quoted text `{"\n"}` (escapes `\n`, `\t`, `\\`, `\"`). An expression starting with `.` or
//! `[` gets the `$` JSONPath needs; a template without any `{` is one expression, as in kubectl.
//! Several results are joined by a space; strings print as they are, everything else as JSON.
//! Not supported: kubectl's `{range}`/`{end}` and its `\.` escapes in keys (use `['a.b']`).

use serde_json::Value;
use serde_json_path::JsonPath;

enum Part {
    Text(String),
    Path(JsonPath),
}

/// A parsed template, checked before any request is made.
pub struct Template(Vec<Part>);

impl Template {
    pub fn parse(template: &str) -> Result<Template, String> {
        if !template.contains('{') {
            return Ok(Template(vec![expression(template.trim())?]));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = closing_brace(after)
                .ok_or_else(|| format!("jsonpath template `{template}`: a `{{` is never closed"))?;
            parts.push(expression(after[..close].trim())?);
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    pub fn render(&self, root: &Value) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Path(p) => {
                    let shown: Vec<String> = p
                        .query(root)
                        .all()
                        .into_iter()
                        .map(|v| match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect();
                    out.push_str(&shown.join(" "));
                }
            }
        }
        out
    }
}

/// The `}` that closes an expression, skipping those inside quotes (`{"}"}`, `[?@.a=='}']`).
fn closing_brace(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') => escaped = true,
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '}') => return Some(i),
            _ => {}
        }
    }
    None
}

fn expression(e: &str) -> Result<Part, String> {
    if let Some(quoted) = e.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        let mut text = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                text.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => text.push('\n'),
                Some('t') => text.push('\t'),
                Some(other) => text.push(other),
                None => text.push('\\'),
            }
        }
        return Ok(Part::Text(text));
    }
    let path = if e.starts_with('.') || e.starts_with('[') {
        format!("${e}")
    } else {
        e.to_string()
    };
    if path == "$." {
        return JsonPath::parse("$")
            .map(Part::Path)
            .map_err(|e| e.to_string());
    }
    JsonPath::parse(&path)
        .map(Part::Path)
        .map_err(|err| format!("jsonpath expression `{e}` does not parse: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(t: &str, v: &Value) -> String {
        Template::parse(t)
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .render(v)
    }

    #[test]
    fn kubectl_templates() {
        let svc = json!({"metadata": {"name": "web", "labels": {"app": "shop"}},
                         "spec": {"image": "nginx:1", "replicas": 2}});
        let list = json!({"items": [svc, {"metadata": {"name": "db"}, "spec": {"replicas": 1}}]});
        assert_eq!(render("{.spec.image}", &svc), "nginx:1");
        assert_eq!(render(".spec.image", &svc), "nginx:1");
        assert_eq!(render("{$.spec.replicas}", &svc), "2");
        assert_eq!(render("{.metadata.labels}", &svc), r#"{"app":"shop"}"#);
        assert_eq!(render("{.items[*].metadata.name}", &list), "web db");
        assert_eq!(
            render("{.metadata.name}={.spec.replicas}{\"\\n\"}", &svc),
            "web=2\n"
        );
        assert_eq!(
            render("{.items[?(@.spec.replicas > 1)].metadata.name}", &list),
            "web"
        );
        assert_eq!(
            render("{.items[?@.metadata.name=='db'].spec.replicas}", &list),
            "1"
        );
        // Nothing found prints nothing, as kubectl does for a missing field.
        assert_eq!(render("{.spec.missing}", &svc), "");
        assert_eq!(render("name: {.metadata.name}!", &svc), "name: web!");
    }

    #[test]
    fn errors_name_the_expression() {
        let e = Template::parse("{.spec.image").err().unwrap();
        assert!(e.contains("never closed"), "{e}");
        let e = Template::parse("{.spec[}").err().unwrap();
        assert!(e.contains("`.spec[`"), "{e}");
    }
}
