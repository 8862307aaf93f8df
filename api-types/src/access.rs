//! Who may do what: the roles an API token carries, the token documents of `berth token`, and the
//! audit record every write, token change, secret read and refusal leaves behind. The rules that
//! map each route to the role it needs live with the API server (`operator/src/access.rs`); the
//! vocabulary they speak lives here, once, because the CLI, the controllers and outside tools
//! (an auditor's scripts reading `berth audit -o json`) share it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The role of a token. Ordered by nothing: each role is a set of permissions, and `admin` is the
/// only one that holds them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including secret values, tokens, backups' key, restores and the join token.
    Admin,
    /// Writes every kind; never reads a secret value.
    Operator,
    /// Changes the image of the Services named on its token (CI); reads those Services.
    Deployer,
    /// Reads every object (Secrets redacted), events and backup evidence.
    Viewer,
    /// A controller process: reads objects, writes status, reads the secret and config values
    /// the engine needs.
    Controller,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Operator,
        Role::Deployer,
        Role::Viewer,
        Role::Controller,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Deployer => "deployer",
            Role::Viewer => "viewer",
            Role::Controller => "controller",
        }
    }

    pub fn parse(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "`{s}` is not a role; use one of: {}",
                    Role::ALL.map(Role::as_str).join(", ")
                )
            })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The id of the token that `berth up` writes to `<data-dir>/admin.token` at first start.
pub const ADMIN_TOKEN_ID: &str = "admin";

/// A token as `berth token list` shows it: never the secret, never its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub id: String,
    pub role: Role,
    /// For `deployer`: the Services it may deploy. Empty for other roles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// May run commands in running containers (`berth exec`): a grant of its own, given
    /// explicitly at creation (`--exec`), never implied by the role. The admin always may.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exec: bool,
    /// RFC 3339.
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

/// `POST /tokens`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    pub role: String,
    #[serde(default)]
    pub services: Vec<String>,
    /// A duration (`90d`, `12h`); none: the token does not expire.
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Grant `berth exec` (operator and deployer tokens only).
    #[serde(default)]
    pub exec: bool,
}

/// The answer to a token creation or rotation: the only time the secret is shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

/// `GET /whoami`: the caller's own token, as the server sees it.
pub type WhoAmI = TokenInfo;

/// What an audit record says happened, before the log numbers and chains it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// The token's id (`admin`, a token ULID), or `anonymous` for a request without a valid one.
    pub token_id: String,
    /// The token's role; none for an unauthenticated request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The peer address (`ip:port`), when the transport gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What was asked, e.g. `apply`, `create`, `replace`, `patch`, `delete`, `read-secret-data`,
    /// `token-create`, `token-revoke`, `admin-rotate`, `deploy`, or `METHOD /path` for others.
    pub action: String,
    /// The object's kind as the API spells it (`Service`), when the action is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_after: Option<u64>,
    /// For an exec: the task the command ran in (`web.1.abcdef012345@node1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// For an exec: the program's name only, never its arguments (they may carry secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// The HTTP status answered.
    pub code: u16,
    /// `ok`, or the refusal's reason (`Forbidden`, `Unauthorized`, `Invalid`, `Conflict`, ...).
    pub outcome: String,
}

/// An audit record as stored, exported and published: the entry, its place in the chain and the
/// chain's hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// 1, 2, 3, ... with no gaps: a deleted record shows as a gap.
    pub seq: u64,
    /// RFC 3339 with milliseconds, UTC.
    pub time: String,
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// `hash` of the record before (64 zeros for the first).
    pub prev: String,
    /// Keyed hash (hex) over this record's canonical form with `hash` left out.
    pub hash: String,
}

/// `berth audit verify`: the whole chain recomputed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditVerification {
    pub records: u64,
    pub ok: bool,
    /// The first record that does not verify (or the first missing sequence number), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_broken: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The last record's hash: write it down (or let the NATS copy carry it) to anchor the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_their_own_names_and_reject_others() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        let e = Role::parse("root").unwrap_err();
        assert!(
            e.contains("`root` is not a role") && e.contains("deployer"),
            "{e}"
        );
    }
}
