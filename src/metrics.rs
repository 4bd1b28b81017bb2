//! Every metric ztail exports, defined in one place, and their Prometheus text rendering.
//!
//! Components get an `Arc<Metrics>` and call the narrow recording methods below; nothing else
//! touches the registry. Metric names are part of the operator contract: change them only with a
//! note in the README.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label value, escaped as the Prometheus text format requires (`\\`, `"` and line feeds;
/// prometheus-client writes values as they are). Some values are chosen by others: a file's
/// name by whoever can create files in a watched directory. Unescaped, a name such as
/// `x"} 1⏎ztail_fake_total 0⏎#.log` would end the series and print one of its own, forging or
/// hiding ztail's alerts.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LabelValue(pub String);

impl From<&str> for LabelValue {
    fn from(s: &str) -> Self {
        LabelValue(s.to_owned())
    }
}

impl From<String> for LabelValue {
    fn from(s: String) -> Self {
        LabelValue(s)
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        let mut rest = self.0.as_str();
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabel {
    pub probe: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeKindLabel {
    pub probe: LabelValue,
    pub kind: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceReasonLabel {
    pub source: LabelValue,
    pub reason: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceRuleLabel {
    pub source: LabelValue,
    pub rule: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: LabelValue,
}

/// All of ztail's metrics.
pub struct Metrics {
    registry: Registry,
    pub lines_read: Counter,
    pub bytes_read: Counter,
    pub lines_truncated: Counter,
    pub lines_unparsed: Counter,
    pub timestamp_fallbacks: Counter,
    pub timestamps_clamped: Counter,
    pub file_truncations: Counter,
    pub rotated_files_found: Counter,
    pub files_skipped: Family<ReasonLabel, Counter>,
    pub stage_dropped: Family<SourceReasonLabel, Counter>,
    pub redactions: Family<SourceRuleLabel, Counter>,
    pub label_overflows: Family<SourceLabel, Counter>,
    pub stage_holds: Counter,
    pub journal_entries_lost: Family<SourceLabel, Counter>,
    pub journal_file_errors: Family<SourceLabel, Counter>,
    pub kubernetes_pods: Gauge,
    pub kubernetes_api_up: Gauge,
    pub kubernetes_watch_errors: Family<KindLabel, Counter>,
    pub kubernetes_metadata_missing: Counter,
    pub entries_sent: Counter,
    pub bytes_sent: Counter,
    pub sink_entries_sent: Family<SinkLabel, Counter>,
    pub sink_lag_bytes: Family<SinkLabel, Gauge>,
    pub sink_failing: Family<SinkLabel, Gauge>,
    pub sink_lost_bytes: Family<SinkLabel, Counter>,
    pub push_requests: Family<StatusLabel, Counter>,
    pub push_retries: Counter,
    pub dropped_entries: Family<ReasonLabel, Counter>,
    pub checkpoint_lag_bytes: Family<PathLabel, Gauge>,
    pub files_open: Gauge,
    pub deleted_files_open: Gauge,
    pub peer_refusals: Family<ReasonLabel, Counter>,
    pub identity_not_after: Gauge,
    pub identity_reloads: Counter,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub identity_reload_errors: Counter,
    pub checkpoint_write_errors: Counter,
    pub in_flight_requests: Gauge,
    pub workload_api_errors: Family<KindLabel, Counter>,
    pub probe_up: Family<ProbeLabel, Gauge>,
    pub probe_latency: Family<ProbeLabel, Histogram>,
    pub probe_attempts: Family<ProbeLabel, Counter>,
    pub probe_failures: Family<ProbeKindLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ztail");
        let m = Metrics {
            lines_read: Counter::default(),
            bytes_read: Counter::default(),
            lines_truncated: Counter::default(),
            lines_unparsed: Counter::default(),
            timestamp_fallbacks: Counter::default(),
            timestamps_clamped: Counter::default(),
            file_truncations: Counter::default(),
            rotated_files_found: Counter::default(),
            files_skipped: Family::default(),
            stage_dropped: Family::default(),
            redactions: Family::default(),
            label_overflows: Family::default(),
            stage_holds: Counter::default(),
            journal_entries_lost: Family::default(),
            journal_file_errors: Family::default(),
            kubernetes_pods: Gauge::default(),
            kubernetes_api_up: Gauge::default(),
            kubernetes_watch_errors: Family::default(),
            kubernetes_metadata_missing: Counter::default(),
            entries_sent: Counter::default(),
            bytes_sent: Counter::default(),
            sink_entries_sent: Family::default(),
            sink_lag_bytes: Family::default(),
            sink_failing: Family::default(),
            sink_lost_bytes: Family::default(),
            push_requests: Family::default(),
            push_retries: Counter::default(),
            dropped_entries: Family::default(),
            checkpoint_lag_bytes: Family::default(),
            files_open: Gauge::default(),
            deleted_files_open: Gauge::default(),
            peer_refusals: Family::default(),
            identity_not_after: Gauge::default(),
            identity_reloads: Counter::default(),
            config_reloads: Family::default(),
            identity_reload_errors: Counter::default(),
            checkpoint_write_errors: Counter::default(),
            in_flight_requests: Gauge::default(),
            workload_api_errors: Family::default(),
            probe_up: Family::default(),
            probe_latency: Family::new_with_constructor(|| {
                // 0.5 ms to about 16 s.
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            probe_attempts: Family::default(),
            probe_failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register("lines_read", "Lines read from files", m.lines_read.clone());
        registry.register("bytes_read", "Bytes read from files", m.bytes_read.clone());
        registry.register(
            "lines_truncated",
            "Lines longer than max_line_bytes, truncated",
            m.lines_truncated.clone(),
        );
        registry.register(
            "lines_unparsed",
            "Lines that did not parse as their source's format (cri, docker) and were shipped as raw lines",
            m.lines_unparsed.clone(),
        );
        registry.register(
            "timestamp_fallbacks",
            "Entries whose timestamp could not be extracted and that got the read time",
            m.timestamp_fallbacks.clone(),
        );
        registry.register(
            "timestamps_clamped",
            "Entry timestamps further in the future than max_future, replaced by the read time",
            m.timestamps_clamped.clone(),
        );
        registry.register(
            "file_truncations",
            "Files found truncated (copytruncate) and re-read from offset 0",
            m.file_truncations.clone(),
        );
        registry.register(
            "rotated_files_found",
            "Files rotated away from their path (also outside the globs) before they were drained, found again at start by inode and fingerprint and drained",
            m.rotated_files_found.clone(),
        );
        registry.register(
            "files_skipped",
            "Paths matching a glob that are not read, by reason (each counted once)",
            m.files_skipped.clone(),
        );
        registry.register(
            "stage_dropped",
            "Entries a stage dropped on purpose (their positions are acknowledged like shipped ones), by source and reason",
            m.stage_dropped.clone(),
        );
        registry.register(
            "redactions",
            "Secrets replaced by a redaction rule, by source and rule",
            m.redactions.clone(),
        );
        registry.register(
            "label_overflows",
            "Entries whose stage label value was beyond the label's max_values (kept as metadata or the overflow value), by source",
            m.label_overflows.clone(),
        );
        registry.register(
            "journal_entries_lost",
            "Journal entries removed (vacuumed, or their file damaged) before ztail read them, by source",
            m.journal_entries_lost.clone(),
        );
        registry.register(
            "journal_file_errors",
            "Journal files ztail stopped reading because they were damaged, vacuumed or unsupported, by source",
            m.journal_file_errors.clone(),
        );
        registry.register(
            "stage_holds",
            "Times a limit stage held a file back (it stopped reading until its stream was under the rate)",
            m.stage_holds.clone(),
        );
        registry.register(
            "kubernetes_pods",
            "Pods of this node in the Kubernetes metadata cache (deleted ones kept while their files drain included)",
            m.kubernetes_pods.clone(),
        );
        registry.register(
            "kubernetes_api_up",
            "1 while the Kubernetes API server's watches are connected",
            m.kubernetes_api_up.clone(),
        );
        registry.register(
            "kubernetes_watch_errors",
            "Failed Kubernetes lists and watches, by kind (pods, namespaces, client); each is retried with backoff",
            m.kubernetes_watch_errors.clone(),
        );
        registry.register(
            "kubernetes_metadata_missing",
            "Files whose pod was not known within kubernetes.wait: they shipped with their path's labels until it was",
            m.kubernetes_metadata_missing.clone(),
        );
        registry.register(
            "entries_sent",
            "Entries acknowledged by Loki",
            m.entries_sent.clone(),
        );
        registry.register(
            "sink_entries_sent",
            "Entries acknowledged, by sink (each sink ships its sources' entries once)",
            m.sink_entries_sent.clone(),
        );
        registry.register(
            "sink_lag_bytes",
            "Bytes of the tracked files a sink has not acknowledged yet",
            m.sink_lag_bytes.clone(),
        );
        registry.register(
            "sink_failing",
            "1 while a sink's last push attempt failed",
            m.sink_failing.clone(),
        );
        registry.register(
            "sink_lost_bytes",
            "Bytes of rotated or deleted files a sink gave up after tail.max_rotated_hold",
            m.sink_lost_bytes.clone(),
        );
        registry.register(
            "bytes_sent",
            "Request body bytes acknowledged by Loki",
            m.bytes_sent.clone(),
        );
        registry.register(
            "push_requests",
            "Push requests by HTTP status or transport error kind",
            m.push_requests.clone(),
        );
        registry.register(
            "push_retries",
            "Push requests retried",
            m.push_retries.clone(),
        );
        registry.register(
            "dropped_entries",
            "Entries Loki refused for good (400) or that could never be sent, by reason",
            m.dropped_entries.clone(),
        );
        registry.register(
            "checkpoint_lag_bytes",
            "Bytes of a file not yet acknowledged by Loki",
            m.checkpoint_lag_bytes.clone(),
        );
        registry.register(
            "files_open",
            "Files held open for reading",
            m.files_open.clone(),
        );
        registry.register(
            "deleted_files_open",
            "Deleted files still held open to drain them",
            m.deleted_files_open.clone(),
        );
        registry.register(
            "peer_refusals",
            "TLS peers refused during the handshake, by reason",
            m.peer_refusals.clone(),
        );
        registry.register(
            "identity_not_after_seconds",
            "Unix time at which the current SVID expires",
            m.identity_not_after.clone(),
        );
        registry.register(
            "identity_reloads",
            "Identity material loaded and published",
            m.identity_reloads.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads asked for (SIGHUP, POST /-/reload), by result: ok, or invalid (the running config stayed)",
            m.config_reloads.clone(),
        );
        registry.register(
            "identity_reload_errors",
            "Identity updates rejected (the previous material was kept)",
            m.identity_reload_errors.clone(),
        );
        registry.register(
            "checkpoint_write_errors",
            "Failed checkpoint writes",
            m.checkpoint_write_errors.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Push requests currently in flight",
            m.in_flight_requests.clone(),
        );
        registry.register(
            "workload_api_errors",
            "SPIFFE Workload API errors and reconnects, by kind",
            m.workload_api_errors.clone(),
        );
        registry.register(
            "probe_up",
            "1 if the probe's last run succeeded",
            m.probe_up.clone(),
        );
        registry.register(
            "probe_latency_seconds",
            "Latency of the successful or last attempt of each probe run",
            m.probe_latency.clone(),
        );
        registry.register("probe_attempts", "Probe attempts", m.probe_attempts.clone());
        registry.register(
            "probe_failures",
            "Failed probe runs by error kind",
            m.probe_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A TLS peer failed verification or the SPIFFE ID policy.
    pub fn peer_refused(&self, reason: &str) {
        self.peer_refusals
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// A probe run finished.
    pub fn probe_finished(
        &self,
        probe: &str,
        ok: bool,
        attempts: u32,
        latency_secs: f64,
        error: Option<&str>,
    ) {
        let label = ProbeLabel {
            probe: probe.into(),
        };
        self.probe_up.get_or_create(&label).set(ok as i64);
        self.probe_latency
            .get_or_create(&label)
            .observe(latency_secs);
        self.probe_attempts
            .get_or_create(&label)
            .inc_by(attempts as u64);
        if let Some(kind) = error {
            self.probe_failures
                .get_or_create(&ProbeKindLabel {
                    probe: probe.into(),
                    kind: kind.into(),
                })
                .inc();
        }
    }

    /// A Workload API error or reconnect of this kind.
    pub fn workload_api_error(&self, kind: &str) {
        self.workload_api_errors
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// What framing noticed in one read.
    pub fn record_framing(&self, stats: &crate::tail::format::FrameStats) {
        if stats.unparsed > 0 {
            self.lines_unparsed.inc_by(stats.unparsed);
        }
        if stats.ts_fallbacks > 0 {
            self.timestamp_fallbacks.inc_by(stats.ts_fallbacks);
        }
        if stats.ts_clamped > 0 {
            self.timestamps_clamped.inc_by(stats.ts_clamped);
        }
    }

    /// The counter of entries a stage of `source` drops for `reason`.
    pub fn stage_dropped(&self, source: &str, reason: &str) -> Counter {
        self.stage_dropped
            .get_or_create(&SourceReasonLabel {
                source: source.into(),
                reason: reason.into(),
            })
            .clone()
    }

    /// The counter of secrets `rule` replaced in entries of `source`.
    pub fn redaction(&self, source: &str, rule: &str) -> Counter {
        self.redactions
            .get_or_create(&SourceRuleLabel {
                source: source.into(),
                rule: rule.into(),
            })
            .clone()
    }

    /// The counter of stage label values of `source` beyond their `max_values`.
    pub fn label_overflow(&self, source: &str) -> Counter {
        self.label_overflows
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .clone()
    }

    /// The gauge of the bytes sink `sink` has not acknowledged yet.
    pub fn sink_lag(&self, sink: &str) -> Gauge {
        of_sink(&self.sink_lag_bytes, sink)
    }

    /// Removes the sinks' gauges before a plane's sinks are made, so that a sink removed by a
    /// reload leaves none behind; the counters stay, as counters do.
    pub fn forget_sink_gauges(&self) {
        self.sink_lag_bytes.clear();
        self.sink_failing.clear();
    }

    /// The counter of bytes sink `sink` gave up with rotated files.
    pub fn sink_lost(&self, sink: &str) -> Counter {
        of_sink(&self.sink_lost_bytes, sink)
    }

    /// The counter of entries sink `sink` delivered.
    pub fn sink_sent(&self, sink: &str) -> Counter {
        of_sink(&self.sink_entries_sent, sink)
    }

    /// The gauge that is 1 while sink `sink` is failing.
    pub fn sink_failing(&self, sink: &str) -> Gauge {
        of_sink(&self.sink_failing, sink)
    }

    /// Entries that will never reach Loki, by reason.
    pub fn dropped(&self, reason: &str, entries: u64) {
        self.dropped_entries
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc_by(entries);
    }

    /// A push request finished with this status (`"204"`, `"429"`, `"transport"` ...).
    pub fn push_finished(&self, status: &str) {
        self.push_requests
            .get_or_create(&StatusLabel {
                status: status.into(),
            })
            .inc();
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The metric of sink `sink` in `family` (a handle to it: counters and gauges share their value).
fn of_sink<M: Clone + Default>(family: &Family<SinkLabel, M>, sink: &str) -> M {
    family
        .get_or_create(&SinkLabel { sink: sink.into() })
        .clone()
}
