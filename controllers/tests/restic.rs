//! The restic driver against Debian's real `restic` (and, for SFTP, a real `sshd` on loopback that
//! the test starts itself). No Docker. Without restic or sshd these tests fail, saying to run
//! scripts/test, which installs both.

use berth_controllers::backup::restic::{
    BackupRequest, Location, Operation, Phase, Progress, Restic, ResticError, SftpLocation,
};
use berth_e2e::sshd::{require, Sshd};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const RESTIC: &str = "/usr/bin/restic";

/// A repository in a temp dir, with its own 0600 password file and cache.
struct Fixture {
    dir: tempfile::TempDir,
    password: String,
}

impl Fixture {
    fn new() -> Self {
        require(RESTIC);
        let dir = tempfile::tempdir().unwrap();
        let password = format!("pw-{}-not-in-logs", ulid::Ulid::new());
        let f = Self { dir, password };
        write_secret(&f.password_file(), &f.password);
        fs::create_dir(f.path("cache")).unwrap();
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn password_file(&self) -> PathBuf {
        self.path("password")
    }

    fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    fn restic(&self) -> Restic {
        self.restic_with(RESTIC)
    }

    fn restic_with(&self, binary: impl Into<PathBuf>) -> Restic {
        Restic::new(
            binary,
            Location::Local(self.repo()),
            self.password_file(),
            self.path("cache"),
        )
    }

    /// restic itself, for what the driver does not do (an independent check, a lock holder).
    fn restic_cmd(&self) -> Command {
        let mut c = Command::new(RESTIC);
        c.arg("-r")
            .arg(self.repo())
            .arg("--password-file")
            .arg(self.password_file())
            .arg("--cache-dir")
            .arg(self.path("cache"));
        c
    }
}

fn write_secret(path: &Path, content: &str) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn request(paths: Vec<PathBuf>, tags: &[&str]) -> BackupRequest {
    BackupRequest {
        paths,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        host: "env-test".into(),
        exclude: vec![],
    }
}

fn no_progress(_: Progress) {}

/// Deterministic pseudo-random bytes (xorshift): incompressible, reproducible, no extra crate.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// lstat of every entry under `root`: (type, uid, gid, mode, mtime, size, content or link target).
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let m = fs::symlink_metadata(&path).unwrap();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let what = if m.file_type().is_symlink() {
            // restic 0.14 does not restore a symlink's own mtime: compare owner and target only.
            format!(
                "link {}:{} -> {}",
                m.uid(),
                m.gid(),
                fs::read_link(&path).unwrap().display()
            )
        } else {
            let kind = if m.is_dir() { "dir" } else { "file" };
            let content = if m.is_file() {
                format!("{:x}", sha(&fs::read(&path).unwrap()))
            } else {
                String::new()
            };
            format!(
                "{kind} {}:{} {:o} mtime={} size={} {content}",
                m.uid(),
                m.gid(),
                m.mode() & 0o7777,
                m.mtime(),
                if m.is_dir() { 0 } else { m.len() },
            )
        };
        out.insert(rel, what);
        if m.is_dir() {
            walk(root, &path, out);
        }
    }
}

fn sha(data: &[u8]) -> impl std::fmt::LowerHex {
    use sha2::Digest;
    sha2::Sha256::digest(data)
}

/// A tree with several owners, modes (setuid included), a symlink, an empty dir and set mtimes.
fn make_owned_tree(src: &Path) {
    use std::os::unix::fs::{chown, lchown};
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::create_dir(src.join("empty")).unwrap();
    let files: [(&str, u32, u32, u32, usize); 4] = [
        ("secret.key", 1234, 5678, 0o600, 100),
        ("run.sh", 0, 0, 0o755, 2_000),
        ("suid-tool", 1000, 1000, 0o4755, 300_000),
        ("sub/deeper/data.bin", 999, 999, 0o640, 1_500_000),
    ];
    for (i, (name, uid, gid, mode, len)) in files.iter().enumerate() {
        let p = src.join(name);
        fs::write(&p, noise(i as u64 + 1, *len)).unwrap();
        chown(&p, Some(*uid), Some(*gid)).unwrap();
        // chown clears setuid: set the mode afterwards.
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
    }
    std::os::unix::fs::symlink("secret.key", src.join("link")).unwrap();
    lchown(src.join("link"), Some(42), Some(43)).unwrap();
    chown(src.join("empty"), Some(7), Some(8)).unwrap();
    fs::set_permissions(src.join("empty"), fs::Permissions::from_mode(0o700)).unwrap();
    // Directories last: creating their entries moved their mtimes.
    sh(&format!(
        "cd '{}' && touch -h -d @1600000000 secret.key run.sh suid-tool sub/deeper/data.bin link && \
         touch -d @1500000000 sub/deeper sub empty",
        src.display()
    ));
}

#[tokio::test]
async fn owners_modes_mtimes_symlinks_survive_backup_restore_and_dump() {
    let f = Fixture::new();
    let r = f.restic();
    assert!(r.init_if_missing().await.unwrap(), "a new repository");
    assert!(
        !r.init_if_missing().await.unwrap(),
        "the second call finds it"
    );
    // Repository format 2 (compression), read by restic itself.
    let out = f.restic_cmd().args(["cat", "config"]).output().unwrap();
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["version"], 2);

    let src = f.path("src");
    make_owned_tree(&src);
    let want = tree(&src);

    let mut progress = Vec::new();
    let summary = r
        .backup(&request(vec![src.clone()], &["env=test", "hourly"]), |p| {
            progress.push(p)
        })
        .await
        .unwrap();
    assert_eq!(summary.snapshot_id.len(), 64);
    assert_eq!(summary.files_new, 4);
    assert_eq!(summary.total_files_processed, 4);
    assert!(summary.unreadable.is_empty());
    assert_eq!(progress.first().unwrap().phase, Phase::Started);
    assert_eq!(progress.last().unwrap().phase, Phase::Finished);
    // restic's first status line comes before its scanner has seen everything.
    assert!(progress
        .iter()
        .any(|p| p.phase == Phase::Running && p.bytes_total.is_some()));

    let snaps = r.snapshots(&["hourly".into()]).await.unwrap();
    assert_eq!(snaps.len(), 1);
    let s = &snaps[0];
    assert_eq!(s.id, summary.snapshot_id);
    assert_eq!(s.short_id, &s.id[..8]);
    assert_eq!(s.hostname, "env-test");
    assert_eq!(s.paths, vec![src.display().to_string()]);
    assert!((chrono::Utc::now() - s.time).num_seconds() < 120);
    assert!(r
        .snapshots(&["hourly".into(), "other".into()])
        .await
        .unwrap()
        .is_empty());

    // restore
    let target = f.path("restored");
    let mut restore_progress = Vec::new();
    r.restore(&s.id, &src.display().to_string(), &target, |p| {
        restore_progress.push(p.phase)
    })
    .await
    .unwrap();
    assert_eq!(restore_progress, vec![Phase::Started, Phase::Finished]);
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_eq!(tree(&restored), want, "restore");

    // dump_tar of the directory, unpacked by GNU tar keeping owners and modes
    let mut stream = r
        .dump_tar(&s.short_id, &src.display().to_string())
        .await
        .unwrap();
    let mut tar = Vec::new();
    stream.read_to_end(&mut tar).await.unwrap();
    let tar_file = f.path("dump.tar");
    fs::write(&tar_file, &tar).unwrap();
    let unpacked = f.path("unpacked");
    fs::create_dir(&unpacked).unwrap();
    sh(&format!(
        "tar -xpf '{}' --numeric-owner -C '{}'",
        tar_file.display(),
        unpacked.display()
    ));
    // restic 0.14 names the entries by their full path in the snapshot, without the leading '/'.
    let dumped = unpacked.join(src.strip_prefix("/").unwrap());
    assert_eq!(tree(&dumped), want, "dump --archive tar");

    // Debian's restic, independently, reads every pack back.
    let out = f
        .restic_cmd()
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = r.check(true, no_progress).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert!(report.damaged_packs.is_empty() && report.problems.is_empty());

    // forget + prune drop the snapshot and its data
    r.forget(std::slice::from_ref(&s.id)).await.unwrap();
    r.prune().await.unwrap();
    assert!(r.snapshots(&[]).await.unwrap().is_empty());
    assert!(
        r.raw_size().await.unwrap() < 100_000,
        "prune removed the data"
    );
}

#[tokio::test]
async fn a_flipped_byte_names_the_damaged_pack_and_the_snapshots_using_it() {
    let f = Fixture::new();
    let r = f.restic();
    r.init_if_missing().await.unwrap();
    let (a, b) = (f.path("a"), f.path("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("big"), noise(7, 3_000_000)).unwrap();
    fs::write(b.join("small"), "a small file\n").unwrap();
    let snap_a = r
        .backup(&request(vec![a], &["a"]), no_progress)
        .await
        .unwrap()
        .snapshot_id;
    let snap_b = r
        .backup(&request(vec![b], &["b"]), no_progress)
        .await
        .unwrap()
        .snapshot_id;

    // The largest pack holds a's 3 MB of data.
    let mut packs: Vec<(u64, PathBuf)> = Vec::new();
    for sub in fs::read_dir(f.repo().join("data")).unwrap() {
        for p in fs::read_dir(sub.unwrap().path()).unwrap() {
            let p = p.unwrap().path();
            packs.push((fs::metadata(&p).unwrap().len(), p));
        }
    }
    packs.sort();
    let (_, pack) = packs.last().unwrap().clone();
    let pack_id = pack.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = fs::read(&pack).unwrap();
    bytes[1000] ^= 0x01;
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&pack, bytes).unwrap();

    let mut phases = Vec::new();
    let report = r.check(true, |p| phases.push(p)).await.unwrap();
    assert!(!report.ok);
    assert_eq!(report.damaged_packs, vec![pack_id.clone()], "{report:?}");
    assert_eq!(report.damaged_snapshots, vec![snap_a.clone()], "{report:?}");
    assert!(!report.problems.is_empty());
    assert_eq!(phases.first().unwrap().phase, Phase::Started);
    assert_eq!(phases.last().unwrap().phase, Phase::Finished);
    assert!(phases.iter().all(|p| p.operation == Operation::Check));

    let verify = r.verify_snapshot(&snap_a).await.unwrap();
    assert!(!verify.ok);
    assert_eq!(verify.damaged_packs, vec![pack_id], "{verify:?}");
    assert_eq!(verify.damaged_snapshots, vec![snap_a], "{verify:?}");
    assert!(
        verify.problems.iter().any(|l| l.contains("blob")),
        "{verify:?}"
    );

    let verify_b = r.verify_snapshot(&snap_b[..8]).await.unwrap();
    assert!(verify_b.ok, "{verify_b:?}");
}

/// A restic holding a lock: `backup --stdin` waits on its stdin (a pipe we keep open) after locking.
fn lock_holder(f: &Fixture) -> Child {
    let child = f
        .restic_cmd()
        .args(["backup", "--stdin", "--stdin-filename", "held"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let locks = f.repo().join("locks");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read_dir(&locks).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "restic never took its lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[tokio::test]
async fn a_stale_lock_is_removed_and_a_live_one_reported() {
    let f = Fixture::new();
    let r = f.restic();
    r.init_if_missing().await.unwrap();

    let mut killed = lock_holder(&f);
    killed.kill().unwrap(); // SIGKILL: restic leaves its lock behind
    killed.wait().unwrap();
    assert_eq!(fs::read_dir(f.repo().join("locks")).unwrap().count(), 1);
    // check and prune need the exclusive lock: plain restic refuses, the driver unlocks and retries.
    let out = f.restic_cmd().arg("check").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already locked"));
    assert!(r.check(false, no_progress).await.unwrap().ok);
    assert_eq!(fs::read_dir(f.repo().join("locks")).unwrap().count(), 0);

    let mut live = lock_holder(&f);
    let err = r.prune().await.unwrap_err();
    live.kill().unwrap();
    live.wait().unwrap();
    assert!(matches!(err, ResticError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("prune"), "{err}");
}

#[tokio::test]
async fn the_password_is_never_in_argv_environment_or_errors() {
    let f = Fixture::new();
    // A wrapper that records restic's argv and environment, then runs it.
    let log = f.path("argv-env.log");
    let wrapper = f.path("restic-wrapper");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" >> '{log}'\nenv >> '{log}'\nexec {RESTIC} \"$@\"\n",
            log = log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let r = f.restic_with(&wrapper);
    r.init_if_missing().await.unwrap();
    let src = f.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("x"), "x").unwrap();
    r.backup(&request(vec![src], &[]), no_progress)
        .await
        .unwrap();
    r.snapshots(&[]).await.unwrap();

    // A failing command: another password does not open the repository.
    let wrong = f.path("wrong-password");
    write_secret(&wrong, "some-other-password");
    let other = Restic::new(
        &wrapper,
        Location::Local(f.repo()),
        wrong.clone(),
        f.path("cache"),
    );
    let err = other.snapshots(&[]).await.unwrap_err();
    let text = err.to_string();
    assert_eq!(err.exit_code(), Some(1), "{text}");
    assert!(
        text.contains("snapshots") && text.contains("wrong password"),
        "{text}"
    );
    assert!(!text.contains(&f.password) && !text.contains("some-other-password"));
    assert!(!format!("{err:?}").contains("some-other-password"));

    let recorded = fs::read_to_string(&log).unwrap();
    assert!(recorded.contains("--password-file"));
    assert!(
        !recorded.contains(&f.password),
        "the password leaked into argv/env"
    );
    assert!(!recorded.contains("some-other-password"));
    assert!(!format!("{r:?}").contains(&f.password));

    // A password file others can read is refused before restic runs.
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o644)).unwrap();
    let err = other.snapshots(&[]).await.unwrap_err();
    assert!(matches!(err, ResticError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn an_unchanged_directory_backed_up_twice_grows_the_repository_by_under_one_percent() {
    let f = Fixture::new();
    let r = f.restic();
    r.init_if_missing().await.unwrap();
    // ~50 MB: incompressible files of many sizes, and compressible text (logs, JSON-like).
    let src = f.path("src");
    let mut size = 0usize;
    for i in 0..40u64 {
        let dir = src.join(format!("d{}", i % 5));
        fs::create_dir_all(&dir).unwrap();
        let len = 50_000 + (i as usize * 37_000) % 1_500_000;
        fs::write(dir.join(format!("bin{i}")), noise(i + 100, len)).unwrap();
        size += len;
    }
    for i in 0..10u64 {
        let text: String = (0..40_000)
            .map(|n| format!("{{\"line\":{n},\"file\":{i},\"msg\":\"request served\"}}\n"))
            .collect();
        size += text.len();
        fs::write(src.join(format!("log{i}.json")), text).unwrap();
    }
    assert!(size > 45_000_000, "{size}");

    let start = Instant::now();
    let mut running = Vec::new();
    let first = r
        .backup(&request(vec![src.clone()], &[]), |p| {
            if p.phase == Phase::Running {
                running.push(p)
            }
        })
        .await
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    let before = r.raw_size().await.unwrap();
    let second = r
        .backup(&request(vec![src.clone()], &[]), no_progress)
        .await
        .unwrap();
    let after = r.raw_size().await.unwrap();
    let growth = after - before;
    println!(
        "data {:.1} MB, first backup {:.1} s = {:.1} MB/s, repository {:.1} MB, \
         second backup grew it by {growth} bytes = {:.4}% of the data",
        size as f64 / 1e6,
        secs,
        size as f64 / 1e6 / secs,
        before as f64 / 1e6,
        growth as f64 * 100.0 / size as f64,
    );
    assert_eq!(first.files_new, 50);
    // Status lines while it ran: bytes done grow towards the total, which the scanner completes.
    assert!(running.len() >= 2, "{running:?}");
    assert!(
        running.iter().any(|p| p.bytes_total == Some(size as u64)),
        "{running:?}"
    );
    assert!(running
        .windows(2)
        .all(|w| w[0].bytes_done <= w[1].bytes_done));
    assert_eq!(second.files_unmodified, 50);
    assert_eq!(second.files_new + second.files_changed, 0);
    assert!(growth * 100 < size as u64, "grew by {growth} bytes");
    assert_ne!(first.snapshot_id, second.snapshot_id);
}

#[tokio::test]
async fn an_sftp_repository_through_a_loopback_openssh_server() {
    let f = Fixture::new();
    let sshd = Sshd::start(&f.path("sshd"));
    let remote = f.path("remote-repo");
    let location = SftpLocation {
        user: "root".into(),
        host: "127.0.0.1".into(),
        port: sshd.port,
        path: remote.display().to_string(),
        identity_file: sshd.client_key(),
        known_hosts_file: sshd.known_hosts(),
    };
    let r = Restic::new(
        RESTIC,
        Location::Sftp(location.clone()),
        f.password_file(),
        f.path("cache"),
    );
    assert_eq!(
        r.location_display(),
        format!("sftp://root@127.0.0.1:{}{}", sshd.port, remote.display())
    );
    assert!(r.init_if_missing().await.unwrap());
    assert!(
        remote.join("config").exists(),
        "the repository is where sshd put it"
    );
    assert!(!r.init_if_missing().await.unwrap());

    let src = f.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("volume.bin"), noise(3, 2_000_000)).unwrap();
    fs::write(src.join("objects.json"), "{\"kind\":\"Service\"}\n").unwrap();
    let mut running = 0;
    let summary = r
        .backup(&request(vec![src.clone()], &["sftp"]), |p| {
            if p.phase == Phase::Running {
                running += 1
            }
        })
        .await
        .unwrap();
    assert_eq!(summary.files_new, 2);
    assert!(running > 0);
    let snaps = r.snapshots(&["sftp".into()]).await.unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].id, summary.snapshot_id);
    let report = r.check(true, no_progress).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert!(r.verify_snapshot(&summary.snapshot_id).await.unwrap().ok);
    let raw = r.raw_size().await.unwrap();
    assert!(raw > 1_900_000 && raw < 2_200_000, "{raw}");

    // A host key that is not the known one: ssh refuses, and the error says where it failed.
    fs::write(
        &location.known_hosts_file,
        format!(
            "[127.0.0.1]:{} {}",
            sshd.port,
            fs::read_to_string(sshd.dir.join("client_key.pub")).unwrap()
        ),
    )
    .unwrap();
    let err = r.snapshots(&[]).await.unwrap_err();
    assert!(err.to_string().contains("snapshots"), "{err}");
}
