"""Inductor's custom-pass hooks, by the names fvcompile's passes use: the one table of them.

A pass names its hook (`GraphPass.hook`); the pass manager installs one `HookPass` per hook
through `compile_fx(config_patches=...)`. In the order a compile reaches them:

| name          | Inductor config key          | what the pass is given                              |
|---------------|------------------------------|-----------------------------------------------------|
| joint         | joint_custom_pre_pass        | the joint fwd+bwd graph (or the inference graph),   |
|               |                              | before Inductor's joint passes                      |
| joint_post    | joint_custom_post_pass       | the same graph after Inductor's joint passes        |
| post_grad_pre | post_grad_custom_pre_pass    | the forward, backward or inference graph, before    |
|               |                              | Inductor's post-grad passes (pattern passes, ...)   |
| post_grad     | post_grad_custom_post_pass   | the same graph after Inductor's post-grad passes    |
| pre_fusion    | _pre_fusion_custom_pass      | Inductor's scheduler nodes before fusion (a list)   |
| post_fusion   | _post_fusion_custom_pass     | Inductor's scheduler nodes after fusion (a list)    |

The scheduler hooks exist only where Inductor lowers the graph: not under `codegen=False`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    name: str
    config_key: str
    stage: str  # "joint", "post_grad" or "scheduler": which graphs it sees, and how it is called


HOOKS: dict[str, Hook] = {h.name: h for h in (
    Hook("joint", "joint_custom_pre_pass", "joint"),
    Hook("joint_post", "joint_custom_post_pass", "joint"),
    Hook("post_grad_pre", "post_grad_custom_pre_pass", "post_grad"),
    Hook("post_grad", "post_grad_custom_post_pass", "post_grad"),
    Hook("pre_fusion", "_pre_fusion_custom_pass", "scheduler"),
    Hook("post_fusion", "_post_fusion_custom_pass", "scheduler"),
)}

CONFIG_KEYS: tuple[str, ...] = tuple(h.config_key for h in HOOKS.values())
