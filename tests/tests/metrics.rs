//! End-to-end tests of what monitoring sees: `/metrics` counting a real Service's reconcile and
//! readiness, `/readyz` following NATS going away, and `--log-format json` writing JSON lines.
//! `berth up` against the real Swarm engine and a real nats-server.

use berth_api_types::names::paths;
use berth_api_types::Kind;
use berth_e2e::{eventually, prefix, Berth, Cleanup, Nats};
use std::time::Duration;

/// Generous bound for convergence on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(60);

/// The value of one series (name and labels exactly as rendered), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// GET `path` with `token` (none: anonymous); (status, body).
async fn get(b: &Berth, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = b.client().get(format!("{}{path}", b.url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("e2e: request");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

#[tokio::test]
async fn metrics_readiness_and_json_logs() {
    let p = prefix("metrics");
    let _cleanup = Cleanup::new(&p);
    let nats = Nats::start();
    let b = Berth::start_with(Some(nats.url()), &["--log-format", "json"]);
    let name = format!("{p}-web");

    // Who may read: a token (a viewer's is enough), never anonymous.
    let (code, _) = get(&b, paths::METRICS, None).await;
    assert_eq!(code, 401, "anonymous /metrics");
    let viewer = b.cli_ok(&["token", "create", "--role", "viewer"]);
    let viewer = viewer.trim();
    let (code, before) = get(&b, paths::METRICS, Some(viewer)).await;
    assert_eq!(code, 200, "{before}");
    let ok_series = r#"berth_reconciles_total{kind="service",outcome="ok"}"#;
    let ok_before = sample(&before, ok_series);

    b.apply(&berth_e2e::sleeping_service(&name, ""));
    b.wait_condition(Kind::Service, &name, "Ready", CONVERGE, |c| {
        c["status"] == "True"
    })
    .await;

    // Counted: the reconcile that made it Ready, its duration, the object and its readiness, the
    // write and the events on NATS. Labels are kinds and outcomes, never the object's name.
    let text = eventually(&b, CONVERGE, "metrics of the Ready service", || async {
        let (code, text) = get(&b, paths::METRICS, Some(viewer)).await;
        let counted = code == 200
            && sample(&text, ok_series) > ok_before
            && sample(&text, r#"berth_objects{kind="service"}"#) == 1.0
            && sample(&text, r#"berth_objects_ready{kind="service"}"#) == 1.0;
        if counted {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    for series in [
        r#"berth_reconcile_duration_seconds_count{kind="service"}"#,
        r#"berth_apply_duration_seconds_count{outcome="ok"}"#,
        r#"berth_nats_published_total{stream="events",outcome="ok"}"#,
    ] {
        assert!(sample(&text, series) >= 1.0, "{series} in\n{text}");
    }
    assert!(
        text.contains(r#"berth_queue_depth{kind="service"}"#),
        "{text}"
    );
    assert!(!text.contains(&name), "an object name in /metrics:\n{text}");

    // Ready with everything up; anonymous like /healthz.
    let (code, body) = get(&b, paths::READYZ, None).await;
    assert_eq!(code, 200, "{body}");
    for line in ["store: ok", "engine: ok", "nats: ok"] {
        assert!(body.contains(line), "{line} in {body}");
    }

    // Every line berth wrote is a JSON object, the start banner included.
    let log = b.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let banner = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("berth API on "))
        })
        .unwrap_or_else(|| panic!("no start banner in\n{log}"));
    assert_eq!(banner["level"], "INFO", "{banner}");
    assert!(banner["timestamp"].is_string(), "{banner}");
    assert!(
        lines.iter().any(|l| l["kind"] == "Service"),
        "the controller's fields are JSON fields:\n{log}"
    );
    // A reconcile's span keeps the object's name apart from the span's own name.
    assert!(
        lines.iter().any(|l| l["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "reconcile" && s["object"] == name.as_str())),
        "no reconcile span naming {name}:\n{log}"
    );

    // NATS gone: not ready, and the answer names it.
    drop(nats);
    let body = eventually(
        &b,
        Duration::from_secs(30),
        "/readyz to name NATS",
        || async {
            match get(&b, paths::READYZ, None).await {
                (503, body) if body.starts_with("not ready: nats\n") => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(body.contains("engine: ok"), "{body}");
    // Still alive: liveness does not follow dependencies.
    let (code, _) = get(&b, paths::HEALTHZ, None).await;
    assert_eq!(code, 200);
}
