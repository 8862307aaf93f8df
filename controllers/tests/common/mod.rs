//! What the controllers' engine tests share: the engine they run against (failing, never skipping,
//! when it is missing), a name prefix and installation id per test, and a guard that removes what
//! a test made even when it fails.

// Each engine test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use bollard::models::{
    ServiceCreateResponse, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec,
    TaskSpecContainerSpec,
};
use bollard::Docker;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// The local engine, which must be in Swarm mode.
pub async fn swarm_engine() -> Docker {
    let docker = berth_controllers::swarm::engine::connect(None)
        .await
        .expect("cannot connect to the Docker engine (is dockerd running? scripts/test starts it)");
    let info = docker.info().await.expect("docker info");
    let swarm = info
        .swarm
        .and_then(|s| s.local_node_state)
        .map(|s| s.to_string())
        .unwrap_or_default();
    assert_eq!(swarm, "active", "the engine is not in Swarm mode");
    docker
}

/// `(prefix, installation id)` for one test: `<kind>test-<10 ULID chars>` (the shape
/// `scripts/lib/sweep.sh` removes after killed runs) and `test-<ULID>`.
pub fn test_names(kind: &str) -> (String, String) {
    let id = ulid::Ulid::new().to_string().to_lowercase();
    (
        format!("{kind}test-{}", &id[id.len() - 10..]),
        format!("test-{id}"),
    )
}

/// Removes every service, secret, config, network and volume whose name starts with the prefix,
/// when the test ends (services first: they hold the rest).
pub struct Cleanup(pub String);

impl Cleanup {
    fn list(&self, what: &str) -> Vec<String> {
        let out = Command::new("docker")
            .args([what, "ls", "--format", "{{.Name}}"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        out.lines()
            .filter(|n| n.starts_with(&self.0))
            .map(str::to_string)
            .collect()
    }

    fn remove(&self, what: &str, names: &[String]) {
        for n in names {
            let _ = Command::new("docker").args([what, "rm", n]).output();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.remove("service", &self.list("service"));
        // A removed service's tasks hold networks and volumes for a few seconds.
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let mut left = Vec::new();
            for what in ["secret", "config", "network", "volume"] {
                let names = self.list(what);
                self.remove(what, &names);
                left.extend(self.list(what).into_iter().map(|n| format!("{what} {n}")));
            }
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("cleanup: left behind: {left:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// A Swarm service made by hand (not by the controller under test), with `labels`, no replicas:
/// what a name berth must refuse looks like.
pub async fn service_by_hand(
    docker: &Docker,
    name: &str,
    labels: HashMap<String, String>,
) -> ServiceCreateResponse {
    docker
        .create_service(
            ServiceSpec {
                name: Some(name.to_string()),
                labels: Some(labels),
                mode: Some(ServiceSpecMode {
                    replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
                    ..Default::default()
                }),
                task_template: Some(TaskSpec {
                    container_spec: Some(TaskSpecContainerSpec {
                        image: Some("berth-test/busybox:1".into()),
                        args: Some(vec!["sleep".into(), "600".into()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            None,
        )
        .await
        .expect("create a service by hand")
}
