"""deploy/: the rendered overlays are valid Kubernetes, and agree with Tether and with each other.

Each check here fails when one part drifts from another: a config key Tether does not have, a
probe on a path nobody serves, a grace period shorter than the drain, a policy that selects no
pod or lets the wrong one in, a metric the dashboard plots that no process exports.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from actors.http import health_routes
from actors.metrics import NodeMetrics
from gateway.metrics import GatewayMetrics
from tests.k8s import kustomize
from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    ROOT,
    container,
    containers,
    find,
    kubectl_render,
    pod_labels,
    render,
    selects,
    tether_toml,
    workloads,
)
from tether import __version__
from tether.cli import build_parser
from tether.config import BY_NAME, load, parse_value
from tether.probes import DRAIN_SLACK

NODE_BYTES = 200 * 2**20  # a node process with its sessions' state
DEMO_UPSTREAM_BYTES = 66 * 2**20  # the bundled demo server's resident size, measured with ps
# The oldest release the manifests use features of (native sidecars, preStop sleep), and the newest.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SERVICE_MONITOR_SCHEMA = json.loads((Path(__file__).parent / "servicemonitor.schema.json").read_text())
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
TETHER_CONTAINERS = {"gateway", "node"}


def tether_workload(objects, component):
    return next(w for w in workloads(objects) if pod_labels(w).get("app.kubernetes.io/component") == component
                and pod_labels(w).get("app.kubernetes.io/name") == "tether")


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def schema_errors(obj, version):
    if obj["kind"] == "ServiceMonitor":
        return [e.message for e in jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


# --- rendering and schemas ---------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_own_renderer_matches_kubectl(overlay):
    theirs = kubectl_render(overlay)
    if theirs is None:
        pytest.skip("kubectl is not installed: the project's renderer is used alone")
    assert kustomize.comparable(kustomize.build(K8S / "overlays" / overlay)) == kustomize.comparable(theirs)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay, version):
    objects = render(overlay)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                            "PodDisruptionBudget", "StatefulSet", "ConfigMap", "NetworkPolicy",
                                            "ServiceAccount", "Namespace"}
    errors = {(o["kind"], o["metadata"]["name"]): schema_errors(o, version) for o in objects}
    assert {k: v for k, v in errors.items() if v} == {}


def test_the_schema_check_refuses_broken_objects():
    objects = render("prod")
    gateway = copy.deepcopy(find(objects, "Deployment", "tether-gateway"))
    gateway["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}  # a typo
    assert schema_errors(gateway, KUBERNETES_VERSIONS[-1])
    nodes = copy.deepcopy(find(objects, "StatefulSet", "tether-node"))
    nodes["spec"]["replicas"] = "three"
    assert schema_errors(nodes, KUBERNETES_VERSIONS[-1])
    monitor = copy.deepcopy(find(objects, "ServiceMonitor", "tether"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert schema_errors(monitor, KUBERNETES_VERSIONS[-1])


def test_every_kustomization_field_is_one_the_renderer_knows(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(kustomize.KustomizeError, match="namePrefix"):
        kustomize.build(tmp_path)


# --- Tether's settings -------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_keys_exist_and_parse(overlay):
    objects = render(overlay)
    toml = tether_toml(objects)
    for command in ("gateway", "node"):
        load(command, toml=toml, toml_source=f"{overlay}/tether.toml")  # raises on an unknown key or bad value
    known = {s.env: s for s in BY_NAME.values()}
    for workload in workloads(objects):
        for c in containers(workload):
            if c["name"] not in TETHER_CONTAINERS:
                continue
            for name, var in env_of(c).items():
                if not name.startswith("TETHER_") or name == "TETHER_CONFIG":
                    continue
                assert name in known, f"{c['name']} sets {name}, which is no Tether setting"
                if "value" in var and "$(" not in var["value"]:
                    parse_value(known[name], var["value"], name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_config_file_is_where_tether_config_points(overlay):
    objects = render(overlay)
    for workload in workloads(objects):
        spec = workload["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if c["name"] not in TETHER_CONTAINERS:
                continue
            path = Path(env_of(c)["TETHER_CONFIG"]["value"])
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent))
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
            assert path.name in config_map["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_hold_every_key_the_pods_read(overlay):
    objects = render(overlay)
    secrets = {o["metadata"]["name"]: set(o.get("data", {})) | set(o.get("stringData", {}))
               for o in objects if o["kind"] == "Secret"}
    if not secrets:  # prod: the user creates it from the example
        example = kustomize._documents(K8S / "overlays" / "prod" / "secret.example.yaml")
        secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in example}
    wanted = set()
    for workload in workloads(objects):
        spec = workload["spec"]["template"]["spec"]
        for c in containers(workload):
            for var in c.get("env", []):
                if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                    wanted.add((ref["name"], ref["key"]))
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                wanted |= {(volume["secret"]["secretName"], i["key"]) for i in volume["secret"]["items"]}
    assert wanted and all(key in secrets.get(name, ()) for name, key in wanted), (wanted, secrets)


# --- probes, ports, drain ----------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_what_the_processes_serve(overlay):
    served = {route.path for route in health_routes(NodeMetrics("n").registry, lambda: True)}
    objects = render(overlay)
    for component in TETHER_CONTAINERS:
        c = container(tether_workload(objects, component), component)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert int(env_of(c)["TETHER_PORT"]["value"]) == ports["http"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert {"/readyz", "/healthz"} <= served
        assert env_of(c)["TETHER_HOST"]["value"] == "0.0.0.0"  # probes come from the kubelet, not loopback


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods_and_ports(overlay):
    objects = render(overlay)
    for service in (o for o in objects if o["kind"] == "Service"):
        matched = [w for w in workloads(objects) if selects({"matchLabels": service["spec"]["selector"]},
                                                            pod_labels(w))]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} workloads"
        names = {p["name"] for c in containers(matched[0]) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    nodes = tether_workload(objects, "node")
    headless = find(objects, "Service", nodes["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # a draining node must stay reachable


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_alone_sets_the_gateway_count(overlay):
    objects = render(overlay)
    gateway = find(objects, "Deployment", "tether-gateway")
    assert "replicas" not in gateway["spec"]  # else every `kubectl apply` resets what the HPA scaled to
    hpa = find(objects, "HorizontalPodAutoscaler", "tether-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tether-gateway"}
    for name in ("tether-gateway", "tether-node"):  # one at a time, and an eviction can always proceed
        assert find(objects, "PodDisruptionBudget", name)["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_outlasts_the_drain(overlay):
    objects = render(overlay)
    nodes = tether_workload(objects, "node")
    drain = float(tether_toml(objects).get("drain_timeout", 300.0))
    grace = nodes["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= drain + DRAIN_SLACK, f"grace {grace}s leaves no time to end what is left after {drain}s"
    hook = container(nodes, "node")["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[0] == "tether"
    assert build_parser().parse_args(hook[1:]).command == "drain"
    # The node outlives its hook: it waits for the kubelet's SIGTERM once drained.
    env = env_of(container(nodes, "node"))
    assert parse_value(BY_NAME["exit_when_drained"], env["TETHER_EXIT_WHEN_DRAINED"]["value"], "env") is False


def quantity(text):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_full_node_fits_in_its_memory_limit(overlay):
    objects = render(overlay)
    toml = tether_toml(objects)
    node = container(tether_workload(objects, "node"), "node")
    if "TETHER_UPSTREAM_URL" in env_of(node) or toml.get("upstream_url"):
        return  # sessions open sessions on a server beside the node; no process each
    limit = quantity(node["resources"]["limits"]["memory"])
    assert NODE_BYTES + toml["max_sessions"] * DEMO_UPSTREAM_BYTES <= limit


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_node_advertises_its_stable_pod_dns_name(overlay):
    objects = render(overlay)
    nodes = tether_workload(objects, "node")
    env = env_of(container(nodes, "node"))
    port = env["TETHER_PORT"]["value"]
    assert env["TETHER_NODE_ID"]["value"] == "$(POD_NAME)"
    assert env["TETHER_ADVERTISE"]["value"] == (
        f"http://$(POD_NAME).{nodes['spec']['serviceName']}.$(POD_NAMESPACE).svc:{port}")
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    names = list(env)
    assert names.index("POD_NAME") < names.index("TETHER_ADVERTISE")  # $(VAR) sees only earlier variables


# --- network policy ----------------------------------------------------------------------------

MONITORING = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
OUTSIDE = ("default", {"app": "client"})


def allowed(policies, namespace, source, target_labels, target_port):
    """Whether `source` (its namespace and labels) may open target_port on a pod with target_labels."""
    source_namespace, source_labels = source
    governing = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], target_labels)]
    if not governing:
        return True
    for policy in governing:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p["port"] == target_port for p in ports):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                namespaces = peer.get("namespaceSelector")
                in_scope = (source_namespace == namespace if namespaces is None else
                            selects(namespaces, {"kubernetes.io/metadata.name": source_namespace}))
                if in_scope and selects(peer.get("podSelector", {}), source_labels):
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_gateways_reach_nodes_and_only_tether_reaches_redis(overlay):
    objects = render(overlay)
    namespace = find(objects, "Deployment", "tether-gateway")["metadata"]["namespace"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = {pod_labels(w)["app.kubernetes.io/component"]: pod_labels(w) for w in workloads(objects)}
    sources = {name: (namespace, labels) for name, labels in pods.items()}
    sources |= {"stranger": (namespace, {"app": "stranger"}), "outside": OUTSIDE, "prometheus": MONITORING}
    for policy in policies:
        assert any(selects(policy["spec"]["podSelector"], labels) for labels in pods.values()), \
            f"NetworkPolicy {policy['metadata']['name']} selects no pod"
    reach = {(src, dst): allowed(policies, namespace, source, pods[dst], "http" if dst != "redis" else "redis")
             for src, source in sources.items() for dst in pods}
    expected = {(src, "gateway"): True for src in sources}
    expected |= {(src, "node"): src in ("gateway", "prometheus") for src in sources}
    if "redis" in pods:
        expected |= {(src, "redis"): src in ("gateway", "node") for src in sources}
    assert reach == expected
    node_egress = [p for p in policies if "Egress" in p["spec"]["policyTypes"]
                   and selects(p["spec"]["podSelector"], pods["node"])]
    blocks = [peer["ipBlock"] for p in node_egress for rule in p["spec"]["egress"] for peer in rule["to"]]
    assert node_egress and all("169.254.169.254/32" in b.get("except", []) for b in blocks if ":" not in b["cidr"])


def test_only_overlays_for_clusters_with_the_prometheus_operator_need_its_crds():
    assert "ServiceMonitor" not in {o["kind"] for o in render("dev")}  # dev applies on a bare cluster


@pytest.mark.parametrize("overlay", ["prod", "prod-sidecar"])
def test_service_monitor_scrapes_every_tether_service(overlay):
    objects = render(overlay)
    monitor = find(objects, "ServiceMonitor", "tether")
    scraped = [s for s in objects if s["kind"] == "Service"
               and selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in scraped} == {"tether-gateway", "tether-node"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in scraped)


# --- images and security -----------------------------------------------------------------------

def dockerfile_uid():
    return int(re.search(r"^ARG TETHER_UID=(\d+)$", DOCKERFILE.read_text(), re.M)[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down(overlay):
    objects = render(overlay)
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in containers(workload):
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}, c["name"]
            for need in ("requests", "limits"):
                assert set(c["resources"][need]) == {"cpu", "memory"}, (c["name"], need)
    for component in TETHER_CONTAINERS:
        pod = tether_workload(objects, component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == dockerfile_uid()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tether_containers_run_this_version_of_one_image(overlay):
    objects = render(overlay)
    images = {c["image"] for w in workloads(objects) for c in containers(w)
              if pod_labels(w)["app.kubernetes.io/name"] == "tether"}
    assert len(images) == 1 and images.pop().endswith(f"tether:{__version__}")


def test_dockerfile_builds_a_small_non_root_image():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", text, re.M), "base pinned to a release"
    assert len(re.findall(r"^FROM ", text, re.M)) == 2, "multi-stage: build, then runtime"
    runtime = text.split("AS runtime", 1)[1]
    assert "pip install" not in runtime and "apt-get" not in runtime
    assert re.search(r"^USER \$\{TETHER_UID\}:\$\{TETHER_UID\}$", runtime, re.M) and dockerfile_uid() != 0
    assert 'ENTRYPOINT ["tether"]' in runtime
    health = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", runtime, re.M)
    assert json.loads(health[1])[:2] == ["tether", "health"]
    assert build_parser().parse_args(["health"]).command == "health"
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", runtime, re.M)[1].split()}
    assert exposed == {8080, 8081}


@pytest.mark.timeout(420)  # the wheel compiles the request path with mypyc: 60-80 s alone, more on a busy machine
def test_what_the_build_copies_is_enough_to_install_tether(tmp_path):
    """The build stage's `pip install .[demo]`, on exactly the files its COPY lines bring in, compiler
    included."""
    context = tmp_path / "context"
    for source in copied_paths():
        target = context / source
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "wheel"),
                    str(context)], check=True, timeout=400, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("tether-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("tether/cli.py", "tether/probes.py", "gateway/app.py", "actors/node.py", "tether_demo/server.py"):
        assert module in names
    assert any(n.startswith("gateway/edge.") and n.endswith(".so") for n in names), "the request path was not compiled"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tether = tether.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def copied_paths():
    return {word.rstrip("/") for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")
            and "--from" not in line for word in shlex.split(line)[1:-1]}


def test_dockerignore_lets_in_exactly_what_the_build_copies():
    kept = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")}
    copied = copied_paths()
    assert copied == kept
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages <= copied


# --- dashboard ---------------------------------------------------------------------------------

def exported_metric_names():
    from actors.placement import Placement
    from actors.store.memory import MemoryStore

    names = set()
    for registry in (NodeMetrics("n").registry, GatewayMetrics(Placement(MemoryStore())).registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names |= {family.name + s for s in suffixes}
    return names


def test_dashboard_plots_only_metrics_tether_exports():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tether.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\btether_[a-z_]+", e)}
    exported = exported_metric_names()
    assert used and used <= exported, used - exported
    covered = {"tether_node_sessions_active", "tether_node_sessions_ended_total",
               "tether_gateway_request_seconds_bucket", "tether_node_draining", "tether_ring_members"}
    assert covered <= used  # sessions, lifecycle by reason, latency, drain, ring
