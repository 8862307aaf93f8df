//! Every Prometheus metric berth exports, declared once: names, help texts, label sets, buckets.
//! The controller runtime, the bus, the store and the API record into [`global`]; the API server
//! renders it at `/metrics` (Prometheus text format 0.0.4).
//!
//! Labels are only ever a kind, an outcome or a bus stream: never an object's name, a token or a
//! value. Object names can be sensitive (a health-data installation's service names say what runs)
//! and every distinct label value is a new series kept for as long as the process lives.

use berth_api_types::Kind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::time::Duration;

/// The labels of a metric per kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The labels of a metric per kind and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindOutcomeLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

/// The labels of a metric per outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The labels of a publish on NATS: which stream and whether the server acknowledged it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub stream: &'static str,
    pub outcome: &'static str,
}

/// How one reconcile ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconcileOutcome {
    /// Converged; looked at again on the next change or resync.
    Ok,
    /// Converging: asked to look again after a while, or (status written) with backoff.
    Requeue,
    /// Failed (the API, the engine, a registry...): retried with backoff.
    Error,
    /// The object cannot be acted on as it is (`Ready=False`, waits for a change).
    Invalid,
}

impl ReconcileOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileOutcome::Ok => "ok",
            ReconcileOutcome::Requeue => "requeue",
            ReconcileOutcome::Error => "error",
            ReconcileOutcome::Invalid => "invalid",
        }
    }
}

/// The outcome label of an API or webhook answer, from its status code.
pub fn outcome_of_status(code: u16) -> &'static str {
    match code {
        200..=299 => "ok",
        400 | 413 | 422 => "invalid",
        401 | 403 => "unauthorized",
        404 => "not_found",
        409 => "conflict",
        429 => "rate_limited",
        400..=499 => "refused",
        _ => "error",
    }
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Reconciles take from a millisecond (nothing to do) to minutes (an image pull).
fn reconcile_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

/// A write is a transaction and a flush to disk (or a NATS round trip): 0.5 ms to 10 s.
fn write_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 3.0, 10))
}

/// The metrics of one process (see [`global`]); a value of its own in unit tests.
pub struct Metrics {
    /// Reconciles finished, per kind and [`ReconcileOutcome`].
    pub reconciles: Family<KindOutcomeLabels, Counter>,
    /// How long reconciles took, per kind.
    pub reconcile_duration: Histograms<KindLabels>,
    /// Keys waiting for a worker, per kind (not those waiting out a delay or backoff).
    pub queue_depth: Family<KindLabels, Gauge>,
    /// Keys put back with backoff (after an error, or at a reconcile's request), per kind.
    pub backoff_retries: Family<KindLabels, Counter>,
    /// Reconciles that failed on a Swarm engine error, per kind. There is no single place every
    /// engine call passes through (controllers hold bollard's client), so engine failures are
    /// counted where they end a reconcile.
    pub engine_errors: Family<KindLabels, Counter>,
    /// Messages published on NATS JetStream, per stream and outcome (`ok`: acknowledged).
    pub nats_published: Family<PublishLabels, Counter>,
    /// Deploy webhook calls, per outcome (see [`outcome_of_status`]).
    pub webhook_requests: Family<OutcomeLabels, Counter>,
    /// How long the API's writes (apply, create, replace) took in the store, validation and
    /// durable commit included, per outcome. Dry runs are not counted.
    pub apply_duration: Histograms<OutcomeLabels>,
    /// Objects stored, per kind (measured when scraped).
    pub objects: Family<KindLabels, Gauge>,
    /// Objects whose `Ready` condition is `True`, per kind (measured when scraped).
    pub objects_ready: Family<KindLabels, Gauge>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_buckets),
            queue_depth: Family::default(),
            backoff_retries: Family::default(),
            engine_errors: Family::default(),
            nats_published: Family::default(),
            webhook_requests: Family::default(),
            apply_duration: Family::new_with_constructor(write_buckets),
            objects: Family::default(),
            objects_ready: Family::default(),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        // Counters get `_total` appended by the encoder.
        registry.register(
            "berth_reconciles",
            "Reconciles finished, by kind and outcome (ok, requeue, error, invalid)",
            m.reconciles.clone(),
        );
        registry.register(
            "berth_reconcile_duration_seconds",
            "How long reconciles took, by kind",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "berth_queue_depth",
            "Keys waiting for a reconcile worker, by kind",
            m.queue_depth.clone(),
        );
        registry.register(
            "berth_backoff_retries",
            "Keys retried with backoff after an error or at a reconcile's request, by kind",
            m.backoff_retries.clone(),
        );
        registry.register(
            "berth_engine_errors",
            "Reconciles that failed on a Swarm engine error, by kind",
            m.engine_errors.clone(),
        );
        registry.register(
            "berth_nats_published",
            "Messages published on NATS JetStream, by stream (events, audit, deploys) and outcome",
            m.nats_published.clone(),
        );
        registry.register(
            "berth_webhook_requests",
            "Deploy webhook calls, by outcome",
            m.webhook_requests.clone(),
        );
        registry.register(
            "berth_apply_duration_seconds",
            "How long API writes (apply, create, replace) took to validate and commit, by outcome",
            m.apply_duration.clone(),
        );
        registry.register(
            "berth_objects",
            "Objects stored, by kind",
            m.objects.clone(),
        );
        registry.register(
            "berth_objects_ready",
            "Objects whose Ready condition is True, by kind",
            m.objects_ready.clone(),
        );
        Metrics { registry, ..m }
    }

    /// One reconcile of `kind` that took `took` and ended with `outcome`.
    pub fn reconciled(&self, kind: Kind, outcome: ReconcileOutcome, took: Duration) {
        let k = kind.lower();
        self.reconciles
            .get_or_create(&KindOutcomeLabels {
                kind: k,
                outcome: outcome.as_str(),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&KindLabels { kind: k })
            .observe(took.as_secs_f64());
    }

    /// The depth gauge of `kind`'s queue (a handle the queue keeps and sets).
    pub fn queue_depth_of(&self, kind: Kind) -> Gauge {
        self.queue_depth
            .get_or_create_owned(&KindLabels { kind: kind.lower() })
    }

    pub fn backed_off(&self, kind: Kind) {
        self.backoff_retries
            .get_or_create(&KindLabels { kind: kind.lower() })
            .inc();
    }

    pub fn engine_error(&self, kind: Kind) {
        self.engine_errors
            .get_or_create(&KindLabels { kind: kind.lower() })
            .inc();
    }

    /// One publish on `stream`; `ok`: the server acknowledged it.
    pub fn published(&self, stream: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.nats_published
            .get_or_create(&PublishLabels { stream, outcome })
            .inc();
    }

    /// One webhook call answered with `status`.
    pub fn webhook_answered(&self, status: u16) {
        self.webhook_requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome_of_status(status),
            })
            .inc();
    }

    /// One API write that took `took` and ended with `status` (the code the API answers).
    pub fn applied(&self, status: u16, took: Duration) {
        self.apply_duration
            .get_or_create(&OutcomeLabels {
                outcome: outcome_of_status(status),
            })
            .observe(took.as_secs_f64());
    }

    /// What the store holds of `kind` now.
    pub fn set_objects(&self, kind: Kind, total: usize, ready: usize) {
        let labels = KindLabels { kind: kind.lower() };
        self.objects.get_or_create(&labels).set(total as i64);
        self.objects_ready.get_or_create(&labels).set(ready as i64);
    }

    /// Every metric in the Prometheus text format (version 0.0.4, [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The media type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics: what `/metrics` shows.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `series` (name and labels exactly as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn reconciles_render_per_kind_and_outcome_with_a_duration_histogram() {
        let m = Metrics::new();
        m.reconciled(
            Kind::Service,
            ReconcileOutcome::Ok,
            Duration::from_millis(3),
        );
        m.reconciled(
            Kind::Service,
            ReconcileOutcome::Ok,
            Duration::from_millis(30),
        );
        m.reconciled(
            Kind::Service,
            ReconcileOutcome::Invalid,
            Duration::from_millis(1),
        );
        m.reconciled(
            Kind::Network,
            ReconcileOutcome::Error,
            Duration::from_secs(2),
        );
        let text = m.render();
        assert!(
            text.contains("# TYPE berth_reconciles_total counter")
                && text.contains("# TYPE berth_reconcile_duration_seconds histogram"),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"berth_reconciles_total{kind="service",outcome="ok"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"berth_reconciles_total{kind="service",outcome="invalid"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"berth_reconciles_total{kind="network",outcome="error"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"berth_reconcile_duration_seconds_count{kind="service"}"#
            ),
            Some(3.0)
        );
        // 3 ms and 1 ms fall under the 4 ms bucket; 30 ms does not.
        assert_eq!(
            sample(
                &text,
                r#"berth_reconcile_duration_seconds_bucket{kind="service",le="0.004"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"berth_reconcile_duration_seconds_bucket{kind="service",le="+Inf"}"#
            ),
            Some(3.0)
        );
    }

    #[test]
    fn gauges_counters_and_outcomes_render_with_their_labels() {
        let m = Metrics::new();
        m.queue_depth_of(Kind::Ingress).set(4);
        m.backed_off(Kind::Registry);
        m.backed_off(Kind::Registry);
        m.engine_error(Kind::Service);
        m.published("events", true);
        m.published("deploys", false);
        m.webhook_answered(202);
        m.webhook_answered(401);
        m.webhook_answered(429);
        m.applied(200, Duration::from_millis(2));
        m.applied(422, Duration::from_millis(1));
        m.set_objects(Kind::Service, 3, 2);
        m.reconciled(Kind::Node, ReconcileOutcome::Requeue, Duration::ZERO);
        let text = m.render();
        for (series, value) in [
            (r#"berth_queue_depth{kind="ingress"}"#, 4.0),
            (r#"berth_backoff_retries_total{kind="registry"}"#, 2.0),
            (r#"berth_engine_errors_total{kind="service"}"#, 1.0),
            (
                r#"berth_nats_published_total{stream="events",outcome="ok"}"#,
                1.0,
            ),
            (
                r#"berth_nats_published_total{stream="deploys",outcome="error"}"#,
                1.0,
            ),
            (r#"berth_webhook_requests_total{outcome="ok"}"#, 1.0),
            (
                r#"berth_webhook_requests_total{outcome="unauthorized"}"#,
                1.0,
            ),
            (
                r#"berth_webhook_requests_total{outcome="rate_limited"}"#,
                1.0,
            ),
            (r#"berth_apply_duration_seconds_count{outcome="ok"}"#, 1.0),
            (
                r#"berth_apply_duration_seconds_count{outcome="invalid"}"#,
                1.0,
            ),
            (r#"berth_objects{kind="service"}"#, 3.0),
            (r#"berth_objects_ready{kind="service"}"#, 2.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        // Every metric is registered with its help (a family shows once it has a sample).
        for name in [
            "berth_reconciles",
            "berth_reconcile_duration_seconds",
            "berth_queue_depth",
            "berth_backoff_retries",
            "berth_engine_errors",
            "berth_nats_published",
            "berth_webhook_requests",
            "berth_apply_duration_seconds",
            "berth_objects",
            "berth_objects_ready",
        ] {
            assert!(text.contains(&format!("# HELP {name}")), "{name}: {text}");
        }
    }

    #[test]
    fn status_codes_map_to_few_outcomes() {
        assert_eq!(outcome_of_status(202), "ok");
        assert_eq!(outcome_of_status(422), "invalid");
        assert_eq!(outcome_of_status(409), "conflict");
        assert_eq!(outcome_of_status(418), "refused");
        assert_eq!(outcome_of_status(503), "error");
    }
}
