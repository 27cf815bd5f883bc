"""Self-distillation losses of the DINO family: DINO (CLS), iBOT (masked patches), Gram anchoring.

All three compare a student's output with a teacher's output that carries no gradient. The
"heads" here are frozen prototypes: logits are cosine similarities between L2-normalized features
and L2-normalized prototype vectors, as in DINO's weight-normalized last layer (whose norm is
fixed to 1). In the papers the prototypes sit behind a trainable 3-layer MLP; the backbone's
graph, which is what we compile, is the same either way.

Shapes: B images, K prototypes, D features; "views" are crops of the same images.
`self_distillation_losses` and `self_distillation_batch` are the parts of a training step that
DINOv2 and DINOv3 share.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """(..., D) features, (K, D) prototypes -> (..., K) cosine logits in [-1, 1]."""
    return F.normalize(features.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


def teacher_probs(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Centering (subtract the running mean) then sharpening (a low temperature): the two
    operations that keep the teacher from collapsing to one prototype or to uniform output."""
    return F.softmax((teacher_logits - center) / teacher_temp, dim=-1)


def dino_loss(student_logits: Tensor, teacher_logits: Tensor, center: Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.07) -> Tensor:
    """DINO loss on CLS tokens, averaged over every (teacher view, other student view) pair.

    student_logits: (S, B, K), S student views, the first T of them the global crops;
    teacher_logits: (T, B, K), the teacher's global crops; center: (K,).
    A student view is never compared with the teacher's output on the same crop.
    """
    t = teacher_probs(teacher_logits, center, teacher_temp)
    log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    # cross_entropy[t, s] = mean over images of -sum_k p_t log q_s
    cross_entropy = -torch.einsum("tbk,sbk->ts", t, log_s) / student_logits.shape[1]
    n_teacher, n_student = cross_entropy.shape
    same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=cross_entropy.device)
    return cross_entropy.masked_fill(same_view, 0.0).sum() / (n_teacher * n_student - n_teacher)


def ibot_loss(student_logits: Tensor, teacher_logits: Tensor, center: Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.07) -> Tensor:
    """iBOT loss: the student sees mask tokens where the teacher sees the patches, and predicts
    the teacher's output there. Inputs are the masked patches only: (B, M, K) and center (K,)."""
    t = teacher_probs(teacher_logits, center, teacher_temp)
    log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(t * log_s).sum(-1).mean()


def gram_loss(student_patches: Tensor, teacher_patches: Tensor,
              remove_negative: bool = True) -> Tensor:
    """Gram anchoring (DINOv3): keep the student's patch-to-patch similarity structure close to
    a Gram teacher's. Inputs (B, N, D); per image, G = X X^T of L2-normalized patch features;
    the loss is the squared Frobenius distance ||G_s - G_t||^2 divided by B*N*N (the mean
    squared error, as in the reference). `remove_negative` clips negative similarities to 0
    in both matrices, the reference's default."""
    s = F.normalize(student_patches.float(), dim=-1)
    t = F.normalize(teacher_patches.float(), dim=-1)
    gram_s = s @ s.transpose(-1, -2)
    gram_t = t @ t.transpose(-1, -2)
    if remove_negative:
        gram_s, gram_t = gram_s.clamp(min=0.0), gram_t.clamp(min=0.0)
    return (gram_s - gram_t).square().mean()


def gather_patches(tokens: Tensor, patch_index: Tensor) -> Tensor:
    """(B, N, D) patch tokens, (B, M) patch indices -> (B, M, D). A fixed number M of masked
    patches per image keeps every shape static (boolean indexing would not)."""
    return torch.gather(tokens, 1, patch_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def random_patch_masks(n_images: int, n_patches: int, mask_ratio: float,
                       generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """iBOT masks with the same number of masked patches in every image (the papers draw
    block-wise masks with a random ratio per image). Returns (bool mask (B, N), index (B, M))."""
    n_masked = max(1, round(mask_ratio * n_patches))
    order = torch.rand(n_images, n_patches, generator=generator).argsort(dim=1)
    index = order[:, :n_masked].sort(dim=1).values
    mask = torch.zeros(n_images, n_patches, dtype=torch.bool).scatter_(1, index, True)
    return mask, index


def self_distillation_losses(
    model: nn.Module, batch: tuple, student_temp: float = 0.1, teacher_temp: float = 0.07,
    local_kwargs: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The DINO + iBOT part of a DINOv2/DINOv3 step; returns (dino, ibot, student and teacher
    patch tokens of the global crops).

    batch = (global_crops (2B, 3, H, W): view 0 of every image then view 1,
             local_crops (L*B, 3, h, w), masks (2B, N) bool, mask_index (2B, M), prototypes (K, D)).
    The teacher is the same network under no_grad on the unmasked global crops. In real
    training it is an EMA copy of the student: same graph, same cost, only other weights.
    The centers are the batch means of the teacher logits, the quantity that DINO's EMA center
    averages over steps (a step with no state stays a function of the batch alone).
    """
    global_crops, local_crops, masks, mask_index, prototypes = batch
    n_global = 2
    with torch.no_grad():
        teacher = model(global_crops)
    student_global = model(global_crops, masks)
    student_local = model(local_crops, **(local_kwargs or {}))
    n_prefix = teacher.shape[1] - masks.shape[1]  # CLS + registers

    # DINO: the CLS token of every crop against the teacher's CLS of the other global crops.
    t_cls = prototype_logits(teacher[:, 0], prototypes).unflatten(0, (n_global, -1))
    s_cls = prototype_logits(torch.cat([student_global[:, 0], student_local[:, 0]]), prototypes)
    s_cls = s_cls.unflatten(0, (-1, t_cls.shape[1]))
    loss_dino = dino_loss(s_cls, t_cls, t_cls.mean((0, 1)), student_temp, teacher_temp)

    # iBOT: predict the teacher's patch tokens at the masked positions.
    teacher_patches, student_patches = teacher[:, n_prefix:], student_global[:, n_prefix:]
    t_patch = prototype_logits(gather_patches(teacher_patches, mask_index), prototypes)
    s_patch = prototype_logits(gather_patches(student_patches, mask_index), prototypes)
    loss_ibot = ibot_loss(s_patch, t_patch, t_patch.mean((0, 1)), student_temp, teacher_temp)
    return loss_dino, loss_ibot, student_patches, teacher_patches


def self_distillation_batch(
    n_images: int, global_size: int, local_size: int, n_local: int, patch_size: int,
    dim: int, n_prototypes: int, mask_ratio: float, device: torch.device, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A deterministic batch for `self_distillation_losses` (seeded; random pixels stand in for
    the augmented crops: the graph and the cost are those of real crops)."""
    gen = torch.Generator().manual_seed(0)
    global_crops = torch.randn(2 * n_images, 3, global_size, global_size, generator=gen)
    local_crops = torch.randn(n_local * n_images, 3, local_size, local_size, generator=gen)
    n_patches = (global_size // patch_size) ** 2
    masks, mask_index = random_patch_masks(2 * n_images, n_patches, mask_ratio, gen)
    prototypes = torch.randn(n_prototypes, dim, generator=gen)
    return (global_crops.to(device, dtype), local_crops.to(device, dtype), masks.to(device),
            mask_index.to(device), prototypes.to(device, dtype))
