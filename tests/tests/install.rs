//! The install path on an existing swarm: berth's own image (scripts/image; scripts/test builds it
//! from the binary under test as `berth-test/berth:1`) deployed with the stack file users deploy,
//! `contrib/swarm/berth.yml`, unchanged but for its variables. berth then runs as a Swarm service:
//! it answers HTTPS from its own CA, and the CLI on the host, holding only the CA and the admin
//! token from the data volume, applies a Service that berth (in its container, through the
//! mounted engine socket) creates in the swarm.

use berth_e2e::{berth_bin, free_port, prefix, sleeping_service, wait_for, Cleanup};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const IMAGE: &str = "berth-test/berth:1";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// The host path of a volume's data (the test runs as root on the engine's host).
fn volume_dir(name: &str) -> Option<PathBuf> {
    let out = Command::new("docker")
        .args(["volume", "inspect", "--format", "{{.Mountpoint}}", name])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[tokio::test]
async fn the_stack_runs_berth_from_its_image_and_it_manages_the_swarm() {
    let p = prefix("install");
    // Removes the stack's service and volumes (named `<p>_...`) and what berth made (`<p>-...`).
    let _cleanup = Cleanup::new(&p);
    let port = free_port();
    let deploy = Command::new("docker")
        .args(["stack", "deploy", "-c"])
        .arg(repo_root().join("contrib/swarm/berth.yml"))
        .arg(&p)
        .env("BERTH_IMAGE", IMAGE)
        .env("BERTH_PORT", port.to_string())
        .env("BERTH_DEFAULT_NETWORK", format!("{p}-net"))
        .env("BERTH_NO_DEFAULT_BACKUP_PLAN", "1")
        .output()
        .expect("docker stack deploy");
    assert!(
        deploy.status.success(),
        "docker stack deploy: {}",
        String::from_utf8_lossy(&deploy.stderr)
    );

    // The data volume holds the CA and the admin token once berth has started.
    let data = wait_for(
        Duration::from_secs(60),
        "berth's CA and token in its data volume",
        || async {
            let dir = volume_dir(&format!("{p}_data"))?;
            (dir.join("ca.pem").exists() && dir.join("admin.token").exists()).then_some(dir)
        },
    )
    .await;
    let url = format!("https://127.0.0.1:{port}");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(data.join("ca.pem")).unwrap()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "berth in its container to answer /readyz over HTTPS (store, engine)",
        || {
            let https = https.clone();
            let url = url.clone();
            async move {
                let r = https.get(format!("{url}/readyz")).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        },
    )
    .await;

    // The CLI on the host: the CA and the token file, nothing else.
    let cli = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new(berth_bin())
            // Connection options belong to each subcommand: after its own arguments.
            .args(args)
            .args(["--url", &url])
            .arg("--ca")
            .arg(data.join("ca.pem"))
            .arg("--token-file")
            .arg(data.join("admin.token"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("berth");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let manifest = sleeping_service(&format!("{p}-web"), "");
    let (ok, out) = cli(
        &["apply", "-f", "-", "--wait", "--timeout", "90s"],
        Some(&manifest),
    );
    assert!(
        ok,
        "berth apply --wait through the containerised berth: {out}"
    );
    // The Swarm service exists with berth's labels: the berth in the container made it.
    let labels = Command::new("docker")
        .args([
            "service",
            "inspect",
            "--format",
            "{{json .Spec.Labels}}",
            &format!("{p}-web"),
        ])
        .output()
        .unwrap();
    let labels = String::from_utf8_lossy(&labels.stdout);
    assert!(
        labels.contains("\"io.berth.managed-by\""),
        "the Swarm service is not berth's: {labels}"
    );
    let (ok, out) = cli(&["get", "services", &format!("{p}-web")], None);
    assert!(ok && out.contains("Ready"), "{out}");
}
