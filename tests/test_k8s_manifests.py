"""The Kubernetes manifests in deploy/k8s: loaded and checked against each other and against the
real ``stepd serve`` command line, without a cluster. The shard count, ports, volumes, token and
image are each written in several places that must agree; a drift between them deploys shards
that refuse their clients or lose their checkpoints, which only a cluster would show otherwise.
``kubectl kustomize`` renders both variants where kubectl is installed; the last test runs the
shards' start script and the worker Job's code against real local servers (e2e)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
TOKEN = "test-token-0123456789"


def load(rel: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / rel).read_text()) if d is not None]


def one(rel: str, kind: str) -> dict[str, Any]:
    docs = [d for d in load(rel) if d["kind"] == kind]
    assert len(docs) == 1, f"{rel}: expected one {kind}, found {len(docs)}"
    return docs[0]


def container(pod_spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec["containers"]
    if name is None:
        assert len(containers) == 1, "one container per pod"
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"
    return {e["name"]: e for e in c.get("env", [])}


def quantity(q: str | int) -> int:
    """Bytes of a Kubernetes memory quantity (the suffixes these manifests use)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([KMG]i?)?", str(q))
    assert m, f"unexpected quantity {q!r}"
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


STS = one("base/statefulset.yaml", "StatefulSet")
SVC = one("base/service.yaml", "Service")
JOB = one("worker-job.yaml", "Job")
SECRET = one("secret.example.yaml", "Secret")
POD = STS["spec"]["template"]["spec"]
SERVER = container(POD)
WORKER = container(JOB["spec"]["template"]["spec"])
REPLICAS = STS["spec"]["replicas"]


def container_port(c: dict[str, Any], port: int | str) -> int:
    """A numeric port, or a named one resolved against the container's ports."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return named[0]


def start_script() -> str:
    assert SERVER["command"] == ["/bin/sh", "-c"], SERVER["command"]
    (script,) = SERVER["args"]
    return script


def serve_argv(tmp_path: Path, ordinal: int) -> list[str]:
    """What the start script passes to `stepd` in pod stepd-<ordinal>: the script runs under a
    real shell with a stand-in `stepd` that prints its arguments."""
    fake = tmp_path / "bin" / "stepd"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    hostname = f"{STS['metadata']['name']}-{ordinal}"
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "HOSTNAME": hostname}
    proc = subprocess.run(
        ["/bin/sh", "-c", start_script()], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def server_settings(monkeypatch, argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """Run the real `stepd serve` entry point on argv with the container's environment, with
    uvicorn and the app factory replaced: the Settings the pod's server would run with."""
    import uvicorn
    from stepd.service import app, cli

    for name in list(os.environ):
        if name.startswith("STEPD_"):
            monkeypatch.delenv(name)
    for name, entry in env_of(SERVER).items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            monkeypatch.setenv(name, TOKEN)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        app, "create_app", lambda settings, device=None: seen.setdefault("settings", settings)
    )
    monkeypatch.setattr(uvicorn, "run", lambda _app, **kw: seen.setdefault("uvicorn", kw))
    assert argv[0] == "serve", argv
    assert cli.main(argv) == 0
    return seen["settings"], seen["uvicorn"]


def shard_urls() -> list[str]:
    value = env_of(WORKER)["STEPD_SHARD_URLS"]["value"]
    return [u.strip() for u in value.split(",")]


# ---------------------------------------------------------------------------------------------


def test_every_manifest_loads_and_kustomizations_name_existing_files() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 7, files
    for path in files:
        for doc in load(str(path.relative_to(K8S))):
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path
    for kust in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kust.read_text())
        for ref in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            assert (kust.parent / ref).exists(), f"{kust}: {ref}"
    # The placeholder token is never deployed by `kubectl apply -k`, nor the one-shot Job.
    top = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert top["resources"] == ["base"]
    assert sorted(base["resources"]) == ["service.yaml", "statefulset.yaml"]


def test_each_pod_serves_its_own_shard_of_replicas(tmp_path, monkeypatch, capsys) -> None:
    from stepd.service import cli

    assert REPLICAS >= 2  # a sharded example
    for ordinal in range(REPLICAS):
        settings, _ = server_settings(monkeypatch, serve_argv(tmp_path, ordinal))
        assert (settings.shard_index, settings.shard_count) == (ordinal, REPLICAS)
    # A pod beyond `replicas` is refused by the server's own check (same environment).
    capsys.readouterr()
    assert cli.main(serve_argv(tmp_path, REPLICAS)) == 2
    err = capsys.readouterr().err
    assert f"--shard-index {REPLICAS}: must be from 0 to {REPLICAS - 1}" in err


def test_server_listens_where_service_and_probes_point(tmp_path, monkeypatch) -> None:
    settings, run = server_settings(monkeypatch, serve_argv(tmp_path, 0))
    assert run["host"] == "0.0.0.0"  # reachable from other pods, not only loopback
    assert run["port"] == settings.port
    assert [p["containerPort"] for p in SERVER["ports"]] == [settings.port]

    # The headless Service selects these pods and forwards to that port.
    assert SVC["spec"]["clusterIP"] == "None"
    assert STS["spec"]["serviceName"] == SVC["metadata"]["name"]
    labels = STS["spec"]["template"]["metadata"]["labels"]
    assert SVC["spec"]["selector"].items() <= labels.items()
    assert STS["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (svc_port,) = SVC["spec"]["ports"]
    assert container_port(SERVER, svc_port["targetPort"]) == settings.port

    # Liveness and readiness on /healthz (the one path open without the token).
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = SERVER[kind]["httpGet"]
        assert probe["path"] == "/healthz", kind
        assert container_port(SERVER, probe["port"]) == settings.port, kind


def test_cli_flags_exist_in_serve_help(tmp_path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "stepd.service.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flags = {a for a in serve_argv(tmp_path, 0) if a.startswith("--")}
    assert {"--shard-index", "--shard-count", "--checkpoint-dir", "--port", "--host"} <= flags
    for flag in flags:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", help_text), flag
    # The script's own line, as written, names the same flags (nothing hidden in variables).
    line = next(ln for ln in start_script().splitlines() if "stepd serve" in ln)
    assert line.strip().startswith("exec ")  # the server is PID 1 and gets SIGTERM
    assert {a for a in shlex.split(line) if a.startswith("--")} == flags


def test_env_settings_exist_and_fit_the_limits(tmp_path, monkeypatch) -> None:
    from stepd.service.config import Settings

    for name in env_of(SERVER):
        if name.startswith("STEPD_"):  # Settings ignores unknown STEPD_* names silently
            assert name.removeprefix("STEPD_").lower() in Settings.model_fields, name
    settings, _ = server_settings(monkeypatch, serve_argv(tmp_path, 0))
    assert settings.device == "cpu"
    limits, requests = SERVER["resources"]["limits"], SERVER["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
    assert quantity(requests["memory"]) <= quantity(limits["memory"])
    # The default budget reads the node's memory: it must be set below the container's limit.
    assert settings.memory_budget is not None
    assert settings.memory_budget < quantity(limits["memory"])
    assert POD["enableServiceLinks"] is False  # no injected STEPD_PORT from a `stepd` Service


def test_checkpoints_go_to_the_per_shard_volume(tmp_path, monkeypatch) -> None:
    settings, _ = server_settings(monkeypatch, serve_argv(tmp_path, 0))
    claims = {t["metadata"]["name"]: t for t in STS["spec"]["volumeClaimTemplates"]}
    pod_volumes = {v["name"]: v for v in POD.get("volumes", [])}
    mounts = {m["name"]: m["mountPath"] for m in SERVER["volumeMounts"]}
    assert set(mounts) == set(claims) | set(pod_volumes)  # nothing mounted twice or dangling
    assert not set(claims) & set(pod_volumes)
    for claim in claims.values():
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert quantity(claim["spec"]["resources"]["requests"]["storage"]) > 0

    ckpt = PurePosixPath(settings.checkpoint_dir)
    assert ckpt.is_absolute()  # not relative to a working directory
    holders = [n for n, p in mounts.items() if ckpt.is_relative_to(p)]
    assert holders, f"{ckpt} is on no volume"
    deepest = max(holders, key=lambda n: len(PurePosixPath(mounts[n]).parts))
    assert deepest in claims, f"{ckpt} is on {deepest}, not on a volumeClaimTemplate"
    # The read-only root filesystem leaves /tmp writable through an emptyDir.
    assert "emptyDir" in pod_volumes[next(n for n, p in mounts.items() if p == "/tmp")]


@pytest.mark.parametrize("kind", ["StatefulSet", "Job"])
def test_pods_run_unprivileged(kind) -> None:
    pod = POD if kind == "StatefulSet" else JOB["spec"]["template"]["spec"]
    c = SERVER if kind == "StatefulSet" else WORKER
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid, "the Dockerfile's user"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid.group(1))
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert not sc.get("privileged", False)
    if kind == "StatefulSet":  # the checkpoint volume must be writable by that user
        assert pod["securityContext"]["fsGroup"] == int(uid.group(1))


@pytest.mark.parametrize("c", [SERVER, WORKER], ids=["shard", "worker"])
def test_token_comes_from_the_secret(c) -> None:
    entry = env_of(c)["STEPD_TOKEN"]
    assert "value" not in entry  # never written into a manifest
    ref = entry["valueFrom"]["secretKeyRef"]
    assert ref["name"] == SECRET["metadata"]["name"]
    assert ref["key"] in SECRET["stringData"]
    assert not ref.get("optional", False)  # no token, no pod: never an open server


def test_worker_job_addresses_every_shard_in_order() -> None:
    urls = shard_urls()
    assert len(urls) == REPLICAS  # one URL per shard: the client's shard count
    env = list(env_of(WORKER))
    # $(VAR) expands only variables defined earlier in the list.
    assert env.index("POD_NAMESPACE") < env.index("STEPD_SHARD_URLS")
    ns_ref = env_of(WORKER)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert ns_ref == "metadata.namespace"
    sts, svc = STS["metadata"]["name"], SVC["metadata"]["name"]
    for ordinal, url in enumerate(urls):  # shard i must be the i-th URL
        parts = urlsplit(url)
        assert parts.scheme == "http"
        host = f"{sts}-{ordinal}.{svc}.$(POD_NAMESPACE).svc.cluster.local"
        assert parts.netloc == f"{host}:{SVC['spec']['ports'][0]['port']}"
    code = WORKER["args"][0]
    assert WORKER["command"] == ["python", "-c"]
    compile(code, "worker-job.yaml", "exec")  # at least valid Python
    assert "connect(urls" in code


def test_worker_runs_the_shards_image() -> None:
    # The base names the image `stepd`; the top kustomization says which one it is.
    assert SERVER["image"].split(":")[0] == "stepd"
    (image,) = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert image["name"] == "stepd"
    assert WORKER["image"] == f"{image['newName']}:{image['newTag']}"


def merged_gpu_container() -> dict[str, Any]:
    """The GPU patch applied to the base container by hand, as a strategic merge does it:
    env entries by name ($patch: delete removes one), resources key by key."""
    kust = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert kust["resources"] == ["../base"]
    (patch_ref,) = kust["patches"]
    assert patch_ref["target"] == {"kind": "StatefulSet", "name": STS["metadata"]["name"]}
    patch = yaml.safe_load((K8S / "gpu" / patch_ref["path"]).read_text())
    assert patch["metadata"]["name"] == STS["metadata"]["name"]
    (pc,) = patch["spec"]["template"]["spec"]["containers"]
    assert pc["name"] == SERVER["name"]
    env = dict(env_of(SERVER))
    for entry in pc.get("env", []):
        if entry.get("$patch") == "delete":
            assert entry["name"] in env, entry
            del env[entry["name"]]
        else:
            env[entry["name"]] = entry
    resources = {k: {**SERVER["resources"].get(k, {}), **v} for k, v in pc["resources"].items()}
    return {**SERVER, "env": list(env.values()), "resources": resources}


def test_gpu_overlay() -> None:
    from stepd.service.config import Settings

    c = merged_gpu_container()
    env = env_of(c)
    assert env["STEPD_DEVICE"]["value"] == "cuda"
    Settings(device=env["STEPD_DEVICE"]["value"])  # a value the server takes
    assert "STEPD_MEMORY_BUDGET" not in env  # the GPU's own default (80% of its memory)
    assert env["CUPY_CACHE_DIR"]["value"].startswith("/tmp/")  # the one writable place
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    kust = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    (image,) = kust["images"]
    assert image["name"] == "stepd"
    assert image["newTag"] == "cuda"  # `docker build --target cuda -t stepd:cuda .`
    assert "AS cuda" in (ROOT / "Dockerfile").read_text()


def kustomize(path: Path) -> dict[str, dict[str, Any]]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_both_variants() -> None:
    cpu = kustomize(K8S)
    assert set(cpu) == {"Service", "StatefulSet"}
    cpu_c = container(cpu["StatefulSet"]["spec"]["template"]["spec"])
    assert cpu_c["image"] == WORKER["image"]
    assert cpu_c["args"] == SERVER["args"]

    gpu = kustomize(K8S / "gpu")
    gpu_pod = gpu["StatefulSet"]["spec"]["template"]["spec"]
    gpu_c = container(gpu_pod)
    assert gpu_c["image"] == "stepd:cuda"
    assert gpu_c["args"] == SERVER["args"]  # the same shards, only the device differs
    assert gpu["StatefulSet"]["spec"]["replicas"] == REPLICAS
    # kubectl's strategic merge agrees with the hand merge above.
    by_hand = merged_gpu_container()
    assert env_of(gpu_c) == env_of(by_hand)
    assert gpu_c["resources"] == by_hand["resources"]
    assert gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"


@pytest.mark.e2e  # starts server processes
def test_worker_job_trains_against_shards_started_by_the_script(tmp_path, monkeypatch) -> None:
    """The start script's command line (loopback and a free port instead of the pod's) for each
    shard, and the Job's own code against them, token and all."""
    import httpx

    from tests.support.server import free_port, wait_until

    procs, urls = [], []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("STEPD_")}
    base_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    literal = {n: e["value"] for n, e in env_of(SERVER).items() if "value" in e}
    try:
        for ordinal in range(REPLICAS):
            port = free_port()
            argv = serve_argv(tmp_path, ordinal)
            argv += ["--host", "127.0.0.1", "--port", str(port)]  # argparse: the last wins
            argv += ["--checkpoint-dir", str(tmp_path / f"ckpt-{ordinal}")]
            env = {**base_env, **literal, "STEPD_TOKEN": TOKEN}
            procs.append(
                subprocess.Popen([sys.executable, "-m", "stepd.service.cli", *argv], env=env)
            )
            urls.append(f"http://127.0.0.1:{port}")

        def healthy(url: str) -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200
            except httpx.HTTPError:
                return False

        assert all(wait_until(lambda u=u: healthy(u), timeout=30) for u in urls)
        env = {**base_env, "STEPD_SHARD_URLS": ",".join(urls), "STEPD_TOKEN": TOKEN}
        job = subprocess.run(
            [sys.executable, "-c", WORKER["args"][0]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert job.returncode == 0, job.stdout + job.stderr
        assert f"over {REPLICAS} shards" in job.stdout
        # Each shard holds exactly the parameters the client sent it (and refused none).
        placed = re.findall(r"^(\S+) -> shard (\d+): ", job.stdout, re.MULTILINE)
        assert {int(i) for _, i in placed} == set(range(REPLICAS)), placed  # all shards used
        for index, url in enumerate(urls):
            params = httpx.get(
                f"{url}/v1/runs/k8s-example/params",
                headers={"authorization": f"Bearer {TOKEN}"},
            ).json()
            assert sorted(p["name"] for p in params) == sorted(
                name for name, i in placed if int(i) == index
            ), url
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=40)
