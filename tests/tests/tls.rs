//! End-to-end tests of berth over HTTPS: `berth up --tls internal` with the CLI trusting
//! `<data-dir>/ca.pem`, refusing without it, telling plain HTTP off; webhooks on their own listener
//! (`--hooks-listen`) with the admin API unreachable there and the hooks unreachable on the API
//! port; and a split controller talking to `berth api` over HTTPS with `--ca`.

use berth_api_types::names::paths;
use berth_api_types::Kind;
use berth_e2e::{
    berth_bin, docker, free_port, manifest, prefix, swarm_replicas, wait_for, Berth, Cleanup, Nats,
};
use std::process::Command;
use std::time::Duration;

fn service_yaml(name: &str, image: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  command: [\"sleep\", \"100000\"]\n  init: true\n  stopGracePeriod: 1s\n  replicas: 1\n"
    )
}

/// A CLI run against `url` with the token but without `--ca` (nor BERTH_CA).
fn cli_without_ca(b: &Berth, url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(berth_bin())
        .args(args)
        .env("BERTH_URL", url)
        .env("BERTH_TOKEN", &b.token)
        .env_remove("BERTH_CA")
        .output()
        .expect("e2e: run berth");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn spec_image(b: &Berth, name: &str) -> String {
    let (code, v) = b.api_get(&paths::object(Kind::Service, name)).await;
    assert_eq!(code, 200, "{v}");
    v["spec"]["image"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_ca_cli_and_a_separate_hooks_listener() {
    let p = prefix("tls");
    let _cleanup = Cleanup::new(&p);
    let hooks_port = free_port();
    let hooks_listen = format!("127.0.0.1:{hooks_port}");
    // `start_tls` waits until `berth info` succeeds with BERTH_CA=<data-dir>/ca.pem: the CLI
    // already reached it over https.
    let b = Berth::start_tls("up", None, &["--hooks-listen", &hooks_listen]);
    assert!(b.url().starts_with("https://"));
    assert!(
        b.log_text().contains(&b.ca_file().display().to_string()),
        "berth must print the CA path for clients:\n{}",
        b.log_text()
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let key = std::fs::metadata(b.data_dir.join("ca.key")).expect("ca.key");
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
    }

    // The CLI applies and reads objects over https.
    let name = format!("{p}-web");
    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, "berth-test/busybox:1"));
    b.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    let got: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["get", "service", &name, "-o", "json"])).unwrap();
    assert_eq!(got["metadata"]["name"], name.as_str());

    // Without the CA the CLI refuses the server, and says why and what to do.
    let (ok, stderr) = cli_without_ca(&b, &b.url(), &["get", "services"]);
    assert!(!ok, "the CLI must not trust berth's CA by default");
    assert!(
        stderr.contains("certificate") && stderr.contains("--ca"),
        "{stderr}"
    );

    // Plain HTTP to the TLS port: refused with an answer that says to use https.
    let plain = format!("http://127.0.0.1:{}", b.port);
    let resp = reqwest::get(format!("{plain}{}", paths::HEALTHZ))
        .await
        .expect("the TLS port answers plain HTTP with an error");
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().await.unwrap().contains("https://"));
    let (ok, stderr) = cli_without_ca(&b, &plain, &["get", "services"]);
    assert!(!ok, "{stderr}");

    // A deploy webhook, administered on the API port, called on the hooks port.
    let hook: serde_json::Value = serde_json::from_str(&b.cli_ok(&[
        "webhook",
        "create",
        &name,
        "--public-url",
        &format!("https://127.0.0.1:{hooks_port}"),
        "-o",
        "json",
    ]))
    .expect("webhook create -o json");
    let hook_url = hook["url"].as_str().expect("url").to_string();
    let hook_path = hook["path"].as_str().expect("path").to_string();
    assert!(hook_url.starts_with(&format!("https://127.0.0.1:{hooks_port}/hooks/")));
    let client = b.client();

    // The hook path on the API port: the generic 404, and no deploy.
    let resp = client
        .post(format!("{}{hook_path}", b.url()))
        .body(r#"{"tag": "2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(spec_image(&b, &name).await, "berth-test/busybox:1");

    // The admin API on the hooks port: 404 even with the admin token; /healthz answers.
    let hooks_base = format!("https://127.0.0.1:{hooks_port}");
    for path in [
        paths::API_ROOT.to_string(),
        paths::collection(Kind::Service),
        paths::WEBHOOKS.to_string(),
    ] {
        let resp = client
            .get(format!("{hooks_base}{path}"))
            .bearer_auth(&b.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 404, "{path} on the hooks listener");
    }
    let resp = client
        .get(format!("{hooks_base}{}", paths::HEALTHZ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // The hooks listener is TLS too: plain HTTP is told off.
    let resp = reqwest::get(format!("http://127.0.0.1:{hooks_port}{}", paths::HEALTHZ))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // The call on the hooks port deploys.
    let resp = client
        .post(&hook_url)
        .body(r#"{"tag": "2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        202,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    wait_for(
        Duration::from_secs(20),
        "the deploy to change the spec",
        || async { (spec_image(&b, &name).await == "berth-test/busybox:2").then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_controller_over_https() {
    let p = prefix("tlssplit");
    let _cleanup = Cleanup::new(&p);
    let nats = Nats::start();
    let api = Berth::start_tls("api", Some(nats.url()), &[]);
    let d = docker().await;

    // A controller without the CA cannot start: it cannot trust the API.
    let out = Command::new(berth_bin())
        .args([
            "controller",
            "network",
            "--nats",
            &nats.url(),
            "--url",
            &api.url(),
        ])
        .args(["--token", &api.token])
        .arg("--state-dir")
        .arg(api.data_dir.join("untrusting"))
        .env_remove("BERTH_CA")
        .output()
        .expect("e2e: run berth controller");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");

    // With --ca (the harness passes <data-dir>/ca.pem) they converge a Service.
    let mut net = api.start_controller("network");
    let mut ctl = api.start_controller("service");
    let name = format!("{p}-web");
    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, "berth-test/busybox:1"));
    api.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(60),
        "the controller to create the service",
        || async { (swarm_replicas(&d, &name).await == Some(1)).then_some(()) },
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

/// A mutual-TLS endpoint in front of the local engine's socket, checking client certificates the
/// way `dockerd --tlsverify` does; counts the clients it let through. Writes the docker CLI's
/// client files (`ca.pem`, `cert.pem`, `key.pem`) to `certs`.
struct TlsEngine {
    port: u16,
    admitted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsEngine {
    async fn start(certs: &std::path::Path) -> TlsEngine {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tokio_rustls::rustls;
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
        std::fs::write(certs.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(certs.join("cert.pem"), client.pem()).unwrap();
        std::fs::write(certs.join("key.pem"), client_key.serialize_pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let admitted = Arc::new(AtomicUsize::new(0));
        let counter = admitted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counter) = (acceptor.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut engine).await;
                });
            }
        });
        TlsEngine { port, admitted }
    }

    fn host(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn admitted(&self) -> usize {
        self.admitted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `--docker-host tcp://...` with DOCKER_TLS_VERIFY: berth reaches the engine only through mutual
/// TLS with the docker CLI's files, converges a Service that way, and a missing key file stops it
/// with the file's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_over_tls_with_the_docker_cli_files() {
    let p = prefix("tlsengine");
    let _cleanup = Cleanup::new(&p);
    let certs = berth_e2e::tempdir("engine-certs");
    let engine = TlsEngine::start(certs.path()).await;
    let cert_path = certs.path().to_str().unwrap();
    let tls_env = [("DOCKER_TLS_VERIFY", "1"), ("DOCKER_CERT_PATH", cert_path)];
    let b = Berth::start_env(&["--docker-host", &engine.host()], &tls_env);
    assert!(engine.admitted() > 0, "berth did not connect through TLS");
    assert!(
        !b.log_text().contains("plain HTTP"),
        "no clear-text warning with TLS:\n{}",
        b.log_text()
    );

    let d = docker().await;
    let name = format!("{p}-web");
    let (_dir, file) = manifest("svc.yaml", &service_yaml(&name, "berth-test/busybox:1"));
    b.cli_ok(&["apply", "-f", file.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(60),
        "the service created through TLS",
        || async { (swarm_replicas(&d, &name).await == Some(1)).then_some(()) },
    )
    .await;
    b.cli_ok(&["delete", "service", &name]);
    wait_for(
        Duration::from_secs(30),
        "the Swarm service to be removed",
        || async { swarm_replicas(&d, &name).await.is_none().then_some(()) },
    )
    .await;
    drop(b);

    // Without key.pem berth does not start, and names the file.
    let key = certs.path().join("key.pem");
    std::fs::remove_file(&key).unwrap();
    let data = berth_e2e::tempdir("engine-nokey");
    let mut child = Command::new(berth_bin())
        .args(["up", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--default-network",
            &format!("{p}-net"),
            "--docker-host",
            &engine.host(),
        ])
        .envs(tls_env)
        .env("BERTH_NO_DEFAULT_BACKUP_PLAN", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("e2e: run berth up");
    let status = wait_for(Duration::from_secs(20), "berth up to refuse", || {
        let done = child.try_wait().expect("wait");
        async move { done }
    })
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&key.display().to_string()), "{stderr}");
}
