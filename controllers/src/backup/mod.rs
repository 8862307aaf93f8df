//! Backup: hourly snapshots of the environment into a restic repository. The pure parts so far:
//! `retention` (which snapshots to keep, which to forget) and `schedule` (when a run is due).

pub mod retention;
pub mod schedule;
