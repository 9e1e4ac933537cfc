"""prepare on a 2-node cluster where only the worker node sees the photos.

The worker node runs in its own mount namespace (tests/cluster_harness.py); the photos are
written by a task on that node into a tmpfs that exists only there, so the driver process
(this test) cannot read a single image byte: everything it does with the source is by
name, and listing, reading, detection, writing and merging must happen on the worker node.
The result must equal what one process makes of the same photos (same source
fingerprint, same records in the same order, byte for byte, same rejects). No face
detector here (centred crops), to keep it short: MTCNN on two nodes is
test_preprocessing_cluster.py.
"""

from __future__ import annotations

import pytest

from preprocessing.prepare import prepare_dataset
from preprocessing.samples import make_sample_faces
from tests.cluster_harness import namespaced_cluster, unshare_available
from tests.fixtures_preprocessing import assert_same_as_one_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unshare_available() is not None, reason=f"{unshare_available()}"),
]
N, SEED, RES = 12, 2, 16


def test_driver_never_sees_the_photos_and_output_equals_one_process(tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    worker_only, out = tmp_path / "worker_only", tmp_path / "shared" / "out"
    worker_only.mkdir()
    photos = worker_only / "photos"
    ray.shutdown()
    with namespaced_cluster([worker_only], worker_cpus=2, head_cpus=0) as info:
        ray.init(address=info.address, log_to_driver=False)
        try:
            on_worker = NodeAffinitySchedulingStrategy(info.worker_node_id, soft=False)
            make = ray.remote(num_cpus=1, scheduling_strategy=on_worker)(make_sample_faces)
            ray.get(make.remote(photos, n=N, seed=SEED), timeout=120)
            assert not photos.exists()  # only the worker node's tmpfs holds them
            summary = prepare_dataset(str(photos), out, RES, shard_size=4, detector="none")
        finally:
            ray.shutdown()
    assert summary.nodes == [info.worker_node_id]
    assert summary.records == N and summary.processed_shards == 3

    # The same photos, made here, processed in this one process without Ray.
    local = make_sample_faces(tmp_path / "local", n=N, seed=SEED)
    assert_same_as_one_process(out, local, RES, shard_size=4, detector="none")
