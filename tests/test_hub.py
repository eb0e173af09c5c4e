"""The Hub code repository: `hub stage` copies exactly what `custom_pipeline` needs and `hub push` fails cleanly.

Nothing here reaches the Hub. conftest sets HF_HUB_OFFLINE=1 and every in-process test also forces offline mode on
huggingface_hub's constant (it reads the variable once, at import); the one test that lets requests through runs in a
subprocess whose endpoint is a closed port on 127.0.0.1.
"""

import inspect
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import HF_MODULES_CACHE
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from huggingface_hub import ModelCard
from tiny_models import SMALL_CALL, seeded

from cross_image_attention import hub

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    "pipeline.py", "pipeline_cross_image.py", "cross_image_plan.py", "attention_control.py",
    "attention_processors.py", "inversion.py", "inputs.py", "sd_glue.py", "adain.py", "freeu.py", "segmentation.py",
}  # fmt: skip
STAGED = MODULES | {"README.md", "LICENSE"}
NEVER_STAGED = ("cli.py", "hub.py", "__init__.py", "__main__.py", "tests", "examples")
PUSH = ["push", "--repo-id", "someone/cross-image-attention"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    output = tmp_path_factory.mktemp("hub") / "repo"
    assert hub.main(["stage", "--output", str(output)]) == 0
    return output


@pytest.fixture
def source(tmp_path):
    """A copy of the files a stage reads, for tests that break one of them."""
    folder = tmp_path / "source"
    folder.mkdir()
    for name in STAGED:
        shutil.copyfile(REPO_ROOT / name, folder / name)
    return folder


def error_line(capsys) -> str:
    """The command's stderr, which must be exactly one `error: ...` line."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    return err


def names(folder: Path) -> set:
    return {path.name for path in folder.iterdir()}


def test_stage_copies_exactly_the_hub_repo_files(staged):
    # What diffusers itself resolves when it loads `pipeline.py` from the Hub (it follows imports recursively).
    needed = {Path(file).name for file in get_relative_import_files(str(REPO_ROOT / "pipeline.py"))}
    assert needed | {"pipeline.py"} == MODULES
    assert names(staged) == STAGED
    for name in STAGED:
        assert (staged / name).read_bytes() == (REPO_ROOT / name).read_bytes(), name
    for name in NEVER_STAGED:
        assert not (staged / name).exists(), name


def test_stage_lists_the_staged_files(tmp_path, capsys):
    assert hub.main(["stage", "--output", str(tmp_path / "repo")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert {line.strip() for line in out.splitlines()} >= STAGED


def test_staged_model_card(staged):
    card = ModelCard.load(staged / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == "mit"
    assert {"diffusers", "community-pipeline"} <= set(card.data.tags)
    assert "MIT License" in (staged / "LICENSE").read_text()


def test_staged_folder_loads_as_custom_pipeline(staged, saved_sd_dir, cat_image, astronaut_image, monkeypatch):
    # Local custom code shares one flat cache package, `diffusers_modules.local`: an earlier load from the
    # repository root left its modules in `sys.modules`, where they would be reused instead of the staged copies.
    for name in [name for name in sys.modules if name.startswith("diffusers_modules.local.")]:
        monkeypatch.delitem(sys.modules, name)
    pipe = DiffusionPipeline.from_pretrained(
        saved_sd_dir, custom_pipeline=str(staged), trust_remote_code=True, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "CrossImageAttentionPipeline"
    module_file = Path(inspect.getfile(type(pipe)))
    assert module_file.is_relative_to(HF_MODULES_CACHE)
    assert module_file.read_bytes() == (staged / module_file.name).read_bytes()
    call = {**SMALL_CALL, "generator": seeded(0), "output_type": "latent"}
    latents = pipe(cat_image, astronaut_image, **call).images
    assert latents.shape[-2:] == (8, 8) and torch.isfinite(latents).all()


def test_stage_refuses_a_non_empty_folder_without_overwrite(tmp_path, capsys):
    output = tmp_path / "repo"
    (output / ".git").mkdir(parents=True)
    (output / "stale.py").write_text("")
    (output / "pipeline.py").write_text("old")
    (output / "README.md").write_text("old card")
    assert hub.main(["stage", "--output", str(output)]) == 1
    assert "--overwrite" in error_line(capsys)
    assert names(output) == {".git", "stale.py", "pipeline.py", "README.md"}
    assert hub.main(["stage", "--output", str(output), "--overwrite"]) == 0
    assert "Removed 1 files of a previous staging that this one lacks: stale.py" in capsys.readouterr().out
    # Stale modules go, the staged files are replaced, anything else (a clone's `.git` folder) stays.
    assert names(output) == STAGED | {".git"}
    assert (output / "README.md").read_bytes() == (REPO_ROOT / "README.md").read_bytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [({"notes.txt": "mine"}, "holds files a staging does not write (notes.txt)"), ({"tool.py": ""}, "no pipeline.py")],
)
def test_overwrite_refuses_a_folder_that_is_not_a_staging(tmp_path, capsys, content, message):
    output = tmp_path / "work"
    output.mkdir()
    for name, text in content.items():
        (output / name).write_text(text)
    assert hub.main(["stage", "--output", str(output), "--overwrite"]) == 1
    assert message in error_line(capsys)
    assert names(output) == set(content)  # nothing deleted


def test_hub_argument_errors_are_one_line(capsys):
    assert hub.main(["stage"]) == 1
    assert "--output" in error_line(capsys)


def test_stage_refuses_the_source_folder(source, capsys):
    assert hub.main(["stage", "--source", str(source), "--output", str(source), "--overwrite"]) == 1
    assert "source folder" in error_line(capsys)
    assert names(source) == STAGED


def edit(name: str, old: str, new: str):
    def apply(source: Path):
        path = source / name
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    return apply


def delete(name: str):
    return lambda source: (source / name).unlink()


BROKEN_SOURCES = {
    "no front matter": (edit("README.md", "---\nlibrary_name", "library_name"), "no YAML front matter"),
    "invalid yaml": (edit("README.md", "license: mit", "license: [mit"), "not a valid model card"),
    "wrong library": (edit("README.md", "library_name: diffusers", "library_name: transformers"), "library_name"),
    "no base model": (edit("README.md", "base_model: ", "base_modell: "), "base_model"),
    "no tags": (edit("README.md", "tags:", "keywords:"), "tags"),
    "no model card": (delete("README.md"), "README.md.*clone"),
    "no licence": (delete("LICENSE"), "LICENSE.*clone"),
    "module missing": (delete("freeu.py"), "freeu"),
    # pipeline_cross_image.py still imports segmentation, which pipeline.py no longer names itself.
    "indirect module": (edit("pipeline.py", "from .segmentation", "# from .segmentation"), "segmentation"),
    "package import": (edit("pipeline.py", "from .adain", "from . import adain\nfrom .adain"), r"`from \. import"),
}


@pytest.mark.parametrize("breakage, message", BROKEN_SOURCES.values(), ids=BROKEN_SOURCES.keys())
def test_stage_rejects_a_broken_source(source, breakage, message, tmp_path, capsys):
    breakage(source)
    output = tmp_path / "repo"
    assert hub.main(["stage", "--source", str(source), "--output", str(output)]) == 1
    assert re.search(message, error_line(capsys))
    assert not output.exists()  # everything is checked before the output folder is touched


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls and the files of the uploaded folder.

    Each call's arguments are bound to the real method's signature, so a keyword huggingface_hub lacks fails here.
    """

    calls = []
    uploaded = set()

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def record(self, method, *args, **kwargs):
        inspect.signature(getattr(huggingface_hub.HfApi, method)).bind(self, *args, **kwargs)
        self.calls.append((method, *args, kwargs))

    def create_repo(self, *args, **kwargs):
        self.record("create_repo", *args, **kwargs)

    def create_branch(self, *args, **kwargs):
        self.record("create_branch", *args, **kwargs)

    def upload_folder(self, **kwargs):
        self.record("upload_folder", **kwargs)
        # The folder is a temporary one, removed when the command ends.
        type(self).uploaded = names(Path(kwargs["folder_path"]))
        sha = "0123456789abcdef0123456789abcdef01234567"
        return SimpleNamespace(oid=sha, commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{sha}")


def test_push_uploads_the_staged_folder(monkeypatch, capsys):
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setattr(RecordingHfApi, "uploaded", set())
    argv = [*PUSH, "--token", "hf_dummy", "--revision", "dev", "--private", "--commit-message", "v1"]
    assert hub.main(argv) == 0
    repo_id = PUSH[-1]
    assert RecordingHfApi.calls[:3] == [
        ("init", "hf_dummy"),
        ("create_repo", repo_id, {"repo_type": "model", "private": True, "exist_ok": True}),
        ("create_branch", repo_id, {"branch": "dev", "repo_type": "model", "exist_ok": True}),
    ]
    method, upload = RecordingHfApi.calls[3]
    assert method == "upload_folder" and RecordingHfApi.uploaded == STAGED
    upload.pop("folder_path")
    assert upload == {
        "repo_id": repo_id,
        "repo_type": "model",
        "revision": "dev",
        "commit_message": "v1",
        "delete_patterns": "*.py",
    }
    out = capsys.readouterr().out
    assert 'custom_revision="0123456789abcdef0123456789abcdef01234567"' in out
    assert f'custom_pipeline="{repo_id}"' in out


def test_push_offline_fails_with_one_line(capsys):
    assert hub.main([*PUSH, "--token", "hf_dummy"]) == 1
    err = error_line(capsys)
    assert "cannot reach the Hugging Face Hub" in err and "HF_HUB_OFFLINE" in err


def test_push_without_token(monkeypatch, tmp_path, capsys):
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub reads the token file's location from HF_HOME once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert hub.main(PUSH) == 1
    assert error_line(capsys) == "error: no token: pass --token or log in with `hf auth login`\n"


def closed_port() -> int:
    """A local TCP port nothing listens on: the OS hands out a free one, which is closed again at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_push_unreachable_hub(tmp_path):
    # A fresh interpreter, so that huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE=0 at import; proxies on the
    # closed port as well catch any request that would not go to the endpoint. `hub.py` runs as a script, which
    # imports neither torch nor the package (`python -m` is covered in-process below).
    dead = f"http://127.0.0.1:{closed_port()}"
    env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead)
    env.update(HF_HOME=str(tmp_path), HF_TOKEN="hf_dummy")
    for variable in ("TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        env.pop(variable, None)
    command = [sys.executable, str(REPO_ROOT / "hub.py"), *PUSH]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: cannot reach the Hugging Face Hub: ")


def test_runs_as_package_module(monkeypatch, capsys):
    """`python -m cross_image_attention.hub` is `runpy.run_module` with `run_name="__main__"`."""
    # A fresh copy is run as `__main__`; without this runpy warns that the module was imported already.
    monkeypatch.delitem(sys.modules, "cross_image_attention.hub")
    monkeypatch.setattr(sys, "argv", ["hub", *PUSH, "--token", "hf_dummy"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("cross_image_attention.hub", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 1
    assert "cannot reach the Hugging Face Hub" in error_line(capsys)


@pytest.mark.parametrize(
    "entry, class_name, siblings, base_model",
    [
        (
            "pipeline_prompt_editing.py",
            "FreePromptEditingPipeline",
            {"attention_control.py", "attention_processors.py", "ddim_inversion.py", "inputs.py", "sd_glue.py"},
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ),
        (
            "pipeline_style_prompting_xl.py",
            "StylePromptingXLPipeline",
            {"attention_control.py", "attention_processors.py", "inputs.py", "sd_glue.py", "style_prompting.py"},
            "stabilityai/stable-diffusion-xl-base-1.0",
        ),
    ],
)
def test_stage_one_repo_per_technique(entry, class_name, siblings, base_model, tmp_path, saved_sd_dir, monkeypatch):
    staged = hub.stage(tmp_path / "repo", entry=entry)
    assert set(staged.files) == {"pipeline.py", *siblings, "README.md", "LICENSE"}
    assert (tmp_path / "repo" / "pipeline.py").read_bytes() == (REPO_ROOT / entry).read_bytes()
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert card.data.base_model == staged.base_model == base_model
    assert card.data.library_name == "diffusers"
    if entry == "pipeline_prompt_editing.py":  # loads through custom_pipeline as that technique's pipeline
        for name in [name for name in sys.modules if name.startswith("diffusers_modules.local.")]:
            monkeypatch.delitem(sys.modules, name)
        pipe = DiffusionPipeline.from_pretrained(
            saved_sd_dir, custom_pipeline=str(tmp_path / "repo"), trust_remote_code=True, safety_checker=None
        )
        assert type(pipe).__name__ == class_name


def test_stage_refuses_an_unknown_entry(tmp_path, capsys):
    assert hub.main(["stage", "--output", str(tmp_path / "repo"), "--entry", "cli.py"]) == 1
    assert "--entry must be one of pipeline.py" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
