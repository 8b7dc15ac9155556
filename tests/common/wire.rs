//! Raw gRPC calls over plain HTTP/2, for what the typed client will not send or cannot show: framing faults,
//! compressed messages, and the status the server answered at a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::Code;

/// `r` sent to LoraServe's `method` with a `grpc-timeout` header: the server's grpc-status and message (after
/// any streamed messages). (tonic's client enforces the header itself, answering CANCELLED "Timeout expired" at
/// the deadline however close behind it the server's answer is: it cannot show what the server answered.)
pub async fn raw_call_with_timeout(
    addr: SocketAddr,
    method: &str,
    timeout: &str,
    r: &impl prost::Message,
) -> (Code, String) {
    raw_call(addr, method, &[("grpc-timeout", timeout)], frame(0, &r.encode_to_vec())).await
}

/// The headers of a call to LoraServe's `method` at `addr` (POST, `application/grpc`, `te: trailers`), to add
/// to.
pub fn grpc_request(addr: SocketAddr, method: &str) -> http::request::Builder {
    http::Request::post(format!("http://{addr}/loraserve.v1.LoraServe/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
}

/// A raw HTTP/2 connection to `addr` (TCP_NODELAY), ready for a stream, and the task that drives it.
pub async fn h2_connect(
    addr: SocketAddr,
) -> (h2::client::SendRequest<bytes::Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    (send.ready().await.unwrap(), connection)
}

/// One gRPC frame: the compressed flag, the length, the bytes.
pub fn frame(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut framed = vec![flag];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    framed
}

/// `body` (gRPC frames, as they are) sent to LoraServe's `method` with `headers` besides the protocol's: the
/// server's grpc-status and message.
pub async fn raw_call(addr: SocketAddr, method: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (Code, String) {
    use http_body_util::{BodyExt, Full};
    // TCP_NODELAY, as tonic's client sets it: else the message waits for the server's delayed ACK (~40 ms).
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, Full<bytes::Bytes>>(connector);
    let mut request = grpc_request(addr, method);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(bytes::Bytes::from(body))).unwrap();
    let answer = async {
        let response = client.request(request).await.unwrap();
        let (http_status, headers) = (response.status(), response.headers().clone());
        let body = response.into_body().collect().await.unwrap();
        (http_status, headers, body.trailers().cloned().unwrap_or_default())
    };
    let (http_status, headers, trailers) = tokio::time::timeout(Duration::from_secs(30), answer).await.unwrap();
    // A trailers-only answer carries its status in the headers.
    let status = tonic::Status::from_header_map(&trailers).or_else(|| tonic::Status::from_header_map(&headers));
    let status = status.unwrap_or_else(|| panic!("no grpc-status (HTTP {http_status})"));
    (status.code(), status.message().to_string())
}
