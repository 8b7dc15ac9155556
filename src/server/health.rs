//! `grpc.health.v1` as its spec has it: tonic-health's service, except that a Watch on a service the server
//! does not know answers one SERVICE_UNKNOWN message and keeps the call open (the spec: "MUST NOT terminate
//! the call"; a service that became known would send its status next), where tonic-health ends it NOT_FOUND.
//! The server's services are known from the start, so such a Watch stays quiet until the client or the
//! shutdown ends it. Check answers NOT_FOUND for an unknown service, as the spec says.
//!
//! Besides `""` and the API's service, [`ADAPTERS_HEALTH_SERVICE`] reports the adapters folder
//! ([`watch_adapters_folder`]): NOT_SERVING while a look at it has hung (a dead NFS server), when requests
//! naming adapters fail and the base model's are still served. Probes choose which they watch.

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::lora::cache::AdapterCache;
use crate::telemetry as t;

/// The `grpc.health.v1` service that reports the adapters folder (see the module header).
pub const ADAPTERS_HEALTH_SERVICE: &str = "loraserve.adapters";

/// The health service whose statuses `reporter` sets.
pub fn service(reporter: HealthReporter) -> HealthServer<SpecHealth> {
    HealthServer::new(SpecHealth(HealthService::from_health_reporter(reporter)))
}

/// tonic-health's service with the spec's Watch (see the module header).
pub struct SpecHealth(HealthService);

#[tonic::async_trait]
impl Health for SpecHealth {
    async fn check(&self, req: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.0.check(req).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(&self, req: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        match self.0.watch(req).await {
            Ok(statuses) => Ok(Response::new(Box::pin(statuses.into_inner()))),
            Err(s) if s.code() == Code::NotFound => {
                let unknown = HealthCheckResponse { status: ServingStatus::ServiceUnknown.into() };
                Ok(Response::new(Box::pin(tokio_stream::once(Ok(unknown)).chain(tokio_stream::pending()))))
            }
            Err(s) => Err(s),
        }
    }
}

/// Reports the adapters folder as [`ADAPTERS_HEALTH_SERVICE`] (SERVING when called) until `stop`, and then
/// NOT_SERVING: SERVING while the folder answers every look at it ([`AdapterCache::look`]: a request's, each
/// step of a listing ([`AdapterCache::listing`]), or the root's re-check every two seconds) within the
/// cache's default wait (what a request without a deadline waits), and NOT_SERVING while it has left one
/// waiting longer. Checked a few
/// times a wait, at most a second apart; each check also sets [`t::ADAPTERS_FOLDER_LOOK_SECONDS`]. The
/// status's only writer while the server runs.
pub async fn watch_adapters_folder(cache: AdapterCache, reporter: HealthReporter, mut stop: watch::Receiver<bool>) {
    const SERVICE: &str = ADAPTERS_HEALTH_SERVICE;
    let limit = cache.config().default_wait;
    let mut answering = true;
    let mut tick = tokio::time::interval((limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        let silence = cache.longest_silence().unwrap_or_default();
        metrics::gauge!(t::ADAPTERS_FOLDER_LOOK_SECONDS).set(silence.as_secs_f64());
        if (silence <= limit) == answering {
            continue;
        }
        answering = !answering;
        if answering {
            tracing::info!("the adapters folder answers again: `{SERVICE}` is SERVING");
            reporter.set_service_status(SERVICE, tonic_health::ServingStatus::Serving).await;
        } else {
            tracing::warn!(
                unanswered_s = silence.as_secs_f64(),
                "the adapters folder has left a look unanswered (a hung file system?): `{SERVICE}` is NOT_SERVING"
            );
            reporter.set_service_status(SERVICE, tonic_health::ServingStatus::NotServing).await;
        }
    }
    reporter.set_service_status(SERVICE, tonic_health::ServingStatus::NotServing).await;
}
