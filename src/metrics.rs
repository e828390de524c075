//! Metrics: per-export atomic counters (the firecracker `metrics.rs` shape), a process-wide
//! hook for key-provider (KMS) calls, and their encoding in the Prometheus text exposition
//! format (version 0.0.4) for the HTTP endpoint in [`crate::metrics_http`].
//!
//! Counters are plain relaxed atomics updated on the request path where the reply status is
//! decided ([`ExportMetrics::request_done`]); encoding reads them without stopping anyone, so a
//! scrape sees each counter exactly but not all counters at one instant (as with any
//! Prometheus client). The text is hand-written rather than built with `prometheus-client`: the
//! format is small and stable, the atomics already exist, and a registry would duplicate them.
//!
//! Per-request failures are counted here and logged at `debug`; those that are the server's
//! fault (I/O errors, a full raw volume) are also logged at `warn`, at most
//! [`WARN_BURST`] lines per [`WARN_WINDOW`] per export, then one "suppressed K" line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::errno;
use crate::rate_limit::RateLimit;

/// What a request asked for, as counted: the NBD commands that move or describe data, and
/// `Other` for the rest (the protocol layer maps its commands onto these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    Other,
}

impl Op {
    /// The label value, and the position in [`COMMANDS`].
    fn index(self) -> usize {
        self as usize
    }
}

/// Label values of [`Op`], in its order.
pub const COMMANDS: [&str; 7] = ["read", "write", "flush", "trim", "write_zeroes", "cache", "other"];

/// What a quiet connection's busy poll came to (see `nbd::transmission::poll`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    /// A request came within the window.
    Hit,
    /// The window ended without one: the connection backs off.
    Miss,
    /// Backing off: the connection slept at once.
    Skipped,
}

/// Label values of [`PollOutcome`], in its order.
pub const POLL_OUTCOMES: [&str; 3] = ["hit", "miss", "skipped"];

/// Latency histogram bucket upper bounds, in microseconds (50 µs to 10 s).
pub const BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// Warn lines per window and export for server-side request failures.
pub const WARN_BURST: u32 = 10;
/// The rate-limit window.
pub const WARN_WINDOW: Duration = Duration::from_secs(60);

/// A latency histogram: per-bucket (non-cumulative) counts, a count and a sum.
#[derive(Debug, Default)]
pub struct Histogram {
    /// `buckets[i]` counts observations in `(BUCKETS_US[i-1], BUCKETS_US[i]]`; the last slot
    /// counts those above every bound (+Inf).
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn encode(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0u64;
        for (i, bound) in BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cum}");
        }
        cum += self.buckets[BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
        // Count from the buckets, so the +Inf bucket and the count agree in one scrape.
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cum}");
    }
}

/// Counters of one export. Lives in the [`crate::export::Export`].
#[derive(Debug, Default)]
pub struct ExportMetrics {
    requests: [AtomicU64; COMMANDS.len()],
    bytes: [AtomicU64; COMMANDS.len()],
    latency: [Histogram; COMMANDS.len()],
    errors: [AtomicU64; errno::ALL.len() + 1],
    in_flight: AtomicI64,
    connections: AtomicI64,
    connections_total: AtomicU64,
    /// Writes the raw volume held up (see `export::backpressure`).
    slow_writes: AtomicU64,
    /// Quiet periods of connections, by [`PollOutcome`].
    busy_polls: [AtomicU64; POLL_OUTCOMES.len()],
    /// Unix seconds of the last unlock (open or resume); 0 while suspended.
    unlocked_at: AtomicU64,
    warn_limit: WarnLimit,
    /// Connected clients (for `nbdcrypt status`), by connection id. Touched only at connect
    /// and disconnect.
    clients: Mutex<BTreeMap<u64, ClientInfo>>,
    next_client: AtomicU64,
}

/// One connected client.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ClientInfo {
    pub peer: String,
    /// Unix seconds of the connection.
    pub since: u64,
}

/// The export's rate limit on warn lines: [`WARN_BURST`] per [`WARN_WINDOW`].
#[derive(Debug)]
struct WarnLimit(RateLimit);

impl Default for WarnLimit {
    fn default() -> Self {
        WarnLimit(RateLimit::new(WARN_BURST, WARN_WINDOW))
    }
}

/// Whether a request failure is worth a (rate-limited) warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client asked for something invalid (out of range, read-only...): debug only.
    Client,
    /// The server or its raw volume failed (I/O error, out of space): warn, rate-limited.
    Server,
}

impl ExportMetrics {
    /// A request was read off the wire and handed to the export.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request's reply status is decided: count it (by command, and errno if it failed), its
    /// bytes if it succeeded (payload for read and write, the range for the others), and its
    /// latency since `started`.
    pub fn request_done(&self, op: Op, len: u64, errno: u32, started: Instant) {
        let c = op.index();
        self.requests[c].fetch_add(1, Ordering::Relaxed);
        if errno == 0 {
            self.bytes[c].fetch_add(len, Ordering::Relaxed);
        } else {
            self.errors[errno::index(errno)].fetch_add(1, Ordering::Relaxed);
        }
        self.latency[c].observe(started.elapsed());
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Logs a failed request: always at debug; at warn if it is the server's fault and the
    /// export's warn budget for this window is not spent.
    #[allow(clippy::too_many_arguments)]
    pub fn log_failure(
        &self,
        export: &str,
        op: Op,
        offset: u64,
        len: u64,
        fault: Fault,
        errno: u32,
        err: &dyn std::error::Error,
    ) {
        let error = crate::logging::error_chain(err);
        let command = COMMANDS[op.index()];
        // One line per failure: at warn when it is the server's fault and the budget allows,
        // at debug otherwise.
        if fault == Fault::Client {
            tracing::debug!(%export, command, offset, len, errno, %error, "request failed");
            return;
        }
        let admit = self.warn_limit.0.admit(Instant::now());
        if let Some(n) = admit.suppressed_before {
            tracing::warn!(%export, suppressed = n, window_secs = WARN_WINDOW.as_secs(), "suppressed request-error warnings");
        }
        if admit.log {
            tracing::warn!(%export, command, offset, len, errno, %error, "request failed");
        } else {
            tracing::debug!(%export, command, offset, len, errno, %error, "request failed");
        }
    }

    /// A client finished the handshake on this export; returns its id for
    /// [`ExportMetrics::connection_closed`].
    pub fn connection_opened(&self, peer: &str) -> u64 {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).insert(id, ClientInfo { peer: peer.to_owned(), since });
        id
    }

    pub fn connection_closed(&self, id: u64) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// A write to the raw volume took long enough that the device must have held it up.
    pub fn slow_write(&self) {
        self.slow_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection's quiet period came to `o`.
    pub fn busy_poll(&self, o: PollOutcome) {
        self.busy_polls[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records that the volume was unlocked now (`None`: it was locked, i.e. suspended).
    pub fn set_unlocked(&self, at: Option<SystemTime>) {
        let secs = at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or(0);
        self.unlocked_at.store(secs, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ExportCounters {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportCounters {
            requests: COMMANDS.iter().zip(&self.requests).map(|(c, n)| ((*c).to_owned(), load(n))).collect(),
            bytes: COMMANDS.iter().zip(&self.bytes).map(|(c, n)| ((*c).to_owned(), load(n))).collect(),
            errors: errno::ALL
                .iter()
                .map(|&(_, n)| n)
                .chain(["other"])
                .zip(&self.errors)
                .map(|(e, n)| (e.to_owned(), load(n)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            connections_total: load(&self.connections_total),
            unlocked_at: load(&self.unlocked_at),
            clients: self.clients.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect(),
        }
    }
}

/// A copy of one export's counters, for `nbdcrypt status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ExportCounters {
    pub requests: BTreeMap<String, u64>,
    pub bytes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub in_flight: i64,
    pub connections: i64,
    pub connections_total: u64,
    pub unlocked_at: u64,
    pub clients: Vec<ClientInfo>,
}

// ---------------------------------------------------------------------------------------------
// Key provider (KMS) calls
// ---------------------------------------------------------------------------------------------

/// Distinct error codes kept per operation; further codes are counted as `other`, so a
/// misbehaving service cannot grow the label set without bound.
const MAX_ERROR_CODES: usize = 16;

/// Key-provider call metrics, process-wide. A provider reports each remote call with
/// [`KmsMetrics::record`]: `kms_metrics().record("Decrypt", elapsed, Err("AccessDeniedException"))`.
/// Calls are rare (one per unlock, wrap or rewrap), so a mutex is fine.
#[derive(Debug, Default)]
pub struct KmsMetrics {
    ops: Mutex<BTreeMap<String, KmsOp>>,
}

#[derive(Debug, Default)]
struct KmsOp {
    ok: u64,
    errors: BTreeMap<String, u64>,
    latency: Histogram,
}

/// The process-wide KMS metrics.
pub fn kms_metrics() -> &'static KmsMetrics {
    static KMS: OnceLock<KmsMetrics> = OnceLock::new();
    KMS.get_or_init(KmsMetrics::default)
}

impl KmsMetrics {
    /// Records one call: `op` is the API operation (`Decrypt`, `Encrypt`, `GenerateDataKey`,
    /// `DescribeKey`...), `result` is `Ok` or the service's error code (or a short kind such as
    /// `timeout`, `dispatch`).
    pub fn record(&self, op: &str, latency: Duration, result: Result<(), &str>) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let entry = ops.entry(op.to_owned()).or_default();
        entry.latency.observe(latency);
        match result {
            Ok(()) => entry.ok += 1,
            Err(code) => {
                let code = if entry.errors.contains_key(code) || entry.errors.len() < MAX_ERROR_CODES {
                    code
                } else {
                    "other"
                };
                *entry.errors.entry(code.to_owned()).or_default() += 1;
            }
        }
    }

    fn encode(&self, out: &mut String) {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        header(out, "nbdcrypt_kms_requests_total", "counter", "Key provider (KMS) calls, by operation and result.");
        for (op, s) in ops.iter() {
            let op = escape(op);
            let errors: u64 = s.errors.values().sum();
            let _ = writeln!(out, "nbdcrypt_kms_requests_total{{op=\"{op}\",result=\"ok\"}} {}", s.ok);
            let _ = writeln!(out, "nbdcrypt_kms_requests_total{{op=\"{op}\",result=\"error\"}} {errors}");
        }
        header(
            out,
            "nbdcrypt_kms_errors_total",
            "counter",
            "Failed key provider (KMS) calls, by operation and error code.",
        );
        for (op, s) in ops.iter() {
            for (code, n) in &s.errors {
                let _ =
                    writeln!(out, "nbdcrypt_kms_errors_total{{op=\"{}\",code=\"{}\"}} {n}", escape(op), escape(code));
            }
        }
        header(out, "nbdcrypt_kms_request_duration_seconds", "histogram", "Key provider (KMS) call latency.");
        for (op, s) in ops.iter() {
            s.latency.encode(out, "nbdcrypt_kms_request_duration_seconds", &format!("op=\"{}\"", escape(op)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// What the encoder needs to know about one export besides its counters.
#[derive(Debug)]
pub struct ExportView<'a> {
    pub name: &'a str,
    pub metrics: &'a ExportMetrics,
    pub suspended: bool,
    pub size: u64,
}

/// Process-wide facts for the encoder.
#[derive(Debug, Clone, Copy)]
pub struct ProcessView {
    pub start_time: SystemTime,
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes every metric in the Prometheus text format.
pub fn encode(exports: &[ExportView<'_>], process: ProcessView) -> String {
    let mut out = String::with_capacity(8192 + exports.len() * 16384);
    let start = process.start_time.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    header(&mut out, "nbdcrypt_build_info", "gauge", "Version of the running nbdcrypt.");
    let _ = writeln!(out, "nbdcrypt_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    header(&mut out, "nbdcrypt_start_time_seconds", "gauge", "Start time of the daemon, in unix seconds.");
    let _ = writeln!(out, "nbdcrypt_start_time_seconds {start}");
    header(
        &mut out,
        "nbdcrypt_cipher_contexts",
        "gauge",
        "Key-schedule holders alive in the process: AWS-LC XTS contexts, one per wide-engine cipher.",
    );
    let _ = writeln!(out, "nbdcrypt_cipher_contexts {}", crate::crypto::live_contexts());
    header(&mut out, "nbdcrypt_key_pages_locked", "gauge", "Pages mlocked for key memory (secrets, key schedules).");
    let _ = writeln!(out, "nbdcrypt_key_pages_locked {}", crate::crypto::mlock::locked_pages());
    header(
        &mut out,
        "nbdcrypt_key_allocations_unlocked",
        "gauge",
        "Live key allocations the OS refused to mlock (0 unless RLIMIT_MEMLOCK is too low).",
    );
    let _ = writeln!(out, "nbdcrypt_key_allocations_unlocked {}", crate::crypto::mlock::unlocked_allocations());
    header(
        &mut out,
        "nbdcrypt_log_lines_dropped_total",
        "counter",
        "Log lines dropped because the log sink (stderr) did not take them.",
    );
    let _ = writeln!(out, "nbdcrypt_log_lines_dropped_total {}", crate::logging::dropped_lines());
    let conns = crate::server::connection_counters();
    header(&mut out, "nbdcrypt_connections_refused_total", "counter", "Connections refused at max_connections.");
    let _ = writeln!(out, "nbdcrypt_connections_refused_total {}", conns.refused);
    header(
        &mut out,
        "nbdcrypt_handshakes_failed_total",
        "counter",
        "Connections that ended before the transmission phase, by reason (error: bad option data, TLS, a reset; timeout: handshake_timeout_secs).",
    );
    let _ = writeln!(out, "nbdcrypt_handshakes_failed_total{{reason=\"error\"}} {}", conns.handshake_errors);
    let _ = writeln!(out, "nbdcrypt_handshakes_failed_total{{reason=\"timeout\"}} {}", conns.handshake_timeouts);

    let per_export =
        |out: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(&mut String, &ExportView, &str)| {
            header(out, name, kind, help);
            for e in exports {
                f(out, e, &format!("export=\"{}\"", escape(e.name)));
            }
        };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    per_export(&mut out, "nbdcrypt_requests_total", "counter", "Requests replied to, by command.", &|o, e, l| {
        for (c, n) in COMMANDS.iter().zip(&e.metrics.requests) {
            let _ = writeln!(o, "nbdcrypt_requests_total{{{l},command=\"{c}\"}} {}", load(n));
        }
    });
    per_export(
        &mut out,
        "nbdcrypt_request_bytes_total",
        "counter",
        "Bytes of successful requests (payload for read and write, range for the others), by command.",
        &|o, e, l| {
            for (c, n) in COMMANDS.iter().zip(&e.metrics.bytes) {
                let _ = writeln!(o, "nbdcrypt_request_bytes_total{{{l},command=\"{c}\"}} {}", load(n));
            }
        },
    );
    per_export(
        &mut out,
        "nbdcrypt_request_errors_total",
        "counter",
        "Requests that failed, by NBD errno.",
        &|o, e, l| {
            for (name, n) in errno::ALL.iter().map(|&(_, n)| n).chain(["other"]).zip(&e.metrics.errors) {
                let _ = writeln!(o, "nbdcrypt_request_errors_total{{{l},errno=\"{name}\"}} {}", load(n));
            }
        },
    );
    per_export(
        &mut out,
        "nbdcrypt_request_duration_seconds",
        "histogram",
        "Time from reading a request to deciding its reply, by command.",
        &|o, e, l| {
            for (c, h) in COMMANDS.iter().zip(&e.metrics.latency) {
                h.encode(o, "nbdcrypt_request_duration_seconds", &format!("{l},command=\"{c}\""));
            }
        },
    );
    per_export(
        &mut out,
        "nbdcrypt_requests_in_flight",
        "gauge",
        "Requests read but not yet replied to.",
        &|o, e, l| {
            let _ = writeln!(o, "nbdcrypt_requests_in_flight{{{l}}} {}", e.metrics.in_flight.load(Ordering::Relaxed));
        },
    );
    per_export(&mut out, "nbdcrypt_connections", "gauge", "Client connections open now.", &|o, e, l| {
        let _ = writeln!(o, "nbdcrypt_connections{{{l}}} {}", e.metrics.connections.load(Ordering::Relaxed));
    });
    per_export(&mut out, "nbdcrypt_connections_total", "counter", "Client connections accepted.", &|o, e, l| {
        let _ = writeln!(o, "nbdcrypt_connections_total{{{l}}} {}", load(&e.metrics.connections_total));
    });
    per_export(
        &mut out,
        "nbdcrypt_slow_writes_total",
        "counter",
        "Writes the raw volume held up (dirty throttling: the device is behind); each keeps writes off \
         the connection threads for a second.",
        &|o, e, l| {
            let _ = writeln!(o, "nbdcrypt_slow_writes_total{{{l}}} {}", load(&e.metrics.slow_writes));
        },
    );
    per_export(
        &mut out,
        "nbdcrypt_busy_polls_total",
        "counter",
        "Quiet periods of connections (nothing in flight) by what the busy poll came to: hit (a request \
         came within the window), miss (none came; the connection backs off), skipped (backing off).",
        &|o, e, l| {
            for (name, n) in POLL_OUTCOMES.iter().zip(&e.metrics.busy_polls) {
                let _ = writeln!(o, "nbdcrypt_busy_polls_total{{{l},outcome=\"{name}\"}} {}", load(n));
            }
        },
    );
    per_export(
        &mut out,
        "nbdcrypt_unlocked_time_seconds",
        "gauge",
        "When the volume was last unlocked (open or resume), in unix seconds; 0 while suspended.",
        &|o, e, l| {
            let _ = writeln!(o, "nbdcrypt_unlocked_time_seconds{{{l}}} {}", load(&e.metrics.unlocked_at));
        },
    );
    per_export(
        &mut out,
        "nbdcrypt_suspended",
        "gauge",
        "1 while the export is suspended (key dropped).",
        &|o, e, l| {
            let _ = writeln!(o, "nbdcrypt_suspended{{{l}}} {}", u8::from(e.suspended));
        },
    );
    per_export(&mut out, "nbdcrypt_export_size_bytes", "gauge", "Size of the export.", &|o, e, l| {
        let _ = writeln!(o, "nbdcrypt_export_size_bytes{{{l}}} {}", e.size);
    });
    kms_metrics().encode(&mut out);
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value: backslash, double quote and newline (the text format's rules).
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(name: &'a str, m: &'a ExportMetrics) -> ExportView<'a> {
        ExportView { name, metrics: m, suspended: false, size: 1 << 20 }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.encode(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.00005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }

    #[test]
    fn a_failed_request_counts_its_errno_and_no_bytes() {
        let m = ExportMetrics::default();
        m.request_started();
        m.request_done(Op::Write, 4096, errno::ENOSPC, Instant::now());
        let s = m.snapshot();
        assert_eq!(s.requests["write"], 1);
        assert_eq!(s.bytes["write"], 0);
        assert_eq!(s.errors["ENOSPC"], 1);
        assert_eq!(s.in_flight, 0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let m = ExportMetrics::default();
        let text = encode(&[view("we\"ird", &m)], ProcessView { start_time: SystemTime::now() });
        assert!(text.contains("export=\"we\\\"ird\""));
    }

    #[test]
    fn kms_error_codes_are_bounded() {
        let k = KmsMetrics::default();
        for i in 0..40 {
            k.record("Decrypt", Duration::from_millis(3), Err(&format!("E{i}")));
        }
        k.record("Decrypt", Duration::from_millis(3), Ok(()));
        let ops = k.ops.lock().unwrap();
        let d = &ops["Decrypt"];
        assert_eq!(d.errors.len(), MAX_ERROR_CODES + 1);
        assert_eq!(d.errors["other"], 40 - MAX_ERROR_CODES as u64);
        assert_eq!(d.ok, 1);
        assert_eq!(d.latency.count(), 41);
    }

    #[test]
    fn every_op_has_its_own_label() {
        let ops = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes, Op::Cache, Op::Other];
        let labels: Vec<_> = ops.iter().map(|o| COMMANDS[o.index()]).collect();
        assert_eq!(labels, COMMANDS);
    }
}
