//! `berth get`, `berth delete` and `berth events`: which objects a command names (`service web`,
//! `service web api`, `service/web`, `services,networks`, `-l app=shop`), how `get` prints them
//! (`-o table|wide|name|yaml|json|jsonpath=...`) and follows them (`-w`).

use crate::api_client::ApiClient;
use crate::cli::{api_error, client, kind_arg, CliResult};
use crate::jsonpath::Template;
use crate::output;
use crate::Conn;
use berth_api_types::selector::Selector;
use berth_api_types::{DynObject, Event, EventType, Kind};
use futures::StreamExt;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

/// `get -o ...`
#[derive(Clone)]
pub enum Format {
    Table,
    Wide,
    Name,
    Yaml,
    Json,
    JsonPath(std::sync::Arc<Template>),
}

impl std::fmt::Debug for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Format::Table => f.write_str("table"),
            Format::Wide => f.write_str("wide"),
            Format::Name => f.write_str("name"),
            Format::Yaml => f.write_str("yaml"),
            Format::Json => f.write_str("json"),
            Format::JsonPath(_) => f.write_str("jsonpath"),
        }
    }
}

/// The `-o` value parser: the template of `jsonpath=` is checked before any request.
pub fn parse_format(s: &str) -> Result<Format, String> {
    Ok(match s {
        "table" => Format::Table,
        "wide" => Format::Wide,
        "name" => Format::Name,
        "yaml" => Format::Yaml,
        "json" => Format::Json,
        other => match other.strip_prefix("jsonpath=") {
            Some(t) => Format::JsonPath(std::sync::Arc::new(Template::parse(t)?)),
            None => {
                return Err(format!(
                    "`{other}` is not an output format: use table, wide, name, yaml, json or jsonpath=TEMPLATE"
                ))
            }
        },
    })
}

/// What the positional arguments name.
#[derive(Debug, PartialEq, Eq)]
pub enum Targets {
    /// Every object of these kinds (`services`, `services,networks`), maybe filtered by `-l`.
    All(Vec<Kind>),
    /// These objects (`service web api`, `service/web network/front`), in the order given.
    Named(Vec<(Kind, String)>),
}

/// Reads `KIND [NAME...]`, `KIND,KIND...` or `KIND/NAME...`.
pub fn targets(args: &[String]) -> Result<Targets, String> {
    let Some(first) = args.first() else {
        return Err("error: give a resource type (e.g. `services`), KIND NAME or KIND/NAME".into());
    };
    if first.contains('/') {
        let mut named = Vec::new();
        for a in args {
            let (k, n) = a.split_once('/').ok_or_else(|| {
                format!(
                    "error: `{a}`: once one argument is KIND/NAME, all must be (e.g. service/{a})"
                )
            })?;
            if n.is_empty() || n.contains('/') {
                return Err(format!("error: `{a}` is not KIND/NAME"));
            }
            named.push((kind_arg(k)?, n.to_string()));
        }
        return Ok(Targets::Named(named));
    }
    let kinds = first
        .split(',')
        .map(kind_arg)
        .collect::<Result<Vec<_>, _>>()?;
    let names = &args[1..];
    if names.is_empty() {
        return Ok(Targets::All(kinds));
    }
    if kinds.len() > 1 {
        return Err(format!(
            "error: names need one resource type, not `{first}` (or use KIND/NAME for each)"
        ));
    }
    if let Some(bad) = names.iter().find(|n| n.contains('/')) {
        return Err(format!(
            "error: `{bad}`: after a resource type give plain names (or give only KIND/NAME arguments)"
        ));
    }
    Ok(Targets::Named(
        names.iter().map(|n| (kinds[0], n.clone())).collect(),
    ))
}

/// The objects named, fetched; objects not found are reported after the others are printed.
async fn fetch(
    client: &ApiClient,
    targets: &Targets,
    selector: Option<&str>,
) -> Result<(Vec<DynObject>, Vec<String>), String> {
    let mut objects = Vec::new();
    let mut missing = Vec::new();
    match targets {
        Targets::All(kinds) => {
            for k in kinds {
                objects.extend(
                    client
                        .list_selected(*k, selector)
                        .await
                        .map_err(api_error)?,
                );
            }
        }
        Targets::Named(named) => {
            for (k, n) in named {
                match client.get_object(*k, n).await {
                    Ok(o) => objects.push(o),
                    Err(e) if e.is_not_found() => missing.push(api_error(e)),
                    Err(e) => return Err(api_error(e)),
                }
            }
        }
    }
    Ok((objects, missing))
}

fn kinds_of(targets: &Targets) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = match targets {
        Targets::All(k) => k.clone(),
        Targets::Named(n) => n.iter().map(|(k, _)| *k).collect(),
    };
    kinds.dedup();
    kinds
}

fn json_of(o: &DynObject) -> Value {
    serde_json::to_value(o).unwrap_or_default()
}

/// The objects in a format; `single` prints one object rather than a list (a single name asked).
fn render(objects: &[DynObject], format: &Format, single: bool) -> String {
    let root = || {
        if single && objects.len() == 1 {
            json_of(&objects[0])
        } else {
            serde_json::json!({ "items": objects })
        }
    };
    match format {
        Format::Table | Format::Wide => {
            let mut kinds: Vec<Kind> = objects.iter().map(|o| o.kind).collect();
            kinds.dedup();
            let tables: Vec<String> = kinds
                .iter()
                .map(|k| {
                    let of: Vec<DynObject> =
                        objects.iter().filter(|o| o.kind == *k).cloned().collect();
                    if matches!(format, Format::Wide) {
                        output::objects_table_wide(*k, &of)
                    } else {
                        output::objects_table(*k, &of)
                    }
                })
                .collect();
            format!("{}\n", tables.join("\n\n"))
        }
        Format::Name => objects
            .iter()
            .map(|o| format!("{}/{}\n", o.kind.lower(), o.metadata.name))
            .collect(),
        Format::Json => {
            format!(
                "{}\n",
                serde_json::to_string_pretty(&root()).unwrap_or_default()
            )
        }
        Format::Yaml => objects
            .iter()
            .map(|o| output::to_yaml(&json_of(o)))
            .collect(),
        Format::JsonPath(t) => {
            let mut s = t.render(&root());
            if !s.ends_with('\n') {
                s.push('\n');
            }
            s
        }
    }
}

pub async fn get(
    conn: &Conn,
    args: &[String],
    selector: Option<&str>,
    format: Format,
    watch: bool,
) -> CliResult {
    let targets = targets(args)?;
    let parsed = selector.map(parse_selector).transpose()?;
    if parsed.is_some() && matches!(targets, Targets::Named(_)) {
        return Err(
            "error: -l selects among all objects of a kind: give KIND without names".into(),
        );
    }
    let client = client(conn)?;
    // Opened before the list, so no change between the two is missed.
    let stream = if watch {
        Some(Box::pin(client.watch_events().await.map_err(api_error)?))
    } else {
        None
    };
    let (objects, missing) = fetch(&client, &targets, selector).await?;
    let single = matches!(&targets, Targets::Named(n) if n.len() == 1);
    let empty_list = objects.is_empty() && matches!(targets, Targets::All(_));
    if empty_list && !matches!(format, Format::Json | Format::JsonPath(_)) {
        eprintln!(
            "No {} found{}.",
            kinds_of(&targets)
                .iter()
                .map(|k| k.plural())
                .collect::<Vec<_>>()
                .join(" or "),
            selector
                .map(|s| format!(" matching `{s}`"))
                .unwrap_or_default()
        );
    } else if !objects.is_empty() || empty_list {
        print!("{}", render(&objects, &format, single));
    }
    for m in &missing {
        // Printed now when watching (the watch goes on for the names that exist).
        if stream.is_some() {
            eprintln!("{m}");
        }
    }
    if !missing.is_empty() && stream.is_none() {
        return Err(missing.join("\n"));
    }
    let Some(mut stream) = stream else {
        return Ok(());
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let kinds = kinds_of(&targets);
    let names: Option<Vec<(Kind, String)>> = match &targets {
        Targets::Named(n) => Some(n.clone()),
        Targets::All(_) => None,
    };
    let mut known: HashMap<(Kind, String), DynObject> = objects
        .into_iter()
        .map(|o| ((o.kind, o.metadata.name.clone()), o))
        .collect();
    while let Some(item) = stream.next().await {
        let e: Event = item.map_err(api_error)?;
        let wanted = match &names {
            Some(n) => n.iter().any(|(k, name)| *k == e.kind && *name == e.name),
            None => kinds.contains(&e.kind),
        };
        if !wanted {
            continue;
        }
        let key = (e.kind, e.name.clone());
        let current = if e.type_ == EventType::Deleted {
            known.remove(&key)
        } else {
            match client.get_object(e.kind, &e.name).await {
                Ok(o) => Some(o),
                // Deleted again before we looked: its own event follows.
                Err(err) if err.is_not_found() => continue,
                Err(err) => return Err(api_error(err)),
            }
        };
        let Some(obj) = current else { continue };
        if parsed
            .as_ref()
            .is_some_and(|s| !s.matches(&obj.metadata.labels))
        {
            // No longer selected (labels changed): forget it, as if it were deleted.
            known.remove(&key);
            continue;
        }
        if e.type_ != EventType::Deleted {
            known.insert(key, obj.clone());
        }
        print!("{}", watch_line(&obj, &format, e.type_));
        let _ = std::io::stdout().flush();
    }
    Err("error: the API server closed the event stream".into())
}

/// One `get -w` line for a change: a table row without its header (a deleted object's last
/// row, marked), or the object in the chosen format.
fn watch_line(obj: &DynObject, format: &Format, change: EventType) -> String {
    match format {
        Format::Table | Format::Wide => {
            let t = render(std::slice::from_ref(obj), format, true);
            let row = t.split_once('\n').map(|x| x.1).unwrap_or("").trim_end();
            if change == EventType::Deleted {
                format!("{row}   (deleted)\n")
            } else {
                format!("{row}\n")
            }
        }
        _ => render(std::slice::from_ref(obj), format, true),
    }
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    Selector::parse(s).map_err(|e| format!("error: -l: {e}"))
}

pub async fn delete(
    conn: &Conn,
    args: &[String],
    selector: Option<&str>,
    files: &[PathBuf],
    ignore_not_found: bool,
) -> CliResult {
    let targets: Vec<(Kind, String)> = if !files.is_empty() {
        if !args.is_empty() || selector.is_some() {
            return Err(
                "error: give either -f PATH, or KIND NAME... / KIND/NAME... / KIND -l SELECTOR"
                    .into(),
            );
        }
        crate::cli::load(files)?
            .into_iter()
            .map(|o| (o.kind, o.metadata.name))
            .collect()
    } else {
        match (targets(args)?, selector) {
            (Targets::Named(n), None) => n,
            (Targets::Named(_), Some(_)) => {
                return Err("error: -l selects among all objects of a kind: give KIND without names".into())
            }
            (Targets::All(_), None) => {
                return Err("error: give the names to delete (KIND NAME... or KIND/NAME...), -l SELECTOR, or -f PATH".into())
            }
            (Targets::All(kinds), Some(sel)) => {
                parse_selector(sel)?;
                let client = client(conn)?;
                let mut found = Vec::new();
                for k in kinds {
                    for o in client
                        .list_selected(k, Some(sel))
                        .await
                        .map_err(api_error)?
                    {
                        found.push((k, o.metadata.name));
                    }
                }
                if found.is_empty() {
                    println!("No objects match `{sel}`: nothing deleted.");
                    return Ok(());
                }
                found
            }
        }
    };
    // Users first: a Secret, Config, Volume or Network cannot be deleted while a Service or Registry
    // uses it, so `delete -f DIR` removes the users before what they use.
    let mut targets = targets;
    targets.sort_by_key(|(k, _)| !matches!(k, Kind::Service | Kind::Registry));
    let client = client(conn)?;
    let mut failures = Vec::new();
    for (kind, name) in targets {
        match client.delete(kind, &name).await {
            Ok(_) => println!("{}/{name} deleted", kind.lower()),
            Err(e) if e.is_not_found() && ignore_not_found => {}
            Err(e) => failures.push(api_error(e)),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// `berth events [KIND [NAME]] [--kind KIND]`.
pub async fn events(
    conn: &Conn,
    watch: bool,
    positional: &[String],
    kind_flag: Option<&str>,
    limit: usize,
    out: crate::cli::Output,
) -> CliResult {
    let (kind, name) = event_filter(positional, kind_flag)?;
    crate::cli::events(conn, watch, kind, name.as_deref(), limit, out).await
}

/// The kind and name `events` filters by: `KIND`, `KIND NAME`, `KIND/NAME`, or `--kind`.
pub fn event_filter(
    positional: &[String],
    kind_flag: Option<&str>,
) -> Result<(Option<Kind>, Option<String>), String> {
    let (kind, name) = match positional {
        [] => (None, None),
        [one] => match one.split_once('/') {
            Some((k, n)) if !n.is_empty() => (Some(kind_arg(k)?), Some(n.to_string())),
            Some(_) => return Err(format!("error: `{one}` is not KIND/NAME")),
            None => (Some(kind_arg(one)?), None),
        },
        [k, n] => (Some(kind_arg(k)?), Some(n.clone())),
        _ => return Err("error: events takes at most KIND and NAME".into()),
    };
    let flag = kind_flag.map(kind_arg).transpose()?;
    match (kind, flag) {
        (Some(a), Some(b)) if a != b => Err(format!(
            "error: --kind {} contradicts {}",
            b.lower(),
            a.lower()
        )),
        (a, b) => Ok((a.or(b), name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn targets_in_every_form() {
        assert_eq!(
            targets(&args(&["services"])).unwrap(),
            Targets::All(vec![Kind::Service])
        );
        assert_eq!(
            targets(&args(&["svc,networks"])).unwrap(),
            Targets::All(vec![Kind::Service, Kind::Network])
        );
        assert_eq!(
            targets(&args(&["service", "a", "b"])).unwrap(),
            Targets::Named(vec![
                (Kind::Service, "a".into()),
                (Kind::Service, "b".into())
            ])
        );
        assert_eq!(
            targets(&args(&["service/a", "network/n"])).unwrap(),
            Targets::Named(vec![
                (Kind::Service, "a".into()),
                (Kind::Network, "n".into())
            ])
        );
        for (bad, says) in [
            (&["service/a", "b"][..], "all must be"),
            (&["services,networks", "a"][..], "one resource type"),
            (&["service", "network/a"][..], "plain names"),
            (&["gadgets"][..], "unknown resource type `gadgets`"),
            (&["service/"][..], "not KIND/NAME"),
            (&[][..], "give a resource type"),
        ] {
            let e = targets(&args(bad)).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn output_formats() {
        let obj: DynObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": "web", "labels": {"app": "shop"}},
            "spec": {"image": "nginx:1", "networks": ["front"]}}))
        .unwrap();
        let two = [obj.clone(), {
            let mut o = obj.clone();
            o.metadata.name = "api".into();
            o
        }];
        let f = |s: &str| parse_format(s).unwrap();
        assert_eq!(
            render(&two, &f("name"), false),
            "service/web\nservice/api\n"
        );
        assert_eq!(
            render(
                std::slice::from_ref(&obj),
                &f("jsonpath={.spec.image}"),
                true
            ),
            "nginx:1\n"
        );
        assert_eq!(
            render(&two, &f("jsonpath={.items[*].metadata.name}"), false),
            "web api\n"
        );
        let wide = render(std::slice::from_ref(&obj), &f("wide"), true);
        assert!(
            wide.contains("NETWORKS") && wide.contains("front") && wide.contains("app=shop"),
            "{wide}"
        );
        assert!(!render(&[obj], &f("table"), true).contains("NETWORKS"));
        assert!(parse_format("jsonpath={.spec[}").is_err());
        assert!(parse_format("xml")
            .unwrap_err()
            .contains("not an output format"));
    }

    #[test]
    fn event_filters() {
        assert_eq!(
            event_filter(&args(&["service", "web"]), None).unwrap(),
            (Some(Kind::Service), Some("web".into()))
        );
        assert_eq!(
            event_filter(&args(&["svc/web"]), None).unwrap(),
            (Some(Kind::Service), Some("web".into()))
        );
        assert_eq!(
            event_filter(&[], Some("network")).unwrap(),
            (Some(Kind::Network), None)
        );
        assert!(event_filter(&args(&["service"]), Some("network"))
            .unwrap_err()
            .contains("contradicts"));
    }
}
