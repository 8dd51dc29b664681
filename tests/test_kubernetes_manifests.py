"""The Kubernetes manifests (deploy/kubernetes), checked offline.

Each overlay is rendered here with a small subset of kustomize (resources, strategic-merge
`patches` matched by kind and name, `images`, `namespace`: the only features the manifests use,
and anything else is refused); the real way to apply them is `kubectl apply -k`. Every rendered
object is validated against the Kubernetes schemas with kubernetes-validate in strict mode, the
KEDA ScaledObjects (a CRD it does not know) against a schema of their own, and then the
invariants that a typo would break: selectors, ports, the gateway's addresses, the gRPC health
service names, settings names, GPU limits, grace periods. Each check is also run on a broken copy
to show that it can fail.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from videollm import transport
from videollm.settings import EncoderSettings, GatewaySettings, LLMSettings

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
OVERLAYS = ["small", "large"]
# the oldest release the manifests target (native gRPC probes are GA since 1.27) and the newest
# whose schemas kubernetes-validate bundles
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
SETTINGS = {"encoder": EncoderSettings, "llm": LLMSettings, "gateway": GatewaySettings}
GRPC_SERVICE = {"encoder": transport.ENCODER_SERVICE, "llm": transport.LLM_SERVICE}
QUEUE_METRIC = {"encoder": "videollm_encoder_requests_waiting", "llm": "videollm_llm_requests_waiting"}
METRICS_PORT = {"encoder": 9101, "llm": 9102}


# ---------------------------------------------------------------------------------------------
# rendering: the subset of kustomize the manifests use

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
# strategic merge: lists of these fields merge element-wise by the key; other lists are replaced
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strategic_merge(base, patch, field: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch or any(key.startswith("$") for key in patch):
            raise NotImplementedError(f"strategic merge directive in {patch}: not supported by this renderer")
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = strategic_merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` would print (for the features used here)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization fields this test does not render: {unknown}"
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        objects.extend(render(path) if path.is_dir() else load_yaml_docs(path))
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only `patches: - path: file` is rendered here, got {entry}"
        for patch in load_yaml_docs(directory / entry["path"]):
            targets = [i for i, obj in enumerate(objects)
                       if obj["kind"] == patch["kind"] and obj["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(targets) == 1, f"{directory / entry['path']}: patch target {patch['kind']}/" \
                                      f"{patch['metadata']['name']} found {len(targets)} times"
            objects[targets[0]] = strategic_merge(objects[targets[0]], patch)
    for image in kustomization.get("images", []):
        for container in containers_of_all(objects):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def containers_of_all(objects: list[dict]) -> list[dict]:
    return [c for obj in objects if obj["kind"] in WORKLOAD_KINDS for c in obj["spec"]["template"]["spec"]["containers"]]


# ---------------------------------------------------------------------------------------------
# helpers over rendered objects

def of_kind(objects, kind):
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects, kind, name):
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def workloads(objects):
    return [obj for obj in objects if obj["kind"] in WORKLOAD_KINDS]


def pod_labels(workload) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(container) -> tuple[set, set]:
    ports = container.get("ports", [])
    return {p["containerPort"] for p in ports}, {p["name"] for p in ports if "name" in p}


def port_exists(port, container) -> bool:
    numbers, names = container_ports(container)
    return port in names if isinstance(port, str) else port in numbers


def probes(container):
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def probe_port(probe):
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if handler in probe:
            return probe[handler]["port"]
    return None


def env_of(objects, workload) -> dict[str, str]:
    """The variables a workload's first container gets from its ConfigMaps and Secrets and env."""
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        if "secretRef" in source:
            secret = named(objects, "Secret", source["secretRef"]["name"])
            env.update(secret.get("stringData", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def settings_from(cls, env: dict[str, str]):
    """Settings parsed as the service would in its pod (only these variables set)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VIDEOLLM_") and k != "REDIS_URL"}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return cls()


def setting_env_names(cls) -> set[str]:
    prefix = cls.model_config["env_prefix"]
    names = set()
    for name, field in cls.model_fields.items():
        names.add(prefix + name.upper())
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            delimiter = cls.model_config.get("env_nested_delimiter") or "__"
            names |= {prefix + name.upper() + delimiter + sub.upper() for sub in field.annotation.model_fields}
        alias = field.validation_alias
        if alias is not None:
            names |= {choice for choice in getattr(alias, "choices", [alias]) if isinstance(choice, str)}
    return names


def prestop_sleep_s(container) -> int:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    return int(command[1]) if len(command) == 2 and command[0] == "sleep" else 0


def address_parts(address: str) -> tuple[str, int]:
    address = address.removeprefix("dns:///")
    host, _, port = address.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------------------------
# checks: each returns the problems it finds (empty = fine)

def check_schemas(objects) -> list[str]:
    problems = []
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {e.message}")
    return problems


SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                    "namespace": {"type": "string"}, "labels": {"type": "object"}}},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers", "minReplicaCount", "maxReplicaCount"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "properties": {"type": {"enum": ["prometheus", "cpu", "memory"]},
                                       "metricType": {"enum": ["Utilization", "AverageValue", "Value"]},
                                       "metadata": {"type": "object",
                                                    "additionalProperties": {"type": "string"}}},
                        "additionalProperties": False,
                        "allOf": [
                            {"if": {"properties": {"type": {"const": "prometheus"}}},
                             "then": {"properties": {"metadata": {
                                 "required": ["serverAddress", "query", "threshold"],
                                 "properties": {"serverAddress": {"pattern": "^https?://"},
                                                "threshold": {"pattern": r"^[0-9]+(\.[0-9]+)?$"}}}}}},
                            {"if": {"properties": {"type": {"enum": ["cpu", "memory"]}}},
                             "then": {"required": ["metricType"], "properties": {"metadata": {
                                 "required": ["value"], "properties": {"value": {"pattern": "^[0-9]+$"}}}}}},
                        ],
                    },
                },
            },
        },
    },
}


def check_scaled_objects(objects) -> list[str]:
    problems = []
    scaled = of_kind(objects, "ScaledObject")
    if {s["metadata"]["name"] for s in scaled} != {"gateway", "encoder", "llm"}:
        problems.append(f"ScaledObjects: {[s['metadata']['name'] for s in scaled]}")
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    for so in scaled:
        name = so["metadata"]["name"]
        for error in jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA).iter_errors(so):
            problems.append(f"ScaledObject/{name}: {error.message}")
        spec = so.get("spec", {})
        target = spec.get("scaleTargetRef", {}).get("name")
        if target not in deployments:
            problems.append(f"ScaledObject/{name}: scaleTargetRef {target} is no Deployment")
            continue
        replicas = deployments[target]["spec"].get("replicas", 1)
        if not spec.get("minReplicaCount", 0) <= replicas <= spec.get("maxReplicaCount", 0):
            problems.append(f"ScaledObject/{name}: {target}'s {replicas} replicas outside "
                            f"[{spec.get('minReplicaCount')}, {spec.get('maxReplicaCount')}]")
        if target in ("encoder", "llm") and spec.get("minReplicaCount", 0) < 1:
            problems.append(f"ScaledObject/{name}: a GPU stage loads its model for minutes: no scaling to zero")
        for trigger in spec.get("triggers", []):
            if trigger["type"] == "prometheus":
                if QUEUE_METRIC.get(target) not in trigger["metadata"].get("query", ""):
                    problems.append(f"ScaledObject/{name}: query does not read {QUEUE_METRIC.get(target)}")
            if trigger["type"] == "cpu":
                container = deployments[target]["spec"]["template"]["spec"]["containers"][0]
                if "cpu" not in container.get("resources", {}).get("requests", {}):
                    problems.append(f"ScaledObject/{name}: a CPU trigger needs a CPU request on {target}")
        kinds = {t["type"] for t in spec.get("triggers", [])}
        expected = {"gateway": {"cpu"}}.get(target, {"prometheus"})
        if kinds != expected:
            problems.append(f"ScaledObject/{name}: triggers {kinds}, expected {expected}")
    return problems


def check_selectors(objects) -> list[str]:
    problems = []
    pods = workloads(objects)
    for workload in pods:
        selector = workload["spec"]["selector"].get("matchLabels", {})
        if not selects(selector, pod_labels(workload)):
            problems.append(f"{workload['kind']}/{workload['metadata']['name']}: selector {selector} "
                            f"does not match its pod labels {pod_labels(workload)}")
    for service in of_kind(objects, "Service"):
        selector = service["spec"].get("selector", {})
        matched = [w for w in pods if selects(selector, pod_labels(w))]
        if not matched:
            problems.append(f"Service/{service['metadata']['name']}: selector {selector} matches no pods")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in matched:
                if not any(port_exists(target, c) for c in w["spec"]["template"]["spec"]["containers"]):
                    problems.append(f"Service/{service['metadata']['name']}: targetPort {target} not a "
                                    f"container port of {w['metadata']['name']}")
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"].get("matchLabels", {})
        matched = [w["metadata"]["name"] for w in pods if selects(selector, pod_labels(w))]
        if matched != [pdb["metadata"]["name"]]:
            problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects {matched}")
    if {p["metadata"]["name"] for p in of_kind(objects, "PodDisruptionBudget")} != {"gateway", "encoder", "llm"}:
        problems.append("a PodDisruptionBudget per stage (gateway, encoder, llm) is expected")
    return problems


def check_references(objects) -> list[str]:
    """ConfigMaps, Secrets and claims that pods name exist; every mount names a volume."""
    problems = []
    claims = {c["metadata"]["name"] for c in of_kind(objects, "PersistentVolumeClaim")}
    for w in workloads(objects):
        spec = w["spec"]["template"]["spec"]
        templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"] for v in spec.get("volumes", [])} | templates
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None and claim not in claims:
                problems.append(f"{w['metadata']['name']}: claim {claim} does not exist")
        for c in spec["containers"]:
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{w['metadata']['name']}: mount of unknown volume {mount['name']}")
            for source in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source and not any(o["metadata"]["name"] == source[key]["name"] for o in of_kind(objects, kind)):
                        problems.append(f"{w['metadata']['name']}: {kind} {source[key]['name']} does not exist")
    return problems


def check_probes(objects) -> list[str]:
    problems = []
    for w in workloads(objects):
        name = w["metadata"]["name"]
        for c in w["spec"]["template"]["spec"]["containers"]:
            for kind, probe in probes(c):
                port = probe_port(probe)
                if port is not None and not port_exists(port, c):
                    problems.append(f"{name}: {kind} port {port} is not a container port")
            if name in GRPC_SERVICE:
                env = env_of(objects, w)
                settings = settings_from(SETTINGS[name], env)
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    grpc = c.get(kind, {}).get("grpc")
                    if grpc is None:
                        problems.append(f"{name}: no gRPC {kind}")
                        continue
                    if grpc.get("service") != GRPC_SERVICE[name]:
                        problems.append(f"{name}: {kind} asks for {grpc.get('service')}, the service is "
                                        f"{GRPC_SERVICE[name]}")
                    if grpc["port"] != settings.port:
                        problems.append(f"{name}: {kind} on port {grpc['port']}, the service listens on {settings.port}")
                metrics = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}.get("metrics")
                if metrics != settings.metrics_port or metrics != METRICS_PORT[name]:
                    problems.append(f"{name}: container port `metrics` {metrics}, the service serves its metrics "
                                    f"on {settings.metrics_port}, expected {METRICS_PORT[name]}")
                startup = c.get("startupProbe", {})
                if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 300:
                    problems.append(f"{name}: the startupProbe gives model loading less than 5 minutes")
            if name == "gateway":
                for kind, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
                    get = c.get(kind, {}).get("httpGet", {})
                    if get.get("path") != path:
                        problems.append(f"gateway: {kind} should GET {path}, got {get}")
    return problems


def check_settings(objects) -> list[str]:
    """Every variable in a ConfigMap is a real setting of the service that reads it, and the
    values parse as that service's settings."""
    problems = []
    for stage, cls in SETTINGS.items():
        allowed = setting_env_names(cls)
        deployment = named(objects, "Deployment", stage)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            obj = named(objects, kind, ref["name"])
            for key in {**obj.get("data", {}), **obj.get("stringData", {})}:
                if key not in allowed:
                    problems.append(f"{kind}/{ref['name']} (read by {stage}): {key} is no setting of {stage}")
        try:
            settings = settings_from(cls, env_of(objects, deployment))
        except Exception as e:  # pydantic's ValidationError: a value out of range
            problems.append(f"{stage}: its environment does not parse: {e}")
            continue
        if getattr(settings, "host", None) != "0.0.0.0":
            problems.append(f"{stage}: listens on {settings.host}, not on the pod's addresses")
        if settings.pull_shm_dir != "":
            problems.append(f"{stage}: pull_shm_dir {settings.pull_shm_dir!r}: pods share no /dev/shm, set ''")
        if stage != "gateway":
            if not str(settings.device).startswith("cuda"):
                problems.append(f"{stage}: device {settings.device}")
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            if str(settings.model) not in mounts:
                problems.append(f"{stage}: the model directory {settings.model} is not a mounted volume")
    return problems


def check_gateway_addresses(objects) -> list[str]:
    problems = []
    gateway = named(objects, "Deployment", "gateway")
    settings = settings_from(GatewaySettings, env_of(objects, gateway))
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    for stage, addresses in (("encoder", settings.encoders), ("llm", settings.llms)):
        for address in addresses:
            host, port = address_parts(address)
            name, _, rest = host.partition(".")
            service = services.get(name)
            if service is None or name != stage:
                problems.append(f"gateway {stage} address {address}: {name} is not the {stage} Service")
                continue
            namespace = service["metadata"].get("namespace")
            if rest and not rest.startswith(f"{namespace}.svc"):
                problems.append(f"gateway {stage} address {address}: not in namespace {namespace}")
            if service["spec"].get("clusterIP") != "None":
                problems.append(f"Service/{name}: not headless, the gateway would see one address")
            if port not in {p["port"] for p in service["spec"]["ports"]}:
                problems.append(f"gateway {stage} address {address}: port {port} not a port of Service/{name}")
            ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
            if ports.get("metrics") != METRICS_PORT[stage]:
                problems.append(f"Service/{name}: metrics port {ports.get('metrics')}, expected {METRICS_PORT[stage]}")
    redis_host, redis_port = address_parts(re.sub(r"^redis://([^/]*)/.*$", r"\1", settings.redis_url or ""))
    redis = services.get(redis_host)
    if redis is None or redis_port not in {p["port"] for p in redis["spec"]["ports"]}:
        problems.append(f"REDIS_URL {settings.redis_url} names no Service port")
    return problems


def check_video_store(objects) -> list[str]:
    """Gateways and encoders see one ReadWriteMany claim at their video_store_dir."""
    problems = []
    claims = {}
    for stage in ("gateway", "encoder"):
        deployment = named(objects, "Deployment", stage)
        settings = settings_from(SETTINGS[stage], env_of(objects, deployment))
        spec = deployment["spec"]["template"]["spec"]
        mount = next((m for m in spec["containers"][0].get("volumeMounts", [])
                      if m["mountPath"] == settings.video_store_dir), None)
        volume = mount and next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), None)
        claims[stage] = volume and volume.get("persistentVolumeClaim", {}).get("claimName")
        if not claims[stage]:
            problems.append(f"{stage}: video_store_dir {settings.video_store_dir} is not a mounted claim")
    if len(set(claims.values())) != 1:
        problems.append(f"gateway and encoder mount different video stores: {claims}")
    elif claims["gateway"]:
        claim = named(objects, "PersistentVolumeClaim", claims["gateway"])
        if "ReadWriteMany" not in claim["spec"]["accessModes"]:
            problems.append(f"PersistentVolumeClaim/{claim['metadata']['name']}: not ReadWriteMany")
    return problems


def check_gpus_and_grace(objects) -> list[str]:
    problems = []
    gateway = named(objects, "Deployment", "gateway")
    timeout = settings_from(GatewaySettings, env_of(objects, gateway)).request_timeout_s
    for w in workloads(objects):
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            resources = c.get("resources", {})
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            if name in GRPC_SERVICE and str(gpus) != "1":
                problems.append(f"{name}: nvidia.com/gpu limit {gpus}, expected 1")
            if name not in GRPC_SERVICE and gpus is not None:
                problems.append(f"{name}: has a GPU limit")
            if not resources.get("requests") or not resources.get("limits", {}).get("memory"):
                problems.append(f"{name}: resource requests and a memory limit are expected")
            if name in SETTINGS:
                grace = spec.get("terminationGracePeriodSeconds", 30)
                if grace <= timeout + prestop_sleep_s(c):
                    problems.append(f"{name}: terminationGracePeriodSeconds {grace} <= request_timeout_s "
                                    f"{timeout} + preStop {prestop_sleep_s(c)} s")
                drain = settings_from(SETTINGS[name], env_of(objects, w)).drain_s
                if drain < timeout:  # the process would exit before its longest answer ends
                    problems.append(f"{name}: drain_s {drain} < request_timeout_s {timeout}")
                if grace <= drain + prestop_sleep_s(c):
                    problems.append(f"{name}: terminationGracePeriodSeconds {grace} <= drain_s {drain} + preStop")
                if prestop_sleep_s(c) < 5:
                    problems.append(f"{name}: no preStop pause for the endpoints to drain")
        if name in GRPC_SERVICE:
            if not spec.get("nodeSelector"):
                problems.append(f"{name}: no nodeSelector")
            if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
                problems.append(f"{name}: no toleration of nvidia.com/gpu")
        elif name == "gateway" and (spec.get("nodeSelector") or spec.get("tolerations")):
            problems.append("gateway: CPU only, no GPU node selector or toleration")
    return problems


CHECKS = [check_schemas, check_scaled_objects, check_selectors, check_references, check_probes,
          check_settings, check_gateway_addresses, check_video_store, check_gpus_and_grace]


# ---------------------------------------------------------------------------------------------
# tests

@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(ROOT / "overlays" / request.param)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_overlay(rendered, check):
    overlay, objects = rendered
    assert check(objects) == [], overlay


def test_base_alone_is_valid():
    objects = render(ROOT / "base")
    for check in CHECKS:
        assert check(objects) == [], check.__name__


def test_overlays_render_what_they_say():
    small, large = (render(ROOT / "overlays" / o) for o in OVERLAYS)

    def replicas(objects):
        return {d["metadata"]["name"]: d["spec"]["replicas"] for d in of_kind(objects, "Deployment")}

    assert replicas(small) == {"gateway": 2, "encoder": 1, "llm": 1}
    assert replicas(large)["gateway"] >= 3
    # the encoders are the bottleneck (README, benchmark): more of them than LLMs
    assert replicas(large)["encoder"] > replicas(large)["llm"] >= 2
    for objects in (small, large):
        # every object lands in the namespace, patches kept the rest of the base
        assert all(o["metadata"].get("namespace") == "videollm" for o in objects if o["kind"] != "Namespace")
        encoder = named(objects, "Deployment", "encoder")["spec"]["template"]["spec"]
        assert encoder["containers"][0]["envFrom"] and encoder["volumes"]
        assert encoder["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    large_encoder = named(large, "Deployment", "encoder")["spec"]["template"]["spec"]
    assert large_encoder["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert {t["key"] for t in large_encoder["tolerations"]} == {"nvidia.com/gpu", "dedicated"}
    scaled = {s["metadata"]["name"]: s["spec"] for s in of_kind(large, "ScaledObject")}
    assert scaled["encoder"]["maxReplicaCount"] > scaled["llm"]["maxReplicaCount"]


def test_renderer_follows_strategic_merge():
    base = {"spec": {"replicas": 1, "template": {"spec": {
        "nodeSelector": {"a": "1"}, "tolerations": [{"key": "x"}],
        "containers": [{"name": "c", "image": "i", "resources": {"limits": {"memory": "1Gi"}}}]}}}}
    patch = {"spec": {"replicas": 3, "template": {"spec": {
        "nodeSelector": {"b": "2"}, "tolerations": [{"key": "y"}],
        "containers": [{"name": "c", "resources": {"limits": {"cpu": "1"}}}]}}}}
    merged = strategic_merge(base, patch)["spec"]
    assert merged["replicas"] == 3
    assert merged["template"]["spec"]["nodeSelector"] == {"a": "1", "b": "2"}  # maps merge
    assert merged["template"]["spec"]["tolerations"] == [{"key": "y"}]  # lists without a merge key are replaced
    assert merged["template"]["spec"]["containers"] == [
        {"name": "c", "image": "i", "resources": {"limits": {"memory": "1Gi", "cpu": "1"}}}]
    with pytest.raises(NotImplementedError):
        strategic_merge(base, {"spec": {"$patch": "delete"}})


def _broken(objects, edit):
    broken = copy.deepcopy(objects)
    edit(broken)
    return broken


def _container(objects, name):
    return named(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


# a typo each check must catch: (check, edit of the rendered small overlay)
BREAKAGES = {
    "unknown field": (check_schemas, lambda o: named(o, "Deployment", "gateway")["spec"].update(replica=2)),
    "bad probe type": (check_schemas, lambda o: _container(o, "llm")["livenessProbe"]["grpc"].update(port="x")),
    "keda field": (check_scaled_objects, lambda o: named(o, "ScaledObject", "llm")["spec"].update(minReplicas=1)),
    "keda target": (check_scaled_objects,
                    lambda o: named(o, "ScaledObject", "encoder")["spec"]["scaleTargetRef"].update(name="encoders")),
    "keda metric": (check_scaled_objects, lambda o: named(o, "ScaledObject", "llm")["spec"]["triggers"][0]["metadata"]
                    .update(query="sum(videollm_llm_request_waiting)")),
    "service selector": (check_selectors,
                         lambda o: named(o, "Service", "encoder")["spec"]["selector"].update({"app.kubernetes.io/name": "encodr"})),
    "service port": (check_selectors, lambda o: named(o, "Service", "llm")["spec"]["ports"][0].update(targetPort="gprc")),
    "pdb selector": (check_selectors,
                     lambda o: named(o, "PodDisruptionBudget", "llm")["spec"]["selector"]["matchLabels"].update(
                         {"app.kubernetes.io/name": "lm"})),
    "claim": (check_references, lambda o: named(o, "Deployment", "encoder")["spec"]["template"]["spec"]["volumes"][0]
              ["persistentVolumeClaim"].update(claimName="models")),
    "metrics port": (check_probes, lambda o: named(o, "ConfigMap", "videollm-llm")["data"].update(
        VIDEOLLM_LLM_METRICS_PORT="9101")),
    "probe port": (check_probes, lambda o: _container(o, "gateway")["readinessProbe"]["httpGet"].update(port=8080)),
    "grpc service": (check_probes,
                     lambda o: _container(o, "encoder")["startupProbe"]["grpc"].update(service="videollm.v1.Encoders")),
    "setting name": (check_settings, lambda o: named(o, "ConfigMap", "videollm-llm")["data"].update(
        VIDEOLLM_LLM_DECODE_SLOT="8")),
    "setting prefix": (check_settings, lambda o: named(o, "ConfigMap", "videollm-encoder")["data"].update(
        VIDEOLLM_LLM_DECODE_SLOTS="8")),
    "setting value": (check_settings, lambda o: named(o, "ConfigMap", "videollm-llm")["data"].update(
        VIDEOLLM_LLM_DECODE_SLOTS="0")),
    "shm": (check_settings, lambda o: named(o, "ConfigMap", "videollm-gateway")["data"].pop("VIDEOLLM_GATEWAY_PULL_SHM_DIR")),
    "encoder address": (check_gateway_addresses, lambda o: named(o, "ConfigMap", "videollm-gateway")["data"].update(
        VIDEOLLM_GATEWAY_ENCODERS="dns:///encoder:50052")),
    "llm address": (check_gateway_addresses, lambda o: named(o, "ConfigMap", "videollm-gateway")["data"].update(
        VIDEOLLM_GATEWAY_LLMS="dns:///llm.other.svc.cluster.local:50052")),
    "not headless": (check_gateway_addresses, lambda o: named(o, "Service", "llm")["spec"].pop("clusterIP")),
    "redis": (check_gateway_addresses, lambda o: named(o, "ConfigMap", "videollm-gateway")["data"].update(
        REDIS_URL="redis://cache:6379/0")),
    "video store": (check_video_store, lambda o: named(o, "ConfigMap", "videollm-encoder")["data"].update(
        VIDEOLLM_ENCODER_VIDEO_STORE_DIR="/videos")),
    "gpu on gateway": (check_gpus_and_grace,
                       lambda o: _container(o, "gateway")["resources"]["limits"].update({"nvidia.com/gpu": 1})),
    "no gpu": (check_gpus_and_grace, lambda o: _container(o, "llm")["resources"]["limits"].pop("nvidia.com/gpu")),
    "grace": (check_gpus_and_grace, lambda o: named(o, "Deployment", "encoder")["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=600)),
    "timeout": (check_gpus_and_grace, lambda o: named(o, "ConfigMap", "videollm-gateway")["data"].update(
        VIDEOLLM_GATEWAY_REQUEST_TIMEOUT_S="900")),
    "drain": (check_gpus_and_grace, lambda o: named(o, "ConfigMap", "videollm-llm")["data"].update(
        VIDEOLLM_LLM_DRAIN_S="30")),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_checks_catch_typos(breakage):
    check, edit = BREAKAGES[breakage]
    objects = render(ROOT / "overlays" / "small")
    assert check(objects) == []
    assert check(_broken(objects, edit)) != []


def test_every_check_has_a_breakage():
    assert {check for check, _ in BREAKAGES.values()} == set(CHECKS)


def test_kubernetes_validate_cli_strict(tmp_path):
    """What the issue asks CI to run: `kubernetes-validate --strict` on the rendered manifests
    (KEDA's CRD left out: it has no schema there), and it refuses a broken file."""
    for overlay in OVERLAYS:
        objects = [o for o in render(ROOT / "overlays" / overlay) if not o["apiVersion"].startswith("keda.sh/")]
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(objects))
        for version in K8S_VERSIONS:
            run = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                                  "-k", version, str(path)], capture_output=True, text=True)
            assert run.returncode == 0, run.stdout + run.stderr
    named(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    path.write_text(yaml.safe_dump_all(objects))
    run = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(path)],
                         capture_output=True, text=True)
    assert run.returncode != 0
