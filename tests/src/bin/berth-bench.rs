//! `berth-bench`: measures berth against plain Swarm tooling on the same engine.
//!
//! `berth-bench apply-converge --services N` times, for N equivalent services:
//! - berth: from `berth apply -f DIR` (N Service manifests) to all N Swarm services created, and to
//!   all N tasks running;
//! - `docker stack deploy --resolve-image never` of the equivalent compose file, measured the same way;
//!
//! and prints both and their ratio. Both runs poll the engine the same way, start from an engine with
//! none of the services, and are cleaned up (containers gone) before the next run starts.
//!
//! `berth-bench webhook-latency --services N --rate R --seconds S` measures deploys: `berth up` on
//! NATS with N services (0 replicas: the engine's update call is measured, not container starts), one
//! webhook each, then R webhook calls per second for S seconds, round robin over the services, each
//! naming a new tag. The latency of a call is from just before it is sent to the engine's service
//! update event carrying that tag (`image.new`, time in ns): request received -> update committed.

use anyhow::{bail, Context, Result};
use berth_e2e::{docker, prefix, Berth, Docker};
use bollard::query_parameters::{ListContainersOptions, ListServicesOptions};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::HashMap;

use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Benchmarks berth against docker stack deploy on the same engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply N services and time until created and until all tasks run, berth vs docker stack deploy.
    ApplyConverge {
        #[arg(long, default_value_t = 100)]
        services: usize,
        /// Rounds; each round runs both tools, alternating which goes first.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[arg(long, default_value = "berth-test/busybox:1")]
        image: String,
        /// Network the stack's services join. `default`: the stack's own overlay network (what a
        /// plain compose file gets); `encrypted`: the same, encrypted (what berth's default network
        /// is); `host`: no per-task network set-up at all (the cheapest possible start).
        #[arg(long, value_enum, default_value_t = StackNet::Default)]
        stack_network: StackNet,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Webhook call -> engine service update latency, p50/p99, at a steady request rate.
    WebhookLatency {
        /// Services deployed round robin; with N >= 2 x rate, each gets a call every 2 s or more,
        /// so no call waits for berth's one-update-per-second pacing of a service.
        #[arg(long, default_value_t = 200)]
        services: usize,
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum StackNet {
    Default,
    /// The stack's own overlay network, encrypted: what berth's default network is.
    Encrypted,
    Host,
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    created: Duration,
    running: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    // berth logs at info, as in production, unless the caller asks for more.
    if std::env::var_os("BERTH_E2E_LOG").is_none() {
        std::env::set_var("BERTH_E2E_LOG", "info");
    }
    match Cli::parse().cmd {
        Cmd::WebhookLatency {
            services,
            rate,
            seconds,
        } => webhook_latency(services, rate, seconds).await,
        Cmd::ApplyConverge {
            services,
            rounds,
            image,
            stack_network,
            timeout_secs,
        } => {
            let timeout = Duration::from_secs(timeout_secs);
            let d = docker().await;
            let mut berth_runs = Vec::new();
            let mut stack_runs = Vec::new();
            for round in 0..rounds {
                let order = if round % 2 == 0 {
                    ["berth", "stack"]
                } else {
                    ["stack", "berth"]
                };
                for tool in order {
                    let t = if tool == "berth" {
                        run_berth(&d, services, &image, timeout).await?
                    } else {
                        run_stack(&d, services, &image, stack_network, timeout).await?
                    };
                    eprintln!(
                        "round {}: {tool:<5} created {:>7.2}s  running {:>7.2}s",
                        round + 1,
                        t.created.as_secs_f64(),
                        t.running.as_secs_f64()
                    );
                    if tool == "berth" {
                        berth_runs.push(t);
                    } else {
                        stack_runs.push(t);
                    }
                }
            }
            report(services, stack_network, &berth_runs, &stack_runs);
            Ok(())
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(n: usize, net: StackNet, berth: &[Timing], stack: &[Timing]) {
    let b_created = median(berth.iter().map(|t| t.created).collect());
    let b_running = median(berth.iter().map(|t| t.running).collect());
    let s_created = median(stack.iter().map(|t| t.created).collect());
    let s_running = median(stack.iter().map(|t| t.running).collect());
    println!(
        "apply-converge, {n} services, {} round(s), median; stack network: {net:?}",
        berth.len()
    );
    println!("{:<28} {:>12} {:>14}", "", "all created", "all running");
    println!(
        "{:<28} {:>11.2}s {:>13.2}s",
        "berth apply",
        b_created.as_secs_f64(),
        b_running.as_secs_f64()
    );
    println!(
        "{:<28} {:>11.2}s {:>13.2}s",
        "docker stack deploy",
        s_created.as_secs_f64(),
        s_running.as_secs_f64()
    );
    println!(
        "{:<28} {:>11.2}x {:>13.2}x",
        "ratio berth / stack",
        b_created.as_secs_f64() / s_created.as_secs_f64(),
        b_running.as_secs_f64() / s_running.as_secs_f64()
    );
}

fn manifest(name: &str, image: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  replicas: 1\n  command: [\"sleep\", \"1000000\"]\n  init: true\n  stopGracePeriod: 1s\n---\n"
    )
}

async fn run_berth(d: &Docker, n: usize, image: &str, timeout: Duration) -> Result<Timing> {
    let p = prefix("bench");
    let dir = tempfile::tempdir()?;
    // One file per service, as a team would keep them.
    for i in 0..n {
        std::fs::write(
            dir.path().join(format!("svc-{i:04}.yaml")),
            manifest(&format!("{p}-{i}"), image),
        )?;
    }
    let berth = Berth::start(None);
    // berth creates its default network once, at an installation's first start; wait for that so the
    // clock measures the apply, as it would on a running installation.
    let ready = Instant::now();
    while d
        .inspect_network(
            &berth.default_network,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .is_err()
    {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!(
                "berth's default network {} did not appear",
                berth.default_network
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    let out = berth.cli(&["apply", "-f", dir.path().to_str().context("utf-8 path")?]);
    if !out.success {
        bail!("berth apply failed: {}", out.stderr);
    }
    let t = converge(d, &p, n, start, timeout).await;
    // Delete through berth first so the controller does not recreate what cleanup removes, and let
    // it finish removing before it stops; cleanup then removes whatever is left either way.
    let deleted = berth.cli(&["delete", "-f", dir.path().to_str().unwrap_or_default()]);
    if deleted.success {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && count_services(d, &p).await? > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop(berth);
    cleanup(d, &p, true).await?;
    t
}

async fn count_services(d: &Docker, p: &str) -> Result<usize> {
    Ok(d.list_services(Some(ListServicesOptions {
        filters: Some(HashMap::from([("name".to_string(), vec![p.to_string()])])),
        ..Default::default()
    }))
    .await?
    .len())
}

async fn run_stack(
    d: &Docker,
    n: usize,
    image: &str,
    net: StackNet,
    timeout: Duration,
) -> Result<Timing> {
    let p = prefix("bench");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("stack.yml");
    let mut compose = String::from("version: \"3.8\"\nservices:\n");
    for i in 0..n {
        compose.push_str(&format!(
            "  s{i}:\n    image: {image}\n    command: [\"sleep\", \"1000000\"]\n    init: true\n    stop_grace_period: 1s\n    deploy:\n      replicas: 1\n"
        ));
        if net == StackNet::Host {
            compose.push_str("    networks: [hostnet]\n");
        }
    }
    if net == StackNet::Host {
        compose.push_str("networks:\n  hostnet:\n    external: true\n    name: host\n");
    }
    if net == StackNet::Encrypted {
        compose.push_str("networks:\n  default:\n    driver_opts:\n      encrypted: \"\"\n");
    }
    std::fs::write(&file, compose)?;
    let start = Instant::now();
    let status = Command::new("docker")
        .args(["stack", "deploy", "--resolve-image", "never", "-c"])
        .arg(&file)
        .arg(&p)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("docker stack deploy failed");
    }
    let t = converge(d, &p, n, start, timeout).await;
    let _ = Command::new("docker")
        .args(["stack", "rm", &p])
        .stdout(std::process::Stdio::null())
        .status();
    cleanup(d, &p, true).await?;
    // The stack's network goes once its tasks are gone.
    let _ = Command::new("docker")
        .args(["network", "rm", &format!("{p}_default")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    t
}

/// Polls the engine until N services with the prefix exist, then until all their tasks run.
async fn converge(
    d: &Docker,
    p: &str,
    n: usize,
    start: Instant,
    timeout: Duration,
) -> Result<Timing> {
    let filters = HashMap::from([("name".to_string(), vec![p.to_string()])]);
    let mut created = None;
    loop {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} (created: {created:?})");
        }
        let services = d
            .list_services(Some(ListServicesOptions {
                filters: Some(filters.clone()),
                status: Some(true),
            }))
            .await?;
        if created.is_none() && services.len() >= n {
            created = Some(start.elapsed());
        }
        if let Some(c) = created {
            let running: u64 = services
                .iter()
                .filter_map(|s| s.service_status.as_ref()?.running_tasks)
                .sum();
            if running >= n as u64 {
                return Ok(Timing {
                    created: c,
                    running: start.elapsed(),
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes the services (if asked) and waits until their containers are gone, so the next run starts
/// on an idle engine.
async fn cleanup(d: &Docker, p: &str, remove: bool) -> Result<()> {
    let filters = HashMap::from([("name".to_string(), vec![p.to_string()])]);
    if remove {
        for s in d
            .list_services(Some(ListServicesOptions {
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await?
        {
            let _ = d.delete_service(s.id.as_deref().unwrap_or_default()).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let left = d
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([(
                    "label".to_string(),
                    vec![format!("com.docker.stack.namespace={p}")],
                )])),
                ..Default::default()
            }))
            .await?
            .len()
            + d.list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("name".to_string(), vec![p.to_string()])])),
                ..Default::default()
            }))
            .await?
            .len();
        let services = d
            .list_services(Some(ListServicesOptions {
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await?
            .len();
        if left == 0 && services == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("cleanup of {p} did not finish: {left} containers, {services} services left");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Nanoseconds since the Unix epoch (the clock the engine stamps events with).
fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn webhook_latency(n: usize, rate: u64, seconds: u64) -> Result<()> {
    use futures::StreamExt;
    let d = docker().await;
    let p = prefix("hookbench");
    let nats = berth_e2e::Nats::start();
    // A generous per-address limit: every call comes from this one process.
    let berth = Berth::start_with(Some(nats.url()), &["--hook-rate", "100000"]);
    let result = async {
        let mut yaml = String::new();
        for i in 0..n {
            yaml.push_str(&format!(
                "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {p}-{i}\nspec:\n  image: berth-test/busybox:1\n  replicas: 0\n  command: [\"sleep\", \"1000000\"]\n---\n"
            ));
        }
        berth.apply(&yaml);
        let ready = Instant::now();
        while count_services(&d, &p).await? < n {
            if ready.elapsed() > Duration::from_secs(300) {
                bail!("the {n} services were not created in 300 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut urls = Vec::with_capacity(n);
        for i in 0..n {
            let out = berth.cli_ok(&["webhook", "create", &format!("{p}-{i}"), "-o", "json"]);
            let hook: serde_json::Value = serde_json::from_str(&out)?;
            let url = hook["url"]
                .as_str()
                .with_context(|| format!("no URL in `berth webhook create` output: {out}"))?;
            urls.push(url.to_string());
        }
        // Let the creates settle (their tasks, none, and their events) before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;

        // The engine's service update events, by new image.
        let mut events = d.events(Some(bollard::query_parameters::EventsOptions {
            filters: Some(HashMap::from([
                ("type".to_string(), vec!["service".to_string()]),
                ("event".to_string(), vec!["update".to_string()]),
            ])),
            ..Default::default()
        }));
        let updates = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, i64>::new()));
        let sink = updates.clone();
        let watcher = tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                let attrs = ev.actor.and_then(|a| a.attributes).unwrap_or_default();
                if let (Some(image), Some(t)) = (attrs.get("image.new"), ev.time_nano) {
                    sink.lock().unwrap().entry(image.clone()).or_insert(t);
                }
            }
        });

        let http = reqwest::Client::new();
        let total = rate * seconds;
        let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut calls = tokio::task::JoinSet::new();
        for k in 0..total {
            tick.tick().await;
            let url = urls[k as usize % n].clone();
            let http = http.clone();
            let tag = format!("b{k}");
            calls.spawn(async move {
                let sent = now_ns();
                let resp = http
                    .post(&url)
                    .json(&serde_json::json!({ "tag": tag }))
                    .send()
                    .await;
                let answered = now_ns();
                let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
                (tag, sent, answered, status)
            });
        }
        let mut sent = Vec::new();
        while let Some(r) = calls.join_next().await {
            sent.push(r?);
        }
        // Give the last updates time to land.
        tokio::time::sleep(Duration::from_secs(5)).await;
        watcher.abort();
        let updates = updates.lock().unwrap().clone();

        let refused = sent.iter().filter(|s| s.3 != 202).count();
        let mut http_ms: Vec<f64> = sent.iter().map(|s| (s.2 - s.1) as f64 / 1e6).collect();
        let mut e2e_ms: Vec<f64> = sent
            .iter()
            .filter_map(|(tag, at, _, _)| {
                let t = updates.get(&format!("berth-test/busybox:{tag}"))?;
                Some((*t - *at) as f64 / 1e6)
            })
            .collect();
        http_ms.sort_by(f64::total_cmp);
        e2e_ms.sort_by(f64::total_cmp);
        println!(
            "webhook-latency: {total} calls at {rate}/s over {n} services (NATS), {} answered non-202, {} without an engine update",
            refused,
            total as usize - e2e_ms.len()
        );
        println!("{:<38} {:>8} {:>8} {:>8} {:>8}", "", "p50", "p90", "p99", "max");
        for (what, v) in [
            ("webhook call -> 202 (ms)", &http_ms),
            ("webhook call -> engine update (ms)", &e2e_ms),
        ] {
            println!(
                "{what:<38} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                percentile(v, 0.5),
                percentile(v, 0.9),
                percentile(v, 0.99),
                v.last().copied().unwrap_or(f64::NAN)
            );
        }
        Ok(())
    }
    .await;
    // berth stops first, so its controller cannot recreate what cleanup removes.
    drop(berth);
    cleanup(&d, &p, true).await?;
    result
}
