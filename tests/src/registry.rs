//! A real private registry for the e2e tests: Debian's `docker-registry` (the distribution project's
//! registry) on a free loopback port, with htpasswd users, and pushes of the local test image into
//! it. The engine speaks plain HTTP to loopback registries, as it does in production to one on
//! `localhost`.
//!
//! Every registry gets its own port, so image names (`127.0.0.1:<port>/...`) never repeat across
//! tests: an image one test pulled cannot make another test's pull succeed from the local cache.
//! Dropping it stops the registry and removes the engine's local copies of its images.

use crate::{free_port, wait_port};
use bollard::auth::DockerCredentials;
use bollard::query_parameters::{PushImageOptions, RemoveImageOptions, TagImageOptions};
use bollard::Docker;
use futures::StreamExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The image every test pushes: built by scripts/test from Debian's busybox.
pub const TEST_IMAGE: &str = "berth-test/busybox:1";

pub struct TestRegistry {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn htpasswd(users: &[(&str, &str)]) -> String {
    let mut htpasswd = String::new();
    for (user, pass) in users {
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, pass])
            .output()
            .expect("e2e: cannot run htpasswd (apache2-utils; scripts/test installs it)");
        assert!(out.status.success(), "e2e: htpasswd failed");
        htpasswd.push_str(String::from_utf8_lossy(&out.stdout).trim());
        htpasswd.push('\n');
    }
    htpasswd
}

fn serve(dir: &std::path::Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("registry.log"))
        .expect("log");
    let child = crate::owned(&mut Command::new("docker-registry"))
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("e2e: cannot start docker-registry (scripts/test installs it)");
    wait_port(port, Duration::from_secs(10), "docker-registry");
    child
}

impl TestRegistry {
    /// A registry that requires one of `users` (name, password) for every request.
    pub fn start(users: &[(&str, &str)]) -> TestRegistry {
        Self::start_with(users, None)
    }

    /// Also POSTs push notifications to `notify_url` (the registry's `notifications.endpoints`).
    pub fn start_with(users: &[(&str, &str)], notify_url: Option<&str>) -> TestRegistry {
        Self::start_notifying(users, |_| notify_url.map(str::to_string))
    }

    /// Like `start_with`, with the notification URL made from the registry's host
    /// (`127.0.0.1:<port>`): a registry webhook is created for the host it serves.
    pub fn start_notifying(
        users: &[(&str, &str)],
        notify_url: impl FnOnce(&str) -> Option<String>,
    ) -> TestRegistry {
        let dir = crate::tempdir("registry");
        let port = free_port();
        let notify_url = notify_url(&format!("127.0.0.1:{port}"));
        // What scripts/test needs to remove this registry's images if the run is killed.
        std::fs::write(dir.path().join("host"), format!("127.0.0.1:{port}\n")).expect("write host");
        std::fs::write(dir.path().join("htpasswd"), htpasswd(users)).expect("write htpasswd");
        let notifications = notify_url
            .as_deref()
            .map(|url| {
                format!(
                    "notifications:\n  endpoints:\n    - name: berth\n      url: {url}\n      timeout: 2s\n      threshold: 3\n      backoff: 1s\n"
                )
            })
            .unwrap_or_default();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: berth-e2e\n    path: {htpasswd}\n{notifications}",
            root = dir.path().join("data").display(),
            htpasswd = dir.path().join("htpasswd").display(),
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("write registry config");
        let child = serve(dir.path(), port);
        TestRegistry { child, port, dir }
    }

    /// Replaces the registry's users (a rotated password): the registry restarts on the same port
    /// and storage, and from then on only `users` are accepted.
    pub fn set_users(&mut self, users: &[(&str, &str)]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::write(self.dir.path().join("htpasswd"), htpasswd(users)).expect("write htpasswd");
        self.child = serve(self.dir.path(), self.port);
    }

    /// `127.0.0.1:<port>`, as image references and Registry objects name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes the local image `local` as `<host>/<repo_tag>` with the given user, then removes the
    /// local tag and the repository digest the push recorded (`<host>/<repo>@sha256:...`), so that
    /// running it needs a pull: the engine skips the pull of a digest-pinned image it holds under
    /// that reference, and berth pins images from registries it has credentials for. Returns the
    /// full image reference.
    pub async fn push(
        &self,
        docker: &Docker,
        local: &str,
        repo_tag: &str,
        user: &str,
        password: &str,
    ) -> String {
        self.push_digest(docker, local, repo_tag, user, password)
            .await
            .0
    }

    /// `push`, also returning the digest the registry now serves for the tag (`sha256:...`).
    pub async fn push_digest(
        &self,
        docker: &Docker,
        local: &str,
        repo_tag: &str,
        user: &str,
        password: &str,
    ) -> (String, String) {
        let (repo, tag) = repo_tag.split_once(':').expect("repo:tag");
        let remote = format!("{}/{repo}", self.host());
        docker
            .tag_image(
                local,
                Some(TagImageOptions {
                    repo: Some(remote.clone()),
                    tag: Some(tag.to_string()),
                }),
            )
            .await
            .expect("e2e: tag image for push");
        let credentials = DockerCredentials {
            username: Some(user.to_string()),
            password: Some(password.to_string()),
            serveraddress: Some(self.host()),
            ..Default::default()
        };
        let mut push = docker.push_image(
            &remote,
            Some(PushImageOptions {
                tag: Some(tag.to_string()),
                ..Default::default()
            }),
            Some(credentials),
        );
        while let Some(item) = push.next().await {
            match item {
                Ok(info) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        panic!(
                            "e2e: push of {remote}:{tag} failed: {e}\n{}",
                            self.log_text()
                        );
                    }
                }
                Err(e) => panic!(
                    "e2e: push of {remote}:{tag} failed: {e}\n{}",
                    self.log_text()
                ),
            }
        }
        let reference = format!("{remote}:{tag}");
        let digests: Vec<String> = docker
            .inspect_image(&reference)
            .await
            .unwrap_or_else(|e| panic!("e2e: inspecting {reference} after the push: {e}"))
            .repo_digests
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.starts_with(&format!("{remote}@")))
            .collect();
        let [pushed] = digests.as_slice() else {
            panic!("e2e: expected one repository digest of {remote} after the push: {digests:?}");
        };
        let digest = pushed
            .split_once('@')
            .map(|(_, d)| d.to_string())
            .unwrap_or_default();
        untag(docker, pushed).await;
        untag(docker, &reference).await;
        (reference, digest)
    }
}

async fn untag(docker: &Docker, reference: &str) {
    let _ = docker
        .remove_image(
            reference,
            Some(RemoveImageOptions {
                noprune: true,
                ..Default::default()
            }),
            None,
        )
        .await;
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The engine's copies of this registry's images (pulled by tasks): untag, keep the layers
        // that the test image shares.
        if let Ok(out) = Command::new("docker")
            .args([
                "images",
                "--digests",
                "--format",
                "{{.Repository}}:{{.Tag}} {{.Repository}}@{{.Digest}}",
                "--filter",
                &format!("reference={}/*/*", self.host()),
            ])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let refs = text
                .split_whitespace()
                .filter(|r| !r.ends_with(":<none>") && !r.ends_with("@<none>"));
            for image in refs {
                let _ = Command::new("docker")
                    .args(["rmi", "--no-prune", image])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}
