//! Registry, step 3: ask the registry whether it takes the credentials (`login.rs` speaks its v2
//! API). Nothing is created in Swarm for a Registry.

use super::build::Check;
use super::login::{self, LoginOutcome};
use tracing::{info, warn};

pub async fn apply(http: &reqwest::Client, check: &Check) -> LoginOutcome {
    let outcome = login::login(http, &check.host, &check.username, &check.password).await;
    match &outcome {
        LoginOutcome::Accepted => info!(host = %check.host, "registry accepted the credentials"),
        LoginOutcome::Rejected(why) => {
            warn!(host = %check.host, %why, "registry rejected the credentials")
        }
        LoginOutcome::Unreachable(_) => {}
    }
    outcome
}
