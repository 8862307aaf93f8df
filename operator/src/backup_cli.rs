//! `berth backup run|list|verify|key` and `berth restore volume|environment`: the backup routes of
//! the API for a person or CI, with progress on stderr and the evidence as a table, JSON or CSV.
//! `berth restore environment --data-dir` also works with berth stopped, straight from the
//! repository: the disaster-recovery path for a lost manager.

use crate::api_client::ApiClient;
use crate::crypto::MasterKey;
use crate::environment::{self, RestorePlan};
use crate::store::Store;
use crate::Conn;
use berth_api_types::backup::{SnapshotRecord, DEFAULT_PLAN};
use berth_api_types::meta::format_time;
use berth_api_types::names::paths;
use berth_controllers::api::ClientError;
use berth_controllers::backup::operations::{read_environment, Progress};
use berth_controllers::backup::restic::{Location, Restic};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum EvidenceFormat {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand)]
pub enum BackupCommand {
    /// Take a snapshot now with a plan (default `environment`), showing progress.
    Run { plan: Option<String> },
    /// The evidence: every snapshot with its time (UTC), plan, objects, volumes (node, size,
    /// files), excluded mounts, restic snapshot id and last verification.
    List {
        #[arg(long)]
        plan: Option<String>,
        #[arg(short = 'o', long, default_value = "table")]
        output: EvidenceFormat,
    },
    /// Re-read every blob of a snapshot (or, with --all, every pack of the repository) and record
    /// the result. Exits non-zero when anything is damaged.
    Verify {
        snapshot: Option<String>,
        #[arg(long, conflicts_with = "snapshot")]
        all: bool,
        /// With --all: the plan whose repository to check (default `environment`).
        #[arg(long, requires = "all")]
        plan: Option<String>,
    },
    /// Print the repository key (admin only), to run restic against the repository yourself:
    /// `RESTIC_PASSWORD_FILE=<file with the key> restic -r <repository> snapshots`. Keep a copy
    /// off this machine: without it no backup can be read.
    Key,
}

#[derive(Subcommand)]
pub enum RestoreCommand {
    /// Write a volume's files back from a snapshot (its current content is replaced).
    Volume {
        #[arg(long)]
        snapshot: String,
        #[arg(long)]
        volume: String,
        /// The node to write it on (default: the node it was read on).
        #[arg(long)]
        node: Option<String>,
        /// Which node's copy, when the snapshot holds the volume from several nodes.
        #[arg(long)]
        from_node: Option<String>,
        /// Write it as a new volume of this name instead.
        #[arg(long = "as")]
        as_name: Option<String>,
    },
    /// Re-apply the objects of a snapshot (Secrets sealed again under the current master key).
    /// Shows what it changes; never deletes what the snapshot lacks. With --data-dir (berth
    /// stopped, a fresh directory) it reads the repository directly and the restored
    /// installation adopts the Swarm objects the snapshot's installation made.
    Environment {
        #[arg(long)]
        snapshot: String,
        #[arg(long)]
        dry_run: bool,
        /// Restore into this data directory, with berth stopped (disaster recovery).
        #[arg(long, requires_all = ["repository", "key_file"])]
        data_dir: Option<PathBuf>,
        /// The repository directory (with --data-dir).
        #[arg(long)]
        repository: Option<PathBuf>,
        /// A file holding the repository key (`berth backup key`), with --data-dir.
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[arg(long, env = "BERTH_RESTIC", default_value = "restic")]
        restic: PathBuf,
    },
}

type CliResult = Result<(), String>;

fn api_error(e: ClientError) -> String {
    format!("error: {e}")
}

/// One line of a long operation's answer.
#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    progress: Option<Progress>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<String>,
}

/// Sends a long operation and shows its progress on stderr; returns its result.
async fn long_operation(client: &ApiClient, path: &str, body: Value) -> Result<Value, String> {
    let mut lines = Box::pin(
        client
            .json_lines::<Line>(client.request(Method::POST, path).json(&body))
            .await
            .map_err(api_error)?,
    );
    let tty = std::io::stderr().is_terminal();
    while let Some(line) = lines.next().await {
        let line = line.map_err(api_error)?;
        if let Some(p) = line.progress {
            let pct = p
                .percent
                .map(|p| format!(" {:.0}%", p * 100.0))
                .unwrap_or_default();
            if tty {
                eprint!("\r\x1b[2K{}{pct}: {}", p.step, p.detail);
            } else if p.percent.is_none() {
                eprintln!("{}: {}", p.step, p.detail);
            }
        }
        if let Some(e) = line.error {
            if tty {
                eprintln!();
            }
            return Err(format!("error: {e}"));
        }
        if let Some(r) = line.result {
            if tty {
                eprintln!();
            }
            return Ok(r);
        }
    }
    Err("error: the API server closed the connection before the operation finished".into())
}

pub async fn backup(conn: &Conn, command: BackupCommand) -> CliResult {
    let client = crate::cli::client(conn)?;
    match command {
        BackupCommand::Run { plan } => {
            let plan = plan.unwrap_or_else(|| DEFAULT_PLAN.to_string());
            let r = long_operation(&client, &paths::backup_run(&plan), json!({})).await?;
            let rec: SnapshotRecord = serde_json::from_value(r).map_err(|e| e.to_string())?;
            println!(
                "snapshot {} of plan {}: {} objects, {} volume(s), {} excluded mount(s); restic {}",
                rec.id,
                rec.plan,
                rec.objects.values().sum::<u64>(),
                rec.volumes.len(),
                rec.excluded.len(),
                rec.restic_snapshot.as_deref().map(short).unwrap_or("-")
            );
            Ok(())
        }
        BackupCommand::List { plan, output } => {
            let path = match &plan {
                Some(p) => format!("{}?plan={p}", paths::SNAPSHOTS),
                None => paths::SNAPSHOTS.to_string(),
            };
            let v: Value = client
                .request_json(Method::GET, &path, None)
                .await
                .map_err(api_error)?;
            let items: Vec<SnapshotRecord> =
                serde_json::from_value(v["items"].clone()).map_err(|e| e.to_string())?;
            match output {
                EvidenceFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "items": items,
                        "notIncluded": berth_api_types::backup::NOT_INCLUDED,
                    }))
                    .map_err(|e| e.to_string())?
                ),
                EvidenceFormat::Csv => print!("{}", evidence_csv(&items)),
                EvidenceFormat::Table if items.is_empty() => eprintln!("No snapshots yet."),
                EvidenceFormat::Table => println!("{}", table(&items)),
            }
            Ok(())
        }
        BackupCommand::Verify {
            snapshot,
            all,
            plan,
        } => {
            if snapshot.is_none() && !all {
                return Err("error: name a SNAPSHOT to verify, or pass --all".into());
            }
            let body = json!({"snapshot": snapshot, "all": all, "plan": plan});
            let r = long_operation(&client, paths::SNAPSHOTS_VERIFY, body).await?;
            let recs: Vec<SnapshotRecord> = serde_json::from_value(r).map_err(|e| e.to_string())?;
            let mut damaged = 0;
            for rec in &recs {
                let v = rec.verification.as_ref();
                let ok = v.is_some_and(|v| v.ok);
                if ok {
                    println!(
                        "snapshot {}: verified, every blob reads back intact",
                        rec.id
                    );
                } else {
                    damaged += 1;
                    println!("snapshot {}: DAMAGED", rec.id);
                    for p in v.map(|v| v.problems.as_slice()).unwrap_or_default() {
                        println!("  {p}");
                    }
                }
            }
            if damaged > 0 {
                return Err(format!(
                    "error: {damaged} of {} snapshot(s) failed verification",
                    recs.len()
                ));
            }
            Ok(())
        }
        BackupCommand::Key => {
            let v: Value = client
                .request_json(Method::GET, paths::BACKUP_KEY, None)
                .await
                .map_err(api_error)?;
            println!("{}", v["key"].as_str().unwrap_or_default());
            if let Some(r) = v["repository"].as_str() {
                eprintln!("repository: {r}\ncheck it with: RESTIC_PASSWORD_FILE=<file holding the key above> restic -r {r} check --read-data");
            }
            Ok(())
        }
    }
}

pub async fn restore(conn: &Conn, command: RestoreCommand) -> CliResult {
    match command {
        RestoreCommand::Volume {
            snapshot,
            volume,
            node,
            from_node,
            as_name,
        } => {
            let client = crate::cli::client(conn)?;
            let body = json!({"snapshot": snapshot, "volume": volume, "node": node,
                              "fromNode": from_node, "as": as_name});
            let r = long_operation(&client, paths::RESTORE_VOLUME, body).await?;
            println!(
                "volume {} restored on node {}: {} files, {} bytes",
                r["volume"].as_str().unwrap_or_default(),
                r["nodeId"].as_str().unwrap_or_default(),
                r["files"],
                r["bytes"]
            );
            Ok(())
        }
        RestoreCommand::Environment {
            snapshot,
            dry_run,
            data_dir: Some(data_dir),
            repository,
            key_file,
            restic,
        } => {
            let (Some(repository), Some(key_file)) = (repository, key_file) else {
                return Err("error: --data-dir needs --repository and --key-file".into());
            };
            offline(&snapshot, dry_run, &data_dir, repository, key_file, restic).await
        }
        RestoreCommand::Environment {
            snapshot, dry_run, ..
        } => {
            let client = crate::cli::client(conn)?;
            // What it will change first (a dry run), then, unless that was all, the restore.
            let ask = |dry: bool| {
                let body = json!({"snapshot": snapshot, "dryRun": dry});
                let client = &client;
                async move {
                    client
                        .request_json::<RestorePlan>(
                            Method::POST,
                            paths::RESTORE_ENVIRONMENT,
                            Some(&body),
                        )
                        .await
                        .map_err(api_error)
                }
            };
            let plan = ask(true).await?;
            show_plan(&plan);
            if !dry_run {
                show_plan(&ask(false).await?);
            }
            Ok(())
        }
    }
}

/// Restores from the repository into a data directory while berth is stopped (the store's lock
/// refuses a running berth's directory).
async fn offline(
    snapshot: &str,
    dry_run: bool,
    data_dir: &std::path::Path,
    repository: PathBuf,
    key_file: PathBuf,
    restic: PathBuf,
) -> CliResult {
    let cache = tempfile::tempdir().map_err(|e| format!("error: {e}"))?;
    let restic = Restic::new(
        restic,
        Location::Local(repository),
        key_file.clone(),
        cache.path().to_path_buf(),
    );
    let doc = read_environment(&restic, snapshot)
        .await
        .map_err(|e| format!("error: {e}"))?;
    let store_dir = data_dir.join("store");
    // A dry run writes nothing: against a data directory that has no store yet, it runs against
    // a throwaway one (everything would be created).
    let scratch = tempfile::tempdir().map_err(|e| format!("error: {e}"))?;
    let opened = |dir: &std::path::Path| {
        crate::store::open_sled(dir)
            .map(|db| (db, dir.display().to_string()))
            .map_err(|e| format!("error: {e}"))
    };
    let ((db, shown), key) = if dry_run && !store_dir.exists() {
        (
            opened(&scratch.path().join("store"))?,
            MasterKey::random("dry run"),
        )
    } else {
        // What berth writes there is private, as when the server makes it (see `data_dir`).
        crate::data_dir::prepare(data_dir, &crate::data_dir::KEY_FILES)
            .map_err(|e| format!("error: {e}"))?;
        let db = opened(&store_dir)?;
        if !dry_run {
            let adopted = Store::adopt_installation(&db.0, &doc.installation)
                .map_err(|e| format!("error: {e}"))?;
            if !adopted {
                eprintln!(
                    "note: {} already holds objects; it keeps its own installation id and does \
                     not adopt the Swarm objects of installation {}",
                    data_dir.display(),
                    doc.installation
                );
            } else {
                take_snapshot_key(data_dir, &doc.master_key)?;
            }
        }
        (
            db,
            MasterKey::resolve(data_dir).map_err(|e| format!("error: {e}"))?,
        )
    };
    let store = Store::open_db(db, &shown, &key)
        .await
        .map_err(|e| format!("error: {e}"))?;
    let plan = environment::restore(&store, &doc, dry_run)
        .await
        .map_err(|e| format!("error: {e}"))?;
    // The restored berth goes on writing to the same repository with the same key.
    let own_key = data_dir.join("backup.key");
    if !dry_run && !own_key.exists() {
        let k =
            std::fs::read(&key_file).map_err(|e| format!("error: {}: {e}", key_file.display()))?;
        berth_controllers::backup::operations::write_private(&own_key, &k)
            .map_err(|e| format!("error: {}: {e}", own_key.display()))?;
    }
    show_plan(&plan);
    if !dry_run {
        eprintln!(
            "restored into {}: start berth on it (`berth up --data-dir {}`) and it converges",
            data_dir.display(),
            data_dir.display()
        );
    }
    Ok(())
}

/// The installation that comes back takes its own master key back (from the snapshot) when the
/// data directory has none and none is given in `BERTH_MASTER_KEY`: the keyed digests that name
/// its Secrets and Configs in Swarm derive from it, so with the same key the adopted Swarm objects
/// keep their names and no service restarts. (A new key would re-seal everything and rename them:
/// `berth admin rotate-master-key` does that, when wanted, afterwards.)
fn take_snapshot_key(data_dir: &std::path::Path, sealed_doc_key: &str) -> CliResult {
    let path = data_dir.join(crate::crypto::MASTER_KEY_FILE);
    if std::env::var_os(crate::crypto::MASTER_KEY_ENV).is_some() || path.exists() {
        return Ok(());
    }
    let key = MasterKey::parse_env(sealed_doc_key)
        .map_err(|_| "error: the snapshot's master key is not 32 bytes of base64".to_string())?;
    crate::crypto::write_new_key_file(&path, &key)
        .map_err(|e| format!("error: cannot write {}: {e}", path.display()))
}

fn show_plan(plan: &RestorePlan) {
    let head = if plan.dry_run { "would" } else { "did" };
    eprintln!(
        "{head}: restore the environment of installation {}{}",
        plan.installation,
        if plan.adopted_installation {
            " (this installation)"
        } else {
            ""
        }
    );
    for line in environment::describe(plan) {
        println!("{line}");
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn verification(rec: &SnapshotRecord) -> String {
    match &rec.verification {
        None => "never".into(),
        Some(v) if v.ok => format!("ok {}", format_time(&v.time)),
        Some(v) => format!("FAILED {}", format_time(&v.time)),
    }
}

fn table(items: &[SnapshotRecord]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                format_time(&r.time),
                r.plan.clone(),
                r.objects.values().sum::<u64>().to_string(),
                r.volumes
                    .iter()
                    .map(|v| {
                        format!(
                            "{}@{} {} {}f",
                            v.name,
                            v.node,
                            human_bytes(v.bytes),
                            v.files
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                r.excluded.len().to_string(),
                r.restic_snapshot
                    .as_deref()
                    .map(short)
                    .unwrap_or("-")
                    .to_string(),
                verification(r),
            ]
        })
        .collect();
    crate::output::table(
        &[
            "SNAPSHOT",
            "TIME (UTC)",
            "PLAN",
            "OBJECTS",
            "VOLUMES",
            "EXCLUDED",
            "RESTIC",
            "VERIFIED",
        ],
        &rows,
    )
}

/// One row per snapshot; volumes and exclusions as `;`-separated lists in their cells.
pub(crate) fn evidence_csv(items: &[SnapshotRecord]) -> String {
    let mut rows = Vec::with_capacity(items.len());
    for r in items {
        let objects: Vec<String> = r.objects.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let volumes: Vec<String> = r
            .volumes
            .iter()
            .map(|v| format!("{}@{} bytes={} files={}", v.name, v.node, v.bytes, v.files))
            .collect();
        let excluded: Vec<String> = r
            .excluded
            .iter()
            .map(|e| format!("{}:{} ({})", e.service, e.target, e.type_))
            .collect();
        let (at, ok) = match &r.verification {
            Some(v) => (format_time(&v.time), v.ok.to_string()),
            None => (String::new(), String::new()),
        };
        rows.push(vec![
            r.id.clone(),
            format_time(&r.time),
            r.plan.clone(),
            r.installation.clone(),
            objects.join(";"),
            volumes.join(";"),
            excluded.join(";"),
            r.restic_snapshot.clone().unwrap_or_default(),
            at,
            ok,
        ]);
    }
    crate::output::csv(
        &[
            "snapshot",
            "time_utc",
            "plan",
            "installation",
            "objects",
            "volumes",
            "excluded",
            "restic_snapshot",
            "verified_at",
            "verified_ok",
        ],
        &rows,
    )
}
