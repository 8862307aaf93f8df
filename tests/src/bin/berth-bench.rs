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
//!
//! `berth-bench store-apply --objects N --concurrency 1,8 --backends sled,nats-r1,nats-r3` measures
//! the API server's store (issue 15): a fresh `berth api` per backend and concurrency, N small
//! Configs applied one per HTTP request by C concurrent clients, each request timed; then single
//! GETs of one object. No Docker engine is needed.

use anyhow::{bail, Context, Result};
use berth_api_types::names::paths;
use berth_api_types::Kind;
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
        /// Replicas of every service. With 0, "running" is the same moment as "created".
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// berth applies one multi-document file instead of one file per service.
        #[arg(long)]
        one_file: bool,
        /// Keep each berth round's log here (`round-N.log`); berth then logs at debug unless
        /// BERTH_E2E_LOG says otherwise.
        #[arg(long)]
        log_dir: Option<std::path::PathBuf>,
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
    /// Memory and CPU at scale: N Config objects applied to a fresh installation; apply and list
    /// times, RSS idle and after, and the CPU seconds one resync of the converged installation costs.
    /// Reconciles per second of the service controller with 1, 2, ... instances against a
    /// converged cluster (every instance resyncing every second, so each always has work), and the
    /// failover time after `kill -9` of one of three instances.
    ControllerInstances {
        /// Services (0 replicas) the instances share.
        #[arg(long, default_value_t = 300)]
        services: usize,
        /// The most instances measured (1..=this).
        #[arg(long, default_value_t = 3)]
        max_instances: usize,
        /// Seconds of each throughput measurement.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// `kill -9` rounds for the failover time.
        #[arg(long, default_value_t = 3)]
        kills: usize,
    },
    /// Apply latency and throughput of the API server's store, per backend (issue 15): N small
    /// Configs, one per request, by C concurrent clients; p50/p99/max and objects per second.
    StoreApply {
        /// Configs applied (and timed) per backend and concurrency, after the warm-up.
        #[arg(long, default_value_t = 2000)]
        objects: usize,
        /// Concurrent clients; each value is a run of its own on a fresh server.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        concurrency: Vec<usize>,
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "sled,nats-r1,nats-r3"
        )]
        backends: Vec<StoreBench>,
        /// Configs applied first and not counted (connections, caches, the stream's first blocks).
        #[arg(long, default_value_t = 100)]
        warmup: usize,
        /// GETs of one object, one at a time, after the applies.
        #[arg(long, default_value_t = 500)]
        reads: usize,
    },
    /// Dashboard page loads (issue 19) in Debian's headless Chromium with N Services: a fresh
    /// `berth api` (HTTPS) whose Services carry the status a controller writes (conditions,
    /// replicas, revisions), then each page loaded L times; Navigation Timing per load, and the
    /// server's time for the overview measured alone with a plain client.
    Dashboard {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        /// Timed loads of each page (after one warm-up load).
        #[arg(long, default_value_t = 20)]
        loads: usize,
    },
    Scale {
        /// Config objects, applied as one multi-document file.
        #[arg(long, default_value_t = 10_000)]
        objects: usize,
        /// Also apply this many Services (0 replicas), so that a resync has engine objects to
        /// reconcile and not only objects to list.
        #[arg(long, default_value_t = 0)]
        services: usize,
        /// Resync period (seconds) of the installation during the resync measurement.
        #[arg(long, default_value_t = 10)]
        resync_secs: u64,
        /// Periods measured, with and without resync (medians are reported).
        #[arg(long, default_value_t = 5)]
        periods: usize,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum StackNet {
    Default,
    /// The stack's own overlay network, encrypted: what berth's default network is.
    Encrypted,
    Host,
}

/// The store backends `store-apply` compares.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum StoreBench {
    /// `--store sled` (the default): one database in --data-dir, fsync per group commit.
    Sled,
    /// `--store nats --store-replicas 1` on one nats-server.
    NatsR1,
    /// `--store nats --store-replicas 3` on a three-server JetStream cluster.
    NatsR3,
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    created: Duration,
    running: Duration,
    creates: Creates,
}

/// What the engine's own `service create` events say about one run (seconds from the start).
#[derive(Debug, Clone, Copy, Default)]
struct Creates {
    first: f64,
    last: f64,
    /// The longest pause between two consecutive creates, and the index of the create after it.
    gap: f64,
    gap_before: usize,
}

/// The services an apply-converge round creates.
#[derive(Debug, Clone, Copy)]
struct Shape {
    n: usize,
    replicas: u32,
    one_file: bool,
}

/// Records the engine's `service create` events for names starting with `p` (nanosecond times).
fn watch_creates(
    d: &Docker,
    p: &str,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::Mutex<Vec<i64>>>,
) {
    use futures::StreamExt;
    let mut events = d.events(Some(bollard::query_parameters::EventsOptions {
        filters: Some(HashMap::from([
            ("type".to_string(), vec!["service".to_string()]),
            ("event".to_string(), vec!["create".to_string()]),
        ])),
        ..Default::default()
    }));
    let times = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = times.clone();
    let p = p.to_string();
    let task = tokio::spawn(async move {
        while let Some(Ok(ev)) = events.next().await {
            let attrs = ev.actor.and_then(|a| a.attributes).unwrap_or_default();
            if attrs.get("name").is_some_and(|n| n.starts_with(&p)) {
                if let Some(t) = ev.time_nano {
                    sink.lock().unwrap().push(t);
                }
            }
        }
    });
    (task, times)
}

fn creates_since(start_ns: i64, times: &[i64]) -> Creates {
    let mut t: Vec<f64> = times
        .iter()
        .map(|ns| (ns - start_ns) as f64 / 1e9)
        .collect();
    t.sort_by(f64::total_cmp);
    let mut c = Creates {
        first: t.first().copied().unwrap_or(f64::NAN),
        last: t.last().copied().unwrap_or(f64::NAN),
        ..Default::default()
    };
    for (i, w) in t.windows(2).enumerate() {
        if w[1] - w[0] > c.gap {
            c.gap = w[1] - w[0];
            c.gap_before = i + 1;
        }
    }
    c
}

#[tokio::main]
async fn main() -> Result<()> {
    // berth logs at info, as in production, unless the caller asks for more.
    if std::env::var_os("BERTH_E2E_LOG").is_none() {
        std::env::set_var("BERTH_E2E_LOG", "info");
    }
    match Cli::parse().cmd {
        Cmd::StoreApply {
            objects,
            concurrency,
            backends,
            warmup,
            reads,
        } => store_apply::run(objects, &concurrency, &backends, warmup, reads).await,
        Cmd::ControllerInstances {
            services,
            max_instances,
            seconds,
            kills,
        } => controller_instances(services, max_instances, seconds, kills).await,
        Cmd::Scale {
            objects,
            services,
            resync_secs,
            periods,
        } => scale(objects, services, resync_secs, periods).await,
        Cmd::Dashboard { services, loads } => dashboard_load::run(services, loads).await,
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
            replicas,
            one_file,
            log_dir,
        } => {
            let timeout = Duration::from_secs(timeout_secs);
            let shape = Shape {
                n: services,
                replicas,
                one_file,
            };
            if let Some(dir) = &log_dir {
                std::fs::create_dir_all(dir)?;
            }
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
                    let log = log_dir
                        .as_ref()
                        .map(|dir| dir.join(format!("round-{}.log", round + 1)));
                    let t = if tool == "berth" {
                        run_berth(&d, shape, &image, timeout, log.as_deref()).await?
                    } else {
                        run_stack(&d, shape, &image, stack_network, timeout).await?
                    };
                    eprintln!(
                        "round {}: {tool:<5} created {:>7.2}s  running {:>7.2}s  | engine creates: first {:.2}s, last {:.2}s, longest gap {:.2}s before #{}",
                        round + 1,
                        t.created.as_secs_f64(),
                        t.running.as_secs_f64(),
                        t.creates.first,
                        t.creates.last,
                        t.creates.gap,
                        t.creates.gap_before,
                    );
                    if tool == "berth" {
                        berth_runs.push(t);
                    } else {
                        stack_runs.push(t);
                    }
                }
            }
            report(shape, stack_network, &berth_runs, &stack_runs);
            Ok(())
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(shape: Shape, net: StackNet, berth: &[Timing], stack: &[Timing]) {
    let n = shape.n;
    let b_created = median(berth.iter().map(|t| t.created).collect());
    let b_running = median(berth.iter().map(|t| t.running).collect());
    let s_created = median(stack.iter().map(|t| t.created).collect());
    let s_running = median(stack.iter().map(|t| t.running).collect());
    println!(
        "apply-converge, {n} services, {} replica(s) each, berth from {}, {} round(s), median; stack network: {net:?}",
        shape.replicas,
        if shape.one_file { "one file" } else { "one file per service" },
        berth.len()
    );
    let rounds = |v: &[Timing]| {
        v.iter()
            .map(|t| {
                format!(
                    "{:.2}/{:.2}",
                    t.created.as_secs_f64(),
                    t.running.as_secs_f64()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "rounds (created/running, s): berth {}; stack {}",
        rounds(berth),
        rounds(stack)
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

fn manifest(name: &str, image: &str, replicas: u32) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  replicas: {replicas}\n  command: [\"sleep\", \"1000000\"]\n  init: true\n  stopGracePeriod: 1s\n---\n"
    )
}

async fn run_berth(
    d: &Docker,
    shape: Shape,
    image: &str,
    timeout: Duration,
    keep_log: Option<&std::path::Path>,
) -> Result<Timing> {
    let n = shape.n;
    let p = prefix("bench");
    let dir = berth_e2e::tempdir("bench");
    if shape.one_file {
        let all: String = (0..n)
            .map(|i| manifest(&format!("{p}-{i}"), image, shape.replicas))
            .collect();
        std::fs::write(dir.path().join("services.yaml"), all)?;
    } else {
        // One file per service, as a team would keep them.
        for i in 0..n {
            std::fs::write(
                dir.path().join(format!("svc-{i:04}.yaml")),
                manifest(&format!("{p}-{i}"), image, shape.replicas),
            )?;
        }
    }
    if keep_log.is_some() && std::env::var("BERTH_E2E_LOG").as_deref() == Ok("info") {
        std::env::set_var("BERTH_E2E_LOG", "info,berth=debug,berth_controllers=debug");
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
    let (watcher, times) = watch_creates(d, &p);
    let start_ns = now_ns();
    let start = Instant::now();
    let out = berth.cli(&["apply", "-f", dir.path().to_str().context("utf-8 path")?]);
    if !out.success {
        bail!("berth apply failed: {}", out.stderr);
    }
    let mut t = converge(d, &p, shape, start, timeout).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    watcher.abort();
    if let Ok(t) = t.as_mut() {
        t.creates = creates_since(start_ns, &times.lock().unwrap());
    }
    if let Some(path) = keep_log {
        // The apply's start on berth's clock (its log's UTC timestamps), to read the log against.
        let header = format!(
            "# berth-bench: apply started at {} (unix ns {start_ns}); result {t:?}\n",
            chrono_like(start_ns)
        );
        std::fs::write(path, header + &berth.log_text())?;
    }
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
    shape: Shape,
    image: &str,
    net: StackNet,
    timeout: Duration,
) -> Result<Timing> {
    let n = shape.n;
    let replicas = shape.replicas;
    let p = prefix("bench");
    let dir = berth_e2e::tempdir("bench");
    let file = dir.path().join("stack.yml");
    let mut compose = String::from("version: \"3.8\"\nservices:\n");
    for i in 0..n {
        compose.push_str(&format!(
            "  s{i}:\n    image: {image}\n    command: [\"sleep\", \"1000000\"]\n    init: true\n    stop_grace_period: 1s\n    deploy:\n      replicas: {replicas}\n"
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
    let (watcher, times) = watch_creates(d, &p);
    let start_ns = now_ns();
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
    let mut t = converge(d, &p, shape, start, timeout).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    watcher.abort();
    if let Ok(t) = t.as_mut() {
        t.creates = creates_since(start_ns, &times.lock().unwrap());
    }
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
    shape: Shape,
    start: Instant,
    timeout: Duration,
) -> Result<Timing> {
    let n = shape.n;
    let want_running = n as u64 * shape.replicas as u64;
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
            if running >= want_running {
                return Ok(Timing {
                    created: c,
                    running: start.elapsed(),
                    creates: Creates::default(),
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

/// A Unix time in ns as `HH:MM:SS.mmm` UTC (the form berth's log lines carry).
fn chrono_like(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let ms = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let day = secs.rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}.{ms:03}Z",
        day / 3600,
        (day % 3600) / 60,
        day % 60
    )
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

/// What /proc says about one process.
mod proc_stat {
    use anyhow::{Context, Result};

    /// (VmRSS, VmHWM) in MiB.
    pub fn rss_mib(pid: u32) -> Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<f64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
            let kb: f64 = line
                .split_whitespace()
                .nth(1)
                .context("VmRSS value")?
                .parse()?;
            Ok(kb / 1024.0)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// utime + stime of the whole process (all threads), in seconds.
    pub fn cpu_secs(pid: u32) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name is in parentheses and may contain spaces: fields count from after it.
        let rest = &stat[stat.rfind(')').context("/proc/PID/stat format")? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state is field 3; utime and stime are fields 14 and 15.
        let utime: f64 = f.get(11).context("utime")?.parse()?;
        let stime: f64 = f.get(12).context("stime")?.parse()?;
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok((utime + stime) / tick)
    }
}

/// Waits until the process has used under 2% of a core for 2 s in a row (what it does after an
/// apply: events, controllers, status writes), or `timeout`. Returns how long it took.
async fn wait_quiet(pid: u32, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut last = proc_stat::cpu_secs(pid)?;
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = proc_stat::cpu_secs(pid)?;
        if now - last > 0.01 {
            quiet_since = Instant::now();
        }
        last = now;
        if quiet_since.elapsed() >= Duration::from_secs(2) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("berth did not go quiet within {timeout:?}");
        }
    }
}

/// Cumulative CPU seconds sampled every 50 ms for `total`: (seconds since start, CPU seconds).
async fn sample_cpu(pid: u32, total: Duration) -> Result<Vec<(f64, f64)>> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while start.elapsed() < total {
        tick.tick().await;
        out.push((start.elapsed().as_secs_f64(), proc_stat::cpu_secs(pid)?));
    }
    Ok(out)
}

/// CPU used in [from, to) (seconds since the sampling started), from the nearest samples.
fn cpu_between(samples: &[(f64, f64)], from: f64, to: f64) -> f64 {
    let at = |t: f64| {
        samples
            .iter()
            .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
            .map(|s| s.1)
            .unwrap_or_default()
    };
    at(to) - at(from)
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn config_yaml(p: &str, n: usize) -> String {
    let mut yaml = String::with_capacity(n * 360);
    for i in 0..n {
        // ~340 bytes a document, as in the 10,000 Configs in 3.4 MB.
        yaml.push_str(&format!(
            "apiVersion: berth/v1\nkind: Config\nmetadata:\n  name: {p}-{i:05}\n  labels:\n    app: scale-bench\nspec:\n  stringData:\n    app.ini: |\n      [server]\n      name = {p}-{i:05}\n      port = {port}\n      log_level = info\n      upstream = http://backend-{i:05}.internal:8080/api/v1\n      timeout = 30s\n---\n",
            port = 8000 + i % 1000,
        ));
    }
    yaml
}

async fn scale(n: usize, services: usize, resync_secs: u64, periods: usize) -> Result<()> {
    let d = docker().await;
    let p = prefix("scale");
    let period = resync_secs.max(2) as f64;
    // Phase 1: no resync at all while it is measured (one runs at start, the next in a day).
    let mut berth = Berth::start_with(None, &["--resync", "86400"]);
    let result = async {
        let pid = berth.pid().context("berth pid")?;
        println!(
            "scale: {n} Config objects{}, berth {} (embedded bus, log level info), pid {pid}",
            if services > 0 {
                format!(" + {services} Services (0 replicas)")
            } else {
                String::new()
            },
            berth_e2e::berth_bin().display()
        );
        wait_quiet(pid, Duration::from_secs(60)).await?;
        let (idle_rss, _) = proc_stat::rss_mib(pid)?;

        let yaml = config_yaml(&p, n);
        let dir = berth_e2e::tempdir("bench");
        let file = dir.path().join("configs.yaml");
        std::fs::write(&file, &yaml)?;
        let cpu0 = proc_stat::cpu_secs(pid)?;
        let start = Instant::now();
        let out = berth.cli(&["apply", "-f", file.to_str().context("utf-8 path")?]);
        let apply = start.elapsed();
        if !out.success {
            bail!("berth apply failed: {}", out.stderr);
        }
        let (rss_applied, _) = proc_stat::rss_mib(pid)?;
        let settle = wait_quiet(pid, Duration::from_secs(300)).await?;
        let cpu_apply = proc_stat::cpu_secs(pid)? - cpu0;
        let (rss_settled, hwm) = proc_stat::rss_mib(pid)?;

        // GET the list, three times; the median.
        let url = format!("{}{}", berth.url(), paths::collection(Kind::Config));
        let mut lists = Vec::new();
        let mut bytes = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let body = berth_e2e::http()
                .get(&url)
                .bearer_auth(&berth.token)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            lists.push(t.elapsed());
            bytes = body.len();
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let items = v["items"].as_array().map(Vec::len).unwrap_or_default();
            if items < n {
                bail!("the list has {items} items, {n} were applied");
            }
        }
        let list = median(lists.clone());
        let (rss_listed, _) = proc_stat::rss_mib(pid)?;

        if services > 0 {
            let mut svc = String::new();
            for i in 0..services {
                svc.push_str(&format!(
                    "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {p}-svc-{i}\nspec:\n  image: berth-test/busybox:1\n  replicas: 0\n  command: [\"sleep\", \"1000000\"]\n---\n"
                ));
            }
            berth.apply(&svc);
            let t = Instant::now();
            while count_services(&d, &format!("{p}-svc-")).await? < services {
                if t.elapsed() > Duration::from_secs(300) {
                    bail!("the {services} services were not created in 300 s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            wait_quiet(pid, Duration::from_secs(300)).await?;
        }
        let lagged = berth.log_text().matches("lagged").count();

        println!();
        println!("YAML applied: {} documents, {:.1} MB", n, yaml.len() as f64 / 1e6);
        println!("{:<52} {:>10}", "RSS idle, fresh installation", format!("{idle_rss:.1} MiB"));
        println!("{:<52} {:>10.2}s", "apply (berth apply -f, wall)", apply.as_secs_f64());
        println!("{:<52} {:>10}", "RSS right after apply", format!("{rss_applied:.1} MiB"));
        println!(
            "{:<52} {:>10}",
            format!("RSS after apply, settled ({:.1}s later)", settle.as_secs_f64()),
            format!("{rss_settled:.1} MiB")
        );
        println!("{:<52} {:>10}", "peak RSS so far (VmHWM)", format!("{hwm:.1} MiB"));
        println!("{:<52} {:>10.2}s", "server CPU for the apply, until settled", cpu_apply);
        println!(
            "{:<52} {:>10.3}s   (rounds: {}; {:.1} MB)",
            "list (GET all Configs, median of 3)",
            list.as_secs_f64(),
            lists
                .iter()
                .map(|l| format!("{:.3}", l.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
            bytes as f64 / 1e6
        );
        println!("{:<52} {:>10}", "RSS after the lists", format!("{rss_listed:.1} MiB"));
        println!("{:<52} {:>10}", "`lagged` lines in berth's log", lagged);

        // Background CPU of the installation after the apply, with no resync (one ran at start,
        // the next is a day away): `periods` windows of one resync period each.
        let idle_samples = sample_cpu(pid, Duration::from_secs_f64(period * periods as f64)).await?;
        let idle: Vec<f64> = (0..periods)
            .map(|k| cpu_between(&idle_samples, k as f64 * period, (k + 1) as f64 * period))
            .collect();

        // Resync CPU: berth restarts on the same data with --resync P. After its start-up resync
        // it is sampled every 50 ms for periods+1 periods. The busiest second of the first period
        // gives the resyncs' phase. Each period is then cut in two halves: the one centred on its
        // resync and the one between two resyncs. One resync's CPU = CPU(half with the resync) -
        // CPU(half without), in the same process and state, averaged over the periods.
        let every = resync_secs.max(2).to_string();
        berth.restart_with(&["--resync", &every]);
        let pid = berth.pid().context("berth pid")?;
        let startup = wait_quiet(pid, Duration::from_secs(300)).await?;
        let (rss_restarted, _) = proc_stat::rss_mib(pid)?;
        let samples =
            sample_cpu(pid, Duration::from_secs_f64(period * (periods as f64 + 1.0))).await?;
        let phase = (0..(period as usize * 10))
            .map(|i| i as f64 / 10.0)
            .max_by(|a, b| {
                cpu_between(&samples, *a, a + 1.0).total_cmp(&cpu_between(&samples, *b, b + 1.0))
            })
            .unwrap_or_default()
            + 0.5;
        let quarter = period / 4.0;
        // The first resync whose half-window starts inside the samples.
        let first = if phase - quarter < 0.0 { phase + period } else { phase };
        let mut with = Vec::new();
        let mut without = Vec::new();
        for k in 0..periods {
            let r = first + k as f64 * period;
            if r + 3.0 * quarter > period * (periods as f64 + 1.0) {
                break;
            }
            with.push(cpu_between(&samples, r - quarter, r + quarter));
            without.push(cpu_between(&samples, r + quarter, r + 3.0 * quarter));
        }
        let diffs: Vec<f64> = with.iter().zip(&without).map(|(w, o)| w - o).collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len().max(1) as f64;
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|c| format!("{c:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:<52} {:>10}",
            "CPU s per 10 s after the apply, no resync",
            fmt(&idle.iter().map(|c| c * 10.0 / period).collect::<Vec<_>>())
        );
        println!();
        println!(
            "{:<52} {:>10}",
            format!("RSS after a restart on the same data (quiet after {:.1}s)", startup.as_secs_f64()),
            format!("{rss_restarted:.1} MiB")
        );
        println!("resync every {every} s; per period, CPU s of the {:.1} s half-window around the resync / the half without:", period / 2.0);
        println!("  with:    {}", fmt(&with));
        println!("  without: {}", fmt(&without));
        println!(
            "{:<52} {:>10.3}s   (median {:.3}s; CPU clock ticks are 0.01 s)",
            "CPU of one resync (mean of with - without)",
            mean,
            median_f(diffs.clone())
        );
        Ok(())
    }
    .await;
    drop(berth);
    cleanup(&d, &p, true).await?;
    result
}

/// Starts `n` service controller instances (resyncing every `resync` seconds, logging each
/// reconcile to `log`) and waits until they hold every partition between them.
async fn start_instances(
    api: &Berth,
    tag: &str,
    n: usize,
    resync: &str,
    log: &std::path::Path,
) -> Vec<berth_e2e::ControllerProcess> {
    let env = [
        ("BERTH_RECONCILE_LOG", log.to_str().unwrap_or_default()),
        ("BERTH_RESYNC", resync),
    ];
    berth_e2e::start_service_instances(api, tag, n, &env).await
}

/// Reconciles of Services whose start lies in `[from, to)` (microseconds since the epoch).
fn reconciles_between(log: &std::path::Path, from: u64, to: u64) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "Service")
        .filter_map(|v| v["start"].as_u64())
        .filter(|t| (from..to).contains(t))
        .count()
}

fn epoch_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn controller_instances(
    services: usize,
    max_instances: usize,
    seconds: u64,
    kills: usize,
) -> Result<()> {
    let d = docker().await;
    let p = prefix("ctlbench");
    let nats = berth_e2e::Nats::start();
    let api = Berth::start_api(nats.url());
    let dir = berth_e2e::tempdir("ctlbench");
    let result = async {
        let _net = api.start_controller("network");
        let yaml: String = (0..services)
            .map(|i| format!(
                "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {p}-{i}\nspec:\n  image: berth-test/busybox:1\n  replicas: 0\n  command: [\"sleep\", \"1000000\"]\n"
            ))
            .collect::<Vec<_>>()
            .join("---\n");
        api.apply(&yaml);
        {
            let warm = start_instances(&api, "warm", 1, "60", &dir.path().join("warm.jsonl")).await;
            let start = Instant::now();
            while count_services(&d, &p).await? < services {
                if start.elapsed() > Duration::from_secs(600) {
                    bail!("the {services} services were not created in 600 s");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            drop(warm);
        }
        println!("| instances | reconciles/s (median of 1 s buckets over {seconds} s) | total in {seconds} s |");
        println!("| ---: | ---: | ---: |");
        for n in 1..=max_instances {
            let log = dir.path().join(format!("n{n}.jsonl"));
            let mut ctls = start_instances(&api, &format!("n{n}"), n, "1", &log).await;
            // Past the initial resync of every acquired partition.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let from = epoch_micros();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            let to = epoch_micros();
            let mut buckets: Vec<usize> = (0..seconds)
                .map(|s| reconciles_between(&log, from + s * 1_000_000, from + (s + 1) * 1_000_000))
                .collect();
            let total = reconciles_between(&log, from, to);
            buckets.sort_unstable();
            println!("| {n} | {} | {total} |", buckets[buckets.len() / 2]);
            for c in ctls.iter_mut() {
                c.terminate();
            }
        }
        // Failover: three instances, kill -9 one, time until the two others hold every partition.
        let log = dir.path().join("failover.jsonl");
        let mut ctls = start_instances(&api, "f", 3, "60", &log).await;
        let mut times = Vec::new();
        for round in 0..kills {
            let mut victim = ctls.remove(0);
            let killed = Instant::now();
            victim.kill9();
            let pids: Vec<u32> = ctls.iter().map(|c| c.pid()).collect();
            berth_e2e::wait_instances(&api, "Service", &pids).await;
            times.push(killed.elapsed().as_secs_f64());
            let env = [("BERTH_RECONCILE_LOG", log.to_str().unwrap_or_default())];
            ctls.push(api.start_controller_instance("service", &format!("f-new{round}"), &env));
            let pids: Vec<u32> = ctls.iter().map(|c| c.pid()).collect();
            berth_e2e::wait_instances(&api, "Service", &pids).await;
        }
        println!(
            "failover after kill -9 (survivors hold every partition), {} rounds: {}",
            times.len(),
            times.iter().map(|t| format!("{t:.1} s")).collect::<Vec<_>>().join(", ")
        );
        Ok(())
    }
    .await;
    let _ = Command::new("docker")
        .args(["service", "rm"])
        .args(
            String::from_utf8_lossy(
                &Command::new("docker")
                    .args(["service", "ls", "-q", "--filter", &format!("name={p}")])
                    .output()?
                    .stdout,
            )
            .split_whitespace(),
        )
        .output();
    result
}

/// `store-apply`: the API server's store backends under the same stream of small applies.
mod store_apply {
    use super::{percentile, StoreBench};
    use anyhow::{bail, Context, Result};
    use berth_api_types::names::paths;
    use berth_api_types::Kind;
    use berth_e2e::{Berth, Nats, NatsCluster};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// The NATS servers a run's berth uses: held (never read) until berth has stopped.
    struct Servers {
        _one: Option<Nats>,
        _cluster: Option<NatsCluster>,
    }

    /// What one backend at one concurrency measured (latencies in ms, sorted).
    struct Figures {
        applies: Vec<f64>,
        wall: Duration,
        reads: Vec<f64>,
    }

    pub async fn run(
        n: usize,
        concurrency: &[usize],
        backends: &[StoreBench],
        warmup: usize,
        reads: usize,
    ) -> Result<()> {
        preflight(backends)?;
        if n == 0 || concurrency.is_empty() || concurrency.contains(&0) || backends.is_empty() {
            bail!("--objects, --concurrency and --backends need at least one non-zero value each");
        }
        println!(
            "store-apply: {n} Configs per run (+{warmup} warm-up, not counted), one per POST {}, \
             berth api {} (log level info, --no-default-backup-plan)",
            paths::APPLY,
            berth_e2e::berth_bin().display()
        );
        let mut rows = Vec::new();
        for &backend in backends {
            for &c in concurrency {
                let f = one_run(backend, n, c, warmup, reads).await?;
                eprintln!(
                    "{backend:?} c={c}: {:.1} objects/s, p50 {:.2} ms",
                    n as f64 / f.wall.as_secs_f64(),
                    percentile(&f.applies, 0.5)
                );
                rows.push((backend, c, f));
            }
        }
        println!();
        println!(
            "| backend | clients | apply p50 | apply p99 | apply max | objects/s | GET p50 | GET p99 |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (backend, c, f) in &rows {
            println!(
                "| {} | {c} | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms |",
                label(*backend),
                percentile(&f.applies, 0.5),
                percentile(&f.applies, 0.99),
                f.applies.last().copied().unwrap_or(f64::NAN),
                f.applies.len() as f64 / f.wall.as_secs_f64(),
                percentile(&f.reads, 0.5),
                percentile(&f.reads, 0.99),
            );
        }
        Ok(())
    }

    fn label(b: StoreBench) -> &'static str {
        match b {
            StoreBench::Sled => "sled",
            StoreBench::NatsR1 => "nats R1 (1 server)",
            StoreBench::NatsR3 => "nats R3 (3-server cluster)",
        }
    }

    /// The binaries a run needs, checked before anything starts: a missing one is an error, never
    /// a run that reports nothing.
    fn preflight(_backends: &[StoreBench]) -> Result<()> {
        if let Some(bin) = std::env::var_os("BERTH_BIN") {
            if !std::path::Path::new(&bin).is_file() {
                bail!("BERTH_BIN={} is not a file: build berth first (cargo build --release -p berth-operator --bin berth)", bin.to_string_lossy());
            }
        }
        let bin = berth_e2e::berth_bin();
        let out = std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} --version failed: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Every backend needs it: the sled run's bus is a nats-server too, as `berth api` has.
        let nats = std::process::Command::new("nats-server")
            .arg("--version")
            .output();
        match nats {
            Ok(o) if o.status.success() => Ok(()),
            _ => bail!("nats-server is not on PATH or does not run (scripts/test installs it)"),
        }
    }

    /// A fresh `berth api` with its own NATS: sled with a one-server bus, or the store on NATS.
    fn start(backend: StoreBench) -> (Berth, Servers) {
        let extra = ["--no-default-backup-plan"];
        match backend {
            StoreBench::Sled => {
                let nats = Nats::start();
                let berth = Berth::start_api_with(Some(nats.url()), &extra);
                (
                    berth,
                    Servers {
                        _one: Some(nats),
                        _cluster: None,
                    },
                )
            }
            StoreBench::NatsR1 => {
                let nats = Nats::start();
                let berth = Berth::start_api_with(
                    Some(nats.url()),
                    &[extra[0], "--store", "nats", "--store-replicas", "1"],
                );
                (
                    berth,
                    Servers {
                        _one: Some(nats),
                        _cluster: None,
                    },
                )
            }
            StoreBench::NatsR3 => {
                let cluster = NatsCluster::start();
                let berth = Berth::start_api_with(
                    Some(cluster.urls()),
                    &[extra[0], "--store", "nats", "--store-replicas", "3"],
                );
                (
                    berth,
                    Servers {
                        _one: None,
                        _cluster: Some(cluster),
                    },
                )
            }
        }
    }

    /// The store berth says it opened (its "API server listening" line), checked against the
    /// backend asked for: a flag berth ignored would otherwise measure the wrong thing.
    fn check_store(berth: &Berth, backend: StoreBench) -> Result<()> {
        let log = berth.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("API server listening"))
            .with_context(|| format!("berth api did not log its start:\n{log}"))?;
        let want = match backend {
            StoreBench::Sled => "store=sled",
            StoreBench::NatsR1 => "(R1)",
            StoreBench::NatsR3 => "(R3)",
        };
        if !line.contains(want) {
            bail!("berth api did not open the {backend:?} store (no `{want}` in: {line})");
        }
        Ok(())
    }

    async fn one_run(
        backend: StoreBench,
        n: usize,
        clients: usize,
        warmup: usize,
        reads: usize,
    ) -> Result<Figures> {
        let (berth, servers) = start(backend);
        let result = async {
            check_store(&berth, backend)?;
            let p = berth_e2e::prefix("store");
            applies(&berth, &format!("{p}-w"), warmup, clients).await?;
            let start = Instant::now();
            let mut lat = applies(&berth, &p, n, clients).await?;
            let wall = start.elapsed();
            lat.sort_by(f64::total_cmp);

            // Every measured object must be there: a run that lost writes reports nothing.
            let list: serde_json::Value = berth
                .client()
                .get(format!(
                    "{}{}",
                    berth.url(),
                    paths::collection(Kind::Config)
                ))
                .bearer_auth(&berth.token)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let found = list["items"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter(|o| {
                            o["metadata"]["name"].as_str().is_some_and(|name| {
                                name.starts_with(&p) && !name.starts_with(&format!("{p}-w"))
                            })
                        })
                        .count()
                })
                .unwrap_or_default();
            if found != n {
                bail!("{n} Configs were applied and acknowledged, {found} are listed");
            }

            let url = format!(
                "{}{}",
                berth.url(),
                paths::object(Kind::Config, &name(&p, n / 2))
            );
            let mut read_ms = Vec::with_capacity(reads);
            for _ in 0..reads {
                let t = Instant::now();
                let resp = berth
                    .client()
                    .get(&url)
                    .bearer_auth(&berth.token)
                    .send()
                    .await?;
                let status = resp.status();
                let body = resp.bytes().await?;
                if !status.is_success() {
                    bail!("GET {url}: {status}: {}", String::from_utf8_lossy(&body));
                }
                read_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            read_ms.sort_by(f64::total_cmp);
            Ok(Figures {
                applies: lat,
                wall,
                reads: read_ms,
            })
        }
        .await;
        // berth stops before the NATS servers it writes to.
        drop(berth);
        drop(servers);
        result
    }

    fn name(p: &str, i: usize) -> String {
        format!("{p}-{i:05}")
    }

    /// Applies `n` Configs named `<p>-<i>`, one per request, from `clients` concurrent clients;
    /// each request's latency in ms. Any answer but 200 stops the run with berth's message.
    async fn applies(berth: &Berth, p: &str, n: usize, clients: usize) -> Result<Vec<f64>> {
        let next = Arc::new(AtomicUsize::new(0));
        let url = format!("{}{}", berth.url(), paths::APPLY);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let next = next.clone();
            let http = berth.client();
            let token = berth.token.clone();
            let url = url.clone();
            let p = p.to_string();
            tasks.spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, anyhow::Error>(lat);
                    }
                    // One small Config (~110 bytes of data), as `berth apply` would send it.
                    let body = serde_json::json!({
                        "items": [{
                            "apiVersion": berth_api_types::names::API_VERSION,
                            "kind": "Config",
                            "metadata": { "name": name(&p, i) },
                            "spec": { "stringData": { "app.ini": format!(
                                "[server]\nname = {p}-{i}\nport = {}\nlog_level = info\nupstream = http://backend-{i}.internal:8080\n",
                                8000 + i % 1000
                            ) } }
                        }]
                    });
                    let t = Instant::now();
                    let resp = http.post(&url).bearer_auth(&token).json(&body).send().await?;
                    let status = resp.status();
                    let text = resp.text().await?;
                    if status != reqwest::StatusCode::OK {
                        bail!("apply of {} answered {status}: {text}", name(&p, i));
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            });
        }
        let mut all = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        if all.len() != n {
            bail!("{} of {n} applies were timed", all.len());
        }
        Ok(all)
    }
}

mod dashboard_load {
    use super::percentile;
    use anyhow::{bail, Context, Result};
    use berth_api_types::names::paths;
    use berth_api_types::Kind;
    use berth_e2e::{Berth, Nats};
    use serde_json::json;
    use std::time::Instant;

    pub async fn run(n: usize, loads: usize) -> Result<()> {
        let browser = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
        if !browser.join("node_modules/playwright-core").is_dir() {
            bail!("tests/browser has no node_modules: run scripts/test's prereqs (berth_browser_deps)");
        }
        let nats = Nats::start();
        let b = Berth::start_tls("api", Some(nats.url()), &[]);
        let items: Vec<_> = (0..n)
            .map(|i| {
                json!({"apiVersion": "berth/v1", "kind": "Service",
                       "metadata": {"name": format!("svc-{i:04}")},
                       "spec": {"image": format!("registry.example/team/app-{i}:3"), "replicas": 2}})
            })
            .collect();
        let t = Instant::now();
        let (code, body) = b.api_post(paths::APPLY, &json!({ "items": items })).await;
        if code != 200 {
            bail!("apply of {n} Services: {code} {body}");
        }
        println!(
            "dashboard: {n} Services applied in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        // The status a converged Service carries, written as its controller writes it.
        let client = b.client();
        let ctl = b.controller_token().to_string();
        let now = chrono::Utc::now();
        for i in 0..n {
            let name = format!("svc-{i:04}");
            let cond = |t: &str, s: &str| {
                json!({"type": t, "status": s, "reason": "AllTasksRunning",
                "message": "2/2 tasks running", "lastTransitionTime": now})
            };
            let revs: Vec<_> = (1..=3)
                .map(|r| {
                    json!({"revision": r, "image": format!("registry.example/team/app-{i}:{r}"),
                    "generation": r, "time": now, "trigger": "webhook", "result": "complete"})
                })
                .collect();
            let status = json!({"status": {
                "observedGeneration": 1, "desiredReplicas": 2, "runningReplicas": 2, "updatedReplicas": 2,
                "image": format!("registry.example/team/app-{i}:3"),
                "conditions": [cond("Ready", "True"), cond("Progressing", "False"), cond("Degraded", "False")],
                "revisions": revs,
            }});
            let r = client
                .put(format!(
                    "{}{}/status",
                    b.url(),
                    paths::object(Kind::Service, &name)
                ))
                .bearer_auth(&ctl)
                .json(&status)
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("status of {name}: {} {}", r.status(), r.text().await?);
            }
        }
        // The server alone: the overview's HTML with a bearer token, no browser.
        let mut server = Vec::new();
        let mut bytes = 0;
        for i in 0..=loads {
            let t = Instant::now();
            let body = client
                .get(format!("{}{}", b.url(), paths::UI_HOME))
                .bearer_auth(&b.token)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            if i > 0 {
                server.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            bytes = body.len();
        }
        server.sort_by(f64::total_cmp);
        let pages = [
            paths::UI_HOME.to_string(),
            paths::ui_service("svc-0500"),
            paths::UI_BACKUPS.to_string(),
        ];
        let out = std::process::Command::new("node")
            .arg(browser.join("page-load.mjs"))
            .current_dir(&browser)
            .env("BERTH_URL", b.url())
            .env("TOKEN", &b.token)
            .env("PAGES", pages.join(","))
            .env("LOADS", loads.to_string())
            .output()
            .context("node (scripts/test installs nodejs)")?;
        if !out.status.success() {
            bail!("page-load.mjs: {}", String::from_utf8_lossy(&out.stderr));
        }
        println!(
            "server: GET {} ({} KiB of HTML, {n} Services): p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms ({loads} requests)",
            paths::UI_HOME,
            bytes / 1024,
            percentile(&server, 0.5),
            percentile(&server, 0.95),
            server.last().copied().unwrap_or(f64::NAN)
        );
        println!();
        println!(
            "| page | response end p50 | DOMContentLoaded p50 | load p50 | load p95 | load max |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let col = |k: &str| {
                let mut xs: Vec<f64> = v["runs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r[k].as_f64())
                    .collect();
                xs.sort_by(f64::total_cmp);
                xs
            };
            let load = col("load");
            println!(
                "| `{}` | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
                v["path"].as_str().unwrap_or(""),
                percentile(&col("response"), 0.5),
                percentile(&col("dcl"), 0.5),
                percentile(&load, 0.5),
                percentile(&load, 0.95),
                load.last().copied().unwrap_or(f64::NAN),
            );
        }
        Ok(())
    }
}
