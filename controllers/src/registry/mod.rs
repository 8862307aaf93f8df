//! The Registry controller: checks each Registry's credentials against the registry and reports the
//! answer as the `Authenticated` condition, with the registry's own words when it says no. It creates
//! nothing in Swarm: the Service controller sends the credentials with each service it writes
//! (`swarm::pull` is how both find a server's Registry and its password).
//!
//! Steps: `dereference.rs` (the one Registry for its server, its password) -> `build.rs` (pure: is a
//! check due) -> `apply.rs` (the login, `login.rs`) -> `status.rs` (pure). A refusal waits for a
//! change; an unreachable registry is retried with backoff.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod login;
pub mod status;

use crate::api::SecretReader;
use crate::runtime::{Action, Cached, Context, Error, Hooks, Reconciled, Reconciler, Resource};
use async_trait::async_trait;
use berth_api_types::registry::{validate_registry, RegistrySpec, RegistryStatus};
use berth_api_types::validate::FieldError;
use berth_api_types::{Event, Kind, Object};
use dereference::Found;
use login::LoginOutcome;
use status::reasons;
use std::sync::Arc;

pub struct RegistryController {
    secrets: Arc<dyn SecretReader>,
    http: reqwest::Client,
}

impl RegistryController {
    /// `secrets`: where the Registries' passwords are read.
    pub fn new(secrets: Arc<dyn SecretReader>) -> Self {
        RegistryController {
            secrets,
            http: login::client(),
        }
    }
}

impl Resource for RegistryController {
    type Object = Object<RegistrySpec, serde_json::Value>;
    type Status = RegistryStatus;
    const KIND: Kind = Kind::Registry;

    fn validate(object: &Self::Object) -> Result<(), Vec<FieldError>> {
        validate_registry(object)
    }
}

#[async_trait]
impl Reconciler for RegistryController {
    async fn reconcile(
        &self,
        obj: Arc<Cached<Self>>,
        ctx: &Context<Self>,
    ) -> Result<Reconciled<RegistryStatus>, Error> {
        let spec = &obj.object.spec;
        let name = obj.name();
        let (password, secret_version) =
            match dereference::dereference(&*ctx.store, &*self.secrets, name, spec).await? {
                Found::Password {
                    password,
                    secret_version,
                } => (password, secret_version),
                Found::Duplicate(why) => return Err(Error::refused(reasons::DUPLICATE, why)),
                // The Secret's events bring us back (see `map_related`).
                Found::SecretMissing(why) => {
                    return Err(Error::refused(reasons::SECRET_MISSING, why))
                }
            };
        let now = chrono::Utc::now();
        let check = match build::build(
            spec,
            &password,
            &obj.status,
            obj.generation(),
            &secret_version,
            now,
        ) {
            Ok(check) => check,
            Err(wait) => {
                return Ok(Reconciled {
                    status: obj.status.clone(),
                    action: Action::requeue(wait),
                })
            }
        };
        let outcome = apply::apply(&self.http, &check).await;
        let status = status::checked(
            &obj.status,
            obj.generation(),
            &secret_version,
            &outcome,
            &check.username,
            &check.host,
            now,
        );
        let action = match outcome {
            LoginOutcome::Unreachable(_) => Action::Backoff,
            _ => Action::requeue(status::RECHECK),
        };
        Ok(Reconciled { status, action })
    }

    /// Nothing exists in the engine for a Registry, so a deleted one needs no cleanup.
    async fn cleanup(&self, _name: &str, _ctx: &Context<Self>) -> Result<Action, Error> {
        Ok(Action::await_change())
    }
}

#[async_trait]
impl Hooks for RegistryController {
    fn watches(&self) -> Vec<Kind> {
        vec![Kind::Secret]
    }

    /// The Registries whose password is in the Secret an event is about.
    async fn map_related(&self, event: &Event, ctx: &Context<Self>) -> Vec<String> {
        if event.kind != Kind::Secret {
            return Vec::new();
        }
        ctx.cache
            .objects()
            .iter()
            .filter(|o| o.object.spec.password_secret_ref.name == event.name)
            .map(|o| o.name().to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ResourceStore;
    use crate::runtime::reconcile_once;
    use crate::runtime::testing::FakeStore;
    use berth_api_types::meta::condition;
    use berth_api_types::registry::conditions::AUTHENTICATED;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A registry on loopback that takes `alice:right` (Basic auth) and nothing else.
    async fn registry() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                    if !request.starts_with("get ") {
                        return; // a TLS handshake: berth tries HTTPS first
                    }
                    // base64("alice:right")
                    let response = if request.contains("authorization: basic ywxpy2u6cmlnahq=") {
                        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_string()
                    } else {
                        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                        format!(
                            "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"test\"\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let _ = conn.write_all(response.as_bytes()).await;
                });
            }
        });
        addr.to_string()
    }

    fn put_registry(store: &FakeStore, name: &str, server: &str, secret: &str) {
        store.put(json!({
            "apiVersion": "berth/v1", "kind": "Registry",
            "metadata": {"name": name},
            "spec": {"server": server, "username": "alice",
                     "passwordSecretRef": {"name": secret, "key": "password"}}
        }));
    }

    fn put_secret(store: &FakeStore, name: &str, password: &[u8]) {
        store.put(json!({
            "apiVersion": "berth/v1", "kind": "Secret",
            "metadata": {"name": name}, "spec": {}
        }));
        store.put_data(Kind::Secret, name, &[("password", password)]);
    }

    fn authenticated(store: &FakeStore, name: &str) -> (String, String, String) {
        let s: RegistryStatus = serde_json::from_value(store.status(Kind::Registry, name)).unwrap();
        let c = condition(&s.conditions, AUTHENTICATED).expect("an Authenticated condition");
        (
            format!("{:?}", c.status),
            c.reason.clone(),
            c.message.clone(),
        )
    }

    async fn reconcile(store: &Arc<FakeStore>, name: &str) -> Result<Action, Error> {
        let ctl = Arc::new(RegistryController::new(store.clone()));
        let api: Arc<dyn ResourceStore> = store.clone();
        reconcile_once(&ctl, api, name).await
    }

    #[tokio::test]
    async fn login_outcomes_become_conditions_without_the_password() {
        let server = registry().await;
        let store = Arc::new(FakeStore::default());
        put_secret(&store, "pw", b"wrong\n");
        put_registry(&store, "team", &server, "pw");

        // Rejected: the registry's own words, checked again only after a change or RECHECK.
        let action = reconcile(&store, "team").await.unwrap();
        assert_eq!(action, Action::requeue(status::RECHECK));
        let (st, reason, message) = authenticated(&store, "team");
        assert_eq!((st.as_str(), reason.as_str()), ("False", reasons::REJECTED));
        assert!(message.contains("authentication required"), "{message}");
        assert!(!message.contains("wrong"));

        // Fixed password: accepted.
        put_secret(&store, "pw", b"right\n");
        reconcile(&store, "team").await.unwrap();
        assert_eq!(
            authenticated(&store, "team").1,
            reasons::LOGIN_SUCCEEDED,
            "a new Secret version is checked at once"
        );
        // Nothing changed: no second login, no status write.
        let writes = store.status_writes().len();
        reconcile(&store, "team").await.unwrap();
        assert_eq!(store.status_writes().len(), writes);
    }

    #[tokio::test]
    async fn duplicate_missing_secret_and_unreachable() {
        let server = registry().await;
        let store = Arc::new(FakeStore::default());
        put_secret(&store, "pw", b"right");
        put_registry(&store, "first", &server, "pw");
        put_registry(&store, "second", &server, "pw");
        put_registry(&store, "nosecret", "127.0.0.1:9", "absent");
        put_secret(&store, "pw2", b"right");
        // Port 9 (discard) is closed on loopback: nothing answers.
        put_registry(&store, "gone", "127.0.0.2:9", "pw2");

        assert_eq!(
            reconcile(&store, "second").await.unwrap(),
            Action::await_change()
        );
        let (_, reason, message) = authenticated(&store, "second");
        assert_eq!(reason, reasons::DUPLICATE);
        assert!(
            message.contains("Registry `first` already provides"),
            "{message}"
        );

        assert_eq!(
            reconcile(&store, "nosecret").await.unwrap(),
            Action::await_change()
        );
        let (_, reason, message) = authenticated(&store, "nosecret");
        assert_eq!(reason, reasons::SECRET_MISSING);
        assert_eq!(message, "Secret `absent` does not exist");

        // Unreachable: reported, and retried with backoff rather than waiting for a change.
        assert_eq!(reconcile(&store, "gone").await.unwrap(), Action::Backoff);
        let (st, reason, _) = authenticated(&store, "gone");
        assert_eq!(
            (st.as_str(), reason.as_str()),
            ("False", reasons::UNREACHABLE)
        );
    }
}
