//! `GET /metrics`: the broker's state in Prometheus' text format
//! (OpenMetrics), encoded with `prometheus-client`.
//!
//! Counters and latency histograms live here for the broker's lifetime;
//! what is state rather than history (sandboxes by state, the audit
//! queue, each sandbox's resource use) is read at scrape time into a
//! registry of its own.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How an operation ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// One sandbox's series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SandboxLabels {
    /// Its id.
    pub sandbox: String,
    /// Its agent.
    pub agent: String,
}

/// Sandboxes in one state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// As `GET /v1/sandboxes` shows it.
    pub state: String,
}

/// Seconds, from 1 ms to about 33 s.
fn latency() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

/// The broker's counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    creates: Family<Outcome, Counter>,
    create_seconds: Histogram,
    execs: Family<Outcome, Counter>,
    exec_seconds: Histogram,
    pool_hits: Counter,
    pool_misses: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("airlock");
        let creates = Family::<Outcome, Counter>::default();
        let create_seconds = latency();
        let execs = Family::<Outcome, Counter>::default();
        let exec_seconds = latency();
        let pool_hits = Counter::default();
        let pool_misses = Counter::default();
        registry.register("creates", "Sandbox creates, by result", creates.clone());
        registry.register(
            "create_seconds",
            "Time to create a sandbox (ready to run), seconds",
            create_seconds.clone(),
        );
        registry.register("execs", "Commands run, by result", execs.clone());
        registry.register(
            "exec_seconds",
            "Time from a command's start to its exit, seconds",
            exec_seconds.clone(),
        );
        registry.register(
            "pool_hits",
            "Creates served by a pre-started sandbox",
            pool_hits.clone(),
        );
        registry.register(
            "pool_misses",
            "Creates that found no pre-started sandbox of their shape",
            pool_misses.clone(),
        );
        Metrics {
            registry,
            creates,
            create_seconds,
            execs,
            exec_seconds,
            pool_hits,
            pool_misses,
        }
    }
}

fn outcome(ok: bool) -> Outcome {
    Outcome {
        result: if ok { "ok" } else { "error" },
    }
}

impl Metrics {
    /// A create ended after `secs`.
    pub fn create_done(&self, ok: bool, secs: f64) {
        self.creates.get_or_create(&outcome(ok)).inc();
        if ok {
            self.create_seconds.observe(secs);
        }
    }

    /// A command ended after `secs` (`ok`: it ran and exited, whatever its
    /// status).
    pub fn exec_done(&self, ok: bool, secs: f64) {
        self.execs.get_or_create(&outcome(ok)).inc();
        self.exec_seconds.observe(secs);
    }

    /// A create was (`hit`) or was not served from the pool.
    pub fn pool(&self, hit: bool) {
        if hit {
            self.pool_hits.inc();
        } else {
            self.pool_misses.inc();
        }
    }

    /// The text of a scrape: these metrics, then `state`'s.
    pub fn encode(&self, state: &Registry) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, state);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// What one sandbox uses, for [`state_registry`].
#[derive(Debug, Clone)]
pub struct SandboxUse {
    /// Its series' labels.
    pub labels: SandboxLabels,
    /// Cgroup readings.
    pub usage: airlock_shim::cgroup::ResourceUse,
    /// OOM kills so far.
    pub oom_kills: u64,
    /// Bytes its layers hold.
    pub disk_bytes: u64,
}

/// The state part of a scrape.
#[must_use]
pub fn state_registry(
    states: &[(String, i64)],
    audit_queued: u64,
    audit_dropped: u64,
    sandboxes: &[SandboxUse],
) -> Registry {
    let mut r = Registry::with_prefix("airlock");
    let by_state = Family::<StateLabels, Gauge>::default();
    for (state, n) in states {
        by_state
            .get_or_create(&StateLabels {
                state: state.clone(),
            })
            .set(*n);
    }
    r.register("sandboxes", "Sandboxes, by state", by_state);
    let queued = Gauge::<i64>::default();
    queued.set(i64::try_from(audit_queued).unwrap_or(i64::MAX));
    r.register(
        "audit_queue_depth",
        "Audit records waiting to be written",
        queued,
    );
    let dropped = Counter::<u64>::default();
    dropped.inc_by(audit_dropped);
    r.register(
        "audit_dropped",
        "Audit records never stored (queue full or write failed)",
        dropped,
    );
    let memory = Family::<SandboxLabels, Gauge>::default();
    let pids = Family::<SandboxLabels, Gauge>::default();
    let cpu = Family::<SandboxLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    let ooms = Family::<SandboxLabels, Counter>::default();
    let disk = Family::<SandboxLabels, Gauge>::default();
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for s in sandboxes {
        memory
            .get_or_create(&s.labels)
            .set(clamp(s.usage.memory_bytes));
        pids.get_or_create(&s.labels).set(clamp(s.usage.pids));
        if let Some(usec) = s.usage.cpu_usec {
            #[allow(clippy::cast_precision_loss)]
            cpu.get_or_create(&s.labels).inc_by(usec as f64 / 1e6);
        }
        ooms.get_or_create(&s.labels).inc_by(s.oom_kills);
        disk.get_or_create(&s.labels).set(clamp(s.disk_bytes));
    }
    r.register(
        "sandbox_memory_bytes",
        "Memory charged to a sandbox's cgroup",
        memory,
    );
    r.register("sandbox_pids", "Tasks in a sandbox's cgroup", pids);
    r.register(
        "sandbox_cpu_seconds",
        "CPU time a sandbox used (absent where its cgroup has no CPU accounting)",
        cpu,
    );
    r.register("sandbox_oom_kills", "OOM kills in a sandbox", ooms);
    r.register(
        "sandbox_disk_bytes",
        "Bytes a sandbox's copy-on-write layer and workspace hold",
        disk,
    );
    r
}
