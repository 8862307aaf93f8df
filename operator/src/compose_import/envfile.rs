//! `env_file` contents: `NAME=value` lines as Compose reads them (comments, blank lines, `export `,
//! single and double quotes, inline ` #` comments). Errors never quote the line: an env file is
//! where credentials usually are.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based line number.
    pub line: usize,
    pub name: String,
    /// `Ok(None)`: a name without `=` (Compose takes it from its shell); `Err`: why the line is
    /// not `NAME=value`.
    pub value: Result<Option<String>, String>,
}

pub fn parse(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let t = t.strip_prefix("export ").map_or(t, str::trim_start);
        let (name, rest) = match t.split_once('=') {
            Some((n, r)) => (n.trim_end(), Some(r)),
            None => (t.trim_end(), None),
        };
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            out.push(Entry {
                line,
                name: String::new(),
                value: Err("is not NAME=VALUE (the line is not shown)".into()),
            });
            continue;
        }
        let value = match rest {
            None => Ok(None),
            Some(r) => value(r).map(Some),
        };
        out.push(Entry {
            line,
            name: name.to_string(),
            value,
        });
    }
    out
}

fn value(raw: &str) -> Result<String, String> {
    let r = raw.trim_start();
    let after = |rest: &str| {
        let rest = rest.trim();
        if rest.is_empty() || rest.starts_with('#') {
            Ok(())
        } else {
            Err("has text after the closing quote".to_string())
        }
    };
    if let Some(body) = r.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    after(&body[i + 1..])?;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, other)) => out.push(other),
                    None => out.push('\\'),
                },
                other => out.push(other),
            }
        }
        return Err("has an unterminated double quote".into());
    }
    if let Some(body) = r.strip_prefix('\'') {
        return match body.find('\'') {
            Some(end) => {
                after(&body[end + 1..])?;
                Ok(body[..end].to_string())
            }
            None => Err("has an unterminated single quote".into()),
        };
    }
    // Unquoted: a `#` after whitespace starts a comment.
    let mut end = r.len();
    let bytes = r.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'#' && i > 0 && bytes[i - 1].is_ascii_whitespace() {
            end = i;
            break;
        }
    }
    Ok(r[..end].trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, Result<Option<String>, String>)> {
        parse(text).into_iter().map(|e| (e.name, e.value)).collect()
    }

    #[test]
    fn lines_quotes_and_comments() {
        let text = "# comment\n\nA=1\nexport B = two words  # note\nC=\"x # y\\n\"\nD='$literal'\nE\nF=\nG=a#b\n";
        let got = pairs(text);
        let ok = |n: &str, v: Option<&str>| (n.to_string(), Ok(v.map(str::to_string)));
        assert_eq!(
            got,
            vec![
                ok("A", Some("1")),
                ok("B", Some("two words")),
                ok("C", Some("x # y\n")),
                ok("D", Some("$literal")),
                ok("E", None),
                ok("F", Some("")),
                ok("G", Some("a#b")),
            ]
        );
        assert_eq!(parse(text)[1].line, 4);
    }

    #[test]
    fn bad_lines_are_errors_that_do_not_quote_them() {
        for text in [
            "PW=\"hunter2",
            "PW='hunter2",
            "PW=\"hunter2\" x",
            "pw hunter2=1",
        ] {
            let e = &parse(text)[0];
            let why = e.value.clone().unwrap_err();
            assert!(!why.contains("hunter2"), "{why}");
        }
    }
}
