"""One process of tests/test_distributed.py: trains the patched tiny LLaMA under torch.distributed.

``python tools/distributed_worker.py WRAPPERS RANK WORLD_SIZE PORT OUT_JSON`` (the repository root
on ``PYTHONPATH``, as the test sets it) joins a ``gloo`` process group on ``127.0.0.1:PORT``; for
each of the comma-separated ``WRAPPERS`` (``ddp``, or ``fsdp2``: per-layer ``fully_shard`` then the
root) it wraps a fresh model and runs a few SGD steps on this rank's share of one fixed batch,
recording the loss averaged over ranks.  Rank 0 first trains an
unwrapped copy on the whole batch (the single-process reference) and writes every loss list to
``OUT_JSON`` as ``{"reference": [...], "ddp": [...], ...}``.  Everything runs on the CPU through
Triton's interpreter.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # Triton reads it when first imported: before anything else

import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import llama_kernels as lk  # noqa: E402
from llama_kernels.model import Llama, LlamaConfig  # noqa: E402

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
BATCH, SEQ_LEN, STEPS, LR = 4, 12, 3, 0.2
WRAPPERS = ("ddp", "fsdp2")


def build_model():
    """The patched model, with the same initial weights in every process."""
    torch.manual_seed(0)
    return lk.apply_kernels(Llama(CONFIG))


def whole_batch():
    return torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def train(model, ids, distributed):
    """``STEPS`` SGD steps of next-token loss on ``ids``; returns the losses (averaged over ranks
    when ``distributed``: each rank holds as many tokens, so that is the whole batch's loss)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        if distributed:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def wrap(model, wrapper):
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def main(wrappers, rank, world_size, port, out_path):
    torch.set_num_threads(1)  # the interpreter is single-threaded numpy; one core per process
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        ids = whole_batch()
        results = {}
        if rank == 0:
            results["reference"] = train(build_model(), ids, distributed=False)
        for wrapper in wrappers:
            model = wrap(build_model(), wrapper)
            results[wrapper] = train(model, ids.chunk(world_size)[rank], distributed=True)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
        dist.barrier()  # nobody tears the group down while a peer still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    wrappers, rank, world_size, port, out_path = sys.argv[1:]
    wrappers = wrappers.split(",")
    if not set(wrappers) <= set(WRAPPERS):
        raise SystemExit(f"WRAPPERS must be a comma-separated list of {WRAPPERS}, got {wrappers}")
    main(wrappers, int(rank), int(world_size), int(port), out_path)
