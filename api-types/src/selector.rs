//! Label selectors, kubectl's syntax: `app=shop`, `tier!=db`, `env in (a,b)`, `env notin (c)`,
//! `key` (has the label), `!key` (has not), requirements joined by `,` (all must hold). One parser
//! for the API server (the `labelSelector` query parameter of list routes) and the CLI (`-l`), so
//! both accept and refuse exactly the same text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One requirement on one label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            // As in Kubernetes: an object without the label matches `key!=value`.
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        }
    }
}

/// A parsed selector: every requirement must hold. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub Vec<Requirement>);

/// What is wrong with a selector, naming the requirement and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError(pub String);

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SelectorError {}

/// Characters that end a key or a value: the selector's own punctuation and whitespace.
fn is_word_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, ',' | '(' | ')' | '=' | '!')
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    break;
                }
                return Err(SelectorError(format!(
                    "label selector `{text}` has an empty requirement (two commas, or a comma at an end)"
                )));
            }
            reqs.push(parse_requirement(part)?);
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Splits at the commas outside parentheses; refuses unbalanced parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, SelectorError> {
    let mut parts = Vec::new();
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth > 0 => {
                return Err(SelectorError(format!(
                    "label selector `{text}`: parentheses cannot nest"
                )))
            }
            '(' => depth += 1,
            ')' if depth == 0 => {
                return Err(SelectorError(format!(
                    "label selector `{text}`: `)` without `(`"
                )))
            }
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(SelectorError(format!(
            "label selector `{text}`: `(` is never closed"
        )));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn word<'a>(req: &str, what: &str, s: &'a str) -> Result<&'a str, SelectorError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(SelectorError(format!(
            "requirement `{req}`: the {what} is missing"
        )));
    }
    if let Some(c) = s.chars().find(|c| !is_word_char(*c)) {
        return Err(SelectorError(format!(
            "requirement `{req}`: the {what} `{s}` contains `{c}`, which a {what} cannot hold"
        )));
    }
    Ok(s)
}

fn parse_requirement(req: &str) -> Result<Requirement, SelectorError> {
    if let Some(key) = req.strip_prefix('!') {
        return Ok(Requirement::NotExists(word(req, "key", key)?.into()));
    }
    if let Some((k, v)) = req.split_once("!=") {
        return Ok(Requirement::NotEquals(
            word(req, "key", k)?.into(),
            value(req, v)?,
        ));
    }
    if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
        return Ok(Requirement::Equals(
            word(req, "key", k)?.into(),
            value(req, v)?,
        ));
    }
    // `key in (...)`, `key notin (...)`, or a bare key.
    let key_end = req.find(|c: char| !is_word_char(c)).unwrap_or(req.len());
    let key = word(req, "key", &req[..key_end])?;
    let rest = req[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(Requirement::Exists(key.into()));
    }
    let (op, set) = if let Some(set) = rest.strip_prefix("notin") {
        ("notin", set)
    } else if let Some(set) = rest.strip_prefix("in") {
        ("in", set)
    } else {
        return Err(SelectorError(format!(
            "requirement `{req}`: expected `=`, `==`, `!=`, `in (...)` or `notin (...)` after the key `{key}`"
        )));
    };
    let set = set.trim();
    let inner = set
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| {
            SelectorError(format!(
                "requirement `{req}`: `{op}` takes a parenthesised list of values, e.g. `{key} {op} (a,b)`"
            ))
        })?;
    let mut values = BTreeSet::new();
    for v in inner.split(',') {
        values.insert(value(req, v)?);
    }
    Ok(if op == "in" {
        Requirement::In(key.into(), values)
    } else {
        Requirement::NotIn(key.into(), values)
    })
}

/// A value; it may be empty (`key=` matches a label set to the empty string), as in Kubernetes.
fn value(req: &str, v: &str) -> Result<String, SelectorError> {
    let v = v.trim();
    if let Some(c) = v.chars().find(|c| !is_word_char(*c)) {
        return Err(SelectorError(format!(
            "requirement `{req}`: the value `{v}` contains `{c}`, which a value cannot hold"
        )));
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_every_form() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            sel("app=shop, tier!=db,env in (a, b),zone notin (x),canary,!legacy,x==y").0,
            vec![
                Requirement::Equals("app".into(), "shop".into()),
                Requirement::NotEquals("tier".into(), "db".into()),
                Requirement::In("env".into(), set(&["a", "b"])),
                Requirement::NotIn("zone".into(), set(&["x"])),
                Requirement::Exists("canary".into()),
                Requirement::NotExists("legacy".into()),
                Requirement::Equals("x".into(), "y".into()),
            ]
        );
        assert!(sel("").is_empty());
        assert!(sel("  ").is_empty());
        // A key named like an operator is still a key.
        assert_eq!(sel("inside").0, vec![Requirement::Exists("inside".into())]);
        assert_eq!(
            sel("example.com/team=a").0,
            vec![Requirement::Equals("example.com/team".into(), "a".into())]
        );
    }

    #[test]
    fn matches_like_kubernetes() {
        let shop_db = labels(&[("app", "shop"), ("tier", "db")]);
        let shop_web = labels(&[("app", "shop"), ("tier", "web")]);
        let bare = labels(&[]);
        let check = |s: &str, expect: [bool; 3]| {
            let sel = sel(s);
            assert_eq!(
                [
                    sel.matches(&shop_db),
                    sel.matches(&shop_web),
                    sel.matches(&bare)
                ],
                expect,
                "{s}"
            );
        };
        check("app=shop", [true, true, false]);
        check("app=shop,tier!=db", [false, true, false]);
        check("tier!=db", [false, true, true]);
        check("tier in (db,cache)", [true, false, false]);
        check("tier notin (db)", [false, true, true]);
        check("tier", [true, true, false]);
        check("!tier", [false, false, true]);
        check("", [true, true, true]);
    }

    #[test]
    fn refusals_name_the_requirement_and_the_problem() {
        for (text, says) in [
            ("app=shop,,x", "empty requirement"),
            ("app=shop,", "empty requirement"),
            ("env in a,b", "parenthesised list"),
            ("env in (a,b", "never closed"),
            ("env)", "without `(`"),
            ("=shop", "the key is missing"),
            ("app=sh op", "the value `sh op` contains ` `"),
            ("a b", "expected `=`"),
            ("app=(x)", "contains `(`"),
            ("!", "the key is missing"),
        ] {
            let err = Selector::parse(text).expect_err(text).0;
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
