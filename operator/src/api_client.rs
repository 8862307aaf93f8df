//! The HTTP client of the berth API: what the CLI uses, and what a controller running as its own
//! process (`berth controller KIND`) uses as its `ResourceStore` and `SecretReader`.

use async_trait::async_trait;
use berth_api_types::access::{AuditRecord, AuditVerification};
use berth_api_types::names::paths;
use berth_api_types::wire::{ApplyResult, DataBody, Discovery, ErrorBody, Installation, List};
use berth_api_types::{DynObject, Event, Kind};
use berth_controllers::api::{ClientError, DataFiles, ResourceStore, SecretReader};
use serde_json::Value;
use std::time::Duration;

/// HTTP client of the berth API, used by the CLI and by controllers running as their own process.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// `ca`: the only CA trusted for an https URL (berth's internal CA, or the one that signed the
    /// operator's certificate); `None` trusts the system's roots.
    pub fn new(base: &str, token: &str, ca: Option<&std::path::Path>) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(path) = ca {
            let pem =
                std::fs::read(path).map_err(|e| format!("error: --ca {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    format!(
                        "error: --ca {}: no PEM certificate in the file",
                        path.display()
                    )
                })?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| format!("error: cannot set up the HTTP client: {e}"))?;
        Ok(ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn unreachable(&self, source: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            url: self.base.clone(),
            source,
        }
    }

    /// Sends a request and decodes a JSON answer, turning error bodies into `ClientError::Api`.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            return Err(refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Any request on an API path with an optional JSON body (for endpoints without a typed
    /// method, such as webhook administration).
    pub async fn request_json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await
    }

    pub async fn discovery(&self) -> Result<Discovery, ClientError> {
        self.send(self.http.get(self.url(paths::API_ROOT))).await
    }

    pub async fn get_object(&self, kind: Kind, name: &str) -> Result<DynObject, ClientError> {
        self.send(self.http.get(self.url(&paths::object(kind, name))))
            .await
    }

    pub async fn list_objects(&self, kind: Kind) -> Result<Vec<DynObject>, ClientError> {
        let list: List<DynObject> = self
            .send(self.http.get(self.url(&paths::collection(kind))))
            .await?;
        Ok(list.items)
    }

    /// Atomically applies a set of objects (all or nothing).
    pub async fn apply(
        &self,
        objects: &[DynObject],
        dry_run: bool,
    ) -> Result<Vec<ApplyResult>, ClientError> {
        let list: List<ApplyResult> = self
            .send(
                self.http
                    .post(self.url(paths::APPLY))
                    .query(&[("dryRun", dry_run)])
                    .json(&List {
                        items: objects.to_vec(),
                    }),
            )
            .await?;
        Ok(list.items)
    }

    /// JSON merge patch of an object's spec and metadata; a `metadata.resourceVersion` in the patch
    /// makes it conditional.
    pub async fn patch_object(
        &self,
        kind: Kind,
        name: &str,
        patch: &Value,
    ) -> Result<DynObject, ClientError> {
        self.send(
            self.http
                .patch(self.url(&paths::object(kind, name)))
                .header("content-type", "application/merge-patch+json")
                .body(patch.to_string()),
        )
        .await
    }

    pub async fn delete(&self, kind: Kind, name: &str) -> Result<DynObject, ClientError> {
        self.send(self.http.delete(self.url(&paths::object(kind, name))))
            .await
    }

    /// Replaces an object's status; with `resource_version`, only if the object is still at it
    /// (409 Conflict otherwise).
    pub async fn put_status(
        &self,
        kind: Kind,
        name: &str,
        status: &Value,
        resource_version: Option<&str>,
    ) -> Result<DynObject, ClientError> {
        let mut body = serde_json::json!({ "status": status });
        if let Some(rv) = resource_version {
            body["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        self.send(
            self.http
                .put(self.url(&paths::status(kind, name)))
                .json(&body),
        )
        .await
    }

    /// Recent events, oldest first, optionally only those of one object.
    pub async fn events(
        &self,
        kind: Option<Kind>,
        name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, ClientError> {
        let mut q: Vec<(&str, String)> = vec![("limit", limit.to_string())];
        if let Some(k) = kind {
            q.push(("kind", k.lower().to_string()));
        }
        if let Some(n) = name {
            q.push(("name", n.to_string()));
        }
        let list: List<Event> = self
            .send(self.http.get(self.url(paths::EVENTS)).query(&q))
            .await?;
        Ok(list.items)
    }

    /// Streams events as they happen (newline-delimited JSON from `?watch=true`).
    pub async fn watch_events(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Event, ClientError>>, ClientError> {
        let req = self
            .http
            .get(self.url(paths::EVENTS))
            .query(&[("watch", "true")]);
        self.json_lines::<Event>(req).await
    }

    /// A request whose answer is newline-delimited JSON (watches, long operations that report
    /// progress), as a stream of decoded lines. An error answer is decoded as usual.
    pub async fn json_lines<T: serde::de::DeserializeOwned + 'static>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<impl futures::Stream<Item = Result<T, ClientError>>, ClientError> {
        use futures::StreamExt;
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
            return Err(refusal(status, &bytes));
        }
        let base = self.base.clone();
        let lines = futures::stream::unfold(
            (resp.bytes_stream(), Vec::<u8>::new()),
            move |(mut body, mut buf)| {
                let base = base.clone();
                async move {
                    loop {
                        if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=pos).collect();
                            if line.iter().all(u8::is_ascii_whitespace) {
                                continue;
                            }
                            let item = serde_json::from_slice::<T>(&line)
                                .map_err(|e| ClientError::Protocol(e.to_string()));
                            return Some((item, (body, buf)));
                        }
                        match body.next().await {
                            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                            Some(Err(e)) => {
                                return Some((
                                    Err(ClientError::Unreachable {
                                        url: base,
                                        source: e,
                                    }),
                                    (body, buf),
                                ))
                            }
                            None => return None,
                        }
                    }
                }
            },
        );
        Ok(lines)
    }

    /// The audit trail, oldest first; `since` as the API takes it (RFC 3339 or a duration).
    pub async fn audit(&self, since: Option<&str>) -> Result<Vec<AuditRecord>, ClientError> {
        let mut req = self.http.get(self.url(paths::AUDIT));
        if let Some(since) = since {
            // As a query pair, so that the `+` of an offset arrives as a `+`.
            req = req.query(&[("since", since)]);
        }
        let list: List<AuditRecord> = self.send(req).await?;
        Ok(list.items)
    }

    /// The audit chain recomputed by the server.
    pub async fn audit_verify(&self) -> Result<AuditVerification, ClientError> {
        self.send(self.http.get(self.url(paths::AUDIT_VERIFY)))
            .await
    }

    /// A request builder for `path` (for [`ApiClient::json_lines`]).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }
}

/// An error answer as a `ClientError::Api`: the API's JSON error body, or (from something else on
/// the way, a proxy) the status and the start of the body.
fn refusal(status: reqwest::StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(b) => ClientError::Api {
            status: status.as_u16(),
            reason: b.reason,
            message: b.message,
            details: b.details,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("Error").to_string(),
            message: format!(
                "{status}: {}",
                String::from_utf8_lossy(bytes)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
            details: vec![],
        },
    }
}

#[async_trait]
impl ResourceStore for ApiClient {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<DynObject>, ClientError> {
        match self.get_object(kind, name).await {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, kind: Kind) -> Result<Vec<DynObject>, ClientError> {
        self.list_objects(kind).await
    }

    async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        status: Value,
        resource_version: Option<&str>,
    ) -> Result<DynObject, ClientError> {
        self.put_status(kind, name, &status, resource_version).await
    }

    async fn installation(&self) -> Result<Installation, ClientError> {
        let d = self.discovery().await?;
        Ok(Installation {
            instance: d.instance,
            default_network: d.default_network,
        })
    }

    async fn register(&self, kind: Kind, name: &str) -> Result<(), ClientError> {
        let body = registration(kind, name);
        match self
            .send::<DynObject>(
                self.http
                    .post(self.url(&paths::collection(kind)))
                    .json(&body),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Registered meanwhile (by a user's apply, or another controller instance).
            Err(e) if e.status() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn deregister(&self, kind: Kind, name: &str) -> Result<(), ClientError> {
        match self.delete(kind, name).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The object a controller registers: the name, an empty spec.
pub fn registration(kind: Kind, name: &str) -> Value {
    serde_json::json!({
        "apiVersion": berth_api_types::API_VERSION,
        "kind": kind.as_str(),
        "metadata": {"name": name},
        "spec": {}
    })
}

#[async_trait]
impl SecretReader for ApiClient {
    async fn data(&self, kind: Kind, name: &str) -> Result<Option<DataFiles>, ClientError> {
        use base64::Engine;
        let body: DataBody = match self
            .send(self.http.get(self.url(&paths::data(kind, name))))
            .await
        {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let files = body
            .data
            .into_iter()
            .map(|(k, v)| {
                base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .map(|b| (k, b))
                    .map_err(|_| ClientError::Protocol("data is not base64".into()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(DataFiles {
            files,
            digests: body.digests,
        }))
    }
}
