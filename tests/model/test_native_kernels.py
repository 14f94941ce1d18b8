"""The C kernels (model/native/yamnet_kernels.c) must compute the modules' layers, and fail safe."""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import logging
import platform
import shutil

import pytest
import torch
from torch import nn

from model import native_kernels
from model.yamnet import ConvReLU, SeparableBlock
from model.yamnet_fused import (
    NativeChain,
    NativeConv,
    NativeSeparable,
    _native_op,
    _native_separable_op,
    build_plan,
    native_applies,
    native_separable_applies,
    pad_for_stem,
)

TOL = 1e-5
HAS_COMPILER = native_kernels.compiler() is not None


def _alone(kernels, layer):
    """One layer as the plan runs it when no other native layer sits beside it: a chain of one."""
    return NativeChain.of(kernels, [layer])


@pytest.fixture
def kernels():
    """The kernels as the model loads them; this machine has a compiler, so they must build."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: the oneDNN fallback is covered by test_yamnet_fused")
    loaded = native_kernels.load()
    assert loaded is not None, "the C kernels failed to build or load here (see the warning in the log)"
    return loaded


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """native_kernels.load with an empty cache and a clean memo, restored afterwards."""
    monkeypatch.setenv("CACARA_WEIGHTS_DIR", str(tmp_path / "weights"))
    native_kernels.load.cache_clear()
    yield native_kernels.load
    native_kernels.load.cache_clear()


def _layer(in_ch: int, out_ch: int, stride: int, groups: int, seed: int) -> ConvReLU:
    torch.manual_seed(seed)
    layer = ConvReLU(in_ch, out_ch, 3, stride, groups=groups)
    with torch.no_grad():
        layer.conv.bias.uniform_(-0.5, 0.5)  # both signs, so ReLU clips some outputs
    return layer


SHAPES = [(96, 64), (95, 63), (6, 4), (3, 2), (1, 1), (2, 5)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", SHAPES)
@pytest.mark.parametrize("channels", [16, 48])
def test_depthwise_equals_module(kernels, stride, size, channels):
    """TF 'SAME' padding at both strides, even and odd sizes, maps smaller than the kernel."""
    layer = _layer(channels, channels, stride, channels, seed=stride)
    x = torch.randn(3, channels, *size).contiguous(memory_format=torch.channels_last)
    op = _alone(kernels, _native_op(layer.conv))
    with torch.no_grad():
        expected = layer(x)
        got = op(x)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    assert (got == 0).any() and (got > 0).any()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", SHAPES)
def test_stem_equals_module(kernels, stride, size):
    layer = _layer(1, 32, stride, 1, seed=10 + stride)
    x = torch.randn(4, 1, *size)
    op = _alone(kernels, _native_op(layer.conv))
    with torch.no_grad():
        expected = layer(x)
        got = op(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(24, 16), (6, 4), (3, 2), (5, 7), (1, 1)])
@pytest.mark.parametrize("channels", [(16, 64), (48, 128), (128, 64)])
def test_separable_block_equals_module(kernels, stride, size, channels):
    """Pixel counts that are and are not multiples of the 6-pixel register tile, both strides."""
    c_in, c_out = channels
    torch.manual_seed(stride + c_in)
    block = SeparableBlock(c_in, c_out, 3, stride)
    with torch.no_grad():
        for layer in (block.depthwise, block.pointwise):
            layer.conv.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, c_in, *size).contiguous(memory_format=torch.channels_last)
    op = _alone(kernels, _native_separable_op(block.depthwise.conv, block.pointwise.conv))
    with torch.no_grad():
        expected = block(x)
        got = op(x)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    assert (got == 0).any() and (got > 0).any()


@pytest.mark.parametrize("size", [(96, 64), (37, 23), (5, 3)])
def test_chain_equals_layer_by_layer(kernels, yamnet_model, size):
    """The patch-by-patch chain (stem, separable blocks, a lone depthwise) is the same arithmetic as
    running each layer as a chain of its own, to the bit: the scratch maps hand over exactly."""
    convs = yamnet_model.conv_layers()[:12]
    ops = build_plan(convs, batch=3, height=size[0], width=size[1], native=True)
    layers = ops[0].layers
    x = torch.randn(3, 1, *size)
    with torch.inference_mode():
        chained = ops[0](x)
        step = x
        for op in layers:
            step = _alone(kernels, op)(step)
    assert len(layers) == 7 and chained.shape == step.shape
    assert torch.equal(chained, step)


def test_chain_refuses_a_wrong_input(kernels, yamnet_model):
    (chain,) = build_plan(yamnet_model.conv_layers()[:3], batch=1, height=96, width=64, native=True)
    with pytest.raises(ValueError, match="channels"):
        chain(torch.randn(1, 2, 96, 64).contiguous(memory_format=torch.channels_last))


def test_results_do_not_depend_on_thread_count(kernels):
    """Each patch is one thread's work in a fixed order: the same bits at 1 and 2 threads."""
    layer = _layer(64, 64, 1, 64, seed=3)
    op = _alone(kernels, _native_op(layer.conv))
    x = torch.randn(9, 64, 12, 8).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(op(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_yamnet_plan_runs_every_layer_natively(kernels, yamnet_model):
    """Whole network: one chain of the stem, then the 13 separable blocks each fused."""
    convs = yamnet_model.conv_layers()
    (chain,) = build_plan(convs, batch=2, height=96, width=64, native=True)
    assert isinstance(chain, NativeChain)
    assert isinstance(chain.layers[0], NativeConv) and not chain.layers[0].depthwise
    assert len(chain.layers) == 14 and all(isinstance(op, NativeSeparable) for op in chain.layers[1:])
    # split where the model splits its two phases, a block's depthwise half runs alone at the end
    (early,) = build_plan(convs[:12], batch=2, height=96, width=64, native=True)
    assert isinstance(early.layers[-1], NativeConv) and early.layers[-1].depthwise
    x = torch.randn(2, 1, 96, 64)
    assert pad_for_stem(convs[0], x, native=True) == (x, False)  # no pad copy for the native stem


def test_yamnet_native_equals_onednn_and_modules(kernels, yamnet_model):
    torch.manual_seed(0)
    x = torch.randn(25, 1, 96, 64)
    outs = {}
    for name, fused, native in [("native", True, True), ("onednn", True, False), ("modules", False, False)]:
        m = copy.deepcopy(yamnet_model)
        m.fused_inference, m.native_kernels = fused, native
        with torch.inference_mode():
            outs[name] = m.embed(x)
    assert torch.allclose(outs["native"], outs["modules"], atol=TOL * 5, rtol=0)
    assert torch.allclose(outs["onednn"], outs["modules"], atol=TOL * 5, rtol=0)


def test_bad_inputs_are_refused(kernels):
    """The C side gets bare pointers: wrong inputs and wrong weights must be refused before it runs."""
    layer = _native_op(_layer(16, 16, 1, 16, seed=0).conv)
    chain = _alone(kernels, layer)
    nchw = torch.randn(2, 16, 6, 4)
    with pytest.raises(ValueError, match="channels-last"):
        kernels.chain_relu(nchw, chain.spec)
    x = nchw.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="float32"):
        kernels.chain_relu(x.double(), chain.spec)
    with pytest.raises(ValueError, match="chain takes 16 channels"):
        chain(torch.randn(2, 32, 6, 4))
    depthwise, stem = native_kernels.CHAIN_DEPTHWISE, native_kernels.CHAIN_STEM
    with pytest.raises(ValueError, match="expected"):  # taps for 8 channels on a 16-channel map
        native_kernels.ChainSpec.build(16, [(depthwise, 16, 1, (layer.taps[:, :8].contiguous(), layer.bias,
                                                                None, None))])
    with pytest.raises(ValueError, match="expected"):  # a depthwise layer carries no pointwise weights
        native_kernels.ChainSpec.build(16, [(depthwise, 16, 1, (layer.taps, layer.bias, layer.taps, layer.bias))])
    with pytest.raises(ValueError, match="no native layer"):
        native_kernels.ChainSpec.build(16, [(stem, 16, 1, (layer.taps, layer.bias, None, None))])
    block = _native_separable_op(nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 64, 1))
    with pytest.raises(ValueError, match="expected"):
        native_kernels.ChainSpec.build(16, [(native_kernels.CHAIN_SEPARABLE, 64, 1,
                                             (block.taps, block.dw_bias, block.panels[:, :8].contiguous(),
                                              block.pw_bias))])
    # the C side checks too: a spec that skipped build, with stride 0
    unchecked = dataclasses.replace(chain.spec, spec=(ctypes.c_int * 3)(depthwise, 16, 0))
    with pytest.raises(ValueError, match="refused"):
        kernels.chain_relu(x, unchecked)


def test_layers_the_kernels_do_not_cover_stay_on_onednn():
    assert not native_applies(nn.Conv2d(16, 16, 1, groups=16))  # 1x1
    assert not native_applies(nn.Conv2d(24, 24, 3, groups=24))  # not a multiple of the vector width
    assert not native_applies(nn.Conv2d(16, 32, 3))  # full conv from many channels
    assert not native_applies(nn.Conv2d(16, 16, 3, groups=16, dilation=2))
    dw = nn.Conv2d(32, 32, 3, groups=32)
    assert native_separable_applies(dw, nn.Conv2d(32, 64, 1))
    assert not native_separable_applies(dw, nn.Conv2d(32, 48, 1))  # not a whole number of 64-channel panels
    assert not native_separable_applies(dw, nn.Conv2d(32, 64, 3))  # not pointwise
    assert not native_separable_applies(nn.Conv2d(2048, 2048, 3, groups=2048), nn.Conv2d(2048, 64, 1))  # buffer
    assert native_applies(nn.Conv2d(1, 32, 3, stride=2)) and native_applies(nn.Conv2d(64, 64, 3, groups=64))


def test_switched_off_by_environment(fresh_load, monkeypatch, yamnet_model):
    monkeypatch.setenv(native_kernels.ENV_SWITCH, "0")
    assert fresh_load() is None
    plan = build_plan(yamnet_model.conv_layers(), batch=1, height=96, width=64, native=True)
    assert not any(isinstance(op, (NativeConv, NativeSeparable, NativeChain)) for op in plan)


def test_compiler_failure_falls_back_with_a_warning(fresh_load, monkeypatch, caplog, yamnet_model, tmp_path):
    """A broken toolchain must cost speed, never a failed embedding."""
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    with caplog.at_level(logging.WARNING, logger="model.native_kernels"):
        assert fresh_load() is None
    assert "oneDNN" in caplog.text
    assert not list((tmp_path / "weights").rglob("*.so"))  # nothing half-written left in the cache
    m = copy.deepcopy(yamnet_model)
    x = torch.randn(2, 1, 96, 64)
    with torch.inference_mode():
        fallback = m.embed(x)
    m.fused_inference = False
    with torch.inference_mode():
        assert torch.allclose(fallback, m.embed(x), atol=TOL, rtol=0)


def test_missing_compiler_falls_back(fresh_load, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert fresh_load() is None


def test_build_is_cached_by_source_hash(fresh_load, tmp_path):
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    first = fresh_load()
    assert first is not None and first.path.parent == tmp_path / "weights" / "native"
    stamp = first.path.stat().st_mtime_ns
    native_kernels.load.cache_clear()
    second = fresh_load()
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_unwritable_cache_builds_privately(monkeypatch, tmp_path):
    """A cache path that cannot hold a directory (read-only volumes look the same) still gets kernels."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    blocker = tmp_path / "weights"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("CACARA_WEIGHTS_DIR", str(blocker))
    native_kernels.load.cache_clear()
    try:
        loaded = native_kernels.load()
        assert loaded is not None and blocker not in loaded.path.parents
    finally:
        native_kernels.load.cache_clear()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the clones are x86-64 code paths")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2-fma", "baseline-sse2"])
def test_every_x86_code_path_computes_the_same(kernels, yamnet_model, tmp_path, march):
    """The library carries AVX-512, AVX2+FMA and baseline clones and this CPU runs only one of them:
    build the others alone and check they compute the same layers."""
    path = native_kernels._build(native_kernels.compiler(), tmp_path / f"{march}.so",
                                 (f"-march={march}", "-DCACARA_SINGLE_TARGET"))
    variant = native_kernels.open_library(path)
    convs = yamnet_model.conv_layers()
    x = torch.randn(3, 1, 96, 64)
    with torch.inference_mode():
        stem_op, block_op = _native_op(convs[0]), _native_separable_op(convs[1], convs[2])
        stem = _alone(kernels, stem_op)(x)
        assert torch.allclose(_alone(variant, stem_op)(x), stem, atol=TOL, rtol=0)
        block = _alone(kernels, block_op)(stem)
        assert torch.allclose(_alone(variant, block_op)(stem), block, atol=TOL, rtol=0)
        wide = torch.randn(2, 512, 6, 4).contiguous(memory_format=torch.channels_last)
        depthwise = [c for c in convs if c.groups == 512][0]  # more than 128 channels: the blocked kernel
        wide_op = _native_op(depthwise)
        assert torch.allclose(_alone(variant, wide_op)(wide), _alone(kernels, wide_op)(wide), atol=TOL, rtol=0)


def test_a_patch_embeds_the_same_whatever_else_is_in_the_batch(kernels, yamnet_model):
    """Each patch is computed alone, so a clip's embedding does not depend on its batch-mates."""
    x = torch.randn(45, 1, 96, 64)
    with torch.inference_mode():
        full = yamnet_model.embed(x)
        assert torch.equal(yamnet_model.embed(x[:7]), full[:7])
        assert torch.equal(yamnet_model.embed(x[30:31]), full[30:31])


def test_concurrent_callers_get_the_same_embeddings(kernels, yamnet_model):
    """A server embeds requests from several threads at once: ctypes releases the GIL, so the C kernels
    run side by side, each call with its own OpenMP team and scratch maps."""
    from concurrent.futures import ThreadPoolExecutor

    model = copy.deepcopy(yamnet_model)
    inputs = [torch.randn(n, 1, 96, 64) for n in (20, 7, 33, 1, 20, 12)]
    with torch.inference_mode():
        expected = [model.embed(x) for x in inputs]

        def embed(x):
            with torch.inference_mode():
                return model.embed(x)

        with ThreadPoolExecutor(max_workers=3) as pool:
            got = list(pool.map(embed, inputs * 3))
    for i, out in enumerate(got):
        assert torch.equal(out, expected[i % len(inputs)])
