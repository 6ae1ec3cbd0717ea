"""Offline checks of deploy/kubernetes: schemas, security settings, ports, probes, secrets.

No cluster runs here. Every overlay is rendered (tests/deploy/kustomize_lite.py; checked
against `kubectl kustomize` where one is installed), and every object validates against the
Kubernetes API's JSON schemas for the stated version (`kubernetes-validate`, which ships them,
in strict mode: unknown fields fail) or, for custom resources, against the OpenAPI schema of
their CRD (tests/deploy/crds, with source versions in its README).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service import metrics
from service.middleware.ports import PROBES
from service.routes.ops import router as ops_router
from tests.deploy import kustomize_lite
from tests.deploy.kustomize_lite import KustomizeError, build, key, split_image
from tests.stack.helpers import ROOT

K8S = ROOT / "deploy" / "kubernetes"
CRDS = Path(__file__).with_name("crds")
# The Kubernetes version the manifests are written for (docs/operations.md), and the newest one
# kubernetes-validate ships schemas for (so an API removed since fails too).
KUBERNETES_VERSION = "1.33"
VERSIONS = (KUBERNETES_VERSION, "1.37")
OVERLAYS = ("local", "production", "production-keda")
SECRET_NAME = "ranker-secrets"
EXAMPLE = K8S / "overlays" / "local" / "secrets.env.example"
UID = 10001  # Dockerfile: USER 10001:10001
API_PORT, OPS_PORT = 8000, 9100
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
CRD_FILES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}

Obj = dict[str, Any]


# ---- rendering ---------------------------------------------------------------------------------


def copy_tree(dest: Path) -> Path:
    """deploy/kubernetes copied with the local overlay's secrets.env made from its .example."""
    tree = dest / "kubernetes"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(EXAMPLE, tree / "overlays" / "local" / "secrets.env")
    return tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_tree(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[Obj]]:
    return {name: build(tree / "overlays" / name) for name in OVERLAYS}


def render(rendered: dict[str, list[Obj]], overlay: str) -> list[Obj]:
    return copy.deepcopy(rendered[overlay])


@pytest.fixture
def objects(rendered: dict[str, list[Obj]], overlay: str) -> list[Obj]:
    """The objects of the overlay the test is parametrized with, a copy it may change."""
    return render(rendered, overlay)


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(object, pod spec) of every object that creates pods."""
    for obj in objects:
        if obj["kind"] == "Pod":
            yield obj, obj["spec"]
        elif obj["kind"] == "CronJob":
            yield obj, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif obj["kind"] in POD_TEMPLATE_KINDS:
            yield obj, obj["spec"]["template"]["spec"]


def containers(spec: Obj) -> list[Obj]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def ranker_container(objects: list[Obj]) -> Obj:
    spec = one(objects, "Deployment", "ranker")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "ranker")


def config(objects: list[Obj]) -> dict[str, str]:
    return one(objects, "ConfigMap", "ranker-config")["data"]


def example_secrets() -> dict[str, str]:
    return kustomize_lite.parse_env_file(EXAMPLE)


# ---- schema validation -------------------------------------------------------------------------


def strict_crd_schema(schema: Any) -> Any:
    """The CRD's OpenAPI schema with unknown fields refused, as `kubectl apply --validate=strict`
    does (the API server would prune them silently); preserve-unknown-fields nodes stay open."""
    if isinstance(schema, dict):
        out = {k: strict_crd_schema(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_crd_schema(v) for v in schema]
    return schema


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((CRDS / CRD_FILES[api_version, kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    [ver] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert ver["served"], f"{api_version} {kind} is not served by this CRD"
    schema = strict_crd_schema(ver["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate(obj: Obj, version: str) -> None:
    """Raise if `obj` is not valid for Kubernetes `version` (or its CRD)."""
    crd = (obj["apiVersion"], obj["kind"])
    if crd in CRD_FILES:
        crd_validator(*crd).validate(obj)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_api_schemas(
    objects: list[Obj], overlay: str, version: str
) -> None:
    assert objects
    for obj in objects:
        try:
            validate(obj, version)
        except Exception as e:  # name the object in the failure
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {e}")


def test_the_custom_resources_are_the_ones_with_committed_crds(
    rendered: dict[str, list[Obj]],
) -> None:
    kinds = {(o["apiVersion"], o["kind"]) for objs in rendered.values() for o in objs}
    assert ("monitoring.coreos.com/v1", "ServiceMonitor") in kinds
    assert ("keda.sh/v1alpha1", "ScaledObject") in kinds
    # a dotted API group outside *.k8s.io is a custom resource: each needs its CRD's schema
    custom = {k for k in kinds if "/" in k[0] and "." in (group := k[0].split("/")[0])
              and not group.endswith(".k8s.io")}
    assert custom == set(CRD_FILES), f"custom resources without a CRD schema: {custom}"


def test_the_validators_reject_broken_manifests(rendered: dict[str, list[Obj]]) -> None:
    """Each validator has teeth: a typo'd field, a wrong type, a removed API version fail."""
    objects = render(rendered, "production-keda")
    deployment = one(objects, "Deployment", "ranker")
    validate(deployment, KUBERNETES_VERSION)
    cases: list[tuple[str, Obj]] = []
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    cases.append(("unknown container field", typo))
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "three"
    cases.append(("replicas as a string", wrong))
    old = copy.deepcopy(one(objects, "PodDisruptionBudget", "ranker"))
    old["apiVersion"] = "policy/v1beta1"  # removed in 1.25
    cases.append(("removed API version", old))
    so = copy.deepcopy(one(objects, "ScaledObject", "ranker"))
    so["spec"]["maxReplicas"] = 20  # KEDA calls it maxReplicaCount
    cases.append(("unknown ScaledObject field", so))
    sm = copy.deepcopy(one(objects, "ServiceMonitor", "ranker"))
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    cases.append(("ServiceMonitor interval not a duration", sm))
    for what, obj in cases:
        try:
            validate(obj, KUBERNETES_VERSION)
        except Exception:  # either validator's error type
            continue
        pytest.fail(f"{what} was accepted")


# ---- the loader itself -------------------------------------------------------------------------


def test_loader_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    kfile = tree / "overlays" / "production" / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    kfile.write_text(yaml.safe_dump({**k, "commonLabels": {"team": "ml"}}))
    with pytest.raises(KustomizeError, match="commonLabels"):
        build(kfile.parent)
    kfile.write_text(yaml.safe_dump({**k, "patches": [{"path": "patch-hpa.yaml",
                                                       "target": {"kind": "Deployment"}}]}))
    with pytest.raises(KustomizeError, match="patches"):
        build(kfile.parent)


def test_loader_image_references() -> None:
    assert split_image("registry:5000/ml/mmoe-ranker:service") == (
        "registry:5000/ml/mmoe-ranker", "service", None)
    assert split_image("mmoe-ranker@sha256:ab") == ("mmoe-ranker", None, "sha256:ab")


def kubectl_kustomize() -> str | None:
    """A `kubectl` whose embedded kustomize is v4 or newer (older ones lack what we use)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    try:
        out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Kustomize Version: v(\d+)", out)
    return kubectl if m and int(m.group(1)) >= 4 else None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_loader_matches_kubectl_kustomize(
    tree: Path, rendered: dict[str, list[Obj]], overlay: str
) -> None:
    kubectl = kubectl_kustomize()
    if kubectl is None:
        pytest.skip("no kubectl with kustomize >= v4 on PATH (not installable from PyPI or "
                    "Debian here); the loader's output is compared when one is")
    out = subprocess.run([kubectl, "kustomize", str(tree / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    theirs = {key(o): o for o in yaml.safe_load_all(out) if o}
    ours = {key(o): o for o in rendered[overlay]}
    assert sorted(ours) == sorted(theirs)
    for k, obj in ours.items():
        assert obj == theirs[k], k


# ---- security ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down(objects: list[Obj], overlay: str) -> None:
    specs = list(pod_specs(objects))
    names = {o["metadata"]["name"] for o, _ in specs}
    assert {"ranker", "ranker-trainer", "ranker-features-load", "ranker-model-retire"} <= names
    if overlay == "local":
        assert "redis" in names
    for obj, spec in specs:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, where
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where
        for c in containers(spec):
            sc = c.get("securityContext", {})
            at = f"{where} container {c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert sc.get("readOnlyRootFilesystem") is True, at
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not sc.get("capabilities", {}).get("add"), at
            assert not sc.get("privileged"), at
            assert sc.get("runAsUser", pod.get("runAsUser")) not in (None, 0), at
            if split_image(c["image"])[0].endswith("mmoe-ranker"):
                assert sc.get("runAsUser", pod.get("runAsUser")) == UID, at
                # a read-only root: everything the process writes goes to an emptyDir at /tmp
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                assert "emptyDir" in volumes[mounts["/tmp"]], at
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("HOME") == "/tmp", at
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), at
            assert {"cpu", "memory"} <= set(res.get("limits", {})), at


def test_the_uid_is_the_dockerfiles() -> None:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users and all(u == f"{UID}:{UID}" for u in users)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_prometheus_multiprocess_dir_is_an_emptydir(objects: list[Obj]) -> None:
    c = ranker_container(objects)
    spec = one(objects, "Deployment", "ranker")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]["name"]]


# ---- the service: command, ports, probes -------------------------------------------------------


def resolve_port(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_worker_per_pod_and_probes_on_the_right_paths(objects: list[Obj]) -> None:
    c = ranker_container(objects)
    cmd = c["command"] + c.get("args", [])
    assert cmd[:2] == ["ranker", "serve"], "the console script, not python -m <module>"
    assert cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = int(cmd[cmd.index("--port") + 1])
    assert port == API_PORT == resolve_port(c, "http")
    routes = {r.path for r in ops_router.routes}  # type: ignore[attr-defined]
    probes = {name: c[name]["httpGet"] for name in ("startupProbe", "livenessProbe",
                                                    "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] in PROBES
    for probe in probes.values():
        assert probe["path"] in routes and probe["path"] in PROBES
        assert resolve_port(c, probe["port"]) == API_PORT
    # the startup probe gives the warm-up at least a minute before liveness may restart the pod
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 60


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_public_service_does_not_expose_the_operator_port(objects: list[Obj]) -> None:
    c = ranker_container(objects)
    ops = int(config(objects)["RANKER_METRICS_PORT"])
    assert ops == OPS_PORT == resolve_port(c, "ops")
    pod_labels = one(objects, "Deployment", "ranker")["spec"]["template"]["metadata"]["labels"]
    services = [o for o in objects if o["kind"] == "Service"
                and o["spec"]["selector"].items() <= pod_labels.items()]
    public = one(objects, "Service", "ranker")
    operator = one(objects, "Service", "ranker-operator")
    assert {s["metadata"]["name"] for s in services} == {"ranker", "ranker-operator"}
    assert [resolve_port(c, p["targetPort"]) for p in public["spec"]["ports"]] == [API_PORT]
    assert all(p["port"] != ops for p in public["spec"]["ports"])
    assert [resolve_port(c, p["targetPort"]) for p in operator["spec"]["ports"]] == [ops]
    assert operator["spec"].get("type", "ClusterIP") == "ClusterIP"
    for svc in services:  # nothing publishes the pods outside the cluster
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not [o for o in objects if o["kind"] == "Ingress"]
    # the NetworkPolicy admits the operator port only from the monitoring namespace
    policy = one(objects, "NetworkPolicy", "ranker")
    for rule in policy["spec"]["ingress"]:
        ports = [resolve_port(c, p["port"]) for p in rule["ports"]]
        if ops in ports:
            assert rule.get("from"), "the operator port is open to every pod"


@pytest.mark.parametrize("overlay", ("production", "production-keda"))
def test_the_servicemonitor_scrapes_only_the_operator_service(objects: list[Obj]) -> None:
    sm = one(objects, "ServiceMonitor", "ranker")
    selector = sm["spec"]["selector"]["matchLabels"]
    matched = [o["metadata"]["name"] for o in objects if o["kind"] == "Service"
               and selector.items() <= o["metadata"].get("labels", {}).items()]
    assert matched == ["ranker-operator"]
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] == "ops" and endpoint["path"] == "/metrics"
    # job="ranker" as in deploy/prometheus/prometheus.yml, so the rules and dashboard apply
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert {"targetLabel": "job", "replacement": prom["scrape_configs"][0]["job_name"]} in (
        endpoint["relabelings"])


# ---- storage and jobs --------------------------------------------------------------------------


def claims(spec: Obj, container: Obj) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claim name, read-only) of the container's PVC mounts."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in container.get("volumeMounts", []):
        pvc = volumes[m["name"]].get("persistentVolumeClaim")
        if pvc:
            out[m["mountPath"]] = (pvc["claimName"], bool(m.get("readOnly")))
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_repository_is_shared_and_read_only_for_the_service(
    objects: list[Obj], overlay: str
) -> None:
    repo = config(objects)["RANKER_MODEL_REPO"]
    mounts = {}
    for obj, spec in pod_specs(objects):
        for c in containers(spec):
            mounts[obj["metadata"]["name"]] = (spec, c, claims(spec, c))
    service_spec, _, service = mounts["ranker"]
    _, _, trainer = mounts["ranker-trainer"]
    _, _, loader = mounts["ranker-features-load"]
    claim = service[repo][0]
    assert service[repo] == (claim, True)
    svc_volume = next(v for v in service_spec["volumes"] if v.get("persistentVolumeClaim"))
    assert svc_volume["persistentVolumeClaim"].get("readOnly") is True
    assert trainer[repo] == (claim, False), "the trainer writes the versions the service reads"
    assert loader[repo] == (claim, True)
    assert mounts["ranker-model-retire"][2][repo] == (claim, False)
    assert trainer["/data"][1] is False and loader["/data"] == (trainer["/data"][0], True)
    one(objects, "PersistentVolumeClaim", claim)
    one(objects, "PersistentVolumeClaim", trainer["/data"][0])
    if overlay != "local":
        pvc = one(objects, "PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes"


def stage_names() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "Dockerfile").read_text(),
                          re.MULTILINE | re.IGNORECASE))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_use_the_right_images_and_commands(objects: list[Obj]) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    tags = {"ranker": compose["ranker"]["build"]["target"],
            "ranker-trainer": compose["trainer"]["build"]["target"],
            "ranker-features-load": compose["ranker"]["build"]["target"],
            "ranker-model-retire": compose["ranker"]["build"]["target"]}
    for obj, spec in pod_specs(objects):
        name = obj["metadata"]["name"]
        if name not in tags:
            continue
        [c] = spec["containers"]
        image, tag, _ = split_image(c["image"])
        assert image.endswith("mmoe-ranker") and tag == tags[name] and tag in stage_names()
    job = one(objects, "Job", "ranker-trainer")["spec"]["template"]["spec"]
    script = " ".join(job["containers"][0]["command"] + job["containers"][0]["args"])
    steps = ["ranker data", "ranker train", "ranker export --run \"$run\" --repo /tmp/staging",
             "ranker features load --repo /tmp/staging",
             'ranker export --run "$run" --repo "$RANKER_MODEL_REPO"']
    # features for the new schema are loaded before the version reaches the shared repository
    assert [script.index(s) for s in steps] == sorted(script.index(s) for s in steps)
    retire = one(objects, "CronJob", "ranker-model-retire")["spec"]
    assert retire["suspend"] is True, "run on demand only"
    assert job["restartPolicy"] == "Never"
    cron = one(objects, "CronJob", "ranker-features-load")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    load = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert load[:3] == ["ranker", "features", "load"]
    env = {e["name"] for e in cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
           .get("env", [])} | set(config(objects))
    for arg in load:  # every $(VAR) the kubelet expands is defined in the container
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, var


# ---- secrets -----------------------------------------------------------------------------------


SECRETISH = re.compile(r"KEY|PASSWORD|SECRET|TOKEN", re.IGNORECASE)


def committed_manifests() -> list[Path]:
    return [p for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml")]


def test_no_secret_value_in_a_committed_manifest() -> None:
    files = committed_manifests()
    assert len(files) >= 10
    examples = set(example_secrets().values())
    for path in files:
        text = path.read_text()
        for value in examples:
            assert value not in text, f"{path}: contains the example secret {value!r}"
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            assert doc.get("kind") != "Secret", f"{path}: a Secret object in a manifest"
            for node in walk(doc):
                if isinstance(node, dict) and "name" in node and "value" in node:
                    assert not SECRETISH.search(str(node["name"])), (
                        f"{path}: env {node['name']} has a literal value")
                if isinstance(node, str) and node.startswith(("redis://", "rediss://")):
                    assert "@" not in node, f"{path}: credentials in a URL"
    # the real env file is never committed
    ignored = subprocess.run(["git", "check-ignore", "-q",
                              str(K8S / "overlays" / "local" / "secrets.env")], cwd=ROOT,
                             timeout=30)
    assert ignored.returncode == 0, "overlays/local/secrets.env must be git-ignored"
    for value in examples:  # the example holds placeholders, not secrets
        assert value.strip('[]"').startswith("change-me"), value


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def secret_refs(objects: list[Obj]) -> set[tuple[str, str]]:
    return {(n["secretKeyRef"]["name"], n["secretKeyRef"]["key"])
            for o in objects for n in walk(o) if isinstance(n, dict) and "secretKeyRef" in n}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_the_secret(objects: list[Obj], overlay: str) -> None:
    refs = secret_refs(objects)
    keys = set(example_secrets())
    assert {(SECRET_NAME, k) for k in keys} == refs, "every key is used and documented"
    c = ranker_container(objects)
    env = {e["name"]: e for e in c["env"]}
    for name, ref in (("RANKER_API_KEYS", "RANKER_API_KEYS"),
                      ("RANKER_ADMIN_API_KEY", "RANKER_ADMIN_API_KEY"),
                      ("RANKER_REDIS_PASSWORD", "REDIS_PASSWORD")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": ref}
    assert not any(SECRETISH.search(k) for k in config(objects)), "a secret in the ConfigMap"
    secrets = [o for o in objects if o["kind"] == "Secret"]
    if overlay == "local":  # generated from the git-ignored env file
        [secret] = secrets
        assert secret["metadata"]["name"] == SECRET_NAME and set(secret["data"]) == keys
    else:  # created by the operator beforehand (docs/operations.md)
        assert secrets == []


# ---- autoscaling and disruption ----------------------------------------------------------------


def autoscalers(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exactly_one_autoscaler_and_a_pdb(objects: list[Obj]) -> None:
    [scaler] = autoscalers(objects)
    assert scaler["spec"]["scaleTargetRef"]["name"] == "ranker"
    deployment = one(objects, "Deployment", "ranker")
    pdb = one(objects, "PodDisruptionBudget", "ranker")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    if scaler["kind"] == "HorizontalPodAutoscaler":
        [metric] = scaler["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"]["type"] == "Utilization"
        assert 1 <= scaler["spec"]["minReplicas"] <= scaler["spec"]["maxReplicas"]
    # the autoscaler owns the replica count: a `replicas` field would reset it on every apply
    assert "replicas" not in deployment["spec"]


def test_the_keda_variant_scales_on_the_exported_inflight_gauge(
    rendered: dict[str, list[Obj]],
) -> None:
    objects = render(rendered, "production-keda")
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    so = one(objects, "ScaledObject", "ranker")
    triggers = {t["type"]: t for t in so["spec"]["triggers"]}
    query = triggers["prometheus"]["metadata"]["query"]
    gauge = metrics.INFLIGHT._name  # the name service/metrics.py exports
    assert gauge == "ranker_inflight_requests"
    assert re.search(rf"\b{gauge}\{{", query)
    assert 'job="ranker"' in query and 'namespace="ranker"' in query
    assert float(triggers["prometheus"]["metadata"]["threshold"]) > 0
    assert triggers["cpu"]["metadata"]["value"] == "60"
    assert so["metadata"]["namespace"] == "ranker"


# ---- the operations page -----------------------------------------------------------------------


def test_the_documented_commands_name_real_objects(rendered: dict[str, list[Obj]]) -> None:
    """Every overlay, kind/name and label selector the Kubernetes section uses exists."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Deploy on Kubernetes"):]
    section = section[:section.index("\n## ", 5)]
    assert f"Kubernetes {KUBERNETES_VERSION}" in section
    overlays = set(re.findall(r"-k (deploy/kubernetes/overlays/[\w-]+)", section))
    for overlay in OVERLAYS:
        assert f"overlays/{overlay}" in section, overlay
    for path in overlays:
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    production = rendered["production"] + rendered["production-keda"] + rendered["local"]
    kinds = {"job": "Job", "cronjob": "CronJob", "deployment": "Deployment",
             "service": "Service"}
    ref = r"(?<![\w/])(job|cronjob|deployment|service)/([a-z0-9-]+)(?![\w.])"
    refs = set(re.findall(ref, section))
    assert ("cronjob", "ranker-model-retire") in refs and ("job", "ranker-trainer") in refs
    for kind, name in refs:
        assert any(o["kind"] == kinds[kind] and o["metadata"]["name"] == name
                   for o in production), f"{kind}/{name}"
    for selector in re.findall(r"-l ([\w./-]+=[\w-]+)", section):
        label, value = selector.split("=")
        pods = [o for o, _ in pod_specs(production)
                if o["kind"] == "Deployment" and o["spec"]["template"]["metadata"]["labels"]
                .get(label) == value]
        assert pods, selector
    for env in re.findall(r'os\.environ\["(\w+)"\]', section):
        assert env in {e["name"] for e in ranker_container(rendered["production"])["env"]}
