//! Every name that crosses a process boundary, defined once: the API's paths, the NATS subjects events
//! travel on, and the Swarm label keys berth stamps on what it creates. Outside tools depend on these,
//! so they live here and nowhere else.

use crate::kind::Kind;

/// The API group/version every manifest declares in `apiVersion`.
pub const API_VERSION: &str = "berth/v1";

/// REST paths of the API server.
pub mod paths {
    use super::Kind;

    /// Liveness endpoint; served without a bearer token.
    pub const HEALTHZ: &str = "/healthz";
    /// `GET /schemas/<kind>.json` (or `berth.json`, any kind): the JSON Schema of a kind's
    /// manifests (`api_types::schema`). Served without a token, so an editor can fetch it from a
    /// `$schema` line: it holds only the kinds' shapes, as the source does.
    pub const SCHEMAS: &str = "/schemas";
    /// `GET`: the OpenAPI 3.1 description of this API, generated from the routes and the kinds'
    /// schemas. Served without a token, like the schemas, for API tooling.
    pub const OPENAPI: &str = "/openapi.json";
    /// Readiness: the store, the Swarm engine and NATS (when configured); 503 names what is not
    /// ready. Public like `/healthz`.
    pub const READYZ: &str = "/readyz";
    /// Prometheus metrics (text format); needs a token that may read objects.
    pub const METRICS: &str = "/metrics";
    /// Discovery document: the instance id and the kinds this server serves.
    pub const API_ROOT: &str = "/apis/berth/v1";
    /// Atomic multi-object apply (`kubectl apply` over a whole manifest set).
    pub const APPLY: &str = "/apis/berth/v1/apply";
    /// Recent events, optionally streamed with `?watch=true`.
    pub const EVENTS: &str = "/apis/berth/v1/events";
    /// GET `?role=worker|manager`: the `docker swarm join` command for a new node. It carries the
    /// swarm's join token, so only admin-token holders may ask and the answer is never logged.
    pub const JOIN_COMMAND: &str = "/apis/berth/v1/swarm/join-command";

    /// Backups. Every route below needs the admin token (the only role until access control
    /// lands): they read every volume's data, hand out the repository key, or rewrite objects.
    ///
    /// `/apis/berth/v1/backups/<plan>/run`: POST takes a snapshot now; the answer streams progress
    /// as JSON lines and ends with the snapshot's record.
    pub fn backup_run(plan: &str) -> String {
        format!("{API_ROOT}/backups/{plan}/run")
    }
    /// GET (`?plan=`): the evidence, every snapshot's record with its verification.
    pub const SNAPSHOTS: &str = "/apis/berth/v1/snapshots";
    /// POST `{"snapshot": ID}` or `{"all": true}`: re-read every blob, record the result.
    pub const SNAPSHOTS_VERIFY: &str = "/apis/berth/v1/snapshots/verify";
    /// POST `{"snapshot", "volume", "node"?, "as"?}`: write a volume's files back from a snapshot.
    pub const RESTORE_VOLUME: &str = "/apis/berth/v1/restore/volume";
    /// POST `{"snapshot", "dryRun"}`: re-apply a snapshot's objects (never deletes).
    pub const RESTORE_ENVIRONMENT: &str = "/apis/berth/v1/restore/environment";
    /// GET: the repository key, for running restic by hand (never logged).
    pub const BACKUP_KEY: &str = "/apis/berth/v1/backup/key";
    /// `GET`: the running controller instances (`berth controllers`).
    pub const CONTROLLERS: &str = "/apis/berth/v1/controllers";
    /// `GET`: the caller's own token (id, role, services).
    pub const WHOAMI: &str = "/apis/berth/v1/whoami";
    /// `GET` lists tokens, `POST` creates one (`berth token create`); admin only.
    pub const TOKENS: &str = "/apis/berth/v1/tokens";
    /// `POST`: a new admin token replaces the old one (`berth token rotate-admin`); admin only.
    pub const ADMIN_TOKEN_ROTATE: &str = "/apis/berth/v1/tokens/admin/rotate";
    /// `DELETE`: revokes a token (`berth token revoke ID`); admin only.
    pub fn token(id: &str) -> String {
        format!("{TOKENS}/{id}")
    }
    /// `GET` (`?since=RFC3339|duration`): the audit trail, oldest first (`berth audit`).
    pub const AUDIT: &str = "/apis/berth/v1/audit";
    /// `GET`: the audit chain recomputed (`berth audit verify`).
    pub const AUDIT_VERIFY: &str = "/apis/berth/v1/audit/verify";

    /// The web dashboard (`operator/src/dashboard`): server-rendered pages under this prefix, on
    /// the same listener, tokens and access table as the API.
    pub const UI: &str = "/ui";
    /// The overview page.
    pub const UI_HOME: &str = "/ui/";
    /// `GET` the sign-in form, `POST` a token to it (sets the session cookie).
    pub const UI_LOGIN: &str = "/ui/login";
    /// `POST`: forget the session cookie.
    pub const UI_LOGOUT: &str = "/ui/logout";
    /// `GET /ui/assets/<file>`: the pages' scripts and styles, built into the binary.
    pub const UI_ASSETS: &str = "/ui/assets";
    /// `GET /ui/services/<name>`: a Service's page.
    pub fn ui_service(name: &str) -> String {
        format!("{UI}/services/{name}")
    }
    /// `GET /ui/rows/services/<name>`: one Service's overview row, for live updates.
    pub fn ui_service_row(name: &str) -> String {
        format!("{UI}/rows/services/{name}")
    }
    /// `GET /ui/sections/<section>`: one overview section (nodes, ingresses, backups, events).
    pub fn ui_section(section: &str) -> String {
        format!("{UI}/sections/{section}")
    }
    /// `GET`: snapshots, their verification, and the evidence downloads.
    pub const UI_BACKUPS: &str = "/ui/backups";
    /// `GET`: the audit trail and its chain verification.
    pub const UI_AUDIT: &str = "/ui/audit";
    /// `GET` with `Upgrade: websocket`: `berth exec` for a browser. The WebSocket's binary
    /// messages carry the same frames as the `berth-exec/1` upgrade of [`exec`].
    pub fn exec_ws(kind: Kind, name: &str) -> String {
        format!("{API_ROOT}/{}/{name}/exec/ws", kind.plural())
    }

    /// The query parameter of a collection's `GET` that filters by labels (`selector.rs` syntax).
    pub const LABEL_SELECTOR_PARAM: &str = "labelSelector";

    /// `/apis/berth/v1/<plural>`
    pub fn collection(kind: Kind) -> String {
        format!("{API_ROOT}/{}", kind.plural())
    }

    /// `/apis/berth/v1/<plural>/<name>`
    pub fn object(kind: Kind, name: &str) -> String {
        format!("{API_ROOT}/{}/{name}", kind.plural())
    }

    /// `/apis/berth/v1/<plural>/<name>/data`: a Secret's or Config's values, for controllers only.
    pub fn data(kind: Kind, name: &str) -> String {
        format!("{API_ROOT}/{}/{name}/data", kind.plural())
    }

    /// `/apis/berth/v1/<plural>/<name>/status`
    pub fn status(kind: Kind, name: &str) -> String {
        format!("{API_ROOT}/{}/{name}/status", kind.plural())
    }

    /// `/apis/berth/v1/<plural>/<name>/logs`: GET (`?follow&since&tail&timestamps&task`) a
    /// Service's logs from all its tasks on every node, as JSON lines (`berth logs`).
    pub fn logs(kind: Kind, name: &str) -> String {
        format!("{API_ROOT}/{}/{name}/logs", kind.plural())
    }

    /// `/apis/berth/v1/<plural>/<name>/tasks`: GET a Service's Swarm tasks (`berth ps`).
    pub fn tasks(kind: Kind, name: &str) -> String {
        format!("{API_ROOT}/{}/{name}/tasks", kind.plural())
    }

    /// `/apis/berth/v1/<plural>/<name>/exec`: POST a command to run in one of a Service's tasks,
    /// upgrading the connection to `workload::EXEC_PROTOCOL` (`berth exec`).
    pub fn exec(kind: Kind, name: &str) -> String {
        format!("{API_ROOT}/{}/{name}/exec", kind.plural())
    }

    /// Webhook administration (bearer token): list (GET) and create (POST).
    pub const WEBHOOKS: &str = "/apis/berth/v1/webhooks";

    /// `/apis/berth/v1/webhooks/<id>`: DELETE removes the webhook.
    pub fn webhook(id: &str) -> String {
        format!("{WEBHOOKS}/{id}")
    }

    /// `/apis/berth/v1/webhooks/<id>/rotate`: POST gives it a new URL (and signing secret).
    pub fn webhook_rotate(id: &str) -> String {
        format!("{WEBHOOKS}/{id}/rotate")
    }

    /// Prefix of the unauthenticated deploy hooks: the token in the path is the credential.
    pub const HOOKS: &str = "/hooks/v1";

    /// `/hooks/v1/<token>`: a CI system POSTs here after pushing an image.
    pub fn hook(token: &str) -> String {
        format!("{HOOKS}/{token}")
    }

    /// `/hooks/v1/registry/<token>`: a registry's push notifications (`notifications.endpoints`).
    pub fn registry_hook(token: &str) -> String {
        format!("{HOOKS}/registry/{token}")
    }
}

/// NATS subjects (also used, unchanged, as topics of the embedded bus).
pub mod subjects {
    use super::Kind;

    /// Prefix of every resource event; the JetStream stream captures `berth.events.>`.
    pub const EVENTS_PREFIX: &str = "berth.events";
    /// Subject filter the JetStream stream is created over.
    pub const EVENTS_ALL: &str = "berth.events.>";
    /// Name of the JetStream stream that keeps events for consumers that were down.
    pub const EVENTS_STREAM: &str = "BERTH_EVENTS";

    /// `berth.events.<kind>.<name>`
    pub fn event(kind: Kind, name: &str) -> String {
        format!("{EVENTS_PREFIX}.{}.{name}", kind.lower())
    }

    /// `berth.events.<kind>.>`: every event of one kind.
    pub fn kind_events(kind: Kind) -> String {
        format!("{EVENTS_PREFIX}.{}.>", kind.lower())
    }

    /// Prefix of audit records (`api_types::access::AuditRecord`), published after they are
    /// stored: an outside copy of the chain that a writer of the store cannot edit.
    pub const AUDIT_PREFIX: &str = "berth.audit";
    /// Every audit record; the `BERTH_AUDIT` stream captures it.
    pub const AUDIT_ALL: &str = "berth.audit.>";
    /// JetStream stream of audit records (deduplicated by `Nats-Msg-Id` =
    /// `audit-<installation>-<seq>`), created by the API server when it first publishes one.
    pub const AUDIT_STREAM: &str = "BERTH_AUDIT";
    /// `berth.audit.<kind>` (lowercase, e.g. `service`), or `berth.audit.token` for token
    /// changes and `berth.audit.api` for requests about no object.
    pub fn audit(topic: &str) -> String {
        format!("{AUDIT_PREFIX}.{topic}")
    }

    /// Prefix of deploy events (`api_types::deploy::DeployEvent`).
    pub const DEPLOY_PREFIX: &str = "berth.deploy";
    /// Every deploy event; the `BERTH_DEPLOYS` stream captures it.
    pub const DEPLOY_ALL: &str = "berth.deploy.>";
    /// JetStream stream of deploy events (deduplicated by `Nats-Msg-Id` = event id).
    pub const DEPLOY_STREAM: &str = "BERTH_DEPLOYS";

    /// `berth.deploy.<service>`
    pub fn deploy(service: &str) -> String {
        format!("{DEPLOY_PREFIX}.{service}")
    }

    /// Default name of the JetStream stream that is the store's log (`berth api --store nats`):
    /// every commit of the API servers, replicated. One per installation.
    pub const STORE_STREAM: &str = "BERTH_STORE";

    /// `berth.store.<stream>`: the one subject of a store log stream.
    pub fn store_log(stream: &str) -> String {
        format!("berth.store.{stream}")
    }

    /// JetStream KV bucket of the controllers' leases and instance records (`KV_BERTH_CONTROLLERS`,
    /// subjects `$KV.BERTH_CONTROLLERS.>`). Its max age is the lease time: an entry nobody renews
    /// disappears, so dead instances and installations leave nothing behind.
    pub const CONTROLLERS_BUCKET: &str = "BERTH_CONTROLLERS";

    /// `lease.<installation>.<kind>.<partition>`: who reconciles one partition of a kind's objects.
    pub fn lease_key(installation: &str, kind: Kind, partition: u32) -> String {
        format!("lease.{installation}.{}.{partition}", kind.lower())
    }

    /// `member.<installation>.<kind>.<instance>`: one running controller instance.
    pub fn member_key(installation: &str, kind: Kind, instance: &str) -> String {
        format!("member.{installation}.{}.{instance}", kind.lower())
    }

    /// The prefix of every member key of one installation (`member.<installation>.`).
    pub fn members_of(installation: &str) -> String {
        format!("member.{installation}.")
    }
}

/// Label keys berth puts on Swarm objects so it can find, diff and garbage-collect its own objects and
/// never touch anyone else's.
pub mod labels {
    /// Prefix reserved for berth; user labels may not use it.
    pub const PREFIX: &str = "io.berth.";
    /// Always `berth`; the first filter when listing Swarm objects.
    pub const MANAGED_BY: &str = "io.berth.managed-by";
    pub const MANAGED_BY_VALUE: &str = "berth";
    /// Which berth installation owns the object: two berths sharing one Swarm never collect each other's.
    pub const INSTANCE: &str = "io.berth.instance";
    pub const KIND: &str = "io.berth.kind";
    pub const NAME: &str = "io.berth.name";
    pub const UID: &str = "io.berth.uid";
    pub const GENERATION: &str = "io.berth.generation";
    /// On a materialised secret or config: which key of the berth object it holds.
    pub const KEY: &str = "io.berth.key";
    /// Hash of the Swarm spec berth built; equal hash and matching fields mean no update call.
    pub const SPEC_HASH: &str = "io.berth.spec-hash";
    /// On what the Ingress controller creates for its proxy: which part it is (`proxy`, `config`,
    /// `certificate`, `ca`, `ca-key`, `state`).
    pub const ROLE: &str = "io.berth.role";
    /// On a restic snapshot (as a tag `io.berth.run=<id>`) and on the agent tasks that copy a
    /// volume: which backup run it belongs to.
    pub const BACKUP_RUN: &str = "io.berth.run";
    /// Node label (`docker node update --label-add io.berth.ingress=true`) choosing the nodes that
    /// run the ingress proxy; without any such node it runs on the managers.
    pub const INGRESS_NODE: &str = "io.berth.ingress";
    /// Set by Swarm (not berth) on every task's container: the task it runs.
    pub const SWARM_TASK_ID: &str = "com.docker.swarm.task.id";
    /// On a Service's pre-deploy job: the rollout it gates (a hash of image and forced-redeploy
    /// counter), the revision that rollout is, and the step's position in `spec.deploy.preDeploy`.
    pub const ROLLOUT: &str = "io.berth.rollout";
    pub const REVISION: &str = "io.berth.revision";
    pub const STEP: &str = "io.berth.step";
    /// `io.berth.role` of a Service's pre-deploy jobs.
    pub const ROLE_PRE_DEPLOY: &str = "pre-deploy";
}

/// Names of the Swarm objects berth creates for itself. No berth object may take a name that
/// would become one of them (the API server refuses it): a Volume named like the ingress proxy's
/// state volume would mount the proxy's keys and admin socket into any Service.
pub mod swarm {
    /// Prefix of the backup transfer agents' services and grant secrets (`berth-transfer-<ulid>`).
    pub const TRANSFER_AGENT_PREFIX: &str = "berth-transfer-";
    /// Prefix of the exec agents' services and grant secrets (`berth-exec-<ulid>`): `berth exec`
    /// into a task on a node other than the API server's.
    pub const EXEC_AGENT_PREFIX: &str = "berth-exec-";
    /// Between a Service's name and the rest of its pre-deploy jobs' names
    /// (`<service>_job-<revision>-<step>`). Swarm allows `_` in service names and berth's object
    /// names (DNS labels) never hold one, so no object's name can become a job's.
    pub const JOB_INFIX: &str = "_job-";

    /// Networks every Docker engine defines itself (that are valid object names; the engine's
    /// `docker_gwbridge` is not one); a Network of that name cannot be berth's.
    pub const ENGINE_NETWORKS: [&str; 4] = ["host", "bridge", "none", "ingress"];

    /// Why `name` (of a Service, Volume, Network, Secret or Config, the kinds whose Swarm objects
    /// are named after them) would collide with one of berth's own Swarm objects, given the
    /// ingress proxy's name (`--ingress-name`: its service, and the prefix of its volume,
    /// configs and secrets). `None` when it would not.
    pub fn reserved(name: &str, proxy: &str) -> Option<String> {
        if name == proxy
            || name
                .strip_prefix(proxy)
                .is_some_and(|rest| rest.starts_with('-'))
        {
            return Some(format!(
                "is reserved: `{proxy}` and names starting with `{proxy}-` are the ingress \
                 proxy's service, volume, configs and secrets"
            ));
        }
        if name.starts_with(TRANSFER_AGENT_PREFIX) {
            return Some(format!(
                "is reserved: names starting with `{TRANSFER_AGENT_PREFIX}` are berth's backup \
                 transfer agents"
            ));
        }
        if name.starts_with(EXEC_AGENT_PREFIX) {
            return Some(format!(
                "is reserved: names starting with `{EXEC_AGENT_PREFIX}` are berth's exec agents"
            ));
        }

        None
    }
}

/// Metadata annotation keys set on a Service when a deploy (webhook, registry notification, or
/// `berth rollout undo`) writes its image, so the controller (and `berth rollout history`) can tell
/// which generation came from which trigger.
pub mod annotations {
    /// Every annotation deploys set starts with this.
    pub const DEPLOY_PREFIX: &str = "deploy.berth.io/";
    /// Id of the last deploy event applied (later redeliveries of it, or of older ones, are no-ops).
    pub const DEPLOY_ID: &str = "deploy.berth.io/id";
    /// `webhook`, `signed`, `registry`, `rollback`, `api` or `cli`.
    pub const DEPLOY_SOURCE: &str = "deploy.berth.io/source";
    /// The generation that deploy produced.
    pub const DEPLOY_GENERATION: &str = "deploy.berth.io/generation";
}

/// The dashboard's browser session: which cookie carries the token, and where a page sends the
/// CSRF token that every write made with that cookie needs.
pub mod session {
    /// The cookie that holds the berth token a person signed in with (HttpOnly, Secure,
    /// SameSite=Strict: page scripts cannot read it and other sites' requests do not carry it).
    pub const COOKIE: &str = "berth_session";
    /// The header a page sends its CSRF token in on every write.
    pub const CSRF_HEADER: &str = "x-berth-csrf";
    /// The query parameter that carries it where a browser cannot set a header (a WebSocket).
    pub const CSRF_PARAM: &str = "csrf";
}
