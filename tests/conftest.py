"""Shared fixtures: one local Ray per session, a real S3 API (moto server) on 127.0.0.1.

The S3 endpoint and dummy credentials are put in the environment at import, before any
Ray worker starts, so that workers (which inherit the driver's environment) reach the same
server as the test process.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest


# The S3 server's port is chosen now, at import, because Ray workers inherit the endpoint from
# the environment; the server starts only when a test needs it. Until then the port stays bound
# here: a port merely noted as free was taken by one of Ray's own processes in between, and
# moto's server thread then died on the bind while `start()` waited for it for ever.
_S3_PORT_HOLDER = socket.socket()
_S3_PORT_HOLDER.bind(("127.0.0.1", 0))
S3_PORT = _S3_PORT_HOLDER.getsockname()[1]
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)
# Keep Ray quiet and small on a 2-core machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole session (as Ray's own `ray_start_regular_shared`)."""
    import ray

    if not ray.is_initialized():
        # address="local": never attach to another cluster (a test head) that happens to run.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    _S3_PORT_HOLDER.close()  # let go of the port at the last moment, for the server to bind
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields its `s3://` URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """URL of an untrained tiny checkpoint (32 px, RGB) with a real calibration."""
    from builders import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-model") / "model"))


@pytest.fixture(scope="session")
def tiny_trained_model(tmp_path_factory) -> str:
    """URL of a briefly trained tiny checkpoint: its decoder draws distinct images."""
    from builders import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-trained") / "model"), train_steps=20)
