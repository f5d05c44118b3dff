"""A node dies mid-job: on several raylets on this machine (`ray.cluster_utils.Cluster`), the
worker node running the embed actor or the training worker is removed while rows are in flight.
Embed ends with exactly one row per id (at once, or after one rerun); training goes on from its
last checkpoint and stops at the requested epochs. (Scenarios: fault_scenarios.py.)"""

from __future__ import annotations

import fault_scenarios as scenarios
import pytest

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_embed_ends_exactly_once_when_its_actor_node_dies_mid_job(tmp_path):
    row = scenarios.node_dies_mid_embed(tmp_path)
    assert row["node_removed"], row
    assert row["finished"] and row["rows_out"] == row["rows_in"], row
    assert row["duplicates"] == row["lost"] == row["unknown"] == 0, row


@pytest.mark.timeout(600)
def test_training_goes_on_from_its_checkpoint_when_its_worker_node_dies(tmp_path):
    row = scenarios.node_dies_mid_training(tmp_path)
    assert row["node_removed"], row
    assert row["finished"] and row["epochs"] == [1, 2, 3], row
    assert row["rows_seen"] == row["rows_in"], row
