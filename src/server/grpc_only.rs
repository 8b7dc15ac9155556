//! HTTP requests on the gRPC port that are no gRPC call, refused before routing as gRPC's HTTP/2 protocol
//! says and grpc-go does: a method other than POST gets HTTP 405 with grpc-status INTERNAL, a content-type
//! that is not `application/grpc` (or `application/grpc+<codec>`, `application/grpc;…`) HTTP 415 with
//! INVALID_ARGUMENT, each naming what is wrong (what the request sent quoted in part). tonic routes on the path alone: a GET ran a generation, and a JSON body was
//! read as a gRPC frame, answered HTTP 200 — which a plain HTTP client takes for success.

use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{self, Method, StatusCode};
use tonic::codegen::{BoxFuture, Service};

/// The layer (`Server::builder().layer(GrpcOnly)`).
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcOnly;

impl<S> tower_layer::Layer<S> for GrpcOnly {
    type Service = OnlyGrpc<S>;

    fn layer(&self, inner: S) -> OnlyGrpc<S> {
        OnlyGrpc { inner }
    }
}

/// A service that [`GrpcOnly`] guards.
#[derive(Clone, Debug)]
pub struct OnlyGrpc<S> {
    inner: S,
}

impl<S> Service<http::Request<Body>> for OnlyGrpc<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match refusal(&req) {
            Some(refused) => Box::pin(std::future::ready(Ok(refused))),
            None => Box::pin(self.inner.call(req)),
        }
    }
}

/// The answer to `req` when it is no gRPC call.
fn refusal<B>(req: &http::Request<B>) -> Option<http::Response<Body>> {
    let (status, answer) = if req.method() != Method::POST {
        let method = quoted(req.method().as_str().as_bytes());
        (
            StatusCode::METHOD_NOT_ALLOWED,
            tonic::Status::internal(format!("method {method} is not allowed: gRPC calls are POST")),
        )
    } else {
        let content_type = req.headers().get(http::header::CONTENT_TYPE);
        if content_type.and_then(|v| v.to_str().ok()).is_some_and(is_grpc) {
            return None;
        }
        let given = match content_type {
            None => "no content-type".to_string(),
            Some(v) => format!("content-type `{}`", quoted(v.as_bytes())),
        };
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            tonic::Status::invalid_argument(format!("{given} is not gRPC (application/grpc)")),
        )
    };
    let mut response = answer.into_http::<Body>();
    *response.status_mut() = status;
    Some(response)
}

/// What a request sent, for a message: its first 100 characters at most (a header can hold kilobytes).
fn quoted(sent: &[u8]) -> String {
    let text = String::from_utf8_lossy(sent);
    let mut q: String = text.chars().take(100).collect();
    if q.len() < text.len() {
        q.push('…');
    }
    q
}

/// `application/grpc`, alone or followed by `+<codec>` or `;<parameters>`.
fn is_grpc(content_type: &str) -> bool {
    const GRPC: &str = "application/grpc";
    if !content_type.get(..GRPC.len()).is_some_and(|p| p.eq_ignore_ascii_case(GRPC)) {
        return false;
    }
    let rest = &content_type[GRPC.len()..];
    rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, content_type: Option<&str>) -> http::Request<()> {
        let mut r = http::Request::builder().method(method).uri("/loraserve.v1.LoraServe/Generate");
        if let Some(c) = content_type {
            r = r.header(http::header::CONTENT_TYPE, c);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn only_posts_of_grpc_content_pass() {
        for c in ["application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8", "Application/GRPC"] {
            assert!(refusal(&request(Method::POST, Some(c))).is_none(), "{c}");
        }
        for c in
            [None, Some("application/json"), Some("application/grpcx"), Some("text/plain"), Some("application/grp")]
        {
            let r = refusal(&request(Method::POST, c)).unwrap();
            assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{c:?}");
            let s = tonic::Status::from_header_map(r.headers()).unwrap();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(s.message().contains("is not gRPC (application/grpc)"), "{}", s.message());
        }
        let long = format!("text/{}", " ".repeat(15_000));
        let s =
            tonic::Status::from_header_map(refusal(&request(Method::POST, Some(&long))).unwrap().headers()).unwrap();
        assert!(s.message().len() < 200 && s.message().contains("`text/  "), "{}", s.message().len());
        let r = refusal(&request(Method::GET, Some("application/grpc"))).unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        let s = tonic::Status::from_header_map(r.headers()).unwrap();
        assert_eq!(s.message(), "method GET is not allowed: gRPC calls are POST");
    }
}
