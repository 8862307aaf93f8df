//! `berth token create|list|revoke|rotate-admin` and `berth whoami`: API tokens administered through
//! the API. A token's secret is printed once, by create and rotate-admin; the server keeps only its
//! hash, so nothing can show it again.

use crate::api_client::ApiClient;
use crate::cli::Output;
use crate::output;
use crate::Conn;
use berth_api_types::access::{IssuedToken, TokenInfo, TokenRequest, WhoAmI};
use berth_api_types::names::paths;
use berth_api_types::wire::List;
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Issue a token with a role: operator (write every kind, no secret values), deployer (change
    /// the image of the named Services, for CI), viewer (read, no secret values), controller (a
    /// controller process: read, write status, read the values the engine needs).
    Create {
        #[arg(long)]
        role: String,
        /// For a deployer: the Services it may deploy (comma-separated).
        #[arg(long, value_delimiter = ',')]
        services: Vec<String>,
        /// Lifetime: `90d`, `2w`, `12h`. Without it the token lasts until revoked.
        #[arg(long)]
        expires: Option<String>,
        /// What the token is for (shown by `token list`).
        #[arg(long, default_value = "")]
        description: String,
        /// Also let it run commands in running containers (`berth exec`): a separate grant, for
        /// operator and deployer tokens (a deployer's only in its own Services). Every exec is
        /// an audit record.
        #[arg(long)]
        exec: bool,
        /// `table` prints the token alone on stdout (for `$(berth token create ...)`).
        #[arg(short = 'o', long, default_value = "table")]
        output: Output,
    },
    /// List tokens: id, role, services, expiry, whether revoked. Never the secrets.
    List {
        #[arg(short = 'o', long, default_value = "table")]
        output: Output,
    },
    /// Revoke a token; it stops working at once (its record stays for the audit trail).
    Revoke { id: String },
    /// Replace the admin token; the old one stops working at once. The server rewrites
    /// <data-dir>/admin.token when that file is still there.
    RotateAdmin {
        #[arg(short = 'o', long, default_value = "table")]
        output: Output,
    },
}

type CliResult = Result<(), String>;

fn client(conn: &Conn) -> Result<ApiClient, String> {
    crate::cli::client(conn)
}

fn print_value(v: &serde_json::Value, out: Output) -> CliResult {
    match out {
        Output::Yaml => print!("{}", output::to_yaml(v)),
        _ => println!(
            "{}",
            serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
        ),
    }
    Ok(())
}

fn issued(t: &IssuedToken, out: Output, verb: &str) -> CliResult {
    match out {
        Output::Table => {
            // The token alone on stdout, so that scripts can capture it; the rest on stderr.
            println!("{}", t.token);
            eprintln!(
                "token {} ({}) {verb}; it is shown only now: store it as a secret",
                t.info.id, t.info.role
            );
            Ok(())
        }
        _ => print_value(&serde_json::to_value(t).map_err(|e| e.to_string())?, out),
    }
}

pub fn tokens_table(items: &[TokenInfo]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.role.to_string(),
                if t.exec || t.role == berth_api_types::access::Role::Admin {
                    "yes".into()
                } else {
                    "-".into()
                },
                if t.services.is_empty() {
                    "-".into()
                } else {
                    t.services.join(",")
                },
                t.created.clone(),
                t.expires.clone().unwrap_or_else(|| "never".into()),
                match &t.revoked {
                    Some(at) => format!("revoked {at}"),
                    None => "active".into(),
                },
                t.description.clone(),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "ROLE",
            "EXEC",
            "SERVICES",
            "CREATED",
            "EXPIRES",
            "STATE",
            "DESCRIPTION",
        ],
        &rows,
    )
}

pub async fn run(conn: &Conn, command: TokenCommand) -> CliResult {
    let client = client(conn)?;
    let fail = |e: berth_controllers::api::ClientError| format!("error: {e}");
    match command {
        TokenCommand::Create {
            role,
            services,
            expires,
            description,
            exec,
            output,
        } => {
            let body = serde_json::to_value(TokenRequest {
                role,
                services,
                expires,
                description,
                exec,
            })
            .map_err(|e| e.to_string())?;
            let t: IssuedToken = client
                .request_json(Method::POST, paths::TOKENS, Some(&body))
                .await
                .map_err(fail)?;
            issued(&t, output, "created")
        }
        TokenCommand::List { output } => {
            let list: List<TokenInfo> = client
                .request_json(Method::GET, paths::TOKENS, None)
                .await
                .map_err(fail)?;
            match output {
                Output::Table => println!("{}", tokens_table(&list.items)),
                _ => print_value(&json!({ "items": list.items }), output)?,
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let t: TokenInfo = client
                .request_json(Method::DELETE, &paths::token(&id), None)
                .await
                .map_err(fail)?;
            println!("token {} ({}) revoked", t.id, t.role);
            Ok(())
        }
        TokenCommand::RotateAdmin { output } => {
            let t: IssuedToken = client
                .request_json(Method::POST, paths::ADMIN_TOKEN_ROTATE, None)
                .await
                .map_err(fail)?;
            issued(&t, output, "rotated (the old admin token no longer works)")
        }
    }
}

/// `berth whoami`: the caller's token id, role and services.
pub async fn whoami(conn: &Conn, out: Output) -> CliResult {
    let client = client(conn)?;
    let me: WhoAmI = client
        .request_json(Method::GET, paths::WHOAMI, None)
        .await
        .map_err(|e| format!("error: {e}"))?;
    match out {
        Output::Table => println!("{}", tokens_table(std::slice::from_ref(&me))),
        _ => print_value(&serde_json::to_value(&me).map_err(|e| e.to_string())?, out)?,
    }
    Ok(())
}
