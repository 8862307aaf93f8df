//! The 3-node lab tests: one binary (`harness = false`) that brings the lab up once, runs every
//! scenario of `tests/tests/lab/<area>.rs` in turn against it, and takes it down again whatever
//! happened. Reports like libtest (`test basics::three_nodes_ready ... ok`), takes libtest's
//! arguments (a name filter, `--exact`, `--skip`, `--list`), exits non-zero when a scenario
//! fails.
//!
//! Why not one `#[test]` per scenario: libtest gives no hook around the whole run, so the lab
//! would come up per test (~6 s and a new set of node IDs each time) and tests would run in
//! parallel on shared nodes, one stopping a node under another.
//!
//! Cleanup: each scenario runs under `catch_unwind` (and removes its own Swarm objects with
//! guards); `scripts/lab down` runs after the last one even when some panicked. If this process
//! is killed, nothing here runs: scripts/test's sweep (scripts/lib/sweep.sh) takes a leftover lab
//! down before the next run.
//!
//! `BERTH_LAB_KEEP=1` leaves the lab up at the end, to look at a failure (engine logs are in
//! /var/lib/berth-lab/nN.log until `scripts/lab down`).

use berth_e2e::lab::{require_e2e, Lab, Scenario};
use libtest_mimic::{Arguments, Failed, Trial};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// The scenarios, one module per area.
mod lab {
    pub mod backup;
    pub mod basics;
    pub mod exec;
    pub mod ingress;
    pub mod node;
}

/// Every area's scenarios, in the order they run (basics first: they prove the lab itself; node
/// last: its last scenario promotes and demotes a manager, which Swarm may fail to complete and
/// leave the host's swarm to be recovered by `scripts/lab down`).
fn areas() -> Vec<(&'static str, Vec<Scenario>)> {
    vec![
        ("basics", lab::basics::scenarios()),
        ("ingress", lab::ingress::scenarios()),
        ("backup", lab::backup::scenarios()),
        ("exec", lab::exec::scenarios()),
        ("node", lab::node::scenarios()),
    ]
}

fn main() {
    let mut args = Arguments::from_args();
    // Scenarios share the nodes (one stops a node another counts on): never two at a time,
    // whatever --test-threads scripts/test passes to every test binary.
    args.test_threads = Some(1);

    // Set once the lab is up (or failed to come up), before the first scenario runs.
    let lab: Arc<OnceLock<Result<Lab, String>>> = Arc::new(OnceLock::new());
    let mut trials = Vec::new();
    for (area, scenarios) in areas() {
        for scenario in scenarios {
            let lab = Arc::clone(&lab);
            let name = format!("{area}::{}", scenario.name);
            trials.push(Trial::test(name, move || {
                let lab = match lab.get() {
                    Some(Ok(lab)) => lab,
                    Some(Err(e)) => return Err(Failed::from(e)),
                    None => return Err("the lab was never brought up".into()),
                };
                let start = Instant::now();
                let result = catch_unwind(AssertUnwindSafe(|| (scenario.run)(lab)));
                // libtest-mimic prints no per-test time; the suite has a 25-minute budget on 2
                // cores, so every scenario says what it costs.
                eprint!("({:.1}s) ", start.elapsed().as_secs_f64());
                match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("{e:#}").into()),
                    Err(panic) => Err(panic_message(&*panic).into()),
                }
            }));
        }
    }

    // Bring the lab up only when a scenario will run: `--list`, or a filter that selects none of
    // them (scripts/test passes its filter to every test binary), costs nothing.
    let selected = trials
        .iter()
        .filter(|t| !args.is_filtered_out(t) && !args.is_ignored(t))
        .count();
    // Whether `scripts/lab up` ran: then `down` must run too. Without BERTH_E2E=1 the machine is
    // not touched at all, and every selected scenario fails saying why.
    let mut up = false;
    if !args.list && selected > 0 {
        let result = require_e2e().and_then(|()| {
            up = true;
            Lab::up()
        });
        let _ = lab.set(result.map_err(|e| format!("{e:#}")));
    }

    let conclusion = libtest_mimic::run(&args, trials);

    if up && std::env::var("BERTH_LAB_KEEP").as_deref() == Ok("1") {
        eprintln!(
            "lab: BERTH_LAB_KEEP=1: leaving the lab up for a look (node logs in /var/lib/berth-lab/nN.log); \
             `scripts/lab down` removes it, and so does scripts/test's sweep"
        );
    } else if up {
        // Always, even when `up` failed half-way (a partial lab is still a lab).
        let down = match lab.get() {
            Some(Ok(lab)) => lab.down(),
            _ => Lab::down_anyway(),
        };
        if let Err(e) = down {
            eprintln!("{e:#}");
            eprintln!("lab: the lab could not be taken down; scripts/test's sweep (or `scripts/lab down`) will");
            std::process::exit(101);
        }
    }
    conclusion.exit();
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    format!("panicked: {text}")
}
