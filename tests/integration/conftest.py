"""Fixtures of the integration tests: one shared gateway over a repository of real models."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as grpcclient
from support import build_serving_repository, start_gateway


@pytest.fixture(scope="session")
def serving_repo(tmp_path_factory):
    """A repository of every model kind the read-mostly tests need (built once)."""
    return build_serving_repository(tmp_path_factory.mktemp("serving_repo"))


@pytest.fixture(scope="session")
def serving_gateway(serving_repo):
    """One gateway (control mode none) over ``serving_repo``, shared by the read-mostly modules."""
    with start_gateway(serving_repo) as gw:
        yield gw
    # the context manager stops it; a clean drain exits 0
    assert gw.process.returncode == 0, gw.log()


@pytest.fixture
def client(serving_gateway):
    c = grpcclient.InferenceServerClient(serving_gateway.url)
    yield c
    c.close()


@pytest.fixture
def channel(serving_gateway):
    with grpc.insecure_channel(serving_gateway.url) as ch:
        yield ch
