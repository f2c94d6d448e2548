"""The cluster recipes in deploy/cluster/ (Dockerfile, KubeRay, SLURM, cluster launcher) are usable as shipped.

- Every file parses (YAML, ``bash -n``); the launcher YAML passes Ray's own config preparation and schema.
- Every ``raycxr ...`` command written in them composes against raycxr's config schema.
- The SLURM script's own ``ray start`` lines, run here as a head and two workers on local ports, make a
  cluster whose nodes carry the labels of the site map; ``ray job submit --working-dir`` then runs a
  raycxr command on it through the dashboard (the way a job reaches any cluster from a laptop).
"""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raycxr.cli import COMMANDS
from raycxr.config import compose

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "deploy" / "cluster"
FILES = ["Dockerfile", "kuberay.yaml", "raycxr.slurm", "onprem.yaml"]
# the config each command composes (cmd_cluster and cmd_pretrain compose "pretrain")
CONFIG_OF = {"pretrain": "pretrain", "cluster": "pretrain", "sites": "sites", "federate": "federate",
             "eval": "eval", "export": "export", "tune": "tune", "study": "study", "synth": "synth"}


def _pinned_ray() -> str:
    return re.search(r"ARG RAY_VERSION=(\S+)", (RECIPES / "Dockerfile").read_text()).group(1)


def raycxr_commands(text: str) -> list[list[str]]:
    """Every ``raycxr <command> ...`` in a recipe (shell lines, YAML values, comments; not one quoted in prose
    with backticks) as argv, shell variables replaced by their ``${VAR:-default}`` from the file or a
    placeholder path."""
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}$", text, flags=re.M))
    text = text.replace("\\\n", " ")
    found = []
    for m in re.finditer(r"(?<!`)\braycxr (" + "|".join(COMMANDS) + r")\b([^\n'&;|>]*)", text):
        line = m.group(0)
        for _ in range(3):  # defaults may refer to other variables
            line = re.sub(r"\$\{?(\w+)\}?", lambda v: defaults.get(v.group(1), f"/placeholder/{v.group(1)}"), line)
        found.append(shlex.split(line)[1:])
    return found


def test_dockerfile_builds_raycxr_with_its_decoders_and_one_ray_version():
    from packaging.requirements import Requirement

    text = (RECIPES / "Dockerfile").read_text()
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim$", text, flags=re.M)
    assert re.search(r'pip install -e "/opt/raycxr" "ray\[default,train,tune\]==\$\{RAY_VERSION\}"', text)
    import tomllib

    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    ray_req = next(d for d in deps if d.name == "ray")
    assert ray_req.specifier.contains(_pinned_ray()) and {"default", "train", "tune"} <= ray_req.extras
    # every DICOM decoder raycxr depends on is imported by the build's check, so a missing one fails the build
    modules = {"pylibjpeg": "pylibjpeg", "pylibjpeg-openjpeg": "openjpeg", "pylibjpeg-rle": "rle",
               "python-gdcm": "gdcm", "pydicom": "pydicom"}
    check = re.search(r'python -c "(import [^;]+);', text).group(1)
    for dep in deps:
        if dep.name in modules:
            assert modules[dep.name] in check.replace(",", " ").split(), dep.name
    assert "wget" in text  # KubeRay's health probes call wget inside the container


def test_kuberay_cluster_and_jobs():
    from ray._private.label_utils import validate_node_label_syntax

    docs = list(yaml.safe_load_all((RECIPES / "kuberay.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 2 and "PersistentVolumeClaim" in kinds
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == _pinned_ray()
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for g in groups:
        # KubeRay >= 1.5 rejects rayStartParams['labels']: the group's top-level `labels` is the way
        assert "labels" not in g["rayStartParams"]
        validate_node_label_syntax(g.get("labels") or {})
        pod = g["template"]["spec"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims["shared"] == pvc["metadata"]["name"] and mounts["shared"] == "/shared"
    workers = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert "labels" not in workers["gpu"] and "nvidia.com/gpu" in workers["gpu"]["template"]["spec"][
        "containers"][0]["resources"]["limits"]
    sites = {g["labels"]["site"]: g for g in workers.values() if g.get("labels")}
    assert sorted(sites) == ["nih", "vindr"]
    for site, g in sites.items():  # the site's images are mounted where sites.data_root=/data + root <site> puts them
        mounts = {m["name"]: m["mountPath"] for m in g["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["data"] == f"/data/{site}"
    for job in (d for d in docs if d["kind"] == "RayJob"):
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert "sites.data_root=/data" in job["spec"]["entrypoint"]


def test_cluster_launcher_yaml_passes_rays_own_preparation():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((RECIPES / "onprem.yaml").read_text())
    assert raw["provider"]["type"] == "local"
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does first
    validate_config(prepared)
    assert prepared["max_workers"] == len(raw["provider"]["worker_ips"])
    starts = (raw["head_start_ray_commands"][-1], raw["worker_start_ray_commands"][-1])
    assert all("--labels=" in c and "node-labels.sh" in c for c in starts)
    assert f"ray[default,train,tune]=={_pinned_ray()}" in raw["setup_commands"][0]


def test_slurm_script_is_valid_bash_and_node_labels_come_from_the_site_map(tmp_path):
    subprocess.run(["bash", "-n", str(RECIPES / "raycxr.slurm")], check=True)
    script = RECIPES / "node-labels.sh"

    def labels(*args):
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, check=True).stdout.strip()

    assert labels(str(RECIPES / "sites.map"), "hosp-nih-01") == "site=nih"
    assert labels(str(RECIPES / "sites.map"), "gpu01") == ""  # not listed: a GPU node without labels
    own = tmp_path / "own.map"
    own.write_text(f"# this machine\n{socket.gethostname().split('.')[0]}  site=siim,zone=a\n")
    assert labels(str(own)) == "site=siim,zone=a"  # no NODE: matched on this machine's own names
    bad = subprocess.run(["bash", str(script), str(tmp_path / "missing.map")], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.map is not readable" in bad.stderr


@pytest.mark.parametrize("name", [f for f in FILES if f != "Dockerfile"])
def test_every_raycxr_command_in_the_recipes_composes(name):
    commands = raycxr_commands((RECIPES / name).read_text())
    assert {c[0] for c in commands} >= {"pretrain", "cluster"}, commands  # each recipe checks, then trains
    for argv in commands:
        names = [a for a in argv[1:] if "=" not in a]
        overrides = [a for a in argv[1:] if "=" in a]
        assert names == (["check"] if argv[0] == "cluster" else []), argv
        cfg = compose(CONFIG_OF[argv[0]], overrides)  # raises ValueError naming the key on a bad override
        if argv[0] == "pretrain":
            assert cfg.runner == "ray" and cfg.ray.storage_path.startswith(("/shared", "/placeholder"))


def test_a_bad_override_in_a_recipe_would_be_caught():
    argv = raycxr_commands("raycxr pretrain runner=ray ray.num_workerz=2\n")[0]
    with pytest.raises(ValueError, match="num_workerz"):
        compose("pretrain", argv[1:])


# ------------------------------------------------------------------------------ the SLURM lines, run here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start_lines() -> tuple[str, str, str]:
    """The SLURM script's authentication set-up, and its head's and workers' ``ray start`` commands, as written."""
    text = (RECIPES / "raycxr.slurm").read_text().replace("\\\n", " ")
    auth = text[text.index("# >>> ray auth"):text.index("# <<< ray auth")]
    starts = [line.strip().rstrip("&").strip() for line in text.splitlines() if "ray start" in line
              and not line.lstrip().startswith("#")]
    starts = [s[s.index("ray start"):] for s in starts]
    head = next(s for s in starts if "--head" in s)
    worker = next(s for s in starts if "--head" not in s)
    return auth, head, worker


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A head and two workers started with the SLURM script's own ``ray start`` lines (its variables set as
    the script sets them, the site map naming two fake hosts). Only the ports differ: three nodes share this
    machine, so each gets its own agent port where a real node would use the default."""
    tmp = tmp_path_factory.mktemp("slurm")
    temp_dir = f"/tmp/rcx{os.getpid()}"  # short: Ray's socket paths must fit in 107 characters
    site_map = tmp / "sites.map"
    site_map.write_text("# test map\nnode-a site=nih\nnode-b site=vindr,zone=b\n")
    port, dash = _free_port(), _free_port()
    # the head's address as the script finds it (`hostname -I`): workers rewrite a loopback GCS address to the
    # node's own IP, so a head on 127.0.0.1 would be unreachable for them
    head_ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]
    # the script's own token set-up makes the token, in the test's folder (not in the user's home); the
    # script exports RAY_AUTH_MODE=token for everything after it, so the clients here get it too
    # a real `ray start --address` refuses to join with the one-machine simulation's variable set (tests/ray_cluster.py)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
           "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token"), "RAY_AUTH_MODE": "token",
           "HERE": str(RECIPES), "SITE_MAP": str(site_map), "RAY_PORT": str(port), "CPUS": "1",
           "DASHBOARD_HOST": "127.0.0.1", "DASHBOARD_PORT": str(dash), "head_ip": head_ip,
           "address": f"{head_ip}:{port}",
           # a raylet waits 15 s for its dashboard agent's ports; on a loaded 2-core machine the agent's start
           # (a Python process) takes longer and the raylet aborts. A real node has the default.
           "RAY_agent_register_timeout_ms": "120000"}
    auth, head_line, worker_line = _ray_start_lines()
    procs = []

    def start(line: str, **extra: str) -> None:
        local = f"--temp-dir={temp_dir} --dashboard-agent-listen-port={_free_port()}"
        if "--head" in line:
            local += f" --ray-client-server-port={_free_port()}"
        script = auth + "".join(f"{k}={shlex.quote(v)}\n" for k, v in extra.items()) + f"exec {line} {local}\n"
        procs.append(subprocess.Popen(["bash", "-c", script], env=env, start_new_session=True,
                                      stdout=open(tmp / f"node{len(procs)}.log", "w"), stderr=subprocess.STDOUT))

    start(head_line, head_node="gpu-node")
    try:
        # one node at a time: a raylet must register within Ray's fixed 30 s, which a loaded 2-core machine
        # misses when three start together; a worker that gave up is started once more
        _nodes(env["address"], env, tmp, want=1)
        for want, host in ((2, "node-a"), (3, "node-b")):
            for _attempt in range(2):
                start(worker_line, node=host)
                try:
                    _nodes(env["address"], env, tmp, want=want, stop_if_exited=procs[-1])
                    break
                except AssertionError:
                    if procs[-1].poll() is None:
                        raise
        yield {"address": env["address"], "dashboard": f"http://127.0.0.1:{dash}", "log_dir": tmp,
               "env": env}
    finally:
        for p in procs:  # the `ray start --block` processes we started, then what they left running
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        time.sleep(2)
        for pid in _pids_mentioning(temp_dir):  # raylet, GCS, agents, workers of this cluster only
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", temp_dir])


def _nodes(address: str, env: dict, log_dir: Path, want: int, timeout: float = 180,
           stop_if_exited: subprocess.Popen | None = None) -> list[dict]:
    """The cluster's alive nodes, seen from a separate driver process (this one stays unconnected)."""
    code = ("import json, ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print('NODES=' + json.dumps([n for n in ray.nodes() if n['Alive']]))")
    deadline = time.time() + timeout
    nodes = []
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120,
                             env=env)
        if out.returncode == 0:
            import json

            nodes = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("NODES="))[6:])
            if len(nodes) >= want:
                return nodes
        if stop_if_exited is not None and stop_if_exited.poll() is not None:
            break
        time.sleep(3)
    logs = "".join(f"\n--- {f.name}:\n" + f.read_text()[-1500:] for f in sorted(log_dir.glob("node*.log")))
    raise AssertionError(f"{len(nodes)} of {want} nodes came up; the nodes' logs:{logs}")


@pytest.mark.ray
def test_slurm_ray_start_lines_make_a_cluster_with_the_site_maps_labels(slurm_cluster):
    nodes = _nodes(slurm_cluster["address"], slurm_cluster["env"], slurm_cluster["log_dir"], want=3)
    labels = sorted(tuple(sorted((k, v) for k, v in n["Labels"].items() if not k.startswith("ray.io/")))
                    for n in nodes)
    assert labels == [(), (("site", "nih"),), (("site", "vindr"), ("zone", "b"))]
    assert all(n["Resources"].get("CPU") == 1.0 for n in nodes)  # --num-cpus="$CPUS"


@pytest.mark.ray
def test_ray_job_submit_with_working_dir_runs_raycxr_on_the_cluster(slurm_cluster, tmp_path):
    """``ray job submit --working-dir`` from the install, through the dashboard of the SLURM-started head.
    The job is ``raycxr sites list`` on site files shipped in the working dir. The smallest ``raycxr pretrain``
    (one site of 8 images, 32 px, one step, runner=local) took 47 s alone on this shared 2-core machine,
    mostly imports; as a job beside three raylets it would be over a minute, so this job exercises the
    submission path (upload, entrypoint, raycxr on the cluster, logs, exit status) in seconds instead."""
    work = tmp_path / "job"
    (work / "sites").mkdir(parents=True)
    (work / "sites" / "nih.yaml").write_text(yaml.safe_dump({"name": "nih", "adapter": "manifest", "root": "nih",
                                                             "placement": {"label_selector": {"site": "nih"}}}))
    _nodes(slurm_cluster["address"], slurm_cluster["env"], slurm_cluster["log_dir"], want=3)
    out = subprocess.run(["ray", "job", "submit", "--address", slurm_cluster["dashboard"], "--working-dir", str(work),
                          "--", "raycxr", "sites", "list", "sites_dir=sites", "data_root=data"],
                         capture_output=True, text=True, timeout=300, env=slurm_cluster["env"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "sites registered in sites" in out.stdout and "nih" in out.stdout and "succeeded" in out.stdout
