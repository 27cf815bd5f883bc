import pytest
import torch
import torch.nn.functional as F

from fvcompile.models.deit import DeiT, distillation_loss, teacher_logits
from fvcompile.models.deit_specs import CONFIGS, PARAMS
from fvcompile.models.registry import count_parameters, get

TINY = ["deit-tiny-test", "deit-tiny-distilled-test"]


def build(name):
    torch.manual_seed(0)
    spec = get(name)
    return spec, spec.build()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_paper_parameter_counts(name):
    assert count_parameters(get(name)) == PARAMS[name]


def test_every_config_is_registered_and_tiny_ones_are_marked():
    for name in CONFIGS:
        assert get(name).tiny == (name in TINY)


@pytest.mark.parametrize("name", TINY)
def test_tiny_train_step_forward_backward(name):
    spec, model = build(name)
    cfg = spec.extra["config"]
    model.train()
    batch = spec.train_batch(model, 3)
    assert batch[0].shape == (3, 3, 32, 32)
    if cfg.distilled:
        assert batch[2].shape == (3, cfg.num_classes)
    loss = spec.train_step(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # Deterministic given the batch, and the batch is deterministic.
    again = spec.train_step(model, spec.train_batch(model, 3))
    torch.testing.assert_close(again, loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_output_shapes_per_mode(name):
    spec, model = build(name)
    (images,) = spec.example_inputs(model, 2)
    out = model.train()(images)
    if spec.extra["config"].distilled:
        assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 10), (2, 10)]
    else:
        assert out.shape == (2, 10)
    assert model.eval()(images).shape == (2, 10)


def test_eval_output_is_mean_of_heads():
    _, model = build("deit-tiny-distilled-test")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_logits, dist_logits = model.train()(images)  # no dropout: modes differ only here
        eval_logits = model.eval()(images)
    assert not torch.allclose(cls_logits, dist_logits)
    torch.testing.assert_close(eval_logits, (cls_logits + dist_logits) / 2)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("training", [True, False])
def test_no_graph_break(name, training):
    spec, model = build(name)
    model.train(training)
    (images,) = spec.example_inputs(model, 2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images))


@pytest.mark.parametrize("distillation", ["none", "soft", "hard"])
def test_each_distillation_mode_gives_finite_loss_with_gradients(distillation):
    spec, model = build("deit-tiny-distilled-test")
    images, labels, teacher = spec.train_batch(model.train(), 4)
    loss = distillation_loss(model(images), labels, teacher, distillation=distillation, tau=2.0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    head_grad = model.head.weight.grad
    assert head_grad is not None and torch.isfinite(head_grad).all() and head_grad.abs().sum() > 0
    dist_grad = model.head_dist.weight.grad
    if distillation == "none":  # only the class head learns the labels
        assert dist_grad is None
    else:
        assert torch.isfinite(dist_grad).all() and dist_grad.abs().sum() > 0


def test_distillation_losses_match_the_paper_formulas():
    gen = torch.Generator().manual_seed(0)
    cls_logits, dist_logits, teacher = torch.randn(3, 5, 7, generator=gen)
    labels = torch.tensor([0, 3, 6, 1, 2])
    alpha, tau = 0.3, 3.0
    ce = F.cross_entropy(cls_logits, labels)
    # Soft (eq. 2): KL(teacher || student) at temperature tau, per sample, times tau^2.
    p_t = F.softmax(teacher / tau, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(dist_logits / tau, -1))).sum(-1).mean()
    soft = distillation_loss((cls_logits, dist_logits), labels, teacher, "soft", alpha, tau)
    torch.testing.assert_close(soft, (1 - alpha) * ce + alpha * tau**2 * kl)
    # Hard (eq. 3): cross-entropy against the teacher's decision.
    hard = distillation_loss((cls_logits, dist_logits), labels, teacher, "hard", alpha, tau)
    hard_ref = (1 - alpha) * ce + alpha * F.cross_entropy(dist_logits, teacher.argmax(-1))
    torch.testing.assert_close(hard, hard_ref)
    # None: the class head's cross-entropy; a plain model's single head serves both roles.
    torch.testing.assert_close(distillation_loss(cls_logits, labels, distillation="none"), ce)
    with pytest.raises(ValueError):
        distillation_loss(cls_logits, labels, distillation="soft")


def test_teacher_is_a_fixed_function_of_the_images():
    images = torch.randn(2, 3, 32, 32)
    first = teacher_logits(images, 10)
    assert first.shape == (2, 10) and not first.requires_grad
    torch.testing.assert_close(teacher_logits(images, 10), first, rtol=0, atol=0)
    assert not torch.allclose(teacher_logits(images, 10, seed=1), first)


def test_build_honours_ambient_device():
    with torch.device("meta"):
        model = DeiT(CONFIGS["deit-base-distilled"])
    assert all(p.is_meta for p in model.parameters())
    assert model.pos_embed.shape == (1, 198, 768)
    assert DeiT(CONFIGS["deit-tiny-test"]).pos_embed.shape == (1, 17, 32)
