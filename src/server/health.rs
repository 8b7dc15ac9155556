//! `grpc.health.v1` as its spec has it: tonic-health's service, except that a Watch on a service the server
//! does not know answers one SERVICE_UNKNOWN message and keeps the call open (the spec: "MUST NOT terminate
//! the call"; a service that became known would send its status next), where tonic-health ends it NOT_FOUND.
//! The server's services are known from the start, so such a Watch stays quiet until the client or the
//! shutdown ends it. Check answers NOT_FOUND for an unknown service, as the spec says.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

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
