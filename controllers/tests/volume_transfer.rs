//! Volume transfers (controllers/src/backup) against the real single-node Swarm engine: the local
//! fast path, and the agent path forced on the same node (a real agent task of the
//! `berth-test/agent:1` image that scripts/test builds from the berth binary, a real TLS channel,
//! a real grant secret). The same path across nodes runs in the 3-node lab
//! (`tests/tests/lab/backup.rs`). Each test uses its own name prefix and installation id; the
//! volumes it made are removed when it ends, and it checks that the transfers left no agent
//! service or grant secret behind.

mod common;

use berth_api_types::names::labels;
use berth_controllers::backup::stream;
use berth_controllers::backup::volumes::{self, Transfers, VolumeOnNode, TEST_AGENT_IMAGE};
use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{ListContainersOptions, ListSecretsOptions, ListServicesOptions};
use bollard::Docker;
use common::{swarm_engine, test_names, Cleanup};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every entry under `root` with what must survive: kind, content or link target, uid:gid, mode,
/// mtime, link count (a symlink's own mode and mtime are not compared).
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
                (
                    format!(
                        "{} bytes sum {}",
                        data.len(),
                        data.iter().map(|b| *b as u64).sum::<u64>()
                    ),
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

/// Fills `root` with what a transfer must keep: owners 0:0, 1234:5678 and 1000:1000, modes
/// 0600/0755/04755, a symlink (owned by 42:43) and a dangling one, an empty directory, a hard
/// link, a long name, a past mtime, and 3 MB of data.
fn fill(root: &Path) {
    let chown = |p: &Path, u, g| std::os::unix::fs::lchown(p, Some(u), Some(g)).unwrap();
    let mode = |p: &Path, m| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    fs::write(root.join("secret.txt"), b"patient 17: fine").unwrap();
    mode(&root.join("secret.txt"), 0o600);
    chown(&root.join("secret.txt"), 1234, 5678);
    fs::create_dir_all(root.join("bin/empty")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    mode(&root.join("bin/tool"), 0o755);
    fs::write(root.join("bin/suid"), b"#!/bin/sh\n").unwrap();
    mode(&root.join("bin/suid"), 0o4755);
    chown(&root.join("bin"), 1000, 1000);
    symlink("bin/tool", root.join("tool-link")).unwrap();
    chown(&root.join("tool-link"), 42, 43);
    symlink("/nowhere/at/all", root.join("dangling")).unwrap();
    fs::hard_link(root.join("secret.txt"), root.join("bin/hard")).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(root.join("big.bin"), data).unwrap();
    let long = root.join("a".repeat(100)).join("b".repeat(140));
    fs::create_dir_all(long.parent().unwrap()).unwrap();
    fs::write(&long, b"long name").unwrap();
    let past = filetime::FileTime::from_unix_time(1_000_000_000, 0);
    for p in ["secret.txt", "bin/empty", "bin", "big.bin"] {
        filetime::set_file_mtime(root.join(p), past).unwrap();
    }
    mode(root, 0o750);
}

async fn mountpoint(docker: &Docker, volume: &str) -> PathBuf {
    PathBuf::from(docker.inspect_volume(volume).await.unwrap().mountpoint)
}

async fn create_volume(docker: &Docker, name: &str) -> PathBuf {
    docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.to_string()),
            ..Default::default()
        })
        .await
        .unwrap();
    mountpoint(docker, name).await
}

/// The agent services, grant secrets and (within 30 s of the service's removal) agent containers
/// of installation `inst` still in the engine.
async fn leftovers(docker: &Docker, inst: &str) -> Vec<String> {
    let mut containers = Vec::new();
    for _ in 0..60 {
        containers = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([(
                    "label".to_string(),
                    vec![format!("{}={inst}", labels::INSTANCE)],
                )])),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_iter()
            .map(|c| format!("container {:?} {:?}", c.names, c.status))
            .collect();
        if containers.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let filters = Some(HashMap::from([(
        "label".to_string(),
        vec![format!("{}={inst}", labels::INSTANCE)],
    )]));
    let mut out: Vec<String> = docker
        .list_services(Some(ListServicesOptions {
            filters: filters.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_iter()
        .map(|s| format!("service {:?}", s.spec.and_then(|s| s.name)))
        .collect();
    out.extend(
        docker
            .list_secrets(Some(ListSecretsOptions { filters }))
            .await
            .unwrap()
            .into_iter()
            .map(|s| format!("secret {:?}", s.spec.and_then(|s| s.name))),
    );
    out.extend(containers);
    out
}

/// A tar of `dir` as an `AsyncRead`, produced on a blocking thread (as restic's `dump` would
/// stream it).
fn tar_of(dir: PathBuf) -> impl tokio::io::AsyncRead + Unpin + Send + 'static {
    let (rd, wr) = tokio::io::duplex(1 << 16);
    let wr = tokio_util::io::SyncIoBridge::new(wr);
    tokio::task::spawn_blocking(move || {
        let mut wr = wr;
        stream::pack(&dir, &mut wr).unwrap();
        wr.shutdown().ok();
        drop(wr);
    });
    rd
}

async fn node_id(docker: &Docker) -> String {
    docker.info().await.unwrap().swarm.unwrap().node_id.unwrap()
}

/// Through a real agent task on this node: a volume with files of several owners and modes is
/// read into a staging directory identical to it, and written into a new volume identical again,
/// which the agent creates with berth's Volume labels. The agent's service shows no grant, drops
/// every capability but the one it needs, and mounts the volume read-only; nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_path_reads_and_writes_a_volume_exactly() {
    let docker = swarm_engine().await;
    let (prefix, inst) = test_names("volxfer");
    let _cleanup = Cleanup(prefix.clone());
    let src = format!("{prefix}-src");
    let copy = format!("{prefix}-copy");
    fill(&create_volume(&docker, &src).await);
    let node = node_id(&docker).await;
    let t = Transfers::new(docker.clone(), &inst, TEST_AGENT_IMAGE)
        .await
        .expect("transfers")
        .always_agent(true)
        .timeout(Duration::from_secs(180));

    // Watch for the agent's service while the read runs, to check what it is allowed.
    let watch = {
        let docker = docker.clone();
        let inst = inst.clone();
        tokio::spawn(async move {
            let filters = Some(HashMap::from([(
                "label".to_string(),
                vec![
                    format!("{}={inst}", labels::INSTANCE),
                    format!("{}={}", labels::ROLE, volumes::ROLE_AGENT),
                ],
            )]));
            for _ in 0..600 {
                let s = docker
                    .list_services(Some(ListServicesOptions {
                        filters: filters.clone(),
                        ..Default::default()
                    }))
                    .await
                    .unwrap();
                if let Some(s) = s.into_iter().next() {
                    return Some(serde_json::to_value(s.spec.unwrap()).unwrap());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        })
    };
    let staging = tempfile::tempdir().unwrap();
    let v = VolumeOnNode {
        volume: src.clone(),
        node_id: node.clone(),
        node_name: "local".into(),
    };
    let started = Instant::now();
    let read = t.read(&v, &staging.path().join("vol")).await.expect("read");
    eprintln!(
        "agent read of {} bytes took {:?}",
        read.bytes,
        started.elapsed()
    );
    assert!(!read.in_place);
    assert_eq!(read.path, staging.path().join("vol"));
    let want = snapshot(&mountpoint(&docker, &src).await);
    assert_eq!(snapshot(&read.path), want, "staging == volume");
    assert_eq!(
        read.files,
        want.len() as u64 - 1,
        "every entry but the root"
    );
    assert!(read.bytes > 3_000_000);

    let spec = watch.await.unwrap().expect("the agent's service was seen");
    let text = spec.to_string();
    let hex_run = text
        .as_bytes()
        .split(|b| !b.is_ascii_hexdigit())
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0);
    assert!(
        hex_run < 64,
        "no token-like string in the agent's spec: {text}"
    );
    let c = &spec["TaskTemplate"]["ContainerSpec"];
    assert!(c["Env"].is_null(), "no environment: {c}");
    assert_eq!(c["CapabilityDrop"], serde_json::json!(["ALL"]));
    assert_eq!(
        c["CapabilityAdd"],
        serde_json::json!(["CAP_DAC_READ_SEARCH"])
    );
    assert_eq!(c["ReadOnly"], true);
    assert_eq!(c["Mounts"].as_array().unwrap().len(), 1, "one mount: {c}");
    assert_eq!(c["Mounts"][0]["ReadOnly"], true);
    assert_eq!(c["Mounts"][0]["Source"], src.as_str());
    assert_eq!(
        spec["TaskTemplate"]["Placement"]["Constraints"],
        serde_json::json!([format!("node.id=={node}")])
    );
    assert_eq!(spec["Labels"][labels::KIND], "backup");
    assert_eq!(spec["Labels"][labels::NAME], src.as_str());

    // Write it back under a new name, through the agent.
    let started = Instant::now();
    let w = t
        .write(&node, &copy, tar_of(read.path.clone()))
        .await
        .expect("write");
    eprintln!("agent write took {:?}", started.elapsed());
    assert!(w.via_agent);
    assert_eq!((w.files, w.bytes), (read.files, read.bytes));
    let copied = docker.inspect_volume(&copy).await.unwrap();
    assert_eq!(
        copied.labels.get(labels::KIND).map(String::as_str),
        Some("volume")
    );
    assert_eq!(copied.labels.get(labels::NAME), Some(&copy));
    assert_eq!(copied.labels.get(labels::INSTANCE), Some(&inst));
    assert_eq!(
        snapshot(&PathBuf::from(&copied.mountpoint)),
        want,
        "new volume == original"
    );

    // A restore replaces: what the volume has and the stream does not goes.
    fs::write(PathBuf::from(&copied.mountpoint).join("stray"), b"x").unwrap();
    t.write(&node, &copy, tar_of(read.path.clone()))
        .await
        .expect("second write");
    assert_eq!(
        snapshot(&PathBuf::from(&copied.mountpoint)),
        want,
        "stray file removed"
    );

    assert_eq!(leftovers(&docker, &inst).await, Vec::<String>::new());
}

/// On berth's own node the volume is read in place (its mountpoint, nothing copied) and written
/// directly, creating a missing volume with berth's labels.
#[tokio::test]
async fn the_local_path_reads_in_place_and_writes_directly() {
    let docker = swarm_engine().await;
    let (prefix, inst) = test_names("volxfer");
    let _cleanup = Cleanup(prefix.clone());
    let src = format!("{prefix}-src");
    let copy = format!("{prefix}-copy");
    let mp = create_volume(&docker, &src).await;
    fill(&mp);
    let node = node_id(&docker).await;
    let t = Transfers::new(docker.clone(), &inst, TEST_AGENT_IMAGE)
        .await
        .unwrap();
    let v = VolumeOnNode {
        volume: src.clone(),
        node_id: node.clone(),
        node_name: String::new(),
    };
    assert_eq!(t.exists(&v).await.unwrap(), Some(true));
    let gone = VolumeOnNode {
        volume: format!("{prefix}-none"),
        ..v.clone()
    };
    assert_eq!(t.exists(&gone).await.unwrap(), Some(false));
    let staging = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let read = t.read(&v, staging.path()).await.unwrap();
    eprintln!(
        "local read (in place, counted) took {:?}",
        started.elapsed()
    );
    assert!(read.in_place);
    assert_eq!(read.path, mp);
    let want = snapshot(&mp);
    assert_eq!(read.files, want.len() as u64 - 1);
    assert_eq!(
        fs::read_dir(staging.path()).unwrap().count(),
        0,
        "nothing staged"
    );

    let w = t.write(&node, &copy, tar_of(mp.clone())).await.unwrap();
    assert!(!w.via_agent);
    let copied = docker.inspect_volume(&copy).await.unwrap();
    assert_eq!(copied.labels.get(labels::NAME), Some(&copy));
    assert_eq!(snapshot(&PathBuf::from(&copied.mountpoint)), want);
    assert_eq!(leftovers(&docker, &inst).await, Vec::<String>::new());
}

/// An agent that cannot start (an image the node does not have) fails the transfer at once, with
/// the engine's reason, not at the timeout; its service and secret are removed.
#[tokio::test]
async fn an_agent_that_cannot_start_fails_fast_and_leaves_nothing() {
    let docker = swarm_engine().await;
    let (prefix, inst) = test_names("volxfer");
    let _cleanup = Cleanup(prefix.clone());
    let src = format!("{prefix}-src");
    create_volume(&docker, &src).await;
    let t = Transfers::new(docker.clone(), &inst, "berth-test/no-such-agent:1")
        .await
        .unwrap()
        .always_agent(true)
        .timeout(Duration::from_secs(120));
    let v = VolumeOnNode {
        volume: src,
        node_id: node_id(&docker).await,
        node_name: String::new(),
    };
    let staging = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let err = t.read(&v, staging.path()).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "failed after {:?}",
        started.elapsed()
    );
    let msg = err.to_string();
    assert!(
        msg.contains("transfer agent") && msg.contains("task"),
        "{msg}"
    );

    // A node the swarm does not have: refused before anything is created.
    let nowhere = VolumeOnNode {
        node_id: "nosuchnode0000000000000000".into(),
        ..v
    };
    let err = t.read(&nowhere, staging.path()).await.unwrap_err();
    assert!(err.to_string().contains("not in the swarm"), "{err}");
    assert_eq!(leftovers(&docker, &inst).await, Vec::<String>::new());
}
