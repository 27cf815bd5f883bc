"""Every registry entry: parameter counts on meta, and fvcompile parity on the tiny configs."""
import json

import pytest
import torch

import fvcompile
from fvcompile.models import all_specs, count_parameters

SPECS = all_specs()
TINY = [s for s in SPECS if s.tiny]
FAMILIES = sorted({s.family for s in SPECS})
# One tiny config per family for the real-Inductor parity run (a cold compile is slow).
ONE_PER_FAMILY = [next(s for s in TINY if s.family == f) for f in FAMILIES]


@pytest.mark.parametrize("spec", [s for s in SPECS if s.params], ids=lambda s: s.name)
def test_paper_parameter_count(spec):
    assert count_parameters(spec) == spec.params


def test_every_family_has_a_tiny_config():
    assert {s.family for s in TINY} == set(FAMILIES)


def _forward_parity(spec, **optimize_kwargs):
    torch.manual_seed(0)
    model = spec.build().eval()
    inputs = spec.example_inputs(model, 2)
    with torch.no_grad():
        expected = model(*inputs)
        actual = fvcompile.optimize(model, **optimize_kwargs)(*inputs)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", TINY, ids=lambda s: s.name)
def test_tiny_codegen_false_matches_eager_and_trains(spec, tmp_path):
    torch._dynamo.reset()
    _forward_parity(spec, codegen=False)
    torch.manual_seed(0)
    model = spec.build()
    # The training step as `fvcompile inspect` runs it: with a dump of every graph.
    optimized = fvcompile.optimize(model, codegen=False, dump_dir=tmp_path)
    loss = spec.train_step(optimized, spec.train_batch(model, 2))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for p in model.parameters())
    index = json.loads((tmp_path / "index.json").read_text())
    assert any(f.endswith("dynamo.py") for files in index["graphs"].values() for f in files)


@pytest.mark.inductor
@pytest.mark.parametrize("spec", ONE_PER_FAMILY, ids=lambda s: s.family)
def test_inductor_forward_parity_one_per_family(spec):
    torch._dynamo.reset()
    _forward_parity(spec)


def test_model_files_are_plain_modules():
    """DESIGN.md: model files import no fvcompile (only the registry glue does)."""
    import ast
    from pathlib import Path

    import fvcompile.models.registry

    glue = {"registry.py", "families.py", "gguf_loader.py"}
    for path in Path(fvcompile.models.registry.__file__).parent.glob("*.py"):
        if path.name in glue or path.name.endswith("_specs.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("fvcompile"), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("fvcompile") for a in node.names), path.name


@pytest.mark.parametrize("spec", TINY, ids=lambda s: s.name)
def test_tiny_forward_in_bfloat16(spec):
    """Example inputs follow the model's dtype (what `fvcompile bench --dtype bfloat16` runs)."""
    if spec.family == "htdemucs":
        pytest.skip("torch.stft has no bfloat16 kernel on CPU")
    torch.manual_seed(0)
    model = spec.build().to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(*spec.example_inputs(model, 2))
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    assert leaves and all(t.isfinite().all() for t in leaves if t.is_floating_point())
