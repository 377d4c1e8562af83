//! Prometheus metrics for BlueBridge daemons: a [`prometheus_client`] registry served over
//! HTTP by [`tiny_http`] from a thread of its own.
//!
//! The daemons count with their own counters (atomics a worker writes, BPF maps, the
//! controller's books); their collectors read those on each scrape and encode them with
//! [`Family`], so a scrape never stops or slows a worker. `GET /metrics` answers with the
//! Prometheus text format (0.0.4), or OpenMetrics 1.0 when the scraper's `Accept` header asks
//! for it (Prometheus does).
//!
//! Two steps, so a daemon can refuse a taken address before it attaches anything:
//! [`Listener::bind`] first, [`Listener::serve`] once the registry can be built.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The OpenMetrics text format's content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound (taken, not local, no permission).
    #[error("cannot serve metrics on {addr}: {why}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        why: String,
    },
}

/// A bound HTTP listener, not serving yet.
pub struct Listener {
    http: tiny_http::Server,
    addr: SocketAddr,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Listener {
    /// Binds `addr` (port 0: a free port, see [`Listener::local_addr`]).
    pub fn bind(addr: SocketAddr) -> Result<Listener, MetricsError> {
        let http = tiny_http::Server::http(addr).map_err(|e| MetricsError::Bind {
            addr,
            why: e.to_string(),
        })?;
        let addr = http.server_addr().to_ip().expect("bound to an IP address");
        Ok(Listener { http, addr })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `registry` at `/metrics` from a thread named `metrics` until the [`Exporter`]
    /// is dropped.
    pub fn serve(self, registry: Registry) -> Exporter {
        let http = Arc::new(self.http);
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes = Arc::new(AtomicU64::new(0));
        let thread = {
            let (http, stop, scrapes) = (http.clone(), stop.clone(), scrapes.clone());
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match http.recv_timeout(Duration::from_millis(200)) {
                            Ok(Some(req)) => answer(req, &registry, &scrapes),
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "metrics: receiving a request");
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                })
                .expect("spawning the metrics thread")
        };
        tracing::info!(addr = %self.addr, "serving Prometheus metrics at /metrics");
        Exporter {
            addr: self.addr,
            http,
            stop,
            scrapes,
            thread: Some(thread),
        }
    }
}

/// Answers one HTTP request: the metrics at `/metrics` (GET or HEAD), a pointer to them at
/// `/`, 404 elsewhere, 405 for other methods.
fn answer(req: tiny_http::Request, registry: &Registry, scrapes: &AtomicU64) {
    use tiny_http::{Header, Method, Response};
    let header = |v: &str| Header::from_bytes("Content-Type", v).expect("a valid header");
    let path = req.url().split('?').next().unwrap_or("");
    let response = match (req.method(), path) {
        (Method::Get | Method::Head, "/metrics") => {
            let open = req.headers().iter().any(|h| {
                h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text")
            });
            let mut body = String::new();
            let (encoded, kind) = if open {
                (
                    prometheus_client::encoding::text::encode(&mut body, registry),
                    OPENMETRICS,
                )
            } else {
                (
                    prometheus_client::encoding::prometheus_text::encode(&mut body, registry),
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                )
            };
            match encoded {
                Ok(()) => {
                    scrapes.fetch_add(1, Ordering::Relaxed);
                    Response::from_string(body).with_header(header(kind))
                }
                Err(_) => {
                    Response::from_string("encoding the metrics failed\n").with_status_code(500)
                }
            }
        }
        (Method::Get | Method::Head, "/") => {
            Response::from_string("BlueBridge: Prometheus metrics at /metrics\n")
                .with_header(header("text/plain; charset=utf-8"))
        }
        (Method::Get | Method::Head, _) => {
            Response::from_string("not found: metrics are at /metrics\n").with_status_code(404)
        }
        _ => Response::from_string("only GET and HEAD\n").with_status_code(405),
    };
    if let Err(e) = req.respond(response) {
        tracing::debug!(error = %e, "metrics: the scraper went away");
    }
}

/// Metrics being served; dropping it stops the thread.
pub struct Exporter {
    addr: SocketAddr,
    http: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    scrapes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("addr", &self.addr)
            .field("scrapes", &self.scrapes())
            .finish()
    }
}

impl Exporter {
    /// The address served.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Scrapes answered so far.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::Relaxed)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A registry holding one collector.
pub fn registry_of(c: impl Collector) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(c));
    r
}

/// Writes metric families into a collector's encoder: one descriptor, then one sample per
/// label set.
#[derive(Debug)]
pub struct Family<'a, 'b> {
    enc: &'b mut DescriptorEncoder<'a>,
}

impl<'a, 'b> Family<'a, 'b> {
    /// Encodes into `enc` (the encoder [`Collector::encode`] is given).
    pub fn new(enc: &'b mut DescriptorEncoder<'a>) -> Self {
        Family { enc }
    }

    /// A counter without labels (`name` gets the `_total` suffix).
    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        ConstCounter::new(v).encode(self.enc.encode_descriptor(
            name,
            help,
            None,
            MetricType::Counter,
        )?)
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, v: f64) -> std::fmt::Result {
        ConstGauge::new(v).encode(self.enc.encode_descriptor(
            name,
            help,
            None,
            MetricType::Gauge,
        )?)
    }

    /// A counter with one sample per label set.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A gauge with one sample per label set.
    pub fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Fetches `http://ADDR/metrics` and parses it ([`parse_text`]), 5 s at most.
#[cfg(feature = "scrape")]
pub fn scrape(addr: SocketAddr) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let url = format!("http://{addr}/metrics");
    let body = agent
        .get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| format!("scraping {url}: {e}"))?;
    Ok(parse_text(&body))
}

/// Reads a scrape's text back into (series, value) pairs: `name{labels}` → value. For tests
/// and tools that check an exporter (comments and `# EOF` skipped).
pub fn parse_text(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
            let mut f = Family::new(&mut enc);
            f.counter("bb_frames", "Frames.", 7)?;
            f.gauge("bb_pages_used", "Pages.", 3.0)?;
            f.counters(
                "bb_requests",
                "Requests.",
                [([("opcode", "READ")], 5), ([("opcode", "WRITE")], 2)],
            )
        }
    }

    fn get(addr: SocketAddr, path: &str, accept: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_both_text_formats_and_stops_on_drop() {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr();
        let e = l.serve(registry_of(Fixed));
        let plain = get(addr, "/metrics", "text/plain");
        assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
        assert!(plain.contains("version=0.0.4"), "{plain}");
        let body = plain.split("\r\n\r\n").nth(1).unwrap();
        let m = parse_text(body);
        assert_eq!(m["bb_frames_total"], 7.0);
        assert_eq!(m["bb_pages_used"], 3.0);
        assert_eq!(m["bb_requests_total{opcode=\"READ\"}"], 5.0);
        assert_eq!(m["bb_requests_total{opcode=\"WRITE\"}"], 2.0);
        assert!(body.contains("# TYPE bb_requests_total counter"), "{body}");
        let open = get(
            addr,
            "/metrics",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        );
        assert!(open.contains("application/openmetrics-text"), "{open}");
        assert!(open.trim_end().ends_with("# EOF"), "{open}");
        assert!(get(addr, "/nope", "*/*").starts_with("HTTP/1.1 404"));
        assert_eq!(e.scrapes(), 2);
        drop(e);
        // tiny_http's acceptor closes the socket as it notices, just after.
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(addr).is_ok() {
            assert!(t.elapsed() < Duration::from_secs(5), "the port stays open");
            std::thread::sleep(Duration::from_millis(10));
        }
        Listener::bind(addr).expect("the port is free again");
    }

    #[test]
    fn a_taken_port_is_one_clear_error() {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let e = Listener::bind(l.local_addr()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot serve metrics on {}: ", l.local_addr())),
            "{e}"
        );
    }
}
