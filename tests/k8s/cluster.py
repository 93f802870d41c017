"""The pods a rendered overlay describes, run as processes on loopback.

Everything a pod's processes get comes from the manifests: the image's entrypoint (from the
Dockerfile) with the container's command and args, its environment (values, `$(VAR)`
references, downward-API fields, Secret and ConfigMap keys), its mounted files, and its
lifecycle hooks. Only what a cluster provides is stood in for, and in one place each:
- the network: every pod shares 127.0.0.1, so each (pod, container port) gets its own free
  port, and pod and Service DNS names with a port are rewritten to 127.0.0.1:that port;
- the filesystem: each volume is a directory under the pod's own, and its mount path is
  rewritten to that directory in environment values, arguments and mounted files;
- the Secret the overlay expects the operator to create is given by the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.recipes import free_port
from tests.k8s.manifests import ROOT, containers, pod_labels, workloads

Obj = dict[str, Any]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
PROGRAMS = {"tether": str(Path(sys.executable).with_name("tether")), "python": sys.executable}


def image_entrypoint() -> list[str]:
    entrypoint: list[str] = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE.read_text(), re.M)[1])
    return entrypoint


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: a defined variable is replaced, anything else left as written."""
    return VAR_REF.sub(lambda m: env.get(m[1], m[0]), text)


@dataclass
class Pod:
    name: str
    workload: Obj
    root: Path
    ports: dict[int, int] = field(default_factory=dict)  # container port -> port on 127.0.0.1
    mounts: dict[str, dict[str, Path]] = field(default_factory=dict)  # container -> mount path -> dir
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def spec(self) -> Obj:
        spec: Obj = self.workload["spec"]["template"]["spec"]
        return spec

    def container(self, name: str) -> Obj:
        return next(c for c in containers(self.workload) if c["name"] == name)

    def port_of(self, container: Obj, port: int | str) -> int:
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
        return self.ports[port]

    def log(self, container: str) -> str:
        return (self.root / f"{container}.log").read_text()


class LocalCluster:
    """Run the Deployments and StatefulSets of `objects` as processes; `secret` is the Secret the
    operator created (its name and string data), for the overlays that expect one."""

    def __init__(self, objects: list[Obj], secrets: dict[str, dict[str, str]], root: Path) -> None:
        self.objects = objects
        self.namespace = workloads(objects)[0]["metadata"]["namespace"]
        self.secrets = secrets | {o["metadata"]["name"]: _secret_data(o) for o in objects if o["kind"] == "Secret"}
        self.config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
        self.root = root
        self.pods: list[Pod] = []
        for workload in workloads(objects):
            name = workload["metadata"]["name"]
            for i in range(self._replicas(workload)):
                pod = Pod(f"{name}-{i}", workload, root / f"{name}-{i}")
                pod.ports = {p["containerPort"]: free_port() for c in containers(workload) for p in c.get("ports", [])}
                self.pods.append(pod)
        self.dns = self._dns_names()

    def _replicas(self, workload: Obj) -> int:
        """The spec's count, or what an autoscaler aimed at it starts with (its minimum)."""
        for hpa in (o for o in self.objects if o["kind"] == "HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]
            if (target["kind"], target["name"]) == (workload["kind"], workload["metadata"]["name"]):
                return int(hpa["spec"].get("minReplicas", 1))
        return int(workload["spec"].get("replicas", 1))

    def pods_of(self, component: str) -> list[Pod]:
        return [p for p in self.pods if pod_labels(p.workload).get("app.kubernetes.io/component") == component]

    # --- the cluster's network and filesystem --------------------------------------------------

    def _dns_names(self) -> dict[str, str]:
        """host:port as pods and Services are reached in the cluster -> 127.0.0.1:port here."""
        names: dict[str, str] = {}
        suffixes = (f".{self.namespace}.svc.cluster.local", f".{self.namespace}.svc", f".{self.namespace}", "")
        for service in (o for o in self.objects if o["kind"] == "Service"):
            svc = service["metadata"]["name"]
            backing = [p for p in self.pods if all(pod_labels(p.workload).get(k) == v
                                                   for k, v in service["spec"]["selector"].items())]
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                for pod in backing:
                    local = pod.port_of(pod.workload["spec"]["template"]["spec"]["containers"][0], target)
                    for suffix in suffixes:
                        names[f"{pod.name}.{svc}{suffix}:{port['port']}"] = f"127.0.0.1:{local}"
                if backing:  # a Service name: its first pod (no load balancing needed here)
                    first = backing[0]
                    local = first.port_of(first.spec["containers"][0], target)
                    for suffix in suffixes:
                        names.setdefault(f"{svc}{suffix}:{port['port']}", f"127.0.0.1:{local}")
        return names

    def _localize(self, text: str, pod: Pod, container: str) -> str:
        for name in sorted(self.dns, key=len, reverse=True):
            text = text.replace(name, self.dns[name])
        mounts = pod.mounts[container]
        if not mounts:
            return text
        # One pass, longest first: a replaced path (itself under /tmp, say) is not rewritten again.
        pattern = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        return re.sub(rf"(?<![\w./-])({pattern})(?![\w.-])", lambda m: str(mounts[m[1]]), text)

    def _volumes(self, pod: Pod, c: Obj) -> None:
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        pod.mounts[c["name"]] = {m["mountPath"]: pod.root / "volumes" / m["name"] for m in c.get("volumeMounts", [])}
        for mount in c.get("volumeMounts", []):
            directory = pod.root / "volumes" / mount["name"]
            directory.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                files = self.config_maps[volume["configMap"]["name"]]
            elif "secret" in volume:
                data = self.secrets[volume["secret"]["secretName"]]
                files = {i["path"]: data[i["key"]] for i in volume["secret"].get("items", [])} or data
            else:
                continue  # emptyDir: the directory is enough
            for name, content in files.items():
                (directory / name).write_text(content)
        for mount in c.get("volumeMounts", []):  # mounted files may name other mounts
            directory = pod.root / "volumes" / mount["name"]
            for file in directory.iterdir() if "emptyDir" not in volumes[mount["name"]] else ():
                file.write_text(self._localize(file.read_text(), pod, c["name"]))

    def environment(self, pod: Pod, c: Obj) -> dict[str, str]:
        """The container's environment as the kubelet builds it, then placed on loopback."""
        env: dict[str, str] = {}
        for var in c.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[var["name"]] = {"metadata.name": pod.name, "metadata.namespace": self.namespace,
                                    "status.podIP": "127.0.0.1"}[source["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[var["name"]] = self.config_maps[ref["name"]][ref["key"]]
        env = {k: self._localize(v, pod, c["name"]) for k, v in env.items()}
        if env.get("TETHER_HOST") in ("0.0.0.0", "::"):  # listen where the pods share a network: loopback
            env["TETHER_HOST"] = "127.0.0.1"
        if "TETHER_PORT" in env:
            env["TETHER_PORT"] = str(pod.ports[int(env["TETHER_PORT"])])
        return env

    def argv(self, pod: Pod, c: Obj, command: list[str], env: dict[str, str]) -> list[str]:
        argv = [self._localize(expand(a, env), pod, c["name"]) for a in command]
        return [PROGRAMS.get(argv[0], argv[0]), *argv[1:]]

    def process_env(self, pod: Pod, env: dict[str, str]) -> dict[str, str]:
        base = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONUNBUFFERED": "1",
                "HOME": str(pod.root), "LANG": "C.UTF-8"}
        return base | env

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        for pod in self.pods:
            pod.root.mkdir(parents=True, exist_ok=True)
            for c in pod.spec["containers"]:
                self._volumes(pod, c)
                env = self.environment(pod, c)
                argv = self.argv(pod, c, c.get("command", image_entrypoint()) + c.get("args", []), env)
                cwd = pod.mounts[c["name"]].get("/tmp", pod.root)  # the image's WORKDIR
                with (pod.root / f"{c['name']}.log").open("wb") as log:
                    pod.processes[c["name"]] = subprocess.Popen(
                        argv, env=self.process_env(pod, env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL)

    async def probe(self, http: aiohttp.ClientSession, pod: Pod, container: str, kind: str) -> int:
        """Run a container's readinessProbe or livenessProbe (httpGet) as the kubelet would: the status."""
        c = pod.container(container)
        check = c[kind]["httpGet"]
        url = f"http://127.0.0.1:{pod.port_of(c, check['port'])}{check['path']}"
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=c[kind].get("timeoutSeconds", 1))) as r:
                return r.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    def pre_stop(self, pod: Pod, container: str) -> subprocess.Popen[bytes]:
        """Start the container's preStop exec hook, in the container's environment."""
        c = pod.container(container)
        env = self.environment(pod, c)
        argv = self.argv(pod, c, c["lifecycle"]["preStop"]["exec"]["command"], env)
        return subprocess.Popen(argv, env=self.process_env(pod, env), cwd=pod.root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def terminate(self, pod: Pod) -> None:
        """What the kubelet does after preStop: SIGTERM each container's process."""
        for process in pod.processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)

    def stop(self) -> list[str]:
        """Tear the test down: SIGINT stops a node at once (SIGTERM would drain it for minutes).
        Returns the containers that had to be killed."""
        running = {f"{pod.name}/{name}": p for pod in self.pods for name, p in pod.processes.items()
                   if p.poll() is None}
        for process in running.values():
            os.kill(process.pid, signal.SIGINT)
        killed = []
        for name, process in running.items():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
                killed.append(name)
        return killed


def _secret_data(secret: Obj) -> dict[str, str]:
    import base64

    data = {k: base64.b64decode("".join(v.split())).decode() for k, v in secret.get("data", {}).items()}
    return data | secret.get("stringData", {})
