//! `scripts/demo` and `scripts/demo down`, run as a new user runs them, with the binary under test
//! (`BERTH_DEMO_BIN`) and free ports, so that the demo the README promises keeps working: the HTTPS
//! page through the Ingress with the Secret mounted, the 308, the webhook deploy followed by
//! `rollout status`, the events, the drift repair; then `down` leaves no process, Swarm object or
//! file of the demo's installation behind.
//!
//! The demo's objects have fixed names (`demo-web`, ...: they are the fixtures a user applies), so
//! this is the one e2e test whose Swarm names carry no test prefix; its data directory is an e2e
//! temp dir, so scripts/test's sweep runs `scripts/demo down` for it after a killed run.

use berth_e2e::{berth_bin, free_port, owned, tempdir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

struct Demo {
    dir: PathBuf,
    ports: [(&'static str, u16); 5],
}

impl Demo {
    fn run(&self, arg: &str) -> Output {
        let mut cmd = Command::new(repo_root().join("scripts/demo"));
        cmd.arg(arg)
            .env("BERTH_DEMO_DIR", &self.dir)
            .env("BERTH_DEMO_BIN", berth_bin());
        for (var, port) in self.ports {
            cmd.env(var, port.to_string());
        }
        // The detached nats-server and berth inherit the owner mark: a killed test's are stopped.
        owned(&mut cmd)
            .output()
            .expect("e2e: cannot run scripts/demo")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.dir.exists() {
            let out = self.run("down");
            if !out.status.success() {
                eprintln!(
                    "demo down failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

fn docker_ls(what: &str, instance: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([what, "ls", "--format", "{{.Name}}", "--filter"])
        .arg(format!("label=io.berth.instance={instance}"))
        .output()
        .expect("e2e: docker");
    assert!(out.status.success(), "docker {what} ls failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Whether process `pid` runs: a zombie (stopped, not yet reaped by whoever adopted it) does not.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses and may hold spaces.
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

fn pid_alive(path: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    running(pid).then_some(pid)
}

#[test]
fn the_demo_shows_https_a_webhook_deploy_and_drift_repair_and_down_removes_it_all() {
    let tmp = tempdir("demo");
    let https = free_port();
    let demo = Demo {
        dir: tmp.path().join("data"),
        ports: [
            ("BERTH_DEMO_API_PORT", free_port()),
            ("BERTH_DEMO_NATS_PORT", free_port()),
            ("BERTH_DEMO_HTTPS_PORT", https),
            ("BERTH_DEMO_HTTP_PORT", free_port()),
            ("BERTH_DEMO_ADMIN_PORT", free_port()),
        ],
    };

    let out = demo.run("up");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scripts/demo failed:\n{text}");
    for expected in [
        // The page, over HTTPS through the Ingress, trusting only the Ingress's CA.
        "hello from berth, served over HTTPS by two Swarm tasks",
        "version:  1",
        "secret:   /run/secrets/api_key is mounted (",
        // Plain HTTP answers only with a redirect.
        &format!("308 -> https://demo.localhost:{https}/cart?id=7"),
        // The webhook deploy, followed to its end, and the new version served.
        "\"image\":\"berth-demo/web:2\"",
        "successfully rolled out: revision 2 (berth-demo/web:2)",
        "version:  2",
        // The service removed by hand coming back.
        "berth put service demo-worker back (new Swarm id)",
        "service/demo-worker condition met: Ready=True",
        "first HTTPS response",
        "Stop and remove everything: scripts/demo down",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // `berth events service demo-web` shows the webhook deploy's change of the spec.
    assert!(
        text.lines()
            .any(|l| l.contains("Applied") && l.contains("service/demo-web")),
        "no Applied event for service/demo-web in:\n{text}"
    );
    // The webhook URL is a credential: in a 0600 file, never on the screen.
    let url = std::fs::read_to_string(demo.dir.join("webhook.url")).expect("webhook.url");
    assert!(url.contains("/hooks/v1/"), "{url}");
    assert!(!text.contains(url.trim()), "the webhook URL was printed");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(demo.dir.join("webhook.url"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "webhook.url is readable by others");

    let instance = std::fs::read_to_string(demo.dir.join("instance"))
        .expect("the demo records its installation")
        .trim()
        .to_string();
    assert!(!instance.is_empty());
    // The dashboard it points to answers with its sign-in form.
    let dashboard = text
        .split("The dashboard: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no dashboard URL in:\n{text}"))
        .to_string();
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(demo.dir.join("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let page = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(client.get(&dashboard).send())
        .unwrap();
    assert_eq!(page.status(), 200, "{dashboard}");
    assert!(page.url().path().ends_with("/ui/login"), "{}", page.url());

    let berth = pid_alive(&demo.dir.join("berth.pid")).expect("berth runs after the demo");
    let nats = pid_alive(&demo.dir.join("nats.pid")).expect("nats-server runs after the demo");
    assert!(!docker_ls("service", &instance).is_empty());

    let out = demo.run("down");
    assert!(
        out.status.success(),
        "scripts/demo down failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for what in ["service", "secret", "config", "network", "volume"] {
        let left = docker_ls(what, &instance);
        assert!(left.is_empty(), "demo down left {what}s: {left:?}");
    }
    for pid in [berth, nats] {
        assert!(!running(pid), "process {pid} still runs after demo down");
    }
    assert!(!demo.dir.exists(), "demo down left {}", demo.dir.display());
}
