//! Client commands. Everything the user sees on failure is a complete sentence naming what is wrong
//! (file, line, field); the exit code is non-zero on any failure.

use crate::api_client::ApiClient;
use crate::output;
use crate::Conn;
use berth_api_types::manifest::load_paths;
use berth_api_types::names::paths;
use berth_api_types::typed::decode_doc;
use berth_api_types::wire::ApplyOutcome;
use berth_api_types::{DynObject, Kind};
use berth_controllers::api::ClientError;
use futures::StreamExt;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

pub(crate) type CliResult = Result<(), String>;

/// What a client command says when no token is configured anywhere.
pub(crate) const NO_TOKEN: &str = "error: no token: pass --token-file (or set BERTH_TOKEN_FILE), give the context a token-file (berth config set-context), or set BERTH_TOKEN (berth up writes one to <data-dir>/admin.token)";

pub(crate) fn client(conn: &Conn) -> Result<ApiClient, String> {
    let resolved = crate::client_config::resolve(conn)?;
    let token = resolved.token.ok_or(NO_TOKEN)?;
    let client = ApiClient::new(&resolved.url, &token.value, resolved.ca.as_deref())?;
    for url in client.base_urls() {
        if let Some(host) = clear_text_host(url) {
            eprintln!(
                "warning: {url} is plain HTTP to {host}: the token and any Secret values cross the network in clear (use https)"
            );
        }
    }
    Ok(client)
}

/// The host of an `http://` URL that is not loopback: where a token would travel in clear.
pub(crate) fn clear_text_host(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    if url.scheme() != "http" {
        return None;
    }
    let host = url.host_str()?;
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| host.to_string())
}

pub(crate) fn api_error(e: ClientError) -> String {
    match e {
        ClientError::Api { message, .. } => format!("error: {message}"),
        other => format!("error: {other}"),
    }
}

pub(crate) fn kind_arg(s: &str) -> Result<Kind, String> {
    Kind::parse_loose(s).ok_or_else(|| {
        format!(
            "error: unknown resource type `{s}` (known: {})",
            Kind::ALL.map(|k| k.plural()).join(", ")
        )
    })
}

/// Loads, parses and validates every manifest; returns every problem found, or the objects.
pub(crate) fn load(files: &[PathBuf]) -> Result<Vec<DynObject>, String> {
    let docs = load_paths(files).map_err(|errs| {
        errs.iter()
            .map(|e| format!("error: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    let mut seen: HashMap<(Kind, String), String> = HashMap::new();
    for doc in &docs {
        match decode_doc(doc) {
            Ok(obj) => {
                let here = format!("{}:{}", doc.file, doc.location_of("metadata.name"));
                if let Some(first) =
                    seen.insert((obj.kind, obj.metadata.name.clone()), here.clone())
                {
                    problems.push(format!(
                        "error: {here}: {}/{} is defined twice (first at {first})",
                        obj.kind.lower(),
                        obj.metadata.name
                    ));
                }
                objects.push(obj);
            }
            Err(errs) => problems.extend(errs.iter().map(|e| format!("error: {e}"))),
        }
    }
    if !problems.is_empty() {
        problems.push(format!(
            "nothing was applied: {} problem(s) in {} document(s)",
            problems.len(),
            docs.len()
        ));
        return Err(problems.join("\n"));
    }
    Ok(objects)
}

/// `berth apply`; with `prune`, then deletes what that selector matches and the files do not name;
/// with `wait`, then waits (that long at most) for what controllers reconcile.
pub async fn apply(
    conn: &Conn,
    files: &[PathBuf],
    dry_run: bool,
    wait: Option<std::time::Duration>,
    prune: Option<&str>,
) -> CliResult {
    let objects = load(files)?;
    if let Some(selector) = prune {
        crate::prune_cli::check(selector)?;
    }
    let client = client(conn)?;
    let results = client.apply(&objects, dry_run).await.map_err(api_error)?;
    let suffix = if dry_run { " (dry run)" } else { "" };
    let targets: Vec<crate::wait_cli::Target> = results
        .iter()
        .filter(|r| r.kind.is_reconciled())
        .map(|r| crate::wait_cli::Target {
            kind: r.kind,
            name: r.name.clone(),
            generation: r.generation,
        })
        .collect();
    for r in results {
        let what = match r.outcome {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Configured => "configured",
            ApplyOutcome::Unchanged => "unchanged",
        };
        println!("{}/{} {what}{suffix}", r.kind.lower(), r.name);
    }
    if let Some(selector) = prune {
        crate::prune_cli::prune(&client, selector, &objects, dry_run).await?;
    }
    match wait {
        Some(timeout) if !dry_run => {
            crate::wait_cli::until(&client, &targets, &crate::wait_cli::Goal::ready(), timeout)
                .await
        }
        _ => Ok(()),
    }
}

pub async fn describe(conn: &Conn, kind: &str, name: &str) -> CliResult {
    let kind = kind_arg(kind)?;
    let client = client(conn)?;
    let obj = client.get_object(kind, name).await.map_err(api_error)?;
    let events = client
        .events(Some(kind), Some(name), 20)
        .await
        .map_err(api_error)?;
    print!("{}", output::describe(&obj, &events));
    Ok(())
}

/// Recent events, or (`watch`) events as they happen; of one kind, or one object, when given.
pub async fn events(
    conn: &Conn,
    watch: bool,
    kind: Option<Kind>,
    name: Option<&str>,
    limit: usize,
    out: Output,
) -> CliResult {
    let client = client(conn)?;
    let print = |events: &[berth_api_types::Event], header: bool| match out {
        Output::Json => {
            for e in events {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
            }
        }
        Output::Yaml => {
            for e in events {
                print!(
                    "{}",
                    output::to_yaml(&serde_json::to_value(e).unwrap_or_default())
                );
            }
        }
        Output::Table => {
            let t = output::events_table(events);
            let body = if header {
                t.as_str()
            } else {
                t.split_once('\n').map(|x| x.1).unwrap_or("")
            };
            if !body.is_empty() {
                println!("{body}");
            }
        }
    };
    if watch {
        let mut stream = Box::pin(client.watch_events().await.map_err(api_error)?);
        println!(
            "{}",
            output::table(&["TIME", "TYPE", "OBJECT", "GEN", "MESSAGE"], &[])
        );
        while let Some(item) = stream.next().await {
            let e = item.map_err(api_error)?;
            if kind.is_none_or(|k| k == e.kind) && name.is_none_or(|n| n == e.name) {
                print(&[e], false);
            }
        }
        return Err("error: the API server closed the event stream".into());
    }
    let events = client.events(kind, name, limit).await.map_err(api_error)?;
    print(&events, true);
    Ok(())
}

pub async fn info(conn: &Conn, out: Output) -> CliResult {
    let client = client(conn)?;
    let d = client.discovery().await.map_err(api_error)?;
    match out {
        Output::Table => {
            println!("API:             {} ({})", client.base_url(), d.api_version);
            println!("Installation:    {}", d.instance);
            println!("Default network: {}", d.default_network);
            println!(
                "Kinds:           {}",
                d.kinds
                    .iter()
                    .map(|k| k.plural())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if d.quarantined > 0 {
                println!(
                    "Quarantined:     {} unreadable record(s): run `berth admin fsck`",
                    d.quarantined
                );
            }
        }
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&d).map_err(|e| e.to_string())?
        ),
        Output::Yaml => print!(
            "{}",
            output::to_yaml(&serde_json::to_value(&d).map_err(|e| e.to_string())?)
        ),
    }
    Ok(())
}

/// `berth controllers`: the running controller instances.
pub async fn controllers(conn: &Conn, out: Output) -> CliResult {
    let client = client(conn)?;
    let list: Value = client
        .request_json(reqwest::Method::GET, paths::CONTROLLERS, None)
        .await
        .map_err(api_error)?;
    let items: Vec<berth_api_types::controllers::ControllerInstance> =
        serde_json::from_value(list["items"].clone()).map_err(|e| e.to_string())?;
    match out {
        Output::Table => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| {
                    vec![
                        i.kind.to_string(),
                        i.instance.clone(),
                        format!("{}/{}", i.host, i.pid),
                        format!(
                            "{:.0}% ({}/{} partitions, {} objects){}",
                            i.share() * 100.0,
                            i.partitions,
                            i.partitions_total,
                            i.objects,
                            if i.leader { ", leader" } else { "" }
                        ),
                        format!("{} ago", output::age_since(i.last_seen)),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(&["KIND", "INSTANCE", "HOST", "SHARE", "LAST SEEN"], &rows)
            );
        }
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?
        ),
        Output::Yaml => print!("{}", output::to_yaml(&list)),
    }
    Ok(())
}

/// Prints the `docker swarm join` line for a new node (stdout: only the command, so it can be
/// piped to the machine that joins).
pub async fn join_command(conn: &Conn, role: &str) -> CliResult {
    let client = client(conn)?;
    let answer: berth_api_types::wire::JoinCommand = client
        .request_json(
            reqwest::Method::GET,
            &format!(
                "{}?role={role}",
                berth_api_types::names::paths::JOIN_COMMAND
            ),
            None,
        )
        .await
        .map_err(api_error)?;
    println!("{}", answer.command);
    Ok(())
}

#[cfg(test)]
mod clear_text_tests {
    use super::clear_text_host;

    #[test]
    fn warns_only_for_plain_http_beyond_loopback() {
        assert_eq!(
            clear_text_host("http://10.0.0.5:7474").as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(
            clear_text_host("http://berth.example").as_deref(),
            Some("berth.example")
        );
        for quiet in [
            "http://127.0.0.1:7474",
            "http://localhost:7474",
            "http://[::1]:7474",
            "https://10.0.0.5:7474",
            "not a url",
        ] {
            assert_eq!(clear_text_host(quiet), None, "{quiet}");
        }
    }
}

/// Objects for the CLI modules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use berth_api_types::DynObject;
    use serde_json::json;

    /// Service `web` (image `app:2`) at `generation`, with `status`.
    pub fn service_at(generation: u64, status: serde_json::Value) -> DynObject {
        let mut o: DynObject = serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"image": "app:2"}, "status": status
        }))
        .unwrap();
        o.metadata.generation = generation;
        o
    }
}
