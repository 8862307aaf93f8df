//! Backups of a berth environment (its objects as JSON, its named volumes' data) in restic format.

pub mod restic;
