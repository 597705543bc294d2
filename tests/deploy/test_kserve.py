"""deploy/kserve/inferenceservice.yaml: every field a field of KServe's InferenceService, of the type it takes, and
what it says fits this server: the image the release pushes, the v2 protocol and its probes, a GPU, settings the
server accepts, a drain that fits.

No package ships KServe's CRD, but its Python SDK ships OpenAPI models generated from the same Go types as the CRD:
each model class names its fields (`attribute_map`, Python attribute to JSON key) and their types
(`openapi_types`). The SDK's models cover KServe's own types and name the Kubernetes ones they embed (V1Container,
V1ObjectMeta, ...), whose models the Kubernetes Python client ships in the same form. `make install` downloads both
wheels, at the versions the Makefile's KSERVE_MODEL_WHEELS pins, into .venv/schemas; this test reads the model
sources out of the zips with `ast` and imports neither package (kserve's __init__ imports a server stack)."""

from __future__ import annotations

import ast
import datetime
import difflib
import json
import re
import sys
import warnings
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.access import OPEN_PATHS
from app.settings import Settings

from .test_deploy import DEPLOY, ROOT, VERSION, image_ports

KSERVE = DEPLOY / "kserve"
MANIFEST = KSERVE / "inferenceservice.yaml"
WHEELS = Path(sys.executable).parents[1] / "schemas"  # $(VENV)/schemas: the Makefile's KSERVE_MODELS
MODEL_PACKAGES = {"kserve": "kserve/models/", "kubernetes": "kubernetes/client/models/"}

# Type strings that are not models. Quantities (cpu: "4", memory: 24Gi) are `str` in the Kubernetes client's models:
# the API also takes a bare number there, which this check refuses (quote them).
PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "bytes": (str,),  # base64 text in YAML and JSON
    "datetime": (str, datetime.datetime),  # YAML reads an unquoted timestamp as a datetime
    "date": (str, datetime.date),
}
LIST = re.compile(r"(?:list|List)\[(.+)\]")
DICT = re.compile(r"dict\((\w+), (.+)\)|Dict\[(\w+), (.+)\]")  # the legacy generator's form, then the newer one's
CLASS = re.compile(r"^class (\w+)\(", re.M)
# The type names the manifest may reach that neither wheel models, each taken as "anything": `object` is the
# generator's name for int-or-string (a probe's port) and free-form JSON. Others that kserve's models name, such as
# ResourceQuantity or K8sIoApiAppsV1DeploymentStrategy, would be taken as "anything" too, and fail
# test_the_manifest_reaches_no_unmodelled_type until looked at and listed here.
OPAQUE_REACHED = {"object"}


def pins() -> dict[str, str]:
    found = re.search(r"^KSERVE_MODEL_WHEELS := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile names no KSERVE_MODEL_WHEELS"
    return dict(pin.split("==") for pin in found.group(1).split())


def wheel(package: str, version: str) -> Path:
    found = sorted(WHEELS.glob(f"{package}-{version}-*.whl"))
    if not found:
        pytest.fail(
            f"{package}=={version}'s wheel is not in {WHEELS}: run `make install` (it downloads the wheels whose models"
            " this test checks the InferenceService against)"
        )
    return found[0]


class Models:
    """Every model class of the two wheels by name, its fields (JSON key to type string) read on first use."""

    def __init__(self, wheels: dict[str, Path]) -> None:
        self.sources: dict[str, str] = {}
        for package, path in wheels.items():
            with zipfile.ZipFile(path) as zipped:
                for member in zipped.namelist():
                    if member.startswith(MODEL_PACKAGES[package]) and member.endswith(".py"):
                        text = zipped.read(member).decode()
                        for name in CLASS.findall(text):
                            self.sources.setdefault(name, text)
        self.parsed: dict[str, dict[str, str]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def fields(self, name: str) -> dict[str, str]:
        if name not in self.parsed:
            with warnings.catch_warnings():  # generated docstrings hold invalid escapes ("\d"): not our code
                warnings.simplefilter("ignore")
                module = ast.parse(self.sources[name])
            (cls,) = (n for n in module.body if isinstance(n, ast.ClassDef) and n.name == name)
            found: dict[str, Any] = {}
            for statement in cls.body:  # `openapi_types = {...}`, or `openapi_types: ClassVar[...] = {...}`
                if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                    target, value = statement.targets[0], statement.value
                elif isinstance(statement, ast.AnnAssign) and statement.value:
                    target, value = statement.target, statement.value
                else:
                    continue
                if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map"):
                    found[target.id] = ast.literal_eval(value)
            assert found.keys() == {"openapi_types", "attribute_map"}, f"{name}: not a generated model class"
            self.parsed[name] = {found["attribute_map"][a]: t for a, t in found["openapi_types"].items()}
        return self.parsed[name]


@cache
def models() -> Models:
    return Models({package: wheel(package, version) for package, version in pins().items()})


class Checker:
    """What a strict `kubectl apply` would refuse, by the models: a key its object does not have, a value of the
    wrong type. Every problem is collected, each as `path: what`."""

    def __init__(self, models: Models) -> None:
        self.models = models
        self.errors: list[str] = []
        self.opaque: set[str] = set()  # the unmodelled type names reached, each taken as "anything"

    def check(self, value: Any, type_: str, path: str) -> None:
        if value is None:
            self.errors.append(f"{path}: null, where {type_} is wanted (the API server would drop the field)")
        elif found := LIST.fullmatch(type_):
            if not isinstance(value, list):
                self.errors.append(f"{path}: {value!r} is not a list ({type_})")
                return
            for i, item in enumerate(value):
                self.check(item, found[1], f"{path}[{i}]")
        elif found := DICT.fullmatch(type_):
            if not isinstance(value, dict):
                self.errors.append(f"{path}: {value!r} is not a mapping ({type_})")
                return
            for key, item in value.items():
                if not isinstance(key, str):
                    self.errors.append(f"{path}: key {key!r} is not a string")
                self.check(item, found[2] or found[4], f"{path}[{key!r}]")
        elif type_ in PRIMITIVES:
            allowed = PRIMITIVES[type_]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                self.errors.append(f"{path}: {value!r} is not of type {type_}")
        elif type_ in self.models:
            self.check_model(value, type_, path)
        else:
            self.opaque.add(type_)

    def check_model(self, value: Any, model: str, path: str) -> None:
        if not isinstance(value, dict):
            self.errors.append(f"{path or '(document)'}: {value!r} is not a mapping ({model})")
            return
        fields = self.models.fields(model)
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.errors.append(f"{where}: {model} has no field {key!r}{hint}")
            else:
                self.check(item, fields[key], where)


def problems(doc: Any) -> tuple[list[str], set[str]]:
    """The manifest's problems, and the unmodelled types it reached."""
    checker = Checker(models())
    if isinstance(doc, dict):
        if doc.get("apiVersion") != "serving.kserve.io/v1beta1":
            checker.errors.append(f"apiVersion: {doc.get('apiVersion')!r}, not 'serving.kserve.io/v1beta1'")
        if doc.get("kind") != "InferenceService":
            checker.errors.append(f"kind: {doc.get('kind')!r}, not 'InferenceService'")
    checker.check_model(doc, "V1beta1InferenceService", "")
    return checker.errors, checker.opaque


def service() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return doc


def container() -> dict[str, Any]:
    (only,) = service()["spec"]["predictor"]["containers"]
    return dict(only)


def test_the_inference_service_has_only_kserves_fields_of_their_types() -> None:
    errors, _ = problems(service())
    assert errors == []


def test_the_manifest_reaches_no_unmodelled_type() -> None:
    """Guards the check's reach: a model the wheels no longer hold (a renamed class, a new generator's form) would
    make its whole subtree "anything" and pass unchecked."""
    _, opaque = problems(service())
    assert opaque <= OPAQUE_REACHED, f"{sorted(opaque - OPAQUE_REACHED)}: types neither wheel models"


def test_the_check_catches_misspelt_fields_wrong_types_and_the_wrong_resource() -> None:
    text = MANIFEST.read_text()
    broken = {
        "readinessProbe:": (
            "readinesProbe:",
            "spec.predictor.containers[0].readinesProbe: V1Container has no field 'readinesProbe'"
            " (did you mean 'readinessProbe'?)",
        ),
        "containerPort: 8000": (
            'containerPort: "8000"',
            "spec.predictor.containers[0].ports[0].containerPort: '8000' is not of type int",
        ),
        "  predictor:": (
            "  predicter:",
            "spec.predicter: V1beta1InferenceServiceSpec has no field 'predicter' (did you mean 'predictor'?)",
        ),
        "terminationGracePeriodSeconds: 60": (
            "terminationGracePeriodSeconds: true",
            "spec.predictor.terminationGracePeriodSeconds: True is not of type int",
        ),
        'prometheus.kserve.io/port: "8000"': (
            "prometheus.kserve.io/port: 8000",
            "metadata.annotations['prometheus.kserve.io/port']: 8000 is not of type str",
        ),
        "serving.kserve.io/v1beta1": ("serving.kserve.io/v1alpha1", "apiVersion: 'serving.kserve.io/v1alpha1', not"),
        "grpc:\n            port: 8001": (
            'grpc:\n            port: "8001"',
            "spec.predictor.containers[0].readinessProbe.grpc.port: '8001' is not of type int",
        ),
    }
    for right, (wrong, error) in broken.items():
        assert text.count(right) == 1, right
        errors, _ = problems(yaml.safe_load(text.replace(right, wrong)))
        assert len(errors) == 1 and errors[0].startswith(error), (wrong, errors)


def test_it_runs_the_released_image_speaking_v2_on_a_gpu() -> None:
    doc, server = service(), container()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert server["image"] == f"ghcr.io/perceiver-serve/perceiver-serve:{VERSION}-cuda"
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["PROTOCOL"] == "v2"
    port = server["ports"][0]["containerPort"]
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}  # answers while loading
    assert server["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}  # a hung load restarts
    assert "/v2/health/live".startswith(OPEN_PATHS) and "/v2/health/ready".startswith(OPEN_PATHS)  # keys or not
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert doc["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(port)


def _grpc_port_name(name: str) -> bool:
    """KServe's rule (reconcilers/service/service_reconciler.go, isGrpcPort): such a port gets appProtocol h2c."""
    return "grpc" in name or "h2c" in name


def test_it_serves_http_on_the_url_and_grpc_beside_it_and_probes_grpc_readiness() -> None:
    """What KServe's Standard mode builds from the ports: the first one is the Service's port 80 (the URL, and the
    port its HTTPRoute sends REST to), each further one a port of its own number, marked kubernetes.io/h2c when its
    name says gRPC (where the HTTPRoute sends gRPC). Knative's Serverless mode allows one port only."""
    doc, server = service(), container()
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    http, grpc = server["ports"]  # the order matters: port 80 must be HTTP
    assert (http["name"], http["containerPort"]) == ("http", image_ports()["http"])
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", image_ports()["grpc"])
    assert not _grpc_port_name(http["name"]) and _grpc_port_name(grpc["name"])
    env = {e["name"]: e["value"] for e in server["env"]}
    assert int(env.get("PERCEIVER_PORT", http["containerPort"])) == http["containerPort"]
    assert int(env.get("PERCEIVER_GRPC_PORT", grpc["containerPort"])) == grpc["containerPort"]
    # grpc.health.v1 for the whole server means what /v2/health/ready means; the kubelet sends it no credentials.
    assert server["readinessProbe"]["grpc"] == {"port": grpc["containerPort"]}


def test_its_settings_are_valid_and_its_drain_fits_the_grace_period() -> None:
    env = {e["name"]: e["value"] for e in container()["env"]}
    values = {k.removeprefix("PERCEIVER_").lower(): v for k, v in env.items() if k.startswith("PERCEIVER_")}
    values["models"] = json.loads(values["models"])
    settings = Settings(port=container()["ports"][0]["containerPort"], **values)
    assert settings.device == "cuda" and {m.task for m in settings.models} >= {"classify", "fill-mask"}
    assert settings.drain_timeout_s < service()["spec"]["predictor"]["terminationGracePeriodSeconds"]
    # Docker-link variables off: a Service named perceiver would set PERCEIVER_PORT=tcp://..., refused as a port
    assert service()["spec"]["predictor"]["enableServiceLinks"] is False
    assert env["HF_HOME"] == "/mnt/models" and env["STORAGE_URI"].startswith("pvc://perceiver-models/")
