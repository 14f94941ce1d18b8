"""The fused CPU inference path must be the module's arithmetic, only faster (model/yamnet_fused.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from model.yamnet import FUSED_LATE_CHUNK
from model.yamnet_fused import FusedPointwise, build_plan, fused_ops_available, pad_for_stem

pytestmark = pytest.mark.skipif(not fused_ops_available(), reason="this torch build has no oneDNN fused conv")

TOL = 1e-5


def _both_paths(model, x, native: bool = True):
    """(module path, fused path) outputs, from copies so the shared fixture is untouched.

    The fused model runs until its packed plan is used; plain and packed plans must agree.
    """
    outs = []
    for fused in (False, True):
        m = copy.deepcopy(model)
        m.fused_inference = fused
        m.native_kernels = native
        with torch.inference_mode():
            runs = [m(x) for _ in range(m._fused_early.PACK_AFTER if fused else 1)]
        for emb, _ in runs[1:]:
            assert torch.allclose(emb, runs[0][0], atol=TOL, rtol=0)
        outs.append(runs[-1])
    return outs


@pytest.mark.parametrize("shape", [(1, 1, 96, 64), (20, 1, 96, 64), (70, 1, 96, 64), (3, 1, 95, 63), (2, 1, 97, 66),
                                   (FUSED_LATE_CHUNK + 7, 1, 96, 64)])
@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "onednn-only"])
def test_fused_equals_modules(yamnet_model, shape, native):
    """Even sizes take the grown-kernel stride-2 rewrite; odd ones the symmetric pad; 70 spans several
    early-phase chunks, and the last shape two late-phase ones. Both with the C kernels of
    model/native_kernels.py (where they build) and with every layer on oneDNN."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    (emb_m, logit_m), (emb_f, logit_f) = _both_paths(yamnet_model, x, native)
    assert emb_f.shape == emb_m.shape == (shape[0], 1024)
    assert torch.allclose(emb_f, emb_m, atol=TOL, rtol=0)
    # logits of random inputs reach |250|: float32 sums in another order differ by a few ulp there
    assert torch.allclose(logit_f, logit_m, atol=TOL * 10, rtol=1e-6)


def test_stride2_rewrite_grows_kernel_with_a_zero_leading_tap(yamnet_model):
    convs = yamnet_model.conv_layers()
    plan = build_plan(convs, batch=4, height=96, width=64)
    assert plan[0].pre_pad == (0, 1, 0, 1)  # the one-channel stem pads explicitly (0 before, 1 after)
    depthwise_s2 = [op for op, c in zip(plan, convs) if c.stride == (2, 2) and c.in_channels > 1]
    assert len(depthwise_s2) == 4
    for op in depthwise_s2:
        assert op.padding == [1, 1] and op.pre_pad is None


def test_stem_padded_once_for_the_batch_equals_padding_per_chunk(yamnet_model):
    """pad_for_stem + a prepadded plan must be the per-chunk explicit pad, to the bit."""
    convs = yamnet_model.conv_layers()[:3]
    torch.manual_seed(0)
    x = torch.randn(5, 1, 96, 64)
    padded, was_padded = pad_for_stem(convs[0], x)
    assert was_padded and padded.shape == (5, 1, 97, 65)
    per_chunk = build_plan(convs, 5, 96, 64, pack=False)
    once = build_plan(convs, 5, 96, 64, pack=False, prepadded=True)
    assert once[0].pre_pad is None and per_chunk[0].pre_pad == (0, 1, 0, 1)
    with torch.no_grad():
        a, b = x.contiguous(memory_format=torch.channels_last), padded
        for op_a, op_b in zip(per_chunk, once):
            a, b = op_a(a), op_b(b)
    assert torch.equal(a, b)
    odd = torch.randn(2, 1, 95, 63)  # stride-2 'SAME' on odd sizes is symmetric: nothing to pad
    assert pad_for_stem(convs[0], odd) == (odd, False)


def test_pointwise_layers_run_as_matmuls_equal_to_the_conv(yamnet_model):
    """1x1 layers take the oneDNN matmul; it must equal conv + ReLU on a channels-last map."""
    convs = yamnet_model.conv_layers()
    pointwise = [(i, c) for i, c in enumerate(convs) if c.kernel_size == (1, 1)]
    plan = build_plan(convs, batch=2, height=96, width=64)
    assert len(pointwise) == 13 and all(isinstance(plan[i], FusedPointwise) for i, _ in pointwise)
    i, conv = pointwise[-1]
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 3, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(plan[i](x), torch.relu(conv(x)), atol=1e-4, rtol=1e-5)  # |values| reach ~100


def test_plan_follows_weight_updates(yamnet_model):
    """A model evaluated between training steps must never run stale packed weights."""
    model = copy.deepcopy(yamnet_model)
    x = torch.randn(2, 1, 96, 64)
    with torch.inference_mode():
        before = model(x)[0]
    with torch.no_grad():
        model.features[5].pointwise.conv.weight.mul_(0.5)  # in place: the version counter moves
    with torch.inference_mode():
        after = model(x)[0]
    model.fused_inference = False
    with torch.inference_mode():
        reference = model(x)[0]
    assert not torch.allclose(before, after)
    assert torch.allclose(after, reference, atol=TOL, rtol=0)


def test_training_path_keeps_gradients(yamnet_model):
    model = copy.deepcopy(yamnet_model)
    emb, _ = model(torch.randn(2, 1, 96, 64))
    assert emb.requires_grad  # grad mode runs the modules, not the frozen plan
    emb.sum().backward()
    assert model.features[0].conv.weight.grad is not None


def test_shapes_that_come_back_get_packed_plans_and_old_ones_are_dropped(yamnet_model):
    model = copy.deepcopy(yamnet_model)
    model.native_kernels = False  # packing is about oneDNN's weights; the C kernels need none
    cache = model._fused_early
    with torch.inference_mode():
        reference = None
        for i in range(cache.PACK_AFTER + 1):  # first calls: plain weights; then a packed plan
            out = model(torch.ones(3, 1, 96, 64))[0]
            reference = out if reference is None else reference
            assert torch.allclose(out, reference, atol=TOL, rtol=0)
        key = (3, 96, 64, True, False)  # batch, unpadded size, stem padded once for the batch, no C kernels
        assert key in cache._packed
        for n in range(4, 4 + cache.MAX_PACKED):
            for _ in range(cache.PACK_AFTER):
                model(torch.ones(n, 1, 96, 64))
        assert len(cache._packed) == cache.MAX_PACKED and key not in cache._packed


def test_model_with_warm_plan_copies_and_pickles(yamnet_model):
    x = torch.randn(2, 1, 96, 64)
    with torch.inference_mode():
        expected = yamnet_model(x)[0]  # warms the plan cache
    clone = pickle.loads(pickle.dumps(copy.deepcopy(yamnet_model)))
    with torch.inference_mode():
        assert torch.allclose(clone(x)[0], expected, atol=TOL, rtol=0)


def test_weights_made_in_inference_mode_run_the_modules(yamnet_model):
    """Inference tensors have no version counter, so no cached plan may stand in for them."""
    x = torch.randn(2, 1, 96, 64)
    with torch.inference_mode():
        expected = yamnet_model(x)[0]
        clone = pickle.loads(pickle.dumps(yamnet_model))
        assert clone.features[0].conv.weight.is_inference()
        assert torch.allclose(clone(x)[0], expected, atol=TOL, rtol=0)
        assert clone._fused_early(clone.conv_layers(), x) is None and clone._fused_embed(x) is None


def test_a_build_that_refuses_the_fused_ops_falls_back_to_the_modules(yamnet_model, monkeypatch):
    """The fused path uses oneDNN ops outside torch's stable API; losing them must cost speed, not results."""
    model = copy.deepcopy(yamnet_model)
    model.native_kernels = False  # every layer on oneDNN, so the refused op is actually called
    x = torch.randn(2, 1, 96, 64)
    with torch.inference_mode():
        expected = model(x)[0]

    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn::_convolution_pointwise is not available in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", refuse)
    clone = copy.deepcopy(model)
    with torch.inference_mode():
        got = clone(x)[0]
    assert clone.fused_inference is False
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
