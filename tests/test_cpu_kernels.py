"""The fused CPU kernels (msdd.models.cpu_kernels): attention with the flash kernel's precision in bf16 and
float32, SwiGLU's gate, both used by CPU decodes on the optimised path only, and a clear fallback where they cannot
be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msdd.models import cpu_kernels
from msdd.models.layers import RopeCache, apply_rope, unoptimised
from msdd.tokenizer import Tokenizer

from conftest import tiny_config

needs_kernel = pytest.mark.skipif(
    not (cpu_kernels.cpu_supported() and cpu_kernels.library() is not None),
    reason="the fused kernels need an x86 CPU with AVX512-BF16 and a C++ compiler with ninja")


def _qkv(b, h, n, d, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, h, n, d, generator=g) * s).to(dtype) for s in (1.5, 1.5, 1.0)]


def _sdpa(q, k, v):
    b, h, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 37, 70, 200])
@pytest.mark.parametrize("d", [32, 64])
def test_attention_has_the_flash_kernels_precision(n, d):
    q, k, v = _qkv(2, 3, n, d)
    exact, flash = _sdpa(q.double(), k.double(), v.double()), _sdpa(q, k, v).double()
    fused = cpu_kernels.attention(q, k, v)
    assert fused.shape == (2, n, 3 * d) and fused.dtype == torch.bfloat16
    err, flash_err = (fused.double() - exact).abs(), (flash - exact).abs()
    assert err.max() <= 0.02  # bf16 rounding of outputs of magnitude < 2
    assert err.mean() <= 1.25 * flash_err.mean() + 1e-4
    # strided views (keys and values read through a transpose) give the same result
    kt, vt = k.transpose(2, 3).contiguous().transpose(2, 3), v.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(cpu_kernels.attention(q, kt, vt), fused)


@needs_kernel
@pytest.mark.parametrize("n", [128, 203])
@pytest.mark.parametrize("d", [32, 64])
def test_attention_in_float32_is_float32_attention(n, d):
    q, k, v = _qkv(2, 3, n, d, torch.float32)
    fused = cpu_kernels.attention(q, k, v)
    assert fused.shape == (2, n, 3 * d) and fused.dtype == torch.float32
    assert (fused.double() - _sdpa(q.double(), k.double(), v.double())).abs().max() <= 1e-5


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_applies_rope_first(dtype):
    # a 12 x 12 image grid and 16 context tokens: 160 tokens, head dim 64, as in a paper decoder's stage
    rope = RopeCache(full_grid=24, num_context=16, head_dim=64, context_pos="cross_both")(12, torch.device("cpu"))
    q, k, v = _qkv(2, 3, 160, 64, dtype)
    fused = cpu_kernels.attention(q, k, v, rope)
    q64, k64 = (apply_rope(x.double(), *(t.double() for t in rope)) for x in (q, k))
    exact = _sdpa(q64, k64, v.double())
    err = (fused.double() - exact).abs().max()
    assert err <= (1e-5 if dtype == torch.float32 else 0.02)
    assert (fused.double() - _sdpa(q.double(), k.double(), v.double())).abs().max() > 100 * err  # RoPE did act


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_kernel_is_silu_times_gate(dtype):
    h = (torch.randn(3, 7, 2 * 48, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    a, b = h.double().chunk(2, dim=-1)
    exact = F.silu(a) * b
    fused = cpu_kernels.swiglu(h)
    assert fused.shape == (3, 7, 48) and fused.dtype == dtype
    tol = 2e-7 if dtype == torch.float32 else 2 ** -8  # float32 exp and division; one bf16 rounding
    assert ((fused.double() - exact).abs() <= tol * exact.abs() + 1e-6).all()
    assert torch.equal(cpu_kernels.swiglu(h.transpose(0, 1).contiguous().transpose(0, 1)), fused)  # strided input
    assert cpu_kernels.swiglu(h[..., :80]) is None  # hidden 40: not a multiple of 16


def test_attention_applies_only_to_what_it_computes():
    q, k, v = _qkv(1, 2, 10, 32)
    assert cpu_kernels.attention_applies(q, k, v)
    assert not cpu_kernels.attention_applies(q.float(), k.float(), v.float())  # float32 under 128 tokens: PyTorch's
    assert cpu_kernels.attention_applies(*_qkv(1, 2, 128, 32, torch.float32))
    assert not cpu_kernels.attention_applies(q.half(), k.half(), v.half())
    q16, k16, v16 = _qkv(1, 2, 10, 16)
    assert not cpu_kernels.attention_applies(q16, k16, v16)  # head dim not a multiple of 32
    assert cpu_kernels.attention(q16, k16, v16) is None


@needs_kernel
def test_decode_runs_the_fused_kernels_on_the_optimised_path_only(monkeypatch):
    # width 64 with 2 heads: head dim 32, the smallest the kernel takes (the shipped tiny-64 has 32 too)
    tok = Tokenizer(tiny_config("model.decoder.width=64", "model.decoder.heads=2").model).eval()
    with torch.no_grad():  # every weight random: adaLN-zero would make the blocks the identity
        for p in tok.parameters():
            p.normal_(0, 0.05)
    z = torch.randn(2, *tok.config.latent_shape, generator=torch.Generator().manual_seed(1))
    calls = []
    real = cpu_kernels.attention

    def counted(q, k, v, rope=None):
        out = real(q, k, v, rope)
        calls.append(out is not None)
        return out

    gates = []
    real_swiglu = cpu_kernels.swiglu

    def counted_swiglu(h):
        gates.append(h.shape)
        return real_swiglu(h)

    monkeypatch.setattr(cpu_kernels, "attention", counted)
    monkeypatch.setattr(cpu_kernels, "swiglu", counted_swiglu)
    fast = tok.decode(z, steps=(1, 1, 1), bf16=True)
    assert calls and all(calls) and gates
    n_calls, n_gates = len(calls), len(gates)
    with unoptimised():
        eager = tok.decode(z, steps=(1, 1, 1), bf16=True)
    assert (len(calls), len(gates)) == (n_calls, n_gates)  # the eager path (student-eager) keeps PyTorch's ops
    monkeypatch.setattr(cpu_kernels, "attention", lambda *args: None)
    flash = tok.decode(z, steps=(1, 1, 1), bf16=True)
    assert 0 < (fast - flash).abs().max() <= 0.02  # the same attention, rounded differently
    assert (fast - eager).abs().max() <= 0.02
    # float32 (the tiny model's attention has fewer tokens than the kernel's float32 threshold: lowered here;
    # the SwiGLU kernel runs as well)
    monkeypatch.setattr(cpu_kernels, "attention", counted)
    monkeypatch.setattr(cpu_kernels, "MIN_TOKENS_FP32", 0)
    calls.clear()
    fast = tok.decode(z, steps=(1, 1, 1))
    assert calls and all(calls)
    with unoptimised():
        assert (fast - tok.decode(z, steps=(1, 1, 1))).abs().max() <= 1e-5


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "cpu_supported", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cpu_kernels.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*Ninja is required.*MSDD_CPU_KERNELS=0"):
            assert cpu_kernels.library() is None
        assert cpu_kernels.attention(*_qkv(1, 1, 4, 32)) is None
        monkeypatch.setenv("MSDD_CPU_KERNELS", "0")
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.library() is None  # switched off: no build, no warning
    finally:
        cpu_kernels.library.cache_clear()
