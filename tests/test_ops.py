"""The on-the-fly quantized Linear: same outputs as plain Linear with ggml-dequantized weights, zero-copy swap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from torch import nn

from lib_fluxq import ops as ops_module
from lib_fluxq.flux import flux_param_shapes
from lib_fluxq.formats.gguf import open_gguf
from lib_fluxq.ops import QuantLinear, swap_quantized_linears
from tests import ggml_ref
from tests.fixtures import SMALL_FLUX, random_flux_state_dict, recipe_qtype, write_gguf


def flux_shaped_model() -> nn.Module:
    """A module tree with exactly the BFL parameter names of SMALL_FLUX: Linear where a 2-D weight lives."""
    root = nn.Module()
    shapes = flux_param_shapes(SMALL_FLUX)

    def child(path: str) -> nn.Module:
        module = root
        for part in path.split("."):
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        return module

    for name, shape in shapes.items():
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2:
            parent, _, last = path.rpartition(".")
            holder = child(parent) if parent else root
            holder.add_module(last, nn.Linear(shape[1], shape[0], bias=f"{path}.bias" in shapes))
        elif leaf == "scale":
            child(path).register_parameter(leaf, nn.Parameter(torch.ones(shape)))
    return root


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q5_1, T.Q4_K, T.Q4_0, T.Q2_K, T.IQ4_NL, T.IQ4_XS],
                         ids=lambda t: t.name)
def test_quantized_model_equals_plain_linear_with_dequantized_weights(tmp_path: Path, qtype: T) -> None:
    sd = random_flux_state_dict(prefix="model.diffusion_model.")
    path = tmp_path / "flux.gguf"
    packed = write_gguf(path, sd, recipe_qtype(qtype))
    gguf_file = open_gguf(path)
    model = flux_shaped_model()
    swapped = swap_quantized_linears(model, gguf_file.tensors)
    assert len(swapped) == 26 and all(isinstance(model.get_submodule(n), QuantLinear) for n in swapped)

    gen = torch.Generator().manual_seed(0)
    for name in swapped:
        layer = model.get_submodule(name)
        assert layer.packed_weight.data_ptr() == gguf_file[f"model.diffusion_model.{name}.weight"].data.data_ptr()
        key = f"model.diffusion_model.{name}"
        # the reference: ggml's dequantization of the bytes in the file, used by a plain F.linear
        weight = torch.from_numpy(ggml_ref.dequantize(packed[f"{key}.weight"].reshape(-1).view(np.uint8), qtype,
                                                      layer.in_features * layer.out_features))
        weight = weight.view(layer.out_features, layer.in_features)
        x = torch.randn(3, 5, layer.in_features, generator=gen)
        assert torch.equal(layer(x), F.linear(x, weight, sd[f"{key}.bias"]))
        xb = x.bfloat16()
        assert torch.equal(layer(xb), F.linear(xb, weight.bfloat16(), sd[f"{key}.bias"].bfloat16()))

    # float (recipe: F16) Linears were loaded, not swapped
    assert isinstance(model.img_in, nn.Linear)
    assert torch.equal(model.img_in.weight, sd["model.diffusion_model.img_in.weight"].half().float())


def test_module_dtype_and_device_moves_keep_packed_bytes(tmp_path: Path) -> None:
    x = torch.randn(4, 256)
    packed = torch.from_numpy(ggml_ref.quantize(x.numpy(), T.Q4_K).copy())
    layer = QuantLinear(256, 4, "Q4_K", packed.view(-1), bias=torch.zeros(4))
    layer = layer.to(torch.bfloat16)
    assert layer.packed_weight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert "Q4_K" in repr(layer)


def test_swap_errors_are_clear() -> None:
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(256, 4))
    with pytest.raises(KeyError, match="proj.weight"):
        swap_quantized_linears(model, {})
    wrong = torch.from_numpy(ggml_ref.quantize(np.ones((8, 256), np.float32), T.Q8_0).copy())

    class Entry:
        qtype, data, shape = T.Q8_0, wrong.view(-1), (8, 256)

        def dequantize(self) -> torch.Tensor:
            return torch.zeros(self.shape)

    with pytest.raises(ValueError, match=r"shape \[8, 256\] does not match the model's \[4, 256\]"):
        swap_quantized_linears(model, {"proj.weight": Entry(), "proj.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="needs 1088 packed bytes"):
        QuantLinear(256, 4, T.Q8_0, wrong.view(-1))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_1, T.IQ4_XS], ids=lambda t: t.name)
def test_flux_transformer_forward_through_quantized_linears(tmp_path: Path, qtype: T) -> None:
    """A whole small Flux forward (real BFL blocks) through QuantLinear equals plain Linear with ggml's weights."""
    from lib_fluxq.flux_model import FluxTransformer, image_ids, text_ids

    sd = random_flux_state_dict(prefix="model.diffusion_model.")
    path = tmp_path / "flux.gguf"
    packed = write_gguf(path, sd, recipe_qtype(qtype))

    plain_weights = {}
    for key, tensor in sd.items():
        name = key.removeprefix("model.diffusion_model.")
        data = packed[key]
        if data.dtype == np.uint8:  # quantized in the file: the reference uses ggml's dequantization
            values = ggml_ref.dequantize(data.reshape(-1), qtype, tensor.numel())
            plain_weights[name] = torch.from_numpy(values).view(tensor.shape)
        else:
            plain_weights[name] = torch.from_numpy(data.astype(np.float32))
    reference = FluxTransformer(SMALL_FLUX)
    reference.load_state_dict(plain_weights)

    quantized = FluxTransformer(SMALL_FLUX)
    quantized.load_state_dict(plain_weights)  # norms/scales and float layers; quantized Linears are swapped below
    swapped = swap_quantized_linears(quantized, open_gguf(path).tensors)
    assert len(swapped) == 26

    gen = torch.Generator().manual_seed(1)
    h, w, txt_len = 4, 6, 7
    inputs = dict(img=torch.randn(1, h * w, SMALL_FLUX.in_channels, generator=gen), img_ids=image_ids(h * 16, w * 16),
                  txt=torch.randn(1, txt_len, SMALL_FLUX.context_in, generator=gen), txt_ids=text_ids(txt_len),
                  timesteps=torch.tensor([0.7]), pooled=torch.randn(1, SMALL_FLUX.vec_in, generator=gen),
                  guidance=torch.tensor([3.5]))
    with torch.no_grad():
        expected, actual = reference(**inputs), quantized(**inputs)
    assert expected.shape == (1, h * w, SMALL_FLUX.in_channels)
    assert torch.equal(actual, expected)


def test_forward_shares_one_weight_buffer_across_layers_and_shapes() -> None:
    """Two layers of different shapes run into the same storage (no per-call allocation), results stay exact, and
    with autograd on the weight is fresh so backward sees the right one."""
    from lib_fluxq.ops import release_weight_buffers

    release_weight_buffers()
    rng = np.random.default_rng(5)
    layers, weights = [], []
    for rows, cols, qtype in ((96, 512, T.Q8_0), (64, 256, T.Q4_K), (32, 256, T.IQ4_XS)):  # largest first
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        packed = ggml_ref.quantize(values, qtype)
        layers.append(QuantLinear(cols, rows, qtype, torch.from_numpy(packed.copy()).view(-1)))
        weights.append(torch.from_numpy(ggml_ref.dequantize(packed.reshape(-1), qtype, rows * cols)).view(rows, cols))
    pointers = set()
    for dtype in (torch.float32, torch.bfloat16):
        for layer, weight in zip(layers, weights, strict=True):
            x = torch.randn(4, layer.in_features).to(dtype)
            with torch.no_grad():
                assert torch.equal(layer(x), F.linear(x, weight.to(dtype)))
            pointers.add((dtype, ops_module._weight_buffers.buffers[(torch.device("cpu"), dtype, None)].data_ptr()))
    assert len(pointers) == 2   # one buffer per dtype, never regrown
    x = torch.randn(4, 256, requires_grad=True)
    y = layers[1](x)
    with torch.no_grad():
        layers[2](torch.randn(4, 256))                      # would overwrite a shared weight kept for backward
    y.sum().backward()
    assert torch.allclose(x.grad, weights[1].sum(0).expand(4, 256), atol=1e-5)
