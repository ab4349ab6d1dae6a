"""The deployment bundle in deploy/: kustomize renders every overlay, the objects pass the Kubernetes
API schemas (kubernetes-validate, pinned version), probes and Services point at the ports the launcher
opens, the autoscaler's metric is the adapter's, and every metric the Grafana dashboard queries is one
a live tritonserver exports: the session ``triton``, plus a small server with a decoupled model for the
stream metric (``tests/assets/first_audio_probe``)."""
from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pytest
import yaml

from vocos_triton.contract import Model, Tensor
from vocos_triton.launcher import metrics
from vocos_triton.launcher.server import (
    DEFAULT_METRICS_CONFIG,
    PROFILES,
    ServerOptions,
    TritonServer,
    build_parser,
    free_port,
)
from vocos_triton.serving.metrics import FIRST_AUDIO

import triton_helpers as th

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
DASHBOARD = K8S / "base" / "grafana-dashboard.json"

#: the Kubernetes API the manifests are checked against (kubectl on our machines is 1.32)
KUBERNETES_VERSION = "1.32.0"
#: custom resources: no schema in kubernetes-validate; checked by hand below
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
#: launcher flags another change adds (the admin/API key files); accepted here until the parser has them
PENDING_FLAGS = {"--admin-key-file", "--api-key-file"}
PROBE_MODEL = ROOT / "tests" / "assets" / "first_audio_probe"


def test_every_overlay_is_there():
    assert OVERLAYS == ["cpu", "gpu"]


@pytest.fixture(scope="module")
def rendered() -> Dict[str, List[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: rendering deploy/k8s/overlays/* needs kubectl >= 1.27 (built-in "
                    "kustomize); install it to run these checks")
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"kubectl kustomize {overlay}: {result.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def one(objects: List[dict], kind: str, name: str = "") -> dict:
    found = [o for o in objects if o["kind"] == kind and (not name or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def launcher_args(container: dict):
    """The container's args parsed by the launcher's own parser (flags still pending are set aside)."""
    parser = build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    args, pending = [], {}
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        if flag not in known:
            assert flag in PENDING_FLAGS, f"{flag}: not a launcher flag"
            pending[flag] = value
            continue
        args.append(arg)
    return parser.parse_args(args), pending


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_object(rendered, overlay):
    kinds = sorted(o["kind"] for o in rendered[overlay])
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
                     "Service", "ServiceMonitor"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_pass_the_api_schemas(rendered, overlay):
    import kubernetes_validate

    checked = 0
    for obj in rendered[overlay]:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked == len(rendered[overlay]) - 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_services_point_at_the_launcher_ports(rendered, overlay):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args, pending = launcher_args(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.grpc_port, "http": args.http_port, "metrics": args.metrics_port}
    assert args.host == "0.0.0.0"  # loopback would be unreachable from the kubelet and the Services
    assert args.profile == overlay and args.profile in PROFILES

    def port_of(probe: dict) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    for probe, path in (("livenessProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready"),
                        ("startupProbe", "/v2/health/ready")):
        assert container[probe]["httpGet"]["path"] == path
        assert port_of(container[probe]) == args.http_port, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load needs minutes on CPU"

    # the admin key: a Secret mounted read-only where the launcher's flag points
    key_file = Path(pending.get("--admin-key-file") or args.admin_key_file)
    mount = next(m for m in container["volumeMounts"] if key_file.parent == Path(m["mountPath"]))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert mount.get("readOnly") and volume["secret"]["secretName"]
    # non-root, as the image's USER
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # the histograms and summaries the dashboard reads
    metric_settings = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--metrics-config=")]
    assert set(DEFAULT_METRICS_CONFIG) <= set(metric_settings)

    pod_labels = pod["metadata"]["labels"]
    services = [o for o in objects if o["kind"] == "Service"]
    for service in services:
        assert set(service["spec"]["selector"].items()) <= set(pod_labels.items())
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert (ports[target] if isinstance(target, str) else target) in ports.values()
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1 and [p["targetPort"] for p in headless[0]["spec"]["ports"]] == ["grpc"]

    monitor = one(objects, "ServiceMonitor")
    watched = [s for s in services
               if set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(s["metadata"]["labels"].items())]
    assert len(watched) == 1 and {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in watched[0]["spec"]["ports"]}

    pdb = one(objects, "PodDisruptionBudget")
    assert set(pdb["spec"]["selector"]["matchLabels"].items()) <= set(pod_labels.items())

    resources = container["resources"]
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    else:
        assert not any("nvidia.com" in key for part in resources.values() for key in part)


def test_autoscaler_scales_the_deployment_on_the_adapters_queue_metric(rendered):
    objects = rendered["cpu"]
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": one(objects, "Deployment")["metadata"]["name"]}
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    rules = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in rules
    query = rules[metric["pods"]["metric"]["name"]]["metricsQuery"]
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query


def test_dockerfile_runs_the_launcher_on_the_matching_server():
    text = (DEPLOY / "Dockerfile").read_text()
    # tritonserver 2.59: the gRPC cancellation fixes (2.53, 2.57) that the wheel's 2.51 lacks
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.06-py3" in text
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)[1])
    assert entrypoint[1:] == ["-m", "vocos_triton.launcher.server"]
    command = json.loads(re.search(r"^CMD (\[.*?\])$", text.replace("\\\n", ""), re.M | re.S)[1])
    args = build_parser().parse_args(command)
    assert (args.grpc_port, args.http_port, args.metrics_port, args.host) == (8001, 8000, 8002, "0.0.0.0")
    assert "ENV VOCOS_TRITONSERVER=/opt/tritonserver" in text and re.search(r"^USER 1000", text, re.M)


def test_kserve_example_exposes_the_grpc_port():
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    [container] = service["spec"]["predictor"]["containers"]
    args, _ = launcher_args(container)
    [port] = container["ports"]  # KServe (Knative) allows one port: it must be gRPC for streaming
    assert port["name"] == "h2c" and port["containerPort"] == args.grpc_port


# -- the dashboard against a live server --------------------------------------------------------------
def dashboard_queries() -> List[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def queried_metrics(expressions: List[str]) -> set:
    """Metric names in PromQL expressions: ours are all ``nv_*`` (tritonserver) or ``vocos_*`` (serving)."""
    return {name for expr in expressions for name in re.findall(r"\b((?:nv|vocos)_[a-z0-9_]+)\b", expr)}


def test_dashboard_has_the_panels_users_need():
    titles = {panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]}
    for wanted in ("Audio seconds per second", "Queue time per request", "Compute time per request",
                   "p99 request latency", "Failed requests per second", "Time to first audio (streams)"):
        assert wanted in titles


@pytest.fixture(scope="module")
def stream_metrics_page(tmp_path_factory) -> Iterator[str]:
    """/metrics of a server whose decoupled model answered three streaming requests."""
    import tritonclient.grpc as grpcclient

    repository = tmp_path_factory.mktemp("probe-repository")
    shutil.copytree(PROBE_MODEL, repository / PROBE_MODEL.name)
    (repository / PROBE_MODEL.name / "1" / "model.pt").write_bytes(b"")  # the launcher wants an artifact
    build = tmp_path_factory.mktemp("probe-build")
    options = ServerOptions(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=build, exit_timeout_s=5, watchdog=False)
    with TritonServer(options, log_file=build / "tritonserver.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put(error))
        x = grpcclient.InferInput("x", [4], "FP32")
        x.set_data_from_numpy(np.ones(4, np.float32))
        for _ in range(3):
            client.async_stream_infer(PROBE_MODEL.name, [x])
        assert [answers.get(timeout=60) for _ in range(3)] == [None, None, None]
        client.stop_stream()
        client.close()
        yield metrics.scrape(server.metrics_url)


def test_first_audio_histogram_is_a_prometheus_histogram(stream_metrics_page):
    samples = metrics.parse(stream_metrics_page)
    model = ("model", PROBE_MODEL.name)
    buckets = {dict(labels)["le"]: value for (name, labels), value in samples.items()
               if name == f"{FIRST_AUDIO}_bucket" and model in labels}
    bounds = sorted(buckets, key=lambda le: float(le.replace("+Inf", "inf")))
    counts = [buckets[le] for le in bounds]
    assert bounds[-1] == "+Inf" and counts == sorted(counts)  # cumulative, as histogram_quantile wants
    assert counts[-1] == 3 and buckets["0.025"] == 0          # three pieces, each 30 ms or more in
    assert metrics.total(stream_metrics_page, f"{FIRST_AUDIO}_count", PROBE_MODEL.name) == 3
    assert metrics.total(stream_metrics_page, f"{FIRST_AUDIO}_sum", PROBE_MODEL.name) >= 0.09


def test_dashboard_queries_only_metrics_the_server_exports(triton, speech_1s, stream_metrics_page):
    import tritonclient.grpc as grpcclient

    # one request, so every per-model series and our audio counter have a value
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        result = client.infer(Model.RESYNTHESIZE_MEL, th.make_inputs({Tensor.AUDIO: speech_1s}), client_timeout=120)
        assert result.as_numpy(Tensor.WAVEFORM).size
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as response:
        page = response.read().decode()
    exported = metrics.families(page) | metrics.families(stream_metrics_page)
    wanted = queried_metrics(dashboard_queries())
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success", "vocos_audio_seconds_total",
            "nv_inference_request_summary_us", f"{FIRST_AUDIO}_bucket"} <= wanted
    assert not wanted - exported, f"the dashboard queries metrics the server does not export: {wanted - exported}"
    # the audio counter counts what was returned: 1 s in, (T-1)*256 samples out
    audio = metrics.total(page, "vocos_audio_seconds_total", Model.VOCOS_MEL)
    assert audio > 0.9 and np.isfinite(audio)
