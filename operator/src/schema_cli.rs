//! `berth schema KIND` and `berth explain KIND.field.path`: the kinds' JSON Schemas and their
//! fields' documentation, from the types this binary was built with (`api_types::schema`), so
//! they work without a server, as `--help` does. The API server serves the same schemas at
//! `/schemas/<kind>.json` for editors.

use berth_api_types::schema;
use berth_api_types::Kind;
use std::fmt::Write as _;

/// `berth schema KIND` (`all` for one schema covering every kind).
pub fn print_schema(kind: &str) -> Result<(), String> {
    let value = if kind == "all" {
        schema::any_kind()
    } else {
        schema::for_kind(parse_kind(kind)?)
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&value).map_err(|e| format!("error: {e}"))?
    );
    Ok(())
}

/// `berth explain service.spec.update`: the field's type and description and the fields under it.
pub fn explain(path: &str) -> Result<(), String> {
    print!("{}", explain_text(path)?);
    Ok(())
}

fn explain_text(path: &str) -> Result<String, String> {
    let mut parts = path.split('.').filter(|p| !p.is_empty());
    let kind = parse_kind(parts.next().unwrap_or_default())?;
    let rest: Vec<&str> = parts.collect();
    let doc = schema::explain(kind, &rest).map_err(|e| format!("error: {e}"))?;
    let mut out = String::new();
    let _ = writeln!(out, "KIND:     {}", kind.as_str());
    let _ = writeln!(out, "FIELD:    {} <{}>", doc.path, doc.type_name);
    if !doc.description.is_empty() {
        let _ = writeln!(out, "\nDESCRIPTION:");
        for line in doc.description.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !doc.fields.is_empty() {
        let _ = writeln!(out, "\nFIELDS:");
        let width = doc
            .fields
            .iter()
            .map(|(n, _, _)| n.len())
            .max()
            .unwrap_or(0);
        for (name, ty, d) in &doc.fields {
            let _ = writeln!(out, "  {name:width$}  <{ty}>  {d}");
        }
    }
    Ok(out)
}

fn parse_kind(word: &str) -> Result<Kind, String> {
    let kind = Kind::parse_loose(word).ok_or_else(|| {
        format!(
            "error: unknown kind `{word}` (expected one of: {})",
            Kind::ALL.map(|k| k.lower()).join(", ")
        )
    })?;
    if !kind.is_served() {
        return Err(format!("error: kind `{kind}` is not served by this berth"));
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_prints_a_field_like_kubectl_does() {
        let text = explain_text("svc.spec.update").unwrap();
        assert!(
            text.starts_with("KIND:     Service\nFIELD:    service.spec.update <"),
            "{text}"
        );
        assert!(
            text.contains("\nFIELDS:\n") && text.contains("parallelism"),
            "{text}"
        );
        let err = explain_text("service.spec.imagee").unwrap_err();
        assert!(
            err.contains("no field `imagee`") && err.contains("image"),
            "{err}"
        );
        assert!(explain_text("gadget.spec").unwrap_err().contains("gadget"));
    }
}
