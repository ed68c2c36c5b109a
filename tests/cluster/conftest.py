"""A real local Ray head with token authentication, started with the `ray` CLI
(`tests.raycluster`, which says how and how teardown stops only this head)."""

from __future__ import annotations

import pytest

from tests.raycluster import ClusterError, start_cluster
from tests.raycluster import clean_env as _clean_env


@pytest.fixture
def clean_env():
    """`clean_env(**extra)`: this process's environment without any Ray address or token."""
    return _clean_env


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated Ray head (4 CPUs, dashboard + Jobs API on 127.0.0.1), for one module."""
    try:
        head = start_cluster(num_cpus=4)
    except ClusterError as err:
        pytest.fail(str(err))
    try:
        yield head
    finally:
        head.stop()
