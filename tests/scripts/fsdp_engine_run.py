"""Sparse training with FSDP2 (`fully_shard`) on CPU/gloo, or without FSDP in one process.

    torchrun --standalone --nproc_per_node 2 fsdp_engine_run.py OUT fsdp
    python fsdp_engine_run.py OUT single

Each run sees the same global batches; rank r of the FSDP run gets rows r::world of each.
Writes OUT/result-<mode>-rank<r>.pt with the final full masks, mask checksums per update and
whether the masking invariant held on the local shards.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

from hf_chts import SparseTrainingEngine, SparsifyConfig, sparsify  # noqa: E402
from hf_chts.layers import sparse_layers  # noqa: E402


def main(output_dir: str, mode: str) -> None:
    distributed = mode == "fsdp"
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    sparsify(model, SparsifyConfig(method="chtss", target_density=0.3, update_interval=3, seed=0))
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    total_steps = 16
    engine = SparseTrainingEngine(model, total_steps=total_steps, optimizer=optimizer)
    generator = torch.Generator().manual_seed(1)
    checksums, invariant, changed_live, resets = [], True, [], []  # resets: links the decay pruning cut

    def local_state():  # this rank's shard of every weight and Adam moment, and of its mask
        state = {}
        for name, layer in sparse_layers(model).items():
            local = (lambda t: t.to_local() if layer.is_sharded else t)
            moments = optimizer.state.get(layer.weight, {})
            state[name] = (local(layer.storage_mask()).clone(), local(layer.weight).detach().clone(),
                           *(local(moments[key]).clone() for key in ("exp_avg", "exp_avg_sq") if key in moments))
        return state

    for step in range(total_steps):
        batch = torch.randint(0, 128, (8, 16), generator=generator)
        local = batch[rank::world]
        model(input_ids=local, labels=local).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = local_state() if (step + 1) % 3 == 0 else None
        live_before = sum(int(layer.mask.sum()) for layer in sparse_layers(model).values())
        stats = engine.step()
        if stats is not None:
            engine.verify_masks_across_ranks()
            checksums.append(engine.mask_checksum())
            # faithful update (docs/algorithms.md §1): a link live before and after the update changes its weight
            # or moments only if the decay pruning cut it (then it is one of the `reset` links)
            after, changed = local_state(), torch.zeros(())
            for name, (mask, *values) in before.items():
                new_mask, *new_values = after[name]
                both = mask & new_mask
                differs = torch.zeros_like(both)
                for old, new in zip(values, new_values):
                    differs |= old != new
                changed += int((both & differs).sum())
            if distributed:
                dist.all_reduce(changed)
            changed_live.append(int(changed))
            # decay pruning cuts the layer to the new budget, regrowth refills to it: it cut live_before − live_after
            resets.append(live_before - sum(int(layer.mask.sum()) for layer in sparse_layers(model).values()))
        for layer in sparse_layers(model).values():
            local_weight = layer.weight.to_local() if layer.is_sharded else layer.weight
            local_mask = layer.storage_mask().to_local() if layer.is_sharded else layer.storage_mask()
            invariant &= bool(torch.all(local_weight[~local_mask] == 0))
            for value in optimizer.state.get(layer.weight, {}).values():
                if torch.is_tensor(value) and value.shape == layer.weight.shape:
                    local_value = value.to_local() if layer.is_sharded else value
                    invariant &= bool(torch.all(local_value[~local_mask] == 0))
    sharded = any(layer.is_sharded for layer in sparse_layers(model).values())
    masks = {name: layer.mask.clone() for name, layer in sparse_layers(model).items()}
    torch.save({"masks": masks, "checksums": checksums, "invariant": invariant, "sharded": sharded, "world": world,
                "changed_live": changed_live, "decay_cut": resets},
               os.path.join(output_dir, f"result-{mode}-rank{rank}.pt"))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
