//! What deploy/ promises about the server, checked against the real thing:
//! - the Grafana dashboard and the Prometheus alerts query only series that `/metrics` really exports, with
//!   labels those series really carry (PromQL parsed, not grepped);
//! - the rendered Envoy router and Deployment agree with the server's contracts (the affinity header, the
//!   health service name, the ports, the drain timeout);
//! - two replicas behind a router that, like Envoy's ring hash, picks a replica from the `x-adapter-id`
//!   header alone: each adapter's requests land on one replica and only that replica loads it; a header that
//!   disagrees with the body is refused (INVALID_ARGUMENT) before anything is loaded; no header is accepted.
//!
//! `deploy/check.py` (run by `.ci/run`) validates the files themselves: Kubernetes and CRD schemas, Helm
//! lint/render, Envoy's proto schema, hadolint, yamllint.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use common::copy_dir;
use loraserve::engine::EngineConfig;
use loraserve::lora::cache::CacheConfig;
use loraserve::lora::peft::{write_dir, AdapterMeta};
use loraserve::lora::synthetic::{random_adapter, ATTENTION};
use loraserve::model::{LoadOptions, ModelSpec};
use loraserve::quant::QuantMode;
use loraserve::server::client::{request, Target};
use loraserve::server::proto::lora_serve_client::LoraServeClient;
use loraserve::server::proto::{self, GenerateRequest};
use loraserve::server::{self, service::Limits, ServeConfig, ServerHandle, ADAPTER_ID_HEADER, SERVICE_NAME};
use loraserve::telemetry;
use promql_parser::parser::{self, Expr};
use serde_json::Value;
use tonic::Code;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split("\n---\n")
        .map(|doc| serde_norway::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The plain manifests (the chart rendered with deploy/kubernetes/values.yaml; check.py keeps them in sync).
fn manifests() -> Vec<Value> {
    yaml_docs(&repo("deploy/kubernetes/loraserve.yaml"))
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/kubernetes/loraserve.yaml has no {kind}/{name}"))
}

/// The demo model with `adapters`; a small device tier so that loading a few adapters evicts.
fn config(adapters: PathBuf, device_bytes: usize) -> ServeConfig {
    ServeConfig {
        model: ModelSpec::Demo,
        load: LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: Device::Cpu },
        chat_template: None,
        generation_config: true,
        adapters,
        cache: CacheConfig { device_bytes, host_bytes: 256 << 20, default_wait: Duration::from_secs(30) },
        engine: EngineConfig {
            max_batch_rows: 16,
            max_batch_tokens: 256,
            block_size: 8,
            kv_cache_bytes: 16 << 20,
            queue_capacity: 256,
            prefix_caching: true,
        },
        limits: Limits::default(),
        preload: vec![],
        api_keys: None,
        tls: None,
        max_request_bytes: 64 << 10,
        drain_timeout: Duration::from_secs(10),
        template_worker: Some(env!("CARGO_BIN_EXE_server").into()),
    }
}

async fn start(cfg: ServeConfig) -> ServerHandle {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = server::start(cfg, grpc, metrics).await.unwrap();
    assert!(h.ready().await, "server failed to load");
    h
}

/// A folder with the example adapters (`upper`, `reverse`, `persona`) and `extra` random ones (`team/rN`).
fn adapters_dir(extra: usize) -> (tempfile::TempDir, Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut ids = vec![];
    for name in ["upper", "reverse", "persona"] {
        copy_dir(&repo("adapters").join(name), &tmp.path().join(name));
        ids.push(name.to_string());
    }
    let layout = loraserve::model::demo::config().lora_layout();
    let meta = AdapterMeta {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        lora_dropout: 0.0,
        base_model_name_or_path: "demo".into(),
        dtype: DType::F32,
    };
    for i in 0..extra {
        let w = random_adapter(&layout, 4, &ATTENTION, 100 + i as u64, &Device::Cpu).unwrap();
        write_dir(&tmp.path().join(format!("team/r{i}")), &w, &meta).unwrap();
        ids.push(format!("team/r{i}"));
    }
    (tmp, ids)
}

/// Series name → label names, from the Prometheus text exposition.
fn exported_series(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("loraserve_")) {
        let (series, _value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let entry = out.entry(name.to_string()).or_default();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            entry.insert(pair.split_once('=').unwrap().0.to_string());
        }
    }
    out
}

/// Every (metric name, label names it filters or groups on) in a PromQL expression.
fn selectors(expr: &Expr, out: &mut Vec<(String, BTreeSet<String>)>) {
    match expr {
        Expr::VectorSelector(v) => {
            let mut labels: BTreeSet<String> = v.matchers.matchers.iter().map(|m| m.name.clone()).collect();
            labels.remove("__name__");
            out.push((v.name.clone().expect("a metric name"), labels));
        }
        Expr::MatrixSelector(m) => selectors(&Expr::VectorSelector(m.vs.clone()), out),
        Expr::Aggregate(a) => {
            selectors(&a.expr, out);
            if let Some(p) = &a.param {
                selectors(p, out);
            }
            if let Some(promql_parser::parser::LabelModifier::Include(by)) = &a.modifier {
                // `sum by (tier) (x)`: the grouping labels must exist on x.
                let mut inner = vec![];
                selectors(&a.expr, &mut inner);
                for (name, _) in inner {
                    out.push((name, by.labels.iter().cloned().collect()));
                }
            }
        }
        Expr::Unary(u) => selectors(&u.expr, out),
        Expr::Binary(b) => {
            selectors(&b.lhs, out);
            selectors(&b.rhs, out);
        }
        Expr::Paren(p) => selectors(&p.expr, out),
        Expr::Subquery(s) => selectors(&s.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| selectors(a, out)),
        Expr::Extension(_) | Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {}
    }
}

/// Labels Prometheus attaches to every scraped series (target labels), so a query may use them freely.
const TARGET_LABELS: &[&str] = &["job", "instance", "pod", "namespace", "container", "endpoint", "le"];

/// The queries deploy/ ships: (where, PromQL with Grafana's variables substituted).
fn shipped_queries() -> Vec<(String, String)> {
    let mut out = vec![];
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/helm/loraserve/files/dashboard.json")).unwrap())
            .unwrap();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap().replace("$__rate_interval", "5m").replace("$job", ".+");
            out.push((format!("dashboard panel `{}`", p["title"].as_str().unwrap()), expr));
        }
    }
    for v in &dashboard["templating"]["list"].as_array().unwrap()[1..] {
        // label_values(metric, label) is Grafana's, not PromQL: check its metric as a selector.
        let q = v["definition"].as_str().unwrap();
        let metric = q.trim_start_matches("label_values(").split(',').next().unwrap();
        out.push((format!("dashboard variable `{}`", v["name"].as_str().unwrap()), metric.to_string()));
    }
    let docs = manifests();
    let rules = docs.iter().find(|d| d["kind"] == "PrometheusRule").expect("a PrometheusRule");
    for g in rules["spec"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            out.push((format!("alert {}", r["alert"].as_str().unwrap()), r["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_and_alerts_query_only_what_the_server_exports() {
    // Exercise every metric: generate (latency histograms, tokens, batch size), hits, misses, loads, and
    // evictions (a device tier that holds one example adapter).
    let (dir, ids) = adapters_dir(0);
    let h = start(config(dir.path().to_path_buf(), 3 << 20)).await;
    let mut client = LoraServeClient::connect(format!("http://{}", h.grpc_addr)).await.unwrap();
    for id in ids.iter().chain(ids.iter()) {
        let r = client
            .generate(GenerateRequest {
                adapter_id: id.clone(),
                prompt: "hello there".into(),
                max_new_tokens: 4,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!r.into_inner().token_ids.is_empty());
    }
    let text = common::metrics_text(h.metrics_addr).await;
    h.shutdown();
    h.wait().await.unwrap();

    let exported = exported_series(&text);
    for &(name, kind, _) in telemetry::ALL {
        let series = if kind == "histogram" { format!("{name}_bucket") } else { name.to_string() };
        assert!(exported.contains_key(&series), "{series} missing from /metrics (test did not exercise it?)");
    }
    let queries = shipped_queries();
    assert!(queries.len() >= 20, "only {} queries found", queries.len());
    let mut used = BTreeSet::new();
    for (place, q) in &queries {
        let expr = parser::parse(q).unwrap_or_else(|e| panic!("{place}: `{q}` is not PromQL: {e}"));
        let mut found = vec![];
        selectors(&expr, &mut found);
        assert!(!found.is_empty(), "{place}: no metric in `{q}`");
        for (name, labels) in found {
            if name == "up" {
                // Prometheus's own per-target series, not ours.
                continue;
            }
            let have = exported.get(&name).unwrap_or_else(|| panic!("{place}: `{name}` is not exported by the server"));
            for l in labels.iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
                assert!(have.contains(l), "{place}: `{name}` has no label `{l}` (it has {have:?})");
            }
            used.insert(name);
        }
    }
    // The dashboard is about this server: most of what it exports is on it.
    assert!(used.len() >= 15, "only {} series used: {used:?}", used.len());
}

#[test]
fn rendered_router_and_deployment_agree_with_the_server() {
    let docs = manifests();
    let env = &object(&docs, "ConfigMap", "loraserve")["data"];
    let grpc_port: u64 = env["LORASERVE_LISTEN"].as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
    let drain: u64 = env["LORASERVE_DRAIN_TIMEOUT"].as_str().unwrap().parse().unwrap();

    let envoy: Value =
        serde_norway::from_str(object(&docs, "ConfigMap", "loraserve-router")["data"]["envoy.yaml"].as_str().unwrap())
            .unwrap();
    let listener = envoy["static_resources"]["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "grpc");
    let hcm = &listener.unwrap()["filter_chains"][0]["filters"][0]["typed_config"];
    let route = &hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"];
    assert_eq!(route["hash_policy"][0]["header"]["header_name"], ADAPTER_ID_HEADER, "router hashes on another header");
    assert_eq!(route["cluster"], "loraserve");
    let retry_on = route["retry_policy"]["retry_on"].as_str().unwrap();
    assert!(retry_on.split(',').any(|c| c == "unavailable"), "draining replicas' UNAVAILABLE must be retried");
    let cluster = &envoy["static_resources"]["clusters"][0];
    let lb = &cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"];
    assert_eq!(lb["name"], "envoy.load_balancing_policies.ring_hash");
    assert!(lb["typed_config"]["consistent_hashing_lb_config"]["hash_balance_factor"].as_u64().unwrap() > 100);
    assert_eq!(cluster["health_checks"][0]["grpc_health_check"]["service_name"], SERVICE_NAME);
    let upstream = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
    assert_eq!(upstream["socket_address"]["port_value"].as_u64(), Some(grpc_port));
    assert!(upstream["socket_address"]["address"].as_str().unwrap().starts_with("loraserve-headless."));
    object(&docs, "Service", "loraserve-headless");

    let pod = &object(&docs, "Deployment", "loraserve")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["grpc"]["service"], SERVICE_NAME);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["grpc"]["port"].as_u64(), Some(grpc_port), "{probe} port");
    }
    let pre_stop: u64 = c["lifecycle"]["preStop"]["exec"]["command"][1].as_str().unwrap().parse().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > pre_stop + drain, "grace {grace}s must cover preStop {pre_stop}s + drain {drain}s");
    // GPU replicas are off by default until the GPU kernels exist (deploy/check.py renders them too).
    assert_eq!(env["LORASERVE_DEVICE"], "cpu");
    assert!(c["resources"]["limits"].get("nvidia.com/gpu").is_none(), "a CPU replica asks for no GPU");
}

/// Picks a replica from the affinity header alone, as Envoy's ring hash does (no header: replica 0).
fn pick(header: Option<&str>, replicas: usize) -> usize {
    // FNV-1a: stable across runs, so the test's expectations are too.
    header.map_or(0, |h| {
        let hash = h.bytes().fold(0xcbf29ce484222325u64, |acc, b| (acc ^ b as u64).wrapping_mul(0x100000001b3));
        (hash % replicas as u64) as usize
    })
}

/// A gRPC (HTTP/2) proxy on `listener` that forwards each request, unchanged, to the replica `pick` chooses
/// from its `x-adapter-id` header — it never looks at the body.
async fn router(listener: tokio::net::TcpListener, upstreams: Vec<SocketAddr>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<hyper::body::Incoming>();
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let (client, upstreams) = (client.clone(), upstreams.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let header = req.headers().get(ADAPTER_ID_HEADER).and_then(|v| v.to_str().ok());
                let to = upstreams[pick(header, upstreams.len())];
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                *req.uri_mut() = format!("http://{to}{path}").parse().unwrap();
                let client = client.clone();
                async move { client.request(req).await }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Adapter id → which replicas hold it (device or host tier), from each replica's ListAdapters.
async fn residency(replicas: &[&ServerHandle]) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, h) in replicas.iter().enumerate() {
        let mut c = LoraServeClient::connect(format!("http://{}", h.grpc_addr)).await.unwrap();
        let list = c.list_adapters(proto::ListAdaptersRequest {}).await.unwrap().into_inner();
        for a in list.adapters.into_iter().filter(|a| a.device_resident || a.host_resident) {
            out.entry(a.adapter_id).or_default().push(i);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_keep_each_adapter_on_the_replica_its_header_hashes_to() {
    let (dir, ids) = adapters_dir(9);
    let a = start(config(dir.path().to_path_buf(), 256 << 20)).await;
    let b = start(config(dir.path().to_path_buf(), 256 << 20)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = Target { addr: format!("http://{}", listener.local_addr().unwrap()), ..Default::default() };
    tokio::spawn(router(listener, vec![a.grpc_addr, b.grpc_addr]));
    let expected: BTreeMap<&str, usize> = ids.iter().map(|id| (id.as_str(), pick(Some(id), 2))).collect();
    assert!(expected.values().any(|&r| r == 0) && expected.values().any(|&r| r == 1), "both replicas get adapters");

    // Through the router with the bundled client's request builder (which sets the header), three rounds.
    let mut via_router = LoraServeClient::connect(target.addr.clone()).await.unwrap();
    let mut first = HashMap::new();
    for round in 0..3 {
        for id in &ids {
            let msg = GenerateRequest {
                adapter_id: id.clone(),
                prompt: "hello there".into(),
                max_new_tokens: 6,
                ..Default::default()
            };
            let r = via_router.generate(request(&target, msg, Some(id)).unwrap()).await.unwrap().into_inner();
            assert!(!r.token_ids.is_empty());
            // Same adapter, same greedy answer, whichever round.
            assert_eq!(
                first.entry(id.clone()).or_insert_with(|| r.token_ids.clone()),
                &r.token_ids,
                "{id} round {round}"
            );
        }
    }
    let held = residency(&[&a, &b]).await;
    for (id, &replica) in &expected {
        assert_eq!(held.get(*id), Some(&vec![replica]), "{id} must be loaded on replica {replica} only");
    }

    // A header that disagrees with the body: refused by the replica before it loads anything.
    let victim = "team/r0";
    let liar = ids.iter().find(|id| expected[id.as_str()] != expected[victim]).unwrap();
    let msg = GenerateRequest {
        adapter_id: victim.into(),
        prompt: "hello there".into(),
        max_new_tokens: 2,
        ..Default::default()
    };
    let err = via_router.generate(request(&target, msg.clone(), Some(liar)).unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains(ADAPTER_ID_HEADER) && err.message().contains(victim), "{}", err.message());
    // ... the same through Load (the header routes it; the body names what to load).
    let load = proto::LoadAdapterRequest { adapter_id: victim.into() };
    let err = via_router.load_adapter(request(&target, load, Some(liar)).unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(residency(&[&a, &b]).await, held, "a refused request loaded nothing");

    // No header: the body is the truth, the request is served (by replica 0 here), nothing is refused.
    let r = via_router.generate(tonic::Request::new(msg)).await.unwrap().into_inner();
    assert_eq!(r.token_ids, first[victim][..2]);

    for h in [a, b] {
        h.shutdown();
        h.wait().await.unwrap();
    }
}
