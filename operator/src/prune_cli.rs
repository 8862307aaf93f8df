//! `berth apply -f PATH --prune -l SELECTOR`: after the files are applied, delete the objects the
//! selector matches that the files no longer name, so removing a file from a repository removes
//! its objects too. The selector is required (as with kubectl): it draws the line around what
//! these files own, so an apply from one repository never deletes another team's objects.
//!
//! What would go is printed before anything is deleted; users go before what they use (a Secret
//! cannot be deleted while a Service still mounts it); Nodes are never pruned (the node
//! controller registers them from the swarm, not from files).

use crate::api_client::ApiClient;
use crate::cli::api_error;
use berth_api_types::selector::Selector;
use berth_api_types::{DynObject, Kind};
use std::collections::BTreeSet;

/// Checks the selector before anything is applied: a typo must not fail half-way.
pub fn check(selector: &str) -> Result<(), String> {
    let parsed = Selector::parse(selector).map_err(|e| format!("error: -l: {e}"))?;
    if parsed.is_empty() {
        return Err(
            "error: --prune needs a non-empty -l SELECTOR: it deletes every object the selector matches that the files do not name"
                .into(),
        );
    }
    Ok(())
}

/// Pure: what the selector matched that the files do not name, users first.
fn to_prune(matched: Vec<DynObject>, applied: &BTreeSet<(Kind, String)>) -> Vec<(Kind, String)> {
    let mut out: Vec<(Kind, String)> = matched
        .into_iter()
        .filter(|o| o.kind != Kind::Node)
        .map(|o| (o.kind, o.metadata.name))
        .filter(|k| !applied.contains(k))
        .collect();
    out.sort_by_key(|(k, n)| (!matches!(k, Kind::Service | Kind::Registry), n.clone()));
    out
}

/// Lists, shows and deletes (unless `dry_run`) what the files no longer name.
pub async fn prune(
    client: &ApiClient,
    selector: &str,
    applied: &[DynObject],
    dry_run: bool,
) -> Result<(), String> {
    let names: BTreeSet<(Kind, String)> = applied
        .iter()
        .map(|o| (o.kind, o.metadata.name.clone()))
        .collect();
    let mut matched = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.is_served()) {
        matched.extend(
            client
                .list_selected(kind, Some(selector))
                .await
                .map_err(api_error)?,
        );
    }
    let gone = to_prune(matched, &names);
    if gone.is_empty() {
        eprintln!("nothing to prune: every object matching `{selector}` is in the files");
        return Ok(());
    }
    let list: Vec<String> = gone
        .iter()
        .map(|(k, n)| format!("{}/{n}", k.lower()))
        .collect();
    eprintln!(
        "pruning {} object(s) matching `{selector}` that the files do not name: {}",
        gone.len(),
        list.join(", ")
    );
    if dry_run {
        for id in list {
            println!("{id} pruned (dry run)");
        }
        return Ok(());
    }
    let mut failures = Vec::new();
    for ((kind, name), id) in gone.iter().zip(list) {
        match client.delete(*kind, name).await {
            Ok(_) => println!("{id} pruned"),
            Err(e) if e.is_not_found() => println!("{id} already gone"),
            Err(e) => failures.push(format!("{}: {id} not pruned", api_error(e))),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(kind: &str, name: &str) -> DynObject {
        serde_json::from_value(json!({
            "apiVersion": "berth/v1", "kind": kind, "metadata": {"name": name}, "spec": {}
        }))
        .unwrap()
    }

    #[test]
    fn what_the_files_name_stays_users_go_first_nodes_never() {
        let applied = BTreeSet::from([(Kind::Service, "web".to_string())]);
        let matched = vec![
            obj("Secret", "old-creds"),
            obj("Service", "web"),
            obj("Node", "n1"),
            obj("Service", "old-api"),
            obj("Config", "web"),
        ];
        assert_eq!(
            to_prune(matched, &applied),
            [
                (Kind::Service, "old-api".to_string()),
                (Kind::Secret, "old-creds".to_string()),
                (Kind::Config, "web".to_string()),
            ]
        );
    }

    #[test]
    fn the_selector_is_checked_and_required() {
        assert!(check("app=shop").is_ok());
        assert!(check("").unwrap_err().contains("needs a non-empty -l"));
        assert!(check("app in (a").unwrap_err().starts_with("error: -l:"));
    }
}
