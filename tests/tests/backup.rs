//! End-to-end tests of backups on the single-node swarm: `berth up` with a Backup plan whose
//! repository is in the test's own directory, a busybox Service with a named volume, Debian's
//! `restic` as the independent checker.
//!
//! Each test names its Swarm objects after its own `prefix(..)`; the `Cleanup` guard is declared
//! before berth so berth stops first. Volumes are written and compared through their mountpoint on
//! this machine (tests run as root on the manager, where the engine keeps local volumes).

use berth_api_types::Kind;
use berth_e2e::{condition, docker, eventually, prefix, Berth, Cleanup};
use bollard::query_parameters::ListTasksOptions;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const IMAGE: &str = "berth-test/busybox:1";
const CONVERGE: Duration = Duration::from_secs(60);

/// A plan writing to `repo`, scheduled far away (runs are asked for by the test).
fn plan_yaml(name: &str, repo: &Path, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Backup\nmetadata:\n  name: {name}\nspec:\n  schedule: \"0 0 1 1 *\"\n  \
         repository:\n    path: {}\n{extra}",
        repo.display()
    )
}

/// A network, a busybox Service mounting named volume `volume` at /data, and (optionally) a
/// Secret it prints at start.
fn app_yaml(p: &str, volume: &str) -> String {
    format!(
        r#"apiVersion: berth/v1
kind: Volume
metadata:
  name: {volume}
spec: {{}}
---
apiVersion: berth/v1
kind: Network
metadata:
  name: {p}-net
spec:
  encrypted: false
---
apiVersion: berth/v1
kind: Secret
metadata:
  name: {p}-token
spec:
  stringData:
    token: restored-secret-value
---
apiVersion: berth/v1
kind: Config
metadata:
  name: {p}-conf
spec:
  stringData:
    app.conf: "mode=production\n"
---
apiVersion: berth/v1
kind: Service
metadata:
  name: {p}-app
spec:
  image: {IMAGE}
  command: ["sh", "-c", "echo secret=$(cat /run/secrets/token); sleep 100000"]
  init: true
  stopGracePeriod: 1s
  networks: [{p}-net]
  secrets:
    - name: {p}-token
      target: token
  configs:
    - name: {p}-conf
  volumes:
    - target: /data
      volume: {volume}
    - target: /scratch
      tmpfs: true
    - target: /cache
"#
    )
}

/// The engine's directory of a local volume on this node.
async fn mountpoint(volume: &str) -> PathBuf {
    let d = docker().await;
    let v = d
        .inspect_volume(volume)
        .await
        .unwrap_or_else(|e| panic!("volume {volume}: {e}"));
    PathBuf::from(v.mountpoint)
}

async fn wait_running(b: &Berth, service: &str) {
    let d = docker().await;
    eventually(b, CONVERGE, &format!("a running task of {service}"), || {
        let d = d.clone();
        async move {
            let filters = HashMap::from([("service".to_string(), vec![service.to_string()])]);
            let tasks = d
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(filters),
                }))
                .await
                .map_err(|e| e.to_string())?;
            tasks
                .iter()
                .any(|t| {
                    t.status
                        .as_ref()
                        .and_then(|s| s.state.as_ref())
                        .map(|s| s.to_string())
                        == Some("running".into())
                })
                .then_some(())
                .ok_or_else(|| format!("{} task(s), none running", tasks.len()))
        }
    })
    .await
}

/// Files of several owners and modes, a symlink, an empty directory, a file with an old mtime.
fn populate(dir: &Path) {
    let write = |rel: &str, content: &[u8], mode: u32, owner: (u32, u32)| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        std::os::unix::fs::chown(&p, Some(owner.0), Some(owner.1)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("db/main.dat", &vec![7u8; 300_000], 0o600, (999, 999));
    write("db/wal/0001", b"write-ahead", 0o640, (1234, 5678));
    write("bin/tool", b"#!/bin/sh\necho hi\n", 0o4755, (0, 0));
    write(
        "uploads/photo.jpg",
        &(0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
        0o644,
        (33, 33),
    );
    std::os::unix::fs::symlink("../db/main.dat", dir.join("uploads/link")).unwrap();
    // Whole seconds: a tar header (restic's dump, the agents' stream) holds seconds, so that is
    // the precision a restore keeps.
    let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    for f in ["db/main.dat", "bin/tool", "uploads/photo.jpg"] {
        std::fs::File::options()
            .write(true)
            .open(dir.join(f))
            .unwrap()
            .set_modified(now)
            .unwrap();
    }
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(dir, Some(0), Some(1234)).unwrap();
    std::fs::set_permissions(dir.join("empty"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let f = std::fs::File::options()
        .write(true)
        .open(dir.join("db/wal/0001"))
        .unwrap();
    f.set_modified(old).unwrap();
}

/// Everything that must survive a round trip, per relative path: type, mode, owner, mtime (files
/// and links), content or link target.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if ft.is_dir() {
                "dir".to_string()
            } else {
                let bytes = std::fs::read(&p).unwrap();
                format!(
                    "file {} bytes, sum {}",
                    bytes.len(),
                    bytes.iter().map(|b| *b as u64).sum::<u64>()
                )
            };
            // A directory's mtime moves as its entries are written, a symlink's is not data.
            let mtime = if ft.is_dir() || ft.is_symlink() {
                0
            } else {
                m.mtime()
            };
            out.insert(
                rel,
                format!(
                    "{what} mode {:o} owner {}:{} mtime {mtime}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
            );
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    // The volume's root has an owner and mode of its own.
    let m = std::fs::metadata(dir).unwrap();
    out.insert(
        ".".into(),
        format!(
            "root mode {:o} owner {}:{}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        ),
    );
    walk(dir, dir, &mut out);
    out
}

fn wipe(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

/// `berth backup run PLAN`; returns berth's snapshot id.
fn run_backup(b: &Berth, plan: &str) -> String {
    let out = b.cli_ok(&["backup", "run", plan]);
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no snapshot id in `{out}`"))
        .to_string()
}

fn evidence(b: &Berth, plan: &str) -> Vec<serde_json::Value> {
    let out = b.cli_ok(&["backup", "list", "--plan", plan, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Debian's restic against the repository, with the key berth prints.
fn restic(b: &Berth, repo: &Path, args: &[&str]) -> std::process::Output {
    let key = b.cli_ok(&["backup", "key"]);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, key.trim()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    Command::new("restic")
        .arg("-r")
        .arg(repo)
        .args(args)
        .env("RESTIC_PASSWORD_FILE", &key_file)
        .env("RESTIC_CACHE_DIR", dir.path().join("cache"))
        .output()
        .expect("restic is installed (scripts/test installs it)")
}

fn dir_size(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    n
}

#[tokio::test]
async fn a_volume_round_trips_with_owners_modes_and_links_and_restic_agrees() {
    let p = prefix("bkvol");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let repo = b.backup_dir().join("repo");
    let volume = format!("{p}-data");
    b.apply(&app_yaml(&p, &volume));
    b.apply(&plan_yaml("nightly", &repo, ""));
    wait_running(&b, &format!("{p}-app")).await;
    let dir = mountpoint(&volume).await;
    populate(&dir);
    let before = tree(&dir);

    let id = run_backup(&b, "nightly");
    let ev = evidence(&b, "nightly");
    let rec = ev
        .iter()
        .find(|r| r["id"] == id.as_str())
        .expect("the snapshot is listed");
    assert_eq!(rec["ok"], true);
    assert_eq!(rec["objects"]["Service"], 1, "{rec}");
    let vols = rec["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1, "{rec}");
    assert_eq!(vols[0]["name"], volume.as_str());
    // Entries: 4 files, 1 symlink, 5 directories.
    assert_eq!(vols[0]["files"], 10, "{rec}");
    let excluded: Vec<&str> = rec["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    assert_eq!(excluded, ["/scratch", "/cache"], "{rec}");
    // CSV evidence has the same snapshot.
    let csv = b.cli_ok(&["backup", "list", "--plan", "nightly", "-o", "csv"]);
    assert!(
        csv.lines().nth(1).is_some_and(|l| l.starts_with(&id)),
        "{csv}"
    );

    // Wiped, restored in place: identical, owners, modes, mtimes and the link included.
    wipe(&dir);
    b.cli_ok(&["restore", "volume", "--snapshot", &id, "--volume", &volume]);
    assert_eq!(tree(&dir), before);

    // As a new volume.
    let copy = format!("{p}-copy");
    b.cli_ok(&[
        "restore",
        "volume",
        "--snapshot",
        &id,
        "--volume",
        &volume,
        "--as",
        &copy,
    ]);
    assert_eq!(tree(&mountpoint(&copy).await), before);

    // The independent check: Debian's restic reads every pack and restores the same files.
    let check = restic(&b, &repo, &["check", "--read-data"]);
    assert!(
        check.status.success(),
        "restic check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let target = tempfile::tempdir().unwrap();
    let restic_id = rec["resticSnapshot"].as_str().unwrap();
    let out = restic(
        &b,
        &repo,
        &[
            "restore",
            restic_id,
            "--target",
            target.path().to_str().unwrap(),
            "--include",
            vols[0]["path"].as_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "restic restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = target
        .path()
        .join(vols[0]["path"].as_str().unwrap().trim_start_matches('/'));
    assert_eq!(
        tree(&restored),
        before,
        "restic's restore differs from the volume"
    );

    // A bad restore request changes nothing and says why.
    let bad = b.cli(&["restore", "volume", "--snapshot", &id, "--volume", "nope"]);
    assert!(!bad.success);
    assert!(
        bad.stderr.contains("holds no volume `nope`"),
        "{}",
        bad.stderr
    );
}

#[tokio::test]
async fn an_unchanged_volume_adds_almost_nothing_and_damage_is_found() {
    let p = prefix("bkdedup");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let repo = b.backup_dir().join("repo");
    let volume = format!("{p}-data");
    b.apply(&app_yaml(&p, &volume));
    b.apply(&plan_yaml("hourly", &repo, ""));
    wait_running(&b, &format!("{p}-app")).await;
    let dir = mountpoint(&volume).await;
    // 24 MiB that does not compress: a growth of under 1% is dedup, not zstd.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let data: Vec<u8> = (0..24 << 20)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    std::fs::write(dir.join("blob.bin"), &data).unwrap();

    let first = run_backup(&b, "hourly");
    let size1 = dir_size(&repo);
    let second = run_backup(&b, "hourly");
    let size2 = dir_size(&repo);
    let growth = size2 - size1;
    eprintln!(
        "backup: second, unchanged run added {growth} bytes to the repository ({} bytes of data)",
        data.len()
    );
    assert!(
        (growth as f64) < 0.01 * data.len() as f64,
        "the repository grew by {growth} bytes for an unchanged {} byte volume",
        data.len()
    );

    // Both verify; then one flipped byte in a pack is found and named.
    let ok = b.cli(&["backup", "verify", &second]);
    assert!(ok.success, "{}\n{}", ok.stdout, ok.stderr);
    let packs: Vec<PathBuf> = walk_files(&repo.join("data"));
    let big = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(big).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(big, &bytes).unwrap();
    let bad = b.cli(&["backup", "verify", &first]);
    assert!(!bad.success, "a damaged pack verified: {}", bad.stdout);
    assert!(
        bad.stdout.contains(&format!("snapshot {first}: DAMAGED")),
        "{}",
        bad.stdout
    );
    // What is damaged, in restic's words: the blob (and its pack, when restic can tell).
    assert!(
        bad.stdout.contains("blob") || bad.stdout.contains("pack"),
        "the damage is not named: {}",
        bad.stdout
    );
    let ev = evidence(&b, "hourly");
    let rec = ev.iter().find(|r| r["id"] == first.as_str()).unwrap();
    assert_eq!(rec["verification"]["ok"], false, "{rec}");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The whole installation lost (its data directory), then its Swarm objects removed too: a
/// restore into a fresh data directory brings back services, networks, configs and secrets that
/// work (the task prints the restored secret). Then, with the Swarm objects still there, a second
/// restore adopts them without restarting anything.
#[tokio::test]
async fn the_environment_comes_back_in_a_fresh_install() {
    let p = prefix("bkenv");
    let _cleanup = Cleanup::new(&p);
    let mut a = Berth::start(None);
    let repo = a.backup_dir().join("repo");
    let volume = format!("{p}-data");
    a.apply(&app_yaml(&p, &volume));
    a.apply(&plan_yaml("dr", &repo, ""));
    let app = format!("{p}-app");
    wait_running(&a, &app).await;
    let id = run_backup(&a, "dr");
    let key = a.cli_ok(&["backup", "key"]);
    let keep = tempfile::tempdir().unwrap();
    let key_file = keep.path().join("backup.key");
    std::fs::write(&key_file, key.trim()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The repository outlives the installation (it is outside the data directory).
    let repo_copy = keep.path().join("repo");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&repo)
        .arg(&repo_copy)
        .status()
        .unwrap()
        .success());
    let network = a.default_network.clone();
    let instance = a.instance.clone();
    a.stop();

    // 1. The manager is lost and everything berth made in Swarm is gone too.
    let d = docker().await;
    for s in ["service", "secret", "config", "network"] {
        let ids = Command::new("docker")
            .args([
                s,
                "ls",
                "-q",
                "--filter",
                &format!("label=io.berth.instance={instance}"),
            ])
            .output()
            .unwrap();
        let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").arg(s).arg("rm").args(&ids).output();
        }
    }
    drop(d);
    let fresh = keep.path().join("data");
    let restore =
        |dry: bool| berth_e2e::restore_environment(&id, &fresh, &repo_copy, &key_file, dry);
    let dry = restore(true);
    assert!(dry.contains(&format!("create service/{app}")), "{dry}");
    assert!(!fresh.join("store").exists(), "a dry run wrote a store");
    let done = restore(false);
    assert!(done.contains(&format!("create secret/{p}-token")), "{done}");

    let b = Berth::start_on(&fresh, &network, &[]);
    assert_eq!(
        b.instance, instance,
        "the restored berth is the same installation"
    );
    b.wait_condition(Kind::Service, &app, "Ready", CONVERGE, |c| {
        c["status"] == "True"
    })
    .await;
    wait_running(&b, &app).await;
    eventually(
        &b,
        CONVERGE,
        "the task prints the restored secret",
        || async {
            let logs = Command::new("docker")
                .args(["service", "logs", "--raw", &app])
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&logs.stdout).into_owned();
            text.contains("secret=restored-secret-value")
                .then_some(())
                .ok_or(text)
        },
    )
    .await;
    let task_before = running_task(&app).await;
    let mut b = b;
    b.stop();

    // 2. Lost again, but this time the Swarm objects are still there: adopted, nothing restarts.
    std::fs::remove_dir_all(&fresh).unwrap();
    restore(false);
    let c = Berth::start_on(&fresh, &network, &[]);
    let svc = c
        .wait_condition(Kind::Service, &app, "Ready", CONVERGE, |c| {
            c["status"] == "True"
        })
        .await;
    assert!(condition(&svc, "Ready").is_some());
    // A resync later the same task still runs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        running_task(&app).await,
        task_before,
        "adopting restarted the service"
    );
}

async fn running_task(service: &str) -> String {
    let d = docker().await;
    let filters = HashMap::from([
        ("service".to_string(), vec![service.to_string()]),
        ("desired-state".to_string(), vec!["running".to_string()]),
    ]);
    let tasks = d
        .list_tasks(Some(ListTasksOptions {
            filters: Some(filters),
        }))
        .await
        .unwrap();
    tasks.first().and_then(|t| t.id.clone()).unwrap_or_default()
}

/// The schedule fires on its own, the status shows the run and the next one, and a bad plan is
/// refused at apply with the field and the reason.
#[tokio::test]
async fn the_schedule_fires_and_bad_plans_are_refused() {
    let p = prefix("bksched");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start(None);
    let repo = b.backup_dir().join("repo");
    b.apply(&format!(
        "apiVersion: berth/v1\nkind: Backup\nmetadata:\n  name: minutely\nspec:\n  schedule: \"* * * * *\"\n  \
         repository:\n    path: {}\n",
        repo.display()
    ));
    let o = eventually(&b, Duration::from_secs(150), "a scheduled run", || async {
        let o = b.object(Kind::Backup, "minutely").await.ok_or("no plan")?;
        (o["status"]["snapshots"].as_u64() >= Some(1) && o["status"]["lastRun"]["ok"] == true)
            .then_some(o.clone())
            .ok_or(format!("status {}", o["status"]))
    })
    .await;
    assert!(o["status"]["nextRun"].is_string(), "{o}");
    assert_eq!(condition(&o, "LastRunFailed").unwrap()["status"], "False");
    assert_eq!(condition(&o, "Ready").unwrap()["status"], "True");

    let (_d, f) = berth_e2e::manifest(
        "bad.yaml",
        "apiVersion: berth/v1\nkind: Backup\nmetadata:\n  name: bad\nspec:\n  schedule: \"61 * * * *\"\n",
    );
    let out = b.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("spec.schedule: minute field `61` is out of range 0-59"),
        "{}",
        out.stderr
    );
    assert!(b.object(Kind::Backup, "bad").await.is_none());
}

/// A fresh installation has the `environment` plan, on the installation's own minute.
#[tokio::test]
async fn backups_are_on_from_first_start() {
    let b = Berth::start_env(&[], &[("BERTH_NO_DEFAULT_BACKUP_PLAN", "0")]);
    let o = eventually(&b, CONVERGE, "the default plan's status", || async {
        let o = b
            .object(Kind::Backup, "environment")
            .await
            .ok_or("no default plan")?;
        o["status"]["nextRun"]
            .is_string()
            .then_some(o.clone())
            .ok_or(format!("{o}"))
    })
    .await;
    let schedule = o["status"]["schedule"].as_str().unwrap();
    assert!(schedule.ends_with(" * * * *"), "hourly: {schedule}");
    let repo = o["status"]["repository"].as_str().unwrap();
    assert!(repo.ends_with(&b.instance), "{repo}");
}

/// A YAML block scalar (`|`) holding `text`, indented by `indent` spaces.
fn block(text: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::from("|\n");
    for line in text.lines() {
        out.push_str(&pad);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A plan whose repository is on an SFTP server, with its identity in Secret `identity`.
fn sftp_plan_yaml(name: &str, port: u16, path: &Path, identity: &str, known: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Backup\nmetadata:\n  name: {name}\nspec:\n  schedule: \"0 0 1 1 *\"\n  \
         repository:\n    sftp:\n      host: 127.0.0.1\n      port: {port}\n      user: root\n      \
         path: {}\n      identity: {{name: {identity}, key: id_ed25519}}\n      \
         knownHosts: {{name: {known}, key: known_hosts}}\n",
        path.display()
    )
}

/// A plan with an SFTP repository (a loopback sshd of the test's own), its key and pinned host key
/// in a Secret: the run goes over SFTP, the status and evidence say so, Debian's restic reads the
/// snapshot both over SFTP and from the directory the server wrote. A plan whose identity Secret
/// is missing is `PlanIncomplete` at once, its run fails naming the Secret, and it recovers when
/// the Secret appears. The private key is nowhere in berth's log, the statuses or the evidence.
#[tokio::test]
async fn an_sftp_repository_with_its_key_in_a_secret() {
    let p = prefix("bksftp");
    let _cleanup = Cleanup::new(&p);
    let t = berth_e2e::tempdir("sftp");
    let sshd = berth_e2e::sshd::Sshd::start(&t.path().join("sshd"));
    let remote = t.path().join("remote-repo");
    let b = Berth::start(None);
    let key = std::fs::read_to_string(sshd.client_key()).unwrap();
    let known = std::fs::read_to_string(sshd.known_hosts()).unwrap();
    let secret = format!("{p}-ssh");
    let secret_yaml = |name: &str| {
        format!(
            "apiVersion: berth/v1\nkind: Secret\nmetadata:\n  name: {name}\nspec:\n  stringData:\n    \
             id_ed25519: {}    known_hosts: {}",
            block(&key, 6),
            block(&known, 6)
        )
    };
    b.apply(&secret_yaml(&secret));
    b.apply(&sftp_plan_yaml(
        "offsite", sshd.port, &remote, &secret, &secret,
    ));

    let id = run_backup(&b, "offsite");
    assert!(
        remote.join("config").exists(),
        "the repository is where sshd wrote it"
    );
    // A run asked for is on the status at the plan's next refresh (at most a minute).
    let refresh = Duration::from_secs(90);
    let o = eventually(&b, refresh, "the run on the plan's status", || async {
        let o = b.object(Kind::Backup, "offsite").await.ok_or("no plan")?;
        (o["status"]["lastRun"]["id"] == id.as_str() && o["status"]["snapshots"] == 1)
            .then_some(o.clone())
            .ok_or(format!("status {}", o["status"]))
    })
    .await;
    let want = format!("sftp:root@127.0.0.1:{}{}", sshd.port, remote.display());
    assert_eq!(o["status"]["repository"], want.as_str(), "{o}");
    assert_eq!(o["status"]["lastRun"]["ok"], true, "{o}");
    assert_eq!(condition(&o, "Ready").unwrap()["status"], "True", "{o}");
    assert_eq!(condition(&o, "LastRunFailed").unwrap()["status"], "False");
    let ev = evidence(&b, "offsite");
    let rec = ev
        .iter()
        .find(|r| r["id"] == id.as_str())
        .expect("the snapshot is listed");
    assert_eq!(rec["ok"], true, "{rec}");
    let restic_id = rec["resticSnapshot"].as_str().unwrap().to_string();

    let verify = b.cli_ok(&["backup", "verify", &id]);
    let ev = evidence(&b, "offsite");
    let rec = ev.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(rec["verification"]["ok"], true, "{verify}\n{rec}");

    // Debian's restic with berth's key, over SFTP with the same ssh options as berth...
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("key");
    std::fs::write(&key_file, b.cli_ok(&["backup", "key"]).trim()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ssh = format!(
        "sftp.command=ssh -p {} -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
         -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} root@127.0.0.1 -s sftp",
        sshd.port,
        sshd.client_key().display(),
        sshd.known_hosts().display()
    );
    let out = Command::new("restic")
        .arg("-r")
        .arg(format!("sftp:root@127.0.0.1:{}", remote.display()))
        .args(["-o", &ssh, "snapshots", "--json"])
        .env("RESTIC_PASSWORD_FILE", &key_file)
        .env("RESTIC_CACHE_DIR", key_dir.path().join("cache"))
        .output()
        .expect("restic is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "restic over sftp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snaps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [restic_id.as_str()]);
    // ...and from the directory the server wrote, reading every pack.
    let check = restic(&b, &remote, &["check", "--read-data"]);
    assert!(
        check.status.success(),
        "restic check: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // The identity's Secret does not exist: the plan says so at once, not when a run is due.
    let missing = format!("{p}-missing");
    b.apply(&sftp_plan_yaml(
        "broken", sshd.port, &remote, &missing, &secret,
    ));
    let o = eventually(&b, CONVERGE, "broken: PlanIncomplete", || async {
        let o = b.object(Kind::Backup, "broken").await.ok_or("no plan")?;
        let ready = condition(&o, "Ready").ok_or(format!("no Ready: {o}"))?;
        (ready["reason"] == "PlanIncomplete")
            .then_some(o.clone())
            .ok_or(format!("Ready {ready}"))
    })
    .await;
    let ready = condition(&o, "Ready").unwrap();
    assert_eq!(ready["status"], "False", "{o}");
    assert_eq!(
        ready["message"],
        format!("Secret `{missing}` does not exist").as_str(),
        "{o}"
    );
    let run = b.cli(&["backup", "run", "broken"]);
    assert!(!run.success, "{}", run.stdout);
    assert!(
        run.stderr
            .contains(&format!("Secret `{missing}` does not exist")),
        "{}",
        run.stderr
    );
    // The Secret appears: the plan is watched back to Ready, and runs.
    b.apply(&secret_yaml(&missing));
    eventually(
        &b,
        Duration::from_secs(30),
        "broken: Ready again",
        || async {
            let o = b.object(Kind::Backup, "broken").await.ok_or("no plan")?;
            let ready = condition(&o, "Ready").ok_or(format!("no Ready: {o}"))?;
            (ready["status"] == "True")
                .then_some(())
                .ok_or(format!("Ready {ready}"))
        },
    )
    .await;
    run_backup(&b, "broken");

    // The private key is nowhere berth writes for people to read.
    let secret_lines: Vec<&str> = key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
        .collect();
    assert!(!secret_lines.is_empty());
    let mut shown = vec![
        ("berth's log", b.log_text()),
        ("the evidence", b.cli_ok(&["backup", "list", "-o", "json"])),
    ];
    for plan in ["offsite", "broken"] {
        let o = b.object(Kind::Backup, plan).await.unwrap();
        shown.push(("a plan", o.to_string()));
    }
    for kind in ["secrets", "backups"] {
        shown.push(("berth get", b.cli_ok(&["get", kind, "-o", "yaml"])));
    }
    for (what, text) in &shown {
        for l in &secret_lines {
            assert!(!text.contains(l), "the private key is in {what}");
        }
    }
}
