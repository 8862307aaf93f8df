//! Volume transfers across nodes (controllers/src/backup/volumes.rs): a named volume on lab node 2
//! is read into a staging directory on the manager through a real agent task on node 2, then
//! restored on node 3 under a new name through another agent, and every file, owner, mode, mtime,
//! symlink and hard link compared. The agents run the `berth-test/agent:1` image that scripts/test
//! builds from the berth binary and the lab loads into every node.
//!
//! The lab's extra engines run with `--bridge none` (no bridge, no NAT), so a task without a
//! network has only loopback there: the agents use the node's host network, the one extra
//! privilege [`Transfers::host_network`] exists for. (On berth's own node, the engine test
//! `controllers/tests/volume_transfer.rs` uses the default bridge.)
//!
//! Volumes are filled and compared through the host's view of each node's data root (the lab's
//! engines keep plain local volumes under /var/lib/berth-lab/nN/docker/volumes).
//!
//! The second scenario does the same through berth only, as a team would: `berth up` on the
//! manager with `BERTH_AGENT_HOST_NETWORK=1` (the lab's engines have no bridge), a Service
//! pinned to node 2 mounting a Volume, `berth backup run`, the evidence, and `berth restore volume
//! --node berth-lab-3 --as ...`. Its files are written and compared through the nodes' engines
//! (a shell in the task's container on node 2, a throwaway container on node 3), not the host's
//! view of their disks.

use anyhow::{ensure, Context, Result};
use berth_controllers::backup::stream;
use berth_controllers::backup::volumes::{Transfers, VolumeOnNode, TEST_AGENT_IMAGE};
use berth_e2e::lab::{block_on, Lab, Scenario};
use berth_e2e::{prefix, Berth, Cleanup, BUSYBOX};
use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{
    ListContainersOptions, ListSecretsOptions, ListServicesOptions, RemoveVolumeOptions,
};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "a_volume_on_node_2_is_read_and_restored_on_node_3",
            run: a_volume_on_node_2_is_read_and_restored_on_node_3,
        },
        Scenario {
            name: "berth_backs_up_a_volume_on_node_2_and_restores_it_on_node_3",
            run: berth_backs_up_a_volume_on_node_2_and_restores_it_on_node_3,
        },
    ]
}

/// Megabytes of data in the volume (`BERTH_LAB_VOLUME_MB`, default 32): the throughput printed
/// is measured on it.
fn data_mb() -> usize {
    std::env::var("BERTH_LAB_VOLUME_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32)
}

/// Removes the scenario's volumes from the nodes that hold them.
struct VolumesGone<'a> {
    lab: &'a Lab,
    volumes: Vec<(usize, String)>,
}

impl Drop for VolumesGone<'_> {
    fn drop(&mut self) {
        for (i, v) in &self.volumes {
            let docker = self.lab.docker(*i);
            let _ = block_on(docker.remove_volume(v, Some(RemoveVolumeOptions { force: true })));
        }
    }
}

/// Every entry under `root`: kind, content sum or link target, uid:gid, mode, mtime, links.
fn snapshot(root: &Path) -> Vec<String> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let (what, mode, mtime) = if m.is_dir() {
                ("dir".to_string(), m.mode(), m.mtime())
            } else if m.file_type().is_symlink() {
                (format!("-> {}", fs::read_link(&p).unwrap().display()), 0, 0)
            } else {
                let data = fs::read(&p).unwrap();
                let sum: u64 = data.iter().map(|b| *b as u64).sum();
                (
                    format!("{} bytes sum {sum}", data.len()),
                    m.mode(),
                    m.mtime(),
                )
            };
            out.push(format!(
                "{rel} {what} {}:{} {mode:o} {mtime} links={}",
                m.uid(),
                m.gid(),
                m.nlink()
            ));
            if m.is_dir() {
                go(root, &p, out);
            }
        }
    }
    let m = fs::metadata(root).unwrap();
    let mut out = vec![format!(
        ". {}:{} {:o} {}",
        m.uid(),
        m.gid(),
        m.mode(),
        m.mtime()
    )];
    go(root, root, &mut out);
    out
}

fn set_mtime(p: &Path, secs: u64) -> Result<()> {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    fs::File::open(p)?.set_modified(t)?;
    Ok(())
}

fn fill(root: &Path, mb: usize) -> Result<()> {
    let chown = |p: &Path, u, g| std::os::unix::fs::lchown(p, Some(u), Some(g));
    let mode = |p: &Path, m| fs::set_permissions(p, fs::Permissions::from_mode(m));
    fs::write(root.join("secret.txt"), b"patient 17: fine")?;
    mode(&root.join("secret.txt"), 0o600)?;
    chown(&root.join("secret.txt"), 1234, 5678)?;
    fs::create_dir_all(root.join("bin/empty"))?;
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n")?;
    mode(&root.join("bin/tool"), 0o755)?;
    fs::write(root.join("bin/suid"), b"#!/bin/sh\n")?;
    mode(&root.join("bin/suid"), 0o4755)?;
    chown(&root.join("bin"), 1000, 1000)?;
    symlink("bin/tool", root.join("tool-link"))?;
    chown(&root.join("tool-link"), 42, 43)?;
    fs::hard_link(root.join("secret.txt"), root.join("bin/hard"))?;
    // Incompressible-looking data, written in 1 MiB pieces.
    let mut f = fs::File::create(root.join("data.bin"))?;
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mb {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        f.write_all(&buf)?;
    }
    drop(f);
    for p in ["secret.txt", "bin/empty", "bin", "data.bin"] {
        set_mtime(&root.join(p), 1_000_000_000)?;
    }
    mode(root, 0o750)?;
    Ok(())
}

/// Where the host sees lab node `n`'s (1-based: 2 or 3) local volume `v`.
fn host_path(n: usize, v: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/berth-lab/n{n}/docker/volumes/{v}/_data"))
}

fn a_volume_on_node_2_is_read_and_restored_on_node_3(lab: &Lab) -> Result<()> {
    let p = prefix("volxfer");
    let inst = format!("test-{p}");
    let src = format!("{p}-data");
    let restored = format!("{p}-restored");
    let _gone = VolumesGone {
        lab,
        volumes: vec![(1, src.clone()), (2, restored.clone())],
    };
    let staging = tempfile::tempdir()?;
    block_on(async {
        lab.docker(1)
            .create_volume(VolumeCreateRequest {
                name: Some(src.clone()),
                ..Default::default()
            })
            .await
            .context("creating the volume on node 2")?;
        let mb = data_mb();
        fill(&host_path(2, &src), mb).context("filling the volume")?;
        let want = snapshot(&host_path(2, &src));

        let t = Transfers::new(lab.docker(0), &inst, TEST_AGENT_IMAGE)
            .await?
            .host_network(true)
            .timeout(Duration::from_secs(300));
        ensure!(t.local_node_id() == lab.node(0).node_id);
        let v = VolumeOnNode {
            volume: src.clone(),
            node_id: lab.node(1).node_id.clone(),
            node_name: lab.node(1).hostname.clone(),
        };
        ensure!(
            t.exists(&v).await?.is_none(),
            "a remote volume's existence is unknown"
        );
        let started = Instant::now();
        let read = t.read(&v, &staging.path().join("vol")).await?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "read {} MB from node 2 in {secs:.2} s ({:.1} MB/s, agent start included)",
            read.bytes / 1_000_000,
            read.bytes as f64 / 1e6 / secs
        );
        ensure!(!read.in_place);
        let got = snapshot(&read.path);
        ensure!(
            got == want,
            "staging differs from the volume:\n{got:#?}\nvs\n{want:#?}"
        );

        // Restore on node 3 under a new name, from a tar stream as restic's dump would give.
        let (rd, wr) = tokio::io::duplex(1 << 16);
        let dir = read.path.clone();
        let packer = tokio::task::spawn_blocking(move || {
            let mut wr = tokio_util::io::SyncIoBridge::new(wr);
            let r = stream::pack(&dir, &mut wr);
            let _ = wr.shutdown();
            r
        });
        let started = Instant::now();
        let w = t.write(&lab.node(2).node_id, &restored, rd).await?;
        let secs = started.elapsed().as_secs_f64();
        packer.await??;
        eprintln!(
            "restored {} MB on node 3 in {secs:.2} s ({:.1} MB/s, agent start included)",
            w.bytes / 1_000_000,
            w.bytes as f64 / 1e6 / secs
        );
        ensure!(w.via_agent && w.bytes == read.bytes && w.files == read.files);
        let got = snapshot(&host_path(3, &restored));
        ensure!(
            got == want,
            "the restored volume differs:\n{got:#?}\nvs\n{want:#?}"
        );
        let vol = lab.docker(2).inspect_volume(&restored).await?;
        ensure!(
            vol.labels.get("io.berth.name") == Some(&restored)
                && vol.labels.get("io.berth.instance") == Some(&inst),
            "the new volume carries berth's labels: {:?}",
            vol.labels
        );

        // Nothing of the transfers is left in the swarm.
        let filters = Some(HashMap::from([(
            "label".to_string(),
            vec![format!("io.berth.instance={inst}")],
        )]));
        let docker = lab.docker(0);
        let services = docker
            .list_services(Some(ListServicesOptions {
                filters: filters.clone(),
                ..Default::default()
            }))
            .await?;
        let secrets = docker
            .list_secrets(Some(ListSecretsOptions { filters }))
            .await?;
        ensure!(
            services.is_empty() && secrets.is_empty(),
            "left behind: {} services, {} secrets",
            services.len(),
            secrets.len()
        );
        // Nor any agent container on the nodes (they would hold the volumes).
        for i in [1, 2] {
            let mut left = Vec::new();
            for _ in 0..60 {
                left = lab
                    .docker(i)
                    .list_containers(Some(ListContainersOptions {
                        all: true,
                        filters: Some(HashMap::from([(
                            "label".to_string(),
                            vec![format!("io.berth.instance={inst}")],
                        )])),
                        ..Default::default()
                    }))
                    .await?;
                if left.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            ensure!(
                left.is_empty(),
                "agent containers left on node index {i}: {left:?}"
            );
        }
        Ok(())
    })
}

/// Removes volumes from lab nodes' engines when dropped, with the docker CLI (a drop may happen
/// inside [`block_on`]), retrying for up to 30 s: a volume stays in use until the containers of
/// the service that was just removed are gone from its node.
struct NodeVolumesGone<'a> {
    lab: &'a Lab,
    /// (node index, volume name)
    volumes: Vec<(usize, String)>,
}

impl Drop for NodeVolumesGone<'_> {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, v) in &self.volumes {
            let Some(host) = self.lab.node(*i).docker_host.clone() else {
                continue;
            };
            loop {
                let exists = Command::new("docker")
                    .args(["-H", &host, "volume", "inspect", v])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if !exists {
                    break;
                }
                let _ = Command::new("docker")
                    .args(["-H", &host, "volume", "rm", "-f", v])
                    .output();
                if Instant::now() > deadline {
                    eprintln!("lab: volume {v} is still on node index {i}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// A shell script writing files of several owners and modes into `$1`: a private file, a setuid
/// program, a group-readable directory of another owner, a symlink with its own owner, an empty
/// directory, 1 MiB of random data, and old mtimes.
const WRITE_FILES: &str = r#"set -e
cd "$1"
mkdir -p db/wal bin empty uploads
printf 'patient 17: fine' > secret.txt
chown 1234:5678 secret.txt
chmod 600 secret.txt
head -c 1048576 /dev/urandom > db/main.dat
chown 999:999 db/main.dat
chmod 640 db/main.dat
printf 'write-ahead' > db/wal/0001
chown 1234:5678 db/wal/0001 db/wal
chmod 640 db/wal/0001
chmod 2750 db/wal
printf '#!/bin/sh\necho hi\n' > bin/tool
chmod 4755 bin/tool
chown 1000:1000 bin
ln -s ../db/main.dat uploads/link
chown -h 33:33 uploads/link
chown 65534:65534 empty
chmod 700 empty
touch -t 200109090146.40 secret.txt db/main.dat db/wal/0001 bin/tool
chmod 750 .
"#;

/// A shell script listing every entry under `$1`, sorted: kind, mode (octal and symbolic),
/// owner, and for files size, mtime and MD5, for symlinks the target. Directory mtimes are left
/// out (they move as entries are written).
const LIST_FILES: &str = r#"cd "$1" || exit 1
find . | sort | while read -r f; do
  if [ -L "$f" ]; then echo "$f link -> $(readlink "$f") $(stat -c '%u:%g' "$f")"
  elif [ -d "$f" ]; then echo "$f dir $(stat -c '%a %A %u:%g' "$f")"
  else echo "$f file $(stat -c '%a %A %u:%g %s %Y' "$f") $(md5sum < "$f" | cut -d' ' -f1)"
  fi
done
"#;

/// Runs `docker -H <node i's engine> ARGS` and returns its stdout, or fails with its stderr.
fn docker_on(lab: &Lab, i: usize, args: &[&str]) -> Result<String> {
    let host = lab
        .node(i)
        .docker_host
        .clone()
        .context("a lab node other than the manager")?;
    let out = Command::new("docker")
        .args(["-H", &host])
        .args(args)
        .output()
        .context("running docker")?;
    ensure!(
        out.status.success(),
        "docker -H {host} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn berth_backs_up_a_volume_on_node_2_and_restores_it_on_node_3(lab: &Lab) -> Result<()> {
    let p = prefix("labbk");
    let volume = format!("{p}-data");
    let copy = format!("{p}-copy");
    let service = format!("{p}-app");
    // Dropped in reverse order: berth stops (and removes what its installation made), then the
    // prefix's Swarm objects on the manager go, then the volumes on nodes 2 and 3.
    let _volumes = NodeVolumesGone {
        lab,
        volumes: vec![(1, volume.clone()), (2, copy.clone())],
    };
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start_env(&[], &[("BERTH_AGENT_HOST_NETWORK", "1")]);
    let repo = b.backup_dir().join("repo");
    let started = Instant::now();

    // An unencrypted network: encrypted overlays carry nothing between the lab's namespaces
    // (LAB-NOTES), and berth's default network would be encrypted.
    b.apply(&format!(
        r#"apiVersion: berth/v1
kind: Volume
metadata:
  name: {volume}
spec: {{}}
---
apiVersion: berth/v1
kind: Network
metadata:
  name: {p}-plain
spec:
  encrypted: false
---
apiVersion: berth/v1
kind: Service
metadata:
  name: {service}
spec:
  image: {BUSYBOX}
  command: ["sleep", "100000"]
  init: true
  stopGracePeriod: 1s
  replicas: 1
  networks: [{p}-plain]
  placement:
    constraints: ["node.hostname == {node2}"]
  volumes:
    - target: /data
      volume: {volume}
---
apiVersion: berth/v1
kind: Backup
metadata:
  name: {p}-plan
spec:
  schedule: "0 0 1 1 *"
  repository:
    path: {repo}
"#,
        node2 = lab.node(1).hostname,
        repo = repo.display(),
    ));

    block_on(async {
        let tasks = lab
            .wait_running_tasks(&service, 1, Duration::from_secs(90))
            .await?;
        ensure!(
            tasks[0].0 == 1,
            "the task runs on node index {}, not node 2",
            tasks[0].0
        );
        let (_, container) = lab.task_container(&tasks[0])?;
        let (code, out) = lab
            .exec(1, &container, &["sh", "-c", WRITE_FILES, "sh", "/data"])
            .await?;
        ensure!(code == 0, "writing the files on node 2: {out}");
        let (code, want) = lab
            .exec(1, &container, &["sh", "-c", LIST_FILES, "sh", "/data"])
            .await?;
        ensure!(code == 0, "listing the files on node 2: {want}");
        ensure!(
            want.contains("./bin/tool file 4755 -rwsr-xr-x 0:0")
                && want.contains("./secret.txt file 600 -rw------- 1234:5678 16 1000000000")
                && want.contains("./uploads/link link -> ../db/main.dat 33:33"),
            "the files were not written as meant:\n{want}"
        );
        eprintln!(
            "{service} on node 2 ready, files written after {:.1}s",
            started.elapsed().as_secs_f64()
        );

        // The backup: the volume is read on node 2 by an agent task on its host network.
        let t = Instant::now();
        let out = b.cli_ok(&["backup", "run", &format!("{p}-plan")]);
        eprintln!("berth backup run: {:.1}s", t.elapsed().as_secs_f64());
        let id = out
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("no snapshot id in `{out}`"))?
            .to_string();
        let list = b.cli_ok(&[
            "backup",
            "list",
            "--plan",
            &format!("{p}-plan"),
            "-o",
            "json",
        ]);
        let list: serde_json::Value = serde_json::from_str(&list)?;
        let rec = list["items"]
            .as_array()
            .and_then(|items| items.iter().find(|r| r["id"] == id.as_str()))
            .with_context(|| format!("snapshot {id} is not in the evidence: {list}"))?;
        ensure!(rec["ok"] == true, "the run failed: {rec}");
        let vols: Vec<&serde_json::Value> = rec["volumes"]
            .as_array()
            .map(|v| v.iter().filter(|v| v["name"] == volume.as_str()).collect())
            .unwrap_or_default();
        ensure!(
            vols.len() == 1
                && vols[0]["node"] == lab.node(1).hostname.to_ascii_lowercase().as_str()
                && vols[0]["nodeId"] == lab.node(1).node_id.as_str(),
            "the evidence has {volume} once, on {}: {rec}",
            lab.node(1).hostname
        );
        // 4 files, 1 symlink, 5 directories (the volume's root not counted).
        ensure!(vols[0]["files"] == 10, "file count: {rec}");

        // Restored on node 3 under a new name, by an agent task there.
        let t = Instant::now();
        b.cli_ok(&[
            "restore",
            "volume",
            "--snapshot",
            &id,
            "--volume",
            &volume,
            "--node",
            &lab.node(2).hostname,
            "--as",
            &copy,
        ]);
        eprintln!(
            "berth restore volume on node 3: {:.1}s",
            t.elapsed().as_secs_f64()
        );
        // Looked at through node 3's own engine, from a container mounting the new volume.
        let got = docker_on(
            lab,
            2,
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "-v",
                &format!("{copy}:/d"),
                BUSYBOX,
                "sh",
                "-c",
                LIST_FILES,
                "sh",
                "/d",
            ],
        )?;
        ensure!(
            got == want,
            "the copy on node 3 differs:\n{got}\nvs the volume on node 2:\n{want}"
        );
        let labels = docker_on(
            lab,
            2,
            &["volume", "inspect", "--format", "{{json .Labels}}", &copy],
        )?;
        let labels: HashMap<String, String> = serde_json::from_str(labels.trim())?;
        ensure!(
            labels.get("io.berth.name") == Some(&copy)
                && labels.get("io.berth.instance") == Some(&b.instance),
            "the new volume carries berth's labels: {labels:?}"
        );

        // No agent service or secret left in the swarm, no agent container on nodes 2 and 3.
        let docker = lab.docker(0);
        let services = docker
            .list_services(None::<ListServicesOptions>)
            .await?
            .into_iter()
            .filter_map(|s| s.spec?.name)
            .filter(|n| n.starts_with("berth-transfer-"))
            .count();
        let secrets = docker
            .list_secrets(Some(ListSecretsOptions {
                filters: Some(HashMap::from([(
                    "label".to_string(),
                    vec![format!("io.berth.instance={}", b.instance)],
                )])),
            }))
            .await?
            .into_iter()
            .filter_map(|s| s.spec?.name)
            .filter(|n| n.starts_with("berth-transfer-"))
            .count();
        ensure!(
            services == 0 && secrets == 0,
            "left behind: {services} transfer services, {secrets} transfer secrets"
        );
        for i in [1, 2] {
            let mut left = String::new();
            for _ in 0..60 {
                left = docker_on(
                    lab,
                    i,
                    &["ps", "-a", "-q", "--filter", "name=berth-transfer-"],
                )?;
                if left.trim().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            ensure!(
                left.trim().is_empty(),
                "agent containers left on node index {i}: {left}"
            );
        }
        eprintln!("scenario body: {:.1}s", started.elapsed().as_secs_f64());
        Ok(())
    })
    .map_err(|e| e.context(format!("--- berth up log ---\n{}", tail(&b.log_text(), 60))))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
