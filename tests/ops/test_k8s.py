"""Kubernetes manifests under infra/k8s, validated offline: every object against the Kubernetes
1.30 OpenAPI schemas in strict mode (kubernetes-validate, unknown fields refused), then the
properties that matter here (probes, resources, non-root, wiring between objects, no secrets).

No cluster runs on these machines: nothing here was applied to one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
KUBE_VERSION = "1.30"
NAMESPACE = "ballast"
# Gateway API objects are CRDs, outside the core schemas: checked by hand below.
CRD_GROUPS = ("gateway.networking.k8s.io/",)


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "prefect.yaml":
            continue  # Prefect's deployment file, not a Kubernetes manifest
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def find(kind: str, name: str) -> dict[str, Any]:
    hits = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def base_job_template() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((K8S / "work-pool-base-job-template.json").read_text())
    return data


@pytest.mark.parametrize(
    ("source", "doc"),
    [m for m in manifests() if not m[1]["apiVersion"].startswith(CRD_GROUPS)],
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_manifest_matches_the_kubernetes_schema(source: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_validator_refuses_an_unknown_field() -> None:
    # Guards the guard: strict mode really rejects what a typo would produce.
    bad = json.loads(json.dumps(find("Deployment", "ballast-gateway")))
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["runAsNonroot"] = True  # misspelt: would silently do nothing
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonroot"):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_everything_lives_in_the_ballast_namespace_and_no_secret_is_committed() -> None:
    for source, doc in manifests():
        assert doc["kind"] != "Secret", f"{source}: Secrets are created by the operator"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{source}: {doc['kind']}"
    text = " ".join(p.read_text() for p in K8S.iterdir() if p.is_file())
    for needle in ("BEGIN PRIVATE KEY", "AKIA", "password=", "PREFECT_API_KEY: "):
        assert needle not in text


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return containers


def test_every_deployment_runs_non_root_with_resources_and_probes() -> None:
    deployments = [d for _, d in manifests() if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {
        "ballast-gateway",
        "ballast-mlflow",
        "prefect-worker",
    }
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        name = d["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert d["spec"]["selector"]["matchLabels"].items() <= (
            d["spec"]["template"]["metadata"]["labels"].items()
        ), f"{name}: selector does not match its pods"
        for c in _containers(d):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), name
            assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), name
            assert "livenessProbe" in c, name
            for env in c.get("env", []):
                secretish = any(w in env["name"] for w in ("TOKEN", "KEY", "PASSWORD", "SECRET"))
                if secretish and not env["name"].endswith("_PATH"):  # a path names no secret
                    assert "valueFrom" in env, f"{name}: {env['name']} must come from a Secret"


def test_gateway_probes_ports_service_autoscaler_and_budget_fit_together() -> None:
    dep = find("Deployment", "ballast-gateway")
    (gw,) = _containers(dep)
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    # Serving (not "the desired deployment loaded"): else each canary load empties the Service.
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz/serving"
    # Longer than the first sync may take (then the gateway starts unready and keeps going).
    startup = gw["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > 60 + 10
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert gw[probe]["httpGet"]["port"] in ports, probe
    assert f"--port={ports['http']}" in gw["args"]
    assert "--host=0.0.0.0" in gw["args"]
    # Several replicas agree on what to serve only through the registry.
    assert "--desired-state=registry" in gw["args"]
    # Each pod names itself (in a container every gateway is pid 1): the watchdog compares a
    # replica's counters only with its own.
    assert "--replica-id=$(POD_NAME)" in gw["args"]
    pod_name = next(e for e in gw["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The pod waits longer than the gateway drains.
    drain = next(float(a.split("=")[1]) for a in gw["args"] if a.startswith("--graceful-timeout"))
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    labels = dep["spec"]["template"]["metadata"]["labels"]

    svc = find("Service", "ballast-gateway")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports

    hpa = find("HorizontalPodAutoscaler", "ballast-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ballast-gateway",
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = find("PodDisruptionBudget", "ballast-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_the_worker_may_run_jobs_and_polls_the_pool_the_cluster_deployments_use() -> None:
    dep = find("Deployment", "prefect-worker")
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    binding = find("RoleBinding", "prefect-worker")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    role = find("Role", binding["roleRef"]["name"])
    jobs = next(r for r in role["rules"] if "jobs" in r["resources"])
    assert {"create", "get", "watch", "delete"} <= set(jobs["verbs"])
    (worker,) = _containers(dep)
    assert "--type=kubernetes" in worker["args"]
    pool = next(a.split("=", 1)[1] for a in worker["args"] if a.startswith("--pool="))
    deployments = yaml.safe_load((K8S / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {pool}


def test_base_job_template_passes_prefects_check_and_renders_a_valid_job() -> None:
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = base_job_template()
    validate_base_job_template(template)  # raises on a placeholder without a variable
    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    # What the worker fills in per flow run (it turns env into a list and splits the command).
    values["name"] = "release-abc123"
    values["command"] = ["prefect", "flow-run", "execute"]
    values["env_by_name"] = dict(values["env"])
    values["env"] = [{"name": k, "value": v} for k, v in values["env"].items()]
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    assert isinstance(job, dict)
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ballast-flow-run"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == props["image"]["default"]
    assert container["resources"]["limits"]["memory"] == "4Gi"
    # The account flow runs use exists and has no API rights.
    sa = find("ServiceAccount", "ballast-flow-run")
    assert sa["automountServiceAccountToken"] is False
    # Their state folder (audit log, watchdog detector state) outlives each Job: a claim that
    # exists and that several Jobs may mount at once.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = volumes[mounts[values["env_by_name"]["BALLAST_STATE_DIR"]]]
    claim = find("PersistentVolumeClaim", state["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    # The admin token reaches every flow run from a Secret that must exist (before: optional and
    # documented nowhere, so a run made a random token of its own and met 401 at the canary,
    # after training, compiling and registering); gateway.yaml says how to create it.
    (release,) = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
    assert release == {"name": "ballast-release", "optional": False}
    header = (K8S / "gateway.yaml").read_text()
    assert "secret generic ballast-release" in header
    assert "BALLAST_GATEWAY_ADMIN_TOKEN=$TOKEN" in header and "admin-token=$TOKEN" in header


def test_no_secret_reaches_a_command_line() -> None:
    # Before: mlflow ran through `sh -c` to expand the store URI (with its password) into
    # --backend-store-uri, readable in /proc/PID/cmdline. mlflow reads it from the environment.
    for _, doc in manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            line = " ".join([*container.get("command", []), *container.get("args", [])])
            secret_vars = [
                e["name"]
                for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
            assert not any(f"${name}" in line or f"$({name})" in line for name in secret_vars), line
            assert "sh -c" not in line and container.get("command", [""])[0] != "/bin/sh", line
    (mlflow,) = find("Deployment", "ballast-mlflow")["spec"]["template"]["spec"]["containers"]
    env = {e["name"] for e in mlflow["env"]}
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"} <= env
    assert not any("store-uri" in a or "artifacts-destination" in a for a in mlflow["args"])


def test_gateway_pods_verify_with_the_public_key_and_flow_runs_sign_with_a_private_copy() -> None:
    # Gateway pods only verify: they get the public half (a ConfigMap), never the private key.
    dep = find("Deployment", "ballast-gateway")
    (gw,) = _containers(dep)
    assert {"configMapRef": {"name": "ballast-config"}} in gw["envFrom"]
    env = {e["name"]: e.get("value") for e in gw["env"]}
    key = Path(env["BALLAST_SIGNING_KEY_PATH"])  # overrides ballast-config's private path
    mount = next(m for m in gw["volumeMounts"] if key.parent == Path(m["mountPath"]))
    assert mount["readOnly"] is True
    pod_volumes = dep["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in pod_volumes if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "ballast-signing-public"
    assert [i["path"] for i in volume["configMap"]["items"]] == [key.name]
    assert not any("secret" in v and "signing" in v["secret"]["secretName"] for v in pod_volumes)

    # Flow runs sign: the Secret is copied into a private folder 0600 first (the signer refuses
    # a key group can read, and with fsGroup set the kubelet makes Secret files 0440).
    spec = base_job_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    job_env = base_job_template()["variables"]["properties"]["env"]["default"]
    signing = Path(job_env["BALLAST_SIGNING_KEY_PATH"])
    assert signing == Path(find("ConfigMap", "ballast-config")["data"]["BALLAST_SIGNING_KEY_PATH"])
    (init,) = spec["initContainers"]
    script = init["command"][-1]
    assert "install -m 600" in script and str(signing) in script
    volumes = {v["name"]: v for v in spec["volumes"]}
    copied = next(m for m in init["volumeMounts"] if Path(m["mountPath"]) == signing.parent)
    assert "emptyDir" in volumes[copied["name"]]
    (main,) = spec["containers"]
    assert any(
        m["name"] == copied["name"] and Path(m["mountPath"]) == signing.parent
        for m in main["volumeMounts"]
    )
    source = next(m for m in init["volumeMounts"] if m["name"] != copied["name"])
    assert volumes[source["name"]]["secret"]["secretName"] == "ballast-signing-key"
    assert source["mountPath"] in script


def test_a_release_that_waits_as_long_as_its_settings_allow_is_not_killed_by_its_job() -> None:
    from ballast.settings import Settings

    s = Settings()
    longest_waits = s.approval_timeout_s + s.canary_turn_timeout_s + s.train_timeout_s
    deadline = base_job_template()["variables"]["properties"]["active_deadline_seconds"]
    assert deadline["default"] > longest_waits + 1800  # and half an hour for the canary


def test_the_watchdog_reaches_every_gateway_pod_at_its_own_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ballast.settings import get_settings

    dep = find("Deployment", "ballast-gateway")
    (gw,) = _containers(dep)
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    data = find("ConfigMap", "ballast-config")["data"]
    pods = find("Service", data["BALLAST_GATEWAY_PODS_HOST"])
    # Headless: DNS gives each ready pod's address; a ClusterIP would give one, one pod a run.
    assert pods["spec"]["clusterIP"] == "None"
    assert pods["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # Nothing forwards a headless Service's port: the watchdog must use the pods' own.
    assert int(data["BALLAST_GATEWAY_PODS_PORT"]) == ports["http"]
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert (s.gateway_pods_host, s.gateway_pods_port) == ("ballast-gateway-pods", 8765)
    finally:
        get_settings.cache_clear()


def test_the_cluster_is_not_dev_so_a_person_approves_every_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ballast.errors import ConfigError
    from ballast.settings import get_settings

    data = find("ConfigMap", "ballast-config")["data"]
    assert data["BALLAST_ENVIRONMENT"] == "prod"
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert get_settings().approval_policy == "manual"
        # No cluster deployment asks for auto: the run would be refused at its start.
        cluster = yaml.safe_load((K8S / "prefect.yaml").read_text())["deployments"]
        assert all(d.get("parameters", {}).get("approval_policy") != "auto" for d in cluster)
        monkeypatch.setenv("BALLAST_APPROVAL_POLICY", "auto")
        get_settings.cache_clear()
        with pytest.raises(ConfigError, match="dev only"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_cluster_deployments_mirror_the_local_ones() -> None:
    local = yaml.safe_load((K8S.parents[1] / "prefect.yaml").read_text())["deployments"]
    cluster = yaml.safe_load((K8S / "prefect.yaml").read_text())["deployments"]

    def shape(ds: list[dict[str, Any]]) -> dict[str, tuple[str, str, object]]:
        return {
            d["name"]: (d["entrypoint"], d["work_pool"]["work_queue_name"], d.get("schedules"))
            for d in ds
        }

    assert shape(cluster) == shape(local)


def test_the_gateway_api_route_splits_by_weight_to_existing_services() -> None:
    route = find("HTTPRoute", "ballast-gateway")
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert sum(r["weight"] for r in refs) == 100
    assert refs[0]["name"] == find("Service", "ballast-gateway")["metadata"]["name"]


def test_the_training_job_runs_the_torchrun_command_the_launcher_builds_on_a_shared_volume() -> (
    None
):
    from ballast.distributed import SPEC_FILE, Topology, run_dir_for, torchrun_argv

    job = find("Job", "ballast-train")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    # One pod per node, all at once; a failed rank fails the job, and a hung one is bounded.
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 1
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600
    assert pod["securityContext"]["runAsNonRoot"] is True
    (rank,) = pod["containers"]
    assert rank["securityContext"]["readOnlyRootFilesystem"] is True
    assert rank["resources"]["limits"]["nvidia.com/gpu"] == "1"

    # Pod 0 hosts the rendezvous under the headless Service's per-pod DNS name.
    svc = find("Service", "ballast-train")
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    endpoint = (
        f"{job['metadata']['name']}-0.{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    )
    port = svc["spec"]["ports"][0]["port"]
    assert {p["containerPort"] for p in rank["ports"]} == {port}

    # The command is exactly what ballast.distributed builds for the flow's own node; the
    # nodes are this Job's pods plus the flow-run pod, and the spec lies where the flow writes it.
    env = {e["name"]: e["value"] for e in rank["env"]}
    rdzv_id = "$(BALLAST_TRAIN_RDZV_ID)"
    state = Path(env["BALLAST_STATE_DIR"])
    spec_path = run_dir_for(state / "ddp", rdzv_id) / SPEC_FILE
    topology = Topology(
        nproc_per_node=1,
        nnodes=spec["completions"] + 1,
        rdzv_endpoint=f"{endpoint}:{port}",
        rdzv_id="release-0001",  # validated form; the manifest substitutes the env value
    )
    expected = torchrun_argv(topology, [f"--spec={spec_path}"], python="python")
    expected = [a.replace("release-0001", rdzv_id) for a in expected]
    assert [*rank["command"], *rank["args"]] == expected
    assert env["BALLAST_TRAIN_RDZV_ID"] and "$(" not in env["BALLAST_TRAIN_RDZV_ID"]

    # Every node mounts the same ReadWriteMany claim where BALLAST_STATE_DIR points.
    mounts = {m["name"]: m["mountPath"] for m in rank["volumeMounts"]}
    claim_of = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    (volume,) = claim_of
    assert mounts[volume] == str(state)
    pvc = find("PersistentVolumeClaim", claim_of[volume])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # ... and it is the flow runs' own claim, where the release's pod writes the job (it was
    # another claim, so the ranks never found the job file).
    job_spec = base_job_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    flow_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in job_spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert flow_claims == {claim_of[volume]}


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for _, d in manifests()
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")
    ]
    job = base_job_template()["job_configuration"]["job_manifest"]
    specs.append(("base job template", job["spec"]["template"]["spec"]))
    return specs


def _service_link_variables() -> dict[str, str]:
    """What Kubernetes would put in every pod's environment for this namespace's Services."""
    env: dict[str, str] = {}
    for _, doc in manifests():
        if doc["kind"] != "Service":
            continue
        name = doc["metadata"]["name"].upper().replace("-", "_")
        for port in doc["spec"].get("ports", []):
            n, proto = port["port"], port.get("protocol", "TCP")
            env[f"{name}_SERVICE_HOST"] = "10.0.0.1"
            env[f"{name}_SERVICE_PORT"] = str(n)
            if "name" in port:
                env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(n)
            env[f"{name}_PORT"] = f"{proto.lower()}://10.0.0.1:{n}"
            for suffix, value in (("", ""), ("_PROTO", proto.lower()), ("_PORT", str(n))):
                env[f"{name}_PORT_{n}_{proto}{suffix}"] = value or f"tcp://10.0.0.1:{n}"
            env[f"{name}_PORT_{n}_{proto}_ADDR"] = "10.0.0.1"
    return env


def test_no_pod_gets_service_variables_and_settings_would_tolerate_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Services named ballast-* would give every pod BALLAST_GATEWAY_PORT=tcp://... (clashing
    # with the setting) and BALLAST_MLFLOW_SERVICE_HOST and the like (unknown to the settings).
    for where, spec in _pod_specs():
        assert spec.get("enableServiceLinks") is False, where
    from ballast.settings import Settings, get_settings

    links = _service_link_variables()
    assert "BALLAST_MLFLOW_SERVICE_HOST" in links  # the check below checks something
    settings = {f"BALLAST_{f.upper()}" for f in Settings.model_fields}
    for name, value in links.items():
        if name not in settings:  # a setting's own name is kept out by enableServiceLinks
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert get_settings().model_name
    finally:
        get_settings.cache_clear()
