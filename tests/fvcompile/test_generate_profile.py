"""The decode-time characterization (fvcompile/generation/profile.py): a real profile of the eager
decode step, and the classification of compiled kernels and GPU events on recorded stand-ins."""
from types import SimpleNamespace

import pytest
import torch

from fvcompile.generation import profile
from fvcompile.generation.steps import decode_step
from fvcompile.models import get


def tiny():
    torch.manual_seed(0)
    return get("llama-tiny").build().eval()


def test_eager_decode_profile_splits_every_class_and_sums_to_the_step(tmp_path):
    model = tiny()
    cache = model.new_kv_cache(1, 64)
    result = profile.profile_decode(model, decode_step, cache, prompt_len=8, label="eager", steps=4)
    assert all(result.kernels_s[kind] > 0 for kind in profile.KERNEL_CLASSES), result.kernels_s
    assert result.launch_s == 0 and result.device_idle_s is None  # CPU
    assert sum(result.parts().values()) == pytest.approx(result.profiled_step_s, rel=1e-6)
    assert 0 < result.step_s and result.host_s > 0

    text = profile.markdown([result])
    assert "| FFN linears |" in text and "n/a (CPU)" in text
    profile.write_plot([result, result], tmp_path / "decode.png")
    assert (tmp_path / "decode.png").stat().st_size > 0


def event(name, parent=None, shapes=(), cpu_us=0.0, device_us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, input_shapes=list(shapes), self_cpu_time_total=cpu_us,
                           self_device_time_total=device_us)


def test_linears_are_told_apart_by_the_models_weight_shapes():
    ffn, other = profile.linear_shapes(tiny())
    assert (128, 64) in ffn and (64, 128) in ffn  # SwiGLU's w1/w3 and w2
    assert (64, 64) in other and (256, 64) in other and not ffn & other  # wq/wo, the output head

    wrapper = event("## Call CompiledFxGraph abc ##", event("Torch-Compiled Region: 0/0"))
    assert profile.classify(event("aten::mm", wrapper, [[1, 64], [64, 128]]), ffn) == "FFN linears"
    assert profile.classify(event("aten::mm", wrapper, [[1, 64], [64, 64]]), ffn) == "other linears"
    linear = event("aten::linear", None, [[1, 1, 128], [64, 128]])
    assert profile.classify(event("aten::mm", event("aten::matmul", linear), [[1, 128], [128, 64]]), ffn) == "FFN linears"
    fused_attention = "graph_0_cpp_fused__scaled_dot_product_flash_attention_for_cpu_index_copy_2"
    assert profile.classify(event(fused_attention, wrapper), ffn) == "attention"
    assert profile.classify(event("aten::bmm", event("aten::_scaled_dot_product_attention_math")), ffn) == "attention"
    assert profile.classify(event("graph_0_cpp_fused_add_mean_mul_pow_rsqrt_0", wrapper), ffn) == "other kernels"
    assert profile.classify(wrapper, ffn) is None and profile.classify(event("TorchDynamo Cache Lookup"), ffn) is None


def test_gpu_breakdown_counts_device_time_launches_and_idle():
    ffn = {(128, 64)}
    mm = event("aten::mm", None, [[1, 64], [64, 128]], cpu_us=30, device_us=400)
    events = [mm, event("cudaLaunchKernel", mm, cpu_us=100), event("triton_poi_fused_add_0", None, device_us=200),
              event("## Call CompiledFxGraph x ##", cpu_us=500)]
    parts = profile.breakdown(events, ffn, "cuda", wall_s=2 * 1.5e-3, steps=2)
    assert parts["kernels_s"]["FFN linears"] == pytest.approx(200e-6)  # per step
    assert parts["kernels_s"]["other kernels"] == pytest.approx(100e-6)
    assert parts["device_idle_s"] == pytest.approx(1.5e-3 - 300e-6)
    assert parts["launch_s"] == pytest.approx(50e-6)
    assert parts["host_s"] == pytest.approx(1.5e-3 - 300e-6 - 50e-6)
