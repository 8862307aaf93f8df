//! berth on a NATS server with authorization on: the example configuration of docs/security.md
//! (`fixtures/nats/authorization.conf`) is what these tests run, so the permissions it documents
//! are known to be enough for each process and to keep a controller from deploying.
//!
//! - `berth api` (credentials in the URL) and `berth controller network|service` (`--nats-nkey`)
//!   each log in as their own user and a Service converges; no permission is missing on the way.
//! - A wrong password or a bad NKey file stops berth at startup with an error naming the problem and
//!   no secret.
//! - A connection with the controller's permissions cannot publish a deploy event or a resource
//!   event: the server reports a permissions violation and nothing lands in the streams.
//! - `tls://` with `--nats-ca` (a CA made by the test) connects; without the CA berth fails clearly.

use berth_api_types::names::paths;
use berth_api_types::Kind;
use berth_e2e::{berth_bin, docker, free_port, manifest, owned, prefix, tempdir, wait_for};
use berth_e2e::{Berth, Cleanup};
use bollard::query_parameters::InspectServiceOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const API_USER: &str = "berth-api";
const API_PASSWORD: &str = "api-test-password";
const FOLLOWER_USER: &str = "berth-follower";
const FOLLOWER_PASSWORD: &str = "follower-test-password";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/nats")
        .join(name)
}

/// The controller user's NKey seed, from the fixture (the line after the comments).
fn controller_seed() -> String {
    std::fs::read_to_string(fixture("controller.nk"))
        .expect("fixtures/nats/controller.nk")
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .expect("a seed in controller.nk")
        .to_string()
}

/// nats-server with JetStream and the fixture's authorization, on a free port; killed on drop.
struct AuthNats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl AuthNats {
    fn start(extra: &[&str]) -> AuthNats {
        let port = free_port();
        let dir = tempdir("nats-auth");
        let log = dir.path().join("nats.log");
        let child = owned(&mut Command::new("nats-server"))
            .arg("-c")
            .arg(fixture("authorization.conf"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("store"))
            .args(["-l"])
            .arg(&log)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("e2e: cannot start nats-server (is it installed? scripts/test installs it)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "e2e: nats-server did not open port {port}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        AuthNats {
            child,
            port,
            _dir: dir,
            log,
        }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AuthNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `berth controller KIND` logged in as the controller user (NKey); killed on drop.
struct Controller {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Controller {
    fn start(api: &Berth, nats_url: &str, kind: &str) -> Controller {
        let dir = tempdir("controller");
        let log = dir.path().join("controller.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = owned(&mut Command::new(berth_bin()))
            .args(["controller", kind, "--nats", nats_url, "--url", &api.url()])
            .arg("--nats-nkey")
            .arg(fixture("controller.nk"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("BERTH_TOKEN", api.controller_token())
            .env("BERTH_LOG", "info,berth_controllers=debug")
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("e2e: cannot start berth controller");
        Controller {
            child,
            log,
            _dir: dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a berth server command that must fail at startup; returns its stderr. Fails the test if it
/// is still running after 30 s or succeeds.
fn berth_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempdir("berth-fails");
    let mut cmd = Command::new(berth_bin());
    owned(&mut cmd).args(args);
    if args[0] == "controller" {
        cmd.arg("--state-dir").arg(dir.path().join("state"));
    } else {
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--backup-dir")
            .arg(dir.path().join("backups"))
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--default-network", &prefix("net")]);
    }
    let mut child = cmd
        .env("BERTH_NO_DEFAULT_BACKUP_PLAN", "1")
        .env("BERTH_TOKEN", "not-used")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("e2e: cannot run berth");
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "e2e: `berth {}` still running after 30 s:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "e2e: `berth {}` should have failed:\n{stderr}",
        args.join(" ")
    );
    stderr
}

fn service_yaml(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: berth-test/busybox:1\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: {replicas}\n"
    )
}

async fn swarm_service_exists(d: &bollard::Docker, name: &str) -> bool {
    match d.inspect_service(name, None::<InspectServiceOptions>).await {
        Ok(_) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => false,
        Err(e) => panic!("e2e: inspecting Swarm service {name}: {e}"),
    }
}

/// Clients are told `Permissions Violation for Publish to ...`; nats-server logs `Publish
/// Violation` / `Subscription Violation`.
fn assert_no_permission_violation(what: &str, log: &str) {
    let log_lower = log.to_lowercase();
    assert!(
        ![
            "permissions violation",
            "publish violation",
            "subscription violation"
        ]
        .iter()
        .any(|v| log_lower.contains(v)),
        "{what} was refused a NATS permission the table in docs/security.md should grant:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_log_in_with_their_own_credentials() {
    let p = prefix("natsauth");
    let _cleanup = Cleanup::new(&p);
    let nats = AuthNats::start(&[]);

    // Wrong credentials stop berth at once, saying so, without echoing the secret.
    let wrong = format!("nats://{API_USER}:wrong-secret-pw@127.0.0.1:{}", nats.port);
    let err = berth_fails(&["api", "--nats", &wrong], &[]);
    assert!(
        err.to_lowercase().contains("authorization violation"),
        "{err}"
    );
    assert!(err.contains("refused berth's credentials"), "{err}");
    assert!(!err.contains("wrong-secret-pw"), "password leaked: {err}");
    let err = berth_fails(
        &["api", "--nats", &nats.url("nats"), "--nats-user", API_USER],
        &[("BERTH_NATS_PASSWORD", "wrong-secret-pw")],
    );
    assert!(err.contains("refused berth's credentials"), "{err}");
    assert!(!err.contains("wrong-secret-pw"), "password leaked: {err}");
    // A file that is not an NKey seed is named before anything is sent.
    let not_a_seed = tempdir("nk");
    let bad = not_a_seed.path().join("bad.nk");
    std::fs::write(&bad, "SUAAAA-not-a-seed\n").unwrap();
    let err = berth_fails(
        &[
            "controller",
            "service",
            "--nats",
            &nats.url("nats"),
            "--nats-nkey",
            bad.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        err.contains("--nats-nkey") && err.contains(bad.to_str().unwrap()),
        "{err}"
    );
    assert!(!err.contains("not-a-seed"), "seed leaked: {err}");

    // The API server with user and password in the URL; the controllers with the NKey.
    let api_url = format!("nats://{API_USER}:{API_PASSWORD}@127.0.0.1:{}", nats.port);
    let api = Berth::start_api(api_url);
    assert!(
        !api.log_text().contains(API_PASSWORD),
        "the URL's password reached the log:\n{}",
        api.log_text()
    );
    let mut net = Controller::start(&api, &nats.url("nats"), "network");
    let mut ctl = Controller::start(&api, &nats.url("nats"), "service");
    let d = docker().await;
    let name = format!("{p}-web");
    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, 1));
    api.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(60),
        "the service controller (NKey user) to create the Swarm service",
        || async { swarm_service_exists(&d, &name).await.then_some(()) },
    )
    .await;
    api.wait_condition(
        Kind::Service,
        &name,
        "Ready",
        Duration::from_secs(60),
        |c| c["status"] == "True",
    )
    .await;
    // An update travels the controller's durable consumer too (pull and ack were allowed).
    let (_dir2, file2) = manifest("svc.yaml", &service_yaml(&name, 2));
    api.cli_ok(&["apply", "-f", file2.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(60),
        "the update to be observed",
        || async {
            let (_, obj) = api.api_get(&paths::object(Kind::Service, &name)).await;
            (obj["status"]["observedGeneration"] == 2).then_some(())
        },
    )
    .await;
    assert!(ctl.is_running(), "controller exited:\n{}", ctl.log_text());
    assert!(
        net.is_running(),
        "network controller exited:\n{}",
        net.log_text()
    );
    assert_no_permission_violation("the service controller", &ctl.log_text());
    assert_no_permission_violation("the network controller", &net.log_text());
    assert_no_permission_violation("the API server", &api.log_text());
    let server_log = nats.log_text();
    assert_no_permission_violation("a berth process (nats-server log)", &server_log);

    api.cli_ok(&["delete", "service", &name]);
    wait_for(
        Duration::from_secs(30),
        "the Swarm service to be removed",
        || async { (!swarm_service_exists(&d, &name).await).then_some(()) },
    )
    .await;
}

/// Messages stored in a stream, read as the API user.
async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    let mut s = js.get_stream(stream).await.expect("stream");
    s.info().await.expect("stream info").state.messages
}

/// Connects with `options`, collecting the server's error messages (permission violations).
async fn connect_collecting(
    url: &str,
    options: async_nats::ConnectOptions,
) -> (
    async_nats::Client,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = errors.clone();
    let client = options
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    sink.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .expect("connect");
    (client, errors)
}

async fn wait_violation(errors: &std::sync::Mutex<Vec<String>>, subject: &str) {
    wait_for(
        Duration::from_secs(10),
        &format!("the server to report a permissions violation for {subject}"),
        || async {
            errors
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_cannot_publish_deploys_or_events() {
    let p = prefix("natsperm");
    let _cleanup = Cleanup::new(&p);
    let nats = AuthNats::start(&[]);
    // The API server creates the streams (a controller may not).
    let api = Berth::start_api(format!(
        "nats://{API_USER}:{API_PASSWORD}@127.0.0.1:{}",
        nats.port
    ));
    let url = nats.url("nats");
    let admin =
        async_nats::ConnectOptions::with_user_and_password(API_USER.into(), API_PASSWORD.into())
            .connect(&url)
            .await
            .expect("api user connects");
    let admin_js = async_nats::jetstream::new(admin);
    let deploys_before = stream_messages(&admin_js, "BERTH_DEPLOYS").await;
    let events_before = stream_messages(&admin_js, "BERTH_EVENTS").await;

    let (ctl, errors) = connect_collecting(
        &url,
        async_nats::ConnectOptions::with_nkey(controller_seed()),
    )
    .await;
    let ctl_js = async_nats::jetstream::new(ctl.clone());
    let service = format!("{p}-web");
    let deploy_subject = format!("berth.deploy.{service}");
    let forged = serde_json::json!({
        "id": ulid::Ulid::new().to_string(), "service": service,
        "image": "evil.example/miner:1", "source": "webhook",
        "time": chrono_now(), "instance": api.instance,
    });
    let published = ctl_js
        .publish(deploy_subject.clone(), forged.to_string().into())
        .await;
    // The server drops the message; the JetStream ack never comes.
    let acked = match published {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false),
        Err(_) => false,
    };
    assert!(!acked, "a controller's deploy event was stored");
    wait_violation(&errors, &deploy_subject).await;

    let event_subject = format!("berth.events.service.{service}");
    ctl.publish(event_subject.clone(), "{}".into())
        .await
        .expect("queued");
    ctl.flush().await.expect("flush");
    wait_violation(&errors, &event_subject).await;

    // Nor write the store's log (`--store nats`): a commit there would pass every access check.
    let store_subject =
        berth_api_types::names::subjects::store_log(berth_api_types::names::subjects::STORE_STREAM);
    ctl.publish(store_subject.clone(), "{}".into())
        .await
        .expect("queued");
    ctl.flush().await.expect("flush");
    wait_violation(&errors, &store_subject).await;

    // Nor can it change the streams to capture other subjects.
    let err = ctl_js
        .update_stream(async_nats::jetstream::stream::Config {
            name: "BERTH_DEPLOYS".into(),
            subjects: vec!["berth.deploy.>".into(), "x.>".into()],
            ..Default::default()
        })
        .await;
    assert!(err.is_err(), "a controller updated a stream");

    assert_eq!(
        stream_messages(&admin_js, "BERTH_DEPLOYS").await,
        deploys_before,
        "a forged deploy landed in BERTH_DEPLOYS"
    );
    assert_eq!(
        stream_messages(&admin_js, "BERTH_EVENTS").await,
        events_before,
        "a forged event landed in BERTH_EVENTS"
    );

    // The read-only follower sees events but cannot publish at all.
    let (follower, follower_errors) = connect_collecting(
        &url,
        async_nats::ConnectOptions::with_user_and_password(
            FOLLOWER_USER.into(),
            FOLLOWER_PASSWORD.into(),
        ),
    )
    .await;
    let mut watch = follower
        .subscribe("berth.events.>")
        .await
        .expect("follower subscribes");
    follower.flush().await.expect("flush");
    follower
        .publish(deploy_subject.clone(), "{}".into())
        .await
        .expect("queued");
    follower.flush().await.expect("flush");
    wait_violation(&follower_errors, &deploy_subject).await;
    let (_dir, file) = manifest("svc.yaml", &service_yaml(&service, 0));
    api.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    let seen = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut watch),
    )
    .await
    .expect("the follower sees the event")
    .expect("subscription open");
    assert_eq!(seen.subject.as_str(), event_subject);
    api.cli_ok(&["delete", "service", &service]);

    // The same publish as the API user is stored: the refusals above are the permissions, not a
    // broken stream.
    let ack = admin_js
        .publish(format!("berth.deploy.{p}-control"), "{}".into())
        .await
        .expect("api user publishes");
    ack.await.expect("stored");
    assert_eq!(
        stream_messages(&admin_js, "BERTH_DEPLOYS").await,
        deploys_before + 1
    );
}

fn chrono_now() -> String {
    // RFC 3339 without pulling chrono into the test: the applier never sees this event anyway.
    "2026-11-30T00:00:00Z".to_string()
}

/// A CA and a server certificate for 127.0.0.1, made with openssl for this test.
fn make_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let script = r#"
set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=berth-test-nats-ca -keyout ca.key -out ca.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
  -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
  -extfile ext -out server.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=berth-api \
  -keyout client.key -out client.csr 2>/dev/null
printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' > client-ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
  -extfile client-ext -out client.pem 2>/dev/null
"#;
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("e2e: openssl is missing (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_ca_connects_and_without_it_fails_clearly() {
    let p = prefix("natstls");
    let _cleanup = Cleanup::new(&p);
    let certs = tempdir("nats-tls");
    let (ca, cert, key) = make_tls(certs.path());
    let nats = AuthNats::start(&[
        "--tls",
        "--tlscert",
        cert.to_str().unwrap(),
        "--tlskey",
        key.to_str().unwrap(),
    ]);
    let url = nats.url("tls");

    let err = berth_fails(
        &["api", "--nats", &url, "--nats-user", API_USER],
        &[("BERTH_NATS_PASSWORD", API_PASSWORD)],
    );
    assert!(err.contains("--nats-ca"), "{err}");
    assert!(!err.contains(API_PASSWORD), "password leaked: {err}");

    let missing = certs.path().join("no-such-ca.pem");
    let err = berth_fails(
        &[
            "api",
            "--nats",
            &url,
            "--nats-ca",
            missing.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        err.contains("--nats-ca") && err.contains(missing.to_str().unwrap()),
        "{err}"
    );

    let mut b = Berth::start_env(
        &[
            "--nats",
            &url,
            "--nats-user",
            API_USER,
            "--nats-ca",
            ca.to_str().unwrap(),
        ],
        &[("BERTH_NATS_PASSWORD", API_PASSWORD)],
    );
    let log = b.log_text();
    assert!(
        log.contains("connected to NATS event bus") && log.contains(&url),
        "berth up did not connect over TLS:\n{log}"
    );
    // `berth up` runs every controller in the API user's connection: the table's API row must
    // be enough for all of them.
    let name = format!("{p}-tls");
    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, 0));
    b.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(60),
        "the Service to be reconciled over TLS",
        || async {
            let (_, obj) = b.api_get(&paths::object(Kind::Service, &name)).await;
            (obj["status"]["observedGeneration"] == 1).then_some(())
        },
    )
    .await;
    b.cli_ok(&["delete", "service", &name]);
    assert_no_permission_violation("berth up", &b.log_text());
    assert_no_permission_violation("berth up (nats-server log)", &nats.log_text());
    assert!(!b.log_text().contains(API_PASSWORD), "password in the log");
    b.stop();

    // A server that verifies clients: the client certificate gets berth in, its absence does not.
    let verifying = AuthNats::start(&[
        "--tlsverify",
        "--tlscert",
        cert.to_str().unwrap(),
        "--tlskey",
        key.to_str().unwrap(),
        "--tlscacert",
        ca.to_str().unwrap(),
    ]);
    let url = verifying.url("tls");
    let (client_cert, client_key) = (
        certs.path().join("client.pem"),
        certs.path().join("client.key"),
    );
    let auth = [("BERTH_NATS_PASSWORD", API_PASSWORD)];
    let mut args = vec!["--nats", &url, "--nats-user", API_USER, "--nats-ca"];
    args.push(ca.to_str().unwrap());
    let err = berth_fails(&[&["api"], args.as_slice()].concat(), &auth);
    assert!(err.contains("cannot connect to NATS"), "{err}");
    args.extend([
        "--nats-tls-cert",
        client_cert.to_str().unwrap(),
        "--nats-tls-key",
        client_key.to_str().unwrap(),
    ]);
    let mut b = Berth::start_env(&args, &auth);
    assert!(
        b.log_text().contains("connected to NATS event bus"),
        "berth up did not connect with its client certificate:\n{}",
        b.log_text()
    );
    b.stop();
}
