//! What can be done with backups, for the controller (scheduled runs, nightly verification) and
//! for the API (`berth backup run|list|verify`, `berth restore`): one [`Backups`] per process,
//! which holds the repository lock, so two operations never interleave on one repository.
//!
//! A run: export the environment (berth's objects, via [`EnvironmentSource`]) and read every
//! selected named volume (in place on this node, through an agent task elsewhere), write one
//! restic snapshot tagged with the run id, record the evidence, then apply retention. A failed run
//! is recorded as failed and changes nothing in the repository.

use super::build::{self, Where};
use super::restic::{BackupRequest, Location, Restic, SftpLocation};
use super::retention::{self, Candidate, Policy};
use super::volumes::Transfers;
use super::volumes::VolumeOnNode;
use crate::api::{ResourceStore, SecretReader};
use crate::runtime::Records;
use async_trait::async_trait;
use berth_api_types::backup::{
    Backup, BackupSpec, EnvironmentDocument, SnapshotRecord, Verification, VolumeRecord,
};
use berth_api_types::service::ServiceSpec;
use berth_api_types::{Kind, Object};
use bollard::query_parameters::{ListNodesOptions, ListTasksOptions};
use bollard::Docker;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Mutex;
use tracing::{info, warn};

/// Where the environment document comes from: the API process's store (it alone holds the sealed
/// values and the master key).
#[async_trait]
pub trait EnvironmentSource: Send + Sync + 'static {
    async fn export(&self) -> Result<EnvironmentDocument, String>;
}

/// Fixed settings of an installation's backups.
#[derive(Debug, Clone)]
pub struct Settings {
    pub installation: String,
    /// Parent of the default local repositories (`<backup_dir>/<installation>`); outside the data
    /// directory, so losing one does not lose the other.
    pub backup_dir: PathBuf,
    /// Staging for the environment document and volumes copied from other nodes, restic's cache,
    /// credential files of SFTP repositories (mode 0600).
    pub work_dir: PathBuf,
    /// The repository key (restic's password), mode 0600: created at first use, printed by
    /// `berth backup key`.
    pub key_file: PathBuf,
    /// The restic binary.
    pub restic: PathBuf,
}

/// Progress of a long operation, streamed to the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Progress {
    fn step(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Progress {
            step: step.into(),
            percent: None,
            detail: detail.into(),
        }
    }
}

pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Send + Sync);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The request names something that is not there (a snapshot, a volume in a snapshot).
    #[error("{0}")]
    NotFound(String),
    /// The plan cannot work as written (a missing Secret for SFTP...).
    #[error("{0}")]
    Plan(String),
    #[error("{0}")]
    Failed(String),
}

/// A plan-level record: what the status shows besides the snapshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanRecord {
    #[serde(default)]
    pub last_run: Option<SnapshotRecord>,
    #[serde(default)]
    pub last_success: Option<DateTime<Utc>>,
    #[serde(default)]
    pub repository_bytes: Option<u64>,
    #[serde(default)]
    pub last_verification: Option<Verification>,
}

pub struct Backups {
    docker: Docker,
    settings: Settings,
    environment: Arc<dyn EnvironmentSource>,
    store: Arc<dyn ResourceStore>,
    secrets: Arc<dyn SecretReader>,
    transfers: Transfers,
    /// `snapshot/<run id>` -> SnapshotRecord, `plan/<name>` -> PlanRecord.
    records: Records,
    /// One operation on the repositories at a time (restic also locks, across processes).
    lock: Mutex<()>,
}

fn key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

impl Backups {
    pub fn new(
        docker: Docker,
        settings: Settings,
        environment: Arc<dyn EnvironmentSource>,
        store: Arc<dyn ResourceStore>,
        secrets: Arc<dyn SecretReader>,
        transfers: Transfers,
        records: Records,
    ) -> Self {
        Backups {
            docker,
            settings,
            environment,
            store,
            secrets,
            transfers,
            records,
            lock: Mutex::new(()),
        }
    }

    /// Agent services and grants a berth that died mid-transfer left (older than the transfer
    /// timeout).
    pub async fn collect_leftovers(&self) -> Result<usize, BackupError> {
        self.transfers
            .collect_leftovers()
            .await
            .map_err(|e| BackupError::Failed(e.to_string()))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The repository key, created (256 random bits, hex, mode 0600) at first use.
    pub fn key(&self) -> Result<String, BackupError> {
        if let Ok(k) = std::fs::read_to_string(&self.settings.key_file) {
            let k = k.trim().to_string();
            if !k.is_empty() {
                return Ok(k);
            }
        }
        let bytes: [u8; 32] = rand_bytes();
        let k = hex::encode(bytes);
        write_private(&self.settings.key_file, k.as_bytes()).map_err(|e| {
            BackupError::Failed(format!(
                "cannot write the repository key {}: {e}",
                self.settings.key_file.display()
            ))
        })?;
        Ok(k)
    }

    pub fn plan_record(&self, plan: &str) -> PlanRecord {
        self.records.get(&key("plan", plan)).unwrap_or_default()
    }

    /// Every recorded snapshot (of `plan`, or all), oldest first.
    pub fn snapshots(&self, plan: Option<&str>) -> Vec<SnapshotRecord> {
        let mut out: Vec<SnapshotRecord> = self
            .records
            .names()
            .iter()
            .filter(|n| n.starts_with("snapshot/"))
            .filter_map(|n| self.records.get::<SnapshotRecord>(n))
            .filter(|r| plan.is_none_or(|p| r.plan == p))
            .collect();
        out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        out
    }

    pub fn snapshot(&self, id: &str) -> Option<SnapshotRecord> {
        self.records.get(&key("snapshot", id))
    }

    fn save(&self, rec: &SnapshotRecord) {
        if let Err(e) = self.records.put(&key("snapshot", &rec.id), rec) {
            warn!(error = %e, "cannot record a snapshot");
        }
    }

    fn save_plan(&self, plan: &str, f: impl FnOnce(&mut PlanRecord)) {
        let mut p = self.plan_record(plan);
        f(&mut p);
        if let Err(e) = self.records.put(&key("plan", plan), &p) {
            warn!(error = %e, "cannot record a plan");
        }
    }

    /// restic for a plan's repository, with SFTP credentials written to private files.
    async fn restic(&self, spec: &BackupSpec) -> Result<Restic, BackupError> {
        self.key()?;
        let place = build::repository(spec, &self.settings.backup_dir, &self.settings.installation);
        let location = match place {
            Where::Local(path) => Location::Local(path),
            Where::Sftp(s) => {
                let dir = self.settings.work_dir.join("ssh");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| BackupError::Failed(format!("{}: {e}", dir.display())))?;
                let identity = self.secret_key(&s.identity.name, &s.identity.key).await?;
                let known = self
                    .secret_key(&s.known_hosts.name, &s.known_hosts.key)
                    .await?;
                let (id_file, kh_file) = (dir.join("identity"), dir.join("known_hosts"));
                write_private(&id_file, &identity)
                    .and_then(|_| write_private(&kh_file, &known))
                    .map_err(|e| BackupError::Failed(format!("{}: {e}", dir.display())))?;
                Location::Sftp(SftpLocation {
                    user: s.user.clone(),
                    host: s.host.clone(),
                    port: s.port,
                    path: s.path.clone(),
                    identity_file: id_file,
                    known_hosts_file: kh_file,
                })
            }
        };
        Ok(Restic::new(
            &self.settings.restic,
            location,
            self.settings.key_file.clone(),
            self.settings.work_dir.join("restic-cache"),
        ))
    }

    async fn secret_key(&self, name: &str, key: &str) -> Result<Vec<u8>, BackupError> {
        let data = self
            .secrets
            .data(Kind::Secret, name)
            .await
            .map_err(|e| BackupError::Failed(format!("reading Secret `{name}`: {e}")))?
            .ok_or_else(|| BackupError::Plan(format!("Secret `{name}` does not exist")))?;
        data.get(key)
            .cloned()
            .ok_or_else(|| BackupError::Plan(format!("Secret `{name}` has no key `{key}`")))
    }

    /// `Err(Plan)` when the plan names a Secret key that is not there (an SFTP repository's
    /// identity or known_hosts): checked on every reconcile, so the plan shows `PlanIncomplete`
    /// as soon as it is applied, not only when a run is due. Nothing is written.
    pub async fn check_plan(&self, spec: &BackupSpec) -> Result<(), BackupError> {
        if let Some(s) = spec.repository.as_ref().and_then(|r| r.sftp.as_ref()) {
            self.secret_key(&s.identity.name, &s.identity.key).await?;
            self.secret_key(&s.known_hosts.name, &s.known_hosts.key)
                .await?;
        }
        Ok(())
    }

    /// Where a plan's repository is, for status.
    pub fn describe_repository(&self, spec: &BackupSpec) -> String {
        build::describe(&build::repository(
            spec,
            &self.settings.backup_dir,
            &self.settings.installation,
        ))
    }

    /// The volumes a plan copies now, and the mounts it leaves out.
    async fn locate(
        &self,
        spec: &BackupSpec,
    ) -> Result<
        (
            Vec<VolumeOnNode>,
            Vec<berth_api_types::backup::ExcludedMount>,
        ),
        BackupError,
    > {
        let objects = self
            .store
            .list(Kind::Service)
            .await
            .map_err(|e| BackupError::Failed(format!("listing Services: {e}")))?;
        let services: Vec<(String, ServiceSpec)> = objects
            .into_iter()
            .filter_map(|o| {
                let name = o.metadata.name.clone();
                serde_json::from_value::<ServiceSpec>(o.spec)
                    .ok()
                    .map(|s| (name, s))
            })
            .collect();
        let engine = |e: bollard::errors::Error| BackupError::Failed(format!("Swarm engine: {e}"));
        let nodes = self
            .docker
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(engine)?;
        let mut hostnames: HashMap<String, usize> = HashMap::new();
        for n in &nodes {
            if let Some(h) = n.description.as_ref().and_then(|d| d.hostname.clone()) {
                *hostnames.entry(h).or_default() += 1;
            }
        }
        // Named as the Node objects are: the hostname when unique, else the node ID.
        let node_names: BTreeMap<String, String> = nodes
            .iter()
            .filter_map(|n| {
                let id = n.id.clone()?;
                let host = n.description.as_ref().and_then(|d| d.hostname.clone());
                let name = match host {
                    Some(h) if hostnames.get(&h) == Some(&1) => h.to_ascii_lowercase(),
                    _ => id.clone(),
                };
                Some((id, name))
            })
            .collect();
        let mut task_nodes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, spec_) in &services {
            if !spec_.volumes.iter().any(|m| m.volume.is_some()) {
                continue;
            }
            let filters = HashMap::from([("service".to_string(), vec![name.clone()])]);
            let tasks = self
                .docker
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(filters),
                }))
                .await
                .map_err(engine)?;
            for t in tasks {
                // A task that has a container made the volume on its node; a task still waiting
                // for a node made nothing.
                let placed = t
                    .status
                    .as_ref()
                    .and_then(|s| s.container_status.as_ref())
                    .and_then(|c| c.container_id.as_ref())
                    .is_some();
                if let (true, Some(node)) = (placed, t.node_id) {
                    task_nodes.entry(name.clone()).or_default().insert(node);
                }
            }
        }
        Ok(build::plan_volumes(
            &services,
            &task_nodes,
            &node_names,
            &spec.volumes,
        ))
    }

    /// Takes a snapshot of the environment now (scheduled or asked for), records it, applies
    /// retention. A failure is recorded (the plan's `LastRunFailed`) and returned.
    pub async fn run(
        &self,
        plan: &Backup,
        progress: ProgressFn<'_>,
    ) -> Result<SnapshotRecord, BackupError> {
        let _guard = self.lock.lock().await;
        let id = ulid::Ulid::new().to_string();
        let started = Utc::now();
        let mut rec = SnapshotRecord {
            id: id.clone(),
            plan: plan.metadata.name.clone(),
            installation: self.settings.installation.clone(),
            time: started,
            finished: None,
            ok: false,
            error: String::new(),
            restic_snapshot: None,
            objects: BTreeMap::new(),
            volumes: Vec::new(),
            excluded: Vec::new(),
            verification: None,
        };
        let outcome = self.run_inner(plan, &mut rec, progress).await;
        rec.finished = Some(Utc::now());
        match &outcome {
            Ok(()) => rec.ok = true,
            Err(e) => rec.error = e.to_string(),
        }
        // A failed run wrote no snapshot: only the plan remembers it (as `lastRun`).
        if rec.restic_snapshot.is_some() {
            self.save(&rec);
        }
        let ok = rec.ok;
        self.save_plan(&rec.plan, |p| {
            p.last_run = Some(rec.clone());
            if ok {
                p.last_success = rec.finished;
            }
        });
        self.records.flush().await;
        match outcome {
            Ok(()) => {
                info!(plan = %rec.plan, run = %rec.id, "backup done");
                if let Err(e) = self.retain(plan, progress).await {
                    warn!(plan = %rec.plan, error = %e, "retention failed; will retry after the next run");
                }
                Ok(rec)
            }
            Err(e) => {
                warn!(plan = %rec.plan, run = %rec.id, error = %e, "backup failed");
                Err(e)
            }
        }
    }

    async fn run_inner(
        &self,
        plan: &Backup,
        rec: &mut SnapshotRecord,
        progress: ProgressFn<'_>,
    ) -> Result<(), BackupError> {
        let fail =
            |what: &str, e: &dyn std::fmt::Display| BackupError::Failed(format!("{what}: {e}"));
        let restic = self.restic(&plan.spec).await?;
        progress(Progress::step("repository", restic.location_display()));
        restic
            .init_if_missing()
            .await
            .map_err(|e| fail("repository", &e))?;

        // Staging: fixed paths per plan, so an unchanged environment backs up as unchanged
        // (restic finds the previous snapshot of the same paths and skips what did not change).
        let stage = self.settings.work_dir.join("stage").join(&rec.plan);
        let env_dir = stage.join("environment");
        let remote_dir = stage.join("volumes");
        let _ = std::fs::remove_dir_all(&stage);
        std::fs::create_dir_all(&env_dir).map_err(|e| fail("staging", &e))?;
        let _cleanup = RemoveOnDrop(stage.clone());

        progress(Progress::step("environment", "exporting berth's objects"));
        let doc = self
            .environment
            .export()
            .await
            .map_err(|e| fail("exporting the environment", &e))?;
        for o in &doc.objects {
            if let Some(k) = o.get("kind").and_then(|k| k.as_str()) {
                *rec.objects.entry(k.to_string()).or_insert(0) += 1;
            }
        }
        let objects = serde_json::to_vec(&doc).expect("documents encode");
        write_private(&env_dir.join("objects.json"), &objects).map_err(|e| fail("staging", &e))?;

        let (volumes, excluded) = self.locate(&plan.spec).await?;
        rec.excluded = excluded;
        let mut paths = vec![env_dir.clone()];
        for (i, v) in volumes.iter().enumerate() {
            progress(Progress::step(
                "volume",
                format!(
                    "{}/{}: reading `{}` on {}",
                    i + 1,
                    volumes.len(),
                    v.volume,
                    v.node_name
                ),
            ));
            let staging = remote_dir.join(&v.node_id).join(&v.volume);
            let read = self
                .transfers
                .read(v, &staging)
                .await
                .map_err(|e| fail(&format!("volume `{}` on {}", v.volume, v.node_name), &e))?;
            rec.volumes.push(VolumeRecord {
                name: v.volume.clone(),
                node: v.node_name.clone(),
                node_id: v.node_id.clone(),
                path: read.path.display().to_string(),
                bytes: read.bytes,
                files: read.files,
            });
            paths.push(read.path);
        }
        // The evidence travels with the data.
        let manifest = serde_json::to_vec_pretty(&*rec).expect("records encode");
        write_private(&env_dir.join("manifest.json"), &manifest)
            .map_err(|e| fail("staging", &e))?;

        progress(Progress::step("snapshot", "writing the snapshot"));
        let request = BackupRequest {
            paths,
            tags: build::tags(&rec.id, &rec.plan, &self.settings.installation),
            host: format!("berth-{}", self.settings.installation),
            exclude: Vec::new(),
        };
        let summary = restic
            .backup(&request, |p| {
                let detail = match (p.bytes_done, p.bytes_total) {
                    (Some(done), Some(total)) => format!("{} of {} MiB", done >> 20, total >> 20),
                    _ => String::new(),
                };
                progress(Progress {
                    step: "snapshot".into(),
                    percent: p.percent.map(|p| p / 100.0),
                    detail,
                })
            })
            .await
            .map_err(|e| fail("writing the snapshot", &e))?;
        rec.restic_snapshot = Some(summary.snapshot_id.clone());
        if let Ok(size) = restic.raw_size().await {
            self.save_plan(&rec.plan, |p| p.repository_bytes = Some(size));
        }
        Ok(())
    }

    /// Forgets the plan's snapshots retention does not keep, and prunes their data.
    async fn retain(
        &self,
        plan: &Backup,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, BackupError> {
        let restic = self.restic(&plan.spec).await?;
        let policy = policy_of(&plan.spec);
        let name = &plan.metadata.name;
        let snaps = restic
            .snapshots(&[format!("io.berth.plan={name}")])
            .await
            .map_err(|e| BackupError::Failed(format!("listing snapshots: {e}")))?;
        let candidates: Vec<Candidate> = snaps
            .iter()
            .map(|s| Candidate {
                id: s.id.clone(),
                time: build::run_of(&s.tags)
                    .and_then(|r| self.snapshot(r))
                    .map(|r| r.time)
                    .unwrap_or(s.time),
                ok: true,
            })
            .collect();
        let decision = retention::decide(&policy, &candidates, Utc::now());
        if decision.forget.is_empty() {
            return Ok(Vec::new());
        }
        progress(Progress::step(
            "retention",
            format!("forgetting {} snapshot(s)", decision.forget.len()),
        ));
        restic
            .forget(&decision.forget)
            .await
            .map_err(|e| BackupError::Failed(format!("forget: {e}")))?;
        restic
            .prune()
            .await
            .map_err(|e| BackupError::Failed(format!("prune: {e}")))?;
        let gone: BTreeSet<&String> = decision.forget.iter().collect();
        for s in &snaps {
            if gone.contains(&s.id) {
                if let Some(run) = build::run_of(&s.tags) {
                    self.records.remove(&key("snapshot", run));
                }
            }
        }
        if let Ok(size) = restic.raw_size().await {
            self.save_plan(name, |p| p.repository_bytes = Some(size));
        }
        Ok(decision.forget)
    }

    /// Re-reads every blob of one snapshot (restic verifies each blob's hash as it decrypts it)
    /// and records the result on it.
    pub async fn verify(
        &self,
        plan: &Backup,
        snapshot: &str,
        progress: ProgressFn<'_>,
    ) -> Result<SnapshotRecord, BackupError> {
        let _guard = self.lock.lock().await;
        let mut rec = self
            .snapshot(snapshot)
            .ok_or_else(|| BackupError::NotFound(format!("no snapshot `{snapshot}`")))?;
        let restic = self.restic(&plan.spec).await?;
        let restic_id = rec.restic_snapshot.clone().unwrap_or_default();
        progress(Progress::step(
            "verify",
            format!("re-reading snapshot {snapshot}"),
        ));
        let report = restic
            .verify_snapshot(&restic_id)
            .await
            .map_err(|e| BackupError::Failed(format!("verify: {e}")))?;
        let v = Verification {
            time: Utc::now(),
            ok: report.ok,
            snapshot: rec.id.clone(),
            problems: report.problems.clone(),
        };
        rec.verification = Some(v.clone());
        self.save(&rec);
        self.save_plan(&rec.plan, |p| p.last_verification = Some(v));
        self.records.flush().await;
        Ok(rec)
    }

    /// Reads every pack of the plan's repository (`restic check --read-data`); the snapshots that
    /// use a damaged pack are recorded as failed, the others as verified.
    pub async fn verify_all(
        &self,
        plan: &Backup,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<SnapshotRecord>, BackupError> {
        let _guard = self.lock.lock().await;
        let restic = self.restic(&plan.spec).await?;
        progress(Progress::step(
            "verify",
            "re-reading every pack of the repository",
        ));
        let report = restic
            .check(true, |_| {})
            .await
            .map_err(|e| BackupError::Failed(format!("check: {e}")))?;
        let now = Utc::now();
        let damaged: BTreeSet<&str> = report
            .damaged_snapshots
            .iter()
            .map(String::as_str)
            .collect();
        let mut out = Vec::new();
        for mut rec in self.snapshots(Some(&plan.metadata.name)) {
            let restic_id = rec.restic_snapshot.clone().unwrap_or_default();
            let hit = damaged
                .iter()
                .any(|d| !d.is_empty() && restic_id.starts_with(d));
            // Damage restic cannot attribute to snapshots fails them all.
            let ok = report.ok || (!report.damaged_snapshots.is_empty() && !hit);
            rec.verification = Some(Verification {
                time: now,
                ok,
                snapshot: rec.id.clone(),
                problems: if ok {
                    Vec::new()
                } else {
                    report.problems.clone()
                },
            });
            self.save(&rec);
            out.push(rec);
        }
        self.save_plan(&plan.metadata.name, |p| {
            p.last_verification = Some(Verification {
                time: now,
                ok: report.ok,
                snapshot: String::new(),
                problems: report.problems.clone(),
            })
        });
        self.records.flush().await;
        Ok(out)
    }

    /// The environment document a snapshot holds.
    pub async fn environment_of(
        &self,
        plan: &Backup,
        snapshot: &str,
    ) -> Result<EnvironmentDocument, BackupError> {
        let restic = self.restic(&plan.spec).await?;
        read_environment(&restic, snapshot).await
    }

    /// Writes a volume's files from a snapshot back, on its node (or `node`), as its name (or
    /// `as_name`). The volume's current content is replaced.
    pub async fn restore_volume(
        &self,
        plan: &Backup,
        req: &RestoreVolume,
        progress: ProgressFn<'_>,
    ) -> Result<RestoredVolume, BackupError> {
        let _guard = self.lock.lock().await;
        let rec = self
            .snapshot(&req.snapshot)
            .ok_or_else(|| BackupError::NotFound(format!("no snapshot `{}`", req.snapshot)))?;
        let candidates: Vec<&VolumeRecord> = rec
            .volumes
            .iter()
            .filter(|v| v.name == req.volume)
            .collect();
        let source =
            match (candidates.as_slice(), &req.from_node) {
                ([], _) => {
                    return Err(BackupError::NotFound(format!(
                        "snapshot {} holds no volume `{}` (it holds: {})",
                        rec.id,
                        req.volume,
                        rec.volumes
                            .iter()
                            .map(|v| format!("{} on {}", v.name, v.node))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
                (_, Some(n)) => candidates
                    .iter()
                    .find(|v| &v.node == n || &v.node_id == n)
                    .copied()
                    .ok_or_else(|| {
                        BackupError::NotFound(format!(
                            "snapshot {} holds volume `{}` only from {}",
                            rec.id,
                            req.volume,
                            candidates
                                .iter()
                                .map(|v| v.node.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?,
                ([one], None) => *one,
                (many, None) => {
                    return Err(BackupError::Plan(format!(
                    "snapshot {} holds volume `{}` from {} nodes ({}); say which with --from-node",
                    rec.id,
                    req.volume,
                    many.len(),
                    many.iter().map(|v| v.node.as_str()).collect::<Vec<_>>().join(", ")
                )))
                }
            };
        let target_node = match &req.node {
            Some(n) => self.node_id(n).await?,
            None => source.node_id.clone(),
        };
        let name = req.as_name.clone().unwrap_or_else(|| source.name.clone());
        let restic = self.restic(&plan.spec).await?;
        progress(Progress::step(
            "restore",
            format!("writing `{name}` on {target_node} from snapshot {}", rec.id),
        ));
        let dump = restic
            .dump_tar(
                rec.restic_snapshot.as_deref().unwrap_or_default(),
                &source.path,
            )
            .await
            .map_err(|e| BackupError::Failed(format!("reading the snapshot: {e}")))?;
        let snapshot = rec.restic_snapshot.as_deref().unwrap_or_default();
        let root = restic
            .stat_dir(snapshot, &source.path)
            .await
            .map_err(|e| BackupError::Failed(format!("reading the snapshot: {e}")))?
            .map(|m| (m.uid, m.gid, m.mode, m.mtime));
        // restic names entries by their path in the snapshot; the volume wants them relative.
        let (reader, writer) = tokio::io::duplex(1 << 20);
        let prefix = source.path.clone();
        let rebased = tokio::task::spawn_blocking(move || {
            let input = tokio_util::io::SyncIoBridge::new(dump);
            let output = tokio_util::io::SyncIoBridge::new(writer);
            super::stream::rebase(input, &prefix, root, output)
        });
        let written = self.transfers.write(&target_node, &name, reader).await;
        match rebased.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(BackupError::Failed(format!("reading the snapshot: {e}"))),
            Err(e) => return Err(BackupError::Failed(format!("reading the snapshot: {e}"))),
        }
        let written =
            written.map_err(|e| BackupError::Failed(format!("writing volume `{name}`: {e}")))?;
        Ok(RestoredVolume {
            volume: name,
            node_id: target_node,
            files: written.files,
            bytes: written.bytes,
        })
    }

    /// A node's ID from its Node object name (hostname) or ID.
    async fn node_id(&self, node: &str) -> Result<String, BackupError> {
        let nodes = self
            .docker
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(|e| BackupError::Failed(format!("Swarm engine: {e}")))?;
        nodes
            .iter()
            .find(|n| {
                n.id.as_deref() == Some(node)
                    || n.description
                        .as_ref()
                        .and_then(|d| d.hostname.as_deref())
                        .is_some_and(|h| h.eq_ignore_ascii_case(node))
            })
            .and_then(|n| n.id.clone())
            .ok_or_else(|| BackupError::NotFound(format!("no node `{node}` in the swarm")))
    }
}

/// The environment document of run `run` (berth's snapshot id), found in the repository by its
/// tag: needs nothing but the repository and its key (disaster recovery).
pub async fn read_environment(
    restic: &Restic,
    run: &str,
) -> Result<EnvironmentDocument, BackupError> {
    let tag = build::tags(run, "", "")[0].clone();
    let snaps = restic
        .snapshots(&[tag])
        .await
        .map_err(|e| BackupError::Failed(format!("listing snapshots: {e}")))?;
    let snap = snaps.first().ok_or_else(|| {
        BackupError::NotFound(format!("the repository holds no snapshot `{run}`"))
    })?;
    let dir = snap
        .paths
        .iter()
        .find(|p| p.ends_with("/environment"))
        .ok_or_else(|| {
            BackupError::Failed(format!("snapshot `{run}` holds no environment directory"))
        })?;
    let bytes = restic
        .dump_file(&snap.id, &format!("{dir}/objects.json"))
        .await
        .map_err(|e| BackupError::Failed(format!("reading the environment: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::Failed(format!("the environment document: {e}")))
}

/// What `berth restore volume` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreVolume {
    pub snapshot: String,
    pub volume: String,
    /// The node to write on (name or ID); default: the node the volume was read on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Which node's copy, when the snapshot holds the volume from several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_node: Option<String>,
    /// Write it as a new volume of this name.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub as_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoredVolume {
    pub volume: String,
    pub node_id: String,
    pub files: u64,
    pub bytes: u64,
}

/// The retention policy of a plan's spec.
pub fn policy_of(spec: &BackupSpec) -> Policy {
    let r = spec.retention.clone().unwrap_or_default();
    Policy {
        hourly: r.hourly,
        daily: r.daily,
        weekly: r.weekly,
        monthly: r.monthly,
    }
}

/// The plan object named `name`, typed.
pub fn typed_plan(obj: berth_api_types::DynObject) -> Result<Backup, String> {
    let spec: BackupSpec = serde_json::from_value(obj.spec).map_err(|e| e.to_string())?;
    Ok(Object {
        api_version: obj.api_version,
        kind: obj.kind,
        metadata: obj.metadata,
        spec,
        status: obj.status,
    })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_bytes() -> [u8; 32] {
    use std::io::Read;
    let mut b = [0u8; 32];
    // The kernel's CSPRNG; there is no fallback on purpose.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom is readable");
    b
}

/// Writes `content` to `path` readable by root only (created 0600, fsynced).
pub fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content)?;
    f.sync_all()
}
