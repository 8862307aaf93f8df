//! The log of the long-running commands (`up`, `api`, `controller`): on standard error, filtered
//! by `BERTH_LOG` (default `info`), as text for a person or as one JSON object per line for a log
//! collector (`--log-format json`), so the fields berth logs (kind, name, error, ...) stay fields.

use clap::{Args, ValueEnum};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once the JSON format is installed: then even the start banner is a JSON line, so a
/// collector that parses every line finds nothing it cannot read.
static JSON: AtomicBool = AtomicBool::new(false);

/// A line for the person starting berth (where it listens, where the token is): printed as is,
/// or logged as a JSON line with `--log-format json`.
pub fn announce(line: String) {
    if JSON.load(Ordering::Relaxed) {
        tracing::info!("{line}");
    } else {
        eprintln!("{line}");
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only at a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level, the spans it happened in under `spans`.
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format on standard error: `text` or `json` (one object per line, for log collectors).
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the process's subscriber (once; a second call changes nothing).
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = match self.log_format {
            // Colour codes only for a person at a terminal; log files and journals get plain text.
            LogFormat::Text => builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .try_init(),
            LogFormat::Json => {
                JSON.store(true, Ordering::Relaxed);
                builder
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true)
                    .try_init()
            }
        };
    }
}
