"""The self-check every build of zlocal's CPU kernels passes before a model uses them: the int4/int8
products, the int4 dequantization and one decoder layer through ``DecodeStack``, each against a float
reference computed from the same codes and scales. A wrong result disables the kernels (the layers then
run on PyTorch's) instead of producing wrong tokens."""

from __future__ import annotations

import torch

from zlocal.kernels.cpu_kernels import (
    CpuKernels,
    DecodeStack,
    StackLayer,
    code_table,
    dequantize_int4,
    pack_int4,
    pack_int8,
    pack_scales,
)


def self_check(kernel: CpuKernels) -> str | None:
    """What went wrong in the kernels' self-check, or None when they match the float reference."""
    return _matmul_check(kernel) or _stack_check(kernel)


def _matmul_check(kernel: CpuKernels) -> str | None:
    """Compare the kernels with a float reference on random data; returns what went wrong, or None."""
    gen = torch.Generator().manual_seed(0)
    n, k = 16, 256
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)  # int4: 4 tokens at once, then 1
    checks = []
    table = code_table(torch.randn(16, generator=gen))  # codes standing for other values (NF4's, say)
    # all code paths of the int4 kernel, with the integer codes and with a table
    for g, values in ((32, None), (64, None), (128, None), (32, table), (64, table), (128, table)):
        codes = torch.randint(0, 16, (n, k), generator=gen)
        sz = torch.randn(k // g, n, 2, generator=gen).to(torch.bfloat16)
        want = dequantize_int4(codes, sz, g, values)
        ref = x.float() @ want.t()
        packed, tiled = pack_int4(codes), pack_scales(sz)
        what = f"group size {g}{'' if values is None else ', code table'}"
        checks.append((f"int4, {what}", kernel.int4_mm(x, packed, tiled, g, values), ref))
        checks.append((f"int4, one token, {what}", kernel.int4_mm(x[:1], packed, tiled, g, values), ref[:1]))
        weights = torch.empty(n, k, dtype=torch.bfloat16)  # the block-wise prompt path's weights
        kernel.int4_dequantize(weights, packed, tiled, g, values)
        checks.append((f"int4 dequantized, {what}", weights, want))
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, generator=gen).to(torch.bfloat16)
    got = kernel.int8_mm(x, pack_int8(q), scales)
    checks.append(("int8", got, (x.float() @ q.float().t()) * scales.float()))
    for what, got, ref in checks:
        err = (got.float() - ref).abs().max().item()
        tol = 0.01 * ref.abs().max().item()  # bf16 output rounding is 0.4% of the largest value
        if not err <= tol:
            return f"self-check error {err:.4g} > {tol:.4g} ({what})"
    return None


def _stack_check(kernel: CpuKernels) -> str | None:
    """One decoder layer (int8 q/k/v and down, int4 o and gate/up) through ``DecodeStack`` against
    the same layer computed in float from the dequantized weights; what went wrong, or None."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(1)
    # 601 positions: attention's online softmax crosses a 512-key block
    hidden, heads, kv_heads, d, inter, pos, ctx = 64, 4, 2, 16, 128, 600, 608

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    def int8(n, k):
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scales = rand(n, scale=0.002).abs()
        mod = SimpleNamespace(bits=8, out_features=n, in_features=k, weight=pack_int8(q), scales=scales)
        return mod, q.float() * scales.float()[:, None]

    def int4(n, k, g=32, table=None):
        codes = torch.randint(0, 16, (n, k), generator=gen)
        sz = torch.stack([rand(k // g, n, scale=0.02).abs(), rand(k // g, n, scale=0.02)], dim=-1)
        mod = SimpleNamespace(bits=4, out_features=n, in_features=k, group_size=g, weight=pack_int4(codes),
                              scales_and_zeros=pack_scales(sz), codes=table)
        return mod, dequantize_int4(codes, sz, g, table)

    # o_proj's codes stand for a table's values, as bitsandbytes NF4 layers' do
    table = code_table(rand(16, scale=4.0))
    (qkv, w_qkv), (o, w_o) = int8((heads + 2 * kv_heads) * d, hidden), int4(hidden, heads * d, 64, table)
    (gate_up, w_gu), (down, w_down) = int4(2 * inter, hidden), int8(hidden, inter)
    w_in, w_post = rand(hidden, scale=0.1) + 1, rand(hidden, scale=0.1) + 1
    keys, values = rand(1, kv_heads, ctx, d), rand(1, kv_heads, ctx, d)
    keys[:, :, 512:] *= 4  # the largest scores in the second block: its rescaling matters
    angle = torch.rand(d // 2, generator=gen) * 6.28
    cos, sin = torch.cat([angle.cos()] * 2).to(torch.bfloat16), torch.cat([angle.sin()] * 2)
    sin_neg = torch.cat([-sin[: d // 2], sin[d // 2 :]]).to(torch.bfloat16)
    h = rand(hidden)
    layer = StackLayer(w_in, 1e-5, qkv, o, w_post, 1e-5, gate_up, down, keys.clone(), values.clone())
    got = h.clone()
    DecodeStack(kernel, [layer], heads=heads, kv_heads=kv_heads, head_dim=d, window=None, scale=d**-0.5)(
        got, pos, cos, sin_neg
    )

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean() + 1e-5) * w.float()

    def rope(x):
        return x * cos.float() + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1) * sin.float()

    x = h.float()
    out = (rms(x, w_in) @ w_qkv.t()).view(heads + 2 * kv_heads, d)
    q, k, v = rope(out[:heads]), rope(out[heads : heads + kv_heads]), out[heads + kv_heads :]
    ks, vs = keys[0].float(), values[0].float()
    ks[:, pos], vs[:, pos] = k, v
    group = heads // kv_heads
    att = torch.cat([
        torch.softmax(ks[i // group, : pos + 1] @ q[i] * d**-0.5, dim=0) @ vs[i // group, : pos + 1]
        for i in range(heads)
    ])
    x = x + att @ w_o.t()
    gu = rms(x, w_post) @ w_gu.t()
    want = x + (torch.nn.functional.silu(gu[:inter]) * gu[inter:]) @ w_down.t()
    err = (got.float() - want).abs().max().item()
    tol = 0.02 * want.abs().max().item()
    key_err = (layer.keys[0, :, pos].float() - k).abs().max().item()
    if not (err <= tol and key_err <= 0.02 * k.abs().max().item()):
        return f"decode self-check error {err:.4g} > {tol:.4g} (or cached keys off by {key_err:.4g})"
    return None
