//! The end-to-end harness: real processes against the real Swarm engine. It starts `berth up` (the
//! binary under test) and `nats-server` on free ports with their own data directories, runs CLI
//! commands, and cleans up every Swarm object a test created even when the test fails. A missing
//! engine, binary or nats-server is a loud failure, never a skip.

pub mod containers;
pub mod deploy;
pub mod lab;
pub mod registry;
pub mod sshd;

use berth_api_types::names::paths;
use berth_api_types::Kind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use bollard::Docker;

/// The `berth` binary under test: `BERTH_BIN`, or the workspace's debug build.
pub fn berth_bin() -> PathBuf {
    let path = std::env::var_os("BERTH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/berth"));
    assert!(
        path.exists(),
        "e2e: the berth binary is missing at {} (run `cargo build --bins` or scripts/test; set BERTH_BIN)",
        path.display()
    );
    path
}

/// One HTTP client for the whole test process: building one loads the system's root certificates,
/// which costs more than the requests a test makes with it.
pub fn http() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new).clone()
}

/// A free TCP port on loopback, for a server a test starts.
///
/// Picked at random below the kernel's ephemeral range (32768-60999 on Linux), not by binding port
/// 0: tests run in several processes at once (scripts/test, nextest), and a port the kernel just
/// handed out and this process let go is the next one it hands to another process's outgoing
/// connection or `bind(0)`, so two tests' servers could end up on one port (seen: a client reaching
/// another test's berth, whose certificate it did not trust). Random picks from 12,000 ports
/// rarely meet, and each is checked free.
pub fn free_port() -> u16 {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    for _ in 0..1_000 {
        let r = ulid::Ulid::new().random() as u64;
        let port = LOW + (r % u64::from(HIGH - LOW)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("e2e: cannot find a free port between {LOW} and {HIGH}")
}

/// A temporary directory named `/tmp/berth-e2e-<what>-XXXXXX`, removed on drop; the name lets
/// scripts/test sweep the ones a killed run left behind.
pub fn tempdir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("berth-e2e-{what}-"))
        .tempdir()
        .expect("e2e: cannot create a temporary directory")
}

/// Marks a process the harness starts (berth, nats-server, docker-registry) with the test process's
/// id, `BERTH_E2E_OWNER=<pid>`: scripts/test stops the ones whose owner is gone (a killed run).
pub fn owned(cmd: &mut Command) -> &mut Command {
    cmd.env("BERTH_E2E_OWNER", std::process::id().to_string())
}

/// A per-test name prefix, unique per run, so tests sharing one Swarm never collide. Every Swarm
/// object a test creates, itself or through berth, is named after it (`e2e-<test>-<5 chars>`):
/// scripts/test recognises what a killed run left by this pattern.
pub fn prefix(test: &str) -> String {
    let rand = ulid::Ulid::new().to_string().to_lowercase();
    format!("e2e-{test}-{}", &rand[rand.len() - 5..])
}

/// Connects to the local engine; fails loudly when there is none.
pub async fn docker() -> Docker {
    let d = Docker::connect_with_local_defaults().expect(
        "e2e: cannot connect to the Docker engine (is dockerd running? scripts/test starts it)",
    );
    let d = d.negotiate_version().await.expect(
        "e2e: the Docker engine does not answer (is dockerd running? scripts/test starts it)",
    );
    let info = d.info().await.expect("e2e: docker info failed");
    let state = info
        .swarm
        .and_then(|s| s.local_node_state)
        .map(|s| s.to_string())
        .unwrap_or_default();
    assert_eq!(
        state, "active",
        "e2e: the engine is not in Swarm mode (scripts/test initialises it)"
    );
    d
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("e2e: timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A nats-server with JetStream on a free port, killed on drop.
pub struct Nats {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Nats {
        let port = free_port();
        let dir = tempdir("nats");
        let child = Self::spawn(port, dir.path());
        let nats = Nats {
            child,
            port,
            _dir: dir,
        };
        wait_port(port, Duration::from_secs(10), "nats-server");
        nats
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Child {
        owned(&mut Command::new("nats-server"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("e2e: cannot start nats-server (is it installed? scripts/test installs it)")
    }

    /// Stops the server (SIGTERM, so JetStream syncs its files as an operator's restart would),
    /// waits `down`, and starts it again on the same port and store.
    pub fn restart(&mut self, down: Duration) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Self::spawn(self.port, self._dir.path());
        wait_port(self.port, Duration::from_secs(10), "nats-server");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three nats-servers on loopback forming one JetStream cluster (what three berth managers share):
/// each with its own store, client, route and monitoring port. Killed, with their stores, on drop.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
}

struct ClusterNode {
    child: Option<Child>,
    port: u16,
    monitor: u16,
    config: PathBuf,
}

impl NatsCluster {
    /// The size of the cluster: the smallest that keeps a JetStream quorum (2) with one server down.
    pub const SIZE: usize = 3;

    /// Starts the three servers and waits until their routes are up and JetStream has a meta leader
    /// all three agree on (until then a stream with 3 replicas cannot be created).
    pub fn start() -> NatsCluster {
        let dir = tempdir("nats-cluster");
        let ports: Vec<(u16, u16, u16)> = (0..Self::SIZE)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, route, monitor)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&store).expect("e2e: cannot create a nats store directory");
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r, _))| format!("\"nats-route://127.0.0.1:{r}\""))
                .collect();
            // server_name must be unique: JetStream's Raft groups name their peers by it.
            let config = format!(
                "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n}}\n\
                 cluster {{\n  name: \"berth-e2e\"\n  listen: \"127.0.0.1:{route}\"\n  routes: [{}]\n}}\n",
                store.display(),
                routes.join(", ")
            );
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, config).expect("e2e: cannot write a nats-server config");
            nodes.push(ClusterNode {
                child: None,
                port: *port,
                monitor: *monitor,
                config: path,
            });
        }
        let mut cluster = NatsCluster { nodes, _dir: dir };
        for i in 0..Self::SIZE {
            cluster.spawn(i);
        }
        cluster.wait_formed(Duration::from_secs(30));
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(
            node.child.is_none(),
            "e2e: nats-server n{i} is already running"
        );
        node.child = Some(
            owned(&mut Command::new("nats-server"))
                .arg("-c")
                .arg(&node.config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect(
                    "e2e: cannot start nats-server (is it installed? scripts/test installs it)",
                ),
        );
        wait_port(node.port, Duration::from_secs(10), "nats-server");
    }

    /// Waits until every running server has routes to the other running ones and names the same
    /// JetStream meta leader, itself running (after the leader stopped, the others keep naming it
    /// until they have elected another: JetStream API requests time out meanwhile).
    pub fn wait_formed(&self, timeout: Duration) {
        let start = Instant::now();
        let running: Vec<&ClusterNode> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
        let names: Vec<String> = (0..Self::SIZE)
            .filter(|i| self.nodes[*i].child.is_some())
            .map(Self::name)
            .collect();
        loop {
            let leaders: Vec<Option<String>> = running
                .iter()
                .map(|n| {
                    let routes = monitor_json(n.monitor, "/routez")?["num_routes"].as_u64()?;
                    let jsz = monitor_json(n.monitor, "/jsz")?;
                    let leader = jsz["meta_cluster"]["leader"].as_str()?.to_string();
                    (routes as usize + 1 >= running.len() && !leader.is_empty()).then_some(leader)
                })
                .collect();
            if leaders
                .iter()
                .all(|l| l.as_ref().is_some_and(|l| names.contains(l)))
                && leaders.windows(2).all(|w| w[0] == w[1])
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "e2e: the NATS cluster did not form within {timeout:?} (meta leaders seen: {leaders:?})"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every server's client URL, comma-separated (as berth's --nats takes them).
    pub fn urls(&self) -> String {
        (0..Self::SIZE)
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The server's `server_name` (what `server_info` and JetStream's cluster info report).
    pub fn name(i: usize) -> String {
        format!("n{i}")
    }

    /// Stops server `i` as an operator would (SIGTERM: it syncs its store and leaves the cluster
    /// cleanly) and waits until it has exited.
    pub fn stop(&mut self, i: usize) {
        self.signal(i, libc::SIGTERM);
    }

    /// Kills server `i` (SIGKILL: a crash, nothing synced) and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.signal(i, libc::SIGKILL);
    }

    fn signal(&mut self, i: usize, signal: i32) {
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("e2e: nats-server n{i} is not running"));
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let _ = child.wait();
    }

    /// Starts server `i` again with its store and ports, and waits until it has rejoined.
    pub fn start_node(&mut self, i: usize) {
        self.spawn(i);
        self.wait_formed(Duration::from_secs(30));
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A nats-server monitoring endpoint's JSON, or `None` while it does not answer.
fn monitor_json(port: u16, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    let (_, body) = answer.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

fn wait_port(port: u16, timeout: Duration, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < timeout,
            "e2e: {what} did not open port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Output of one CLI run.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Exit code, stdout and stderr, for an assertion's message.
    pub fn show(&self) -> String {
        format!(
            "code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Berth {
    /// `berth exec SERVICE -it -- sh` under `script` (util-linux), which gives the CLI a pty as a
    /// person's terminal would: types each line of `input` after waiting its pause, and returns
    /// the shell's exit code and what the terminal showed once it ends (panics after `timeout`).
    pub fn interactive_shell(
        &self,
        service: &str,
        input: &[(&str, Duration)],
        timeout: Duration,
    ) -> (Option<i32>, String) {
        use std::io::Write;
        let line = format!(
            "{} exec {service} -it -- sh",
            berth_bin().to_str().expect("utf-8 path")
        );
        let mut cmd = Command::new("script");
        if self.tls {
            cmd.env("BERTH_CA", self.ca_file());
        }
        let mut script = cmd
            .args(["-qec", &line, "/dev/null"])
            .env("BERTH_URL", self.client_urls())
            .env("BERTH_TOKEN", &self.token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("e2e: cannot run script (util-linux)");
        {
            let mut stdin = script.stdin.take().expect("stdin");
            for (text, pause) in input {
                stdin
                    .write_all(text.as_bytes())
                    .expect("typing into the shell");
                std::thread::sleep(*pause);
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(script.wait_with_output());
        });
        let done = rx
            .recv_timeout(timeout)
            .expect("the interactive exec did not end")
            .expect("script output");
        (
            done.status.code(),
            String::from_utf8_lossy(&done.stdout).into_owned(),
        )
    }
}

/// The small image (busybox from Debian) most test Services run; prereqs.sh builds it.
pub const BUSYBOX: &str = "berth-test/busybox:1";

/// A Service of one replica of [`BUSYBOX`] that sleeps and stops fast (`init`, 1 s grace), the
/// workload most tests need; `extra` is more `spec` lines, each indented two spaces
/// (`"  networks: [n]\n"`).
pub fn sleeping_service(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {BUSYBOX}\n  \
         command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: 1\n{extra}"
    )
}

/// The image of berth's agents, built from the berth binary under test by scripts/test.
pub const AGENT_IMAGE: &str = "berth-test/agent:1";

/// A `berth up` process with its own data directory and port.
pub struct Berth {
    child: Option<Child>,
    pub data_dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub port: u16,
    pub nats: Option<String>,
    pub token: String,
    /// A `controller` token for the controllers started as their own processes (made at first use).
    controller_token: std::sync::OnceLock<String>,
    log: PathBuf,
    extra: Vec<String>,
    /// `up` (everything in one process) or `api` (the API server alone).
    subcommand: &'static str,
    /// This berth's default network: unique, because tests share one Swarm.
    pub default_network: String,
    /// The installation id, read from the API once it is up; its labels find what it created.
    pub instance: String,
    /// Extra environment of the process (see `start_env`).
    env: Vec<(String, String)>,
    /// Started with `--tls internal` (see `start_tls`): clients use https and trust `ca_file()`.
    tls: bool,
    /// The client the harness's own API requests use (trusts the internal CA when `tls`).
    client: reqwest::Client,
    /// Other API servers of the same store (`--store nats`): CLI runs and controllers get
    /// `--url <this>,<peers...>` and fail over to them.
    pub peers: Vec<String>,
}

impl Berth {
    /// Starts `berth up` (embedded bus when `nats` is None) and waits until the API answers.
    pub fn start(nats: Option<String>) -> Berth {
        Self::start_with(nats, &[])
    }

    pub fn start_with(nats: Option<String>, extra: &[&str]) -> Berth {
        Self::launch("up", nats, extra)
    }

    /// Starts `berth api` alone: controllers run as their own processes (see `start_controller`).
    pub fn start_api(nats: String) -> Berth {
        Self::launch("api", Some(nats), &[])
    }

    /// Starts `berth api` with extra arguments, on NATS when `nats` is given (e.g. `--store nats`).
    pub fn start_api_with(nats: Option<String>, extra: &[&str]) -> Berth {
        Self::launch("api", nats, extra)
    }

    /// Starts `berth api` on an existing data directory (e.g. after `admin migrate-store`), with
    /// the default network the installation had.
    pub fn start_api_on(
        data_dir: &std::path::Path,
        default_network: &str,
        nats: Option<String>,
        extra: &[&str],
    ) -> Berth {
        let mut b = Self::prepare("api", nats, extra);
        b.data_dir = data_dir.to_path_buf();
        b.default_network = default_network.to_string();
        b.spawn();
        b
    }

    /// Starts `berth up` with extra arguments and environment (e.g. `BERTH_NO_DEFAULT_BACKUP_PLAN=0`
    /// for the one test of the default backup plan).
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Berth {
        let mut b = Self::prepare("up", None, extra);
        b.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        b.spawn();
        b
    }

    /// Starts `berth up` on an existing data directory (a restored one), with the default
    /// network the installation had.
    pub fn start_on(data_dir: &std::path::Path, default_network: &str, extra: &[&str]) -> Berth {
        let mut b = Self::prepare("up", None, extra);
        b.data_dir = data_dir.to_path_buf();
        b.default_network = default_network.to_string();
        b.spawn();
        b
    }

    /// One more API server of this installation, on its NATS store (`--store nats`): started
    /// with a copy of this one's master key and admin token, as an operator hands them to each
    /// manager. Same subcommand, NATS servers and arguments; its own port and data directory.
    pub fn start_replica(&self) -> Berth {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let mut b = Self::prepare(self.subcommand, self.nats.clone(), &extra);
        b.default_network = self.default_network.clone();
        std::fs::create_dir_all(&b.data_dir).expect("e2e: data dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&b.data_dir, std::fs::Permissions::from_mode(0o700))
            .expect("e2e: data dir mode");
        for file in ["master.key", "admin.token"] {
            let to = b.data_dir.join(file);
            std::fs::copy(self.data_dir.join(file), &to)
                .unwrap_or_else(|e| panic!("e2e: copying {file} to a replica: {e}"));
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .expect("e2e: key file mode");
        }
        b.spawn();
        b
    }

    fn launch(subcommand: &'static str, nats: Option<String>, extra: &[&str]) -> Berth {
        let mut b = Self::prepare(subcommand, nats, extra);
        b.spawn();
        b
    }

    /// Starts `berth <subcommand> --tls internal` (`up`, or `api` for split controllers): the
    /// harness then talks https, its CLI runs and controllers get `--ca <data-dir>/ca.pem`.
    pub fn start_tls(subcommand: &'static str, nats: Option<String>, extra: &[&str]) -> Berth {
        Self::start_tls_env(subcommand, nats, extra, &[])
    }

    /// [`Berth::start_tls`] with extra environment for the server.
    pub fn start_tls_env(
        subcommand: &'static str,
        nats: Option<String>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Berth {
        let mut b = Self::prepare(subcommand, nats, extra);
        b.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        b.tls = true;
        b.extra
            .splice(0..0, ["--tls".to_string(), "internal".to_string()]);
        b.spawn();
        b
    }

    /// The internal CA's certificate clients trust (written by `berth --tls internal`).
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    fn prepare(subcommand: &'static str, nats: Option<String>, extra: &[&str]) -> Berth {
        let tmp = tempdir("berth");
        let data_dir = tmp.path().join("data");
        Berth {
            child: None,
            log: tmp.path().join("berth.log"),
            data_dir,
            _tmp: tmp,
            port: free_port(),
            nats,
            token: String::new(),
            controller_token: std::sync::OnceLock::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            subcommand,
            default_network: prefix("net"),
            instance: String::new(),
            env: Vec::new(),
            tls: false,
            client: http(),
            peers: Vec::new(),
        }
    }

    /// `--url` for clients of this server: this one first, then its peers.
    pub fn client_urls(&self) -> String {
        std::iter::once(self.url())
            .chain(self.peers.iter().cloned())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where this berth's default backup repositories go (`--backup-dir`): its own temporary
    /// directory, never the machine's.
    pub fn backup_dir(&self) -> PathBuf {
        self._tmp.path().join("backups")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(berth_bin());
        owned(&mut cmd)
            .arg(self.subcommand)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--default-network")
            .arg(&self.default_network)
            .args(&self.extra)
            // Debug logs explain a failing test; a benchmark sets BERTH_E2E_LOG=info so that writing
            // them is not what it measures.
            .env(
                "BERTH_LOG",
                std::env::var("BERTH_E2E_LOG")
                    .unwrap_or_else(|_| "info,berth=debug,berth_controllers=debug".into()),
            )
            // Tests share one engine: no plan runs on its own schedule unless a test asks for it
            // (a scheduled run in the middle of another test would start agent tasks there).
            .env("BERTH_NO_DEFAULT_BACKUP_PLAN", "1")
            .env("BERTH_BACKUP_DIR", self._tmp.path().join("backups"))
            .env("BERTH_AGENT_IMAGE", AGENT_IMAGE)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(n) = &self.nats {
            cmd.arg("--nats").arg(n);
        }
        self.child = Some(cmd.spawn().expect("e2e: cannot start berth up"));
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "e2e: berth {} exited with {status}:\n{}",
                        self.subcommand,
                        self.log_text()
                    );
                }
            }
            let healthy = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            let token =
                std::fs::read_to_string(self.data_dir.join("admin.token")).unwrap_or_default();
            if healthy && !token.trim().is_empty() {
                self.token = token.trim().to_string();
                if self.tls {
                    let Ok(pem) = std::fs::read(self.ca_file()) else {
                        continue;
                    };
                    let ca = reqwest::Certificate::from_pem(&pem).expect("e2e: ca.pem is PEM");
                    self.client = reqwest::Client::builder()
                        .add_root_certificate(ca)
                        .build()
                        .expect("e2e: an https client");
                }
                let info = self.cli(&["info", "-o", "json"]);
                if info.success {
                    let v: serde_json::Value =
                        serde_json::from_str(&info.stdout).expect("berth info -o json");
                    self.instance = v["instance"].as_str().unwrap_or_default().to_string();
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "e2e: berth up did not start listening:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The HTTP client that reaches this berth (trusting its CA when it serves TLS).
    pub fn client(&self) -> reqwest::Client {
        self.client.clone()
    }

    /// Starts `berth controller KIND` as its own process against this API server and its NATS.
    pub fn start_controller(&self, kind: &str) -> ControllerProcess {
        self.start_controller_instance(kind, "", &[])
    }

    /// Starts one more instance of `berth controller KIND` (its own state directory and log,
    /// `controller-KIND-ID`), with extra environment.
    pub fn start_controller_instance(
        &self,
        kind: &str,
        id: &str,
        env: &[(&str, &str)],
    ) -> ControllerProcess {
        let nats = self
            .nats
            .clone()
            .expect("e2e: a separate controller needs the API server to run with NATS");
        let name = if id.is_empty() {
            format!("controller-{kind}")
        } else {
            format!("controller-{kind}-{id}")
        };
        let state = self._tmp.path().join(&name);
        let log = self._tmp.path().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = Command::new(berth_bin());
        let child = owned(&mut cmd)
            .envs(env.iter().copied())
            .args([
                "controller",
                kind,
                "--nats",
                &nats,
                "--url",
                &self.client_urls(),
                "--token",
                self.controller_token(),
            ])
            .arg("--state-dir")
            .arg(&state)
            .args(
                self.tls
                    .then(|| ["--ca".into(), self.ca_file().into_os_string()])
                    .into_iter()
                    .flatten(),
            )
            .env("BERTH_LOG", "info,berth_controllers=debug")
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("e2e: cannot start berth controller");
        ControllerProcess { child, log }
    }

    /// The `controller` token split controllers run with (they refuse the admin token).
    pub fn controller_token(&self) -> &str {
        self.controller_token.get_or_init(|| {
            let out = self.cli(&[
                "token",
                "create",
                "--role",
                "controller",
                "--description",
                "e2e controllers",
            ]);
            assert!(
                out.success,
                "e2e: cannot make a controller token: {}",
                out.stderr
            );
            out.stdout.trim().to_string()
        })
    }

    /// Everything `berth up` logged so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a client command (`apply -f x`, `get services -o json`, ...) against this server.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_in(args, None)
    }

    /// Same, with standard input.
    pub fn cli_in(&self, args: &[&str], stdin: Option<&str>) -> CliOutput {
        self.cli_as(&self.token, args, stdin)
    }

    /// A client command run with another token (a role's), with optional standard input.
    pub fn cli_as(&self, token: &str, args: &[&str], stdin: Option<&str>) -> CliOutput {
        use std::io::Write;
        let mut cmd = Command::new(berth_bin());
        if self.tls {
            cmd.env("BERTH_CA", self.ca_file());
        }
        let mut child = cmd
            .args(args)
            .env("BERTH_URL", self.client_urls())
            .env("BERTH_TOKEN", token)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("e2e: cannot run berth");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        let out = child.wait_with_output().expect("berth output");
        CliOutput {
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Like `cli`, but panics (with the server log) unless the command succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.success,
            "e2e: `berth {}` failed: {}\n{}\n--- berth up log ---\n{}",
            args.join(" "),
            out.stderr,
            out.stdout,
            self.log_text()
        );
        out.stdout
    }

    /// GET an API path with the admin token; returns (status, JSON body).
    pub async fn api_get(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("API request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POST a JSON body to an API path with the admin token; returns (status, JSON body).
    pub async fn api_post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.url()))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("API request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Any API request with the admin token; returns (status, the body exactly as sent), for tests
    /// that check what a response does or does not contain.
    pub async fn api_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, String) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("HTTP method");
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url()))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.expect("API request");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// DELETE an API path with the admin token; returns (status, JSON body).
    pub async fn api_delete(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, text) = self.api_raw("DELETE", path, None).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `berth apply -f` of one manifest text (one or more YAML documents); returns what it printed.
    pub fn apply(&self, text: &str) -> String {
        let (_dir, file) = manifest("m.yaml", text);
        self.cli_ok(&["apply", "-f", file.to_str().expect("utf-8 path")])
    }

    /// The object as the API returns it, or `None` when it does not exist.
    pub async fn object(&self, kind: Kind, name: &str) -> Option<serde_json::Value> {
        let (code, body) = self.api_get(&paths::object(kind, name)).await;
        match code {
            200 => Some(body),
            404 => None,
            _ => panic!("e2e: GET {kind}/{name} answered {code}: {body}"),
        }
    }

    /// Waits until the object's condition `type_` satisfies `ok` (given the condition, never
    /// missing) for the object's current generation; returns the object.
    pub async fn wait_condition(
        &self,
        kind: Kind,
        name: &str,
        type_: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let what = format!("{}/{name}: condition {type_}", kind.lower());
        let ok = &ok;
        eventually(self, timeout, &what, || async move {
            let o = self.object(kind, name).await.ok_or("object not found")?;
            let current = o["status"]["observedGeneration"] == o["metadata"]["generation"];
            match condition(&o, type_) {
                Some(c) if current && ok(c) => Ok(o),
                _ => Err(format!("status {}", o["status"])),
            }
        })
        .await
    }

    /// SIGKILL: no shutdown code runs, like a power cut for the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// Starts the same server again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The process id of the running server (for /proc measurements), if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, as an operator stops it; SIGKILL if it has not exited after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server gracefully and starts it again on the same data directory and port with
    /// `extra` flags instead of the ones it was started with.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.stop();
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn();
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.stop();
        // Whatever this installation created, found by its instance label (never anyone else's).
        if !self.instance.is_empty() {
            let label = format!("label=io.berth.instance={}", self.instance);
            remove_services(&ids(&["service", "ls", "-q", "--filter", &label]));
            for family in ["secret", "config", "network", "volume"] {
                remove_until_gone(family, &["--filter", &label]);
            }
        }
    }
}

/// Removes every `docker <family>` object that `docker <family> ls -q <filter>` lists, and tries
/// again until none is left or 30 s have passed: a network or volume cannot be removed while the
/// containers of a just-removed service still hold it, and a secret or config while a service
/// still names it. Whatever is left after that is reported on stderr, never silently dropped.
fn remove_until_gone(family: &str, filter: &[&str]) {
    let list = || {
        let mut args = vec![family, "ls", "-q"];
        args.extend_from_slice(filter);
        ids(&args)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = list();
        if found.is_empty() {
            return;
        }
        let mut args = vec![family, "rm"];
        args.extend(found.iter().map(String::as_str));
        let _ = Command::new("docker")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if list().is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "e2e cleanup: could not remove {family}s {:?} ({filter:?}); scripts/test sweeps them on its next run",
                list()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// IDs printed by a `docker ... ls -q` command.
fn ids(args: &[&str]) -> Vec<String> {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes every Swarm service, secret, config, network and volume whose name starts with the prefix
/// when dropped — also when the test panicked — so a failed test leaves nothing behind in the shared
/// Swarm. Declare it before the `Berth`/`Stack`, so it runs after berth has stopped.
pub struct Cleanup {
    pub prefix: String,
}

impl Cleanup {
    pub fn new(prefix: &str) -> Cleanup {
        Cleanup {
            prefix: prefix.to_string(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Everything of the family, matched here by prefix: the engine's name filter matches
        // substrings for some families, and for a swarm network not in use on this node it
        // matches only the whole name (engine 20.10), so the overlay networks of tasks on other
        // nodes (the 3-node lab's) were never found.
        let named = |family: &str| -> Vec<String> {
            let out = Command::new("docker")
                .args([family, "ls", "--format", "{{.ID}} {{.Name}}"])
                .output();
            let text = out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(_, name)| name.starts_with(&self.prefix))
                .map(|(id, _)| id.to_string())
                .collect()
        };
        remove_services(&named("service"));
        for family in ["secret", "config", "network"] {
            let found = named(family);
            if !found.is_empty() {
                let filter: Vec<String> = found.iter().map(|id| format!("id={id}")).collect();
                let mut args = Vec::new();
                for f in &filter {
                    args.push("--filter");
                    args.push(f.as_str());
                }
                remove_until_gone(family, &args);
            }
        }
        // `docker volume ls` has no {{.ID}}: its name is the key.
        let volumes: Vec<String> = ids(&["volume", "ls", "-q"])
            .into_iter()
            .filter(|v| v.starts_with(&self.prefix))
            .collect();
        if !volumes.is_empty() {
            let filter: Vec<String> = volumes.iter().map(|v| format!("name={v}")).collect();
            let mut args = Vec::new();
            for f in &filter {
                args.push("--filter");
                args.push(f.as_str());
            }
            remove_until_gone("volume", &args);
        }
    }
}

/// Removes Swarm services safely.
///
/// Engine 20.10's swarmkit dereferences a nil task (SetServiceTasksRemove) when a service is removed
/// while the task reaper deletes that service's tasks — right after a scale-down, or in a crash loop —
/// and the whole dockerd dies. So scale to zero first, let the reaper finish, and only then remove:
/// the removal then has no tasks to race with.
fn remove_services(ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let quiet = |args: &[&str]| {
        Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    let scale: Vec<String> = ids.iter().map(|id| format!("{id}=0")).collect();
    let mut args = vec!["service", "scale", "-d"];
    args.extend(scale.iter().map(String::as_str));
    let _ = quiet(&args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let tasks = Command::new("docker")
            .args(["service", "ps", "-q"])
            .args(ids)
            .stderr(Stdio::null())
            .output();
        match tasks {
            Ok(t) if t.status.success() && !t.stdout.iter().all(u8::is_ascii_whitespace) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => break,
        }
    }
    let mut args = vec!["service", "rm"];
    args.extend(ids.iter().map(String::as_str));
    let _ = quiet(&args);
}

/// Writes a manifest into a fresh temporary directory and returns (dir guard, file path).
pub fn manifest(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir("manifest");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write manifest");
    (dir, path)
}

/// Which event bus a scenario runs `berth up` with: every scenario runs once with each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bus {
    /// In-process bus (no `--nats`).
    Embedded,
    /// A real nats-server with JetStream, started for the test.
    Nats,
    /// NATS for the events and for the store: `--store nats` on a three-server JetStream
    /// cluster (replicas 3), started for the test.
    NatsStore,
}

/// `berth up` on the chosen bus, plus the nats-server behind it when there is one. Fields drop in
/// declaration order: berth stops before its nats-server does.
pub struct Stack {
    pub berth: Berth,
    pub nats: Option<Nats>,
    pub cluster: Option<NatsCluster>,
}

impl Stack {
    pub fn start(bus: Bus) -> Stack {
        Self::start_with(bus, &[])
    }

    pub fn start_with(bus: Bus, extra: &[&str]) -> Stack {
        match bus {
            Bus::Embedded | Bus::Nats => {
                let nats = (bus == Bus::Nats).then(Nats::start);
                let berth = Berth::start_with(nats.as_ref().map(Nats::url), extra);
                Stack {
                    berth,
                    nats,
                    cluster: None,
                }
            }
            Bus::NatsStore => {
                let cluster = NatsCluster::start();
                let mut args = vec!["--store", "nats"];
                args.extend_from_slice(extra);
                let berth = Berth::start_with(Some(cluster.urls()), &args);
                Stack {
                    berth,
                    nats: None,
                    cluster: Some(cluster),
                }
            }
        }
    }

    /// A NATS URL of the stack (panics on the embedded bus: only NATS scenarios ask).
    pub fn nats_url(&self) -> String {
        match (&self.nats, &self.cluster) {
            (Some(n), _) => n.url(),
            (None, Some(c)) => c.url(0),
            (None, None) => panic!("e2e: this stack runs the embedded bus"),
        }
    }
}

/// The replicas of the Swarm service `name`, or `None` when the engine answers 404 (no such
/// service). Any other engine error fails the test: it is not evidence that the service is absent.
pub async fn swarm_replicas(d: &Docker, name: &str) -> Option<i64> {
    use bollard::query_parameters::InspectServiceOptions;
    let s = match d.inspect_service(name, None::<InspectServiceOptions>).await {
        Ok(s) => s,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return None,
        Err(e) => panic!("e2e: inspecting Swarm service {name}: {e}"),
    };
    let replicas = s
        .spec
        .and_then(|spec| spec.mode)
        .and_then(|mode| mode.replicated)
        .and_then(|r| r.replicas);
    Some(replicas.unwrap_or_else(|| panic!("e2e: Swarm service {name} is not replicated")))
}

/// Polls `f` every 100 ms until it returns `Ok`. `Err` describes what was seen instead; on timeout
/// the panic shows the last such description and the tail of the `berth up` log, so a convergence
/// failure explains itself.
pub async fn eventually<T, F, Fut>(berth: &Berth, timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if start.elapsed() > timeout => {
                let log = berth.log_text();
                let tail: Vec<&str> = log.lines().rev().take(80).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "e2e: timed out after {timeout:?} waiting for {what}\nlast seen: {last}\n--- berth up log (last {} lines) ---\n{}",
                    tail.len(),
                    tail.join("\n")
                );
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A status condition of an object, by type.
pub fn condition<'a>(obj: &'a serde_json::Value, type_: &str) -> Option<&'a serde_json::Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// A `berth controller KIND` process, stopped on drop.
pub struct ControllerProcess {
    child: Child,
    log: PathBuf,
}

impl ControllerProcess {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running (it must not exit on its own).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits up to 15 s for a clean exit (then SIGKILL). Whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `#[tokio::test]` per listed bus for a scenario `async fn NAME(bus: Bus)`, in module `NAME`
/// (`NAME::embedded`, `NAME::nats`, ...). The scenario's module must have `Bus` in scope.
#[macro_export]
macro_rules! scenario_on {
    ($scenario:ident: $($test:ident => $bus:ident),+) => {
        mod $scenario {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$scenario(Bus::$bus).await;
                }
            )+
        }
    };
}

/// A scenario once with each bus: `NAME::embedded` and `NAME::nats`.
#[macro_export]
macro_rules! on_both_buses {
    ($scenario:ident) => {
        $crate::scenario_on!($scenario: embedded => Embedded, nats => Nats);
    };
}

/// A core scenario on each bus and on the NATS store: `embedded`, `nats` and `nats_store`
/// (`--store nats` on a three-server cluster), so the store's backends are held to one behaviour.
#[macro_export]
macro_rules! on_every_store {
    ($scenario:ident) => {
        $crate::scenario_on!($scenario: embedded => Embedded, nats => Nats, nats_store => NatsStore);
    };
}

/// Proves that a full resync of `b`'s Service controller ran after this call, and returns once it
/// has: creates, behind berth's back, a Swarm service `<prefix>-orphan-<n>` carrying this
/// installation's ownership labels but for an object that does not exist (`<prefix>-ghost`). Its
/// Swarm name differs from the object's, so engine events about it lead nowhere: only a full
/// resync (which lists the installation's engine services by label) finds it and removes it. A
/// resync queues every object before the engine's orphans, so the objects were reconciled too.
pub async fn await_resync(b: &Berth, d: &Docker, prefix: &str, timeout: Duration) {
    use berth_api_types::names::labels;
    use bollard::models::{ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec};
    use std::collections::HashMap;
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let orphan = format!(
        "{prefix}-orphan-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let spec = ServiceSpec {
        name: Some(orphan.clone()),
        labels: Some(HashMap::from([
            (
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            ),
            (labels::INSTANCE.to_string(), b.instance.clone()),
            (labels::KIND.to_string(), "service".to_string()),
            (labels::NAME.to_string(), format!("{prefix}-ghost")),
        ])),
        task_template: Some(TaskSpec {
            container_spec: Some(bollard::models::TaskSpecContainerSpec {
                image: Some(BUSYBOX.to_string()),
                command: Some(vec!["sleep".into(), "100000".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
            ..Default::default()
        }),
        ..Default::default()
    };
    d.create_service(spec, None)
        .await
        .expect("e2e: creating the orphan Swarm service");
    let what = format!("a resync to remove the planted orphan {orphan}");
    eventually(b, timeout, &what, || {
        let orphan = orphan.clone();
        async move {
            match d
                .inspect_service(
                    &orphan,
                    None::<bollard::query_parameters::InspectServiceOptions>,
                )
                .await
            {
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(()),
                Ok(_) => Err("the orphan is still there".to_string()),
                Err(e) => panic!("e2e: inspecting {orphan}: {e}"),
            }
        }
    })
    .await
}

/// The running controller instances of `kind` (`GET /controllers`), as records.
pub async fn controller_instances(api: &Berth, kind: &str) -> Vec<serde_json::Value> {
    let (status, list) = api.api_get(paths::CONTROLLERS).await;
    assert_eq!(status, 200, "{list}");
    list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i["kind"] == kind)
        .collect()
}

/// Waits until exactly the processes `pids` run `kind` and together hold every partition.
pub async fn wait_instances(api: &Berth, kind: &str, pids: &[u32]) -> Vec<serde_json::Value> {
    wait_for(
        Duration::from_secs(60),
        &format!("{} {kind} instance(s) holding every partition", pids.len()),
        || async {
            let list = controller_instances(api, kind).await;
            let mut seen: Vec<u32> = list
                .iter()
                .filter_map(|i| i["pid"].as_u64().map(|p| p as u32))
                .collect();
            seen.sort_unstable();
            let mut want = pids.to_vec();
            want.sort_unstable();
            let held: u64 = list.iter().filter_map(|i| i["partitions"].as_u64()).sum();
            let total = list
                .first()
                .and_then(|i| i["partitionsTotal"].as_u64())
                .unwrap_or(0);
            (seen == want && total > 0 && held == total).then_some(list)
        },
    )
    .await
}

/// Starts `n` instances of `berth controller service` (ids `<tag>-<i>`) with extra environment,
/// and waits until together they hold every partition.
pub async fn start_service_instances(
    api: &Berth,
    tag: &str,
    n: usize,
    env: &[(&str, &str)],
) -> Vec<ControllerProcess> {
    let ctls: Vec<ControllerProcess> = (0..n)
        .map(|i| api.start_controller_instance("service", &format!("{tag}-{i}"), env))
        .collect();
    let pids: Vec<u32> = ctls.iter().map(ControllerProcess::pid).collect();
    wait_instances(api, "Service", &pids).await;
    ctls
}

/// `berth restore environment --snapshot ID --data-dir DIR --repository REPO --key-file KEY
/// [--dry-run]`, run offline as an operator would after a disaster; panics unless it succeeds, and
/// returns what it printed.
pub fn restore_environment(
    snapshot: &str,
    data_dir: &Path,
    repository: &Path,
    key_file: &Path,
    dry_run: bool,
) -> String {
    let mut cmd = Command::new(berth_bin());
    cmd.args([
        "restore",
        "environment",
        "--snapshot",
        snapshot,
        "--data-dir",
    ])
    .arg(data_dir)
    .arg("--repository")
    .arg(repository)
    .arg("--key-file")
    .arg(key_file);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().expect("e2e: cannot run berth restore");
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
