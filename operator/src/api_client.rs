//! The HTTP client of the berth API: what the CLI uses, and what a controller running as its own
//! process (`berth controller KIND`) uses as its `ResourceStore` and `SecretReader`.
//!
//! It may know several API servers (`--url https://m1:7474,https://m2:7474,...`, all sharing one
//! store): a request that gets no answer from one (connection refused or reset, timeout, a 503 from
//! a server shutting down) goes to the next, round-robin, and the one that answered is used first
//! from then on. Only requests that are safe to send twice are resent after they may have reached
//! a server; a create is resent only when it provably never left (the connection was refused).

use async_trait::async_trait;
use berth_api_types::access::{AuditRecord, AuditVerification};
use berth_api_types::names::paths;
use berth_api_types::wire::{ApplyResult, DataBody, Discovery, ErrorBody, Installation, List};
use berth_api_types::{DynObject, Event, Kind};
use berth_controllers::api::{ClientError, DataFiles, ResourceStore, SecretReader};
use berth_controllers::runtime::backoff::BackoffPolicy;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a request keeps going round the servers before its last error is returned: long enough
/// to ride out a server killed mid-request (the others answer at once) or a store re-electing its
/// leader (every server answers 503 for a few seconds).
const RETRY_BUDGET: Duration = Duration::from_secs(15);

/// One attempt's time limit; a server that accepted the connection and then hangs is given up on.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP client of the berth API, used by the CLI and by controllers running as their own process.
#[derive(Clone)]
pub struct ApiClient {
    /// Normalised base URLs, without a trailing `/`; never empty.
    bases: Arc<[String]>,
    /// Index in `bases` of the server that answered last (shared by clones: one controller's tasks
    /// all learn of a failover at once).
    current: Arc<AtomicUsize>,
    token: String,
    http: reqwest::Client,
    budget: Duration,
}

/// Whether a request may be sent again after it may have reached a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Replay {
    /// Idempotent: sending it twice leaves the same state (reads, PUT, DELETE, a conditional
    /// PATCH, an apply, which is an upsert).
    Always,
    /// Not idempotent (a create, a rotation, a long operation): only resent when the connection
    /// was never made, so no server saw it.
    ConnectOnly,
}

/// What one attempt got: the whole answer, or the head of one whose body is read as a stream.
enum Answer {
    Whole(StatusCode, bytes::Bytes),
    Streaming(reqwest::Response),
}

/// The base URLs of `--url`/`BERTH_URL`: one, or several separated by commas.
pub fn parse_urls(list: &str) -> Result<Vec<String>, String> {
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    let mut bases = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let which = if entries.len() == 1 {
            "--url".to_string()
        } else {
            format!("--url entry {} `{entry}`", i + 1)
        };
        if entry.is_empty() {
            return Err(format!(
                "error: {which}: empty (expected http(s)://HOST:PORT, several separated by commas)"
            ));
        }
        let url = reqwest::Url::parse(entry).map_err(|e| {
            format!(
                "error: {which}: {e} (expected http(s)://HOST:PORT, several separated by commas)"
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "error: {which}: not an http(s) URL with a host (expected http(s)://HOST:PORT)"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(format!(
                "error: {which}: a base URL has no query, fragment or user (the token is passed with --token)"
            ));
        }
        let base = url.as_str().trim_end_matches('/').to_string();
        if bases.contains(&base) {
            return Err(format!("error: {which}: listed twice"));
        }
        bases.push(base);
    }
    Ok(bases)
}

impl ApiClient {
    /// `urls`: one API server URL, or several separated by commas (servers sharing one store; any
    /// of them can answer). `ca`: the only CA trusted for an https URL (berth's internal CA, or the
    /// one that signed the operators' certificates); `None` trusts the system's roots.
    pub fn new(urls: &str, token: &str, ca: Option<&std::path::Path>) -> Result<Self, String> {
        let bases = parse_urls(urls)?;
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
            bases: bases.clone().into(),
            current: Arc::new(AtomicUsize::new(0)),
            token: token.to_string(),
            http,
            // With one server there is nowhere else to go: its error is the answer, at once, as
            // a user who mistyped the URL expects.
            budget: if bases.len() > 1 {
                RETRY_BUDGET
            } else {
                Duration::ZERO
            },
        })
    }

    /// The same client with another retry budget (tests wait less).
    #[cfg(test)]
    fn with_retry_budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// The URL of the server that answered last (the first one before any answer).
    pub fn base_url(&self) -> &str {
        &self.bases[self.current()]
    }

    /// Every server this client may use, in the order given.
    pub fn base_urls(&self) -> &[String] {
        &self.bases
    }

    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.bases.len()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    /// Sends a request and decodes a JSON answer, turning error bodies into `ClientError::Api`.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send_as(req, None).await
    }

    /// [`ApiClient::send`], saying whether the request may be resent (`None`: judged by its method
    /// and path).
    async fn send_as<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        replay: Option<Replay>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = match self.dispatch(req, replay, true).await? {
            Answer::Whole(status, bytes) => (status, bytes),
            Answer::Streaming(_) => unreachable!("dispatch reads the whole body when asked to"),
        };
        if !status.is_success() {
            return Err(refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Sends `req` to the servers in turn, starting with the one that answered last, until one
    /// answers (anything but a 503), the request may not be resent, or the retry budget is spent.
    /// With `whole`, an attempt includes reading the body (a server dying mid-answer is failed
    /// over like one refusing the connection).
    async fn dispatch(
        &self,
        req: reqwest::RequestBuilder,
        replay: Option<Replay>,
        whole: bool,
    ) -> Result<Answer, ClientError> {
        // A whole answer has a time limit; a stream (a watch) has none beyond connecting, or
        // `events --watch` and `get -w` would end after ATTEMPT_TIMEOUT however healthy.
        let req = req.bearer_auth(&self.token);
        let req = if whole {
            req.timeout(ATTEMPT_TIMEOUT)
        } else {
            req
        };
        let req = req
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot build the request: {e}")))?;
        let replay = replay.unwrap_or_else(|| replay_of(req.method(), req.url().path()));
        // The part after the base URL, to be put after each server's base in turn; a URL that is
        // none of the bases (not built by this client) goes only where it points.
        let target = req.url().as_str().to_string();
        let suffix = self
            .bases
            .iter()
            .filter(|b| target.starts_with(b.as_str()))
            .max_by_key(|b| b.len())
            .map(|b| target[b.len()..].to_string());
        let n = if suffix.is_some() {
            self.bases.len()
        } else {
            1
        };
        let started = Instant::now();
        let mut retry =
            BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(2), 2.0, 0.3)
                .retry();
        loop {
            let first = self.current();
            let mut last: Option<ClientError> = None;
            let mut healing = true;
            for step in 0..n {
                let idx = (first + step) % self.bases.len();
                let base = &self.bases[idx];
                let Some(mut attempt) = req.try_clone() else {
                    // A streamed body cannot be sent twice: one attempt where it points.
                    return self
                        .attempt(req, base.clone(), whole)
                        .await
                        .map_err(|(_, e)| e);
                };
                if let Some(suffix) = &suffix {
                    *attempt.url_mut() = reqwest::Url::parse(&format!("{base}{suffix}"))
                        .map_err(|e| ClientError::Protocol(e.to_string()))?;
                }
                match self.attempt(attempt, base.clone(), whole).await {
                    Ok(Answer::Whole(status, bytes))
                        if status == StatusCode::SERVICE_UNAVAILABLE
                            && replay == Replay::Always =>
                    {
                        last = Some(refusal(status, &bytes));
                    }
                    Ok(answer) => {
                        self.current.store(idx, Ordering::Relaxed);
                        return Ok(answer);
                    }
                    Err((connect, e)) => {
                        if !connect && replay == Replay::ConnectOnly {
                            // It may have reached the server: resending could do it twice.
                            return Err(e);
                        }
                        healing &= !untrusted(&e);
                        last = Some(e);
                    }
                }
            }
            let last = last.expect("at least one attempt per round");
            // A certificate the client does not trust stays untrusted: no point waiting for it.
            if !healing {
                return Err(self.none_answered(last, n));
            }
            let delay = retry.next_delay();
            if started.elapsed() + delay > self.budget {
                return Err(self.none_answered(last, n));
            }
            tracing::debug!(error = %last, ?delay, "no berth API server answered; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// The last error of a request no server answered, saying that the others were tried too.
    fn none_answered(&self, last: ClientError, tried: usize) -> ClientError {
        match last {
            ClientError::Unreachable { url, source } if tried > 1 => {
                let others: Vec<&str> = self
                    .bases
                    .iter()
                    .filter(|b| **b != url)
                    .map(String::as_str)
                    .collect();
                ClientError::Unreachable {
                    url: format!("{url} (nor at {})", others.join(", ")),
                    source,
                }
            }
            other => other,
        }
    }

    /// One attempt on one server. The error says whether it failed while connecting (the request
    /// never left).
    async fn attempt(
        &self,
        req: reqwest::Request,
        base: String,
        whole: bool,
    ) -> Result<Answer, (bool, ClientError)> {
        let unreachable = |e: reqwest::Error| {
            (
                e.is_connect(),
                ClientError::Unreachable {
                    url: base.clone(),
                    source: e,
                },
            )
        };
        let resp = self.http.execute(req).await.map_err(unreachable)?;
        let status = resp.status();
        if whole || status == StatusCode::SERVICE_UNAVAILABLE {
            let bytes = resp.bytes().await.map_err(|e| (false, unreachable(e).1))?;
            return Ok(Answer::Whole(status, bytes));
        }
        Ok(Answer::Streaming(resp))
    }

    /// Any request on an API path with an optional JSON body (for endpoints without a typed
    /// method, such as webhook administration).
    pub async fn request_json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let conditional = method == Method::PATCH && body.is_some_and(has_resource_version);
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send_as(req, conditional.then_some(Replay::Always))
            .await
    }

    pub async fn discovery(&self) -> Result<Discovery, ClientError> {
        self.send(self.http.get(self.url(paths::API_ROOT))).await
    }

    pub async fn get_object(&self, kind: Kind, name: &str) -> Result<DynObject, ClientError> {
        self.send(self.http.get(self.url(&paths::object(kind, name))))
            .await
    }

    pub async fn list_objects(&self, kind: Kind) -> Result<Vec<DynObject>, ClientError> {
        self.list_selected(kind, None).await
    }

    /// The objects of a kind whose labels match `selector` (evaluated by the server; a bad
    /// selector is its 400).
    pub async fn list_selected(
        &self,
        kind: Kind,
        selector: Option<&str>,
    ) -> Result<Vec<DynObject>, ClientError> {
        let mut req = self.http.get(self.url(&paths::collection(kind)));
        if let Some(s) = selector {
            req = req.query(&[(paths::LABEL_SELECTOR_PARAM, s)]);
        }
        let list: List<DynObject> = self.send(req).await?;
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
        // Conditional, it cannot apply twice (the second would meet another resourceVersion).
        let replay = has_resource_version(patch).then_some(Replay::Always);
        self.send_as(
            self.http
                .patch(self.url(&paths::object(kind, name)))
                .header("content-type", "application/merge-patch+json")
                .body(patch.to_string()),
            replay,
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

    /// Streams events as they happen (newline-delimited JSON from `?watch=true`). With several
    /// servers, a stream that drops is reopened on the next one that answers (events published
    /// while no stream was open are not replayed: the watch has no resume point); with one server
    /// the stream ends when it drops, as the server closed it.
    pub async fn watch_events(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Event, ClientError>>, ClientError> {
        use futures::StreamExt;
        // The stream and the server it comes from.
        let open = |client: ApiClient| async move {
            let req = client
                .http
                .get(client.url(paths::EVENTS))
                .query(&[("watch", "true")]);
            let lines = client.json_lines::<Event>(req).await?;
            Ok::<_, ClientError>((client.base_url().to_string(), Box::pin(lines)))
        };
        let (base, first) = open(self.clone()).await?;
        if self.bases.len() == 1 {
            return Ok(first.left_stream());
        }
        let client = self.clone();
        let resumed = futures::stream::unfold(Some((base, first)), move |state| {
            let client = client.clone();
            async move {
                let (mut base, mut lines) = state?;
                loop {
                    match lines.next().await {
                        Some(Err(ClientError::Unreachable { .. })) | None => {
                            tracing::info!(url = %base, "the event stream dropped; reopening it on the next server");
                            client.skip(&base);
                            match open(client.clone()).await {
                                Ok((b, l)) => (base, lines) = (b, l),
                                // No server answered within the retry budget: the watch ends.
                                Err(e) => return Some((Err(e), None)),
                            }
                        }
                        Some(item) => return Some((item, Some((base, lines)))),
                    }
                }
            }
        });
        Ok(resumed.right_stream())
    }

    /// Makes the server after `url` the first one to try (the stream from `url` dropped).
    fn skip(&self, url: &str) {
        if let Some(i) = self.bases.iter().position(|b| b == url) {
            self.current
                .store((i + 1) % self.bases.len(), Ordering::Relaxed);
        }
    }

    /// A request whose answer is newline-delimited JSON (watches, long operations that report
    /// progress), as a stream of decoded lines. An error answer is decoded as usual. Opening it
    /// fails over like any request; a stream that drops afterwards ends with an error.
    pub async fn json_lines<T: serde::de::DeserializeOwned + 'static>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<impl futures::Stream<Item = Result<T, ClientError>>, ClientError> {
        let resp = match self.dispatch(req, None, false).await? {
            Answer::Whole(status, bytes) => return Err(refusal(status, &bytes)),
            Answer::Streaming(resp) => resp,
        };
        self.decode_json_lines(resp).await
    }

    /// A request answered by a stream with no end in sight or by a connection upgrade (`berth
    /// logs -f`, `berth exec`): sent once, to the server that answered last, with a time limit
    /// on connecting only. An error answer is decoded as usual; `101 Switching Protocols` and
    /// success are handed back.
    pub async fn open(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let base = self.base_url().to_string();
        let req = req
            .bearer_auth(&self.token)
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot build the request: {e}")))?;
        let resp = self
            .http
            .execute(req)
            .await
            .map_err(|e| ClientError::Unreachable {
                url: base.clone(),
                source: e,
            })?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: base,
            source: e,
        })?;
        Err(refusal(status, &bytes))
    }

    /// The newline-delimited JSON of an answer, decoded line by line.
    pub async fn decode_json_lines<T: serde::de::DeserializeOwned + 'static>(
        &self,
        resp: reqwest::Response,
    ) -> Result<impl futures::Stream<Item = Result<T, ClientError>>, ClientError> {
        use futures::StreamExt;
        let base = self.base_url().to_string();
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
                url: base.clone(),
                source: e,
            })?;
            return Err(refusal(status, &bytes));
        }
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

/// Whether a request may be resent, judged by its method and path: reads, PUT and DELETE are
/// idempotent, and so is the apply endpoint (an upsert of the whole set); any other POST creates
/// or triggers something, and a PATCH is idempotent only when conditional (the caller says so).
fn replay_of(method: &Method, path: &str) -> Replay {
    match *method {
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS => {
            Replay::Always
        }
        Method::POST if path.ends_with(paths::APPLY) => Replay::Always,
        _ => Replay::ConnectOnly,
    }
}

/// Whether a patch carries `metadata.resourceVersion` (applies only to that version).
fn has_resource_version(patch: &Value) -> bool {
    patch
        .pointer("/metadata/resourceVersion")
        .is_some_and(|rv| !rv.is_null())
}

/// A transport error caused by a server certificate this client does not trust: another attempt
/// on the same server would meet the same certificate.
fn untrusted(e: &ClientError) -> bool {
    use tokio_rustls::rustls;
    let ClientError::Unreachable { source, .. } = e else {
        return false;
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(err) = next {
        if let Some(rustls::Error::InvalidCertificate(_)) = err.downcast_ref::<rustls::Error>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps (the TLS one sits in two of them).
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use futures::StreamExt;
    use std::sync::atomic::AtomicUsize;

    /// A stand-in API server on loopback that says which one it is and counts what it received.
    struct Server {
        url: String,
        hits: Arc<AtomicUsize>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: Option<tokio::task::JoinHandle<()>>,
    }

    impl Server {
        async fn start(name: &'static str) -> Server {
            let hits = Arc::new(AtomicUsize::new(0));
            let count = |hits: Arc<AtomicUsize>| {
                move || {
                    hits.fetch_add(1, Ordering::SeqCst);
                }
            };
            let who = {
                let hit = count(hits.clone());
                move || async move {
                    hit();
                    axum::Json(serde_json::json!({ "server": name }))
                }
            };
            let bad = {
                let hit = count(hits.clone());
                move || async move {
                    hit();
                    (
                        axum::http::StatusCode::BAD_REQUEST,
                        axum::Json(serde_json::json!({"code": 400, "reason": "BadRequest",
                                                      "message": format!("refused by {name}")})),
                    )
                }
            };
            let busy = {
                let hit = count(hits.clone());
                move || async move {
                    hit();
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(
                            serde_json::json!({"code": 503, "reason": "ServiceUnavailable",
                                                      "message": format!("{name} is shutting down")}),
                        ),
                    )
                }
            };
            // One event, then the stream ends (as when the server goes away).
            let watch = {
                let hit = count(hits.clone());
                move || async move {
                    hit();
                    let event = Event {
                        id: name.to_string(),
                        type_: berth_api_types::EventType::Applied,
                        kind: Kind::Service,
                        name: name.to_string(),
                        uid: "u".into(),
                        generation: 1,
                        resource_version: "1".into(),
                        time: chrono::Utc::now(),
                        message: String::new(),
                    };
                    format!("{}\n", serde_json::to_string(&event).unwrap())
                }
            };
            let apply = {
                let hit = count(hits.clone());
                move || async move {
                    hit();
                    axum::Json(serde_json::json!({ "items": [] }))
                }
            };
            let app = axum::Router::new()
                .route("/who", get(who.clone()).put(who.clone()))
                .route("/things", post(who.clone()))
                .route(paths::APPLY, post(apply))
                .route("/bad", get(bad))
                .route("/busy", get(busy))
                .route(paths::EVENTS, get(watch));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
            Server {
                url,
                hits,
                stop: Some(stop),
                task: Some(task),
            }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        /// Stops it and waits until its port refuses connections (idle keep-alive ones closed).
        async fn kill(&mut self) {
            self.stop.take().unwrap().send(()).unwrap();
            self.task.take().unwrap().await.unwrap();
        }
    }

    /// A loopback URL nothing listens on.
    fn dead_url() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    /// A server that reads a request and closes the connection without answering: the request
    /// reached it, and the client cannot know whether it was carried out.
    async fn swallowing_server() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await;
                count.fetch_add(1, Ordering::SeqCst);
                drop(sock);
            }
        });
        (url, seen)
    }

    fn client(urls: &[&str]) -> ApiClient {
        ApiClient::new(&urls.join(","), "t", None)
            .unwrap()
            .with_retry_budget(Duration::from_secs(2))
    }

    async fn who(c: &ApiClient) -> Result<String, ClientError> {
        let v: Value = c.request_json(Method::GET, "/who", None).await?;
        Ok(v["server"].as_str().unwrap().to_string())
    }

    #[test]
    fn every_url_of_the_list_is_checked_and_a_bad_one_is_named() {
        assert_eq!(
            parse_urls("https://m1:7474/, https://m2:7474,http://10.0.0.3:7474").unwrap(),
            ["https://m1:7474", "https://m2:7474", "http://10.0.0.3:7474"]
        );
        assert_eq!(parse_urls("http://127.0.0.1:7474").unwrap().len(), 1);
        let e = parse_urls("https://m1:7474,m2:7474").unwrap_err();
        assert!(e.contains("entry 2 `m2:7474`"), "{e}");
        let e = parse_urls("https://m1:7474,,https://m3:7474").unwrap_err();
        assert!(e.contains("entry 2") && e.contains("empty"), "{e}");
        let e = parse_urls("ftp://m1").unwrap_err();
        assert!(e.contains("--url") && e.contains("http(s)"), "{e}");
        let e = parse_urls("https://m1:7474,https://m1:7474/").unwrap_err();
        assert!(e.contains("entry 2") && e.contains("twice"), "{e}");
        let e = parse_urls("https://m1:7474?x=1").unwrap_err();
        assert!(e.contains("query"), "{e}");
        assert!(ApiClient::new("https://m1:7474,nope", "t", None).is_err());
    }

    #[tokio::test]
    async fn a_request_lands_on_the_live_server_and_sticks_to_it() {
        let live = Server::start("live").await;
        let dead = dead_url();
        let c = client(&[&dead, &live.url]);
        assert_eq!(c.base_url(), dead);
        assert_eq!(who(&c).await.unwrap(), "live");
        // The server that answered is tried first from then on, by clones too.
        assert_eq!(c.base_url(), live.url);
        assert_eq!(c.clone().base_url(), live.url);
        assert_eq!(who(&c).await.unwrap(), "live");
        assert_eq!(live.hits(), 2);
    }

    #[tokio::test]
    async fn a_server_stopped_mid_sequence_is_failed_over() {
        let mut a = Server::start("a").await;
        let b = Server::start("b").await;
        let c = client(&[&a.url, &b.url]);
        assert_eq!(who(&c).await.unwrap(), "a");
        let v: Value = c
            .request_json(Method::PUT, "/who", Some(&serde_json::json!({})))
            .await
            .unwrap();
        assert_eq!(v["server"], "a");
        a.kill().await;
        assert_eq!(who(&c).await.unwrap(), "b");
        let v: Value = c
            .request_json(Method::PUT, "/who", Some(&serde_json::json!({})))
            .await
            .unwrap();
        assert_eq!(v["server"], "b", "a write goes to the survivor too");
        // The apply endpoint is an upsert: it fails over like a read.
        assert!(c.apply(&[], false).await.unwrap().is_empty());
        assert_eq!(b.hits(), 3);
    }

    #[tokio::test]
    async fn an_error_answer_is_not_retried_elsewhere_but_a_503_is() {
        let a = Server::start("a").await;
        let b = Server::start("b").await;
        let c = client(&[&a.url, &b.url]);
        let e = c
            .request_json::<Value>(Method::GET, "/bad", None)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(400));
        assert!(e.to_string().contains("refused by a"), "{e}");
        assert_eq!((a.hits(), b.hits()), (1, 0), "a 400 is berth's answer");
        // Both answer 503: each is tried, round after round, until the budget is spent.
        let started = Instant::now();
        let e = c
            .request_json::<Value>(Method::GET, "/busy", None)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(503));
        assert!(a.hits() >= 3 && b.hits() >= 2, "{} {}", a.hits(), b.hits());
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[tokio::test]
    async fn a_create_that_reached_a_server_is_not_sent_again() {
        let (swallower, seen) = swallowing_server().await;
        let b = Server::start("b").await;
        let c = client(&[&swallower, &b.url]);
        let e = c
            .request_json::<Value>(Method::POST, "/things", Some(&serde_json::json!({})))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Unreachable { ref url, .. } if *url == swallower),
            "{e}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert_eq!(b.hits(), 0, "the create may have been done: not resent");
        // The same failure on an idempotent request goes to the other server.
        assert_eq!(who(&c).await.unwrap(), "b");
        // A create whose connection was refused never left: it goes to the next server.
        let c = client(&[&dead_url(), &b.url]);
        let v: Value = c
            .request_json(Method::POST, "/things", Some(&serde_json::json!({})))
            .await
            .unwrap();
        assert_eq!(v["server"], "b");
    }

    #[tokio::test]
    async fn when_no_server_answers_the_last_error_names_one_after_the_budget() {
        let (d1, d2) = (dead_url(), dead_url());
        let c = client(&[&d1, &d2]).with_retry_budget(Duration::from_millis(600));
        let started = Instant::now();
        let e = who(&c).await.unwrap_err();
        assert!(e.is_transient());
        // The last server tried, and the other one.
        let shown = e.to_string();
        let (last, other) = if shown.contains(&format!("at {d1} ")) {
            (&d1, &d2)
        } else {
            (&d2, &d1)
        };
        assert!(
            shown.contains(&format!(
                "cannot reach the berth API at {last} (nor at {other}): "
            )),
            "{e}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    /// A certificate the client does not trust is not waited out: every server is tried once and
    /// the error says what to do, instead of going round until the budget is spent.
    #[tokio::test]
    async fn an_untrusted_certificate_fails_at_once() {
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            tls: crate::tls::TlsArgs,
        }
        use clap::Parser as _;
        let tls_args = Cmd::try_parse_from(["berth", "--tls", "internal"])
            .unwrap()
            .tls;
        let dir = tempfile::tempdir().unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = tcp.local_addr().unwrap();
        let tls = tls_args
            .server_tls(dir.path(), "inst", &[local])
            .unwrap()
            .unwrap();
        let app = axum::Router::new().route("/who", get(|| async { "{}" }));
        tokio::spawn(crate::tls::serve(tcp, Some(tls.config), app));
        let url = format!("https://127.0.0.1:{}", local.port());

        let c = client(&[&url]).with_retry_budget(Duration::from_secs(5));
        let started = Instant::now();
        let e = who(&c).await.unwrap_err();
        assert!(untrusted(&e), "{e:?}");
        assert!(e.to_string().contains("--ca"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // With the CA it answers, so the failure above was the certificate.
        let c = ApiClient::new(&url, "t", tls.ca_file.as_deref()).unwrap();
        let v: Value = c.request_json(Method::GET, "/who", None).await.unwrap();
        assert_eq!(v, serde_json::json!({}));
    }

    #[tokio::test]
    async fn the_event_watch_moves_to_the_next_server_when_its_stream_ends() {
        let a = Server::start("a").await;
        let b = Server::start("b").await;
        let c = client(&[&a.url, &b.url]);
        let events: Vec<String> = c
            .watch_events()
            .await
            .unwrap()
            .take(3)
            .map(|e| e.unwrap().name)
            .collect()
            .await;
        assert_eq!(events, ["a", "b", "a"]);
        // With one server, the stream ends when the server ends it (the CLI reports that).
        let c = client(&[&a.url]);
        let events: Vec<_> = c.watch_events().await.unwrap().collect().await;
        assert_eq!(events.len(), 1);
    }
}
