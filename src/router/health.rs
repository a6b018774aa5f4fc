//! Health, readiness and Prometheus metrics, served on a loopback address when asked for.
//!
//! The daemon's loop writes [`Metrics`]; the server only reads them. Rendering is pure, so
//! the text format is unit-tested without a socket.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};

use crate::core::model::Check;
use crate::core::plan::State;
use crate::core::upstream::{MappingState, View};

/// Upper bounds of the apply-latency histogram buckets, in seconds.
const BUCKETS: [f64; 9] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
const STATES: [(State, &str); 5] = [
    (State::Forwarding, "forwarding"),
    (State::Conflict, "conflict"),
    (State::Invalid, "invalid"),
    (State::Waiting, "waiting"),
    (State::Refused, "refused"),
];

/// What the daemon reports about itself.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// The loop that takes watch events and applies last turned at this moment.
    pub loop_turned: Instant,
    /// The first complete list was seen and applied.
    pub synced: bool,
    /// The last apply succeeded.
    pub applying: bool,
    /// The table was last confirmed in step with the cluster at this moment.
    pub last_sync: Option<Instant>,
    /// Applies have failed since this moment, without one succeeding.
    pub failing_since: Option<Instant>,
    pub forwards: [usize; 5],
    pub wan_addresses: usize,
    pub transactions: u64,
    pub apply_errors: u64,
    pub watch_errors: u64,
    pub table_restores: u64,
    /// Times a resync compared the incremental plan with the whole plan, and found them
    /// differing.
    pub plan_checks: u64,
    pub plan_repairs: u64,
    /// Conntrack entries deleted because their forward closed or moved.
    pub flows_closed: u64,
    /// Finalizer changes, conditions and events handed to the cluster lane.
    pub bookkeeping_queued: usize,
    /// The cluster lane has nothing pending or in flight.
    pub bookkeeping_idle: bool,
    /// The health checks of backends, by check.
    pub backends: BTreeMap<Check, BackendStats>,
    /// What the upstream lane knows of the IGD, when one is configured.
    pub upstream: Option<Arc<View>>,
    apply_buckets: [u64; BUCKETS.len()],
    apply_count: u64,
    apply_sum: f64,
}

/// What the probes of one backend found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub up: bool,
    pub probes: u64,
    pub failures: u64,
    pub transitions: u64,
    /// How long the last probe that passed took.
    pub latency: Option<Duration>,
}

pub type Shared = Arc<Mutex<Metrics>>;

/// The metrics, even if a holder panicked: they are counters, never half-written invariants.
pub fn lock(metrics: &Shared) -> MutexGuard<'_, Metrics> {
    metrics
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for Metrics {
    fn default() -> Metrics {
        let now = Instant::now();
        Metrics {
            started: now,
            loop_turned: now,
            synced: false,
            applying: false,
            last_sync: None,
            failing_since: None,
            forwards: [0; 5],
            wan_addresses: 0,
            transactions: 0,
            apply_errors: 0,
            watch_errors: 0,
            table_restores: 0,
            plan_checks: 0,
            plan_repairs: 0,
            flows_closed: 0,
            bookkeeping_queued: 0,
            bookkeeping_idle: true,
            backends: BTreeMap::new(),
            upstream: None,
            apply_buckets: [0; BUCKETS.len()],
            apply_count: 0,
            apply_sum: 0.0,
        }
    }
}

impl Metrics {
    /// Records one apply round that reached the kernel, and how long it took.
    /// `count` tells how many annotation entries of the plan are in a state.
    pub fn applied(&mut self, took: Duration, sent: bool, count: impl Fn(State) -> usize) {
        let seconds = took.as_secs_f64();
        for (bucket, bound) in self.apply_buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.apply_count += 1;
        self.apply_sum += seconds;
        if sent {
            self.transactions += 1;
        }
        for (counted, (state, _)) in self.forwards.iter_mut().zip(STATES) {
            *counted = count(state);
        }
        self.synced = true;
        self.applying = true;
        self.failing_since = None;
        self.last_sync = Some(Instant::now());
    }

    /// Alive: the loop turned within `stall` (it turns at least every heartbeat).
    pub fn alive(&self, now: Instant, stall: Duration) -> bool {
        now.duration_since(self.loop_turned) <= stall
    }

    /// Converging, as the watchdog means it: alive, and the kernel table has not failed to
    /// reach what the cluster asks for during all of `failing` (a loop that fails the same
    /// apply over and over is busy, not healthy).
    pub fn converging(&self, now: Instant, stall: Duration, failing: Duration) -> bool {
        self.alive(now, stall)
            && self
                .failing_since
                .is_none_or(|since| now.duration_since(since) <= failing)
    }

    /// Ready: the first sync is done and the last apply succeeded.
    pub fn ready(&self) -> bool {
        self.synced && self.applying
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self, now: Instant) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "forwards",
            "gauge",
            "Annotation entries by state in the last plan.",
        );
        for (count, (_, word)) in self.forwards.iter().zip(STATES) {
            let _ = writeln!(
                out,
                "kube_port_forward_forwards{{state=\"{word}\"}} {count}"
            );
        }
        let since_sync = now.duration_since(self.last_sync.unwrap_or(self.started));
        let gauges = [
            (
                "ready",
                "Whether the first sync is done and the last apply succeeded.",
                f64::from(u8::from(self.ready())),
            ),
            (
                "synced",
                "Whether the table was ever brought in step with the cluster.",
                f64::from(u8::from(self.last_sync.is_some())),
            ),
            (
                "wan_addresses",
                "WAN addresses in the table's address sets.",
                self.wan_addresses as f64,
            ),
            (
                "bookkeeping_idle",
                "Whether every finalizer change, condition and event handed to the cluster lane is written.",
                f64::from(u8::from(self.bookkeeping_idle)),
            ),
            (
                "seconds_since_last_sync",
                "Seconds since the table was last confirmed in step with the cluster (since start if never).",
                since_sync.as_secs_f64(),
            ),
        ];
        for (name, help, value) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "kube_port_forward_{name} {value}");
        }
        let counters = [
            (
                "transactions_total",
                "nft transactions sent.",
                self.transactions,
            ),
            (
                "apply_errors_total",
                "Applies that failed.",
                self.apply_errors,
            ),
            (
                "bookkeeping_queued_total",
                "Finalizer changes, conditions and events handed to the cluster lane.",
                self.bookkeeping_queued as u64,
            ),
            (
                "watch_errors_total",
                "Errors of the Kubernetes watches.",
                self.watch_errors,
            ),
            (
                "table_restores_total",
                "Times the table was changed from outside and restored.",
                self.table_restores,
            ),
            (
                "plan_checks_total",
                "Times a resync compared the incremental plan with the whole plan.",
                self.plan_checks,
            ),
            (
                "plan_repairs_total",
                "Times the resync found the incremental plan differing from the whole plan (a bug).",
                self.plan_repairs,
            ),
            (
                "flows_closed_total",
                "Conntrack entries deleted because their forward closed or moved elsewhere.",
                self.flows_closed,
            ),
        ];
        for (name, help, value) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "kube_port_forward_{name} {value}");
        }
        header(
            &mut out,
            "apply_duration_seconds",
            "histogram",
            "Time to bring the table in step, per round.",
        );
        let name = "kube_port_forward_apply_duration_seconds";
        for (count, bound) in self.apply_buckets.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.apply_count);
        let _ = writeln!(out, "{name}_sum {}", self.apply_sum);
        let _ = writeln!(out, "{name}_count {}", self.apply_count);
        self.render_backends(&mut out);
        self.render_upstream(&mut out);
        out
    }

    fn render_upstream(&self, out: &mut String) {
        let Some(view) = &self.upstream else {
            return;
        };
        header(
            out,
            "upstream_up",
            "gauge",
            "Whether the IGD in front of the router answered its last request.",
        );
        let _ = writeln!(
            out,
            "kube_port_forward_upstream_up {}",
            u8::from(view.reachable)
        );
        header(
            out,
            "upstream_mappings",
            "gauge",
            "Mappings the forwards ask of the IGD, by what it answered.",
        );
        type Is = fn(&MappingState) -> bool;
        let states: [(&str, Is); 3] = [
            ("mapped", |s| *s == MappingState::Mapped),
            ("refused", |s| matches!(s, MappingState::Refused { .. })),
            ("pending", |s| *s == MappingState::Pending),
        ];
        for (word, is) in states {
            let count = view.mappings.values().filter(|s| is(s)).count();
            let _ = writeln!(
                out,
                "kube_port_forward_upstream_mappings{{state=\"{word}\"}} {count}"
            );
        }
        if let Some(external) = view.external {
            header(
                out,
                "upstream_external_address_info",
                "gauge",
                "The IGD's external address: where the internet reaches the forwards.",
            );
            let _ = writeln!(
                out,
                "kube_port_forward_upstream_external_address_info{{address=\"{external}\"}} 1"
            );
        }
    }

    fn render_backends(&self, out: &mut String) {
        if self.backends.is_empty() {
            return;
        }
        let label = |(addr, probe): &Check| format!("backend=\"{addr}\",probe=\"{probe}\"");
        header(
            out,
            "backend_up",
            "gauge",
            "Whether a backend's health check passes (1) or found it down (0).",
        );
        for (check, stats) in &self.backends {
            let _ = writeln!(
                out,
                "kube_port_forward_backend_up{{{}}} {}",
                label(check),
                u8::from(stats.up)
            );
        }
        header(
            out,
            "backend_probe_seconds",
            "gauge",
            "How long the last passing probe of a backend took.",
        );
        for (check, stats) in &self.backends {
            if let Some(latency) = stats.latency {
                let _ = writeln!(
                    out,
                    "kube_port_forward_backend_probe_seconds{{{}}} {}",
                    label(check),
                    latency.as_secs_f64()
                );
            }
        }
        type Counter = (&'static str, &'static str, fn(&BackendStats) -> u64);
        let counters: [Counter; 3] = [
            ("backend_probes_total", "Probes of a backend.", |s| s.probes),
            (
                "backend_probe_failures_total",
                "Probes of a backend that failed.",
                |s| s.failures,
            ),
            (
                "backend_transitions_total",
                "Times a backend went down or came back up.",
                |s| s.transitions,
            ),
        ];
        for (name, help, value) in counters {
            header(out, name, "counter", help);
            for (check, stats) in &self.backends {
                let _ = writeln!(
                    out,
                    "kube_port_forward_{name}{{{}}} {}",
                    label(check),
                    value(stats)
                );
            }
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP kube_port_forward_{name} {help}");
    let _ = writeln!(out, "# TYPE kube_port_forward_{name} {kind}");
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the process ends.
/// `stall` is how long the loop may go without turning before `/healthz` fails.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Shared, stall: Duration) {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "serving /healthz, /readyz and /metrics");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = respond(request.uri().path(), &metrics, stall);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// `GET http://ADDRESS/PATH`, as `status` asks a running daemon: the status code and the
/// body, or why it could not be asked. The caller bounds the time it may take.
pub async fn get(address: &str, path: &str) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.kind().to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, address)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn respond(path: &str, metrics: &Shared, stall: Duration) -> Response<Full<Bytes>> {
    let now = Instant::now();
    let metrics = lock(metrics);
    let (status, body) = match path {
        "/healthz" if metrics.alive(now, stall) => (StatusCode::OK, "ok\n".to_owned()),
        "/healthz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the watch and apply loop is stuck\n".to_owned(),
        ),
        "/readyz" if metrics.ready() => (StatusCode::OK, "ready\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not synced, or the last apply failed\n".to_owned(),
        ),
        "/metrics" => (StatusCode::OK, metrics.render(now)),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let kind = if path == "/metrics" {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_counts_histogram_and_readiness() {
        let mut m = Metrics::default();
        assert!(!m.ready());
        m.applied(Duration::from_millis(20), true, |_| 0);
        m.applied(Duration::from_secs(2), false, |_| 0);
        assert!(m.ready());
        let text = m.render(Instant::now());
        assert!(
            text.contains("kube_port_forward_transactions_total 1\n"),
            "{text}"
        );
        assert!(text.contains("kube_port_forward_apply_duration_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("kube_port_forward_apply_duration_seconds_bucket{le=\"5\"} 2\n"));
        assert!(text.contains("kube_port_forward_apply_duration_seconds_count 2\n"));
        assert!(text.contains("kube_port_forward_forwards{state=\"refused\"} 0\n"));
        assert!(text.contains("kube_port_forward_ready 1\n"));
        // Every sample line belongs to a declared metric.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }

    #[test]
    fn backends_have_their_state_latency_and_counts() {
        let mut m = Metrics::default();
        assert!(!m.render(Instant::now()).contains("backend"));
        let check = (
            "10.0.0.2".parse().unwrap(),
            crate::core::model::Probe::Tcp(80),
        );
        m.backends.insert(
            check,
            BackendStats {
                up: false,
                probes: 7,
                failures: 2,
                transitions: 1,
                latency: Some(Duration::from_millis(3)),
            },
        );
        let text = m.render(Instant::now());
        let labels = "{backend=\"10.0.0.2\",probe=\"tcp:80\"}";
        for line in [
            format!("kube_port_forward_backend_up{labels} 0"),
            format!("kube_port_forward_backend_probe_seconds{labels} 0.003"),
            format!("kube_port_forward_backend_probes_total{labels} 7"),
            format!("kube_port_forward_backend_probe_failures_total{labels} 2"),
            format!("kube_port_forward_backend_transitions_total{labels} 1"),
        ] {
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    #[test]
    fn a_loop_that_stopped_turning_is_not_alive() {
        let m = Metrics::default();
        let later = m.loop_turned + Duration::from_secs(61);
        assert!(m.alive(m.loop_turned, Duration::from_secs(60)));
        assert!(!m.alive(later, Duration::from_secs(60)));
    }
}
