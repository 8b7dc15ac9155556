#!/usr/bin/env python3
"""Offline checks of everything in deploy/ (run by .ci/run; needs deploy/requirements.txt and, for the
Prometheus Operator objects, node with deploy/crd-check's npm package installed: .ci/run does both).

  Dockerfile          hadolint
  plain YAML          yamllint (deploy/.yamllint; Helm templates are Go templates, not YAML)
  Helm chart          helm lint --strict, and rendering (Helm's own Go SDK) under several value sets
  rendered objects    Kubernetes OpenAPI schemas, strict (no unknown fields), for the oldest supported
                      (1.27) and the newest known release; PodMonitor / PrometheusRule against the Prometheus
                      Operator CRD schemas (@kubernetes-models/prometheus-operator)
  plain manifests     deploy/kubernetes/loraserve.yaml is exactly the chart rendered with
                      deploy/kubernetes/values.yaml (`--write` regenerates it)
  Envoy config        no Envoy binary installs from a registry, so the rendered envoy.yaml is parsed strictly
                      into Envoy's own Bootstrap proto (xds-protos: Envoy's API, generated): unknown fields,
                      wrong types, bad enum names, unresolvable typed_config and deprecated fields all fail
  dashboard           valid JSON (its metric names are checked against a live server by tests/deploy.rs)

Exit status 0 when everything passes; each failure is printed with the file and object it concerns.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "loraserve"
PLAIN = DEPLOY / "kubernetes" / "loraserve.yaml"
PLAIN_VALUES = DEPLOY / "kubernetes" / "values.yaml"
KUBE_VERSIONS = ["1.27.0", "1.37.0"]
RELEASE, NAMESPACE = "loraserve", "default"

# Helm's install order (pkg/release/util/kind_sorter.go), for a stable, readable plain manifest.
KIND_ORDER = [
    "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy", "PodDisruptionBudget",
    "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass", "PersistentVolume",
    "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service", "DaemonSet", "Pod",
    "ReplicationController", "ReplicaSet", "Deployment", "HorizontalPodAutoscaler", "StatefulSet", "Job",
    "CronJob", "IngressClass", "Ingress", "APIService",
]

failures = []


def fail(where, msg):
    failures.append(f"{where}: {msg}")
    print(f"FAIL {where}: {msg}")


def ok(what):
    print(f"ok   {what}")


def run_tool(where, cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=DEPLOY.parent)
    if r.returncode != 0:
        fail(where, (r.stdout + r.stderr).strip() or f"exit {r.returncode}")
    else:
        ok(where)


def render(values, label):
    """The chart rendered with `values`: (source template, raw YAML text, object) per document, in Helm's
    install order, as `helm template` prints them."""
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    try:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    docs = []
    for source, text in sorted(out.items()):
        if source.endswith("NOTES.txt"):
            continue
        for raw in re.split(r"^---\s*$", text, flags=re.M):
            obj = yaml.safe_load(raw)
            if obj:
                docs.append((source, raw.strip("\n") + "\n", obj))

    def order(doc):
        kind = doc[2]["kind"]
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind, doc[2]["metadata"]["name"])

    docs.sort(key=order)
    ok(f"helm render ({label}): {len(docs)} objects")
    return docs


def manifest(docs):
    """One YAML stream, each document under a `# Source:` line."""
    header = (
        "# Rendered from deploy/helm/loraserve with deploy/kubernetes/values.yaml by `python3 deploy/check.py --write`.\n"
        "# Do not edit: change the chart and re-render (CI fails when this file and the chart disagree).\n"
    )
    return header + "".join(f"---\n# Source: {source}\n{raw}" for source, raw, _ in docs)


def check_kube(objects, label):
    import kubernetes_validate as kv

    crds = []
    for source, _, obj in objects:
        where = f"{label} {source} {obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            crds.append((where, obj))
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                fail(where, f"Kubernetes {version} schema: {e.message} at {'/'.join(map(str, e.path))}")
            except kv.SchemaNotFoundError:
                fail(where, f"no Kubernetes {version} schema for {obj['apiVersion']} {obj['kind']}")
    ok(f"Kubernetes schemas {', '.join(KUBE_VERSIONS)} strict ({label})")
    if crds:
        check_crds(crds, label)


def check_device(objects, label):
    """A GPU replica asks for a GPU, runs the CUDA image with --device cuda, tolerates the GPU taint; a CPU
    replica does none of it."""
    deployment = next(o for _, _, o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == RELEASE)
    config = next(o for _, _, o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == RELEASE)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    device = config["data"]["LORASERVE_DEVICE"]
    cuda_image = container["image"].endswith("-cuda")
    tolerates = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    facts = (gpus == 1, device == "cuda", cuda_image, tolerates)
    if len(set(facts)) != 1:
        fail(f"{label} Deployment/{RELEASE}", f"GPU settings disagree: gpu limit {gpus}, LORASERVE_DEVICE "
             f"{device}, image {container['image']}, GPU toleration {tolerates}")
    elif facts[0] and config["data"].get("LORASERVE_DTYPE") != "f32":
        fail(f"{label} ConfigMap/{RELEASE}", f"LORASERVE_DTYPE {config['data'].get('LORASERVE_DTYPE')!r} on a GPU: "
             "the server refuses any dtype but f32 there")
    else:
        ok(f"{'GPU' if facts[0] else 'CPU'} replica settings agree ({label})")


def check_image_dtypes():
    """Each runtime stage of the Dockerfile sets a dtype its device serves: f32 where LORASERVE_DEVICE is cuda."""
    stages = re.split(r"^FROM ", (DEPLOY / "Dockerfile").read_text(), flags=re.M)[1:]
    for stage in stages:
        env = dict(re.findall(r"\b(LORASERVE_[A-Z_]+)=(\S+)", stage))
        name = stage.split()[2] if " AS " in stage.splitlines()[0] else stage.split()[0]
        if env.get("LORASERVE_DEVICE") == "cuda" and env.get("LORASERVE_DTYPE") != "f32":
            fail(f"deploy/Dockerfile stage {name}", f"LORASERVE_DTYPE {env.get('LORASERVE_DTYPE')} with "
                 "LORASERVE_DEVICE=cuda: the server refuses any dtype but f32 on a GPU")
            return
    ok("Dockerfile runtime dtypes fit their devices")


def check_crds(crds, label):
    script = DEPLOY / "crd-check" / "validate.mjs"
    payload = json.dumps([obj for _, obj in crds])
    r = subprocess.run(["node", str(script)], input=payload, capture_output=True, text=True, cwd=script.parent)
    if r.returncode != 0:
        fail(f"{label} Prometheus Operator objects", (r.stdout + r.stderr).strip())
    else:
        ok(f"Prometheus Operator CRD schemas ({label}): {r.stdout.strip()}")


def check_envoy(objects):
    from google.protobuf import json_format
    from google.protobuf.message import Message

    # Importing these registers every Envoy API type that a typed_config may name.
    import envoy.config.bootstrap.v3.bootstrap_pb2 as bootstrap_pb2
    import envoy.extensions.access_loggers.stream.v3.stream_pb2  # noqa: F401
    import envoy.extensions.clusters.dns.v3.dns_cluster_pb2  # noqa: F401
    import envoy.extensions.filters.http.health_check.v3.health_check_pb2  # noqa: F401
    import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
    import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2  # noqa: F401
    import envoy.extensions.load_balancing_policies.ring_hash.v3.ring_hash_pb2  # noqa: F401
    import envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2  # noqa: F401
    import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401

    configs = [(s, o) for s, _, o in objects if o["kind"] == "ConfigMap" and "envoy.yaml" in o.get("data", {})]
    if not configs:
        fail("envoy", "no ConfigMap with envoy.yaml rendered")
    for source, obj in configs:
        where = f"{source} ConfigMap/{obj['metadata']['name']} envoy.yaml"
        try:
            config = yaml.safe_load(obj["data"]["envoy.yaml"])
            msg = json_format.ParseDict(config, bootstrap_pb2.Bootstrap())
        except Exception as e:  # ParseError, TypeError (unresolvable Any), YAML errors
            fail(where, f"not a valid Envoy v3 Bootstrap: {e}")
            continue
        deprecated = []

        def walk(m, path):
            if m.DESCRIPTOR.full_name == "google.protobuf.Any":
                from google.protobuf import symbol_database

                inner = symbol_database.Default().GetSymbol(m.TypeName())()
                m.Unpack(inner)
                walk(inner, path)
                return
            for field, value in m.ListFields():
                p = f"{path}.{field.name}"
                if field.GetOptions().deprecated:
                    deprecated.append(p)
                if field.message_type and field.message_type.GetOptions().map_entry:
                    values = list(value.values())
                else:
                    values = list(value) if field.is_repeated else [value]
                for v in values:
                    if isinstance(v, Message):
                        walk(v, p)
                    elif field.enum_type and field.enum_type.values_by_number[v].GetOptions().deprecated:
                        deprecated.append(f"{p} = {field.enum_type.values_by_number[v].name}")

        walk(msg, "bootstrap")
        if deprecated:
            fail(where, "deprecated Envoy fields: " + ", ".join(deprecated))
        else:
            ok(f"Envoy Bootstrap strict parse, no deprecated fields ({where})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="re-render deploy/kubernetes/loraserve.yaml")
    args = ap.parse_args()
    import helm_python as helm

    run_tool("hadolint deploy/Dockerfile", ["hadolint", "deploy/Dockerfile"])
    check_image_dtypes()
    run_tool("yamllint deploy/", ["yamllint", "--strict", "-c", "deploy/.yamllint", "deploy"])
    try:
        json.loads((CHART / "files" / "dashboard.json").read_text())
        ok("dashboard.json parses")
    except ValueError as e:
        fail("deploy/helm/loraserve/files/dashboard.json", str(e))

    plain_values = yaml.safe_load(PLAIN_VALUES.read_text())
    value_sets = {
        "defaults": {},
        "everything on": plain_values,
        "GPU": {"gpu": {"enabled": True}},
        "API keys, claims, no router": {
            "router": {"enabled": False},
            "apiKeys": {"enabled": True, "keys": ["k1", "k2"]},
            "adapters": {"persistence": {"existingClaim": "shared-adapters"},
                         "preload": ["support-bot", "team/summarizer"]},
            "model": {"path": "/models/llama",
                      "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
        },
    }
    for label, values in value_sets.items():
        try:
            result = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        except helm.HelmError as e:
            fail(f"helm lint ({label})", str(e))
        else:
            # Helm's severities: 1 info, 2 warning, 3 error.
            errors = [f"{m['path']}: {m['error']}" for m in result["messages"] if m["severity"] >= 2]
            errors += [str(e) for e in result.get("errors", [])]
            if errors:
                fail(f"helm lint ({label})", "; ".join(errors))
            else:
                ok(f"helm lint --strict ({label})")
        try:
            objects = render(values, label)
        except helm.HelmError as e:
            fail(f"helm render ({label})", str(e))
            continue
        check_kube(objects, label)
        check_device(objects, label)
        if values.get("router", {}).get("enabled", True):
            check_envoy(objects)
        if label == "everything on":
            text = manifest(objects)
            if args.write:
                tmp = PLAIN.with_suffix(".yaml.tmp")
                tmp.write_text(text)
                os.replace(tmp, PLAIN)
                ok(f"wrote {PLAIN.relative_to(DEPLOY.parent)}")
            elif not PLAIN.exists() or PLAIN.read_text() != text:
                fail(str(PLAIN.relative_to(DEPLOY.parent)),
                     "differs from the chart rendered with deploy/kubernetes/values.yaml; "
                     "run `python3 deploy/check.py --write`")
            else:
                ok(f"{PLAIN.relative_to(DEPLOY.parent)} matches the chart")

    if failures:
        print(f"\n{len(failures)} check(s) failed")
        sys.exit(1)
    print("\nall deploy checks passed")


if __name__ == "__main__":
    main()
