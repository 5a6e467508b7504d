//! Prometheus metrics: one registry per meshgate instance, so in-process tests never share counters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub broker_up: IntGaugeVec,
    pub broker_available: IntGaugeVec,
    pub broker_priority: IntGaugeVec,
    pub broker_current: IntGaugeVec,
    pub sessions_active: IntGaugeVec,
    pub sessions_total: IntCounterVec,
    pub upstream_failures: IntCounterVec,
    pub connect_retries: IntCounter,
    pub failovers: IntCounter,
    pub probe_duration: HistogramVec,
    pub connack_duration: Histogram,
    pub bytes: IntCounterVec,
    pub rejected: IntCounterVec,
    pub sessions_closed: IntCounterVec,
    pub reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub client_sessions: IntGauge,
    pub accepted: IntCounterVec,
    pub listener_connections: IntGaugeVec,
    pub durable_sessions: IntGauge,
    pub durable_sessions_limit: IntGauge,
    pub durable_ops: IntCounterVec,
    pub standby_trimmed: IntCounter,
    pub switches: IntCounterVec,
    pub switch_duration: Histogram,
}

const PROBE_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
const CONNACK_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone())).expect("metric names are unique");
            c
        }
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntGaugeVec::new(Opts::new(name, help), labels).unwrap())
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntCounterVec::new(Opts::new(name, help), labels).unwrap())
        };
        let m = Metrics {
            broker_up: gauge("meshgate_broker_up", "1 when the broker's active probes say it is up", &["broker"]),
            broker_available: gauge(
                "meshgate_broker_available",
                "1 when the broker takes new sessions (enabled, probes up, not barred by passive accounting)",
                &["broker"],
            ),
            broker_priority: gauge(
                "meshgate_broker_priority",
                "The broker's configured priority (tier): the lowest value in the pool is the primary tier",
                &["broker"],
            ),
            broker_current: gauge(
                "meshgate_broker_current",
                "1 for the broker new clients go to now, 0 for the others (every broker 0: none is available)",
                &["broker"],
            ),
            sessions_active: gauge("meshgate_sessions_active", "Proxied sessions open now", &["broker"]),
            sessions_total: counter("meshgate_sessions_total", "Proxied sessions established", &["broker"]),
            upstream_failures: counter(
                "meshgate_upstream_failures_total",
                "Failed attempts to establish a session on a broker, by reason",
                &["broker", "reason"],
            ),
            connect_retries: reg(
                &registry,
                IntCounter::new("meshgate_connect_retries_total", "Client CONNECTs replayed to another broker")
                    .unwrap(),
            ),
            failovers: reg(
                &registry,
                IntCounter::new("meshgate_failovers_total", "Changes of the broker that takes new clients").unwrap(),
            ),
            probe_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new("meshgate_probe_duration_seconds", "Active probe round trips")
                        .buckets(PROBE_BUCKETS.to_vec()),
                    &["broker", "kind"],
                )
                .unwrap(),
            ),
            connack_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("meshgate_connack_duration_seconds", "Client CONNECT received to CONNACK sent")
                        .buckets(CONNACK_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            bytes: counter("meshgate_bytes_total", "Bytes proxied", &["direction"]),
            rejected: counter(
                "meshgate_rejected_connections_total",
                "Client connections closed before a session was established, by reason",
                &["reason"],
            ),
            sessions_closed: counter(
                "meshgate_sessions_closed_total",
                "Sessions closed by meshgate (not by the client or broker), by reason",
                &["reason"],
            ),
            reloads: counter("meshgate_config_reloads_total", "Configuration reloads", &["result"]),
            build_info: gauge(
                "meshgate_build_info",
                "Always 1; the labels say which build runs (commit: the git commit it was built from, \"unknown\" outside a checkout)",
                &["version", "commit"],
            ),
            client_sessions: reg(
                &registry,
                IntGauge::new("meshgate_client_connections", "Client TCP connections open now, established or not")
                    .unwrap(),
            ),
            accepted: counter(
                "meshgate_accepted_connections_total",
                "Client connections accepted, by listener (mqtt, mqtts, ws, wss), before admission and any handshake",
                &["listener"],
            ),
            listener_connections: gauge(
                "meshgate_listener_connections",
                "Client connections open now, by listener (mqtt, mqtts, ws, wss): past the TLS handshake and WebSocket upgrade, established or not",
                &["listener"],
            ),
            durable_sessions: reg(
                &registry,
                IntGauge::new("meshgate_persistent_sessions", "Persistent sessions recorded (with their subscriptions)")
                    .unwrap(),
            ),
            durable_sessions_limit: reg(
                &registry,
                IntGauge::new(
                    "meshgate_persistent_sessions_limit",
                    "Persistent sessions recorded at most ([sessions] max_sessions; 0 when [sessions] is off): beyond it the session seen longest ago is forgotten",
                )
                .unwrap(),
            ),
            durable_ops: counter(
                "meshgate_session_operations_total",
                "Work on persistent sessions: restore (subscriptions put back before the CONNACK), migrate (session recreated on the broker that takes over), standby (offline copy made), wipe (outdated copy ended), by result",
                &["op", "result"],
            ),
            standby_trimmed: reg(
                &registry,
                IntCounter::new(
                    "meshgate_standby_messages_trimmed_total",
                    "Messages a standby copy had queued and meshgate acknowledged while the client was connected elsewhere",
                )
                .unwrap(),
            ),
            switches: counter(
                "meshgate_session_switches_total",
                "Sessions moved to another broker under the client's open connection, by why they moved (failback, drain, broker_disabled, broker_removed, broker_down) and result (ok, or why it could not switch)",
                &["reason", "result"],
            ),
            switch_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "meshgate_session_switch_duration_seconds",
                        "From a move's start to forwarding on the new broker",
                    )
                    .buckets(CONNACK_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            registry,
        };
        m.build_info.with_label_values(&[crate::VERSION, crate::COMMIT]).set(1);
        // CPU, memory, file descriptors and start time of this process, read from /proc by the
        // prometheus crate at each scrape.
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process metrics registered once");
        for d in ["client_to_broker", "broker_to_client"] {
            m.bytes.with_label_values(&[d]);
        }
        m
    }

    /// Creates the series of labelled counters for label values known now (brokers, reasons,
    /// results), at zero, so that `increase()` and alerts see the first event: a series born
    /// with its first increment has no earlier sample to rise from.
    pub fn init<'a>(&self, family: &IntCounterVec, labels: impl IntoIterator<Item = &'a [&'a str]>) {
        for l in labels {
            family.with_label_values(l);
        }
    }

    /// The text exposition format, for `GET /metrics`.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
