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

use anyhow::{ensure, Context, Result};
use berth_controllers::backup::stream;
use berth_controllers::backup::volumes::{Transfers, VolumeOnNode, TEST_AGENT_IMAGE};
use berth_e2e::lab::{block_on, Lab, Scenario};
use berth_e2e::prefix;
use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{
    ListContainersOptions, ListSecretsOptions, ListServicesOptions, RemoveVolumeOptions,
};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "a_volume_on_node_2_is_read_and_restored_on_node_3",
        run: a_volume_on_node_2_is_read_and_restored_on_node_3,
    }]
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
