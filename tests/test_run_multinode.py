"""A head and a second node on this machine, both on 127.0.0.1: jobs land on both."""

from __future__ import annotations

import os

import pytest

from test_run import FEATURES, inputs, ledger, write_manifest  # noqa: F401 - the fixture is shared
from factories import run_converter

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_jobs_land_on_both_nodes(two_nodes, inputs, tmp_path):  # noqa: F811
    manifest = write_manifest(tmp_path / "m.yaml", inputs, FEATURES)
    assert run_converter("run", manifest, "--ray-address", two_nodes.address, "--group-size", "1") == 0  # a task per job
    records = ledger(tmp_path / "out")
    assert all(r["status"] == "succeeded" for r in records)
    nodes = {r["node_id"] for r in records}
    assert len(nodes) == 2, nodes
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert nodes == alive
