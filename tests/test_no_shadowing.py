"""Our top-level folders never hide installed packages of the same name (issue #16 defect 11).

Python started in the repository root (a REPL, `python -c`, a notebook, `python -m pytest`) puts
the current directory first on `sys.path`. `kernels/`, `models/` and `passes/` live there (as
`fvcompile.kernels` etc.); they have no `__init__.py`, so an installed `kernels` (Hugging Face's,
which `transformers` imports) still wins. The checks run in fresh interpreters started in the
repository root, as a user's would be.
"""
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "models", "passes")


def run_python(code: str, cwd: Path, pythonpath: Path | None = None) -> dict:
    """Run `code` in a new interpreter (`python -c`, so the cwd is first on sys.path); it prints
    one JSON line last, which is returned."""
    import os

    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fake_installed_packages(folder: Path, names=FOLDERS) -> Path:
    """Packages named like our folders, with what transformers imports from Hugging Face's `kernels`."""
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"class CUDAProperties:\n    pass\n\nWHO = 'installed {name}'\n")
    return folder


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def from_the_repository_root(tmp_path_factory):
    """What one interpreter started in the repository root finds, with packages named `models` and
    `passes` installed, and `kernels`: Hugging Face's, which transformers brings (a stand-in where
    transformers is not installed). It imports them, runs a transformers model if it can, then
    imports our subpackages: one interpreter start for the tests below."""
    site = fake_installed_packages(tmp_path_factory.mktemp("site"),
                                   FOLDERS if not HAS_TRANSFORMERS else ("models", "passes"))
    return run_python(
        "import json, torch, kernels, models, passes\n"
        "from kernels import CUDAProperties\n"
        "found = {'kernels': kernels.__file__, 'top': [getattr(m, 'WHO', None) for m in (kernels, models, passes)]}\n"
        f"if {HAS_TRANSFORMERS}:\n"
        "    from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                      num_attention_heads=2, num_key_value_heads=2)\n"
        "    model = AutoModelForCausalLM.from_config(cfg)\n"
        "    found['logits'] = list(model(torch.tensor([[1, 2, 3]])).logits.shape)\n"
        "import fvcompile.kernels, fvcompile.models.registry, fvcompile.passes.registry\n"
        "from fvcompile.passes import resolve_passes\n"
        "from fvcompile.models import get\n"
        "found['ours'] = [list(m.__path__)[0] for m in (fvcompile.kernels, fvcompile.models, fvcompile.passes)]\n"
        "found['model'] = get('llama-tiny').name\n"
        "print(json.dumps(found))",
        cwd=ROOT, pythonpath=site)


def test_folders_are_not_regular_packages():
    for name in FOLDERS:
        assert not (ROOT / name / "__init__.py").exists(), (
            f"{name}/__init__.py makes {name}/ a regular package, which hides an installed {name!r} "
            f"whenever Python runs in the repository root: put its code in a module of {name}/ "
            "and bind names in fvcompile/_subpackages.py")


def test_installed_packages_win_from_the_repository_root(from_the_repository_root):
    found = from_the_repository_root
    kernels_installed = "installed kernels" if not HAS_TRANSFORMERS else None  # Hugging Face's has no WHO
    assert found["top"] == [kernels_installed, "installed models", "installed passes"]
    assert Path(found["kernels"]).parent != ROOT / "kernels", found  # an installed package, not our folder
    assert found["ours"] == [str(ROOT / name) for name in FOLDERS]
    assert found["model"] == "llama-tiny"


def test_package_names_and_ops_as_their_init_gave_them():
    """What the folders' __init__.py held: the registry names, and every op registered."""
    import torch

    import fvcompile.kernels
    import fvcompile.models
    import fvcompile.passes
    from fvcompile.models import registry as models_registry
    from fvcompile.passes import registry as passes_registry

    assert fvcompile.passes.resolve_passes is passes_registry.resolve_passes
    assert fvcompile.passes.KNOWN_PASSES is passes_registry.KNOWN_PASSES
    assert fvcompile.models.get is models_registry.get
    kernel_modules = {p.stem for p in (ROOT / "kernels").glob("*.py")}
    assert kernel_modules and all(f"fvcompile.kernels.{m}" in sys.modules for m in kernel_modules)
    assert hasattr(torch.ops.fvcompile, "sparse24_mm")


@pytest.mark.skipif(not HAS_TRANSFORMERS,
                    reason="transformers not installed (pip install transformers: it brings Hugging Face's kernels)")
def test_transformers_models_from_the_repository_root(from_the_repository_root):
    found = from_the_repository_root
    assert Path(found["kernels"]).parent != ROOT / "kernels", found  # Hugging Face's, not our folder
    assert found["logits"] == [1, 3, 64]


def test_wheel_installs_the_folders_under_fvcompile_only(tmp_path):
    """A non-editable install: the wheel holds fvcompile/kernels/... and no top-level folder, and
    fvcompile.kernels etc. import from it with our folders nowhere on sys.path."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here: the wheel cannot be built without a download")
    source = tmp_path / "src"  # a copy: building in the checkout would write build/ there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    for name in ("fvcompile", *FOLDERS):
        for path in (ROOT / name).rglob("*.py"):
            target = source / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(source), "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("fvcompile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert not tops & set(FOLDERS), sorted(tops)
    assert all(f"fvcompile/{name}/registry.py" in names for name in ("models", "passes"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # what pip install does with a pure wheel
    found = run_python(
        "import json, fvcompile.kernels, fvcompile.models, fvcompile.passes\n"
        "from fvcompile.passes import resolve_passes\n"
        "print(json.dumps([list(m.__path__)[0] for m in (fvcompile, fvcompile.kernels, fvcompile.models,\n"
        "                                                  fvcompile.passes)]))",
        cwd=tmp_path, pythonpath=tmp_path / "site")
    installed = tmp_path / "site" / "fvcompile"
    assert found == [str(installed), *(str(installed / name) for name in FOLDERS)]
