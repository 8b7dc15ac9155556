//! Health and shutting down: SIGTERM's drain in process (the binary's in `server_binary.rs`): in-flight
//! requests finish while health says NOT_SERVING and `/metrics` still answers; past `--drain-timeout` the
//! requests left are failed and connections that would hold the server (a client that stopped reading, a
//! health Watch) are closed; an engine that died stops the server with an error; a hung adapters folder has
//! a health status of its own.

mod common;

use std::time::Duration;

use common::fixture;
use common::serve::{config, req, start};
use loraserve::lora::cache::MAX_LOOKUPS;
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::{GenerateRequest, ListAdaptersRequest, UnloadAdapterRequest};
use loraserve::server::{ADAPTERS_HEALTH_SERVICE, SERVICE_NAME};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_in_flight_requests_and_reports_not_serving() {
    let (h, c) = start(config(fixture("llama/adapters"))).await;
    let mut c1 = c.clone();
    let running = tokio::spawn(async move { c1.generate(req("qv-r4", "alpha beta gamma", 60)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let channel = Channel::from_shared(format!("http://{}", h.grpc_addr)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    h.shutdown();
    tokio::time::sleep(Duration::from_millis(20)).await;
    if let Ok(s) = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await {
        assert_eq!(s.into_inner().status(), tonic_health::pb::health_check_response::ServingStatus::NotServing);
    }
    let r = running.await.unwrap().expect("the in-flight request finishes");
    assert_eq!(r.into_inner().token_ids.len(), 60);
    h.wait().await.unwrap();
}

/// A client that stops reading its stream (its flow-control window full), or holds a health Watch, cannot
/// hold the server past the drain: the requests still running at `--drain-timeout` are failed, and the
/// connections still open shortly after are closed, so the client sees its call end (before, the server
/// stopped waiting for them but their tasks lived on in process). Not a timing target: without the fix the
/// connection lives as long as its client; 30 s stands for "never".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_cannot_hold_the_drain() {
    let mut cfg = config(fixture("llama/adapters"));
    cfg.drain_timeout = Duration::from_millis(300);
    let (h, _) = start(cfg).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", h.grpc_addr))
        .unwrap()
        .initial_stream_window_size(Some(0))
        .connect()
        .await
        .unwrap();
    let mut c = LoraServeClient::new(channel);
    let stalled = c.generate_stream(GenerateRequest { ignore_eos: true, ..req("", "alpha", 200) }).await.unwrap();
    let engine = h.engine().unwrap();
    let since = std::time::Instant::now();
    while engine.stats().running.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(since.elapsed() < Duration::from_secs(30), "the request never ran");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    h.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(30), h.wait()).await;
    stopped.expect("the server stopped while its client held the stream unread").unwrap();
    let mut stalled = stalled.into_inner();
    let ended =
        tokio::time::timeout(Duration::from_secs(30), async { while let Ok(Some(_)) = stalled.message().await {} });
    ended.await.expect("the unread stream's connection was closed");
    // A health Watch never ends of itself (a load balancer or sidecar holds one): it is cut the same way.
    let mut cfg = config(fixture("llama/adapters"));
    cfg.drain_timeout = Duration::from_millis(300);
    let (h, _) = start(cfg).await;
    let channel = Channel::from_shared(format!("http://{}", h.grpc_addr)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    let first = watch.get_mut().message().await.unwrap().unwrap();
    assert_eq!(first.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    h.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(30), h.wait()).await;
    stopped.expect("the server stopped while a health Watch was open").unwrap();
    let mut watch = watch.into_inner();
    let ended =
        tokio::time::timeout(Duration::from_secs(30), async { while let Ok(Some(_)) = watch.message().await {} });
    ended.await.expect("the Watch's connection was closed");
}

/// `/metrics` answers through the whole drain (Prometheus sees its last requests), and stops with the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_served_until_the_drain_ends() {
    let (h, c) = start(config(fixture("llama/adapters"))).await;
    // 32 requests of 256 tokens: 8192 decode rows to drain, far longer than a scrape.
    let running: Vec<_> = (0..32)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.generate(req(if i % 2 == 0 { "qv-r4" } else { "" }, "alpha", 256)).await })
        })
        .collect();
    // All 32 in the engine before the drain starts (a request arriving after it is refused UNAVAILABLE).
    let stats = h.engine().unwrap();
    let in_engine = || {
        let s = stats.stats();
        s.pending.load(std::sync::atomic::Ordering::Relaxed) + s.running.load(std::sync::atomic::Ordering::Relaxed)
    };
    let since = std::time::Instant::now();
    while in_engine() < 32 && !running.iter().any(|r| r.is_finished()) {
        assert!(since.elapsed() < Duration::from_secs(30), "requests never reached the engine");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    h.shutdown();
    let mut scrapes = 0;
    while running.iter().any(|r| !r.is_finished()) {
        let text = common::metrics_text(h.metrics_addr).await;
        assert!(text.contains("loraserve_build_info"), "scrape during the drain: {text:?}");
        scrapes += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(scrapes > 0, "the requests ended before the first scrape: the test showed nothing");
    for r in running {
        assert_eq!(r.await.unwrap().expect("drained").into_inner().token_ids.len(), 256);
    }
    let addr = h.metrics_addr;
    h.wait().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "/metrics still up after the server stopped");
}

/// An engine thread that stops on its own (it died of a bug) stops the server with an error, so the
/// orchestrator restarts it, instead of a live process failing every request while its health says SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_engine_stops_the_server_with_an_error() {
    let (h, mut c) = start(config(fixture("llama/adapters"))).await;
    c.generate(req("", "alpha", 2)).await.unwrap();
    let engine = h.engine().unwrap();
    tokio::task::spawn_blocking(move || engine.shutdown(Duration::ZERO)).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(20), h.wait()).await.expect("the server stopped");
    let e = stopped.unwrap_err().to_string();
    assert!(e.contains("engine thread stopped unexpectedly"), "{e}");
}

/// A hung adapters folder (here, every one of the cache's turns held by a look that blocks until the test
/// lets it go) turns the health service `loraserve.adapters` NOT_SERVING once it has left a look unanswered
/// past the cache's wait (300 ms here), and SERVING when they end, while `""` and the API's service stay
/// SERVING and the base model is served; calls that look at the folder are UNAVAILABLE after that wait
/// without a deadline, and DEADLINE_EXCEEDED with one; the gauge shows the longest unanswered look. The
/// shutdown turns it NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_adapters_folder_has_its_own_health_status() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (h, mut c) = start(config(fixture("llama/adapters"))).await;
    let channel = Channel::from_shared(format!("http://{}", h.grpc_addr)).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let ask = |service: &str| HealthCheckRequest { service: service.into() };
    let mut watch = health.watch(ask(ADAPTERS_HEALTH_SERVICE)).await.unwrap().into_inner();
    let mut next = async || {
        let m = tokio::time::timeout(Duration::from_secs(30), watch.message()).await.expect("a status in 30 s");
        m.unwrap().expect("the Watch goes on").status()
    };
    assert_eq!(next().await, ServingStatus::Serving, "SERVING once ready");

    let (open, cache) = (std::sync::Arc::new(AtomicBool::new(false)), h.cache().unwrap());
    let since = std::time::Instant::now();
    let hung: Vec<_> = (0..MAX_LOOKUPS)
        .map(|_| {
            let (cache, open) = (cache.clone(), open.clone());
            let wait = move |_: &_| {
                while !open.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            };
            tokio::spawn(async move { cache.look(wait).await })
        })
        .collect();
    assert_eq!(next().await, ServingStatus::NotServing);
    assert!(since.elapsed() >= Duration::from_millis(300), "NOT_SERVING before a look went unanswered past the wait");
    for service in ["", SERVICE_NAME] {
        let s = health.check(ask(service)).await.unwrap().into_inner().status();
        assert_eq!(s, ServingStatus::Serving, "`{service}`");
    }
    assert_eq!(c.generate(req("", "alpha", 2)).await.unwrap().into_inner().token_ids.len(), 2);
    let e = c.list_adapters(ListAdaptersRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("listing adapters: the adapters folder did not answer in 0.3 s"), "{e:?}");
    let unload = UnloadAdapterRequest { adapter_id: "never-loaded".into() };
    assert_eq!(c.unload_adapter(unload.clone()).await.unwrap_err().code(), tonic::Code::Unavailable);
    let mut within = tonic::Request::new(ListAdaptersRequest {});
    within.set_timeout(Duration::from_millis(200));
    assert_eq!(c.list_adapters(within).await.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    // Other tests' servers in this process set the same gauge (to 0): one of the scrapes shows this one's.
    let mut silence = 0.0;
    while silence < 0.3 {
        assert!(since.elapsed() < Duration::from_secs(30), "the gauge never showed the hung look");
        let text = common::metrics_text(h.metrics_addr).await;
        let line = text.lines().find(|l| l.starts_with("loraserve_adapters_folder_look_seconds "));
        silence = line.expect("the gauge is exported").rsplit(' ').next().unwrap().parse().unwrap();
    }

    open.store(true, Ordering::Release);
    for look in hung {
        look.await.unwrap().unwrap();
    }
    assert_eq!(next().await, ServingStatus::Serving);
    assert!(c.list_adapters(ListAdaptersRequest {}).await.is_ok());
    let e = c.unload_adapter(unload).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    h.shutdown();
    assert_eq!(next().await, ServingStatus::NotServing);
    drop(watch);
    h.wait().await.unwrap();
}
