//! The metrics listener: `GET /metrics` (OpenMetrics text), `/healthz` (live) and `/readyz`
//! (ready), each 200 or 503 with a one-line reason. HTTP/1.1 by `hyper`, one task per connection,
//! at most [`MAX_CONNECTIONS`] at once and [`HEADER_TIMEOUT`] to send a request's head, so a slow
//! or hostile client holds nothing for long. Whatever is measured comes from a [`MetricsSource`]: a
//! worker process or a pool's supervisor.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Snapshot;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Live and ready, each with why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub live: Result<(), String>,
    pub ready: Result<(), String>,
}

/// What the listener serves.
pub trait MetricsSource: Send + Sync + 'static {
    /// The values now.
    fn snapshot(&self) -> Snapshot;
    /// What `/healthz` and `/readyz` answer.
    fn health(&self) -> Health;
    /// The `/metrics` text.
    fn metrics(&self) -> String {
        self.snapshot().render()
    }
}

/// Several sources on one listener (a worker and the beat it embeds): their metrics side by side,
/// live and ready when all of them are.
pub struct Joined(pub Vec<Arc<dyn MetricsSource>>);

impl MetricsSource for Joined {
    fn snapshot(&self) -> Snapshot {
        let parts: Vec<Snapshot> = self.0.iter().map(|s| s.snapshot()).collect();
        let mut all = Snapshot::merge(&parts);
        all.ready = parts.iter().all(|p| p.ready);
        all
    }

    fn health(&self) -> Health {
        let each: Vec<Health> = self.0.iter().map(|s| s.health()).collect();
        Health {
            live: each.iter().try_for_each(|h| h.live.clone()),
            ready: each.iter().try_for_each(|h| h.ready.clone()),
        }
    }
}

/// Serves `source` on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, source: Arc<dyn MetricsSource>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = stop.cancelled() => return,
        };
        let Ok(permit) = permit else { return };
        let stream = tokio::select! {
            s = listener.accept() => s,
            _ = stop.cancelled() => return,
        };
        let stream = match stream {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = source.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(answer(&req, source.as_ref())) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(error = %e, "metrics connection ended with an error") },
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

fn answer(req: &Request<Incoming>, source: &dyn MetricsSource) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let check = |r: Result<(), String>| match r {
        Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        Err(why) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("{why}\n"),
        ),
    };
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, OPENMETRICS, source.metrics()),
        "/healthz" => check(source.health().live),
        "/readyz" => check(source.health().ready),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}
