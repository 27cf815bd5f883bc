"""SimpleFSDP for fvcompile: fully sharded data parallelism whose collectives torch.compile
traces into the graph, where fvcompile's passes can bucket and reorder them.

    mesh = init_device_mesh("cpu", (world_size,))          # gloo; "cuda" with nccl
    model = simple_fsdp(model, mesh, mode="fully_shard",
                        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    optimizer = torch.optim.AdamW(model.parameters())     # the shards: fp32 master weights
    compiled = fvcompile.optimize(model, fullgraph=True)
    save_checkpoint(model, "ckpt", optimizer)             # DCP: loads on any number of ranks
    with RankWatch(timeout_s=300) as watch:               # a dead rank: an error naming it, not a hang
        with watch.step(step): ...

Files, one job each: `api.py` (the front end), `parametrization.py` (the gather on parameter
access), `mixed_precision.py` (the policy), `checkpoint.py` (DCP save and load),
`watchdog.py` (a dead or stuck rank named in an error).
"""
from fvcompile.fsdp.api import MODES, simple_fsdp
from fvcompile.fsdp.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from fvcompile.fsdp.mixed_precision import MixedPrecisionPolicy
from fvcompile.fsdp.watchdog import RankFailure, RankWatch

__all__ = ["MODES", "MixedPrecisionPolicy", "RankFailure", "RankWatch", "full_state_dict", "load_checkpoint",
           "save_checkpoint", "simple_fsdp"]
