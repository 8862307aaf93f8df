//! Deploy helpers for the e2e tests: the tasks a Swarm service runs, webhook creation and calls,
//! and `Tap`, an outside NATS subscriber on `berth.deploy.<service>` (core NATS, as any tool would).

use crate::{eventually, Berth, Docker};
use berth_api_types::names::subjects;
use bollard::query_parameters::ListTasksOptions;
use futures::StreamExt;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// Generous bound for a rollout on a loaded 2-core machine.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// (task id, image) of the tasks of a Swarm service that are running and meant to be.
pub async fn running_tasks(d: &Docker, service: &str) -> Vec<(String, String)> {
    let tasks = match d
        .list_tasks(Some(ListTasksOptions {
            filters: Some(HashMap::from([
                ("service".to_string(), vec![service.to_string()]),
                ("desired-state".to_string(), vec!["running".to_string()]),
            ])),
        }))
        .await
    {
        Ok(t) => t,
        // Not created yet.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Vec::new(),
        Err(e) => panic!("e2e: listing tasks of {service}: {e}"),
    };
    tasks
        .into_iter()
        .filter(|t| {
            t.status
                .as_ref()
                .and_then(|s| s.state)
                .is_some_and(|s| s == bollard::models::TaskState::RUNNING)
        })
        .map(|t| {
            let image = t
                .spec
                .and_then(|s| s.container_spec)
                .and_then(|c| c.image)
                .unwrap_or_default();
            (t.id.unwrap_or_default(), image)
        })
        .collect()
}

/// Waits until exactly `n` tasks run and every one runs an image starting with `image`.
pub async fn wait_running(
    b: &Berth,
    d: &Docker,
    service: &str,
    image: &str,
    n: usize,
) -> Vec<String> {
    let what = format!("{n} task(s) of {service} running {image}");
    eventually(b, CONVERGE, &what, || async move {
        let tasks = running_tasks(d, service).await;
        let ok = tasks.len() == n && tasks.iter().all(|(_, i)| i.starts_with(image));
        if ok {
            Ok(tasks.into_iter().map(|(id, _)| id).collect())
        } else {
            Err(format!("{tasks:?}"))
        }
    })
    .await
}

/// An outside NATS subscriber on `berth.deploy.<service>` (core NATS, as any tool would).
pub struct Tap {
    rx: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl Tap {
    pub async fn start(url: &str, service: &str) -> Tap {
        let client = async_nats::connect(url)
            .await
            .expect("e2e: test client cannot connect to nats-server");
        let mut sub = client
            .subscribe(subjects::deploy(service))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _client = client;
            while let Some(m) = sub.next().await {
                let v: Value = serde_json::from_slice(&m.payload).expect("deploy event JSON");
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Tap { rx }
    }

    pub async fn next(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("e2e: no deploy event on NATS within 10 s")
            .expect("tap closed")
    }

    /// Everything that arrived so far, waiting a little for stragglers.
    pub async fn drain(&mut self) -> Vec<Value> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut out = Vec::new();
        while let Ok(v) = self.rx.try_recv() {
            out.push(v);
        }
        out
    }
}

/// `berth webhook create ... -o json`.
pub fn create_webhook(b: &Berth, args: &[&str]) -> Value {
    let mut all = vec!["webhook", "create"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&b.cli_ok(&all)).expect("webhook create -o json")
}

pub async fn post(
    url: &str,
    headers: &[(&str, String)],
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut req = crate::http().post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.expect("webhook request");
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}
