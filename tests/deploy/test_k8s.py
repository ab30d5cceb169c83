"""deploy/k8s as a cluster would take it, without a cluster: ``kubectl kustomize`` renders the base and each
overlay; every core-kind document validates with kubernetes-validate (strict: unknown fields are errors)
against one Kubernetes version; every custom resource validates against the openAPIV3Schema of its CRD,
vendored under deploy/k8s/crds (unknown fields are errors there too, as with the API server's strict field
validation); and the policies a reviewer looks for are checked on the rendered objects: the "restricted" Pod
Security Standard's fields and resources on every pod, the serving probes, no secret values outside the dev
overlay, pinned images, NetworkPolicy and Service selectors that select real pods, the PrometheusRule equal to
the promtool-tested rules files, GPU requests and tolerations on the training pods, and the ports the settings
default to.

kubectl comes from the machine (v1.32 with kustomize v5.5): without it these tests skip, and under CI=true
they fail.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import visionloop
from visionloop.config import LoopSettings, MonitorSettings, ServeSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = K8S / "crds"
RULES = sorted((ROOT / "deploy" / "monitoring" / "prometheus" / "rules").glob("*.rules.yml"))
PROMETHEUS_YML = ROOT / "deploy" / "monitoring" / "prometheus" / "prometheus.yml"
README = K8S / "README.md"
KUBERNETES_VERSION = "1.32.0"
TARGETS = ("base", "overlays/dev", "overlays/production")
OVERLAYS = ("overlays/dev", "overlays/production")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# kinds whose objects hold a pod template, and where
WORKLOADS = {"Deployment", "StatefulSet", "Job", "CronJob", "PyTorchJob", "InferenceService"}
# volume types the restricted (and baseline) Pod Security Standard allows
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret"}  # fmt: skip
# env variables whose values are secrets: they must come from a Secret, never be written in a manifest
SECRET_ENV = re.compile(r"TOKEN|PASSWORD|SECRET|STORE_URL|BACKEND_STORE_URI|ACCESS_KEY", re.IGNORECASE)
CREDENTIAL_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")  # scheme://user:password@host


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        message = "kubectl is not installed (it brings kustomize: `kubectl kustomize`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def kustomize(target: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {target} failed:\n{done.stderr}"
    return [doc for doc in yaml.load_all(done.stdout, Loader=LOADER) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {target: kustomize(target) for target in TARGETS}


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) -> the vendored CRD."""
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=LOADER):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                found[(doc["spec"]["group"], doc["spec"]["names"]["kind"])] = doc
    return found


def group_of(doc: dict[str, Any]) -> str:
    api_version = doc["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def is_custom(doc: dict[str, Any]) -> bool:
    group = group_of(doc)
    return "." in group and not group.endswith(".k8s.io")


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(where, pod spec, pod labels) of every pod template a workload holds."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = doc.get("spec", {})
    if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
        template = spec["template"]
        yield name, template["spec"], template.get("metadata", {}).get("labels", {})
    elif doc["kind"] == "CronJob":
        template = spec["jobTemplate"]["spec"]["template"]
        yield name, template["spec"], template.get("metadata", {}).get("labels", {})
    elif doc["kind"] == "PyTorchJob":
        for role, replica in spec["pytorchReplicaSpecs"].items():
            template = replica["template"]
            yield f"{name}[{role}]", template["spec"], template.get("metadata", {}).get("labels", {})
    elif doc["kind"] == "InferenceService":
        predictor = spec["predictor"]
        yield f"{name}[predictor]", predictor, predictor.get("labels", {})


def all_pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    return [pod for doc in docs if doc["kind"] in WORKLOADS for pod in pod_templates(doc)]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def config_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return by_kind(docs, "ConfigMap")["visionloop-config"]["data"]


# ------------------------------------------------------------------------------------------------- rendering


def test_every_target_renders_with_the_parts_it_promises(rendered):
    kinds = {target: {doc["kind"] for doc in docs} for target, docs in rendered.items()}
    core = {"Namespace", "ConfigMap", "ServiceAccount", "Deployment", "Service", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "StatefulSet", "CronJob", "Job", "NetworkPolicy"}  # fmt: skip
    custom = {"ServiceMonitor", "PrometheusRule", "PyTorchJob", "InferenceService"}
    assert core <= kinds["base"] and not custom & kinds["base"]
    # dev: a kind cluster without operators: no custom resources, and no PodDisruptionBudget for one replica
    assert kinds["overlays/dev"] == (core - {"PodDisruptionBudget"}) | {"Secret", "PersistentVolumeClaim"}
    assert kinds["overlays/production"] >= core | custom and "Secret" not in kinds["overlays/production"]
    for target, docs in rendered.items():
        assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {"visionloop"}
        deployments = by_kind(docs, "Deployment")
        assert set(deployments) == {"visionloop-serve", "visionloop-monitor", "visionloop-loop", "mlflow"}, target
        for doc in docs:
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "visionloop", (target, doc["kind"])


# ------------------------------------------------------------------------------------------------ validation


def test_core_kinds_validate_strictly_against_kubernetes(rendered):
    checked = 0
    for target, docs in rendered.items():
        for doc in docs:
            if is_custom(doc):
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
            checked += 1
    assert checked > 60


def strict_schema(schema: Any) -> Any:
    """The CRD's schema as the API server applies it with strict field validation: an object that lists its
    properties takes no others (unless x-kubernetes-preserve-unknown-fields); int-or-string is either."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


def crd_validator(crd: dict[str, Any], api_version: str) -> jsonschema.Validator:
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    schema = strict_schema(served["schema"]["openAPIV3Schema"])
    # metadata is the API server's to check (ObjectMeta), as in the CRD, which only says "object"
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def test_every_custom_resource_validates_against_its_vendored_crd(rendered, crds):
    seen = set()
    for target, docs in rendered.items():
        for doc in docs:
            if not is_custom(doc):
                continue
            key = (group_of(doc), doc["kind"])
            assert key in crds, f"{target}: no vendored CRD in deploy/k8s/crds for {doc['apiVersion']} {doc['kind']}"
            errors = sorted(crd_validator(crds[key], doc["apiVersion"]).iter_errors(doc), key=str)
            assert not errors, f"{target}: {doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
            )
            seen.add(doc["kind"])
    assert seen == {"ServiceMonitor", "PrometheusRule", "PyTorchJob", "InferenceService"}


def test_the_crd_check_catches_unknown_fields_and_wrong_types(rendered, crds):
    """The schema check above is not vacuous: a misspelt field and a wrong type in each custom resource fail."""
    for doc in rendered["overlays/production"]:
        if not is_custom(doc):
            continue
        validator = crd_validator(crds[(group_of(doc), doc["kind"])], doc["apiVersion"])
        misspelt = copy.deepcopy(doc)
        misspelt["spec"]["selectr" if doc["kind"] == "ServiceMonitor" else "replicaz"] = 1
        assert not validator.is_valid(misspelt), doc["kind"]
        wrong = copy.deepcopy(doc)
        if doc["kind"] == "InferenceService":
            wrong["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
        elif doc["kind"] == "PyTorchJob":
            wrong["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
        elif doc["kind"] == "PrometheusRule":
            wrong["spec"]["groups"][0]["rules"] = "none"
        else:
            wrong["spec"]["endpoints"] = {"port": "http"}
        assert not validator.is_valid(wrong), doc["kind"]


def test_vendored_crds_name_their_source_version_and_licence():
    notes = (CRDS / "README.md").read_text()
    files = sorted(CRDS.glob("*.yaml"))
    assert len(files) == 4
    for path in files:
        header = path.read_text()[:1000]
        assert re.search(r"^# Source:  https://github\.com/\S+/blob/v[\d.]+/\S+\.yaml$", header, re.M), path.name
        assert re.search(r"^# Project: .+ release v[\d.]+ \(commit [0-9a-f]{40}\)$", header, re.M), path.name
        assert "License: Apache License 2.0" in header, path.name
        assert path.name in notes, f"crds/README.md does not list {path.name}"


# --------------------------------------------------------------------------------------------------- policies


def test_every_pod_meets_the_restricted_pod_security_standard_and_has_resources(rendered):
    for target, docs in rendered.items():
        pods = all_pods(docs)
        assert len(pods) >= 6, target
        for where, pod, _labels in pods:
            where = f"{target}: {where}"
            pod_context = pod.get("securityContext", {})
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            assert pod.get("automountServiceAccountToken") is False, where  # none of them calls the API
            for volume in pod.get("volumes", []):
                assert set(volume) - {"name"} <= ALLOWED_VOLUMES, (where, volume)
            for container in containers(pod):
                ctx = container.get("securityContext", {})

                def effective(field: str) -> Any:
                    return ctx.get(field, pod_context.get(field))  # noqa: B023 (used in this iteration only)

                name = f"{where}/{container['name']}"
                assert effective("runAsNonRoot") is True, name
                assert effective("runAsUser") in (10001, 999), name  # our images' user; postgres' own
                assert effective("runAsGroup") == effective("runAsUser"), name
                assert (effective("seccompProfile") or {}).get("type") == "RuntimeDefault", name
                assert ctx.get("allowPrivilegeEscalation") is False, name
                assert ctx.get("capabilities", {}).get("drop") == ["ALL"], name
                assert not ctx.get("capabilities", {}).get("add"), name
                assert not ctx.get("privileged"), name
                assert ctx.get("readOnlyRootFilesystem") is True, name
                # a read-only root needs a writable /tmp, and our images their home
                mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, name
                if container["image"].split(":")[0].rsplit("/", 1)[-1].startswith("visionloop-"):
                    assert "/var/lib/visionloop" in mounts or container["command"][0] == "mlflow", name
                resources = container.get("resources", {})
                assert {"cpu", "memory"} <= set(resources.get("requests", {})), name
                assert "memory" in resources.get("limits", {}), name
                assert not any(port.get("hostPort") for port in container.get("ports", [])), name


def http_probe(container: dict[str, Any], kind: str) -> str:
    probe = container[kind]["httpGet"]
    port = probe["port"]
    numbers = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert numbers.get(port, port) == container["ports"][0]["containerPort"], (container["name"], kind)
    return probe["path"]


def test_servers_have_liveness_on_healthz_readiness_on_readyz_and_a_startup_probe(rendered):
    checked = 0
    for target, docs in rendered.items():
        for where, pod, _ in all_pods(docs):
            for container in pod["containers"]:
                if container.get("args", [None])[0] not in ("serve", "monitor", "loop") or "ports" not in container:
                    continue
                name = f"{target}: {where}/{container['name']}"
                assert http_probe(container, "livenessProbe") == "/healthz", name
                assert http_probe(container, "readinessProbe") == "/readyz", name
                assert http_probe(container, "startupProbe") == "/healthz", name
                checked += 1
    assert checked >= 3 * 3 + 1  # serve, monitor, loop in each target, and the InferenceService


def secret_refs(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    refs = set()
    for _, pod, _ in all_pods(docs):
        for container in containers(pod):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            assert not any("secretRef" in source for source in container.get("envFrom", [])), container["name"]
    return refs


def test_no_secret_value_is_written_in_base_or_production(rendered):
    for target, docs in rendered.items():
        for doc in docs:
            if doc["kind"] == "Secret":
                assert target == "overlays/dev", f"{target} must reference Secrets, not define them"
            if doc["kind"] == "ConfigMap":
                for key, value in doc.get("data", {}).items():
                    assert not SECRET_ENV.search(key), (target, doc["metadata"]["name"], key)
                    assert not CREDENTIAL_URL.search(value), (target, doc["metadata"]["name"], key)
        for where, pod, _ in all_pods(docs):
            for container in containers(pod):
                for env in container.get("env", []):
                    if SECRET_ENV.search(env["name"]) and not env["name"].endswith("_PATH"):
                        assert "secretKeyRef" in env.get("valueFrom", {}), (target, where, env["name"])
                    assert not CREDENTIAL_URL.search(str(env.get("value", ""))), (target, where, env["name"])


def test_secret_references_resolve_and_are_documented(rendered):
    readme = README.read_text()
    base_refs = secret_refs(rendered["base"])
    assert {name for name, _ in base_refs} == {"visionloop-secrets"}
    keys = {key for _, key in base_refs}
    assert {"admin-token", "feedback-token", "store-url", "mlflow-backend-store-uri", "postgres-password"} <= keys
    for key in keys:
        assert f"| `{key}` |" in readme, f"README.md's Secret table does not document the key {key}"
    # production: the externally managed Secret, by its plain name
    assert secret_refs(rendered["overlays/production"]) == base_refs
    # dev: the generated Secret has every key referenced, with obviously-dev values
    dev = rendered["overlays/dev"]
    secrets = by_kind(dev, "Secret")
    for name, key in secret_refs(dev):
        assert name in secrets and key in secrets[name]["data"], (name, key)
    import base64

    for name, secret in secrets.items():
        for key, value in secret["data"].items():
            assert "dev-only" in base64.b64decode(value).decode(), (name, key)


def images(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(where, c) for where, pod, _ in all_pods(docs) for c in containers(pod)]


def test_images_are_pinned_and_named_per_overlay(rendered):
    version = visionloop.__version__
    for target, docs in rendered.items():
        for where, container in images(docs):
            image = container["image"]
            last = image.split("@")[0].rsplit("/", 1)[-1]
            tag = last.partition(":")[2]
            assert "@sha256:" in image or tag not in ("", "latest"), (target, where, image)
            assert container.get("imagePullPolicy") == "IfNotPresent", (target, where)
    dev = {c["image"] for _, c in images(rendered["overlays/dev"])}
    assert dev == {f"visionloop-serve:{version}", f"visionloop-train:{version}", "postgres:16"}
    production = {c["image"] for _, c in images(rendered["overlays/production"])}
    assert production == {
        f"ghcr.io/visionloop/visionloop-serve:{version}",
        f"ghcr.io/visionloop/visionloop-train:{version}",
        "postgres:16",
    }
    # the loop's pipeline runs in the overlay's training image
    for target in OVERLAYS:
        train_images = {c["image"] for where, c in images(rendered[target]) if where == "Job/visionloop-train"}
        assert train_images == {config_of(rendered[target])["VISIONLOOP_LOOP__KFP_IMAGE"]}, target


def test_network_policies_deny_by_default_and_select_real_pods(rendered):
    for target, docs in rendered.items():
        policies = by_kind(docs, "NetworkPolicy")
        assert policies["default-deny-ingress"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
        pods = all_pods(docs)
        for name, policy in policies.items():
            selector = policy["spec"]["podSelector"]
            if name == "default-deny-ingress":
                continue
            selected = [(where, pod) for where, pod, labels in pods if selects(selector, labels)]
            assert selected, f"{target}: NetworkPolicy {name} selects no pod"
            container_ports = {
                p["containerPort"] for _, pod in selected for c in pod["containers"] for p in c.get("ports", [])
            }
            for rule in policy["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    assert port["port"] in container_ports, f"{target}: {name} opens {port['port']}, no pod listens"
                for peer in rule.get("from", []):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        assert any(selects(peer["podSelector"], labels) for _, _, labels in pods), (target, name)
        # who may reach whom, as the README says
        postgres = policies["postgres"]["spec"]["ingress"][0]["from"][0]["podSelector"]
        for client in ("mlflow", "serve", "monitor", "loop"):
            assert selects(postgres, {"app.kubernetes.io/name": "visionloop", "app.kubernetes.io/component": client})
        loop_from = policies["visionloop-loop"]["spec"]["ingress"][0]["from"][0]
        assert loop_from["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
        assert selects(loop_from["podSelector"], {"app.kubernetes.io/name": "alertmanager"})
        assert policies["mlflow"]["spec"]["ingress"][0]["from"] == [{"namespaceSelector": {}}]
    production = by_kind(rendered["overlays/production"], "NetworkPolicy")
    assert "visionloop-ddp" in production and "visionloop-kserve" in production


def test_services_select_their_workloads_by_port_name(rendered):
    for target, docs in rendered.items():
        pods = [(where, pod, labels) for where, pod, labels in all_pods(docs) if where.split("/")[0] != "CronJob"]
        for name, service in by_kind(docs, "Service").items():
            wanted = service["spec"]["selector"]
            selected = [(where, pod) for where, pod, labels in pods if selects({"matchLabels": wanted}, labels)]
            kinds = {where.split("/")[0] for where, _ in selected}
            assert kinds and kinds <= {"Deployment", "StatefulSet"}, f"{target}: Service {name} selects {kinds}"
            assert len({where for where, _ in selected}) == 1, f"{target}: Service {name} selects several workloads"
            for port in service["spec"]["ports"]:
                named = {p["name"]: p["containerPort"] for _, pod in selected for c in pod["containers"]
                         for p in c.get("ports", [])}  # fmt: skip
                assert named.get(port["targetPort"]) == port["port"], (target, name, port)


def test_service_monitor_scrapes_the_jobs_the_rules_and_prometheus_yml_name(rendered):
    docs = rendered["overlays/production"]
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    services = by_kind(docs, "Service")
    selected = {
        name for name, svc in services.items() if selects(monitor["spec"]["selector"], svc["metadata"]["labels"])
    }
    # the job label Prometheus gives a ServiceMonitor's targets is the Service's name
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    assert selected == {job for job in jobs if job.startswith("visionloop-")}
    rules_jobs = set(re.findall(r'job="(visionloop-[a-z]+)"', "".join(path.read_text() for path in RULES)))
    assert rules_jobs <= selected
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        for name in selected:
            assert endpoint["port"] in {port["name"] for port in services[name]["spec"]["ports"]}


def test_prometheus_rules_equal_the_rules_files(rendered):
    rules = by_kind(rendered["overlays/production"], "PrometheusRule")
    assert set(rules) == {path.name.removesuffix(".rules.yml") for path in RULES}
    for path in RULES:
        assert (
            rules[path.name.removesuffix(".rules.yml")]["spec"]["groups"] == yaml.safe_load(path.read_text())["groups"]
        )
    done = subprocess.run(
        [sys.executable, str(K8S / "generate_prometheusrule.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_training_pods_request_gpus_on_the_gpu_node_pool_in_production(rendered):
    docs = rendered["overlays/production"]
    pods = [(where, pod) for where, pod, _ in all_pods(docs) if where.startswith(("Job/", "PyTorchJob/"))]
    assert {where for where, _ in pods} == {
        "Job/visionloop-train", "PyTorchJob/visionloop-ddp[Master]", "PyTorchJob/visionloop-ddp[Worker]"
    }  # fmt: skip
    for where, pod in pods:
        assert pod["nodeSelector"] == {"visionloop.dev/node-pool": "gpu"}, where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], where
        (container,) = pod["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus >= 1 and container["resources"]["requests"].get("nvidia.com/gpu", gpus) == gpus, where
    job = by_kind(docs, "Job")["visionloop-train"]["spec"]
    assert job["backoffLimit"] >= 1 and job["ttlSecondsAfterFinished"] > 0 and job["suspend"] is True
    ddp = by_kind(docs, "PyTorchJob")["visionloop-ddp"]["spec"]
    assert ddp["runPolicy"]["suspend"] is True
    for replica in ddp["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == int(
            ddp["nprocPerNode"]
        )
    # nothing asks for a GPU where there is none: not dev (kind), not the serving side
    for target in ("base", "overlays/dev"):
        for where, container in images(rendered[target]):
            assert "nvidia.com/gpu" not in str(container["resources"]), (target, where)
    assert by_kind(rendered["overlays/dev"], "Job")["visionloop-train"]["spec"]["suspend"] is False


def test_ports_and_settings_match_the_settings_defaults(rendered, monkeypatch):
    defaults = {
        "serve": ServeSettings().port,
        "monitor": MonitorSettings().port,
        "loop": LoopSettings().port,
    }
    for target, docs in rendered.items():
        config = config_of(docs)
        deployments = by_kind(docs, "Deployment")
        services = by_kind(docs, "Service")
        for component, port in defaults.items():
            (container,) = deployments[f"visionloop-{component}"]["spec"]["template"]["spec"]["containers"]
            assert container["args"][0] == component
            assert [p["containerPort"] for p in container["ports"]] == [port], (target, component)
            assert [p["port"] for p in services[f"visionloop-{component}"]["spec"]["ports"]] == [port]
            assert config[f"VISIONLOOP_{component.upper()}__PORT"] == str(port)
            assert config[f"VISIONLOOP_{component.upper()}__HOST"] == "0.0.0.0"
        mlflow_port = services["mlflow"]["spec"]["ports"][0]["port"]
        assert config["VISIONLOOP_REGISTRY__TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
        assert "--port=5000" in deployments["mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
        # the ConfigMap is valid settings: every key a real setting, every value of its type
        for key in list(os.environ):
            if key.startswith("VISIONLOOP_") or key == "MLFLOW_TRACKING_URI":
                monkeypatch.delenv(key)
        monkeypatch.chdir(K8S)  # no ./visionloop.yaml here
        for key, value in config.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.serve.port == defaults["serve"] and str(settings.home) == "/var/lib/visionloop"
        reload_url = f"http://visionloop-serve:{defaults['serve']}"
        assert settings.loop.reload_urls == [reload_url]
    assert config_of(rendered["overlays/production"])["VISIONLOOP_LOOP__EXECUTOR"] == "kubeflow"
    assert config_of(rendered["overlays/dev"])["VISIONLOOP_LOOP__EXECUTOR"] == "local"


def test_production_scales_and_spreads_the_servers(rendered):
    docs = rendered["overlays/production"]
    serve = by_kind(docs, "Deployment")["visionloop-serve"]["spec"]
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["visionloop-serve"]["spec"]
    pdb = by_kind(docs, "PodDisruptionBudget")["visionloop-serve"]["spec"]
    assert serve["replicas"] == 3 and (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 20)
    assert hpa["metrics"][0]["resource"]["name"] == "cpu" and pdb["minAvailable"] == 2
    pod = serve["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"] and {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    dev = rendered["overlays/dev"]
    assert by_kind(dev, "Deployment")["visionloop-serve"]["spec"]["replicas"] == 1
    assert by_kind(dev, "HorizontalPodAutoscaler")["visionloop-serve"]["spec"]["minReplicas"] == 1
    assert all(d["spec"]["suspend"] is True for d in by_kind(docs, "CronJob").values())
