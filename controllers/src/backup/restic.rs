//! A typed async driver for Debian's `restic` binary (0.14): berth's backups live in a restic-format
//! repository that the reference implementation itself can `check --read-data` and `restore`, so an
//! auditor can verify them without berth.
//!
//! Every call runs one `restic` process with `--json` where restic supports it, and parses the output
//! with serde. The password only ever travels as a path (`--password-file`, a 0600 file the caller
//! owns): it is never in argv, in the environment of restic or of the ssh it starts, nor in an error
//! (errors carry restic's stderr, which never echoes the password).
//!
//! What restic 0.14 forces on the API:
//! - `backup --json`'s summary names the snapshot by its *short* id; the full id is looked up with
//!   `snapshots --json ID`.
//! - `check` has no JSON output: damaged packs are read from its stderr lines, and the snapshots that
//!   use a damaged pack come from `find --json --pack ID`.
//! - there is no per-snapshot `check`: [`Restic::verify_snapshot`] streams `dump --archive tar ID /`
//!   into a sink; restic checks the MAC and the SHA-256 of every tree and data blob it loads, so the
//!   dump fails on the first damaged blob, which `find --blob ID --show-pack-id` maps to its pack.
//! - a lock left by a killed restic is not ignored by 0.14 (no `--retry-lock` yet): a command that
//!   finds the repository locked runs `unlock` (which removes only *stale* locks: a dead PID on this
//!   host, or older than 30 minutes) and retries once; a lock held by a live process is reported as
//!   [`ResticError::Locked`].
//! - there is no distinct exit code for "no repository here" (0.17 added it), so
//!   [`Restic::init_if_missing`] runs `init` and recognises restic's "already exists" refusal.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::{ready, Context, Poll};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use tokio::process::{Child, ChildStdout, Command};

/// How many of restic's last stderr lines an error keeps: enough for the cause, short enough for a
/// status condition.
const STDERR_TAIL_LINES: usize = 20;

/// restic prints JSON status lines at 60 per second by default when `--json` is given; a few per
/// second is plenty for a progress bar and keeps the parsing cheap.
const PROGRESS_FPS: &str = "4";

/// Repository format version 2 (0.14's "latest"): compressed blobs (zstd), which shrink berth's JSON
/// documents and most volume data. Readable by restic >= 0.14 and by rustic; Debian bookworm ships 0.14.
const REPOSITORY_VERSION: &str = "2";

/// Where the repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on this machine.
    Local(PathBuf),
    /// A directory on an SSH server, reached through the system's `ssh` client and its SFTP subsystem.
    Sftp(SftpLocation),
}

/// An SFTP repository. The host key must already be in `known_hosts_file`: berth never trusts on
/// first use, and ssh runs in batch mode (no prompt can hang a backup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpLocation {
    pub user: String,
    pub host: String,
    pub port: u16,
    /// The repository directory on the server (absolute, or relative to the user's home).
    pub path: String,
    pub identity_file: PathBuf,
    pub known_hosts_file: PathBuf,
}

/// The driver: one repository, one password file, one cache directory.
#[derive(Debug, Clone)]
pub struct Restic {
    binary: PathBuf,
    location: Location,
    password_file: PathBuf,
    cache_dir: PathBuf,
}

/// What to back up.
#[derive(Debug, Clone, Default)]
pub struct BackupRequest {
    pub paths: Vec<PathBuf>,
    /// Tags recorded on the snapshot (no commas: restic splits tags on them).
    pub tags: Vec<String>,
    /// The snapshot's host name (`--host`): berth records the environment here, not the machine.
    pub host: String,
    /// restic `--exclude` patterns.
    pub exclude: Vec<String>,
}

/// Which long operation a [`Progress`] report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Backup,
    Check,
    Restore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Started,
    Running,
    Finished,
}

/// A directory's own metadata in a snapshot (see [`Restic::stat_dir`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirMeta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub mtime: u64,
}

/// A progress report. `Started` and `Finished` come for every long operation; `Running` reports come
/// from restic's own status output (backup: bytes and files; check --read-data: packs read, counted in
/// the `files_*` fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub operation: Operation,
    pub phase: Phase,
    /// 0.0 ..= 100.0
    pub percent: Option<f64>,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    pub files_done: Option<u64>,
    pub files_total: Option<u64>,
}

impl Progress {
    fn edge(operation: Operation, phase: Phase) -> Self {
        Self {
            operation,
            phase,
            percent: None,
            bytes_done: None,
            bytes_total: None,
            files_done: None,
            files_total: None,
        }
    }
}

/// restic's backup summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The full (64 hex digits) id of the new snapshot.
    pub snapshot_id: String,
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    /// Bytes added to the repository (after deduplication, before compression).
    pub data_added: u64,
    pub total_files_processed: u64,
    pub total_bytes_processed: u64,
    /// Items restic could not read (exit code 3): the snapshot exists but lacks them.
    pub unreadable: Vec<String>,
}

/// A snapshot as `snapshots --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub short_id: String,
    pub time: DateTime<Utc>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    pub hostname: String,
}

/// The outcome of a check. `ok` is restic's verdict; the lists name what is damaged (full ids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub ok: bool,
    /// restic's error lines, as it printed them.
    pub problems: Vec<String>,
    pub damaged_packs: Vec<String>,
    pub damaged_snapshots: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResticError {
    #[error("could not run `{binary} {command}`: {source}")]
    Spawn {
        binary: String,
        command: String,
        source: io::Error,
    },
    #[error("`restic {command}` failed ({}): {stderr}", exit_text(*code))]
    Failed {
        command: String,
        code: Option<i32>,
        /// The last lines of restic's stderr.
        stderr: String,
    },
    #[error("`restic {command}`: the repository is locked by a running restic: {stderr}")]
    Locked { command: String, stderr: String },
    #[error("`restic {command}`: unexpected output: {detail}")]
    Output { command: String, detail: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_string(),
    }
}

impl ResticError {
    /// restic's exit code, when the command ran and failed.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            ResticError::Failed { code, .. } => *code,
            ResticError::Locked { .. } => Some(1),
            _ => None,
        }
    }
}

/// What a finished restic process left.
struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

impl Finished {
    fn stderr_tail(&self) -> String {
        tail(&self.stderr)
    }

    fn into_result(self, command: &str) -> Result<Finished, ResticError> {
        if self.status.success() {
            return Ok(self);
        }
        Err(failure(command, self.status, &self.stderr))
    }
}

fn tail(lines: &[String]) -> String {
    let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
    lines[start..].join("\n")
}

fn failure(command: &str, status: ExitStatus, stderr: &[String]) -> ResticError {
    let text = tail(stderr);
    if is_locked(&text) {
        ResticError::Locked {
            command: command.to_string(),
            stderr: text,
        }
    } else {
        ResticError::Failed {
            command: command.to_string(),
            code: status.code(),
            stderr: text,
        }
    }
}

fn is_locked(stderr: &str) -> bool {
    stderr.contains("repository is already locked")
}

impl Restic {
    pub fn new(
        binary: impl Into<PathBuf>,
        location: Location,
        password_file: PathBuf,
        cache_dir: PathBuf,
    ) -> Self {
        Self {
            binary: binary.into(),
            location,
            password_file,
            cache_dir,
        }
    }

    /// The repository's location for status and evidence: no secret, no key path.
    pub fn location_display(&self) -> String {
        match &self.location {
            Location::Local(path) => format!("local:{}", path.display()),
            Location::Sftp(s) => {
                let sep = if s.path.starts_with('/') { "" } else { "/~/" };
                format!("sftp://{}@{}:{}{}{}", s.user, s.host, s.port, sep, s.path)
            }
        }
    }

    /// Creates the repository (format version 2) unless one is there. Returns true if it created it.
    /// An existing repository must open with our password, or this fails.
    pub async fn init_if_missing(&self) -> Result<bool, ResticError> {
        let done = self
            .run(
                "init",
                &["--repository-version", REPOSITORY_VERSION],
                ignore,
            )
            .await?;
        if done.status.success() {
            return Ok(true);
        }
        if done
            .stderr
            .iter()
            .any(|l| l.contains("config file already exists"))
        {
            // Someone's repository is there: make sure it is one our password opens.
            self.run_ok("cat", &["config"], ignore).await?;
            return Ok(false);
        }
        Err(failure("init", done.status, &done.stderr))
    }

    /// Backs up `req.paths` into a new snapshot, reporting restic's progress as it goes.
    pub async fn backup(
        &self,
        req: &BackupRequest,
        mut on_progress: impl FnMut(Progress) + Send,
    ) -> Result<BackupSummary, ResticError> {
        if req.paths.is_empty() {
            return Err(ResticError::Invalid("backup: no paths given".into()));
        }
        let mut args: Vec<OsString> = vec!["--json".into()];
        if !req.host.is_empty() {
            args.push("--host".into());
            args.push(req.host.clone().into());
        }
        for tag in &req.tags {
            check_tag(tag)?;
            args.push("--tag".into());
            args.push(tag.into());
        }
        for pattern in &req.exclude {
            args.push("--exclude".into());
            args.push(pattern.into());
        }
        // `--` so that a path starting with '-' is never read as a flag.
        args.push("--".into());
        args.extend(req.paths.iter().map(|p| p.as_os_str().to_owned()));

        on_progress(Progress::edge(Operation::Backup, Phase::Started));
        let mut summary: Option<BackupMsg> = None;
        let mut unreadable = Vec::new();
        let mut on_line = |line: &str| {
            let Ok(msg) = serde_json::from_str::<BackupMsg>(line) else {
                return;
            };
            match msg.message_type.as_str() {
                "status" => on_progress(Progress {
                    operation: Operation::Backup,
                    phase: Phase::Running,
                    percent: Some(msg.percent_done * 100.0),
                    bytes_done: Some(msg.bytes_done),
                    bytes_total: Some(msg.total_bytes),
                    files_done: Some(msg.files_done),
                    files_total: Some(msg.total_files),
                }),
                "error" => unreadable.push(msg.item.clone().unwrap_or_default()),
                "summary" => summary = Some(msg),
                _ => {}
            }
        };
        let done = self.run_locked("backup", &args, &mut on_line).await?;
        // Exit code 3: the snapshot was written but some items could not be read.
        let incomplete = done.status.code() == Some(3);
        if !done.status.success() && !incomplete {
            return Err(failure("backup", done.status, &done.stderr));
        }
        let Some(s) = summary else {
            return Err(ResticError::Output {
                command: "backup".into(),
                detail: format!("no summary line; stderr: {}", done.stderr_tail()),
            });
        };
        let short = s.snapshot_id.clone().unwrap_or_default();
        let snapshot_id = self.full_snapshot_id(&short).await?;
        let mut finished = Progress::edge(Operation::Backup, Phase::Finished);
        finished.percent = Some(100.0);
        finished.bytes_done = Some(s.total_bytes_processed);
        finished.files_done = Some(s.total_files_processed);
        on_progress(finished);
        Ok(BackupSummary {
            snapshot_id,
            files_new: s.files_new,
            files_changed: s.files_changed,
            files_unmodified: s.files_unmodified,
            data_added: s.data_added,
            total_files_processed: s.total_files_processed,
            total_bytes_processed: s.total_bytes_processed,
            unreadable,
        })
    }

    /// The snapshots carrying *all* of `tags` (none: every snapshot), oldest first.
    pub async fn snapshots(&self, tags: &[String]) -> Result<Vec<Snapshot>, ResticError> {
        let mut args: Vec<OsString> = vec!["--json".into()];
        if !tags.is_empty() {
            for tag in tags {
                check_tag(tag)?;
            }
            // One `--tag a,b` means "a and b"; repeated `--tag` flags would mean "or".
            args.push("--tag".into());
            args.push(tags.join(",").into());
        }
        self.snapshots_with(&args).await
    }

    async fn snapshots_with(&self, args: &[OsString]) -> Result<Vec<Snapshot>, ResticError> {
        let done = self.run_locked_ok("snapshots", args, ignore).await?;
        let text = done.stdout.join("\n");
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let mut list: Vec<Snapshot> =
            serde_json::from_str(&text).map_err(|e| ResticError::Output {
                command: "snapshots".into(),
                detail: e.to_string(),
            })?;
        list.sort_by_key(|s| s.time);
        Ok(list)
    }

    /// The full id of a snapshot given by any unique prefix (or "latest").
    pub async fn full_snapshot_id(&self, id: &str) -> Result<String, ResticError> {
        if id.len() == 64 {
            return Ok(id.to_string());
        }
        check_id(id)?;
        let found = self.snapshots_with(&["--json".into(), id.into()]).await?;
        match found.as_slice() {
            [one] => Ok(one.id.clone()),
            _ => Err(ResticError::Output {
                command: "snapshots".into(),
                detail: format!("snapshot {id}: {} matches", found.len()),
            }),
        }
    }

    /// Removes these snapshots (their data stays until [`Restic::prune`]).
    pub async fn forget(&self, ids: &[String]) -> Result<(), ResticError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut args: Vec<OsString> = vec!["--".into()];
        for id in ids {
            check_id(id)?;
            args.push(id.into());
        }
        self.run_locked_ok("forget", &args, ignore).await?;
        Ok(())
    }

    /// Deletes the data no snapshot uses any more (takes restic's exclusive lock).
    pub async fn prune(&self) -> Result<(), ResticError> {
        self.run_locked_ok("prune", &[] as &[&str], ignore).await?;
        Ok(())
    }

    /// Checks the repository's structure, and with `read_data` re-reads and verifies every pack.
    /// A damaged repository is an `Ok` report with `ok: false`; `Err` means the check could not run.
    pub async fn check(
        &self,
        read_data: bool,
        mut on_progress: impl FnMut(Progress) + Send,
    ) -> Result<CheckReport, ResticError> {
        on_progress(Progress::edge(Operation::Check, Phase::Started));
        let args: &[&str] = if read_data { &["--read-data"] } else { &[] };
        let mut on_line = |line: &str| {
            if let Some(p) = parse_check_status(line) {
                on_progress(p);
            }
        };
        let done = self.run_locked("check", args, &mut on_line).await?;
        // restic check exits 1 both for "errors found" and for "could not check"; only the former
        // ends with this line.
        let found_errors = done
            .stderr
            .iter()
            .any(|l| l.contains("repository contains errors"));
        if !done.status.success() && !found_errors {
            return Err(failure("check", done.status, &done.stderr));
        }
        let mut report = CheckReport {
            ok: done.status.success(),
            problems: done
                .stderr
                .iter()
                .filter(|l| {
                    !l.trim().is_empty() && !l.starts_with("Fatal: repository contains errors")
                })
                .cloned()
                .collect(),
            ..CheckReport::default()
        };
        let packs = self.resolve_packs(damaged_packs_in(&done.stderr)).await?;
        report.damaged_snapshots = self.snapshots_using_packs(&packs).await?;
        report.damaged_packs = packs;
        on_progress(Progress::edge(Operation::Check, Phase::Finished));
        Ok(report)
    }

    /// Re-reads every tree and data blob of one snapshot (restic verifies each blob's MAC and hash on
    /// load) by streaming `dump --archive tar ID /` into a sink. Stops at the first damaged blob, which
    /// it names with its pack. Takes only a shared lock, so it can run beside backups.
    pub async fn verify_snapshot(&self, id: &str) -> Result<CheckReport, ResticError> {
        let full = self.full_snapshot_id(id).await?;
        let mut attempt = 0;
        let stderr = loop {
            attempt += 1;
            let mut stream = self.dump_tar(&full, "/").await?;
            let mut sink = [0u8; 64 * 1024];
            let result = loop {
                match stream.read(&mut sink).await {
                    Ok(0) => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            let err = match result {
                Ok(()) => {
                    return Ok(CheckReport {
                        ok: true,
                        ..CheckReport::default()
                    })
                }
                Err(e) => into_restic_error(e, "dump"),
            };
            match err {
                ResticError::Locked { .. } if attempt == 1 => self.unlock().await?,
                ResticError::Failed {
                    stderr,
                    code: Some(_),
                    ..
                } => break stderr,
                other => return Err(other),
            }
        };
        let blobs: BTreeSet<String> = stderr
            .lines()
            .filter(|l| l.contains("blob"))
            .flat_map(hex_ids)
            .filter(|h| h.len() == 64)
            .collect();
        let mut packs = BTreeSet::new();
        for blob in &blobs {
            let done = self
                .run_locked_ok("find", &["--show-pack-id", "--blob", blob.as_str()], ignore)
                .await?;
            for line in &done.stdout {
                if let Some(rest) = line.trim().strip_prefix("Object belongs to pack ") {
                    packs.insert(rest.trim().to_string());
                }
            }
        }
        Ok(CheckReport {
            ok: false,
            problems: stderr.lines().map(str::to_string).collect(),
            damaged_packs: packs.into_iter().collect(),
            damaged_snapshots: vec![full],
        })
    }

    /// Streams a tar of `path` (a directory, or "/" for everything) in `snapshot`. The stream ends
    /// with an error if restic fails, even after some data: never take a short tar for a whole one.
    /// Dropping the stream kills restic.
    pub async fn dump_tar(&self, snapshot: &str, path: &str) -> Result<DumpStream, ResticError> {
        check_id(snapshot)?;
        let args: [OsString; 5] = [
            "--archive".into(),
            "tar".into(),
            "--".into(),
            snapshot.into(),
            path.into(),
        ];
        let mut child = self.spawn("dump", &args)?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr_task = tokio::spawn(read_lines(stderr));
        let finish = async move {
            let status = child.wait().await.map_err(|source| ResticError::Io {
                context: "waiting for restic dump".into(),
                source,
            })?;
            let stderr = stderr_task.await.unwrap_or_default();
            if status.success() {
                Ok(())
            } else {
                Err(failure("dump", status, &stderr))
            }
        };
        Ok(DumpStream {
            stdout,
            finish: Some(Box::pin(finish)),
        })
    }

    /// The content of one file in `snapshot` (small files: it is read into memory).
    pub async fn dump_file(&self, snapshot: &str, path: &str) -> Result<Vec<u8>, ResticError> {
        use tokio::io::AsyncReadExt;
        check_id(snapshot)?;
        let args: [OsString; 3] = ["--".into(), snapshot.into(), path.into()];
        let mut child = self.spawn("dump", &args)?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let io_err = |source| ResticError::Io {
            context: "reading restic dump's output".into(),
            source,
        };
        let mut bytes = Vec::new();
        let (read, stderr) = tokio::join!(stdout.read_to_end(&mut bytes), read_lines(stderr));
        read.map_err(io_err)?;
        let status = child.wait().await.map_err(io_err)?;
        if !status.success() {
            return Err(failure("dump", status, &stderr));
        }
        Ok(bytes)
    }

    /// Restores the part of `snapshot` matching `include` (a restic include pattern; empty: all) under
    /// `target`, with owners (when run as root), modes, times and symlinks.
    pub async fn restore(
        &self,
        snapshot: &str,
        include: &str,
        target: &Path,
        mut on_progress: impl FnMut(Progress) + Send,
    ) -> Result<(), ResticError> {
        check_id(snapshot)?;
        on_progress(Progress::edge(Operation::Restore, Phase::Started));
        let mut args: Vec<OsString> = vec!["--target".into(), target.as_os_str().to_owned()];
        if !include.is_empty() {
            args.push("--include".into());
            args.push(include.into());
        }
        args.push("--".into());
        args.push(snapshot.into());
        self.run_locked_ok("restore", &args, ignore).await?;
        on_progress(Progress::edge(Operation::Restore, Phase::Finished));
        Ok(())
    }

    /// Owner, permission bits and mtime of the directory `path` in `snapshot` (`ls --json`, not
    /// recursive): `dump` writes a directory's contents but not the directory itself, and a
    /// volume's root has its own owner and mode.
    pub async fn stat_dir(
        &self,
        snapshot: &str,
        path: &str,
    ) -> Result<Option<DirMeta>, ResticError> {
        check_id(snapshot)?;
        let args: [OsString; 4] = ["--json".into(), "--".into(), snapshot.into(), path.into()];
        let done = self.run_locked_ok("ls", &args, ignore).await?;
        #[derive(Deserialize)]
        struct Node {
            #[serde(default)]
            path: String,
            #[serde(default)]
            struct_type: String,
            #[serde(default)]
            uid: u32,
            #[serde(default)]
            gid: u32,
            #[serde(default)]
            mode: u32,
            mtime: Option<DateTime<Utc>>,
        }
        let want = path.trim_end_matches('/');
        Ok(done
            .stdout
            .iter()
            .filter_map(|l| serde_json::from_str::<Node>(l).ok())
            .find(|n| n.struct_type == "node" && n.path.trim_end_matches('/') == want)
            .map(|n| DirMeta {
                uid: n.uid,
                gid: n.gid,
                // Go's FileMode: permission bits, then setuid, setgid and sticky as high bits.
                mode: (n.mode & 0o777)
                    | if n.mode & (1 << 23) != 0 { 0o4000 } else { 0 }
                    | if n.mode & (1 << 22) != 0 { 0o2000 } else { 0 }
                    | if n.mode & (1 << 20) != 0 { 0o1000 } else { 0 },
                mtime: n.mtime.map(|t| t.timestamp().max(0) as u64).unwrap_or(0),
            }))
    }

    /// The repository's size on storage: for a local repository the bytes of all its files; over
    /// SFTP, restic's `stats --mode raw-data` (the stored blobs, without pack headers and indexes).
    pub async fn raw_size(&self) -> Result<u64, ResticError> {
        match &self.location {
            Location::Local(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || dir_size(&dir))
                    .await
                    .map_err(|e| ResticError::Io {
                        context: "measuring the repository".into(),
                        source: io::Error::other(e),
                    })?
                    .map_err(|source| ResticError::Io {
                        context: "measuring the repository".into(),
                        source,
                    })
            }
            Location::Sftp(_) => {
                let done = self
                    .run_locked_ok("stats", &["--json", "--mode", "raw-data"], ignore)
                    .await?;
                #[derive(Deserialize)]
                struct Stats {
                    total_size: u64,
                }
                let stats: Stats =
                    serde_json::from_str(done.stdout.join("\n").trim()).map_err(|e| {
                        ResticError::Output {
                            command: "stats".into(),
                            detail: e.to_string(),
                        }
                    })?;
                Ok(stats.total_size)
            }
        }
    }

    /// Removes stale locks (restic only removes locks of dead processes or older than 30 minutes).
    pub async fn unlock(&self) -> Result<(), ResticError> {
        self.run_ok("unlock", &[] as &[&str], ignore).await?;
        Ok(())
    }

    // -- running restic ------------------------------------------------------------------------

    /// The global flags: repository, password file, cache, and for SFTP the ssh command.
    fn global_args(&self) -> Result<Vec<OsString>, ResticError> {
        let mut args: Vec<OsString> = Vec::new();
        match &self.location {
            Location::Local(dir) => {
                let mut repo = OsString::from("local:");
                repo.push(dir.as_os_str());
                args.push("--repo".into());
                args.push(repo);
            }
            Location::Sftp(s) => {
                for (what, value) in [("user", s.user.as_str()), ("host", s.host.as_str())] {
                    if value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
                    {
                        return Err(ResticError::Invalid(format!(
                            "sftp {what} {value:?}: only letters, digits, '.', '_', '-', ':'"
                        )));
                    }
                }
                // restic splits sftp.command like a shell would; paths that need quoting are refused
                // rather than quoted in a way restic might read differently.
                let key = plain_path("identity file", &s.identity_file)?;
                let known = plain_path("known_hosts file", &s.known_hosts_file)?;
                let command = format!(
                    "ssh -F /dev/null -i {key} -p {port} -o IdentitiesOnly=yes \
                     -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -o BatchMode=yes \
                     {user}@{host} -s sftp",
                    port = s.port,
                    user = s.user,
                    host = s.host,
                );
                args.push("--repo".into());
                args.push(format!("sftp:{}@{}:{}", s.user, s.host, s.path).into());
                args.push("--option".into());
                args.push(format!("sftp.command={command}").into());
            }
        }
        args.push("--password-file".into());
        args.push(self.password_file.as_os_str().to_owned());
        args.push("--cache-dir".into());
        args.push(self.cache_dir.as_os_str().to_owned());
        Ok(args)
    }

    fn check_password_file(&self) -> Result<(), ResticError> {
        let meta = std::fs::metadata(&self.password_file).map_err(|source| ResticError::Io {
            context: format!("password file {}", self.password_file.display()),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ResticError::Invalid(format!(
                "password file {} has mode {mode:04o}: it must be readable by its owner only (0600)",
                self.password_file.display()
            )));
        }
        Ok(())
    }

    fn spawn<S: AsRef<std::ffi::OsStr>>(
        &self,
        command: &str,
        args: &[S],
    ) -> Result<Child, ResticError> {
        self.check_password_file()?;
        let mut cmd = Command::new(&self.binary);
        // restic reads these from the environment; only our flags may decide (a RESTIC_PASSWORD in
        // berth's environment must not leak into restic, nor into the ssh it starts).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RESTIC_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RESTIC_PROGRESS_FPS", PROGRESS_FPS)
            .args(self.global_args()?)
            .arg(command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().map_err(|source| ResticError::Spawn {
            binary: self.binary.display().to_string(),
            command: command.to_string(),
            source,
        })
    }

    /// Runs restic to the end, feeding each stdout line to `on_line`. A failed exit is not an error
    /// here: callers decide what an exit code means.
    async fn run<S: AsRef<std::ffi::OsStr>>(
        &self,
        command: &str,
        args: &[S],
        on_line: impl FnMut(&str) + Send,
    ) -> Result<Finished, ResticError> {
        let mut child = self.spawn(command, args)?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let io_err = |source| ResticError::Io {
            context: format!("reading restic {command}'s output"),
            source,
        };
        let read_stdout = async {
            let mut lines = BufReader::new(stdout).lines();
            let mut all = Vec::new();
            let mut on_line = on_line;
            while let Some(line) = lines.next_line().await? {
                on_line(&line);
                all.push(line);
            }
            Ok::<_, io::Error>(all)
        };
        let (stdout, stderr) = tokio::join!(read_stdout, read_lines(stderr));
        let stdout = stdout.map_err(io_err)?;
        let status = child.wait().await.map_err(io_err)?;
        Ok(Finished {
            status,
            stdout,
            stderr,
        })
    }

    async fn run_ok<S: AsRef<std::ffi::OsStr>>(
        &self,
        command: &str,
        args: &[S],
        on_line: impl FnMut(&str) + Send,
    ) -> Result<Finished, ResticError> {
        self.run(command, args, on_line).await?.into_result(command)
    }

    /// [`Self::run`], and when restic finds the repository locked: `unlock` (stale locks only) and
    /// one retry. A lock that survives is a live process's: [`ResticError::Locked`].
    async fn run_locked<S: AsRef<std::ffi::OsStr>>(
        &self,
        command: &str,
        args: &[S],
        mut on_line: impl FnMut(&str) + Send,
    ) -> Result<Finished, ResticError> {
        let first = self.run(command, args, &mut on_line).await?;
        if first.status.success() || !is_locked(&first.stderr_tail()) {
            return Ok(first);
        }
        tracing::info!(
            command,
            "restic: repository locked; removing stale locks and retrying once"
        );
        self.unlock().await?;
        self.run(command, args, on_line).await
    }

    async fn run_locked_ok<S: AsRef<std::ffi::OsStr>>(
        &self,
        command: &str,
        args: &[S],
        on_line: impl FnMut(&str) + Send,
    ) -> Result<Finished, ResticError> {
        self.run_locked(command, args, on_line)
            .await?
            .into_result(command)
    }

    /// Full ids for pack ids that restic printed shortened.
    async fn resolve_packs(&self, ids: BTreeSet<String>) -> Result<Vec<String>, ResticError> {
        if ids.iter().all(|id| id.len() == 64) {
            return Ok(ids.into_iter().collect());
        }
        let done = self.run_locked_ok("list", &["packs"], ignore).await?;
        let all: Vec<&str> = done.stdout.iter().map(|l| l.trim()).collect();
        let mut out = BTreeSet::new();
        for id in ids {
            match all.iter().find(|full| full.starts_with(&id)) {
                Some(full) => out.insert(full.to_string()),
                None => out.insert(id),
            };
        }
        Ok(out.into_iter().collect())
    }

    /// The snapshots (full ids) that use any blob of these packs, from the index: `find --pack`.
    async fn snapshots_using_packs(&self, packs: &[String]) -> Result<Vec<String>, ResticError> {
        let mut snapshots = BTreeSet::new();
        for pack in packs {
            let done = self
                .run_locked_ok("find", &["--json", "--pack", pack.as_str()], ignore)
                .await?;
            let text = done.stdout.join("\n");
            // 0.14 prints one JSON array per snapshot searched, or one for all: take every value.
            for value in serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>()
            {
                let value = value.map_err(|e| ResticError::Output {
                    command: "find".into(),
                    detail: e.to_string(),
                })?;
                let items = match value {
                    serde_json::Value::Array(items) => items,
                    other => vec![other],
                };
                for item in items {
                    if let Some(id) = item.get("snapshot").and_then(|s| s.as_str()) {
                        snapshots.insert(id.to_string());
                    }
                }
            }
        }
        Ok(snapshots.into_iter().collect())
    }
}

/// One line of `backup --json`: a status, an error or the summary (restic tells them apart by
/// `message_type`; absent fields default to zero).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BackupMsg {
    message_type: String,
    percent_done: f64,
    total_files: u64,
    files_done: u64,
    total_bytes: u64,
    bytes_done: u64,
    item: Option<String>,
    files_new: u64,
    files_changed: u64,
    files_unmodified: u64,
    data_added: u64,
    total_files_processed: u64,
    total_bytes_processed: u64,
    snapshot_id: Option<String>,
}

/// `check`'s status lines: "[0:01] 45.00%  3 / 7 packs" (printed because RESTIC_PROGRESS_FPS is set).
fn parse_check_status(line: &str) -> Option<Progress> {
    let rest = line.trim().strip_prefix('[')?;
    let (_, rest) = rest.split_once(']')?;
    let mut words = rest.split_whitespace();
    let percent: f64 = words.next()?.strip_suffix('%')?.parse().ok()?;
    let done: u64 = words.next()?.parse().ok()?;
    if words.next()? != "/" {
        return None;
    }
    let total: u64 = words.next()?.parse().ok()?;
    if words.next()? != "packs" {
        return None;
    }
    Some(Progress {
        operation: Operation::Check,
        phase: Phase::Running,
        percent: Some(percent),
        bytes_done: None,
        bytes_total: None,
        files_done: Some(done),
        files_total: Some(total),
    })
}

/// The packs `check` names as damaged. restic 0.14 says "Pack ID does not match, want ID, got ID"
/// when a pack file's hash is wrong, and "pack ID contains N errors: ..." / "pack ID: ..." for
/// damaged blobs inside a pack.
fn damaged_packs_in(stderr: &[String]) -> BTreeSet<String> {
    let mut packs = BTreeSet::new();
    for line in stderr {
        if let Some((_, rest)) = line.split_once("Pack ID does not match, want ") {
            if let Some(id) = hex_ids(rest).into_iter().next() {
                packs.insert(id);
            }
            continue;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(rest) = lower.trim_start().strip_prefix("pack ") {
            if let Some(id) = hex_ids(rest).into_iter().next() {
                if rest.starts_with(&id) {
                    packs.insert(id);
                }
            }
        }
    }
    packs
}

/// Runs of at least 8 hex digits in `text` (restic ids, full or short).
fn hex_ids(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .filter(|w| w.len() >= 8)
        .map(|w| w.to_ascii_lowercase())
        .collect()
}

fn check_tag(tag: &str) -> Result<(), ResticError> {
    if tag.is_empty() || tag.contains(',') {
        return Err(ResticError::Invalid(format!(
            "tag {tag:?}: must be non-empty and without ',' (restic splits tags on commas)"
        )));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), ResticError> {
    if id == "latest" || (!id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit())) {
        return Ok(());
    }
    Err(ResticError::Invalid(format!(
        "snapshot id {id:?}: expected hex digits or \"latest\""
    )))
}

fn plain_path<'a>(what: &str, path: &'a Path) -> Result<&'a str, ResticError> {
    match path.to_str() {
        Some(s) if !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || "\"'\\".contains(c)) => {
            Ok(s)
        }
        _ => Err(ResticError::Invalid(format!(
            "{what} {}: paths with spaces, quotes or backslashes cannot be passed to restic's sftp.command",
            path.display()
        ))),
    }
}

/// A line callback for commands whose stdout is only read at the end.
fn ignore(_: &str) {}

async fn read_lines(stream: impl AsyncRead + Unpin) -> Vec<String> {
    let mut lines = BufReader::new(stream).lines();
    let mut all = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        all.push(line);
    }
    all
}

fn into_restic_error(e: io::Error, command: &str) -> ResticError {
    match e.into_inner().map(|inner| inner.downcast::<ResticError>()) {
        Some(Ok(err)) => *err,
        Some(Err(other)) => ResticError::Io {
            context: format!("reading restic {command}'s output"),
            source: io::Error::other(other),
        },
        None => ResticError::Io {
            context: format!("reading restic {command}'s output"),
            source: io::Error::other("i/o error"),
        },
    }
}

fn dir_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

type FinishFuture = Pin<Box<dyn Future<Output = Result<(), ResticError>> + Send>>;

/// A tar stream from `restic dump`. At its end it waits for restic: a failed dump ends the stream
/// with an `io::Error` wrapping the [`ResticError`] (get it back with `into_inner` + `downcast`).
pub struct DumpStream {
    stdout: ChildStdout,
    finish: Option<FinishFuture>,
}

impl fmt::Debug for DumpStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DumpStream")
            .field("finished", &self.finish.is_none())
            .finish()
    }
}

impl AsyncRead for DumpStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(finish) = this.finish.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stdout).poll_read(cx, buf))?;
        if buf.filled().len() > before || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // End of restic's output: the stream is whole only if restic exits 0.
        let result = ready!(finish.as_mut().poll(cx));
        this.finish = None;
        Poll::Ready(result.map_err(io::Error::other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_stderr_names_damaged_packs() {
        let full = "fee9182b2a52572352e9564889561a8d5b66de00e1897e7b7ffbc75271e09594";
        let lines = vec![
            format!("Pack ID does not match, want {full}, got 6de46a0939084fa50d635146efb950adbabacee2f059bc812d892a477a675b25"),
            "pack 1251f278 contains 1 errors: [blob 27a3b854: decrypting blob failed]".to_string(),
            "Fatal: repository contains errors".to_string(),
        ];
        let packs: Vec<_> = damaged_packs_in(&lines).into_iter().collect();
        assert_eq!(packs, vec!["1251f278".to_string(), full.to_string()]);
    }

    #[test]
    fn check_status_lines_become_progress() {
        let p = parse_check_status("[0:01] 45.00%  3 / 7 packs").unwrap();
        assert_eq!(p.percent, Some(45.0));
        assert_eq!((p.files_done, p.files_total), (Some(3), Some(7)));
        assert!(parse_check_status("[0:00] 100.00%  2 / 2 snapshots").is_none());
    }

    #[test]
    fn location_display_names_no_key() {
        let r = Restic::new(
            "restic",
            Location::Sftp(SftpLocation {
                user: "backup".into(),
                host: "10.0.0.5".into(),
                port: 2222,
                path: "/srv/berth".into(),
                identity_file: "/secret/key".into(),
                known_hosts_file: "/etc/kh".into(),
            }),
            "/secret/pw".into(),
            "/cache".into(),
        );
        assert_eq!(
            r.location_display(),
            "sftp://backup@10.0.0.5:2222/srv/berth"
        );
    }
}
