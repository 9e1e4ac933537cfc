"""prepare's GPU shape across the two nodes of a real `ray.cluster_utils.Cluster`.

The second node declares one GPU (this box has none, so MTCNN runs on its CPU inside the
actors, but Ray schedules exactly as on a GPU node): with `gpus_per_worker=0.5` the two
detector actors share that GPU, while reading/decoding and crop/pyramid/write run as CPU
tasks on both nodes. The records equal one process's, byte for byte.
"""

from __future__ import annotations

import pytest

from preprocessing.prepare import prepare_dataset
from preprocessing.samples import make_sample_faces
from tests.fixtures_preprocessing import assert_same_as_one_process

pytestmark = pytest.mark.slow


def test_gpu_shape_runs_on_both_nodes_and_equals_one_process(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        cluster.wait_for_nodes()
        photos = make_sample_faces(tmp_path / "photos", n=16, seed=2)
        summary = prepare_dataset(
            photos, tmp_path / "out", 16, workers=2, gpus_per_worker=0.5, shard_size=2,
            address=cluster.address,
        )  # fmt: skip
        assert summary.plan == {"workers": 2, "gpus_per_worker": 0.5}
        assert len(summary.nodes) == 2  # CPU stages on both nodes, detectors on the GPU one
        assert summary.records + summary.rejected == 16 and summary.records >= 15
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert_same_as_one_process(tmp_path / "out", photos, 16, shard_size=2)
