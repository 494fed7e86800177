"""The fused CPU kernels (msdd.models.cpu_kernels): attention with the flash kernel's precision in bf16 and
float32 (alone and an MMDiT block's joint attention), adaLN, SwiGLU's gate, linear layers (with the gate fused), all
used by CPU decodes on the optimised path only, and a clear fallback where they cannot be built."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from msdd.models import cpu_kernels, fused_blocks, layers
from msdd.models.layers import unoptimised
from msdd.models.rope import RopeCache, apply_rope
from msdd.tokenizer import Tokenizer

from conftest import tiny_config

needs_kernel = pytest.mark.skipif(
    not (cpu_kernels.cpu_supported() and cpu_kernels.library() is not None),
    reason="the fused kernels need an x86 CPU with AVX512-BF16 and VNNI and a C++ compiler with ninja")


def _qkv(b, h, n, d, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, h, n, d, generator=g) * s).to(dtype) for s in (1.5, 1.5, 1.0)]


def _sdpa(q, k, v):
    b, h, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 37, 70, 200])
@pytest.mark.parametrize("d", [32, 64, 128])
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
@pytest.mark.parametrize("d", [32, 64, 128])  # 32 and 64 words per key have their own compiled products, 128 not
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


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 6, 13])
@pytest.mark.parametrize("swiglu", [False, True])
def test_linear_kernel_is_the_layer_in_float32_sums(dtype, rows, swiglu):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 96, generator=g).to(dtype)  # every row count: whole tiles of 6 rows, and the rest
    w, b = (torch.randn(256, 96, generator=g) * 0.2).to(dtype), torch.randn(256, generator=g).to(dtype)
    exact = x.double() @ w.double().t() + b.double()
    if swiglu:
        a, gate = exact.chunk(2, dim=-1)
        exact = F.silu(a) * gate
    packed = cpu_kernels.pack_linear(w, b, swiglu)
    out = cpu_kernels.linear(x, *packed, swiglu)
    assert out.shape == exact.shape and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # float32 sums; one bf16 rounding
    assert ((out.double() - exact).abs() <= tol * exact.abs() + tol * exact.abs().max()).all()
    no_bias = cpu_kernels.linear(x, *cpu_kernels.pack_linear(w, None, swiglu), swiglu)
    exact = x.double() @ w.double().t()
    if swiglu:
        a, gate = exact.chunk(2, dim=-1)
        exact = F.silu(a) * gate
    assert ((no_bias.double() - exact).abs() <= tol * exact.abs() + tol * exact.abs().max()).all()
    assert cpu_kernels.linear(x[:, :0], *packed, swiglu).shape == (2, 0, exact.shape[-1])  # no rows
    assert cpu_kernels.pack_linear(w[:192], b[:192], swiglu=True) is None  # N not a multiple of 128
    assert cpu_kernels.pack_linear(w[:200], b[:200]) is None  # N not a multiple of 64


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 13])
def test_linear_kernels_add_the_gated_residual_in_their_epilogue(dtype, rows):
    """residual + gate * layer(x) in the tile's epilogue, float32 sums rounded once: msdd's linear kernel and its int8
    kernel (against the int8 layer's reference arithmetic)."""
    from msdd.models.precision import Int8Linear

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 96, generator=g).to(dtype)
    w, b = (torch.randn(128, 96, generator=g) * 0.2).to(dtype), torch.randn(128, generator=g).to(dtype)
    residual, gate = torch.randn(2, rows, 128, generator=g).to(dtype), torch.randn(1, 128, generator=g).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # float32 sums; one bf16 rounding

    def close(out, layer_out):
        exact = residual.double() + gate.double() * layer_out
        assert out.shape == exact.shape and out.dtype == dtype
        assert ((out.double() - exact).abs() <= tol * exact.abs() + tol * exact.abs().max()).all()

    packed = cpu_kernels.pack_linear(w, b)
    close(cpu_kernels.linear(x, *packed, False, residual, gate), x.double() @ w.double().t() + b.double())
    layer = torch.nn.Linear(96, 128)
    with torch.no_grad():
        layer.weight.copy_(w.float()), layer.bias.copy_(b.float())
    q = Int8Linear(layer)
    with torch.inference_mode():
        close(q.panel_forward(x, residual=residual, gate=gate), q.reference(x).double())
        assert q.panel_forward(x, residual=residual.double(), gate=gate) is None  # another dtype: the caller's ops
    for bad in [dict(residual=residual), dict(residual=residual[:, :, :64], gate=gate), dict(swiglu=True,
                residual=residual, gate=gate), dict(residual=residual.double(), gate=gate)]:
        with pytest.raises(RuntimeError, match="residual"):
            cpu_kernels.linear(x, *packed, bad.pop("swiglu", False), bad.pop("residual"), bad.get("gate"))
    # the gate in bf16 or float32 alike (widened to float32 by the kernel), any other dtype refused
    close(cpu_kernels.linear(x, *packed, False, residual, gate.float()), x.double() @ w.double().t() + b.double())
    with pytest.raises(RuntimeError, match="bf16 or float32"):
        cpu_kernels.linear(x, *packed, False, residual, gate.double())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_layer_packs_for_the_kernel_once_per_version(dtype):
    import copy

    from msdd.models.layers import Linear, SwiGLU

    layer = Linear(64, 128).to(dtype)
    x = torch.randn(2, 7, 64)

    def both(module):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fast = module(x)
            with unoptimised():
                return fast, module(x)  # F.linear (under autocast for bf16)

    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    fast, ref = both(layer)
    assert layer._panels is not None and layer._panels[1] is not None and fast.dtype == ref.dtype == dtype
    assert (fast.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    packed = layer._panels
    both(layer)
    assert layer._panels is packed  # kept while the weight and bias are unchanged
    with torch.no_grad():
        layer.bias.add_(1.0)  # an in-place update of the bias alone: repacked
    fast2, ref2 = both(layer)
    assert layer._panels is not packed and (fast2.float() - ref2.float()).abs().max() <= tol * ref2.float().abs().max()
    assert not torch.allclose(fast2.float(), fast.float())
    assert set(layer.state_dict()) == {"weight", "bias"} and copy.deepcopy(layer)._panels is None
    mlp = SwiGLU(64, 64).to(dtype)  # the gate computed with the first layer
    fast, ref = both(mlp)
    assert mlp.w12._panels[0][0] is True  # packed for the gate
    assert (fast.float() - ref.float()).abs().max() <= 2 * tol * ref.float().abs().max()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 6, 13])
@pytest.mark.parametrize("swiglu", [False, True])
def test_int8_linear_kernel_is_its_reference(dtype, rows, swiglu):
    """msdd's int8 layer: the VNNI kernel equals the same arithmetic in PyTorch ops (per-row quantised inputs,
    int8 weights per output feature, exact integer sums scaled back in float32), and both are close to the float
    layer (int8's rounding: under 2% of the outputs' range here)."""
    from msdd.models.precision import Int8Linear

    g = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(100, 256)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(256, 100, generator=g) * 0.2)
        layer.weight[3] = 0  # a feature of zeros: scale 0
    x = torch.randn(2, rows, 100, generator=g).to(dtype)  # K = 100: whole vectors of 16 inputs, then 4
    x[0, 0] = 0  # a row of zeros
    q = Int8Linear(layer)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127 and q.scale[3] == 0
    with torch.inference_mode():
        ref = q.reference(x).double()  # same arithmetic in PyTorch ops: float32 sums of the integer products
        float_out = layer(x.float()).double()
        out = q.panel_forward(x, swiglu) if swiglu else q(x)
    if swiglu:
        a, gate = ref.chunk(2, dim=-1)
        ref = F.silu(a) * gate
        a, gate = float_out.chunk(2, dim=-1)
        float_out = F.silu(a) * gate
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # float32 rounding; one bf16 rounding
    assert ((out.double() - ref).abs() <= tol * ref.abs() + tol * ref.abs().max()).all()
    assert (out.double() - float_out).abs().max() < 0.02 * float_out.abs().max()
    with torch.inference_mode():
        assert q(x[:, :0]).shape == (2, 0, 256)  # no rows
        assert Int8Linear(torch.nn.Linear(100, 200)).panel_forward(x) is None  # N not a multiple of 64
    assert q.panel_forward(x) is None  # gradients on: the reference path


@needs_kernel
def test_int8_decode_runs_msdds_int8_kernel_in_float32_and_bf16():
    from msdd.models.precision import Int8Linear

    tok = Tokenizer(tiny_config().model)
    z = torch.randn(2, *tok.config.latent_shape, generator=torch.Generator().manual_seed(0))
    fp32 = tok.decode(z, steps=(1, 1, 1))
    calls = []
    real = Int8Linear.panel_forward

    def counted(self, x, swiglu=False, **gated):
        out = real(self, x, swiglu, **gated)
        calls.append((swiglu, x.dtype, out is not None))
        return out

    Int8Linear.panel_forward = counted
    try:
        int8 = tok.decode(z, steps=(1, 1, 1), int8=True)
        int8_bf16 = tok.decode(z, steps=(1, 1, 1), int8=True, bf16=True)
    finally:
        Int8Linear.panel_forward = real
    # the tiny decoder's MLP first layers fit the kernel (with the gate), its other layers take the reference path
    assert {(swiglu, dtype) for swiglu, dtype, ran in calls if ran} == {(True, torch.float32), (True, torch.bfloat16)}
    copy = tok._copies.of(tok.decoder, "int8-bf16")
    assert copy.patch_embed.weight.dtype == torch.bfloat16 and isinstance(copy.blocks[0].img.mlp.w12, Int8Linear)
    for out in (int8, int8_bf16):
        assert out.dtype == torch.float32 and (out - fp32).abs().max() < 0.1
    # activations scaled per token: an image decodes to the same pixels alone as in its batch (torch.ao's layers,
    # the fallback, scale a whole batch at once)
    seeded = lambda n: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
    for bf16 in (False, True):
        both = tok.decode(z, steps=(1, 1, 1), generator=seeded(2), int8=True, bf16=bf16)
        assert torch.equal(tok.decode(z[:1], steps=(1, 1, 1), generator=seeded(1), int8=True, bf16=bf16), both[:1])


def _layer_norm64(x, w=None, b=None, eps=1e-6):
    return F.layer_norm(x.double(), (x.shape[-1],), None if w is None else w.double(),
                        None if b is None else b.double(), eps)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n0,n1", [(16, 128), (5, 130)])
def test_joint_attention_is_the_blocks_attention(dtype, n0, n1):
    # two streams' qkv projections (B, N_s, 3 W), 3 heads of 64: per-stream q / k LayerNorm, RoPE over the joint
    # sequence (an 8 x 8 image grid padded with context tokens, as in a decoder stage), one attention
    g = torch.Generator().manual_seed(0)
    heads, d = 3, 64
    qkv0, qkv1 = ((torch.randn(2, n, 3 * heads * d, generator=g) * 1.5).to(dtype) for n in (n0, n1))
    norms = [torch.randn(d, generator=g) * s + m for _ in range(2) for s, m in ((0.3, 1.0), (0.2, 0.0))] * 2
    rope = tuple(t[: n0 + n1] for t in RopeCache(16, n1 + 64, d, "cross_both")(8, torch.device("cpu")))
    out0, out1 = torch.ops.msdd_kernels.joint_attention(qkv0, qkv1, heads, norms, 1e-6, *rope)
    assert out0.shape == (2, n0, heads * d) and out1.shape == (2, n1, heads * d) and out0.dtype == dtype

    def split(qkv, i):  # (B, N, 3 W) -> q, k, v (B, heads, N, D) in float64, q and k normalised
        q, k, v = qkv.double().unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4)
        return _layer_norm64(q, *norms[4 * i:4 * i + 2]), _layer_norm64(k, *norms[4 * i + 2:4 * i + 4]), v

    (q0, k0, v0), (q1, k1, v1) = split(qkv0, 0), split(qkv1, 1)
    cos, sin = (t.double() for t in rope)
    q, k = (apply_rope(torch.cat(pair, dim=2), cos, sin) for pair in ((q0, q1), (k0, k1)))
    exact = _sdpa(q, k, torch.cat([v0, v1], dim=2))
    err = (torch.cat([out0, out1], dim=1).double() - exact).abs().max()
    assert err <= (1e-5 if dtype == torch.float32 else 0.03)
    # without norms or RoPE it is plain attention over the concatenated streams
    plain = torch.ops.msdd_kernels.joint_attention(qkv0, qkv1, heads, [], 1e-6)
    qkv = torch.cat([qkv0, qkv1], dim=1).unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4)
    assert torch.equal(torch.cat(plain, dim=1), cpu_kernels.attention(*qkv.unbind(0)))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mod_rows", [1, 2])
def test_adaln_kernels_are_layer_norm_and_modulation(dtype, mod_rows):
    g = torch.Generator().manual_seed(0)
    x, y = ((torch.randn(2, 7, 96, generator=g) * 2 + 0.5).to(dtype) for _ in range(2))
    shift, scale, gate = (torch.randn(mod_rows, 96, generator=g).to(dtype) for _ in range(3))
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # float32 sums; bf16: one rounding of values below 4

    def modulated(v):  # float64 reference
        return _layer_norm64(v) * (1 + scale.double()[:, None]) + shift.double()[:, None]

    out = cpu_kernels.adaln(x, shift, scale, 1e-6)
    assert out.dtype == dtype and ((out.double() - modulated(x)).abs() <= tol * (1 + modulated(x).abs())).all()
    res, out = cpu_kernels.gated_adaln(x, gate, y, shift, scale, 1e-6)
    exact_res = x.double() + gate.double()[:, None] * y.double()
    assert res.dtype == out.dtype == dtype
    assert ((res.double() - exact_res).abs() <= tol * (1 + exact_res.abs())).all()
    assert ((out.double() - modulated(res)).abs() <= tol * (1 + modulated(res).abs())).all()  # of the stored residual
    # the dtypes PyTorch's ops give: bf16 x with float32 modulation -> float32
    if dtype == torch.bfloat16:
        assert cpu_kernels.adaln(x, shift.float(), scale.float(), 1e-6).dtype == torch.float32
        res, out = cpu_kernels.gated_adaln(x, gate, y, shift.float(), scale, 1e-6)
        assert res.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert cpu_kernels.adaln(x[..., :40], shift[:, :40], scale[:, :40], 1e-6) is None  # W not a multiple of 16


def test_attention_applies_only_to_what_it_computes():
    q, k, v = _qkv(1, 2, 10, 32)
    assert cpu_kernels.attention_applies(q, k, v)
    assert not cpu_kernels.attention_applies(q.float(), k.float(), v.float())  # float32 under 128 tokens: PyTorch's
    assert cpu_kernels.attention_applies(*_qkv(1, 2, 128, 32, torch.float32))
    assert not cpu_kernels.attention_applies(q.half(), k.half(), v.half())
    q16, k16, v16 = _qkv(1, 2, 10, 16)
    assert not cpu_kernels.attention_applies(q16, k16, v16)  # head dim not a multiple of 32
    assert cpu_kernels.attention(q16, k16, v16) is None
    assert not cpu_kernels.attention_applies(*_qkv(1, 2, 10, 288))  # head dim above the kernels' 256


KERNELS = ("attention", "joint_attention", "adaln", "gated_adaln", "swiglu", "linear", "blocks")


def _count_kernel_calls(monkeypatch) -> dict[str, list[bool]]:
    """Wrap every kernel entry point of msdd.models.cpu_kernels; each call appends whether the kernel ran."""
    calls = {name: [] for name in KERNELS}
    for name in KERNELS:
        def counted(*args, _name=name, _real=getattr(cpu_kernels, name)):
            out = _real(*args)
            calls[_name].append(out is not None)
            return out
        monkeypatch.setattr(cpu_kernels, name, counted)
    return calls


def _kernel_sized_tokenizer(batch: int, seed: int, width: int = 64) -> tuple[Tokenizer, torch.Tensor]:
    """The tiny decoder at width 64 with 2 heads (head dim 32, the smallest the kernels take; the shipped tiny-64 has
    32 too), or `width` / 2, every weight random (adaLN-zero would make the blocks the identity), and latents for
    `batch` images."""
    tok = Tokenizer(tiny_config(f"model.decoder.width={width}", "model.decoder.heads=2").model).eval()
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_(0, 0.05)
    return tok, torch.randn(batch, *tok.config.latent_shape, generator=torch.Generator().manual_seed(seed))


@needs_kernel
def test_decode_runs_the_fused_kernels_on_the_optimised_path_only(monkeypatch):
    tok, z = _kernel_sized_tokenizer(2, seed=1)
    calls = _count_kernel_calls(monkeypatch)
    fused = tok.decode(z, steps=(1, 1, 1), bf16=True)
    assert calls["blocks"] == [True] * 3  # one call per pass: every block in the `blocks` op
    assert not calls["joint_attention"] and calls["linear"] and calls["adaln"]  # the final layer's
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: None)  # block by block: the same kernels one by one
    calls = _count_kernel_calls(monkeypatch)
    gated_adds = []
    monkeypatch.setattr(layers, "gated_add", lambda *args, _real=layers.gated_add: gated_adds.append(1) or _real(*args))
    fast = tok.decode(z, steps=(1, 1, 1), bf16=True)
    assert torch.equal(fast, fused)
    for name in ("joint_attention", "adaln", "linear"):  # the decoder's blocks and final layer
        assert calls[name] and all(calls[name]), name
    assert not calls["swiglu"]  # every MLP's gate ran with its first layer in the linear kernel
    assert not calls["gated_adaln"] and not gated_adds  # every gated residual ran in its layer's epilogue
    counts = {name: len(c) for name, c in calls.items()}
    with unoptimised():
        eager = tok.decode(z, steps=(1, 1, 1), bf16=True)
    assert {name: len(c) for name, c in calls.items()} == counts  # the eager path (student-eager) keeps PyTorch's ops
    assert gated_adds
    assert (fast - eager).abs().max() <= 0.02  # the same arithmetic, rounded differently
    monkeypatch.setattr(cpu_kernels, "joint_attention", lambda *args: None)
    flash = tok.decode(z, steps=(1, 1, 1), bf16=True)  # PyTorch's attention ops, the other kernels still on
    assert 0 < (fast - flash).abs().max() <= 0.02
    # float32 (the tiny model's attention has fewer tokens than the kernel's float32 threshold: lowered here)
    monkeypatch.undo()
    calls = _count_kernel_calls(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "MIN_TOKENS_FP32", 0)
    fused = tok.decode(z, steps=(1, 1, 1))
    assert calls["blocks"] == [True] * 3
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: None)
    fast = tok.decode(z, steps=(1, 1, 1))
    assert calls["joint_attention"] and all(calls["joint_attention"]) and not calls["gated_adaln"]
    assert torch.equal(fast, fused)
    with unoptimised():
        assert (fast - tok.decode(z, steps=(1, 1, 1))).abs().max() <= 1e-5


@needs_kernel
def test_the_blocks_op_follows_hooks_replaced_layers_and_changed_weights(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_TOKENS_FP32", 0)  # float32 attention at the tiny model's token counts
    tok, z = _kernel_sized_tokenizer(1, seed=2)
    fused_calls = []
    real = cpu_kernels.blocks
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: fused_calls.append(1) or real(*args))

    def both() -> torch.Tensor:  # the decode with the blocks op, checked against block by block
        calls = len(fused_calls)
        fused = tok.decode(z, steps=(1, 1, 1))
        assert len(fused_calls) == calls + 3
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "blocks", lambda *args: None)
            assert torch.equal(tok.decode(z, steps=(1, 1, 1)), fused)
        return fused

    first = both()
    blocks = tok.decoder.blocks
    seen = []
    handle = blocks[0].img.qkv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert torch.equal(tok.decode(z, steps=(1, 1, 1)), first) and len(seen) == 3  # hooked: block by block
    handle.remove()
    old = blocks[1].img.proj
    new = layers.Linear(old.in_features, old.out_features)
    with torch.no_grad():
        new.weight.copy_(old.weight * 1.5), new.bias.copy_(old.bias)
    blocks[1].img.proj = new  # a replaced layer is used
    replaced = both()
    assert not torch.equal(replaced, first)
    with torch.no_grad():
        blocks[0].ctx.mlp.w3.weight.mul_(0.5)  # a weight changed in place is packed again
    changed = both()
    assert not torch.equal(changed, replaced)
    qkv = blocks[1].ctx.qkv
    qkv.weight = torch.nn.Parameter(qkv.weight.detach() * 2)  # a parameter replaced on a layer
    swapped = both()
    assert not torch.equal(swapped, changed)
    norm = blocks[0].img.k_norm
    norm.weight.data = norm.weight.data * 3  # the data under a q / k norm parameter replaced
    assert not torch.equal(both(), swapped)


@needs_kernel
def test_a_decode_checks_the_blocks_weights_at_its_first_pass(monkeypatch):
    """Inside a decode (Decoder.same_latents) the blocks op's weights are checked at the first pass only (the test
    above: changes between decodes are seen); passes outside a decode check them every time."""
    monkeypatch.setattr(cpu_kernels, "MIN_TOKENS_FP32", 0)
    tok, z = _kernel_sized_tokenizer(1, seed=3)
    checks = []
    current = fused_blocks._Weights.current
    monkeypatch.setattr(fused_blocks._Weights, "current", lambda self: checks.append(1) or current(self))
    first = tok.decode(z, steps=(1, 1, 1))
    checks.clear()
    assert torch.equal(tok.decode(z, steps=(1, 1, 1)), first)
    assert len(checks) == 1  # of three passes
    x, tau = torch.randn(1, 3, 16, 16), torch.full((1,), 0.5)
    with torch.no_grad():
        tok.decoder(x, tau, z), tok.decoder(x, tau, z)
    assert len(checks) == 3


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True])
def test_the_blocks_op_pads_an_mlp_hidden_size_to_its_kernels_panels(monkeypatch, bf16):
    """A SwiGLU hidden size not a multiple of 64 (the shipped tiny-64 models' 344) runs the `blocks` op with the hidden
    size padded with zeros: the decode equals that of a twin whose MLPs are padded in their weights."""
    monkeypatch.setattr(cpu_kernels, "MIN_TOKENS_FP32", 0)
    config = tiny_config("model.decoder.width=64", "model.decoder.heads=2", "model.decoder.mlp_hidden=40").model
    tok = Tokenizer(config).eval()
    twin = Tokenizer(dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, mlp_hidden=64))).eval()
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_(0, 0.05)
        state = tok.state_dict()
        for name, t in twin.state_dict().items():  # the MLPs' hidden features 40..63 zero, the rest as tok's
            source = state[name]
            if name.startswith("decoder.") and name.endswith(("mlp.w12.weight", "mlp.w12.bias")):
                a, b = source.chunk(2)
                pad = (0, 0) * (a.dim() - 1) + (0, 24)  # along the features
                source = torch.cat([F.pad(a, pad), F.pad(b, pad)])
            elif name.startswith("decoder.") and name.endswith("mlp.w3.weight"):
                source = F.pad(source, (0, 24))
            t.copy_(source)
    z = torch.randn(2, *config.latent_shape, generator=torch.Generator().manual_seed(4))
    flags = []
    real = cpu_kernels.blocks
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: flags.append(1) or real(*args))
    padded = tok.decode(z, steps=(1, 1, 1), bf16=bf16)
    assert len(flags) == 3  # every pass in the op
    assert torch.equal(padded, twin.decode(z, steps=(1, 1, 1), bf16=bf16))
    with unoptimised():
        assert (padded - tok.decode(z, steps=(1, 1, 1), bf16=bf16)).abs().max() <= (0.02 if bf16 else 1e-5)


@needs_kernel
def test_the_blocks_op_sees_an_in_place_edit_of_a_padded_mlp(monkeypatch):
    """An MLP whose hidden size the panels do not fit runs the `blocks` op on zero-padded copies of its weights (the
    shipped tiny-64's 344): a weight edited in place between two no-grad calls of the decoder itself (an optimiser
    step, then a validation pass or a sampler of one's own; `Tokenizer.decode`'s value check does not run there) must
    reach those copies, or the calls go on with the old weights."""
    monkeypatch.setattr(cpu_kernels, "MIN_TOKENS_FP32", 0)
    config = tiny_config("model.decoder.width=64", "model.decoder.heads=2", "model.decoder.mlp_hidden=40").model
    tok = Tokenizer(config).eval()
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(5)
    z, x, tau = torch.randn(1, *config.latent_shape, generator=g), torch.randn(1, 3, 16, 16, generator=g), torch.ones(1)
    flags = []
    real = cpu_kernels.blocks
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: flags.append(1) or real(*args))
    with torch.no_grad():
        before = tok.decoder(x, tau, z)
        mlp = tok.decoder.blocks[0].img.mlp
        mlp.w12.weight.mul_(0.5)
        mlp.w3.weight.mul_(2.0)
        after = tok.decoder(x, tau, z)
        fresh = Tokenizer(config).eval()  # the edited weights in a model whose caches never saw the old ones
        fresh.load_state_dict(tok.state_dict())
        assert torch.equal(after, fresh.decoder(x, tau, z))
        assert len(flags) == 3  # every call in the op
        assert not torch.equal(after, before)
        with unoptimised():
            assert (after - tok.decoder(x, tau, z)).abs().max() <= 1e-5


@needs_kernel
def test_the_blocks_op_says_what_its_params_must_be():
    x, c = torch.randn(1, 16, 64), torch.randn(1, 128, 64)
    cos = sin = torch.ones(144, 32)
    with pytest.raises(RuntimeError, match="2 blocks with these flags take 62 params"):
        cpu_kernels.library().blocks(x, c, [x] * 3, [1, 1, 1, 0], 2, 1e-6, 1e-6, cos, sin, False)
    with pytest.raises(RuntimeError, match="only the last block's context stream may be pre_only"):
        cpu_kernels.library().blocks(x, c, [x] * 3, [1, 0, 1, 1], 2, 1e-6, 1e-6, cos, sin, False)
    with pytest.raises(RuntimeError, match="give two flags per block"):
        cpu_kernels.library().blocks(x, c, [x] * 3, [1, 1, 1], 2, 1e-6, 1e-6, cos, sin, False)


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


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("False", False), (" no ", False),
                                       ("1", True), ("ON", True), ("phases", True)])
def test_the_switch_reads_the_usual_spellings(monkeypatch, value, on):
    monkeypatch.setenv("MSDD_CPU_KERNELS", value)
    assert cpu_kernels.enabled() is on


def test_an_unknown_switch_value_is_an_error_that_lists_the_values(monkeypatch):
    monkeypatch.setenv("MSDD_CPU_KERNELS", "of")
    with pytest.raises(ValueError, match="MSDD_CPU_KERNELS='of' is not understood: set it to 0 \\(or off\\)"):
        cpu_kernels.enabled()


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True])
def test_the_blocks_op_runs_msdds_int8_layers_as_the_blocks_do(monkeypatch, bf16):
    monkeypatch.setattr(cpu_kernels, "MIN_TOKENS_FP32", 0)
    tok, z = _kernel_sized_tokenizer(1, seed=3)
    int8_flags = []
    real = cpu_kernels.blocks
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: int8_flags.append(args[-1]) or real(*args))
    fused = tok.decode(z, steps=(1, 1, 1), int8=True, bf16=bf16)
    assert int8_flags == [True] * 3  # every pass in one call, on the int8 kernels
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: None)
    assert torch.equal(tok.decode(z, steps=(1, 1, 1), int8=True, bf16=bf16), fused)


@needs_kernel
@pytest.mark.parametrize("bf16,int8", [(True, False), (False, False), (True, True)])
def test_the_blocks_op_at_head_dim_64_is_block_by_block(monkeypatch, bf16, int8):
    """At head dim 64 (the paper's) too, the blocks op's images are block by block's, bit for bit: its qkv layers
    write the attention's packed operands (at 16 and 64 image tokens; at 4, not a multiple of 16, through the qkv
    tensor)."""
    monkeypatch.setattr(cpu_kernels, "MIN_TOKENS_FP32", 0)
    tok, z = _kernel_sized_tokenizer(2, seed=4, width=128)
    sizes = []
    real = cpu_kernels.blocks
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: sizes.append(args[0].shape[1]) or real(*args))
    fused = tok.decode(z, steps=(1, 1, 1), bf16=bf16, int8=int8)
    assert sizes == [4, 16, 64]
    before = torch.ops.msdd_kernels.chunk_bytes(4096)  # every layer's rows in chunks (of whole images for qkv)
    try:
        assert torch.equal(tok.decode(z, steps=(1, 1, 1), bf16=bf16, int8=int8), fused)
    finally:
        torch.ops.msdd_kernels.chunk_bytes(before)
    monkeypatch.setattr(cpu_kernels, "blocks", lambda *args: None)
    assert torch.equal(tok.decode(z, steps=(1, 1, 1), bf16=bf16, int8=int8), fused)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_kernels_in_chunks_of_rows_give_the_same_outputs(dtype):
    """Inputs above the kernels' chunk size (8 MiB) go through every weight panel a chunk of rows at a time: the
    outputs are bit for bit those of one chunk (here chunks of 2 KiB, 6-12 rows), plain, with SwiGLU's gate, with a
    gated residual, and in int8."""
    from msdd.models.precision import Int8Linear

    ops, g = cpu_kernels.library(), torch.Generator().manual_seed(7)
    x = torch.randn(3, 37, 96, generator=g).to(dtype)
    w, b = (torch.randn(128, 96, generator=g) * 0.2).to(dtype), torch.randn(128, generator=g).to(dtype)
    residual, gate = torch.randn(3, 37, 128, generator=g).to(dtype), torch.randn(1, 128, generator=g).to(dtype)
    layer = torch.nn.Linear(96, 128)
    with torch.no_grad():
        layer.weight.copy_(w.float())
    q = Int8Linear(layer)

    def outputs():
        with torch.inference_mode():
            plain, swiglu = ops.pack_linear(w, b, False), ops.pack_linear(w, b, True)
            return [ops.linear(x, *plain, False), ops.linear(x, *swiglu, True),
                    ops.linear(x, *plain, False, residual, gate), q(x)]

    whole = outputs()
    before = ops.chunk_bytes(2048)
    try:
        chunked = outputs()
    finally:
        assert ops.chunk_bytes(before) == 2048
    assert ops.chunk_bytes(0) == before
    for one, parts in zip(whole, chunked):
        assert torch.equal(one, parts)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,n0,n1", [(64, 16, 5), (32, 48, 33), (64, 20, 7), (64, 128, 1)])
def test_the_blocks_op_is_its_kernels_one_by_one(dtype, d, n0, n1):
    """Two blocks (the last one's context stream pre_only) for 2 images against the same kernels called one by one:
    equal bit for bit, at token counts that leave partial key panels and words (odd joint lengths), and with 20
    image tokens (not a multiple of 16: the qkv tensor and the attention's packing pass)."""
    ops, g = cpu_kernels.library(), torch.Generator().manual_seed(5)
    heads, width, hidden = 2, 2 * d, 4 * d
    rope = tuple(t[: n0 + n1] for t in RopeCache(16, n1 + 128, d, "cross_both")(12, torch.device("cpu")))

    def rand(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    def layer(n, k, swiglu=False):
        return list(ops.pack_linear((rand(n, k) * k ** -0.5).to(dtype), rand(n, s=0.1), swiglu))

    def stream(full):
        mods = [rand(1, width, s=0.3).to(dtype) for _ in range(6 if full else 2)]
        layers_ = layer(3 * width, width) + (layer(width, width) + layer(2 * hidden, width, True) +
                                             layer(width, hidden) if full else [])
        return mods + layers_ + [rand(d, s=0.3) + 1, rand(d, s=0.2), rand(d, s=0.3) + 1, rand(d, s=0.2)]

    full = [1, 1, 1, 0]
    params = [t for f in full for t in stream(f)]
    x, c = rand(2, n0, width).to(dtype), rand(2, n1, width).to(dtype)
    out = ops.blocks(x, c, params, full, heads, 1e-6, 1e-6, *rope, dtype == torch.bfloat16)
    s, i = [x, c], 0
    for b in range(2):
        qkv, mods, norms = [], [], []
        for st in range(2):
            f = full[2 * b + st]
            w = i + (6 if f else 2)
            mods.append(i)
            qkv.append(ops.linear(ops.adaln(s[st], params[i], params[i + 1], 1e-6), params[w], params[w + 1], False))
            i = w + (8 if f else 2)
            norms += params[i:i + 4]
            i += 4
        attn = ops.joint_attention(qkv[0], qkv[1], heads, norms, 1e-6, *rope)
        for st in range(2):
            if not full[2 * b + st]:
                continue
            m = mods[st]
            w = m + 8
            res = ops.linear(attn[st], params[w], params[w + 1], False, s[st], params[m + 2])
            h = ops.linear(ops.adaln(res, params[m + 3], params[m + 4], 1e-6), params[w + 2], params[w + 3], True)
            s[st] = ops.linear(h, params[w + 4], params[w + 5], False, res, params[m + 5])
    assert torch.equal(out, s[0])
