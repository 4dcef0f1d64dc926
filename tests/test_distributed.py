"""The patched model trains under torch.distributed with the losses of one process on the whole batch.

Two processes (``tools/distributed_worker.py``) join a ``gloo`` group on localhost and train the patched
tiny LLaMA on the CPU through Triton's interpreter, each on half of one batch: once wrapped in
``DistributedDataParallel``, once sharded with FSDP2's ``fully_shard``.  Rank 0 also trains an
unwrapped copy on the whole batch.  Gradients are averaged over ranks and each rank holds as many
tokens, so every step's loss must match the single process's up to the order of the sums.  The
workers set ``TRITON_INTERPRET=1`` themselves, so this runs the same way on a GPU machine.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tools" / "distributed_worker.py"
WORLD_SIZE = 2
WRAPPERS = ("ddp", "fsdp2")
TIMEOUT_S = 240  # the workers take ~20 s on two cores

NUMPY_TOO_NEW = tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 3)
pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with the gloo backend is not available in this torch build",
    ),
    pytest.mark.skipif(  # e.g. on the GPU box: the CPU workers run Triton's interpreter
        NUMPY_TOO_NEW, reason=f"Triton 3.6's CPU interpreter needs numpy<2.3, found {np.__version__}",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    """Run the workers once for every wrapper; returns ``{"reference": [...], "ddp": [...], ...}``."""
    out_path = tmp_path_factory.mktemp("distributed") / "losses.json"
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), ",".join(WRAPPERS), str(rank), str(WORLD_SIZE), str(port),
             str(out_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for worker in workers:  # only ours, by handle: a rank left waiting on a failed peer
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for rank, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"rank {rank} exited with {worker.returncode}:\n{output[-5000:]}"
    return json.loads(out_path.read_text())


def test_single_process_reference_learns(losses):
    reference = losses["reference"]
    assert len(reference) >= 3 and reference[-1] < reference[0], reference


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_distributed_losses_match_one_process(losses, wrapper):
    assert losses[wrapper] == pytest.approx(losses["reference"], rel=1e-5, abs=0)
