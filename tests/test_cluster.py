"""The cluster side: cluster.yaml against Ray's own schema, jobs on a real token-protected head
submitted with `ray job submit`, and tasks spread over several raylets on this machine."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from cluster_utils import (  # noqa: F401  (multinode_cluster is a fixture, used by name)
    RAY_CLI,
    REPO_ROOT,
    VENV_BIN,
    multinode_cluster,
    start_head,
    submit_job,
)

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler  # only to find the schema file inside the wheel; starts nothing

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _all_setup_commands(config: dict) -> list[str]:
    commands = [*config.get("setup_commands", []), *config.get("head_setup_commands", []),
                *config.get("worker_setup_commands", [])]
    for node_type in config["available_node_types"].values():
        commands += node_type.get("worker_setup_commands", [])
    return commands


# --- cluster.yaml (fast: no Ray started) ---------------------------------------------------


def test_cluster_yaml_validates_against_the_schema_in_the_ray_wheel(cluster_config):
    import jsonschema

    jsonschema.validate(cluster_config, _ray_schema())


def test_cluster_yaml_passes_rays_own_config_checks(cluster_config):
    # What `ray up` runs before touching AWS: defaults filled in, schema, node-type rules.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster_config))


def test_head_node_type_names_a_declared_node_type(cluster_config):
    node_types = cluster_config["available_node_types"]
    assert cluster_config["head_node_type"] in node_types
    assert cluster_config["provider"]["type"] == "aws"


def test_gpu_worker_type_has_gpus_and_can_autoscale(cluster_config):
    head_type = cluster_config["head_node_type"]
    gpu_types = {name: t for name, t in cluster_config["available_node_types"].items()
                 if name != head_type and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type advertises a GPU"
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0 < node_type["max_workers"]  # scales from zero
        assert re.match(r"(g4dn|g5|g6|g6e|p4d|p5)\.", node_type["node_config"]["InstanceType"])
    cpu_workers = [t for name, t in cluster_config["available_node_types"].items()
                   if name != head_type and "GPU" not in t["resources"]]
    assert cpu_workers and all(t["resources"]["CPU"] >= 4 for t in cpu_workers), "no CPU decode workers"


def test_setup_installs_this_project_with_pinned_torch_and_ray(cluster_config):
    import ray

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["name"]
    commands = _all_setup_commands(cluster_config)
    installs = [c for c in commands if "pip install" in c]
    assert any(f"{project} @ git+" in c or f"{project}==" in c for c in installs), installs
    assert any(f"ray[data,train,default]=={ray.__version__}" in c for c in installs), "ray not pinned to client's"
    torch_installs = [c for c in installs if "torch==" in c]
    assert torch_installs and all("torch==2.13.0" in c for c in torch_installs)
    assert any("download.pytorch.org/whl/cpu" in c for c in torch_installs), "CPU nodes would get CUDA torch"
    # torch goes in before the project, so the project's own torch pin is already satisfied.
    first_torch = next(i for i, c in enumerate(commands) if "torch==" in c)
    first_project = next(i for i, c in enumerate(commands) if project in c and "pip install" in c)
    assert first_torch < first_project


def test_every_node_gets_the_token_and_starts_ray_with_token_auth(cluster_config):
    # The nodes read the default token path; the local side is a token file of the cluster's own.
    assert cluster_config["file_mounts"]["~/.ray/auth_token"].startswith("~/.ray/")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster_config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key


def test_every_node_type_has_an_instance_profile_for_s3(cluster_config):
    for name, node_type in cluster_config["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


@pytest.mark.parametrize("honour_gitignore", [True, False], ids=["gitignore", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1"])
def test_working_dir_upload_leaves_out_venv_data_and_outputs(tmp_path, honour_gitignore):
    # Builds the package exactly as `ray job submit --working-dir` does (same function, same
    # default excludes), on a copy of the repo's ignore files with decoys beside real code.
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    work = tmp_path / "work"
    for relative in ["pipeline/__init__.py", "jobs/train.py", ".venv/lib/torch.so", "venv/bin/python",
                     "data/shard-00000.parquet", "demo-output/report/index.html", "runs/r1/model.safetensors",
                     "squeeze_pipeline.egg-info/PKG-INFO", "sample.parquet", ".git/objects/ab"]:
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        (work / relative).write_bytes(b"x" * 100)
    for ignore_file in (".gitignore", ".rayignore"):
        (work / ignore_file).write_text((REPO_ROOT / ignore_file).read_text())

    package = tmp_path / "package.zip"
    create_package(str(work), package, include_gitignore=honour_gitignore,
                   excludes=get_runtime_env_default_excludes())
    files = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}
    assert files == {"pipeline/__init__.py", "jobs/train.py", ".gitignore", ".rayignore"}


# --- a real head with token authentication (slow) -------------------------------------------

# Runs on the head, in the uploaded working dir, with the head's `python`.
JOB_SCRIPT = """
import json, os, sys
import pipeline, pipeline.model as m
print("PARAMS=%d" % m.count_parameters(m.build_model(m.AutoencoderConfig())))
print("PIPELINE_FROM=" + os.path.dirname(os.path.abspath(pipeline.__file__)))
print("PYTHON=" + sys.executable)
files = [os.path.join(d, f) for d, _, names in os.walk(".") for f in names]
print("UPLOAD_BYTES=%d" % sum(os.path.getsize(f) for f in files))
print("TOP_LEVEL=" + json.dumps(sorted(os.listdir("."))))
"""


def _log_value(logs: str, key: str) -> str:
    match = re.search(rf"^{key}=(.*)$", logs, re.MULTILINE)
    assert match, f"{key}= not in job logs:\n{logs}"
    return match.group(1)


@pytest.fixture(scope="class")
def head(tmp_path_factory):
    """One head for the class below, stopped when the class is done, failed tests or not (and
    before the multi-node test starts its raylets: two clusters at once crowd 2 cores)."""
    head = start_head(tmp_path_factory.mktemp("ray-head"))
    try:
        yield head
    finally:
        head.stop()


@pytest.mark.slow
@pytest.mark.ray
class TestTokenProtectedHead:
    @pytest.mark.timeout(240)
    def test_job_with_token_builds_the_model_from_the_uploaded_repo(self, head):
        from pipeline.model import AutoencoderConfig, build_model, count_parameters

        expected = count_parameters(build_model(AutoencoderConfig()))
        status, logs = submit_job(head, ["python", "-c", JOB_SCRIPT], working_dir=REPO_ROOT, timeout=180)

        assert status == "SUCCEEDED", logs
        assert int(_log_value(logs, "PARAMS")) == expected
        # The code came from the upload (under the head's temp dir), not from the editable install.
        assert Path(_log_value(logs, "PIPELINE_FROM")).is_relative_to(head.temp_dir)
        assert Path(_log_value(logs, "PYTHON")).parent == VENV_BIN
        top_level = json.loads(_log_value(logs, "TOP_LEVEL"))
        assert {"pipeline", "jobs", "pyproject.toml"} <= set(top_level)
        assert not {".venv", ".git", "demo-output", "data", ".pytest_cache"} & set(top_level)
        assert int(_log_value(logs, "UPLOAD_BYTES")) < 5 * 1024**2

    @pytest.mark.timeout(120)
    def test_submission_without_the_right_token_is_refused(self, head):
        submit = ["job", "submit", f"--address={head.dashboard_url}", "--submission-id=must-not-run",
                  "--", "python", "-c", "print('ran')"]

        missing = head.ray(*submit, with_token=False)
        assert missing.returncode != 0
        assert "Unauthorized: Missing authentication token" in missing.stderr, missing.stderr

        wrong = head.ray(*submit, token="0" * 64)
        assert wrong.returncode != 0
        assert "Forbidden: Invalid authentication token" in wrong.stderr, wrong.stderr

        # Nothing was queued: with the token, the head knows no such job.
        listed = head.ray("job", "list", f"--address={head.dashboard_url}")
        assert listed.returncode == 0, listed.stderr
        assert "must-not-run" not in listed.stdout

    @pytest.mark.timeout(60)
    def test_get_auth_token_on_the_head_prints_the_clients_token(self, head):
        # What a user runs in a shell on the head (`ray attach cluster.yaml`, then `ray get-auth-token`).
        printed = subprocess.run([RAY_CLI, "get-auth-token"], env=head.server_env, capture_output=True,
                                 text=True, timeout=60, check=True)
        assert printed.stdout == head.token and re.fullmatch(r"[0-9a-f]{64}", printed.stdout)
        assert oct(head.token_path.stat().st_mode & 0o777) == "0o600"


# --- several nodes on one machine (slow) ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(180)
def test_tasks_pinned_by_custom_resources_run_on_different_nodes(multinode_cluster):  # noqa: F811
    import ray

    @ray.remote(num_cpus=1)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    resources = multinode_cluster.resources
    on_worker1 = where.options(resources={resources["worker1"]: 0.01}).remote()
    on_worker2 = where.options(resources={resources["worker2"]: 0.01}).remote()
    node1, node2 = ray.get([on_worker1, on_worker2], timeout=120)

    assert node1 != node2
    assert (node1, node2) == (multinode_cluster.node_ids["worker1"], multinode_cluster.node_ids["worker2"])
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 3 and ray.cluster_resources()["CPU"] == 3


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(180)
def test_the_progress_tally_lives_on_the_driver_s_node_while_that_node_is_busy(multinode_cluster):  # noqa: F811
    """Left to Ray, a 0-CPU actor goes wherever there is room; the job's row tally must not sit
    on a worker node whose death would take the job's count with it (pipeline/progress.py)."""
    import ray

    from pipeline.progress import Progress, TallyWatch

    @ray.remote(num_cpus=1)
    def hold(seconds: float) -> None:
        import time

        time.sleep(seconds)

    busy = hold.options(resources={multinode_cluster.resources["head"]: 0.01}).remote(20)
    head = multinode_cluster.node_ids["head"]
    assert ray.get_runtime_context().get_node_id() == head
    placed = []
    for _ in range(4):
        with TallyWatch(Progress("rows", None, bar=False, interval=3600)) as watch:
            placed.append(ray.get(watch.tally.__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_node_id()), timeout=60))
    ray.cancel(busy, force=True)
    assert placed == [head] * 4
