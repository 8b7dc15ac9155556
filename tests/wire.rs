//! The gRPC wire below the messages, against the real server on port 0: request streams cut short or framed
//! wrong, compressed requests (gzip and deflate, as grpcio, grpc-go and grpc-java channels send them), the
//! HTTP/2 limits the server advertises, and status messages sized for the header that carries them.

mod common;

use std::time::Duration;

use common::fixture;
use common::serve::{config, req, start};
use common::wire::{frame, grpc_request, h2_connect, raw_call, raw_call_with_timeout};
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::{
    DetokenizeRequest, ListAdaptersRequest, LoadAdapterRequest, TokenizeRequest, UnloadAdapterRequest,
};
use prost::Message;
use tonic::codec::CompressionEncoding;
use tonic::Code;

/// Held by every test here, since some count calls: the metrics recorder is the process's, shared by them all.
static COUNTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `loraserve_requests_total{rpc, code}` in a `/metrics` text.
fn counted(text: &str, rpc: &str, code: &str) -> u64 {
    let series = format!("loraserve_requests_total{{rpc=\"{rpc}\",code=\"{code}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |v| v.trim().parse::<u64>().unwrap())
}

/// A request malformed below protobuf, which tonic answers INTERNAL, is INVALID_ARGUMENT and counted so: a
/// stream that ends before its message is whole (no message; a frame whose length runs past the body), a
/// compressed flag without `grpc-encoding` or with `identity`, a flag of 2, bytes that do not decompress. The
/// client's fault is no server error for the alerts (`loraserve_requests_total{code="INTERNAL"}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_malformed_below_protobuf_are_invalid_argument_not_internal() {
    let _counting = COUNTING.lock().await;
    let (h, _) = start(config(fixture("llama/adapters"))).await;
    let message = req("", "alpha", 2).encode_to_vec();
    // (grpc-encoding, body, what the message names)
    let cases = [
        (None, vec![], "Missing request message."),
        (None, vec![0, 0, 0, 0, 100, 0x12, 0x01, b'a'], "Unexpected EOF decoding stream."),
        (None, frame(1, &message), "compressed-flag but no grpc-encoding"),
        (Some("identity"), frame(1, &message), "compressed-flag but no grpc-encoding"),
        (None, frame(2, &message), "invalid compression flag: 2"),
        (Some("gzip"), frame(1, &message), "Error decompressing"),
    ];
    let before = common::metrics_text(h.metrics_addr).await;
    for (encoding, body, words) in cases {
        let headers: Vec<_> = encoding.map(|e| ("grpc-encoding", e)).into_iter().collect();
        let (code, msg) = raw_call(h.grpc_addr, "GenerateStream", &headers, body).await;
        assert_eq!(code, Code::InvalidArgument, "{words}: {msg}");
        assert!(msg.starts_with("malformed request: ") && msg.contains(words), "{msg}");
        assert!(!msg.contains("while sending request"), "the server receives: {msg}");
    }
    let after = common::metrics_text(h.metrics_addr).await;
    let invalid = |t: &str| counted(t, "GenerateStream", "INVALID_ARGUMENT");
    assert_eq!(invalid(&after), invalid(&before) + 6, "{after}");
    assert_eq!(counted(&after, "GenerateStream", "INTERNAL"), 0, "{after}");
    h.shutdown();
    h.wait().await.unwrap();
}

/// Compressed requests are served as the same request uncompressed (grpcio with a channel's `compression`
/// failed every call UNIMPLEMENTED), and one past `--max-request-bytes` once decompressed is OUT_OF_RANGE,
/// as it is uncompressed (tonic answers RESOURCE_EXHAUSTED for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_requests_are_served_and_bounded_once_decompressed() {
    let _counting = COUNTING.lock().await;
    let (h, mut plain) = start(config(fixture("llama/adapters"))).await;
    let r = req("qv-r4", "alpha", 6);
    let want = plain.generate(r.clone()).await.unwrap().into_inner().token_ids;
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut c =
            LoraServeClient::connect(format!("http://{}", h.grpc_addr)).await.unwrap().send_compressed(encoding);
        assert_eq!(c.generate(r.clone()).await.unwrap().into_inner().token_ids, want, "{encoding:?}");
        let mut stream = c.generate_stream(r.clone()).await.unwrap().into_inner();
        let mut streamed = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            streamed.extend(m.token_ids);
        }
        assert_eq!(streamed, want, "{encoding:?}");
        // 64 KiB is the test server's limit; a megabyte of one letter compresses to a few KiB.
        let big = req("", &"a".repeat(1 << 20), 1);
        let s = c.generate(big.clone()).await.unwrap_err();
        assert_eq!(s.code(), Code::OutOfRange, "{encoding:?}: {s:?}");
        assert_eq!(plain.generate(big).await.unwrap_err().code(), Code::OutOfRange);
    }
    h.shutdown();
    h.wait().await.unwrap();
}

/// The server bounds the streams one connection holds open (tonic sets no limit: one connection opened 14,250
/// streams that never sent a message, 9 KiB each, until the socket closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_bounds_the_streams_a_connection_holds() {
    let _counting = COUNTING.lock().await;
    let (h, _) = start(config(fixture("llama/adapters"))).await;
    // The server's SETTINGS arrive with the connection's first exchange.
    let (mut send, _connection) = h2_connect(h.grpc_addr).await;
    let mut limit = send.current_max_send_streams();
    for _ in 0..100 {
        if limit != usize::MAX {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        send = send.ready().await.unwrap();
        limit = send.current_max_send_streams();
    }
    assert_eq!(limit, 1024);
    h.shutdown();
    h.wait().await.unwrap();
}

/// A status message travels percent-encoded in a header, where a space or each byte of a non-ASCII character
/// takes three: the server bounds it as it goes out (an `x-adapter-id` header against a long body id came to
/// 12 KiB, and grpcio dropped the answer at its 8 KiB limit as RESOURCE_EXHAUSTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_messages_fit_the_header_that_carries_them() {
    let _counting = COUNTING.lock().await;
    let (h, mut c) = start(config(fixture("llama/adapters"))).await;
    let mut r = tonic::Request::new(req(&"é".repeat(4000), "alpha", 2));
    r.metadata_mut().insert("x-adapter-id", "qv-r4".parse().unwrap());
    let s = c.generate(r).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("x-adapter-id: header `qv-r4` disagrees with adapter_id `éé"), "{}", s.message());
    let mut header = http::HeaderMap::new();
    s.add_header(&mut header).unwrap();
    assert!(header["grpc-message"].len() <= 4096, "{}", header["grpc-message"].len());
    h.shutdown();
    h.wait().await.unwrap();
}

/// A call whose deadline passes before its request message has arrived is answered DEADLINE_EXCEEDED, as
/// grpc-go answers it, and counted so (tonic's own timer answered CANCELLED "Timeout expired").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_that_passes_before_the_message_is_deadline_exceeded() {
    let _counting = COUNTING.lock().await;
    let (h, _) = start(config(fixture("llama/adapters"))).await;
    let before = common::metrics_text(h.metrics_addr).await;
    let (mut send, _connection) = h2_connect(h.grpc_addr).await;
    for (method, partial) in
        [("Generate", vec![]), ("GenerateStream", frame(0, &req("", "alpha", 2).encode_to_vec())[..6].to_vec())]
    {
        let request = grpc_request(h.grpc_addr, method).header("grpc-timeout", "200m").body(()).unwrap();
        // The headers and part of a message, and the stream left open.
        let (response, mut stream) = send.send_request(request, false).unwrap();
        if !partial.is_empty() {
            stream.send_data(partial.into(), false).unwrap();
        }
        let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
        let status = tonic::Status::from_header_map(response.headers()).expect("a trailers-only answer");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{method}: {status:?}");
        assert_eq!(status.message(), "deadline exceeded before the request message arrived");
        send = send.ready().await.unwrap();
    }
    // A deadline already past is not met by a load that needs no wait (the adapter is resident), nor by a
    // short text's Tokenize or Detokenize, nor by a listing or an unload.
    let load = LoadAdapterRequest { adapter_id: "qv-r4".into() }.encode_to_vec();
    let tokenize = TokenizeRequest { adapter_id: "qv-r4".into(), prompt: "alpha".into(), ..Default::default() };
    let detokenize = DetokenizeRequest { token_ids: vec![1, 2], ..Default::default() }.encode_to_vec();
    let list = ListAdaptersRequest {}.encode_to_vec();
    let unload = UnloadAdapterRequest { adapter_id: "qv-r4".into() }.encode_to_vec();
    let calls = [
        ("LoadAdapter", load),
        ("Tokenize", tokenize.encode_to_vec()),
        ("Detokenize", detokenize),
        ("ListAdapters", list),
        ("UnloadAdapter", unload),
    ];
    for (method, message) in calls {
        let raw =
            async |timeout: &str| raw_call(h.grpc_addr, method, &[("grpc-timeout", timeout)], frame(0, &message)).await;
        assert_eq!(raw("30S").await.0, Code::Ok, "{method}");
        for timeout in ["0n", "1n", "1u"] {
            let (code, msg) = raw(timeout).await;
            assert_eq!(code, Code::DeadlineExceeded, "{method} {timeout}: {msg}");
        }
    }
    let after = common::metrics_text(h.metrics_addr).await;
    for rpc in ["Generate", "GenerateStream"] {
        assert_eq!(
            counted(&after, rpc, "DEADLINE_EXCEEDED"),
            counted(&before, rpc, "DEADLINE_EXCEEDED") + 1,
            "{after}"
        );
        assert_eq!(counted(&after, rpc, "CANCELLED"), counted(&before, rpc, "CANCELLED"), "{after}");
    }
    h.shutdown();
    h.wait().await.unwrap();
}

/// An HTTP request that is no gRPC call is refused before routing, as grpc-go refuses it: a method other
/// than POST with HTTP 405, a content-type other than `application/grpc…` with HTTP 415 (tonic ran a GET's
/// generation, and answered a JSON body HTTP 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_requests_that_are_no_grpc_call_are_refused() {
    let _counting = COUNTING.lock().await;
    let (h, mut c) = start(config(fixture("llama/adapters"))).await;
    let (mut send, _connection) = h2_connect(h.grpc_addr).await;
    let body = frame(0, &req("", "alpha", 2).encode_to_vec());
    for (method, content_type, http_status, code, words) in [
        ("GET", "application/grpc", 405, Code::Internal, "method GET is not allowed"),
        ("POST", "application/json", 415, Code::InvalidArgument, "content-type `application/json` is not gRPC"),
        ("POST", "", 415, Code::InvalidArgument, "no content-type is not gRPC"),
    ] {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/loraserve.v1.LoraServe/Generate", h.grpc_addr))
            .header("te", "trailers");
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        let (response, mut stream) = send.send_request(request.body(()).unwrap(), false).unwrap();
        // The refusal may have come, and closed the stream, before the body goes out.
        let _ = stream.send_data(body.clone().into(), true);
        let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
        assert_eq!(response.status().as_u16(), http_status, "{method} {content_type}");
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), code);
        assert!(status.message().contains(words), "{}", status.message());
        send = send.ready().await.unwrap();
    }
    assert!(c.generate(req("", "alpha", 2)).await.is_ok(), "gRPC calls are served");
    h.shutdown();
    h.wait().await.unwrap();
}

/// A health Watch on a service the server does not know gets one SERVICE_UNKNOWN message and stays open, as
/// the health-checking spec says (tonic-health ended it NOT_FOUND); Check answers NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_health_watch_on_an_unknown_service_is_service_unknown_and_stays_open() {
    let _counting = COUNTING.lock().await;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let (h, _) = start(config(fixture("llama/adapters"))).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.grpc_addr)).unwrap();
    let mut health = HealthClient::new(channel.connect().await.unwrap());
    let ask = |service: &str| HealthCheckRequest { service: service.into() };
    let mut unknown = health.watch(ask("nope.v1.Nope")).await.unwrap().into_inner();
    let first = unknown.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::ServiceUnknown);
    let next = tokio::time::timeout(Duration::from_millis(300), unknown.message()).await;
    assert!(next.is_err(), "the call stays open: {next:?}");
    let mut known = health.watch(ask("loraserve.v1.LoraServe")).await.unwrap().into_inner();
    assert_eq!(known.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
    assert_eq!(health.check(ask("nope.v1.Nope")).await.unwrap_err().code(), Code::NotFound);
    // Watches end with their connection: closed here, not held until the drain's end.
    drop((unknown, known, health));
    h.shutdown();
    h.wait().await.unwrap();
}

/// A client that goes away before its request message is whole (its connection closed, or the stream reset)
/// is counted CANCELLED, or DEADLINE_EXCEEDED close to its deadline: tonic answers the connection's end
/// UNKNOWN, which set off the server-error alert (`code=~"INTERNAL|UNKNOWN|DATA_LOSS"`), and the reset as a
/// stream cut short (INVALID_ARGUMENT).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_gone_before_its_message_is_whole_is_cancelled() {
    let _counting = COUNTING.lock().await;
    let (h, _) = start(config(fixture("llama/adapters"))).await;
    let before = common::metrics_text(h.metrics_addr).await;
    let half = frame(0, &req("", "alpha", 2).encode_to_vec())[..6].to_vec();
    // (method, reset rather than close, grpc-timeout, leaving after ms): 520 ms is past the last quarter of
    // 600 ms less its margin (from 428 ms on), 50 ms of 10 s is not.
    let cases = [
        ("Generate", false, None, 50),
        ("GenerateStream", false, None, 50),
        ("Generate", true, Some("10S"), 50),
        ("GenerateStream", true, None, 50),
        ("Generate", true, Some("600m"), 520),
        ("GenerateStream", false, Some("600m"), 520),
    ];
    for (method, reset, timeout, after_ms) in cases {
        let (mut send, connection) = h2_connect(h.grpc_addr).await;
        let mut request = grpc_request(h.grpc_addr, method);
        if let Some(t) = timeout {
            request = request.header("grpc-timeout", t);
        }
        let (response, mut stream) = send.send_request(request.body(()).unwrap(), false).unwrap();
        stream.send_data(half.clone().into(), false).unwrap();
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        if reset {
            stream.send_reset(h2::Reason::CANCEL);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop((response, stream, send));
        connection.abort();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = common::metrics_text(h.metrics_addr).await;
    for rpc in ["Generate", "GenerateStream"] {
        assert_eq!(counted(&after, rpc, "CANCELLED"), counted(&before, rpc, "CANCELLED") + 2, "{rpc}: {after}");
        let timed_out = |t: &str| counted(t, rpc, "DEADLINE_EXCEEDED");
        assert_eq!(timed_out(&after), timed_out(&before) + 1, "{rpc}: {after}");
        for code in ["UNKNOWN", "INVALID_ARGUMENT", "INTERNAL"] {
            assert_eq!(counted(&after, rpc, code), counted(&before, rpc, code), "{rpc}: {after}");
        }
    }
    h.shutdown();
    h.wait().await.unwrap();
}

/// A prompt is encoded off the async workers, one encode a core, within the request's deadline: one that
/// passes while a long prompt is encoded is DEADLINE_EXCEEDED naming the encode. (Inline, the encode held an
/// async worker to its end, ~0.5 s for a megabyte, health and every other call waiting behind it, and any
/// number ran at once, ~190 MiB each; its answer came after it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_is_encoded_within_its_deadline() {
    let _counting = COUNTING.lock().await;
    let mut cfg = config(fixture("llama/adapters"));
    cfg.max_request_bytes = 2 << 20;
    let (h, mut c) = start(cfg).await;
    // A megabyte arrives within milliseconds on loopback and takes the fixture's tokenizer ~0.33 s to encode
    // (a release build; longer in a debug one): a 200 ms deadline passes while it is encoded.
    let long = req("", &"lorem ipsum dolor sit amet ".repeat(40_000), 1);
    let (code, msg) = raw_call_with_timeout(h.grpc_addr, "Generate", "200m", &long).await;
    assert_eq!((code, msg.as_str()), (Code::DeadlineExceeded, "deadline exceeded encoding the prompt"));
    assert!(c.generate(req("", "alpha", 2)).await.is_ok());
    h.shutdown();
    h.wait().await.unwrap();
}
