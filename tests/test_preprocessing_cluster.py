"""prepare across the two nodes of a real `ray.cluster_utils.Cluster`."""

from __future__ import annotations

import pytest

from preprocessing.lmdb_store import LmdbImageDataset, read_manifest
from preprocessing.prepare import prepare_dataset
from preprocessing.samples import make_sample_faces

pytestmark = pytest.mark.slow


def test_prepare_runs_on_both_nodes_of_a_cluster(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        photos = make_sample_faces(tmp_path / "photos", n=16, seed=2)
        summary = prepare_dataset(
            photos, tmp_path / "out", 16, workers=2, shard_size=2, address=cluster.address
        )
        assert len(summary.nodes) == 2  # shards went to actors on both nodes
        assert summary.records + summary.rejected == 16 and summary.records >= 15
        ds = LmdbImageDataset(tmp_path / "out", 16)
        assert len(ds) == summary.records == read_manifest(tmp_path / "out")["counts"]["16"]
        assert len({ds.key(i) for i in range(len(ds))}) == len(ds)  # no duplicates
    finally:
        ray.shutdown()
        cluster.shutdown()
