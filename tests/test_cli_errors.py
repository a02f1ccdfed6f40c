"""Every command against broken inputs: one ``error:`` line naming the file, exit code >= 1, no traceback, no file
changed or written; torch is not imported for argument errors or header-only work; folder scans list each real file
once with the broken ones last."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import pytest
import torch

from tests.fixtures import (
    drop_root_permission_override,
    random_flux_state_dict,
    recipe_qtype,
    write_gguf,
    write_safetensors,
)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.pop("FLUXQ_TRACEBACK", None)

# command -> argv for one input path. advise / ui take a folder (--models): any file input is a bad folder.
COMMANDS = {
    "inspect": lambda p: ["inspect", p],
    "convert": lambda p: ["convert", p, "--to", "Q8_0"],
    "compare": lambda p: ["compare", p, "--levels", "Q8_0", "--no-progress"],
    "advise": lambda p: ["advise", "--vram", "8", "--ram", "16", "--models", p],
    "ui": lambda p: ["ui", "--models", p, "--port", "0"],
}
# inputs a command accepts as they are: an empty folder is a valid (empty) models folder for advise and the tab, and
# the tab creates a missing models folder on its first download.
ACCEPTED = {"advise": {"empty_folder", "directory_as_file"}, "ui": {"empty_folder", "directory_as_file", "missing"}}


def _build_inputs(root: Path) -> dict[str, Path]:
    """Broken inputs of every kind, built as real files (names say what the extension claims)."""
    (root / "src").mkdir()
    good = write_safetensors(root / "src" / "good.safetensors", random_flux_state_dict())
    good_gguf = root / "src" / "good.gguf"
    write_gguf(good_gguf, random_flux_state_dict(), recipe_qtype(gguf.GGMLQuantizationType.Q8_0))
    raw, graw = good.read_bytes(), good_gguf.read_bytes()
    cases: dict[str, Path] = {}

    def put(kind: str, name: str, data: bytes) -> None:
        path = root / kind / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        cases[kind] = path

    put("empty_safetensors", "empty.safetensors", b"")
    put("empty_gguf", "empty.gguf", b"")
    header_length = struct.unpack("<Q", raw[:8])[0]
    put("truncated_safetensors_header", "cut.safetensors", raw[:8 + header_length // 2])
    put("truncated_safetensors_data", "cut.safetensors", raw[:len(raw) // 2])
    put("truncated_gguf_header", "cut.gguf", graw[:64])
    put("truncated_gguf_data", "cut.gguf", graw[:len(graw) // 2])
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    put("random_gguf", "noise.gguf", bytes(noise.tolist()))
    put("random_safetensors", "noise.safetensors", bytes(noise.tolist()))
    put("passwd_text", "passwd.safetensors", b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n")
    put("html_page", "flux1-dev.safetensors", b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    put("huge_header_length", "huge.safetensors", struct.pack("<Q", 1 << 62) + b'{"a": 1}' + b"\0" * 64)
    body = b"[1, 2, 3]"
    put("header_json_list", "list.safetensors", struct.pack("<Q", len(body)) + body)
    body = b'{"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]'  # JSON cut inside the object
    put("header_json_broken", "json.safetensors", struct.pack("<Q", len(body)) + body + b"\0" * 8)
    body = b'{"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 8]}}'
    put("unknown_dtype", "dtype.safetensors", struct.pack("<Q", len(body)) + body + b"\0" * 8)
    bad_version = bytearray(graw)
    bad_version[4:8] = struct.pack("<I", 0x7A7A7A7A)
    put("gguf_bad_version", "version.gguf", bytes(bad_version))
    put("pickle_protocol4", "model.pt", pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}, protocol=4))
    (root / "ckpt").mkdir()
    ckpt = root / "ckpt" / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)  # PyTorch's zip container, as real .ckpt files are
    assert zipfile.is_zipfile(ckpt)
    cases["ckpt_zip_pickle"] = ckpt
    (root / "dir" / "model.safetensors").mkdir(parents=True)
    cases["directory_as_file"] = root / "dir" / "model.safetensors"
    (root / "empty_folder").mkdir()
    cases["empty_folder"] = root / "empty_folder"
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "model.safetensors")  # opening it for reading would block: must be refused first
    cases["fifo"] = root / "fifo" / "model.safetensors"
    (root / "loop").mkdir()
    os.symlink(root / "loop" / "b.gguf", root / "loop" / "a.gguf")
    os.symlink(root / "loop" / "a.gguf", root / "loop" / "b.gguf")
    cases["symlink_loop"] = root / "loop" / "a.gguf"
    (root / "dangling").mkdir()
    os.symlink(root / "dangling" / "gone.safetensors", root / "dangling" / "model.safetensors")
    cases["dangling_symlink"] = root / "dangling" / "model.safetensors"
    cases["missing"] = root / "nowhere" / "flux1-dev-Q4_0.gguf"
    cases["path_through_a_file"] = cases["passwd_text"] / "model.gguf"
    # no read permission: the commands run without root's permission override (drop_root_permission_override)
    put("no_read_permission", "locked.safetensors", raw)
    cases["no_read_permission"].chmod(0)
    (root / "locked_folder" / "models").mkdir(parents=True)
    write_safetensors(root / "locked_folder" / "models" / "inside.safetensors", random_flux_state_dict())
    (root / "locked_folder" / "models").chmod(0)
    cases["no_read_permission_folder"] = root / "locked_folder" / "models"
    return cases


def _fingerprint(root: Path) -> dict[str, str]:
    """Every entry under ``root``: sha256 of regular files, the kind of everything else (symlinks not followed)."""
    out = {}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            path = Path(directory) / name
            if path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
            elif path.is_fifo():
                out[str(path)] = "fifo"
            elif path.is_dir():
                out[str(path)] = "dir"
            else:
                try:  # root (the test process keeps its permission override) hashes the locked file too
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                except PermissionError:
                    out[str(path)] = f"unreadable:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    return out


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "lib_fluxq", *argv], cwd=cwd, env=ENV, capture_output=True,
                              text=True, timeout=timeout, preexec_fn=drop_root_permission_override)
    except subprocess.TimeoutExpired as exc:  # e.g. a FIFO opened for reading, or the tab started a server
        return subprocess.CompletedProcess(argv, -1, stdout=str(exc.stdout), stderr="TIMEOUT")


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("broken")
    return root, _build_inputs(root)


def test_every_command_gives_one_line_for_every_broken_input(broken) -> None:
    root, cases = broken
    cwd = root / "cwd"  # outputs would land next to the source or here: nothing may appear anywhere
    cwd.mkdir(exist_ok=True)
    before = _fingerprint(root)
    jobs = [(command, kind, path) for command in COMMANDS for kind, path in cases.items()
            if kind not in ACCEPTED.get(command, ())]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: _run(COMMANDS[job[0]](str(job[2])), cwd), jobs))
    failures = []
    for (command, kind, path), done in zip(jobs, results, strict=True):
        output = done.stdout + done.stderr
        lines = [line for line in output.splitlines() if line.strip()]
        problems = []
        if done.returncode < 1 or done.returncode == 70:
            problems.append(f"exit code {done.returncode}")
        if "Traceback" in output or "internal error" in output or "TIMEOUT" in output:
            problems.append("traceback, internal error or hang")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines")
        elif not lines[0].startswith("error: ") or str(path) not in lines[0]:
            problems.append("the line does not start with 'error:' or does not name the file")
        if problems:
            failures.append(f"{command} {kind}: {'; '.join(problems)}\n    {output.strip()[:400]}")
    assert not failures, "\n".join(failures)
    assert _fingerprint(root) == before  # no input changed, nothing written (cwd stays empty too)


def test_messages_say_what_the_file_is_by_content_and_quote_no_bytes(broken) -> None:
    """The extension does not decide the diagnosis, and nothing read from a non-model file appears in a message."""
    root, cases = broken
    expected = {
        "empty_gguf": "is empty", "empty_safetensors": "is empty",
        "random_gguf": "not a GGUF file, nor a safetensors file",
        "random_safetensors": "not a GGUF file, nor a safetensors file",
        "passwd_text": "is a text file", "html_page": "is a web page",
        "huge_header_length": "truncated safetensors", "truncated_safetensors_header": "truncated safetensors",
        "truncated_gguf_data": "download it again", "truncated_safetensors_data": "download it again",
        "header_json_list": "expected an object", "header_json_broken": "not valid JSON",
        "pickle_protocol4": "pickle", "ckpt_zip_pickle": "pickle",
        "symlink_loop": "symbolic link loop", "dangling_symlink": "symbolic link to a missing file",
        "fifo": "not a regular file", "directory_as_file": "is a folder", "missing": "file not found",
        "path_through_a_file": "file not found", "gguf_bad_version": "unknown version",
        "no_read_permission": "permission denied",
    }
    jobs = list(expected.items())
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: _run(["convert", str(cases[job[0]]), "--to", "Q8_0"], root), jobs))
    for (kind, phrase), done in zip(jobs, results, strict=True):
        assert phrase in done.stderr, (kind, done.stderr)
    # the first bytes of the text file, as text and as the little-endian number a length field would read
    leaked = cases["passwd_text"].read_bytes()[:8]
    number = str(struct.unpack("<Q", leaked)[0])
    for done in results:
        assert leaked.decode() not in done.stderr.replace(str(root), "") and number not in done.stderr
    assert str(0x7A7A7A7A) not in results[jobs.index(("gguf_bad_version", "unknown version"))].stderr


def test_inspect_lists_each_real_file_once_and_broken_files_last(tmp_path) -> None:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "VAE").mkdir()
    write_gguf(models / "Stable-diffusion" / "flux.gguf", random_flux_state_dict(),
               recipe_qtype(gguf.GGMLQuantizationType.Q8_0))
    (models / "Stable-diffusion" / "a-broken.safetensors").write_bytes(b"")
    write_safetensors(models / "VAE" / "z-second.safetensors", random_flux_state_dict())
    os.symlink(models, models / "Stable-diffusion" / "parent")              # a link back up the tree
    os.symlink(models / "VAE" / "z-second.safetensors", models / "VAE" / "alias.safetensors")
    done = subprocess.run([sys.executable, "-m", "lib_fluxq", "inspect", str(tmp_path), str(models / "VAE"), "--json"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    reports = json.loads(done.stdout)
    real = [os.path.realpath(r["path"]) for r in reports]
    assert len(real) == len(set(real)) == 3, [r["path"] for r in reports]
    assert [r["status"] for r in reports] == ["ok", "ok", "unreadable"]
    assert reports[-1]["path"].endswith("a-broken.safetensors") and "is empty" in reports[-1]["error"]
    assert done.returncode == 1  # a broken file is reported as a failure, after the table
    table = subprocess.run([sys.executable, "-m", "lib_fluxq", "inspect", str(tmp_path)], env=ENV,
                           capture_output=True, text=True, timeout=120)
    rows = [line for line in table.stdout.splitlines() if line and not line.startswith(("FILE", " "))]
    assert [row.split()[0] for row in rows] == ["flux.gguf", "z-second.safetensors", "a-broken.safetensors"]


def test_advise_and_the_tab_list_each_real_file_once_and_broken_files_last(tmp_path) -> None:
    """The same folder, with a link back up the tree and a second name for a file, through advise --models and the
    tab's file table (given the models root and a subfolder, as a WebUI host does): each real file once, the broken
    one last as unreadable with its reason."""
    from lib_fluxq.ui import handlers

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    good = models / "Stable-diffusion" / "flux-Q8_0.gguf"
    write_gguf(good, random_flux_state_dict(), recipe_qtype(gguf.GGMLQuantizationType.Q8_0))
    (models / "Stable-diffusion" / "a-cut-Q8_0.gguf").write_bytes(good.read_bytes()[:3000])  # sorts first by name
    os.symlink(models, models / "Stable-diffusion" / "parent")
    os.symlink(good, models / "Stable-diffusion" / "alias-Q8_0.gguf")
    done = subprocess.run([sys.executable, "-m", "lib_fluxq", "advise", "--vram", "8", "--ram", "16", "--models",
                           str(models), "--json"], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)["files"]
    assert sorted(f["name"] for f in files) == ["a-cut-Q8_0.gguf", "flux-Q8_0.gguf"], files
    assert files[-1]["name"] == "a-cut-Q8_0.gguf" and files[-1]["verdict"] == "unreadable", files
    assert "download it again" in files[-1]["reason"]
    plan = handlers.make_plan(handlers.detect_machine(), "", 8, 16)
    inventory = handlers.inventory(handlers.new_listing([str(models), str(models / "Stable-diffusion")]), plan)
    real = [os.path.realpath(entry.real) for entry in inventory.files]
    assert real == [str(good.resolve()), str((models / "Stable-diffusion" / "a-cut-Q8_0.gguf").resolve())], real
    rows = handlers.model_rows(inventory)
    assert len(rows) == 2 and rows[-1][0] == "a-cut-Q8_0.gguf" and rows[-1][2] == "unreadable", rows
    assert "download it again" in rows[-1][-1]


_PROBE = """
import sys
from lib_fluxq.__main__ import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # argparse's usage errors
    code = exc.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code, file=sys.stderr)
"""


def test_errors_and_header_only_work_do_not_import_torch(broken, tmp_path) -> None:
    """Argument errors of every command, file errors of inspect / convert / compare, and inspect's header-only work
    answer without importing torch (its import alone takes seconds)."""
    root, cases = broken
    good = root / "src" / "good.safetensors"
    runs = [
        ["inspect"], ["inspect", str(root / "src")], ["inspect", str(cases["passwd_text"])],
        ["compare", "--blocks", "two"], ["compare", str(cases["empty_gguf"])], ["compare", "--res", "100x100"],
        ["convert", str(good)], ["convert", str(cases["random_gguf"]), "--to", "Q8_0"],
        ["advise", "--vram", "lots"], ["ui", "--port", "99999"], ["ui", "--models", str(good)],
        ["nonsense-command"],
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(
            lambda argv: subprocess.run([sys.executable, "-c", _PROBE, *argv], env=ENV, cwd=tmp_path,
                                        capture_output=True, text=True, timeout=120), runs))
    for argv, done in zip(runs, results, strict=True):
        assert "NO-TORCH" in done.stderr, (argv, done.stderr[-500:])


def test_ui_names_the_real_import_error(tmp_path) -> None:
    """gradio installed but failing on import (as gradio 4.40 does with a huggingface_hub that lacks HfFolder) is
    reported with that error, not as "needs gradio"; a missing gradio says how to install it."""
    fake = tmp_path / "site" / "gradio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from huggingface_hub import HfFolderThatDoesNotExist  # noqa\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "lib_fluxq", "ui", "--models", str(tmp_path / "models")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "gradio is installed but cannot be imported" in done.stderr and "HfFolderThatDoesNotExist" in done.stderr
    assert "requirements-ui.txt" in done.stderr
    missing = ("import sys; sys.modules['gradio'] = None; from lib_fluxq.__main__ import main; "
               "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", missing, "ui", "--models", str(tmp_path / "models")], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "the ui command needs gradio" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "models").exists()  # nothing created when the app cannot start
