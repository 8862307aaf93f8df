//! Several instances of one controller against one NATS server: every object has exactly one
//! owner at a time (a reconcile log from every instance shows no overlap), the work spreads, a
//! `kill -9`'d instance's objects are taken over, a NATS restart loses nothing, and instances that
//! are gone leave nothing behind on NATS.

use berth_api_types::names::paths;
use berth_api_types::names::subjects::EVENTS_STREAM;
use berth_api_types::Kind;
use berth_e2e::{
    controller_instances as instances, manifest, prefix, start_service_instances, tempdir,
    wait_for, wait_instances as wait_settled, Berth, Cleanup, ControllerProcess, Nats,
};
use futures::StreamExt;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

/// Generous for a loaded 2-core machine creating hundreds of Swarm services.
const CONVERGE: Duration = Duration::from_secs(240);

fn services_yaml(prefix: &str, count: usize, round: u32) -> String {
    (0..count)
        .map(|i| {
            format!(
                "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {prefix}-s{i}\nspec:\n  image: berth-test/busybox:1\n  command: [\"sleep\", \"100000\"]\n  replicas: 0\n  env:\n    - name: ROUND\n      value: \"{round}\"\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn apply(api: &Berth, yaml: &str) {
    let (_dir, file) = manifest("services.yaml", yaml);
    api.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
}

/// How many of the prefix's Services are Ready at their current generation.
async fn converged(api: &Berth, prefix: &str) -> usize {
    let (_, list) = api.api_get(&paths::collection(Kind::Service)).await;
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|o| {
                    o["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(&format!("{prefix}-s")))
                })
                .filter(|o| {
                    o["status"]["observedGeneration"] == o["metadata"]["generation"]
                        && o["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
                .count()
        })
        .unwrap_or(0)
}

async fn wait_converged(api: &Berth, prefix: &str, count: usize, what: &str) -> Duration {
    let start = Instant::now();
    wait_for(CONVERGE, what, || async {
        (converged(api, prefix).await == count).then_some(())
    })
    .await;
    start.elapsed()
}

#[derive(Debug, Clone)]
struct Reconcile {
    instance: String,
    start: u64,
    end: u64,
}

/// Every reconcile of the log by object name, in start order.
fn reconciles(log: &Path) -> BTreeMap<String, Vec<Reconcile>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut by_name: BTreeMap<String, Vec<Reconcile>> = BTreeMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("reconcile log line {line:?} is not JSON: {e}"));
        if v["kind"] != "Service" {
            continue;
        }
        by_name
            .entry(v["name"].as_str().unwrap().to_string())
            .or_default()
            .push(Reconcile {
                instance: v["instance"].as_str().unwrap().to_string(),
                start: v["start"].as_u64().unwrap(),
                end: v["end"].as_u64().unwrap(),
            });
    }
    for list in by_name.values_mut() {
        list.sort_by_key(|r| r.start);
    }
    by_name
}

/// No two reconciles of one object overlap in time, whichever instances ran them. Returns how
/// many reconciles and how many handovers (consecutive reconciles by different instances) it saw.
fn assert_no_overlap(log: &Path) -> (usize, usize) {
    let by_name = reconciles(log);
    let (mut count, mut handovers) = (0, 0);
    for (name, list) in &by_name {
        count += list.len();
        for pair in list.windows(2) {
            assert!(
                pair[0].end <= pair[1].start,
                "{name} was reconciled by {} and {} at the same time: {:?}",
                pair[0].instance,
                pair[1].instance,
                pair
            );
            if pair[0].instance != pair[1].instance {
                handovers += 1;
            }
        }
    }
    (count, handovers)
}

fn alive(ctls: &mut [ControllerProcess]) {
    for c in ctls.iter_mut() {
        assert!(c.is_running(), "a controller exited:\n{}", c.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_service_controllers_share_300_services_and_take_over_after_kill9() {
    let p = prefix("scale");
    let _cleanup = Cleanup::new(&p);
    let nats = Nats::start();
    let api = Berth::start_api(nats.url());
    let logs = tempdir("scale-log");
    let log = logs.path().join("reconciles.jsonl");
    let env = [("BERTH_RECONCILE_LOG", log.to_str().unwrap())];
    let _net = api.start_controller("network");
    let mut ctls = start_service_instances(&api, "s", 3, &env).await;

    const COUNT: usize = 300;
    apply(&api, &services_yaml(&p, COUNT, 1));
    let took = wait_converged(&api, &p, COUNT, "300 Services Ready").await;
    eprintln!("scale: {COUNT} services converged through 3 instances in {took:.1?}");
    alive(&mut ctls);

    // The shares: each instance's record counts the objects in its partitions.
    let list = wait_for(
        Duration::from_secs(30),
        "object counts in the records",
        || async {
            let list = instances(&api, "Service").await;
            let objects: u64 = list.iter().filter_map(|i| i["objects"].as_u64()).sum();
            (objects == COUNT as u64 && list.len() == 3).then_some(list)
        },
    )
    .await;
    let shares: Vec<(u64, u64)> = list
        .iter()
        .map(|i| {
            (
                i["partitions"].as_u64().unwrap(),
                i["objects"].as_u64().unwrap(),
            )
        })
        .collect();
    eprintln!("scale: (partitions, objects) per instance: {shares:?}");
    for (_, objects) in &shares {
        assert!(
            *objects <= (COUNT * 2 / 3) as u64,
            "one instance owns {objects} of {COUNT} objects (at most about 2/N expected): {shares:?}"
        );
    }
    let (count, handovers) = assert_no_overlap(&log);
    eprintln!("scale: {count} reconciles, {handovers} handovers, no overlap");

    // kill -9 one instance, then change every Service: the ones it owned are reconciled by the
    // survivors once its leases expire.
    let victim = ctls.remove(0);
    let victim_pid = victim.pid();
    let victim_id = list
        .iter()
        .find(|i| i["pid"].as_u64() == Some(victim_pid as u64))
        .and_then(|i| i["instance"].as_str())
        .expect("the victim's record")
        .to_string();
    let mut victim = victim;
    let killed = Instant::now();
    victim.kill9();
    apply(&api, &services_yaml(&p, COUNT, 2));
    let survivors: Vec<u32> = ctls.iter().map(|c| c.pid()).collect();
    wait_settled(&api, "Service", &survivors).await;
    let takeover = killed.elapsed();
    let converged_after = {
        wait_converged(&api, &p, COUNT, "300 Services Ready after the kill").await;
        killed.elapsed()
    };
    eprintln!(
        "scale: kill -9 of {victim_id}: survivors hold every partition after {takeover:.1?}, all {COUNT} services converged {converged_after:.1?} after the kill"
    );
    // The lease time (6 s) plus a renewal period, and the records' refresh: the 10 s.
    assert!(
        takeover < Duration::from_secs(10),
        "the survivors took {takeover:?} to take the victim's partitions over"
    );
    alive(&mut ctls);
    let by_name = reconciles(&log);
    let victims_objects = by_name
        .values()
        .filter(|list| list.iter().any(|r| r.instance == victim_id))
        .count();
    let after_kill: u64 = killed_micros(killed);
    let taken_over = by_name
        .values()
        .filter(|list| list.iter().any(|r| r.instance == victim_id))
        .filter(|list| {
            list.iter()
                .any(|r| r.instance != victim_id && r.start >= after_kill)
        })
        .count();
    assert!(victims_objects > 0, "the victim reconciled nothing");
    assert_eq!(
        taken_over, victims_objects,
        "objects the victim had reconciled were not reconciled by a survivor after the kill"
    );
    let (count, handovers) = assert_no_overlap(&log);
    eprintln!("scale: {count} reconciles, {handovers} handovers in all, no overlap");
}

/// `at` as microseconds since the epoch (the reconcile log's clock).
fn killed_micros(at: Instant) -> u64 {
    let now = std::time::SystemTime::now();
    let then = now - at.elapsed();
    then.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The durable consumers on the events stream that belong to installation `instance`, with their
/// inactivity threshold.
async fn consumers(nats_url: &str, instance: &str) -> HashMap<String, Duration> {
    let client = async_nats::connect(nats_url).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
    let names: Vec<String> = stream
        .consumer_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    let mut out = HashMap::new();
    for name in names.into_iter().filter(|n| n.contains(instance)) {
        if let Ok(info) = stream.consumer_info(&name).await {
            out.insert(name, info.config.inactive_threshold);
        }
    }
    let _ = &mut stream;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_nothing_and_gone_instances_leave_nothing() {
    let p = prefix("natsrst");
    let _cleanup = Cleanup::new(&p);
    let mut nats = Nats::start();
    let api = Berth::start_api(nats.url());
    let logs = tempdir("natsrst-log");
    let log = logs.path().join("reconciles.jsonl");
    let env = [("BERTH_RECONCILE_LOG", log.to_str().unwrap())];
    let _net = api.start_controller("network");
    let mut ctls = start_service_instances(&api, "s", 2, &env).await;
    let before = consumers(&nats.url(), &api.instance).await;

    // A burst of applies with NATS going away in the middle of it.
    const COUNT: usize = 40;
    let all = services_yaml(&p, COUNT, 1);
    let docs: Vec<&str> = all.split("---\n").collect();
    for (i, chunk) in docs.chunks(10).enumerate() {
        apply(&api, &chunk.join("---\n"));
        if i == 1 {
            nats.restart(Duration::from_secs(2));
        }
    }
    let took = wait_converged(
        &api,
        &p,
        COUNT,
        "every Service applied around the NATS restart",
    )
    .await;
    eprintln!("natsrst: {COUNT} services converged {took:.1?} after the last apply");
    alive(&mut ctls);
    let (count, _) = assert_no_overlap(&log);
    eprintln!("natsrst: {count} reconciles, no overlap");

    // Every consumer the installation has is one a server removes once it is idle.
    let after = consumers(&nats.url(), &api.instance).await;
    assert!(!after.is_empty(), "no consumers found for {}", api.instance);
    for (name, idle) in &after {
        assert!(
            *idle > Duration::ZERO,
            "consumer {name} has no inactivity threshold: it would stay forever"
        );
    }
    assert_eq!(
        after.len(),
        before.len(),
        "consumers before {before:?}, after the restart {after:?}"
    );

    // Instances that stop and come back three times: the count stays flat, and the records of the
    // ones that left are gone.
    for round in 0..3 {
        let mut old = ctls.remove(0);
        assert!(
            old.terminate(),
            "a controller did not stop cleanly:\n{}",
            old.log_text()
        );
        ctls.push(api.start_controller_instance("service", &format!("r{round}"), &env));
        let pids: Vec<u32> = ctls.iter().map(|c| c.pid()).collect();
        wait_settled(&api, "Service", &pids).await;
    }
    let now = consumers(&nats.url(), &api.instance).await;
    assert_eq!(
        now.len(),
        before.len(),
        "consumers before {before:?}, after three restarts {now:?}"
    );
    alive(&mut ctls);
    let (count, handovers) = assert_no_overlap(&log);
    eprintln!(
        "natsrst: {count} reconciles, {handovers} handovers, no overlap after three restarts"
    );

    // `berth controllers`: one row per running instance, the ones that left gone.
    let table = api.cli_ok(&["controllers"]);
    eprintln!("{table}");
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("Service "))
        .collect();
    assert_eq!(rows.len(), ctls.len(), "{table}");
    for c in &ctls {
        assert!(
            rows.iter().any(|r| r.contains(&format!("/{} ", c.pid()))),
            "instance {} missing from\n{table}",
            c.pid()
        );
    }
}
