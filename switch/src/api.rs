//! The controller's local control API: JSON lines over a Unix socket. Each request is one
//! line, `{"cmd": "...", ...}`; each answer one line, `{"ok": <result>}` or `{"error": "..."}`.
//! Connections are served concurrently; the controller handles one request at a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Controller, CtlError, HostSpec};

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Liveness: answers `"pong"`.
    Ping,
    /// Register (or re-register) a host.
    RegisterHost(HostSpec),
    /// Withdraw a host.
    UnregisterHost {
        /// Host id.
        id: u16,
    },
    /// The registered hosts.
    Hosts,
    /// Every host's health and occupancy, and where new pages go.
    Status,
    /// Every route.
    Routes,
    /// The failovers done so far (replicated hosts whose backup took over).
    Failovers,
    /// The health checks: set how often (ms) and how many misses in a row declare a host
    /// dead (each optional); answers both as they are then.
    Health {
        /// Milliseconds between rounds (1 to 60,000).
        #[serde(default)]
        interval_ms: Option<u64>,
        /// Misses in a row (1 to 1,000).
        #[serde(default)]
        misses: Option<u32>,
    },
    /// Switch and per-host counters.
    Counters,
    /// The pages with the most requests.
    HotPages {
        /// How many.
        top: usize,
    },
    /// Move a page to another host; clients keep its address.
    Migrate {
        /// The page's address.
        page: String,
        /// The host to move it to.
        to: u16,
    },
    /// Who holds pages on a host, and how long each has been silent.
    Owners {
        /// Host id.
        host: u16,
    },
    /// Free every page an owner holds on a host (shared and detached ones included).
    Reclaim {
        /// Host id.
        host: u16,
        /// The owner's address.
        owner: String,
    },
}

/// The answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// Done; the result.
    Ok(serde_json::Value),
    /// Refused; why.
    Error(String),
}

/// Errors of talking to the controller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached or broke.
    #[error("talking to the controller at {path}: {source} (is `bluebridge-ctl daemon` running?)")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The controller refused the request.
    #[error("the controller refused: {0}")]
    Refused(String),
    /// An answer that is not JSON of the expected shape.
    #[error("a malformed answer from the controller: {0}")]
    Malformed(String),
}

fn execute(ctl: &mut Controller, req: Request) -> Result<serde_json::Value, CtlError> {
    let json = |v: Result<serde_json::Value, serde_json::Error>| {
        v.map_err(|e| CtlError::Invalid(format!("encoding the answer: {e}")))
    };
    match req {
        Request::Ping => Ok("pong".into()),
        Request::RegisterHost(spec) => {
            ctl.register(spec)?;
            Ok(serde_json::Value::Null)
        }
        Request::UnregisterHost { id } => {
            ctl.unregister(id)?;
            Ok(serde_json::Value::Null)
        }
        Request::Hosts => json(serde_json::to_value(ctl.hosts())),
        Request::Status => json(serde_json::to_value(ctl.status())),
        Request::Routes => json(serde_json::to_value(ctl.routes()?)),
        Request::Failovers => json(serde_json::to_value(ctl.failovers())),
        Request::Health {
            interval_ms,
            misses,
        } => {
            if let Some(ms) = interval_ms {
                if !(1..=60_000).contains(&ms) {
                    return Err(CtlError::Invalid(format!("interval {ms} ms: 1 to 60000")));
                }
                ctl.set_health_interval(Duration::from_millis(ms));
            }
            if let Some(n) = misses {
                if !(1..=1000).contains(&n) {
                    return Err(CtlError::Invalid(format!("misses {n}: 1 to 1000")));
                }
                ctl.set_misses_allowed(n);
            }
            let (every, misses) = ctl.health_config();
            Ok(serde_json::json!({
                "interval_ms": every.map(|d| d.as_millis() as u64),
                "misses": misses,
            }))
        }
        Request::Counters => json(serde_json::to_value(ctl.counters()?)),
        Request::HotPages { top } => json(serde_json::to_value(ctl.hot_pages(top)?)),
        Request::Migrate { .. } | Request::Owners { .. } | Request::Reclaim { .. } => {
            unreachable!("answered without the lock held")
        }
    }
}

/// Answers one request line.
pub fn answer(ctl: &Mutex<Controller>, line: &str) -> Response {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return Response::Error(format!("not a request: {e}")),
    };
    // Requests that do network I/O take the lock only for their decisions.
    fn respond<V: Serialize>(r: Result<V, CtlError>) -> Response {
        match r.map(serde_json::to_value) {
            Ok(Ok(v)) => Response::Ok(v),
            Ok(Err(e)) => Response::Error(format!("encoding the answer: {e}")),
            Err(e) => Response::Error(e.to_string()),
        }
    }
    match &req {
        Request::Migrate { page, to } => return respond(crate::actions::migrate(ctl, page, *to)),
        Request::Owners { host } => return respond(crate::actions::owners(ctl, *host)),
        Request::Reclaim { host, owner } => {
            return respond(crate::actions::reclaim(ctl, *host, owner));
        }
        _ => {}
    }
    let mut ctl = crate::actions::lock(ctl);
    let r = execute(&mut ctl, req);
    match (r, ctl.release()) {
        (Ok(v), Ok(())) => Response::Ok(v),
        (Err(e), _) | (_, Err(e)) => Response::Error(e.to_string()),
    }
}

fn serve_connection(ctl: &Mutex<Controller>, stream: UnixStream) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r = answer(ctl, &line);
        let mut text = serde_json::to_string(&r)
            .unwrap_or_else(|e| format!("{{\"error\":\"encoding the answer: {e}\"}}"));
        text.push('\n');
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// Serves `ctl` on a Unix socket at `path` (replacing a stale one) until `stop` is set.
pub fn serve(ctl: Arc<Mutex<Controller>>, path: &Path, stop: &AtomicBool) -> std::io::Result<()> {
    if path.exists() {
        // A live daemon would answer; a dead one's socket is in the way.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("a controller already answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    tracing::info!(socket = %path.display(), "controller listening");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                let ctl = ctl.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve_connection(&ctl, stream) {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Sends one request to the controller at `path` and returns its result.
pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, ApiError> {
    let io = |source| ApiError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ApiError::Malformed(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(io)?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok(v)) => Ok(v),
        Ok(Response::Error(e)) => Err(ApiError::Refused(e)),
        Err(e) => Err(ApiError::Malformed(format!("{e}: {answer}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let r = Request::RegisterHost(HostSpec {
            id: 3,
            server_port: "p3".into(),
            server_mac: "02:bb:01:00:03:01".into(),
            client_port: None,
            client_mac: None,
            client_net: None,
            replicas: None,
        });
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"register-host","id":3,"server_port":"p3","server_mac":"02:bb:01:00:03:01","client_port":null,"client_mac":null,"client_net":null}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"hot-pages","top":5}"#).unwrap(),
            Request::HotPages { top: 5 }
        );
        assert_eq!(
            serde_json::to_string(&Response::Error("no".into())).unwrap(),
            r#"{"error":"no"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Ok("pong".into())).unwrap(),
            r#"{"ok":"pong"}"#
        );
    }
}
