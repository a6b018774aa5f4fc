//! Health checks of the backends of forwards with several: each check is a task that
//! probes its backend every interval, at a phase of its own (a random start, then ±10%
//! jitter), through a semaphore that bounds how many probes run at once; a run of results
//! ([`Health`]) changes its state, and only a change is reported to the daemon.
//!
//! The probes run on the router, so a backend counts as down when the router cannot reach
//! it, which is what matters for forwarding to it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::core::health::{Health, Thresholds};
use crate::core::model::{Check, Probe};
use crate::router::health::{self as metrics, Shared};

/// How backends are probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
    /// At most this many probes at once.
    pub concurrency: usize,
}

impl Default for ProbeSettings {
    fn default() -> ProbeSettings {
        ProbeSettings {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            thresholds: Thresholds::default(),
            concurrency: 64,
        }
    }
}

/// A backend changed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub check: Check,
    pub up: bool,
    /// The last probe's failure, or how long the last probe took.
    pub detail: String,
}

/// The running checks.
pub struct Prober {
    settings: ProbeSettings,
    tasks: HashMap<Check, AbortHandle>,
    permits: Arc<Semaphore>,
    sender: mpsc::UnboundedSender<Transition>,
    receiver: mpsc::UnboundedReceiver<Transition>,
    metrics: Shared,
}

impl Prober {
    pub fn new(settings: ProbeSettings, metrics: Shared) -> Prober {
        let (sender, receiver) = mpsc::unbounded_channel();
        Prober {
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            tasks: HashMap::new(),
            sender,
            receiver,
            metrics,
        }
    }

    /// Runs exactly these checks: those not running yet start in the state given (`true`:
    /// up), those no longer wanted stop.
    pub fn set(&mut self, wanted: impl IntoIterator<Item = (Check, bool)>) {
        let wanted: HashMap<Check, bool> = wanted.into_iter().collect();
        self.tasks.retain(|check, task| {
            let keep = wanted.contains_key(check);
            if !keep {
                task.abort();
            }
            keep
        });
        metrics::lock(&self.metrics)
            .backends
            .retain(|check, _| wanted.contains_key(check));
        for (check, up) in wanted {
            if self.tasks.contains_key(&check) {
                continue;
            }
            let task = tokio::spawn(run(
                check,
                up,
                self.settings,
                self.permits.clone(),
                self.sender.clone(),
                self.metrics.clone(),
            ));
            self.tasks.insert(check, task.abort_handle());
        }
    }

    /// How many checks run.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The next change of state of any check.
    pub async fn next(&mut self) -> Option<Transition> {
        self.receiver.recv().await
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

/// A random fraction in [0, 1): the standard library's random hash keys, so no random
/// number crate is needed for jitter.
fn random_fraction() -> f64 {
    (RandomState::new().hash_one(0u8) >> 11) as f64 / (1u64 << 53) as f64
}

async fn run(
    check: Check,
    up: bool,
    settings: ProbeSettings,
    permits: Arc<Semaphore>,
    sender: mpsc::UnboundedSender<Transition>,
    shared: Shared,
) {
    let mut health = Health::new(up);
    metrics::lock(&shared).backends.entry(check).or_default().up = up;
    // Checks that start together (a restart, a Service with many ports) spread over the
    // first interval instead of probing at once.
    let mut next = Instant::now() + settings.interval.mul_f64(random_fraction());
    loop {
        tokio::time::sleep_until(next).await;
        let result = {
            let _permit = permits.acquire().await;
            let started = Instant::now();
            probe(check, settings.timeout)
                .await
                .map(|()| started.elapsed())
        };
        let changed = health.observe(result.is_ok(), settings.thresholds);
        {
            let mut metrics = metrics::lock(&shared);
            let stats = metrics.backends.entry(check).or_default();
            stats.probes += 1;
            match &result {
                Ok(took) => stats.latency = Some(*took),
                Err(_) => stats.failures += 1,
            }
            stats.up = health.up;
            if changed.is_some() {
                stats.transitions += 1;
            }
        }
        if let Some(up) = changed {
            let detail = match &result {
                Ok(took) => format!("answered in {} ms", took.as_millis()),
                Err(error) => error.clone(),
            };
            if sender.send(Transition { check, up, detail }).is_err() {
                return;
            }
        }
        next += settings.interval.mul_f64(0.9 + 0.2 * random_fraction());
        // A probe that waited long for a permit does not make the next ones bunch up.
        next = next.max(Instant::now());
    }
}

/// One probe: `Ok` when the backend answered as it should within `timeout`, counted for each
/// step from when the router took it (connect, then the HTTP exchange): a router too busy to
/// send the request in time does not count that against the backend.
async fn probe((addr, probe): Check, timeout: Duration) -> Result<(), String> {
    let (port, http) = match probe {
        Probe::Tcp(port) => (port, false),
        Probe::Http(port) => (port, true),
    };
    let target = SocketAddr::new(addr, port);
    let connect = async {
        TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect to {target}: {e}"))
    };
    let mut stream = within(timeout, connect, target).await?;
    if http {
        within(timeout, http_ok(&mut stream, target), target).await?;
    }
    reset_on_close(&stream);
    Ok(())
}

/// `step`, given `limit` of the backend's time. When the deadline passes, the step is looked
/// at once more after the runtime has read what the kernel holds: an answer that came while
/// the router was busy elsewhere counts as in time.
async fn within<T>(
    limit: Duration,
    step: impl Future<Output = Result<T, String>>,
    target: SocketAddr,
) -> Result<T, String> {
    let mut step = std::pin::pin!(step);
    if let Ok(result) = tokio::time::timeout(limit, step.as_mut()).await {
        return result;
    }
    tokio::task::yield_now().await;
    step.as_mut()
        .now_or_never()
        .unwrap_or_else(|| Err(format!("{target}: no answer within {limit:?}")))
}

/// Has the probe's connection closed with a reset: the router keeps no TIME_WAIT socket per
/// probe (500 a second with 1,000 backends), and the backend no half-closed one.
#[expect(
    deprecated,
    reason = "tokio deprecates SO_LINGER because a close may then block; with a linger of 0 it never does, it resets"
)]
fn reset_on_close(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// `GET /` and its status line. Written by hand: the status code is all a health check
/// reads, and an HTTP client crate would bring a connection pool and its size to the router.
async fn http_ok(stream: &mut TcpStream, target: SocketAddr) -> Result<(), String> {
    let request = format!(
        "GET / HTTP/1.0\r\nHost: {target}\r\nUser-Agent: kube-port-forward\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 512 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    match status_code(&head) {
        Some(200) => Ok(()),
        Some(code) => Err(format!("{target}: HTTP {code}")),
        None => Err(format!("{target}: not an HTTP answer")),
    }
}

/// The code of an HTTP status line (`HTTP/1.1 503 Service Unavailable`).
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    words.next().filter(|w| w.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: x"),
            Some(503)
        );
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    /// The router is busy (here: a task that blocks the runtime's one thread) between the
    /// connect and the request, for longer than the timeout: the backend answers as soon
    /// as it is asked, so it is up.
    #[test]
    fn a_router_too_busy_to_ask_in_time_does_not_fail_a_backend() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 512];
            let _ = stream.read(&mut request).unwrap();
            stream.write_all(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let check = (std::net::IpAddr::from([127, 0, 0, 1]), Probe::Http(port));
        let result = runtime.block_on(async move {
            let probe = tokio::spawn(probe(check, Duration::from_millis(100)));
            tokio::spawn(async { std::thread::sleep(Duration::from_millis(500)) });
            probe.await.unwrap()
        });
        assert_eq!(result, Ok(()));
        server.join().unwrap();
    }

    #[test]
    fn jitter_stays_in_its_range() {
        for _ in 0..1000 {
            let f = random_fraction();
            assert!((0.0..1.0).contains(&f));
        }
    }
}
