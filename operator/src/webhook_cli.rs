//! `berth webhook create|list|rotate|delete`: deploy webhooks administered through the API. The
//! URL (and a signed webhook's signing secret) is printed once, by create and rotate; nothing
//! else ever shows it again.

use crate::api_client::ApiClient;
use crate::cli::Output;
use crate::output;
use crate::webhook::{HookKind, WebhookSecrets, WebhookView};
use crate::Conn;
use berth_api_types::meta::format_time;
use berth_api_types::names::paths;
use berth_api_types::wire::List;
use berth_controllers::api::ClientError;
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// Create a webhook that deploys SERVICE, or with --registry one for a registry's push
    /// notifications (deploys every service running the pushed repository:tag).
    Create {
        service: Option<String>,
        /// Also require an HMAC-SHA256 signature on every call (prints a signing secret).
        #[arg(long)]
        signed: bool,
        /// A registry notification webhook (no SERVICE).
        #[arg(long)]
        registry: bool,
        /// Required with --registry: the registry's host as services name it in their images
        /// (e.g. `registry.internal:5000`). Only services pulling from it are deployed; the host
        /// a notification reports is not trusted to say which registry it comes from.
        #[arg(long, requires = "registry")]
        registry_host: Option<String>,
        /// Base URL callers reach the API server at (default: --url).
        #[arg(long, env = "BERTH_PUBLIC_URL")]
        public_url: Option<String>,
        #[arg(short = 'o', long, default_value = "table")]
        output: Output,
    },
    /// List webhooks (never their URLs).
    List {
        /// Only the webhooks of this service.
        service: Option<String>,
        #[arg(short = 'o', long, default_value = "table")]
        output: Output,
    },
    /// Give a webhook a new URL (and signing secret); the old ones stop working at once.
    Rotate {
        /// Webhook id, or the service when it has exactly one webhook.
        webhook: String,
        #[arg(long, env = "BERTH_PUBLIC_URL")]
        public_url: Option<String>,
        #[arg(short = 'o', long, default_value = "table")]
        output: Output,
    },
    /// Delete a webhook; its URL stops working at once.
    Delete {
        /// Webhook id, or the service when it has exactly one webhook.
        webhook: String,
    },
}

type CliResult = Result<(), String>;

fn client(conn: &Conn) -> Result<ApiClient, String> {
    crate::cli::client(conn)
}

fn api_error(e: ClientError) -> String {
    format!("error: {e}")
}

pub async fn run(conn: &Conn, command: WebhookCommand) -> CliResult {
    let client = client(conn)?;
    match command {
        WebhookCommand::Create {
            service,
            signed,
            registry,
            registry_host,
            public_url,
            output,
        } => {
            if registry == service.is_some() {
                return Err(if registry {
                    "error: a registry webhook names no service (it deploys every service running the pushed image)".into()
                } else {
                    "error: name the SERVICE the webhook deploys, or pass --registry".into()
                });
            }
            if registry && registry_host.is_none() {
                return Err("error: --registry needs --registry-host HOST, the registry's host as services name it in their images".into());
            }
            let body = json!({"service": service, "signed": signed, "registry": registry,
                              "registryHost": registry_host});
            let created: WebhookSecrets = client
                .request_json(Method::POST, paths::WEBHOOKS, Some(&body))
                .await
                .map_err(api_error)?;
            show_secrets(
                &created,
                public_url.as_deref().unwrap_or(client.base_url()),
                output,
                "created",
            )
        }
        WebhookCommand::List { service, output } => {
            let hooks = list(&client).await?;
            let hooks: Vec<WebhookView> = hooks
                .into_iter()
                .filter(|h| service.is_none() || h.service == service)
                .collect();
            match output {
                Output::Table if hooks.is_empty() => eprintln!("No webhooks found."),
                Output::Table => println!("{}", table(&hooks)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "items": hooks }))
                        .map_err(|e| e.to_string())?
                ),
                Output::Yaml => print!("{}", output::to_yaml(&json!({ "items": hooks }))),
            }
            Ok(())
        }
        WebhookCommand::Rotate {
            webhook,
            public_url,
            output,
        } => {
            let id = resolve(&client, &webhook).await?;
            let rotated: WebhookSecrets = client
                .request_json(Method::POST, &paths::webhook_rotate(&id), None)
                .await
                .map_err(api_error)?;
            show_secrets(
                &rotated,
                public_url.as_deref().unwrap_or(client.base_url()),
                output,
                "rotated",
            )
        }
        WebhookCommand::Delete { webhook } => {
            let id = resolve(&client, &webhook).await?;
            let _: WebhookView = client
                .request_json(Method::DELETE, &paths::webhook(&id), None)
                .await
                .map_err(api_error)?;
            println!("webhook {id} deleted");
            Ok(())
        }
    }
}

async fn list(client: &ApiClient) -> Result<Vec<WebhookView>, String> {
    let list: List<WebhookView> = client
        .request_json(Method::GET, paths::WEBHOOKS, None)
        .await
        .map_err(api_error)?;
    Ok(list.items)
}

/// A webhook id as given, or the one webhook of the service so named.
async fn resolve(client: &ApiClient, arg: &str) -> Result<String, String> {
    let hooks = list(client).await?;
    if hooks.iter().any(|h| h.id == arg) {
        return Ok(arg.to_string());
    }
    let of_service: Vec<&WebhookView> = hooks
        .iter()
        .filter(|h| h.service.as_deref() == Some(arg))
        .collect();
    match of_service.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => Err(format!(
            "error: no webhook `{arg}`: it is neither a webhook id nor a service with a webhook \
             (see `berth webhook list`)"
        )),
        many => Err(format!(
            "error: service `{arg}` has {} webhooks ({}); name one by id",
            many.len(),
            many.iter()
                .map(|h| h.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn what(h: &WebhookView) -> String {
    match (&h.kind, &h.service) {
        (HookKind::Service, Some(s)) => format!("service/{s}"),
        (HookKind::Registry, _) => "registry push notifications".to_string(),
        (HookKind::Service, None) => "?".to_string(),
    }
}

fn show_secrets(s: &WebhookSecrets, base: &str, out: Output, verb: &str) -> CliResult {
    let url = format!("{}{}", base.trim_end_matches('/'), s.path);
    match out {
        Output::Json | Output::Yaml => {
            let mut v = serde_json::to_value(s).map_err(|e| e.to_string())?;
            v["url"] = url.into();
            if matches!(out, Output::Json) {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", output::to_yaml(&v));
            }
        }
        Output::Table => {
            let h = &s.webhook;
            let signed = if h.signed { " (signed)" } else { "" };
            println!("webhook {} {verb} for {}{signed}", h.id, what(h));
            println!("URL (shown only now; anyone who has it can deploy):\n  {url}");
            if let Some(secret) = &s.signing_secret {
                println!("Signing secret (shown only now):\n  {secret}");
            }
        }
    }
    Ok(())
}

fn table(hooks: &[WebhookView]) -> String {
    let rows: Vec<Vec<String>> = hooks
        .iter()
        .map(|h| {
            vec![
                h.id.clone(),
                match h.kind {
                    HookKind::Service => "service".into(),
                    HookKind::Registry => "registry".into(),
                },
                h.service
                    .clone()
                    .or_else(|| h.registry_host.clone())
                    .unwrap_or_else(|| "-".into()),
                if h.signed { "yes" } else { "no" }.into(),
                format_time(&h.created),
                h.last_used
                    .as_ref()
                    .map(format_time)
                    .unwrap_or_else(|| "never".into()),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "KIND",
            "SERVICE/REGISTRY",
            "SIGNED",
            "CREATED",
            "LAST USED",
        ],
        &rows,
    )
}
