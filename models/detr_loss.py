"""DETR's set prediction loss: Hungarian matching of queries to targets, then the losses.

Targets are a list, one dict per image: `labels` (n,) int64 class ids and `boxes` (n, 4)
as (cx, cy, w, h) in [0, 1]. The matching is a combinatorial step with no gradient: the cost
matrix is computed under no_grad, moved to the CPU once, and solved per image with
`scipy.optimize.linear_sum_assignment`. It stays outside the compiled model (the train step
calls `model(...)`, then `hungarian_match`, then `set_loss`).

Weights follow the paper: matching cost = 1 * class + 5 * L1 + 2 * GIoU; loss = 1 * CE (the
no-object class weighted 0.1) + 5 * L1 + 2 * GIoU, summed over the final and every auxiliary
(intermediate decoder layer) prediction, each matched on its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 1.0, 5.0, 2.0
NO_OBJECT_WEIGHT = 0.1

Targets = list[dict[str, Tensor]]
# One (query indices, target indices) pair per image, for each decoder layer.
Matching = list[list[tuple[Tensor, Tensor]]]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of (x0, y0, x1, y1) boxes, broadcasting over leading dims: pass a[:, None] and
    b[None] for the pairwise matrix. IoU minus the share of the smallest enclosing box that
    the union leaves empty; in [-1, 1], and 1 only for identical boxes."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter_wh = torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])
    inter_wh = inter_wh.clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area_a + area_b - inter
    hull_wh = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / union - (hull - union) / hull


def matching_cost(logits: Tensor, boxes: Tensor, targets: Targets) -> Tensor:
    """logits (..., Q, C+1), boxes (..., Q, 4) -> cost (..., Q, N) against the N targets of
    the whole batch concatenated (each image later keeps only its own columns)."""
    tgt_labels = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.dtype)
    # The class cost is -p(target class): a constant stand-in for the log-likelihood.
    cost_class = -logits.softmax(-1)[..., tgt_labels]
    cost_l1 = (boxes[..., :, None, :] - tgt_boxes).abs().sum(-1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes)[..., :, None, :],
                                     box_cxcywh_to_xyxy(tgt_boxes))
    return CLASS_WEIGHT * cost_class + L1_WEIGHT * cost_l1 + GIOU_WEIGHT * cost_giou


@torch.compiler.disable  # scipy on CPU tensors: keep it out of any compiled region
@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, targets: Targets) -> Matching:
    """logits (L, B, Q, C+1), boxes (L, B, Q, 4) -> for each layer, for each image, the
    (query, target) index pairs of the assignment with the lowest total cost."""
    cost = matching_cost(logits.float(), boxes.float(), targets).cpu()  # (L, B, Q, N), one sync
    sizes = [len(t["labels"]) for t in targets]
    matching = []
    for layer_cost in cost:
        per_image = []
        for b, image_cost in enumerate(layer_cost.split(sizes, dim=-1)):
            queries, objects = linear_sum_assignment(image_cost[b].numpy())
            per_image.append((torch.as_tensor(queries, dtype=torch.int64),
                              torch.as_tensor(objects, dtype=torch.int64)))
        matching.append(per_image)
    return matching


def layer_loss(logits: Tensor, boxes: Tensor, targets: Targets,
               matching: list[tuple[Tensor, Tensor]], num_boxes: float) -> Tensor:
    """Loss of one decoder layer's predictions, logits (B, Q, C+1) and boxes (B, Q, 4)."""
    device, no_object = logits.device, logits.shape[-1] - 1
    image_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matching)]).to(device)
    query_idx = torch.cat([q for q, _ in matching]).to(device)
    matched_labels = torch.cat([t["labels"][o.to(device)] for t, (_, o) in zip(targets, matching)])
    matched_boxes = torch.cat([t["boxes"][o.to(device)] for t, (_, o) in zip(targets, matching)])

    # Every unmatched query should predict "no object", down-weighted since most queries are.
    target_classes = torch.full(logits.shape[:2], no_object, dtype=torch.int64, device=device)
    target_classes[image_idx, query_idx] = matched_labels
    class_weights = torch.ones(no_object + 1, device=device)
    class_weights[no_object] = NO_OBJECT_WEIGHT
    loss_ce = F.cross_entropy(logits.flatten(0, 1).float(), target_classes.flatten(), class_weights)

    pred_boxes = boxes[image_idx, query_idx].float()
    loss_l1 = F.l1_loss(pred_boxes, matched_boxes, reduction="sum") / num_boxes
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(matched_boxes))
    loss_giou = (1 - giou).sum() / num_boxes
    return CLASS_WEIGHT * loss_ce + L1_WEIGHT * loss_l1 + GIOU_WEIGHT * loss_giou


def set_loss(logits: Tensor, boxes: Tensor, targets: Targets, matching: Matching) -> Tensor:
    """Sum of `layer_loss` over the stacked (L, ...) final and auxiliary predictions."""
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    return sum(layer_loss(logits[i], boxes[i], targets, matching[i], num_boxes)
               for i in range(logits.shape[0]))


def detr_train_step(model, images: Tensor, mask: Tensor, targets: Targets) -> Tensor:
    """Forward (the compile target), matching (eager, CPU), set loss."""
    logits, boxes = model(images, mask)
    matching = hungarian_match(logits, boxes, targets)
    return set_loss(logits, boxes, targets, matching)
