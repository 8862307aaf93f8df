//! What a monitoring system asks the API server: `/readyz` (can this process serve: its store,
//! the Swarm engine and NATS) and `/metrics` (the Prometheus metrics of `berth_controllers::metrics`,
//! with the objects per kind counted as it is scraped). `/healthz` stays a liveness probe that
//! touches nothing, so a slow engine never gets a live process restarted.
//!
//! `/readyz` is public like `/healthz`: it names which dependency is not ready and nothing else
//! (no address, no error text, which can carry a host name; those go to the log). `/metrics` needs
//! a token that may read objects (viewer and up): it counts objects and calls, by kind and outcome
//! only, but that is still what runs and how busy it is.

use crate::server::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_api_types::Kind;
use berth_controllers::metrics;
use serde_json::Value;
use std::time::Duration;

/// How long `/readyz` waits for the engine's answer: longer, and a probe with a short timeout
/// would see no answer instead of the one naming the engine.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(2);

/// One dependency's state as `/readyz` reports it.
#[derive(Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    /// `None`: ready; otherwise a short, public reason.
    pub problem: Option<&'static str>,
}

/// `/readyz`'s answer from its checks: 200 when all are ready, 503 naming the others.
pub fn readiness(checks: &[Check]) -> (StatusCode, String) {
    let not_ready: Vec<&str> = checks
        .iter()
        .filter(|c| c.problem.is_some())
        .map(|c| c.name)
        .collect();
    let mut body = String::new();
    for c in checks {
        body.push_str(&format!("{}: {}\n", c.name, c.problem.unwrap_or("ok")));
    }
    if not_ready.is_empty() {
        (StatusCode::OK, body)
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n{body}", not_ready.join(", ")),
        )
    }
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut checks = Vec::with_capacity(3);
    // A read through the object path (a failed flush makes every read refuse, see `Store`).
    let store = match state.store.get(Kind::Network, &state.default_network) {
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "readyz: the store cannot be read");
            Some("cannot be read")
        }
    };
    checks.push(Check {
        name: "store",
        problem: store,
    });
    // `connect` negotiates the version and pings.
    let host = state.docker_host.as_deref().map(|h| h.as_str());
    let engine = match tokio::time::timeout(
        ENGINE_TIMEOUT,
        berth_controllers::swarm::engine::connect(host),
    )
    .await
    {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readyz: the Swarm engine does not answer");
            Some("does not answer")
        }
        Err(_) => {
            tracing::warn!("readyz: the Swarm engine did not answer within {ENGINE_TIMEOUT:?}");
            Some("does not answer")
        }
    };
    checks.push(Check {
        name: "engine",
        problem: engine,
    });
    if let Some(client) = &state.nats {
        let problem = match client.connection_state() {
            async_nats::connection::State::Connected => None,
            async_nats::connection::State::Pending => Some("connecting"),
            async_nats::connection::State::Disconnected => Some("disconnected"),
        };
        checks.push(Check {
            name: "nats",
            problem,
        });
    }
    let (code, body) = readiness(&checks);
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Whether a stored object's `Ready` condition is `True`.
fn is_ready(status: &Value) -> bool {
    status
        .get("conditions")
        .and_then(Value::as_array)
        .is_some_and(|conds| {
            conds.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let m = metrics::global();
    for kind in Kind::ALL {
        // A kind that cannot be listed keeps its last counts; the store logs why.
        if let Ok(objects) = state.store.list(kind) {
            let ready = objects.iter().filter(|o| is_ready(&o.status)).count();
            m.set_objects(kind, objects.len(), ready);
        }
    }
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], m.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{router, send_test, TEST_ADMIN};
    use berth_api_types::names::paths;
    use serde_json::json;

    #[test]
    fn readiness_names_what_is_not_ready() {
        let ok = |name| Check {
            name,
            problem: None,
        };
        let (code, body) = readiness(&[ok("store"), ok("engine")]);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, "store: ok\nengine: ok\n");
        let (code, body) = readiness(&[
            ok("store"),
            Check {
                name: "engine",
                problem: Some("does not answer"),
            },
            Check {
                name: "nats",
                problem: Some("disconnected"),
            },
        ]);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with("not ready: engine, nats\n") && body.contains("nats: disconnected"),
            "{body}"
        );
    }

    #[test]
    fn only_a_true_ready_condition_counts() {
        assert!(is_ready(
            &json!({"conditions": [{"type": "Ready", "status": "True"}]})
        ));
        assert!(!is_ready(
            &json!({"conditions": [{"type": "Ready", "status": "False"}]})
        ));
        assert!(!is_ready(
            &json!({"conditions": [{"type": "Progressing", "status": "True"}]})
        ));
        assert!(!is_ready(&json!({})));
    }

    #[tokio::test]
    async fn metrics_need_a_token_and_count_objects_per_kind() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), &crate::store::testing::test_key())
            .await
            .unwrap();
        let app = router(AppState::for_tests(store).await);
        let (code, _) = send_test(&app, "GET", paths::METRICS, None, None).await;
        assert_eq!(code, 401);
        let (code, _) = send_test(
            &app,
            "POST",
            paths::APPLY,
            Some(TEST_ADMIN),
            Some(json!({"items": [{
                "apiVersion": "berth/v1", "kind": "Secret",
                "metadata": {"name": "metrics-test-secret"},
                "spec": {"stringData": {"k": "value"}}
            }]})),
        )
        .await;
        assert_eq!(code, 200);
        let (code, text) = send_test(&app, "GET", paths::METRICS, Some(TEST_ADMIN), None).await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("berth_objects{kind=\"secret\"} 1"), "{text}");
        // The apply's write was timed.
        assert!(
            text.contains("berth_apply_duration_seconds_count{outcome=\"ok\"}"),
            "{text}"
        );
        assert!(text.contains("# HELP berth_objects_ready"), "{text}");
        // Labels are kinds and outcomes: no object name.
        assert!(!text.contains("metrics-test-secret"), "{text}");
    }
}
