"""SliceAdamW against torch.optim.AdamW (bitwise in fp32), compressed states, state_dict round trips."""

import io

import pytest
import torch

from sprune_trainer.optim.slice_adamw import (
    SliceAdamW,
    adam_state_bytes_per_param,
    dequantize_blockwise,
    quantize_blockwise,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: intra-op threads only add overhead, and stall badly on a shared CPU
    # (torch.bucketize parallelises from 200 elements). Results do not depend on the thread count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAPES = [(5, 7), (300,), (3, 1, 2), (17, 33)]  # odd sizes; 300 and 561 are not multiples of 256


def _groups(params):
    # two groups with different lr / weight decay / betas
    return [
        {"params": params[:2]},
        {"params": params[2:], "lr": 0.1, "weight_decay": 0.3, "betas": (0.8, 0.99)},
    ]


def _copies(seed=0):
    torch.manual_seed(seed)
    base = [torch.randn(s) for s in SHAPES]
    return [p.clone().requires_grad_() for p in base], [p.clone().requires_grad_() for p in base]


def _grads(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-3, 2, (), generator=g) for p in params]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _assert_same(ours, theirs, opt_ours, opt_theirs):
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        assert torch.equal(sa["step"], sb["step"])
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def _step_both(step, ours, theirs, opt, ref):
    grads = _grads(step, ours)
    _set_grads(ours, grads)
    _set_grads(theirs, grads)
    opt.step()
    ref.step()
    _assert_same(ours, theirs, opt, ref)


@pytest.mark.parametrize("foreach", [False, True])
def test_fp32_matches_torch_adamw_bitwise(foreach):
    ours, theirs = _copies()
    opt = SliceAdamW(_groups(ours), lr=1e-2, foreach=foreach)
    ref = torch.optim.AdamW(_groups(theirs), lr=1e-2, foreach=foreach)
    for step in range(30):
        _step_both(step, ours, theirs, opt, ref)
    assert not torch.equal(ours[0], _copies()[0][0])  # it did move


@pytest.mark.parametrize("foreach", [False, True])
def test_skips_params_without_grad_and_supports_closure(foreach):
    ours, theirs = _copies()
    opt = SliceAdamW(_groups(ours), lr=1e-2, foreach=foreach)
    ref = torch.optim.AdamW(_groups(theirs), lr=1e-2, foreach=foreach)
    frozen = ours[1].detach().clone()
    for step in range(3):
        grads = _grads(step, ours)

        def closure(params=ours, grads=grads):
            for p, g in zip(params, grads):
                p.grad = None if p is params[1] else g.clone()
            return torch.tensor(float(step))

        assert opt.step(closure).item() == step
        _set_grads([theirs[i] for i in (0, 2, 3)], [grads[i] for i in (0, 2, 3)])
        ref.step()
    assert torch.equal(ours[1], frozen) and ours[1] not in opt.state
    for i in (0, 2, 3):
        assert torch.equal(ours[i], theirs[i])


@pytest.mark.parametrize("via_bytes, foreach", [(False, False), (True, False), (True, True)])
def test_state_dict_round_trip_continues_torch_trajectory(via_bytes, foreach):
    ours, theirs = _copies()
    opt = SliceAdamW(_groups(ours), lr=1e-2, foreach=foreach)
    ref = torch.optim.AdamW(_groups(theirs), lr=1e-2, foreach=foreach)
    for step in range(30):
        if step == 15:  # hand over to a fresh optimizer on fresh copies of the params
            sd = opt.state_dict()
            if via_bytes:
                buf = io.BytesIO()
                torch.save(sd, buf)
                buf.seek(0)
                sd = torch.load(buf, weights_only=True)
            ours = [p.detach().clone().requires_grad_() for p in ours]
            opt = SliceAdamW(_groups(ours), lr=1.0, weight_decay=0.0)  # hyper-parameters come from sd
            opt.load_state_dict(sd)
            assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.01
        _step_both(step, ours, theirs, opt, ref)


def _handed_over(opt, params, state_dtype):
    """Fresh copies of `params` and a fresh SliceAdamW that loaded `opt`'s state_dict through bytes."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params = [p.detach().clone().requires_grad_() for p in params]
    fresh = SliceAdamW(_groups(params), state_dtype=state_dtype)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return params, fresh


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_compressed_state_dict_round_trip_is_exact(state_dtype, param_dtype):
    def run(handover):
        torch.manual_seed(0)
        params = [torch.randn(s, dtype=param_dtype).requires_grad_() for s in SHAPES]
        opt = SliceAdamW(_groups(params), lr=1e-2, state_dtype=state_dtype)
        for step in range(10):
            if step == 5 and handover:
                params, opt = _handed_over(opt, params, state_dtype)
            _set_grads(params, [g.to(param_dtype) for g in _grads(step, params)])
            opt.step()
        return params, opt

    p_a, opt_a = run(handover=False)
    p_b, opt_b = run(handover=True)
    for a, b in zip(p_a, p_b):
        assert torch.equal(a, b)
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:  # same values and storage dtypes (torch's loader casts them to the param dtype)
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    s = opt_b.state[p_b[0]]
    if state_dtype == "int8":
        assert s["exp_avg_code"].dtype == torch.int8 and s["exp_avg_sq_code"].dtype == torch.uint8
        assert s["exp_avg_scale"].dtype == torch.float32 == s["exp_avg_sq_scale"].dtype
    else:
        assert s["exp_avg"].dtype == torch.bfloat16
    assert opt_a.state_bytes() == opt_b.state_bytes()


def _least_squares(state_dtype, steps=200):
    """Fit W (40, 37) to Y = X W_true^T + noise by mean squared error; gradient in closed form."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(128, 37, generator=g)
    W_true = torch.randn(40, 37, generator=g)
    Y = X @ W_true.T + 0.1 * torch.randn(128, 40, generator=g)
    XtX, YtX = X.T @ X, Y.T @ X  # (37, 37), (40, 37)
    W = torch.zeros(40, 37, requires_grad=True)  # 1480 numbers: 5 full blocks + a partial one
    opt = SliceAdamW([W], lr=3e-2, weight_decay=0.0, state_dtype=state_dtype)
    for _ in range(steps):
        W.grad = (W.detach() @ XtX - YtX) * (2 / Y.numel())  # d/dW mean((X W^T - Y)^2)
        opt.step()
    loss = ((X @ W.detach().T - Y) ** 2).mean().item()
    return loss, W.detach(), opt.state_bytes()


def test_compressed_states_train_like_fp32():
    loss32, W32, bytes32 = _least_squares("float32")
    assert loss32 < 0.02  # measured 0.0154 (start: ~37)
    assert bytes32 == 40 * 37 * 8 + 4
    # measured: bf16 loss ratio 0.988, rel. param diff 7e-4; int8 loss ratio 1.038, rel. diff 6.8e-3
    for state_dtype, max_rel_diff in [("bfloat16", 0.005), ("int8", 0.03)]:
        loss, W, nbytes = _least_squares(state_dtype)
        assert 0.8 * loss32 < loss < 1.25 * loss32, state_dtype
        assert (W - W32).norm() / W32.norm() < max_rel_diff, state_dtype
        ratio = nbytes / bytes32
        lo, hi = {"bfloat16": (0.49, 0.51), "int8": (0.25, 0.27)}[state_dtype]  # measured 0.5002, 0.2543
        assert lo < ratio < hi, (state_dtype, ratio)
        assert abs(ratio - adam_state_bytes_per_param(state_dtype) / 8.0) < 0.01


def test_state_bytes_per_param():
    assert adam_state_bytes_per_param("float32") == 8.0
    assert adam_state_bytes_per_param("bfloat16") == 4.0
    assert adam_state_bytes_per_param("int8") == pytest.approx(2.03125)


@pytest.mark.parametrize("dist", ["normal", "heavy_tailed"])
def test_blockwise_quantization_round_trip(dist):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 143, generator=g)  # 1001 numbers: 3 full blocks + a partial one
    if dist == "heavy_tailed":
        x = x * torch.exp(2 * torch.randn(x.shape, generator=g))
    blocks = torch.nn.functional.pad(x.flatten(), (0, 23)).view(4, 256)
    absmax = blocks.abs().amax(1)

    codes, scale = quantize_blockwise(x, signed=True)
    assert codes.dtype == torch.int8 and codes.shape == (1001,) and scale.shape == (4,)
    assert torch.equal(scale, absmax)
    y = dequantize_blockwise(codes, scale, x.shape)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y - x).abs()
    block_absmax = absmax.repeat_interleave(256)[:1001].view(x.shape)
    assert (y.sign() * x.sign() >= 0).all()  # tiny entries may become 0, never flip sign
    assert (err <= 0.0071 * block_absmax).all()  # half the widest bin (0.9 / 64 / 2) of the top decade
    big = x.abs() >= 0.01 * block_absmax  # 2 decades below the block max: still a few % precision
    assert (err[big] / x.abs()[big]).max() < 0.13
    assert ((y - x).norm() / x.norm()) < 0.015  # measured 0.011 (normal), 0.003 (heavy tailed)
    top = blocks.abs().argmax(1, keepdim=True)  # each block's largest entry is reproduced exactly
    y_blocks = torch.nn.functional.pad(y.flatten(), (0, 23)).view(4, 256)
    assert torch.equal(y_blocks.gather(1, top), blocks.gather(1, top))

    v = x.square()  # second moment, stored as sqrt
    codes, scale = quantize_blockwise(v.sqrt(), signed=False)
    assert codes.dtype == torch.uint8
    v_back = dequantize_blockwise(codes, scale, x.shape).square()
    assert (v_back[v > 0] > 0).all()  # a positive second moment never becomes 0 (step would be m / eps)
    big = v.sqrt() >= 0.01 * block_absmax
    assert (((v_back - v).abs() / v)[big]).max() < 0.13

    zero_codes, zero_scale = quantize_blockwise(torch.zeros(300), signed=True)
    assert torch.equal(dequantize_blockwise(zero_codes, zero_scale, (300,)), torch.zeros(300))


def test_bf16_param_update_is_fp32_math_rounded():
    torch.manual_seed(0)
    p = torch.randn(33, 17).bfloat16().requires_grad_()
    ref_p = p.detach().float().requires_grad_()
    opt = SliceAdamW([p], lr=1e-3, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_p], lr=1e-3, weight_decay=0.1, foreach=False)
    for step in range(10):
        grad = torch.randn(p.shape).bfloat16()
        with torch.no_grad():
            ref_p.copy_(p)  # reference starts each step from our bf16 weights, in fp32
        p.grad, ref_p.grad = grad, grad.float()
        before = p.detach().clone()
        opt.step()
        ref.step()
        expected = ref_p.detach().bfloat16()
        # within one bf16 ulp (relative spacing 2^-7) of fp32 AdamW rounded to bf16 ...
        torch.testing.assert_close(p.detach().float(), expected.float(), rtol=2**-7, atol=1e-30)
        # ... in fact exactly equal: the fp32 result is rounded once, on write-back. bf16 arithmetic
        # (decay, then step, each rounded) would differ here.
        assert torch.equal(p.detach(), expected)
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[ref_p]["exp_avg"])  # fp32 state, bitwise
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert (p != before).any()  # lr 1e-3 moves bf16 weights (the fp32 math is not lost)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"betas": (1.0, 0.999)}, r"betas must be two numbers in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"state_dtype": "fp8"}, "state_dtype must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SliceAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_bad_group_arguments_and_sparse_grads_raise():
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SliceAdamW([{"params": [p]}, {"params": [q], "lr": -1e-3}])
    with pytest.raises(ValueError, match="state_dtype"):
        adam_state_bytes_per_param("float16")
    opt = SliceAdamW([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_numel", [1 << 24, 512])  # one chunk; several (each param in its own or paired)
def test_flat_compressed_step_is_bitwise_the_per_slice_step(state_dtype, param_dtype, chunk_numel, monkeypatch):
    """The batched step (optim_flat) against the per-param loop (foreach=False), through a step where one
    param has no grad (that chunk falls back to per param) and a state_dict hand-over."""
    from sprune_trainer.optim import flat_state as optim_flat
    monkeypatch.setattr(optim_flat, "CHUNK_NUMEL", chunk_numel)
    torch.manual_seed(0)
    base = [torch.randn(s, dtype=param_dtype) for s in SHAPES]
    flat = [p.clone().requires_grad_() for p in base]
    loop = [p.clone().requires_grad_() for p in base]
    opt_f = SliceAdamW(_groups(flat), lr=1e-2, state_dtype=state_dtype)
    opt_l = SliceAdamW(_groups(loop), lr=1e-2, state_dtype=state_dtype, foreach=False)
    for step in range(12):
        if step == 6:  # hand the flat optimizer's state over to a fresh one
            flat, opt_f = _handed_over(opt_f, flat, state_dtype)
        grads = [g.to(param_dtype) for g in _grads(step, flat)]
        if step == 3:
            grads[1] = None
        for ps in (flat, loop):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone()
        opt_f.step()
        opt_l.step()
        for a, b in zip(flat, loop):
            assert torch.equal(a, b), step
            sa, sb = opt_f.state[a], opt_l.state[b]
            assert sa.keys() == sb.keys()
            for k in sa:
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (step, k)
    assert opt_f.state_bytes() == opt_l.state_bytes()
    key = "exp_avg_code" if state_dtype == "int8" else "exp_avg"
    assert opt_f.state[flat[3]][key]._base is not None  # it did take the flat path (state is a view)


@pytest.mark.parametrize("saved, wanted", [("float32", "int8"), ("int8", "float32"), ("float32", "bfloat16")])
def test_state_dict_of_another_storage_is_converted_on_load(saved, wanted):
    """state_dtype is this optimizer's storage, not a saved hyperparameter: a resumed run that asks for other
    moments gets the saved ones re-encoded (was: the saved storage silently replaced the requested one)."""
    params, copies = _copies()
    opt = SliceAdamW(_groups(params), lr=1e-2, state_dtype=saved)
    for step in range(3):
        _set_grads(params, _grads(step, params))
        opt.step()
    sd = opt.state_dict()
    resumed = SliceAdamW(_groups(copies), lr=1e-2, state_dtype=wanted)
    resumed.load_state_dict(sd)
    assert [g["state_dtype"] for g in resumed.param_groups] == [wanted, wanted]
    for p, q in zip(params, copies):
        old, new = opt.state[p], resumed.state[q]
        if saved == "int8":
            m = dequantize_blockwise(old["exp_avg_code"], old["exp_avg_scale"], p.shape)
            v = dequantize_blockwise(old["exp_avg_sq_code"], old["exp_avg_sq_scale"], p.shape).square()
        else:
            m, v = old["exp_avg"], old["exp_avg_sq"]
        assert torch.equal(new["step"], old["step"])
        if wanted == "int8":
            for key, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v.sqrt(), False)):
                code, scale = quantize_blockwise(x, signed=signed)
                assert torch.equal(new[f"{key}_code"], code) and torch.equal(new[f"{key}_scale"], scale)
        else:
            dtype = torch.float32 if wanted == "float32" else torch.bfloat16
            assert new["exp_avg"].dtype == dtype and torch.equal(new["exp_avg"], m.to(dtype))
            assert torch.equal(new["exp_avg_sq"], v.to(dtype))
    _set_grads(copies, _grads(3, copies))
    resumed.step()  # and it trains on in the new storage
    assert all(torch.isfinite(q).all() for q in copies)
