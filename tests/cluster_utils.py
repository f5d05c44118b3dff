"""Real Ray clusters for tests: a token-protected head from `ray start --head`, jobs sent with
the `ray job submit` CLI, and several raylets on this machine with `ray.cluster_utils.Cluster`.

Token authentication in Ray 2.60, as read from the installed sources
(ray/_private/authentication/, ray/scripts/scripts.py, the token loader in _raylet.so):

* `RAY_AUTH_MODE=token` turns it on for a process; it can only be set through the environment.
  `ray start --head` with the variable unset enables it anyway when a token already exists,
  and a local `ray.init()` with it unset enables it and creates a token if none exists.
* The token (64 hex characters) is looked up, first hit wins, in: `RAY_AUTH_TOKEN` (the value),
  `RAY_AUTH_TOKEN_PATH` (a file; an error if set but unreadable), then `~/.ray/auth_token`.
* `ray get-auth-token` prints the token it finds; `--generate` writes a new one to
  `~/.ray/auth_token` (always the default path, mode 0644) when none is found.
* HTTP clients (the Jobs CLI/SDK) send `Authorization: Bearer <token>` only when their own
  `RAY_AUTH_MODE` is `token`; the dashboard answers 401 without a token and 403 for a wrong one.

The head here reads its token from a file under the test's tmp_path (`RAY_AUTH_TOKEN_PATH`), so
no test reads or writes the real `~/.ray/auth_token`; clients get it through `RAY_AUTH_TOKEN`.

Stopping: the head runs as `ray start --head --block` in a session of its own, and `Head.stop()`
ends exactly that process tree (SIGTERM, which makes `ray start --block` shut its node down, then
SIGKILL for stragglers). It deliberately does not call `ray stop --force`, which kills every Ray
process on the machine: the session's `ray_local` cluster and other people's runs included.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The venv's `ray` and `python`: the head must run jobs with the interpreter that has the
# project's dependencies, so its bin directory goes first on the head's PATH.
VENV_BIN = Path(sys.executable).parent
RAY_CLI = str(VENV_BIN / "ray")

AUTH_ENV_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Never inherited by the head or a client: the test process may carry them from an earlier
# `ray.init()` (which sets RAY_AUTH_MODE=token in os.environ) or from the user's shell.
_SCRUBBED_ENV_VARS = AUTH_ENV_VARS + ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")

# conftest.py's `ray_local` calls ray.init with these; keep the two in step (see multinode_cluster).
LOCAL_RAY_INIT_KWARGS = dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short_temp_dir(prefix: str) -> Path:
    # Ray puts unix sockets under its temp dir; pytest's tmp_path is too deep for the 107-byte
    # socket path limit once Ray appends session_<timestamp>/sockets/plasma_store.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray auth/address variables, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV_VARS}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


# --- processes, by id --------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, command line) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields_after_comm = stat[stat.rindex(")") + 2 :].split()  # comm may hold spaces
        table[int(entry)] = (int(fields_after_comm[1]), int(fields_after_comm[2]), cmdline)
    return table


def _processes_of(leader: subprocess.Popen, marker: str) -> set[int]:
    """The leader, its descendants, its process group, and anything naming `marker` (our temp dir)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    # Once reaped, the leader's pid may belong to someone else; its process group id cannot be
    # reused while any member of the group is alive.
    found, stack = set(), [leader.pid] if leader.returncode is None else []
    while stack:
        pid = stack.pop()
        if pid in table and pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    found |= {pid for pid, (_, pgid, cmd) in table.items() if pgid == leader.pid or marker in cmd}
    found.discard(os.getpid())
    return found


def _kill(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


# --- a real head -------------------------------------------------------------------------


@dataclass
class Head:
    """A running `ray start --head` with token authentication, started by `start_head`."""

    address: str  # GCS address, host:port: `ray start --address=...`, `ray.init(address=...)`
    dashboard_url: str  # http://127.0.0.1:<port>: the Jobs API, `ray job submit --address=...`
    token: str  # as printed by `ray get-auth-token` with the head's environment
    token_path: Path  # the head's token file (RAY_AUTH_TOKEN_PATH)
    temp_dir: Path  # Ray's --temp-dir; session logs are under temp_dir/session_latest/logs
    log_path: Path  # stdout+stderr of `ray start --head --block`
    server_env: dict[str, str] = field(repr=False)  # the head's own environment (a shell on the head)
    process: subprocess.Popen = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    def env(self, *, token: str | None = None, with_token: bool = True) -> dict[str, str]:
        """Environment for a client process (ray CLI, or a driver run as a subprocess).

        RAY_API_SERVER_ADDRESS points the Jobs CLI at this head and RAY_ADDRESS points a
        `ray.init()` driver at it; with_token=False gives a client that has no token at all
        (auth mode unset, which a client treats as disabled); `token=` presents another token.
        """
        env = clean_env(RAY_API_SERVER_ADDRESS=self.dashboard_url, RAY_ADDRESS=self.address)
        if with_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token if token is None else token)
        return env

    def ray(self, *args: str, with_token: bool = True, token: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `ray <args>` as a client of this head; stdout and stderr are captured apart."""
        return subprocess.run([RAY_CLI, *args], env=self.env(with_token=with_token, token=token),
                              capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)

    def logs_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 8.0) -> None:
        """Stop this head and everything it started; idempotent. Never touches other Ray processes."""
        if self._stopped:
            return
        self._stopped = True
        marker = str(self.temp_dir)
        pids = _processes_of(self.process, marker)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # `ray start --block` then stops its node
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.2)
        # Job drivers run in sessions of their own and can outlive the node by a while.
        deadline = min(deadline, time.monotonic() + 2)
        while time.monotonic() < deadline and _alive(pids):
            time.sleep(0.2)
        # Whatever is left (and anything spawned meanwhile), by pid.
        leftovers = _alive(pids | _processes_of(self.process, marker))
        _kill(leftovers, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        atexit.unregister(self.stop)


def _http_status(url: str, token: str | None) -> int | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def start_head(tmp_path: Path, *, num_cpus: int = 2, object_store_memory: int = 512 * 1024**2,
               extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
               timeout: float = 90) -> Head:
    """Start a token-protected Ray head on 127.0.0.1 and wait until its Jobs API answers.

    The token is made by `ray get-auth-token --generate` with HOME set to tmp_path/home (so the
    real ~/.ray is left alone) and handed to the head through RAY_AUTH_TOKEN_PATH. Jobs run on
    the head inherit its environment: this process's (S3 endpoint and credentials from conftest
    included), plus `env`, minus Ray auth variables, with the venv first on PATH. Always pair
    with `head.stop()` (a fixture's teardown).
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    generated = subprocess.run([RAY_CLI, "get-auth-token", "--generate"], env=clean_env(HOME=str(home)),
                               capture_output=True, text=True, timeout=60)
    if generated.returncode != 0:
        raise RuntimeError(f"ray get-auth-token --generate failed:\n{generated.stderr}")
    token_path = home / ".ray" / "auth_token"
    token_path.chmod(0o600)

    head_env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), **(env or {}))
    token = subprocess.run([RAY_CLI, "get-auth-token"], env=head_env, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert token == generated.stdout.strip(), "the head would read a different token than was generated"

    temp_dir = _short_temp_dir("rayhead-")
    gcs_port, dashboard_port = free_port(), free_port()
    command = [
        RAY_CLI, "start", "--head", "--block",
        f"--port={gcs_port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        f"--temp-dir={temp_dir}", f"--object-store-memory={object_store_memory}", "--disable-usage-stats",
        # Ports that default to fixed numbers (10001, 52365) would collide with any other head.
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        *extra_args,
    ]
    log_path = tmp_path / "ray-head.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=tmp_path)
    head = Head(address="", dashboard_url=f"http://127.0.0.1:{dashboard_port}", token=token,
                token_path=token_path, temp_dir=temp_dir, log_path=log_path, server_env=head_env,
                process=process)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {process.returncode}:\n{head.logs_tail()}")
            address_file = temp_dir / "ray_current_cluster"  # written once the GCS is up
            if address_file.exists() and not head.address:
                # Ray swaps 127.0.0.1 for the machine's own IP; the GCS listens on all interfaces.
                head.address = address_file.read_text().strip()
            # The job endpoint answers once the dashboard and its job module are up.
            if head.address and _http_status(f"{head.dashboard_url}/api/jobs/", token) == 200:
                # The head lives in a session of its own: if this process exits without the
                # fixture's teardown (Ctrl-C, a crash), stop it anyway.
                atexit.register(head.stop)
                return head
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray head not ready after {timeout}s:\n{head.logs_tail()}")
            time.sleep(0.5)
    except BaseException:
        head.stop()
        raise


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[Head]:
    """One token-protected head per test module, stopped in teardown even when tests fail."""
    head = start_head(tmp_path_factory.mktemp("ray-head"))
    try:
        yield head
    finally:
        head.stop()


# --- jobs through the CLI ----------------------------------------------------------------


class JobResult(NamedTuple):
    status: str  # SUCCEEDED, FAILED or STOPPED
    logs: str  # the job's own output, as `ray job logs` prints it


class JobSubmitError(RuntimeError):
    """`ray job submit` itself failed (refused, unreachable, bad runtime env): no job ran."""

    def __init__(self, message: str, returncode: int, output: str):
        super().__init__(f"{message} (exit {returncode}):\n{output}")
        self.returncode = returncode
        self.output = output


_STATUS_LINES = (  # how the Jobs CLI (ray/dashboard/modules/job/cli.py) words a job's status
    (re.compile(r"Job '(?P<id>[^']+)' succeeded"), "SUCCEEDED"),
    (re.compile(r"Job '(?P<id>[^']+)' failed"), "FAILED"),
    (re.compile(r"Job '(?P<id>[^']+)' was stopped"), "STOPPED"),
    (re.compile(r"Status for job '(?P<id>[^']+)': (?P<status>[A-Z]+)"), None),
)


def _job_status(cli_output: str, submission_id: str) -> str | None:
    for pattern, status in _STATUS_LINES:
        for match in pattern.finditer(cli_output):
            if match["id"] == submission_id:
                return status or match["status"]
    return None


def submit_job(head: Head, entrypoint: list[str], working_dir: str | Path | None = REPO_ROOT,
               timeout: float = 300, *, runtime_env: dict | None = None,
               entrypoint_num_cpus: float | None = None) -> JobResult:
    """Submit `entrypoint` with `ray job submit` (a real subprocess), wait for it, return status and logs.

    `working_dir` is uploaded as the job's working directory (the repo by default; .gitignore,
    .rayignore and Ray's default excludes apply); `runtime_env` goes to --runtime-env-json
    (e.g. {"excludes": [...], "env_vars": {...}}). Raises JobSubmitError when the CLI could not
    submit, TimeoutError (after `ray job stop`) when the job outlives `timeout` seconds.
    """
    submission_id = f"test-{uuid.uuid4().hex[:12]}"
    command = ["job", "submit", f"--address={head.dashboard_url}", f"--submission-id={submission_id}"]
    if working_dir is not None:
        command.append(f"--working-dir={working_dir}")
    if runtime_env:
        command.append(f"--runtime-env-json={json.dumps(runtime_env)}")
    if entrypoint_num_cpus is not None:
        command.append(f"--entrypoint-num-cpus={entrypoint_num_cpus}")
    command += ["--", *entrypoint]
    try:
        submitted = head.ray(*command, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        head.ray("job", "stop", f"--address={head.dashboard_url}", submission_id, timeout=60)
        raise TimeoutError(f"job {submission_id} ({entrypoint}) still running after {timeout}s") from e
    output = submitted.stdout + submitted.stderr
    if f"Job '{submission_id}' submitted successfully" not in output:
        raise JobSubmitError("ray job submit failed", submitted.returncode, output)

    status = _job_status(output, submission_id)
    if status is None:  # the log stream ended without a verdict: ask the head
        described = head.ray("job", "status", f"--address={head.dashboard_url}", submission_id, timeout=60)
        status = _job_status(described.stdout + described.stderr, submission_id) or "UNKNOWN"
    logs = head.ray("job", "logs", f"--address={head.dashboard_url}", submission_id, timeout=60)
    if logs.returncode != 0:
        raise JobSubmitError(f"ray job logs {submission_id} failed", logs.returncode, logs.stdout + logs.stderr)
    return JobResult(status=status, logs=logs.stdout)


# --- several nodes on this machine ---------------------------------------------------------


@dataclass
class MultiNodeCluster:
    """A `ray.cluster_utils.Cluster` (head + workers), with the driver connected to it.

    `resources[name]` is the custom resource only node `name` has (1 unit), so a task with
    `.options(resources={resources["worker1"]: 0.01})` runs there; `node_ids[name]` is its
    node id (hex), as `ray.get_runtime_context().get_node_id()` reports it.
    """

    cluster: object  # ray.cluster_utils.Cluster
    resources: dict[str, str]
    node_ids: dict[str, str]


@contextlib.contextmanager
def start_multinode_cluster(worker_cpus: tuple[int, ...] = (1, 1), head_cpus: int = 1) -> Iterator[MultiNodeCluster]:
    """A head and len(worker_cpus) worker raylets on this machine, the driver connected.

    The driver can belong to one Ray cluster at a time: if this process is already connected
    (conftest's session-scoped `ray_local`), that connection is shut down first and, on exit,
    re-made with LOCAL_RAY_INIT_KWARGS so later `ray_local` tests still find a local Ray.
    Auth follows this process: nodes inherit RAY_AUTH_MODE and find the same token the driver does.
    """
    import ray
    from ray.cluster_utils import Cluster

    had_local_ray = ray.is_initialized()
    ray.shutdown()
    temp_dir = _short_temp_dir("raymulti-")
    # Cluster.add_node records the head's address in the default temp dir (/tmp/ray) whatever
    # temp_dir says, and fails on a fresh machine where nothing has created that folder yet.
    from ray._common.utils import get_default_ray_temp_dir

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    common = dict(temp_dir=str(temp_dir), object_store_memory=128 * 1024**2)
    names = ["head"] + [f"worker{i + 1}" for i in range(len(worker_cpus))]
    resources = {name: f"multinode_{name}" for name in names}
    cluster = Cluster()
    try:
        nodes = {"head": cluster.add_node(num_cpus=head_cpus, resources={resources["head"]: 1},
                                          include_dashboard=False, **common)}
        for name, cpus in zip(names[1:], worker_cpus):
            nodes[name] = cluster.add_node(num_cpus=cpus, resources={resources[name]: 1}, **common)
        cluster.wait_for_nodes()
        cluster.connect()
        yield MultiNodeCluster(cluster=cluster, resources=resources,
                               node_ids={name: node.node_id for name, node in nodes.items()})
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if had_local_ray:
            ray.init(**LOCAL_RAY_INIT_KWARGS)


@pytest.fixture(scope="module")
def multinode_cluster() -> Iterator[MultiNodeCluster]:
    """Three raylets (head + worker1 + worker2, 1 CPU each) for a test module.

    While it is up the driver is connected to it, not to the local Ray, so keep it out of modules
    with `ray_local` tests (module scope: it lives until the module's last test). Import it into
    the test module: `from cluster_utils import multinode_cluster`.
    """
    with start_multinode_cluster() as multinode:
        yield multinode
