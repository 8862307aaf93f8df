//! How the CLI prints objects: kubectl-like tables, YAML and JSON.

use berth_api_types::meta::{condition, format_time};
use berth_api_types::{DynObject, Event, Kind};
use chrono::Utc;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlEmitter};

/// JSON -> YAML text (the manifest format users write).
pub fn to_yaml(v: &Value) -> String {
    fn conv(v: &Value) -> Yaml {
        match v {
            Value::Null => Yaml::Null,
            Value::Bool(b) => Yaml::Boolean(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                None => Yaml::Real(n.to_string()),
            },
            Value::String(s) => Yaml::String(s.clone()),
            Value::Array(a) => Yaml::Array(a.iter().map(conv).collect()),
            Value::Object(m) => Yaml::Hash(
                m.iter()
                    .map(|(k, v)| (Yaml::String(k.clone()), conv(v)))
                    .collect(),
            ),
        }
    }
    let mut out = String::new();
    let mut em = YamlEmitter::new(&mut out);
    em.multiline_strings(true);
    if em.dump(&conv(v)).is_err() {
        return serde_json::to_string_pretty(v).unwrap_or_default();
    }
    // The emitter starts every document with `---`; keep it, it makes multi-object output valid.
    out.push('\n');
    out
}

/// `3m`, `2h`, `5d`: kubectl's AGE column.
pub fn age(obj: &DynObject) -> String {
    match obj.metadata.creation_timestamp {
        Some(created) => age_since(created),
        None => "-".into(),
    }
}

/// Time since `t`, in the AGE column's units.
pub fn age_since(t: chrono::DateTime<Utc>) -> String {
    let secs = (Utc::now() - t).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Pads columns to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == cells.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}

/// A table cell for text that did not come from berth (a name from a refused request's URL):
/// control characters are shown escaped, so an escape sequence cannot rewrite the terminal.
pub fn plain(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        s.to_string()
    }
}

/// CSV (RFC 4180, with `\n` line ends): a header row, then one line per row. A cell is quoted when it holds a comma,
/// quote, semicolon (the separator of some spreadsheet locales) or line break, with quotes
/// doubled. A cell that starts with `=`, `+`, `-`, `@`, tab or carriage return gets a leading `'`
/// so a spreadsheet shows it instead of running it as a formula (CSV injection): the JSON output
/// is the exact data.
pub fn csv(header: &[&str], rows: &[Vec<String>]) -> String {
    fn cell(s: &str) -> String {
        let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{s}")
        } else {
            s.to_string()
        };
        if s.contains([',', '"', ';', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = cells.map(cell).collect::<Vec<_>>().join(",");
        l.push('\n');
        l
    };
    let mut out = line(&mut header.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

pub(crate) fn status_conditions(obj: &DynObject) -> Vec<berth_api_types::Condition> {
    obj.status
        .get("conditions")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default()
}

/// The `get` table for a kind.
pub fn objects_table(kind: Kind, objects: &[DynObject]) -> String {
    let (header, rows) = objects_columns(kind, objects);
    table(&header, &rows)
}

/// `get -o wide`: the table's columns, then more (a Service's mode and networks), then labels.
pub fn objects_table_wide(kind: Kind, objects: &[DynObject]) -> String {
    let (mut header, mut rows) = objects_columns(kind, objects);
    if kind == Kind::Service {
        header.extend(["MODE", "NETWORKS"]);
        for (row, o) in rows.iter_mut().zip(objects) {
            let mode = o.spec["mode"].as_str().unwrap_or("replicated").to_string();
            let networks: Vec<&str> = o.spec["networks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            row.push(mode);
            row.push(if networks.is_empty() {
                "(default)".to_string()
            } else {
                networks.join(",")
            });
        }
    }
    header.push("LABELS");
    for (row, o) in rows.iter_mut().zip(objects) {
        let labels: Vec<String> = o
            .metadata
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        row.push(if labels.is_empty() {
            "-".to_string()
        } else {
            plain(&labels.join(","))
        });
    }
    table(&header, &rows)
}

/// The `get` table's header and rows for a kind.
pub fn objects_columns(kind: Kind, objects: &[DynObject]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    match kind {
        Kind::Service => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .map(|o| {
                    let conds = status_conditions(o);
                    let ready = condition(&conds, "Ready");
                    let st = &o.status;
                    let replicas = match (st.get("runningReplicas"), st.get("desiredReplicas")) {
                        (Some(r), Some(d)) => format!("{r}/{d}"),
                        _ => "-".into(),
                    };
                    let state = match ready {
                        Some(c) if c.status == berth_api_types::ConditionStatus::True => {
                            "Ready".to_string()
                        }
                        Some(c) => c.reason.clone(),
                        None => "Pending".into(),
                    };
                    // What runs may be Ready while the spec waits: the table must not hide that.
                    let state = if o.spec.get("paused").and_then(Value::as_bool) == Some(true) {
                        format!("{state},Paused")
                    } else {
                        state
                    };
                    vec![
                        o.metadata.name.clone(),
                        replicas,
                        o.spec
                            .get("image")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        state,
                        age(o),
                    ]
                })
                .collect();
            (vec!["NAME", "REPLICAS", "IMAGE", "STATUS", "AGE"], rows)
        }
        Kind::Secret | Kind::Config => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .map(|o| {
                    vec![
                        o.metadata.name.clone(),
                        data_keys(&o.spec).join(","),
                        age(o),
                    ]
                })
                .collect();
            (vec!["NAME", "KEYS", "AGE"], rows)
        }
        Kind::Registry => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .map(|o| {
                    let field = |f: &str| {
                        o.spec
                            .get(f)
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string()
                    };
                    let conds = status_conditions(o);
                    let auth = match condition(&conds, "Authenticated") {
                        Some(c) if c.status == berth_api_types::ConditionStatus::True => {
                            "True".to_string()
                        }
                        Some(c) => format!("False ({})", c.reason),
                        None => "Unknown".into(),
                    };
                    vec![
                        o.metadata.name.clone(),
                        field("server"),
                        field("username"),
                        auth,
                        age(o),
                    ]
                })
                .collect();
            (
                vec!["NAME", "SERVER", "USERNAME", "AUTHENTICATED", "AGE"],
                rows,
            )
        }
        Kind::Ingress => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .map(|o| {
                    let mut hosts: Vec<String> = o.spec["rules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r["host"].as_str().map(str::to_string))
                        .collect();
                    hosts.dedup();
                    let state = match condition(&status_conditions(o), "Ready") {
                        Some(c) if c.status == berth_api_types::ConditionStatus::True => {
                            "Ready".to_string()
                        }
                        Some(c) => c.reason.clone(),
                        None => "Pending".into(),
                    };
                    vec![o.metadata.name.clone(), hosts.join(","), state, age(o)]
                })
                .collect();
            (vec!["NAME", "HOSTS", "STATUS", "AGE"], rows)
        }
        Kind::Node => {
            let rows: Vec<Vec<String>> = objects.iter().map(node_row).collect();
            (
                vec![
                    "NAME",
                    "ROLE",
                    "STATE",
                    "AVAILABILITY",
                    "LEADER",
                    "TASKS",
                    "ENGINE",
                    "AGE",
                ],
                rows,
            )
        }
        Kind::Backup => {
            let rows: Vec<Vec<String>> = objects.iter().map(backup_row).collect();
            (
                vec![
                    "NAME",
                    "SCHEDULE",
                    "LAST RUN",
                    "NEXT RUN",
                    "SNAPSHOTS",
                    "SIZE",
                    "VERIFIED",
                    "AGE",
                ],
                rows,
            )
        }
        _ => {
            let rows: Vec<Vec<String>> = objects
                .iter()
                .map(|o| vec![o.metadata.name.clone(), age(o)])
                .collect();
            (vec!["NAME", "AGE"], rows)
        }
    }
}

/// The keys of a Config's spec or of a Secret's redacted view (never values).
/// One `berth get backups` row: a failed last run and a refused plan show as such, not as a time.
fn backup_row(o: &DynObject) -> Vec<String> {
    let st = &o.status;
    let when = |v: &Value| {
        v.as_str()
            .and_then(|t| t.parse::<chrono::DateTime<Utc>>().ok())
            .map(|t| format!("{} ago", age_since(t)))
    };
    let last = match (&st["lastRun"]["ok"], when(&st["lastRun"]["started"])) {
        (Value::Bool(true), Some(t)) => t,
        (Value::Bool(false), Some(t)) => format!("FAILED {t}"),
        _ => "-".into(),
    };
    let conds = status_conditions(o);
    let next = match condition(&conds, "Ready") {
        Some(c) if c.status != berth_api_types::ConditionStatus::True => c.reason.clone(),
        _ => st["nextRun"]
            .as_str()
            .and_then(|t| t.parse::<chrono::DateTime<Utc>>().ok())
            .map(|t| format_time(&t))
            .unwrap_or_else(|| "-".into()),
    };
    let verified = match (
        &st["lastVerification"]["ok"],
        when(&st["lastVerification"]["time"]),
    ) {
        (Value::Bool(true), Some(t)) => format!("ok {t}"),
        (Value::Bool(false), Some(t)) => format!("FAILED {t}"),
        _ => "never".into(),
    };
    let size = st["repositoryBytes"]
        .as_u64()
        .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
        .unwrap_or_else(|| "-".into());
    vec![
        o.metadata.name.clone(),
        st["schedule"].as_str().unwrap_or("-").to_string(),
        last,
        next,
        st["snapshots"].as_u64().unwrap_or(0).to_string(),
        size,
        verified,
        age(o),
    ]
}

/// One `berth get nodes` row. A spec berth refused shows in STATE (`ready,UnsafeChange`), a drain
/// in progress in AVAILABILITY (`drain (2 left)`), as `docker node ls` users would look for them.
fn node_row(o: &DynObject) -> Vec<String> {
    let st = &o.status;
    let text = |key: &str| st[key].as_str().unwrap_or("").to_string();
    let mut state = st["state"].as_str().unwrap_or("unknown").to_string();
    if let Some(c) = condition(&status_conditions(o), "Ready") {
        if c.reason == "UnsafeChange" || c.reason == "NodeNotFound" {
            state = format!("{state},{}", c.reason);
        }
    }
    let mut availability = text("availability");
    if let Some(left) = st["drain"]["remaining"].as_u64().filter(|n| *n > 0) {
        availability = format!("{availability} ({left} left)");
    }
    let leader = if st["leader"].as_bool() == Some(true) {
        "Leader".to_string()
    } else {
        match st["managerReachability"].as_str() {
            Some("reachable") => "Reachable".to_string(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    };
    vec![
        o.metadata.name.clone(),
        text("role"),
        state,
        availability,
        leader,
        st["tasks"].as_u64().unwrap_or(0).to_string(),
        text("engineVersion"),
        age(o),
    ]
}

fn data_keys(spec: &Value) -> Vec<String> {
    let mut keys: Vec<String> = ["data", "stringData", "redacted"]
        .iter()
        .filter_map(|f| spec.get(f).and_then(Value::as_object))
        .flat_map(|m| m.keys().cloned())
        .collect();
    keys.sort();
    keys
}

pub fn events_table(events: &[Event]) -> String {
    let rows: Vec<Vec<String>> = events.iter().map(event_row).collect();
    table(&["TIME", "TYPE", "OBJECT", "GEN", "MESSAGE"], &rows)
}

pub fn event_row(e: &Event) -> Vec<String> {
    vec![
        format_time(&e.time),
        format!("{:?}", e.type_),
        format!("{}/{}", e.kind.lower(), e.name),
        e.generation.to_string(),
        e.message.clone(),
    ]
}

/// `describe`: metadata, spec, status and conditions, then recent events.
pub fn describe(obj: &DynObject, events: &[Event]) -> String {
    let mut out = String::new();
    let m = &obj.metadata;
    out.push_str(&format!("Name:          {}\n", m.name));
    out.push_str(&format!("Kind:          {}\n", obj.kind));
    out.push_str(&format!(
        "UID:           {}\n",
        m.uid.as_deref().unwrap_or("-")
    ));
    out.push_str(&format!("Generation:    {}\n", m.generation));
    out.push_str(&format!(
        "Observed:      {}\n",
        obj.status
            .get("observedGeneration")
            .map(ToString::to_string)
            .unwrap_or_else(|| "-".into())
    ));
    if let Some(t) = &m.creation_timestamp {
        out.push_str(&format!("Created:       {}\n", format_time(t)));
    }
    for (title, map) in [("Labels", &m.labels), ("Annotations", &m.annotations)] {
        if !map.is_empty() {
            out.push_str(&format!("{title}:\n"));
            for (k, v) in map {
                out.push_str(&format!("  {k}={v}\n"));
            }
        }
    }
    out.push_str("Spec:\n");
    out.push_str(&indent(to_yaml(&obj.spec).trim_start_matches("---\n")));
    let mut status = obj.status.clone();
    if let Some(s) = status.as_object_mut() {
        s.remove("conditions");
        s.remove("observedGeneration");
    }
    if status.as_object().is_some_and(|s| !s.is_empty()) {
        out.push_str("Status:\n");
        out.push_str(&indent(to_yaml(&status).trim_start_matches("---\n")));
    }
    let conds = status_conditions(obj);
    out.push_str("Conditions:\n");
    if conds.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let rows: Vec<Vec<String>> = conds
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    format!("{:?}", c.status),
                    c.reason.clone(),
                    format_time(&c.last_transition_time),
                    c.message.clone(),
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            &rows,
        )));
        out.push('\n');
    }
    out.push_str("Events:\n");
    if events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        out.push_str(&indent(&events_table(events)));
        out.push('\n');
    }
    out
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::typed::decode_object;
    use serde_json::json;

    #[test]
    fn describe_and_table_show_a_redacted_secret() {
        let mut obj = decode_object(&json!({"apiVersion": "berth/v1", "kind": "Secret",
            "metadata": {"name": "db"}, "spec": {"stringData": {"pw": "tapir-333", "user": "u"}}}))
        .unwrap();
        let key = berth_api_types::secret_config::ContentKey::derive(&[3u8; 32]);
        obj = crate::server::redact(&key, obj);
        let text = describe(&obj, &[]);
        assert!(!text.contains("tapir-333"), "{text}");
        assert!(text.contains("redacted:"), "{text}");
        assert!(text.contains("pw:"), "{text}");
        assert!(text.contains(&key.digest(b"tapir-333")), "{text}");
        let t = objects_table(Kind::Secret, &[obj]);
        assert!(t.starts_with("NAME   KEYS"), "{t}");
        assert!(t.contains("db     pw,user"), "{t}");
    }

    #[test]
    fn node_table_shows_role_state_and_drain_progress() {
        let mut obj = decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Node", "metadata": {"name": "node-2"},
            "spec": {"availability": "drain"}
        }))
        .unwrap();
        obj.status = json!({
            "state": "ready", "role": "manager", "availability": "drain", "leader": true,
            "managerReachability": "reachable", "tasks": 2, "engineVersion": "20.10.24",
            "drain": {"startedAt": "2026-11-29T00:00:00Z", "tasksAtStart": 3, "remaining": 2},
            "conditions": [{"type": "Ready", "status": "True", "reason": "NodeReady",
                            "lastTransitionTime": "2026-11-29T00:00:00Z"}]
        });
        let t = objects_table(Kind::Node, &[obj]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0]
                .starts_with("NAME     ROLE      STATE   AVAILABILITY     LEADER   TASKS   ENGINE"),
            "{t}"
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            &row[..8],
            ["node-2", "manager", "ready", "drain", "(2", "left)", "Leader", "2"],
            "{t}"
        );
    }

    #[test]
    fn a_paused_service_says_so_in_the_table() {
        let mut obj = decode_object(&json!({"apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": "web"}, "spec": {"image": "app:2", "paused": true}}))
        .unwrap();
        obj.status = json!({"runningReplicas": 1, "desiredReplicas": 1, "conditions": [
            {"type": "Ready", "status": "True", "reason": "AllTasksRunning",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let t = objects_table(Kind::Service, &[obj]);
        assert!(t.contains("Ready,Paused"), "{t}");
    }

    #[test]
    fn ingress_table_shows_hosts_and_readiness() {
        let mut obj = decode_object(&json!({"apiVersion": "berth/v1", "kind": "Ingress",
            "metadata": {"name": "shop"}, "spec": {"tls": {"mode": "internal"}, "rules": [
                {"host": "a.test", "paths": [{"path": "/", "service": "web", "port": 80}]},
                {"host": "b.test", "paths": [{"path": "/", "service": "web", "port": 80}]}]}}))
        .unwrap();
        let t = objects_table(Kind::Ingress, std::slice::from_ref(&obj));
        assert!(t.starts_with("NAME   HOSTS"), "{t}");
        assert!(t.contains("shop   a.test,b.test   Pending"), "{t}");
        obj.status = json!({"conditions": [{"type": "Ready", "status": "False",
            "reason": "ProxyStarting", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let t = objects_table(Kind::Ingress, &[obj]);
        assert!(t.contains("ProxyStarting"), "{t}");
    }
}
