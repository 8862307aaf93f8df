//! berth split into processes, the way controllers are scaled on their own: `berth api --nats` and
//! `berth controller service --nats --url --token`, talking only through the API and NATS.

use berth_api_types::names::paths;
use berth_api_types::Kind;
use berth_e2e::{docker, manifest, prefix, swarm_replicas, wait_for, Berth, Cleanup, Nats};
use std::time::Duration;

fn service_yaml(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: berth-test/busybox:1\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: {replicas}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_controller_as_separate_processes() {
    let p = prefix("split");
    let _cleanup = Cleanup::new(&p);
    let nats = Nats::start();
    let api = Berth::start_api(nats.url());
    let d = docker().await;
    let name = format!("{p}-web");

    // Applied while no controller runs: the durable consumer and the first resync pick it up.
    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, 1));
    api.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        swarm_replicas(&d, &name).await,
        None,
        "the API server alone must not touch Swarm"
    );

    // Services join the default network, which the network controller creates.
    let mut net = api.start_controller("network");
    let mut ctl = api.start_controller("service");
    wait_for(
        Duration::from_secs(30),
        "the controller to create the service",
        || async { (swarm_replicas(&d, &name).await == Some(1)).then_some(()) },
    )
    .await;

    // A change reaches the separate controller through NATS and comes back as status via the API.
    let (_dir2, file2) = manifest("svc.yaml", &service_yaml(&name, 2));
    api.cli_ok(&["apply", "-f", file2.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(30),
        "the update to reach Swarm",
        || async { (swarm_replicas(&d, &name).await == Some(2)).then_some(()) },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "status written through the API",
        || async {
            let (_, obj) = api.api_get(&paths::object(Kind::Service, &name)).await;
            let ready = obj["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (ready && obj["status"]["observedGeneration"] == 2).then_some(())
        },
    )
    .await;
    assert!(ctl.is_running(), "controller exited:\n{}", ctl.log_text());
    assert!(
        net.is_running(),
        "network controller exited:\n{}",
        net.log_text()
    );

    api.cli_ok(&["delete", "service", &name]);
    wait_for(
        Duration::from_secs(30),
        "the Swarm service to be removed",
        || async { swarm_replicas(&d, &name).await.is_none().then_some(()) },
    )
    .await;
}
