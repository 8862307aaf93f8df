//! `GET /openapi.json`: an OpenAPI 3.1 description of the REST API, generated from the code that
//! serves it: every route and who may call it from the access table ([`RULES`]), the object
//! bodies from the kinds' JSON Schemas (`api_types::schema`). A route without a summary here
//! fails a test, so the description cannot fall behind the router.

use crate::access::{Need, Rule, RULES};
use axum::http::Method;
use berth_api_types::schema;
use serde_json::{json, Map, Value};

/// What a route does, in a line (the table in docs/api.md says more).
fn summary(method: &Method, path: &str) -> Option<&'static str> {
    let rel = path
        .strip_prefix(berth_api_types::names::paths::API_ROOT)
        .unwrap_or(path);
    Some(match (method.as_str(), rel) {
        ("GET", "/healthz") => "Liveness: `ok` while the process serves requests",
        ("GET", "/readyz") => "Readiness: 200 when the store, the engine and NATS are ready; 503 naming what is not (text)",
        ("GET", "/metrics") => "Prometheus metrics, text format 0.0.4 (labels: kinds and outcomes only)",
        ("GET", "/schemas/{file}") => "The JSON Schema of a kind (`service.json`), or `berth.json` for any kind",
        ("GET", "/openapi.json") => "This document",
        ("POST", "/hooks/v1/{token}") => "Deploy webhook: set a Service's image (the URL token is the credential)",
        ("POST", "/hooks/v1/registry/{token}") => "Registry notification: deploy the pushed image to the Services that follow its tag",
        ("GET", "") => "Discovery: API version, installation id, kinds served",
        ("GET", "/whoami") => "The caller's token: id, role, services, exec grant",
        ("POST", "/apply") => "Apply a set of objects atomically (create or update each; `?dryRun=true` changes nothing)",
        ("GET", "/{plural}") => "List a kind's objects (`?labelSelector=`); `?watch=true` streams changes",
        ("POST", "/{plural}") => "Create an object (409 if it exists)",
        ("GET", "/{plural}/{name}") => "Read an object (Secret values redacted)",
        ("PUT", "/{plural}/{name}") => "Replace an object (conditional on `metadata.resourceVersion` when given)",
        ("PATCH", "/{plural}/{name}") => "JSON merge patch (RFC 7386) of an object",
        ("DELETE", "/{plural}/{name}") => "Delete an object",
        ("GET", "/{plural}/{name}/status") => "Read an object's status",
        ("PUT", "/{plural}/{name}/status") => "Write an object's status (controllers)",
        ("GET", "/{plural}/{name}/data") => "A Secret's or Config's values (controllers, admin)",
        ("GET", "/{plural}/{name}/tasks") => "A Service's Swarm tasks (`berth ps`)",
        ("GET", "/{plural}/{name}/logs") => "A Service's logs from every task, as JSON lines; `?follow=true` streams (audited)",
        ("POST", "/{plural}/{name}/exec") => "Run a command in a task over an HTTP upgrade to `berth-exec/1` (its own grant; audited)",
        ("GET", "/{plural}/{name}/exec/ws") => "The same exec over a WebSocket (`?request=` the exec request as JSON), for the dashboard's terminal; from this server's pages only",
        ("GET", "/ui") => "Dashboard: redirects to `/ui/`",
        ("GET", "/ui/login") => "Dashboard: the sign-in form (HTML)",
        ("POST", "/ui/login") => "Dashboard: sign in with a token (form field `token`); sets the session cookie",
        ("POST", "/ui/logout") => "Dashboard: sign out (clears the session cookie)",
        ("GET", "/ui/assets/{file}") => "Dashboard: a script or stylesheet built into the binary",
        ("GET", "/ui/") => "Dashboard: the overview (HTML)",
        ("GET", "/ui/services/{name}") => "Dashboard: a Service's page (HTML)",
        ("GET", "/ui/rows/services/{name}") => "Dashboard: a Service's overview row (HTML fragment, for live updates)",
        ("GET", "/ui/sections/{section}") => "Dashboard: one overview section: nodes, ingresses, backups or events (HTML fragment)",
        ("GET", "/ui/backups") => "Dashboard: snapshots, verification and the evidence downloads (HTML)",
        ("GET", "/ui/audit") => "Dashboard: the audit trail and its chain verification (HTML)",
        ("GET", "/events") => "Recent events; `?watch=true` streams them",
        ("GET", "/controllers") => "The running controller instances and their shares",
        ("GET", "/swarm/join-command") => "The `docker swarm join` command (holds the swarm's join token)",
        ("GET", "/snapshots") => "Backup evidence: every snapshot with its verification",
        ("POST", "/backups/{plan}/run") => "Take a snapshot now; progress streams as JSON lines",
        ("POST", "/snapshots/verify") => "Re-read a snapshot's (or every) blob and record the result",
        ("POST", "/restore/volume") => "Write a volume's files back from a snapshot",
        ("POST", "/restore/environment") => "Re-apply a snapshot's objects (never deletes)",
        ("GET", "/backup/key") => "The backup repository's key, for restic by hand",
        ("GET", "/webhooks") => "List deploy webhooks",
        ("POST", "/webhooks") => "Create a deploy webhook (its URL token is shown once)",
        ("DELETE", "/webhooks/{id}") => "Delete a deploy webhook",
        ("POST", "/webhooks/{id}/rotate") => "Give a deploy webhook a new URL token",
        ("GET", "/tokens") => "List API tokens (never their secrets)",
        ("POST", "/tokens") => "Create an API token (shown once)",
        ("POST", "/tokens/admin/rotate") => "Replace the admin token",
        ("DELETE", "/tokens/{id}") => "Revoke an API token",
        ("GET", "/audit") => "The audit trail, oldest first (`?since=`)",
        ("GET", "/audit/verify") => "Recompute the audit chain and say where it breaks, if anywhere",
        _ => return None,
    })
}

fn who(need: Need) -> String {
    match need {
        Need::Public => "No token.".into(),
        Need::Exec => "The admin, or an operator or deployer token created with `--exec`.".into(),
        n => format!(
            "Roles: {}.",
            n.roles()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The document, from the access table and the kinds' schemas.
pub fn document(rules: &[Rule]) -> Value {
    let mut paths = Map::new();
    for rule in rules {
        let item = paths
            .entry(rule.path.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object");
        let params: Vec<Value> = rule
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": summary(&rule.method, &rule.path).unwrap_or_default(),
            "description": who(rule.need),
            "responses": {
                "default": {"description": "An error: `{status, reason, message, details}`",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if rule.need == Need::Public {
            op["security"] = json!([]);
        }
        if rule.path.ends_with("/{plural}/{name}") || rule.path.ends_with("/{plural}") {
            let body = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Object"}}}});
            match rule.method.as_str() {
                "POST" | "PUT" => op["requestBody"] = body.clone(),
                _ => {}
            }
            op["responses"]["200"] = json!({"description": "The object (or, for a list, `{items}`)", "content": body["content"].clone()});
        }
        item.insert(rule.method.as_str().to_ascii_lowercase(), op);
    }
    let any = schema::any_kind();
    let mut schemas = any["$defs"].as_object().cloned().unwrap_or_default();
    // The kinds' schemas refer to `#/$defs/...`; here their definitions live in components.
    let mut object = any.clone();
    object.as_object_mut().map(|o| {
        o.remove("$defs");
        o.remove("$schema")
    });
    schemas.insert("Object".into(), object);
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "properties": {
                "status": {"type": "integer"},
                "reason": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object",
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}}
            }
        }),
    );
    let text = serde_json::to_string(&json!(schemas))
        .expect("json")
        .replace("#/$defs/", "#/components/schemas/");
    let schemas: Value = serde_json::from_str(&text).expect("json");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "berth",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "berth's REST API: Kubernetes-style objects for Docker Swarm. Every route needs `Authorization: Bearer <token>` unless it says otherwise."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}
        },
        "security": [{"token": []}]
    })
}

/// The document for the routes this server serves.
pub fn served() -> Value {
    document(&RULES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described_and_every_reference_resolves() {
        for rule in RULES.iter() {
            assert!(
                summary(&rule.method, &rule.path).is_some(),
                "{} {} has no summary in openapi.rs",
                rule.method,
                rule.path
            );
        }
        let doc = served();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.contains_key("/apis/berth/v1/{plural}/{name}/exec"));
        assert_eq!(
            doc["paths"]["/healthz"]["get"]["security"],
            json!([]),
            "public routes need no token"
        );
        // Every reference resolves inside the document.
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"").skip(1) {
            let target = r.split('"').next().unwrap();
            let name = target
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{target}"));
            assert!(doc["components"]["schemas"].get(name).is_some(), "{target}");
        }
    }
}
