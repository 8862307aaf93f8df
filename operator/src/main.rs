//! `berth`: the command line. Server commands (`up`, `api`, `controller`) run berth; client commands
//! (`apply`, `get`, `describe`, `delete`, `events`) talk to a running API server.

mod access;
mod admin;
mod api_client;
mod audit;
mod audit_api;
mod audit_cli;
mod backup_api;
mod backup_cli;
mod cli;
mod client_config;
mod completion;
mod compose_import;
mod create_cli;
mod crypto;
mod daemon;
mod dashboard;
mod data_dir;
mod day2_api;
mod day2_cli;
mod deploy_applier;
mod deploy_auth;
mod diff_cli;
mod edit_cli;
mod environment;
mod exec_agent;
mod exec_engine;
mod extract;
#[cfg(test)]
mod fuzz;
mod hooks;
mod in_process_api;
mod jsonpath;
mod logging;
mod nats_args;
mod objects_cli;
mod openapi;
mod output;
mod probes;
mod prune_cli;
mod push_hooks;
mod rollout_cli;
mod schema_cli;
mod server;
mod store;
mod tls;
mod token_api;
mod token_cli;
mod tokens;
mod wait_cli;
mod webhook;
mod webhook_cli;

use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A Kubernetes-style operator for Docker Swarm"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the API server is and how to authenticate. Each setting comes from the first of: its
/// flag, its environment variable, the context (client_config.rs), the default.
#[derive(Args, Clone)]
pub struct Conn {
    /// API server URL; several, separated by commas, for API servers sharing one store (a request
    /// goes to the next when one does not answer). Default: the context's, else
    /// http://127.0.0.1:7474.
    #[arg(long, env = "BERTH_URL", global = true)]
    pub url: Option<String>,
    /// Bearer token (also $BERTH_TOKEN). Prefer --token-file: a token in argv shows in `ps` and
    /// shell history. `berth up` writes the admin token to <data-dir>/admin.token.
    // No `env` here: the token's variables come after both flags (client_config::resolve_with).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Read the bearer token from this file (also $BERTH_TOKEN_FILE); keep it `chmod 600`.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Trust only this CA (PEM) for an https URL, e.g. <data-dir>/ca.pem of `berth up --tls
    /// internal`. Without it the system's roots are trusted.
    #[arg(long, env = "BERTH_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Use this context of the client configuration (~/.config/berth/config.yaml) instead of its
    /// current-context.
    #[arg(long, env = "BERTH_CONTEXT", global = true)]
    pub context: Option<String>,
}

#[derive(Args, Clone)]
pub struct ServerArgs {
    /// Where the API server keeps its database and the admin token.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = "/var/lib/berth")]
    pub data_dir: PathBuf,
    /// Address the API server listens on. Beyond loopback it needs TLS (or --insecure-http).
    #[arg(long, env = "BERTH_LISTEN", default_value = "127.0.0.1:7474")]
    pub listen: String,
    /// Serve the deploy webhooks (`/hooks/...`) on this address instead, and only them: a CI
    /// system reaches its hooks without reaching the admin API, which then answers 404 for
    /// `/hooks/...`. Same TLS as the API.
    #[arg(long, env = "BERTH_HOOKS_LISTEN")]
    pub hooks_listen: Option<String>,
    #[command(flatten)]
    pub tls: tls::TlsArgs,
    /// NATS server URL; without it, events stay inside this process (embedded bus).
    // The URL may carry a password: `--help` must not print the variable's value.
    #[arg(long, env = "BERTH_NATS", hide_env_values = true)]
    pub nats: Option<String>,
    #[command(flatten)]
    pub nats_auth: nats_args::NatsAuthArgs,
    /// Where the API server keeps its state: `sled` (a database in --data-dir, one server) or
    /// `nats` (a replicated stream on the NATS servers of --nats: run `berth api --store nats`
    /// on several managers and any of them serves reads and writes).
    #[arg(long, env = "BERTH_STORE", value_enum, default_value = "sled")]
    pub store: StoreBackend,
    #[command(flatten)]
    pub store_log: StoreLogArgs,
    /// The Network every Service joins when it lists none; created at start if missing.
    #[arg(long, env = "BERTH_DEFAULT_NETWORK", default_value = berth_api_types::network::DEFAULT_NETWORK)]
    pub default_network: String,
    /// Deploy webhook calls allowed per second from one source address (bursts of 5 s worth).
    #[arg(long, env = "BERTH_HOOK_RATE", default_value_t = 20)]
    pub hook_rate: u32,
    #[command(flatten)]
    pub backup: BackupArgs,
    #[command(flatten)]
    pub agents: AgentArgs,
    /// Let Volumes bind-mount host paths or mount host devices (`local` driver options such as
    /// `type=none,o=bind,device=/srv/data`, or `type=ext4,device=/dev/sdb1`). Off: any Service
    /// could then read and write the node's files, its Docker socket included.
    #[arg(long, env = "BERTH_ALLOW_BIND_MOUNTS", value_parser = clap::builder::FalseyValueParser::new())]
    pub allow_bind_mounts: bool,
}

/// The store's stream on NATS (`--store nats`, and `admin migrate-store`).
#[derive(Args, Clone, Debug)]
pub struct StoreLogArgs {
    /// Replicas of the store's stream with `--store nats`: 3 on a three-server NATS cluster
    /// (survives losing one), 1 on a single server. Used when the stream is created.
    #[arg(long, env = "BERTH_STORE_REPLICAS", default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub store_replicas: u8,
    /// The store's stream with `--store nats`: one per installation on a shared NATS.
    #[arg(long, env = "BERTH_STORE_STREAM", default_value = berth_api_types::names::subjects::STORE_STREAM, value_parser = stream_name)]
    pub store_stream: String,
    /// Commits between snapshots of the store's log (the most a starting server replays).
    #[arg(long, env = "BERTH_STORE_COMPACT_EVERY", default_value_t = 10_000, hide = true, value_parser = clap::value_parser!(u64).range(10..))]
    pub store_compact_every: u64,
}

impl StoreLogArgs {
    pub fn config(&self) -> crate::store::backend::jetstream::LogConfig {
        crate::store::backend::jetstream::LogConfig {
            stream: self.store_stream.clone(),
            replicas: usize::from(self.store_replicas),
            compact_every: self.store_compact_every,
        }
    }
}

/// The backends of the API server's store (`store::backend`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreBackend {
    Sled,
    Nats,
}

/// A JetStream stream name: letters, digits, `-` and `_` (NATS refuses `.`, `*`, `>` and spaces).
fn stream_name(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a stream name: use 1-64 letters, digits, `-` or `_`"
        ))
    }
}

impl ServerArgs {
    /// How to reach NATS, when this server uses it.
    pub fn nats_settings(&self) -> Option<berth_controllers::bus::NatsSettings> {
        self.nats.as_deref().map(|url| self.nats_auth.settings(url))
    }
}

/// Backups (they run in the API server's process: only it can read the store's sealed values).
#[derive(Args, Clone)]
pub struct BackupArgs {
    /// Parent of the default local repositories (`<dir>/<installation id>`). Keep it outside the
    /// data directory, ideally on another disk: one failure must not take both.
    #[arg(
        long,
        env = "BERTH_BACKUP_DIR",
        default_value = "/var/lib/berth-backups"
    )]
    pub backup_dir: PathBuf,
    /// The restic binary that writes and reads repositories.
    #[arg(long, env = "BERTH_RESTIC", default_value = "restic")]
    pub restic: PathBuf,
    /// Do not create the default `environment` plan at first start (for installations whose
    /// plans are managed elsewhere, and for tests that share one engine).
    #[arg(long, env = "BERTH_NO_DEFAULT_BACKUP_PLAN", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_default_backup_plan: bool,
}

/// The short-lived agent tasks berth starts on other nodes (controllers/src/swarm/agent_task.rs):
/// volume transfers for backups and restores, and `berth exec` into tasks there.
#[derive(Args, Clone)]
pub struct AgentArgs {
    /// The agents' image: it runs the berth binary (`berth agent`).
    #[arg(long, alias = "backup-agent-image", env = "BERTH_AGENT_IMAGE", default_value = concat!("berth:", env!("CARGO_PKG_VERSION")))]
    pub agent_image: String,
    /// Run agents on the node's host network instead of the engine's default bridge. Only for
    /// nodes whose engines have no bridge network (`dockerd --bridge none`, as in the 3-node lab),
    /// where an agent task would otherwise have only loopback and could not reach berth. It is a
    /// privilege: the agent then shares the node's network namespace (every interface and port of
    /// the node), so it is off unless asked for.
    #[arg(long, alias = "backup-agent-host-network", env = "BERTH_AGENT_HOST_NETWORK", value_parser = clap::builder::FalseyValueParser::new())]
    pub agent_host_network: bool,
    /// Let `berth exec` reach tasks on other nodes than this API server's, through an exec agent
    /// started on the task's node for the one command. It is a privilege: that agent mounts the
    /// node's engine socket, and whoever speaks to it is root on the node. Off: such a task is
    /// refused (tasks on this node are exec'd through this server's own engine either way).
    /// Callers still need the exec grant (`berth token create --exec`).
    #[arg(long, env = "BERTH_ALLOW_REMOTE_EXEC", value_parser = clap::builder::FalseyValueParser::new())]
    pub allow_remote_exec: bool,
    /// The engine socket on every node, as exec agents mount it. Swarm expands `{{.Node.ID}}` and
    /// `{{.Node.Hostname}}` in it, for nodes whose sockets differ.
    #[arg(
        long,
        env = "BERTH_AGENT_ENGINE_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    pub agent_engine_socket: String,
}

/// The Ingress controller's load balancer.
#[derive(Args, Clone)]
pub struct IngressArgs {
    /// Name of the proxy's Swarm service, also the prefix of its configs, secrets and volume. Give
    /// each berth installation sharing a Swarm its own.
    #[arg(long, env = "BERTH_INGRESS_NAME", default_value = berth_api_types::ingress::DEFAULT_PROXY_NAME)]
    pub ingress_name: String,
    /// The proxy's image: Caddy 2 (its `caddy` binary must be on PATH).
    #[arg(long, env = "BERTH_INGRESS_IMAGE", default_value = "caddy:2")]
    pub ingress_image: String,
    /// Host port (host mode, on every proxy node) for HTTPS.
    #[arg(long, env = "BERTH_INGRESS_HTTPS_PORT", default_value_t = 443)]
    pub ingress_https_port: u16,
    /// Host port for plain HTTP, which only redirects to HTTPS.
    #[arg(long, env = "BERTH_INGRESS_HTTP_PORT", default_value_t = 80)]
    pub ingress_http_port: u16,
    /// Host port (host mode, on every proxy node) of the proxy's admin endpoint, through which
    /// berth loads route changes live. Only berth's admin client certificate gets in (mutual TLS);
    /// berth must reach this port on every proxy node.
    #[arg(long, env = "BERTH_INGRESS_ADMIN_PORT", default_value_t = 2021)]
    pub ingress_admin_port: u16,
}

impl IngressArgs {
    pub fn settings(&self) -> berth_controllers::ingress::build::Settings {
        berth_controllers::ingress::build::Settings {
            name: self.ingress_name.clone(),
            image: self.ingress_image.clone(),
            https_port: self.ingress_https_port,
            http_port: self.ingress_http_port,
            admin_port: self.ingress_admin_port,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server and every controller in one process.
    Up {
        #[command(flatten)]
        server: ServerArgs,
        /// Docker engine (unix:///var/run/docker.sock, tcp://HOST:PORT); default DOCKER_HOST or the local socket.
        #[arg(long, env = "DOCKER_HOST")]
        docker_host: Option<String>,
        /// Seconds between full resyncs of every object.
        #[arg(long, default_value_t = 60)]
        resync: u64,
        #[command(flatten)]
        ingress: IngressArgs,
        #[command(flatten)]
        log: logging::LogArgs,
    },
    /// Run the API server alone (controllers run as their own processes, connected through NATS).
    Api {
        #[command(flatten)]
        server: ServerArgs,
        /// The ingress proxy's name, as the ingress controller is given it: no object may take a
        /// name of the proxy's Swarm objects (the proxy's service, or one starting with `NAME-`).
        #[arg(long, env = "BERTH_INGRESS_NAME", default_value = berth_api_types::ingress::DEFAULT_PROXY_NAME)]
        ingress_name: String,
        /// Docker engine of a manager, for what the API reads from the swarm itself (the join
        /// command); default DOCKER_HOST or the local socket.
        #[arg(long, env = "DOCKER_HOST")]
        docker_host: Option<String>,
        #[command(flatten)]
        log: logging::LogArgs,
    },
    /// Run one controller alone, against a running API server and NATS.
    Controller {
        /// Which controller: `service`, `network`, `registry`, `ingress` or `node`.
        kind: String,
        #[command(flatten)]
        conn: Conn,
        /// NATS server URL (required: it is how a separate controller hears about changes).
        #[arg(long, env = "BERTH_NATS", hide_env_values = true)]
        nats: String,
        #[command(flatten)]
        nats_auth: nats_args::NatsAuthArgs,
        #[arg(long, env = "DOCKER_HOST")]
        docker_host: Option<String>,
        /// Where this controller keeps its own state.
        #[arg(long, default_value = "/var/lib/berth/controllers")]
        state_dir: PathBuf,
        /// Seconds between full resyncs of every object this instance owns.
        #[arg(long, env = "BERTH_RESYNC", default_value_t = 60)]
        resync: u64,
        #[command(flatten)]
        ingress: IngressArgs,
        #[command(flatten)]
        log: logging::LogArgs,
    },
    /// Create or update objects from manifest files or directories (all or nothing).
    Apply {
        /// Files or directories (*.yaml, *.yml, *.json); `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Validate and show what would change, without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Then wait until every applied object that a controller reconciles is Ready; fail
        /// naming the first that cannot get there (for CI).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (`90s`, `5m`, `1m30s`; 0 waits as long as it takes).
        #[arg(long, default_value = "5m", value_parser = parse_duration, requires = "wait")]
        timeout: std::time::Duration,
        /// Then delete the objects matching -l that the files do not name (shown first).
        #[arg(long, requires = "selector")]
        prune: bool,
        /// With --prune: the label selector that says which objects these files own (`app=shop`).
        #[arg(short = 'l', long, requires = "prune")]
        selector: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show what `apply -f` would change, as a unified diff of each object's labels, annotations
    /// and spec (Secret values never shown); exit 1 when something would change.
    Diff {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Wait until objects meet a condition (`--for condition=Ready`) or are deleted
    /// (`--for delete`); exit non-zero naming why when one cannot, or at the timeout.
    Wait {
        kind: String,
        #[arg(required = true)]
        names: Vec<String>,
        /// `condition=TYPE` (True), `condition=TYPE=False`, or `delete`.
        #[arg(long = "for", default_value = "condition=Ready")]
        goal: String,
        /// Give up after this long (`90s`, `5m`, `1m30s`; 0 waits as long as it takes).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        conn: Conn,
    },
    /// List objects of a kind (`services`, `services,networks`), or show some (`service web api`,
    /// `service/web`).
    Get {
        /// KIND, KIND NAME..., KIND/NAME... or KIND,KIND...
        #[arg(required = true, value_name = "KIND [NAME]...")]
        args: Vec<String>,
        /// Only objects whose labels match: `app=shop`, `tier!=db`, `env in (a,b)`, `env notin
        /// (c)`, `key`, `!key`, joined by `,`.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// table, wide, name, yaml, json, or jsonpath=TEMPLATE (`{.spec.image}`; RFC 9535 paths).
        #[arg(short = 'o', long, default_value = "table", value_parser = objects_cli::parse_format)]
        output: objects_cli::Format,
        /// After the list, print a line for each change until interrupted.
        #[arg(short = 'w', long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show an object's spec, status, conditions and recent events.
    Describe {
        kind: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete objects by kind and names (`service a b`, `service/a`), by label (`service -l
    /// app=shop`), or those named in manifest files.
    Delete {
        /// KIND NAME..., KIND/NAME..., or KIND with -l
        #[arg(value_name = "KIND [NAME]...")]
        args: Vec<String>,
        /// Delete every object of KIND whose labels match (syntax as `get -l`).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Do not fail when an object does not exist.
        #[arg(long)]
        ignore_not_found: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show which berth this is: API version, installation id, default network, kinds served.
    Info {
        #[arg(short = 'o', long, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the running controller instances: kind, instance id, host, the share of the kind's
    /// objects each owns, and when it last reported.
    Controllers {
        #[arg(short = 'o', long, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        conn: Conn,
    },
    /// API tokens with roles (admin only): create, list, revoke, rotate the admin token.
    Token {
        #[command(subcommand)]
        command: token_cli::TokenCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show the token in use: its id, role and (for a deployer) Services.
    Whoami {
        #[arg(short = 'o', long, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        conn: Conn,
    },
    /// Deploy webhooks: URLs a CI system or a registry calls to deploy a new image.
    Webhook {
        #[command(subcommand)]
        command: webhook_cli::WebhookCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Snapshots of the environment: take one, list the evidence, verify, print the key.
    Backup {
        #[command(subcommand)]
        command: backup_cli::BackupCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a volume or the environment back from a snapshot.
    Restore {
        #[command(subcommand)]
        command: backup_cli::RestoreCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// The audit trail: every write, token change, secret read and refused request, oldest
    /// first (admin only). `berth audit verify` recomputes its hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        command: Option<audit_cli::AuditCommand>,
        /// Only records from this time on: RFC 3339 (2026-01-31T12:00:00Z) or a duration back
        /// from now (90m, 24h).
        #[arg(long)]
        since: Option<String>,
        /// `csv` has a header row and every field, the chain's `prev` and `hash` included.
        #[arg(short = 'o', long, default_value = "table")]
        output: backup_cli::EvidenceFormat,
        #[command(flatten)]
        conn: Conn,
    },
    /// Set a Service's replica count (written to its spec, so drift repair keeps it).
    Scale {
        /// `service`
        kind: String,
        name: String,
        #[arg(long)]
        replicas: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Set (`key=value`) or remove (`key-`) labels on an object.
    Label {
        kind: String,
        name: String,
        #[arg(required = true)]
        changes: Vec<String>,
        /// Replace a label that already has another value.
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Edit an object in $VISUAL or $EDITOR and write it back (refused if it changed meanwhile).
    Edit {
        kind: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow, list, revert, restart, pause or resume a Service's rollouts.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Swarm nodes: how to add one.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Show a Service's logs from all its tasks on every node, each line prefixed with its task
    /// and node (`web.1.abcdef012345@node1 | ...`).
    Logs(day2_cli::LogsArgs),
    /// List a Service's tasks: slot, node, desired and current state, since, digest, error.
    Ps(day2_cli::PsArgs),
    /// Run a command in a running task of a Service (`-it` for a shell); exits with its exit
    /// code. Needs the admin token or one created with `--exec`.
    Exec(day2_cli::ExecArgs),
    /// Show recent events, or follow them: all, of a kind (`events services`), or of one object
    /// (`events service web`, `events service/web`).
    Events {
        /// KIND, KIND NAME or KIND/NAME
        #[arg(value_name = "KIND [NAME]")]
        args: Vec<String>,
        #[arg(short = 'w', long)]
        watch: bool,
        /// Only events of this kind.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(short = 'o', long, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        conn: Conn,
    },
    /// Create a Secret or Config from literals and files (no YAML holding the values).
    Create {
        #[command(subcommand)]
        what: create_cli::CreateCommand,
    },
    /// The client configuration: contexts (server URL, CA, token file) to switch between.
    Config {
        #[command(subcommand)]
        command: client_config::ConfigCommand,
    },
    /// Print a shell completion script (subcommands, flags, kinds and object names). Install:
    /// bash `berth completion bash > /etc/bash_completion.d/berth`; zsh `source <(berth
    /// completion zsh)` in ~/.zshrc; fish `berth completion fish >
    /// ~/.config/fish/completions/berth.fish`.
    Completion {
        #[arg(value_enum)]
        shell: completion::Shell,
    },
    /// Print the JSON Schema of a kind's manifests (`all`: one schema for any kind), for editors
    /// and CI linters. The API serves the same at /schemas/<kind>.json.
    Schema {
        /// `service`, `secret`, ... or `all`.
        kind: String,
    },
    /// Describe a field of a kind: `berth explain service.spec.update` prints its type, what it
    /// means and the fields under it.
    Explain {
        /// `KIND[.field[.field...]]`
        path: String,
    },
    /// What the completion scripts call: candidates for the word being completed.
    #[command(name = "__complete", hide = true)]
    Complete {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Operations on the data directory, run on the API server's machine with berth stopped.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// What berth runs inside its short-lived agent tasks on other nodes (not for people).
    #[command(hide = true)]
    Agent {
        #[command(subcommand)]
        action: AgentAction,
    },
    /// Turn files of other tools into berth manifests (`import compose FILE [-o DIR]`).
    Import {
        #[command(subcommand)]
        what: compose_import::run::ImportCommand,
    },
}

/// `berth admin ...` (see admin.rs). Offline: sled's lock makes them fail while berth runs.
#[derive(Subcommand)]
// Parsed once at start; the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum AdminAction {
    /// Check the store: every object decodes, every sealed value opens, key and token files are
    /// private; list quarantined records. Exits non-zero when anything is wrong.
    Fsck {
        #[arg(long, env = "BERTH_DATA_DIR", default_value = "/var/lib/berth")]
        data_dir: PathBuf,
    },
    /// Re-seal every sealed value under a new master key, atomically. With BERTH_MASTER_KEY set,
    /// the new key is printed once: set BERTH_MASTER_KEY to it before starting berth.
    RotateMasterKey {
        #[arg(long, env = "BERTH_DATA_DIR", default_value = "/var/lib/berth")]
        data_dir: PathBuf,
    },
    /// Move the whole store from one backend to the other (sled <-> nats), with every API server
    /// stopped; services in Swarm keep running. The target must be empty. Prints each tree's
    /// record count and hash on both sides and fails if they differ.
    MigrateStore {
        #[arg(long, env = "BERTH_DATA_DIR", default_value = "/var/lib/berth")]
        data_dir: PathBuf,
        #[arg(long, value_enum)]
        from: StoreBackend,
        #[arg(long, value_enum)]
        to: StoreBackend,
        /// The NATS servers of the `nats` side.
        #[arg(long, env = "BERTH_NATS", hide_env_values = true)]
        nats: Option<String>,
        #[command(flatten)]
        nats_auth: nats_args::NatsAuthArgs,
        #[command(flatten)]
        store_log: StoreLogArgs,
    },
}

/// The agents' jobs (volume transfers: controllers/src/backup/agent.rs; exec: exec_agent.rs).
/// Everything an agent needs to reach berth is in the grant file (a Swarm secret), never on the
/// command line.
#[derive(Subcommand)]
enum AgentAction {
    /// Send the directory (a volume mounted read-only) to berth as a tar stream.
    VolumeSend {
        #[arg(long)]
        grant: PathBuf,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Replace the directory's content (a volume) with the tar stream berth sends.
    VolumeReceive {
        #[arg(long)]
        grant: PathBuf,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run the command berth sends in a container of this node, through the engine socket
    /// mounted at /var/run/docker.sock, and carry its terminal.
    Exec {
        #[arg(long)]
        grant: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeAction {
    /// Print the `docker swarm join` command that adds a machine to the swarm. It holds the
    /// swarm's join token: whoever has it can add a node, so treat it as a secret.
    JoinCommand {
        /// The role the new node joins with.
        #[arg(long, default_value = "worker", value_parser = ["worker", "manager"])]
        role: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum RolloutAction {
    /// Follow the current rollout until it completes; exit non-zero when the engine rolled it back
    /// or paused it.
    Status {
        /// `service`
        kind: String,
        name: String,
        /// Give up after this long (`90s`, `5m`); 0 waits as long as it takes.
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the last rollouts: image, digest, trigger (webhook, registry, api, rollback) and result.
    History {
        kind: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Go back to the previous revision's image (pinned to the digest it ran), or to one named.
    Undo {
        kind: String,
        name: String,
        #[arg(long)]
        to_revision: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Replace every task with a new one from the same spec (pulling the image again), under the
    /// service's update policy.
    Restart {
        kind: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop rolling out spec changes: they are stored and shown, and roll out together on resume.
    Pause {
        kind: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Roll out what the spec says now, after `rollout pause`.
    Resume {
        kind: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Every duration flag (`--timeout 1m30s`, `--since 10m`) reads the manifests' syntax, with the
/// manifests' parser, so what works in a spec works on the command line and the errors read alike.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    berth_api_types::units::Duration::parse(s)
        .map(|d| std::time::Duration::from_nanos(d.as_nanos()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // An agent is one job: no multi-threaded runtime.
    if let Command::Agent { action } = &cli.command {
        use berth_controllers::{backup::agent, swarm::channel::Op};
        let result = match action {
            AgentAction::VolumeSend { grant, dir } => agent::run(Op::Send, grant, dir),
            AgentAction::VolumeReceive { grant, dir } => agent::run(Op::Receive, grant, dir),
            // The one agent that streams both ways at once builds its own small runtime.
            AgentAction::Exec { grant } => exec_agent::run_agent(grant),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("berth agent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up {
                server,
                docker_host,
                resync,
                ingress,
                log,
            } => {
                log.init();
                daemon::up(server, docker_host, resync, ingress).await
            }
            Command::Api {
                server,
                docker_host,
                ingress_name,
                log,
            } => {
                log.init();
                daemon::api(server, docker_host, ingress_name).await
            }
            Command::Controller {
                kind,
                conn,
                nats,
                nats_auth,
                docker_host,
                state_dir,
                resync,
                ingress,
                log,
            } => {
                log.init();
                let nats = nats_auth.settings(&nats);
                daemon::controller(&kind, conn, nats, docker_host, state_dir, resync, ingress).await
            }
            Command::Apply {
                files,
                dry_run,
                wait,
                timeout,
                prune: _,
                selector,
                conn,
            } => {
                cli::apply(
                    &conn,
                    &files,
                    dry_run,
                    wait.then_some(timeout),
                    selector.as_deref(),
                )
                .await
            }
            Command::Diff { files, conn } => diff_cli::diff(&conn, &files).await,
            Command::Wait {
                kind,
                names,
                goal,
                timeout,
                conn,
            } => wait_cli::wait(&conn, &kind, &names, &goal, timeout).await,
            Command::Get {
                args,
                selector,
                output,
                watch,
                conn,
            } => objects_cli::get(&conn, &args, selector.as_deref(), output, watch).await,
            Command::Describe { kind, name, conn } => cli::describe(&conn, &kind, &name).await,
            Command::Rollout { action } => match action {
                RolloutAction::Status {
                    kind,
                    name,
                    timeout,
                    conn,
                } => rollout_cli::status(&conn, &kind, &name, timeout).await,
                RolloutAction::History { kind, name, conn } => {
                    rollout_cli::history(&conn, &kind, &name).await
                }
                RolloutAction::Undo {
                    kind,
                    name,
                    to_revision,
                    conn,
                } => rollout_cli::undo(&conn, &kind, &name, to_revision).await,
                RolloutAction::Restart { kind, name, conn } => {
                    rollout_cli::restart(&conn, &kind, &name).await
                }
                RolloutAction::Pause { kind, name, conn } => {
                    rollout_cli::set_paused(&conn, &kind, &name, true).await
                }
                RolloutAction::Resume { kind, name, conn } => {
                    rollout_cli::set_paused(&conn, &kind, &name, false).await
                }
            },
            Command::Scale {
                kind,
                name,
                replicas,
                conn,
            } => edit_cli::scale(&conn, &kind, &name, replicas).await,
            Command::Label {
                kind,
                name,
                changes,
                overwrite,
                conn,
            } => edit_cli::label(&conn, &kind, &name, &changes, overwrite).await,
            Command::Edit { kind, name, conn } => edit_cli::edit(&conn, &kind, &name).await,
            Command::Delete {
                args,
                selector,
                files,
                ignore_not_found,
                conn,
            } => {
                objects_cli::delete(&conn, &args, selector.as_deref(), &files, ignore_not_found)
                    .await
            }
            Command::Info { output, conn } => cli::info(&conn, output).await,
            Command::Controllers { output, conn } => cli::controllers(&conn, output).await,
            Command::Node {
                action: NodeAction::JoinCommand { role, conn },
            } => cli::join_command(&conn, &role).await,
            Command::Webhook { command, conn } => webhook_cli::run(&conn, command).await,
            Command::Token { command, conn } => token_cli::run(&conn, command).await,
            Command::Whoami { output, conn } => token_cli::whoami(&conn, output).await,
            Command::Backup { command, conn } => backup_cli::backup(&conn, command).await,
            Command::Restore { command, conn } => backup_cli::restore(&conn, command).await,
            Command::Audit {
                command,
                since,
                output,
                conn,
            } => match command {
                Some(audit_cli::AuditCommand::Verify { output }) => {
                    audit_cli::verify(&conn, output).await
                }
                None => audit_cli::list(&conn, since.as_deref(), output).await,
            },
            Command::Logs(args) => day2_cli::logs(args).await,
            Command::Ps(args) => day2_cli::ps(args).await,
            Command::Exec(args) => day2_cli::exec(args).await,
            Command::Events {
                args,
                watch,
                kind,
                limit,
                output,
                conn,
            } => objects_cli::events(&conn, watch, &args, kind.as_deref(), limit, output).await,
            Command::Create { what } => create_cli::run(what).await,
            Command::Config { command } => client_config::run(command),
            Command::Schema { kind } => schema_cli::print_schema(&kind),
            Command::Explain { path } => schema_cli::explain(&path),
            Command::Completion { shell } => {
                print!("{}", completion::script(shell, &mut Cli::command()));
                Ok(())
            }
            Command::Complete { words, conn } => completion::complete(&conn, &words).await,
            Command::Admin { action } => match action {
                AdminAction::Fsck { data_dir } => admin::fsck(&data_dir).await,
                AdminAction::RotateMasterKey { data_dir } => {
                    admin::rotate_master_key(&data_dir).await
                }
                AdminAction::MigrateStore {
                    data_dir,
                    from,
                    to,
                    nats,
                    nats_auth,
                    store_log,
                } => {
                    let nats = nats.as_deref().map(|url| nats_auth.settings(url));
                    admin::migrate_store(&data_dir, from, to, nats.as_ref(), &store_log).await
                }
            },
            Command::Agent { .. } => unreachable!("handled before the runtime starts"),
            Command::Import { what } => compose_import::run::run(what),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Empty: the command said everything already and only the exit code is left (`diff`).
            if !message.trim().is_empty() {
                eprintln!("{}", message.trim_end());
            }
            ExitCode::FAILURE
        }
    }
}
