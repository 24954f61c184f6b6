"""HiAP under torch.distributed: ``hiap_fx.prune`` or your own loop with DistributedDataParallel,
or with FSDP2 (``--fsdp``: the weights sharded over the ranks, the gates replicated).

Launch with torchrun, as any DDP job (one process per GPU; gloo on CPU):

    torchrun --standalone --nproc_per_node 2 examples/ddp_prune.py --mode prune --out ddp_out
    torchrun --standalone --nproc_per_node 2 examples/ddp_prune.py --mode own-loop --out ddp_out
    torchrun --standalone --nproc_per_node 2 examples/ddp_prune.py --mode prune --fsdp --out fsdp_out
    torchrun --standalone --nproc_per_node 2 examples/ddp_prune.py --mode own-loop --fsdp --out fsdp_out
    torchrun --standalone --nproc_per_node 2 examples/ddp_prune.py --mode prune --fsdp --resume --out fsdp_out

FSDP2: ``prune`` shards the prepared model with ``PruneConfig(distributed="fsdp")`` and gathers
it for finalize; ``prune(checkpoint=...)`` then writes sharded checkpoints (each rank its shards,
with ``torch.distributed.checkpoint``, next to the checkpoint file) and ``prune(path)`` resumes
them on any number of ranks (``--resume`` checks the resumed run ends where the uninterrupted one
does). The own loop calls ``shard(prepared)`` before building its optimizer, checkpoints
with ``torch.distributed.checkpoint`` (each rank writes its shards; ``sharded_state``), and here
resumes halfway from that checkpoint into a freshly prepared, sharded model, as a restarted job
would; ``gather(prepared)`` gives every rank the unsharded model to finalize.

Several nodes: the same script, with ``--nnodes N --node_rank R --rdzv_backend c10d
--rdzv_endpoint HOST:PORT`` on every node (torchrun's usual flags); nothing in hiap_fx changes.

What keeps the ranks consistent:
- ``prune`` wraps the prepared model in DistributedDataParallel itself when a process group is
  initialised; gradients (gate logits' included) are averaged, so weights and gate logits stay
  identical on every rank. The budget controller and the temperature follow from the step and the
  gate logits only, so they agree too. A DistributedSampler in your DataLoader gives each rank its
  part of the data (without one, each rank takes every world-size-th batch of the same seeded
  order). Checkpoints are written by rank 0; every rank finalizes the same compact model.
- Own loop: wrap ``prepared`` in DDP for the forward, and call ``prepared.schedule`` and
  ``prepared.hiap_loss()`` on the unwrapped model (they are the same on every rank).

Each rank writes ``OUT/rank{R}.pt`` (gate logits, controller state, compact weights, kept MAC
ratio) so the ranks can be compared (``tests/test_distributed.py`` does).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import hiap_fx


def tiny_vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)  # the same dense weights on every rank (DDP would broadcast rank 0's anyway)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=4, num_classes=4).eval()


def quadrant_data(n: int = 512) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 16, 16, generator=gen) * 0.5
    y = torch.randint(0, 4, (n,), generator=gen)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 1.5
    return TensorDataset(x, y)


def sharded_own_loop(model, data, loader, config, args, device):
    """The own loop with FSDP2: shard, train half the steps, checkpoint with
    torch.distributed.checkpoint, resume into a freshly prepared and sharded model, train the
    rest, gather and finalize. Returns (unsharded prepared, compact, whether the resumed state
    equalled the saved one)."""
    import torch.distributed.checkpoint as dcp

    from hiap_fx.training.sharding import gate_parameters, gather, load_sharded_state, shard, sharded_state

    x0 = data.tensors[0][:2].to(device)
    checkpoint = os.path.join(args.out, "dcp")

    def fresh():
        prepared = shard(hiap_fx.prepare(model, x0, config))
        gates = gate_parameters(prepared)
        gate_ids = {id(g) for g in gates}
        optimizer = torch.optim.AdamW([
            {"params": [p for p in prepared.parameters() if id(p) not in gate_ids], "lr": 1e-3},
            {"params": gates, "lr": 10 * config.gate_init / args.steps, "weight_decay": 0.0}])
        return prepared.train(), optimizer

    def train(prepared, optimizer, start, stop):
        step, epoch = start, start // len(loader)
        batches = iter(()) if step == stop else None
        while step < stop:
            loader.sampler.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(step % len(loader)):  # the position in the epoch
                next(batches)
            for x, y in batches:
                if step == stop:
                    break
                prepared.schedule(step, args.steps)
                loss = F.cross_entropy(prepared(x.to(device)).float(), y.to(device)) + prepared.hiap_loss()
                optimizer.zero_grad()
                loss.backward()  # weights: reduce-scattered by FSDP2; gates: averaged
                optimizer.step()
                step += 1
            epoch += 1

    half = args.steps // 2
    prepared, optimizer = fresh()
    train(prepared, optimizer, 0, half)
    dcp.save(sharded_state(prepared, optimizer), checkpoint_id=checkpoint)
    saved = gather(prepared).state_dict()
    prepared, optimizer = fresh()  # a restarted job: prepare and shard again, then load
    state = sharded_state(prepared, optimizer)
    dcp.load(state, checkpoint_id=checkpoint)
    load_sharded_state(prepared, state, optimizer)
    resumed = gather(prepared).state_dict()
    exact = saved.keys() == resumed.keys() and all(torch.equal(saved[k], resumed[k]) for k in saved)
    train(prepared, optimizer, half, args.steps)
    plain = gather(prepared).eval()
    plain.land_on_budget()
    return plain, hiap_fx.finalize(plain), exact


def resumed_prune(model, loader, config, args):
    """prune() uninterrupted, then the same run stopped halfway at a checkpoint (sharded under
    FSDP2: each rank writes its shards with torch.distributed.checkpoint) and resumed from it, as
    a restarted job would. Returns (prepared, compact, whether both runs ended identical)."""
    whole = hiap_fx.prune(model, loader, config, steps=args.steps, progress=False)
    checkpoint = os.path.join(args.out, "run.ckpt")
    half = args.steps // 2
    stopped = hiap_fx.prune(model, loader, config, steps=args.steps, checkpoint=checkpoint,
                            checkpoint_every=half, stop_after=half, progress=False)
    assert stopped is None
    resumed = hiap_fx.prune(checkpoint, loader, progress=False)
    a, b = whole.compact.state_dict(), resumed.compact.state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gates_a, gates_b = whole.prepared.gate_modules(), resumed.prepared.gate_modules()
    same = same and all(torch.equal(gates_a[k].logits, gates_b[k].logits) for k in gates_a)
    return resumed.prepared, resumed.compact, bool(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["prune", "own-loop"], default="prune")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--cost", choices=["macs", "latency"], default="macs")
    parser.add_argument("--out", default="ddp_out")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP")
    parser.add_argument("--resume", action="store_true", help="with --mode prune: also stop a run "
                        "halfway at a checkpoint, resume it, and compare with the uninterrupted run")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    data = quadrant_data()
    loader = DataLoader(data, batch_size=32, sampler=DistributedSampler(data, seed=0))
    parallel = "fsdp" if args.fsdp else "ddp"
    config = hiap_fx.PruneConfig(target_macs=args.target, lr=1e-3, amp=args.amp, distributed=parallel)
    if args.cost == "latency":  # prune() makes every rank steer by rank 0's calibration
        config = hiap_fx.PruneConfig(cost="latency", target_latency=args.target, lr=1e-3, amp=args.amp,
                                     distributed=parallel)
    model = tiny_vit().to(device)
    resumed_exactly = None

    if args.mode == "prune" and args.resume:
        prepared, compact, resumed_exactly = resumed_prune(model, loader, config, args)
    elif args.mode == "prune":
        result = hiap_fx.prune(model, loader, config, steps=args.steps, progress=False)
        prepared, compact = result.prepared, result.compact
    elif args.fsdp:
        prepared, compact, resumed_exactly = sharded_own_loop(model, data, loader, config, args, device)
    else:
        x0 = data.tensors[0][:2].to(device)
        prepared = hiap_fx.prepare(model, x0, config)
        ddp = DistributedDataParallel(prepared, device_ids=[device] if cuda else None)
        gates = [g.logits for g in prepared.gate_modules().values()]
        gate_ids = {id(g) for g in gates}
        weights = [p for p in prepared.parameters() if id(p) not in gate_ids]
        optimizer = torch.optim.AdamW([
            {"params": weights, "lr": 1e-3},
            {"params": gates, "lr": 10 * config.gate_init / args.steps, "weight_decay": 0.0}])
        prepared.train()
        step, epoch = 0, 0
        while step < args.steps:
            loader.sampler.set_epoch(epoch)
            for x, y in loader:
                if step == args.steps:
                    break
                prepared.schedule(step, args.steps)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                    logits = ddp(x.to(device))
                loss = F.cross_entropy(logits.float(), y.to(device)) + prepared.hiap_loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
            epoch += 1
        prepared.land_on_budget()
        compact = hiap_fx.finalize(prepared)  # deterministic: the same on every rank

    os.makedirs(args.out, exist_ok=True)
    torch.save({
        "world": world,
        "gates": {k: g.logits.detach().cpu() for k, g in prepared.gate_modules().items()},
        "controller": {k: v.detach().cpu() for k, v in prepared.budget.state_dict().items()},
        "compact": {k: v.detach().cpu() for k, v in compact.state_dict().items()},
        "kept_ratio": prepared.budget_ratio(),
        "resumed_exactly": resumed_exactly,
    }, os.path.join(args.out, f"rank{rank}.pt"))
    if rank == 0:
        print(f"{args.mode}: {world} ranks, kept {100 * prepared.hard_macs() / prepared.dense_macs:.1f}% "
              f"of MACs, {sum(p.numel() for p in compact.parameters()):,} parameters")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
