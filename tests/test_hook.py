"""The load hook driven against the Forge stand-in (tests/forge_standin.py, Forge dfdcbab6) and the Neo stand-in
(tests/neo_standin.py, Neo 2.26 @f95f632): the same user steps on both hosts, through tests/hook_hosts.py."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from lib_fluxq.host import forge as hook
from lib_fluxq.host import patching
from lib_fluxq.pairing import MissingComponentsError
from tests import ggml_ref, hook_hosts
from tests.hook_hosts import Host

T = gguf.GGMLQuantizationType


@pytest.fixture(params=["forge", "neo"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    installed = hook_hosts.install(request.param, tmp_path / "models")
    try:
        yield installed
    finally:
        hook.uninstall()
        installed.standin.remove()


def _console_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    return [line for line in (captured.out + captured.err).splitlines() if line.strip()]


def _module_names(modules: list[str]) -> list[str]:
    return sorted(os.path.basename(m) for m in modules)


def test_nothing_installed_outside_a_webui() -> None:
    assert "modules_forge" not in sys.modules and "modules" not in sys.modules
    assert hook.install() is False
    assert hook.register_callbacks() is False
    assert patching.installed() == {}


def test_probe_reads_each_host(host: Host) -> None:
    """The facts the patches are chosen by, found by looking at the host (signatures, names, one behaviour)."""
    from lib_fluxq.host.probe import probe
    caps = probe()
    assert caps.webui and caps.forge_loader
    expected = {
        "forge": dict(gguf_mapping_name="quants_mapping", gguf_layout="reader-tensor", gguf_shares_storage=False,
                      lora_on_gguf="merge", select_takes_preset=False, gpu_weights="mb", error_style="exception",
                      returns_metadata=False),
        "neo": dict(gguf_mapping_name="QUANTS_MAPPING", gguf_layout="torch-tensor", gguf_shares_storage=True,
                    lora_on_gguf="online", select_takes_preset=True, gpu_weights="fraction", error_style="text",
                    returns_metadata=True),
    }[host.name]
    assert {k: getattr(caps, k) for k in expected} == expected
    assert caps.gguf_enum is host.host_enum()
    assert caps.problems == []


def test_every_binding_wrapped_once_and_double_install_is_a_noop(host: Host) -> None:
    reload_modules = ("modules.sd_models", "modules.processing")
    originals = {mod: host.m[mod].forge_model_reload for mod in reload_modules}
    assert hook.register_callbacks() is True
    for mod, original in originals.items():
        wrapper = host.m[mod].forge_model_reload
        assert wrapper is not original and getattr(wrapper, hook.MARK) is original, mod
    assert len({id(host.m[mod].forge_model_reload) for mod in reload_modules}) == 1
    snapshot = (patching.installed(), dict(host.gguf_mapping()), {m: host.m[m].forge_model_reload for m in originals})
    callbacks = host.m["modules.script_callbacks"].callbacks
    assert hook.register_callbacks() is True and hook.install() is True
    assert snapshot == (patching.installed(), dict(host.gguf_mapping()),
                        {m: host.m[m].forge_model_reload for m in originals})
    assert (len(callbacks.ui_settings), len(callbacks.model_loaded)) == (1, 1)
    hook.uninstall()
    assert {m: host.m[m].forge_model_reload for m in originals} == originals
    assert patching.installed() == {}


def test_startup_says_which_patches_were_skipped_and_why(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    hook.register_callbacks()
    lines = [line for line in _console_lines(capsys) if line.startswith("[fluxq]")]
    assert lines[0].startswith("[fluxq] Forge load hook active (")
    skipped = " ".join(lines[1:])
    if host.name == "neo":
        assert "GGUF memory-mapping (this WebUI keeps GGUF files mapped itself)" in skipped
        assert "LoRA re-quantization (this WebUI does not merge LoRAs into GGUF weights)" in skipped
    else:
        assert "merge-once LoRA (this WebUI merges LoRAs into GGUF weights itself)" in skipped
        assert "memory-mapping" not in skipped
    hook.register_callbacks()
    assert _console_lines(capsys) == []   # said once


def test_wrappers_hand_every_argument_on_and_return_what_they_got(host: Host, tmp_path: Path) -> None:
    """Unknown keyword arguments reach the host's own function, which raises its own error for them; return values
    (Neo: ``(sd, metadata)`` with return_metadata=True) come back as the host made them."""
    parts = host.put("clip_l")
    hook.register_callbacks()
    load = host.m["backend.utils"].load_torch_file
    if host.name == "neo":
        assert load is host.standin.load_torch_file   # Neo maps GGUF itself: not wrapped at all
        from safetensors.torch import save_file
        tagged = str(tmp_path / "tagged.safetensors")
        save_file({"x": torch.zeros(2)}, tagged, metadata={"made_by": "test"})
        sd, metadata = host.m["backend.loader"].load_torch_file(tagged, return_metadata=True)
        assert set(sd) == {"x"} and metadata == {"made_by": "test"}
    else:
        assert getattr(load, hook.MARK) is host.standin.load_torch_file
        sd = load(parts["clip_l"], safe_load=True, device=None)
        assert set(sd) == set(host.standin.clip_l_state_dict())
        checkpoint = host.flux_gguf()
        with pytest.raises(TypeError, match="return_metadata"):   # Forge's own signature refuses it, as without us
            load(checkpoint, return_metadata=True)
    with pytest.raises(TypeError) as raised:
        host.m["modules.processing"].forge_model_reload(unknown_option=1)
    assert raised.value.__traceback__ is not None
    assert raised.value.__context__ is None     # the host's own error, not raised while handling one of ours


def test_transformer_only_flux_gets_clip_t5_ae_paired(host: Host) -> None:
    parts = host.put("clip_l", "t5xxl", "ae", "sd_vae")
    checkpoint = host.flux_gguf()
    with pytest.raises(AssertionError, match="You do not have CLIP state dict!"):
        host.generate(checkpoint, [])        # the host alone
    hook.register_callbacks()
    processed = host.generate(checkpoint, [])
    assert type(processed.sd_model).__name__ == "Flux"
    assert sorted(host.split_log()[-1]) == sorted([parts["clip_l"], parts["t5xxl"], parts["ae"]])
    assert host.loading_parameters()["additional_modules"] == []   # the user's selection stays theirs
    loads = len(host.split_log())
    again, reloaded = host.m["modules.sd_models"].forge_model_reload()
    assert again is processed.sd_model and reloaded is False and len(host.split_log()) == loads
    # the image says what it was made with; pasting it back selects exactly that
    assert re.findall(r"Module \d+: ([^,\n]+)", processed.info) == ["clip_l", "t5xxl_fp8_e4m3fn", "ae"]
    assert sorted(host.paste(processed.info)["VAE/TE"]) == _module_names(list(parts.values())[:3])


def test_loading_model_line_names_what_is_loaded(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    parts = host.put("clip_l", "t5xxl", "ae")
    flux, sdxl = host.flux_gguf(), host.sdxl()
    hook.register_callbacks()
    host.generate(flux, [])
    host.generate(sdxl, [parts["ae"], parts["t5xxl"]])
    printed = [line for line in _console_lines(capsys) if line.startswith("Loading Model:")]
    assert len(printed) == 2
    assert all(os.path.basename(parts[p]) in printed[0] for p in ("clip_l", "t5xxl", "ae"))
    assert "ae.safetensors" not in printed[1] and "t5xxl" not in printed[1] and "'additional_modules': []" in printed[1]


def test_missing_parts_stop_before_the_checkpoint_is_read(host: Host) -> None:
    host.put("clip_l")
    checkpoint = host.flux_gguf()
    hook.register_callbacks()
    read: list[str] = []
    loader = host.m["backend.loader"]
    original = loader.load_torch_file
    loader.load_torch_file = lambda path, *a, **k: (read.append(path), original(path, *a, **k))[1]
    with pytest.raises(MissingComponentsError) as info:
        host.generate(checkpoint, [])
    assert read == []
    assert info.value.missing == ["t5xxl", "ae"]
    message = str(info.value)
    assert "\n" not in message
    for needle in ("t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors",
                   os.path.join(str(host.models), "text_encoder"), os.path.join(str(host.models), "VAE")):
        assert needle in message
    assert "clip_l.safetensors" not in message


def test_sdxl_after_flux_gets_no_flux_modules_and_the_image_does_not_name_them(host: Host,
                                                                                 capsys: pytest.CaptureFixture[str]
                                                                                 ) -> None:
    parts = host.put("clip_l", "t5xxl", "ae", "sd_vae")
    flux, sdxl = host.flux_gguf(), host.sdxl()
    selection = [parts["clip_l"], parts["t5xxl"], parts["ae"]]
    host.generate(flux, selection)
    with pytest.raises(RuntimeError, match="size mismatch"):
        host.generate(sdxl, selection)        # the host alone: Forge #2255
    hook.register_callbacks()
    host.generate(flux, selection)
    processed = host.generate(sdxl, selection + [parts["sd_vae"]])
    assert type(processed.sd_model).__name__ == "StableDiffusionXL"
    assert host.split_log()[-1] == [parts["sd_vae"]]
    assert processed.sd_model.components["vae"]["decoder.conv_in.weight"].shape[1] == 4
    # issue 16.3: the infotext names only the module really loaded; pasting it back does not re-select Flux parts
    assert re.findall(r"Module \d+: ([^,\n]+)", processed.info) == ["sdxl_vae"]
    assert host.paste(processed.info)["VAE/TE"] == ["sdxl_vae.safetensors"]
    # the user's own selection is untouched (their next Flux job gets its modules back)
    assert _module_names(host.opts().forge_additional_modules) == _module_names(selection + [parts["sd_vae"]])
    # only SD selected modules: the infotext has no Module at all, and a paste changes no selection
    processed = host.generate(sdxl, selection)
    assert "Module" not in processed.info and "VAE/TE" not in host.paste(processed.info)
    assert "Module 1: ae" not in processed.info
    lines = _console_lines(capsys)
    assert not any("Loading Model:" in line and "ae.safetensors" in line and "sdxl.safetensors" in line
                   for line in lines)


def test_fallback_to_the_host_when_our_code_raises(host: Host, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    parts = host.put("clip_l", "t5xxl", "ae")
    checkpoint = host.flux_gguf()
    hook.register_callbacks()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(hook, "describe_file", broken)
    monkeypatch.setattr(hook, "load_gguf_mapped", broken)
    selection = [parts["clip_l"], parts["t5xxl"], parts["ae"]]
    assert type(host.generate(checkpoint, selection).sd_model).__name__ == "Flux"
    assert sorted(host.split_log()[-1]) == sorted(selection)
    lines = [line for line in _console_lines(capsys) if line.startswith("[fluxq]") and "failed" in line]
    assert len(lines) == (2 if host.name == "forge" else 1)   # Neo: no memory-mapping patch to fail
    assert all("disk on fire" in line and "the WebUI's own behaviour" in line for line in lines)
    with pytest.raises(AssertionError, match="CLIP state dict") as raised:   # the host's own error, not ours
        host.generate(checkpoint, [])
    assert raised.value.__context__ is None


def test_pairing_off_is_the_hosts_own_behaviour(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.5: with "add missing CLIP-L / T5 / VAE" off (all three files present) fluxq says nothing about
    downloading: the host's own error, as without fluxq."""
    parts = host.put("clip_l", "t5xxl", "ae")
    flux, sdxl = host.flux_gguf(), host.sdxl()
    hook.register_callbacks()
    for callback in host.m["modules.script_callbacks"].callbacks.ui_settings:
        callback()
    opts = host.opts()
    opts.set("fluxq_pair_components", False)
    capsys.readouterr()
    box = host.ui_generate(flux, [])
    assert box == ("AssertionError: You do not have CLIP state dict!")
    with pytest.raises(AssertionError, match="CLIP state dict"):
        host.generate(flux, [])
    console = "\n".join(_console_lines(capsys))
    assert "Download" not in console
    assert "picks them up" not in console
    assert "[fluxq]" not in console
    opts.set("fluxq_missing_check", False)
    opts.set("fluxq_pair_components", True)
    with pytest.raises(AssertionError, match="CLIP state dict"):   # pairing on, nothing on disk, check off
        for path in parts.values():
            os.remove(path)
        host.m["modules_forge.main_entry"].refresh_models()
        host.generate(flux, [])
    host.put("ae")
    opts.set("fluxq_drop_mismatched", False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        host.generate(sdxl, [os.path.join(str(host.models), "VAE", "ae.safetensors")])


def test_missing_parts_are_one_line_in_the_page_and_in_the_console(host: Host,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.7, the page: Generate → the generation thread → the error box."""
    host.put("clip_l")
    checkpoint = host.flux_gguf()
    hook.register_callbacks()
    host.select(checkpoint, [])
    capsys.readouterr()
    box = host.ui_run()
    assert box is not None and box.startswith("MissingComponentsError: flux-Q4_0.gguf ") and "\n" not in box
    assert "t5xxl_fp8_e4m3fn.safetensors" in box
    lines = _console_lines(capsys)
    assert len(lines) == 1, lines
    assert "flux-Q4_0.gguf" in lines[0] and "ae.safetensors" in lines[0]
    # the next Generate, files still missing: the same, once again
    assert host.ui_run() == box and len(_console_lines(capsys)) == 1


def test_missing_parts_are_one_line_through_the_api(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    host.put("clip_l")
    checkpoint = host.flux_gguf()
    hook.register_callbacks()
    host.select(checkpoint, [])
    capsys.readouterr()
    status, body = host.api_run()
    assert status == 500 and "\n" not in body["detail"] and "ae.safetensors" in body["detail"]
    lines = _console_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("[fluxq] flux-Q4_0.gguf "), lines


def test_host_errors_reach_the_user_as_the_host_raised_them(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.7: the host's own exception (a VAE that does not fit, selected with pairing's drop switched off)
    is shown and printed exactly as without fluxq, with one frame of ours in its traceback (the load wrapper)."""
    parts = host.put("ae")
    sdxl = host.sdxl()
    hook.register_callbacks()
    for callback in host.m["modules.script_callbacks"].callbacks.ui_settings:
        callback()
    host.opts().set("fluxq_drop_mismatched", False)
    host.select(sdxl, [parts["ae"]])
    capsys.readouterr()
    box = host.ui_run()
    assert box is not None and box.startswith("RuntimeError: Error(s) in loading state_dict")
    printed = capsys.readouterr()
    trace = printed.out + printed.err
    assert "Traceback (most recent call last)" in trace and "During handling" not in trace
    ours = re.findall(r'File "[^"]*lib_fluxq[^"]*", line \d+, in (\w+)', trace)
    assert ours == ["forge_model_reload"], ours


def test_settings_list_what_applies_on_this_host(host: Host) -> None:
    hook.register_callbacks()
    for callback in host.m["modules.script_callbacks"].callbacks.ui_settings:
        callback()
    labels = host.opts().data_labels
    ours = {k for k in labels if k.startswith("fluxq_")}
    common = {"fluxq_pair_components", "fluxq_missing_check", "fluxq_drop_mismatched", "fluxq_gguf_iq4",
              "fluxq_apply_gpu_weights"}
    expected = common | ({"fluxq_gguf_mmap", "fluxq_lora_requant"} if host.name == "forge" else set())
    assert ours >= expected
    assert "fluxq_gguf_mmap" not in ours if host.name == "neo" else "fluxq_lora_merge" not in ours
    assert all(labels[k].section == ("fluxq", "fluxq") for k in ours)
    assert labels["fluxq_apply_gpu_weights"].default is False


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(real):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see the file map")
def test_gguf_stays_memory_mapped_through_the_model_load(host: Host) -> None:
    """Forge: fluxq's patch maps the file; Neo maps it itself (and gets no patch). Same outcome on both."""
    checkpoint = host.flux_gguf()
    hook.register_callbacks()
    state_dict = host.m["backend.utils"].load_torch_file(checkpoint)
    ranges = _mapped_ranges(checkpoint)
    assert ranges, "the GGUF file is not mapped"
    reader = gguf.GGUFReader(checkpoint)
    for tensor in reader.tensors:
        param = state_dict[tensor.name]
        for t in (param, param.to(device="cpu")):     # the model load does .to(device)
            pointer = t.data_ptr()
            assert any(a <= pointer < b for a, b in ranges), tensor.name
            assert tuple(t.shape) == tuple(reversed([int(v) for v in tensor.shape]))
            assert np.array_equal(t.data.numpy().reshape(-1).view(np.uint8),
                                  np.asarray(tensor.data).reshape(-1).view(np.uint8))
        assert (param.gguf_cls is None) == (tensor.tensor_type in (T.F32, T.F16))
        if param.gguf_cls is not None:
            baked = param.to(device="cpu")
            baked.gguf_cls.bake(baked)
            baked.computation_dtype = torch.float32
            values = host.m["backend.operations_gguf"].dequantize_tensor(baked)
            expected = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            assert np.array_equal(values.numpy(), expected)


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS])
def test_iq4_types_load_and_dequantize_like_ggml(host: Host, qtype: T) -> None:
    checkpoint = host.flux_gguf(qtype)
    param = host.m["backend.utils"].load_torch_file(checkpoint)["double_blocks.0.img_attn.qkv.weight"]
    assert param.gguf_cls is None    # the host alone: no class for the type, raw bytes reach the layer
    hook.register_callbacks()
    enum = host.host_enum()
    added = {k: v for k, v in host.gguf_mapping().items() if k.name in ("IQ4_NL", "IQ4_XS")}
    assert len(added) == 2 and all(type(k) is enum for k in added)   # keyed by the host's own gguf enum
    state_dict = host.m["backend.utils"].load_torch_file(checkpoint)
    reader = {t.name: t for t in gguf.GGUFReader(checkpoint).tensors}
    checked = 0
    for name, param in state_dict.items():
        if reader[name].tensor_type != qtype:
            continue
        weight = param.to(device="cpu")
        weight.gguf_cls.bake(weight)
        weight.computation_dtype = torch.float32
        values = host.m["backend.operations_gguf"].dequantize_tensor(weight)
        packed = np.asarray(reader[name].data).reshape(-1)
        expected = ggml_ref.dequantize(packed, qtype, values.numel()).reshape(tuple(values.shape))
        assert np.array_equal(values.numpy(), expected), name
        checked += 1
    assert checked > 0


def test_t5_precision_follows_the_ram_the_system_has_free(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pairing gets the RAM free now (psutil's ``available``), not the total: with both T5 files on disk, one
    byte under the family table's boundary pairs fp8, the boundary itself fp16."""
    import psutil

    from lib_fluxq import families
    parts = host.put("clip_l", "t5xxl", "ae")
    fp16 = hook_hosts.forge.write(host.models / "text_encoder" / "t5xxl_fp16.safetensors",
                                  hook_hosts.forge.t5xxl_state_dict(torch.float16))
    host.m["modules_forge.main_entry"].refresh_models()
    checkpoint = host.flux_gguf()
    hook.register_callbacks()
    boundary = families.companion("t5xxl").full_precision_min_free_ram
    real = psutil.virtual_memory()
    for available, expected, other in ((boundary - 1, parts["t5xxl"], fp16), (boundary, fp16, parts["t5xxl"])):
        memory = real._replace(total=4 * boundary, available=available, free=available)
        monkeypatch.setattr(psutil, "virtual_memory", lambda memory=memory: memory)
        host.generate(checkpoint, [])
        loaded = host.split_log()[-1]
        assert expected in loaded and other not in loaded, (available, loaded)
