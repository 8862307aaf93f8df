//! Backup: hourly snapshots of the environment into a restic repository. The pure parts so far:
//! `schedule` (when a run is due).

pub mod schedule;
