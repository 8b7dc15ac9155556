//! The Prometheus side: one process-wide recorder (installed once, histogram buckets from
//! [`crate::telemetry`]) and a `/metrics` route on its own listener (axum, which tonic already brings), so
//! tests can bind it to port 0.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::telemetry as t;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder (installed on first use).
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let mut b = PrometheusBuilder::new();
            for (name, buckets) in [
                (t::REQUEST_DURATION_SECONDS, t::LATENCY_BUCKETS),
                (t::TIME_TO_FIRST_TOKEN_SECONDS, t::LATENCY_BUCKETS),
                (t::REQUEST_QUEUE_TIME_SECONDS, t::LATENCY_BUCKETS),
                (t::ADAPTER_LOAD_DURATION_SECONDS, t::LATENCY_BUCKETS),
                (t::INTER_TOKEN_LATENCY_SECONDS, t::TOKEN_LATENCY_BUCKETS),
                (t::BATCH_SIZE, t::BATCH_SIZE_BUCKETS),
            ] {
                b = b.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets).expect("non-empty buckets");
            }
            let h = b.install_recorder().expect("no other metrics recorder is installed");
            t::describe();
            metrics::gauge!(t::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            h
        })
        .clone()
}

/// Whether the recorder is installed yet.
#[cfg(test)]
pub(crate) fn installed() -> bool {
    HANDLE.get().is_some()
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let h = handle();
    let upkeep = h.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = h.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()) }
        }),
    );
    // TCP_NODELAY, as on the gRPC listener: a scrape's last segment does not wait for an ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
        let _ = s.set_nodelay(true);
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
