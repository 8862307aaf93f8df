//! Step 2 of a backup run (pure): which volumes on which nodes a plan copies and which mounts it
//! leaves out, where the repository is, and how a run's snapshot is tagged.

use berth_api_types::backup::{BackupSpec, ExcludedMount, RepositorySpec, VolumeSelector};
use berth_api_types::names::labels;
use berth_api_types::service::ServiceSpec;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use super::volumes::VolumeOnNode;

/// What a plan copies: every selected named volume mounted by a Service, on each node that runs
/// (or ran) one of its tasks; and every mount it does not copy, with why.
pub fn plan_volumes(
    services: &[(String, ServiceSpec)],
    task_nodes: &BTreeMap<String, BTreeSet<String>>,
    node_names: &BTreeMap<String, String>,
    selector: &VolumeSelector,
) -> (Vec<VolumeOnNode>, Vec<ExcludedMount>) {
    let mut volumes = BTreeSet::new();
    let mut excluded = Vec::new();
    for (service, spec) in services {
        for m in &spec.volumes {
            let Some(name) = &m.volume else {
                excluded.push(ExcludedMount {
                    service: service.clone(),
                    target: m.target.clone(),
                    type_: if m.tmpfs { "tmpfs" } else { "anonymous" }.into(),
                    reason: m
                        .unbacked_reason()
                        .unwrap_or("not a named volume")
                        .to_string()
                        + ": its data lives and dies with one container",
                });
                continue;
            };
            if !selector.selects(name) {
                excluded.push(ExcludedMount {
                    service: service.clone(),
                    target: m.target.clone(),
                    type_: "volume".into(),
                    reason: format!("volume `{name}` is not selected by the plan's `volumes`"),
                });
                continue;
            }
            for node_id in task_nodes.get(service).into_iter().flatten() {
                volumes.insert(VolumeOnNode {
                    volume: name.clone(),
                    node_id: node_id.clone(),
                    node_name: node_names
                        .get(node_id)
                        .cloned()
                        .unwrap_or_else(|| node_id.clone()),
                });
            }
        }
    }
    (volumes.into_iter().collect(), excluded)
}

/// Where a plan's repository is, before credentials are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    Local(PathBuf),
    Sftp(berth_api_types::backup::SftpSpec),
}

/// The plan's repository: its spec's, or `<backup_dir>/<installation>` (one per installation, so
/// two installations on one machine never share a repository or a key).
pub fn repository(spec: &BackupSpec, backup_dir: &Path, installation: &str) -> Where {
    match &spec.repository {
        Some(RepositorySpec {
            sftp: Some(sftp), ..
        }) => Where::Sftp(sftp.clone()),
        Some(RepositorySpec {
            path: Some(path), ..
        }) => Where::Local(PathBuf::from(path)),
        _ => Where::Local(backup_dir.join(installation)),
    }
}

/// How a place is shown in status and evidence (never a credential).
pub fn describe(place: &Where) -> String {
    match place {
        Where::Local(p) => p.display().to_string(),
        Where::Sftp(s) => format!("sftp:{}@{}:{}{}", s.user, s.host, s.port, s.path),
    }
}

/// Tags of a run's restic snapshot: the run id, its plan and installation, so the repository alone
/// (after losing the manager) says which snapshot is which.
pub fn tags(run: &str, plan: &str, installation: &str) -> Vec<String> {
    vec![
        format!("{}={run}", labels::BACKUP_RUN),
        format!("io.berth.plan={plan}"),
        format!("{}={installation}", labels::INSTANCE),
    ]
}

/// The run id in a snapshot's tags.
pub fn run_of(tags: &[String]) -> Option<&str> {
    let prefix = format!("{}=", labels::BACKUP_RUN);
    tags.iter().find_map(|t| t.strip_prefix(&prefix))
}

/// The plan in a snapshot's tags.
pub fn plan_of(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix("io.berth.plan="))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(volumes: serde_json::Value) -> ServiceSpec {
        serde_json::from_value(json!({"image": "app:1", "volumes": volumes})).unwrap()
    }

    #[test]
    fn named_volumes_per_node_and_the_rest_excluded() {
        let services = vec![
            (
                "db".to_string(),
                spec(json!([{"target": "/var/lib/pg", "volume": "pgdata"},
                            {"target": "/tmp", "tmpfs": true},
                            {"target": "/cache"}])),
            ),
            (
                "web".to_string(),
                spec(json!([{"target": "/uploads", "volume": "uploads"},
                            {"target": "/scratch", "volume": "scratch"}])),
            ),
            (
                "idle".to_string(),
                spec(json!([{"target": "/d", "volume": "idle-data"}])),
            ),
        ];
        let tasks = BTreeMap::from([
            ("db".to_string(), BTreeSet::from(["n1".to_string()])),
            (
                "web".to_string(),
                BTreeSet::from(["n1".to_string(), "n2".to_string()]),
            ),
        ]);
        let names = BTreeMap::from([("n1".to_string(), "manager-1".to_string())]);
        let selector = VolumeSelector {
            include: vec![],
            exclude: vec!["scratch".into()],
        };
        let (volumes, excluded) = plan_volumes(&services, &tasks, &names, &selector);
        let got: Vec<(&str, &str)> = volumes
            .iter()
            .map(|v| (v.volume.as_str(), v.node_name.as_str()))
            .collect();
        // idle-data: no task ran anywhere, so no node has the volume.
        assert_eq!(
            got,
            [
                ("pgdata", "manager-1"),
                ("uploads", "manager-1"),
                ("uploads", "n2")
            ]
        );
        let ex: Vec<(&str, &str)> = excluded
            .iter()
            .map(|e| (e.target.as_str(), e.type_.as_str()))
            .collect();
        assert_eq!(
            ex,
            [
                ("/tmp", "tmpfs"),
                ("/cache", "anonymous"),
                ("/scratch", "volume")
            ]
        );
    }

    #[test]
    fn repository_defaults_per_installation_and_tags_round_trip() {
        let spec = BackupSpec::default();
        assert_eq!(
            repository(&spec, Path::new("/var/lib/berth-backups"), "01abc"),
            Where::Local("/var/lib/berth-backups/01abc".into())
        );
        let t = tags("01run", "environment", "01abc");
        assert_eq!(run_of(&t), Some("01run"));
        assert_eq!(plan_of(&t), Some("environment"));
    }
}
