"""Stage and upload the code-only Hub repository that `custom_pipeline` loads.

    cross-image-attention hub stage --output build/hub
    cross-image-attention hub push --repo-id your-name/cross-image-attention
    python -m cross_image_attention.hub ...   # the same commands
    python hub.py ...                         # the same, from a clone, without torch or the package installed

The Hub artifact of this project holds code, not weights: `pipeline.py`, every sibling module it imports, the model
card (`README.md`) and the licence (`LICENSE`). Users load Stable Diffusion 1.5 and point `custom_pipeline` at it:

    DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        custom_pipeline="your-name/cross-image-attention",
        custom_revision="<commit sha>",
        trust_remote_code=True,
    )

`stage` copies exactly those files into a folder, which works as a local `custom_pipeline` too; `push` stages into a
temporary folder and uploads it with `huggingface_hub`. The modules are found the way diffusers finds them: through
the `from .module import name` lines of `pipeline.py`, followed recursively, so nothing the Hub loader needs is
missing (the command line, tests and examples are never staged). Before anything is written the model card must parse
with `huggingface_hub.ModelCard` and name `library_name: diffusers`, a `base_model`, a `license` and `tags`.

The files are read from the folder of this module (`--source` overrides it). A clone of the repository has all of
them; an installed package has the modules but no `README.md` or `LICENSE`, and staging then stops with an error
asking to run from a clone, rather than publishing a repository without its model card and licence.

Every failure the user can fix (a bad model card, a non-empty output folder, no token, no network, a refusal from the
Hub) ends the command with one `error: ...` line on stderr and exit status 1, without a traceback. This module
imports only the standard library and `huggingface_hub` (no relative imports), so `python hub.py` needs neither torch
nor diffusers; `python -m cross_image_attention.hub` imports the package first, and with it torch.
"""

import argparse
import ast
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

PROG = "cross-image-attention hub"
SOURCE = Path(__file__).resolve().parent
# diffusers looks for this exact file name in a `custom_pipeline` folder or repository.
ENTRY_POINT = "pipeline.py"
# One code-only Hub repository per technique: its pipeline file (staged as `pipeline.py`) and what its model card's
# front matter says differently from README.md's (the base model users load it with, the task).
ENTRIES = {
    ENTRY_POINT: {},
    "pipeline_prompt_editing.py": {"pipeline_tag": "image-to-image", "tags": ["free-prompt-editing"]},
    "pipeline_style_prompting.py": {"pipeline_tag": "text-to-image", "tags": ["visual-style-prompting"]},
    "pipeline_style_prompting_xl.py": {
        "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
        "pipeline_tag": "text-to-image",
        "tags": ["visual-style-prompting", "stable-diffusion-xl"],
    },
}
MODEL_CARD = "README.md"
LICENSE = "LICENSE"
# Front matter keys the Hub needs to show and index the repository as a diffusers pipeline on top of SD 1.5.
REQUIRED_CARD_FIELDS = ("library_name", "base_model", "license", "tags")
FRONT_MATTER = re.compile(r"\s*---[ \t]*\r?\n")
DEFAULT_COMMIT_MESSAGE = "Upload the Cross-Image Attention pipeline code"
NO_TOKEN = "no token: pass --token or log in with `hf auth login`"


class HubError(Exception):
    """A failure the user can fix, reported as one `error: ...` line instead of a traceback."""


@dataclass
class StagedRepo:
    """The result of `stage`: the folder, the names of the files copied into it and the card's base model."""

    folder: Path
    files: list[str]
    base_model: str
    removed: list[str] = field(default_factory=list)


def relative_imports(module_file: Path) -> list[str]:
    """The sibling modules named by the `from .module import ...` statements of a Python file.

    This is the only relative import form diffusers resolves (it scans the source with a regular expression):
    `from . import module`, `from ..module import ...` and `from .package.module import ...` would load in a
    package but break as a custom pipeline, so they are rejected here rather than published.
    """
    try:
        tree = ast.parse(module_file.read_text(encoding="utf-8"), filename=str(module_file))
    except SyntaxError as error:
        raise HubError(f"cannot parse {module_file.name}: {error.msg} (line {error.lineno})") from error
    modules = set()
    # `ast.walk` also visits imports nested in functions or `if` blocks, which the regular expression matches too.
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        if node.level > 1 or node.module is None or "." in node.module:
            statement = f"from {'.' * node.level}{node.module or ''} import ..."
            raise HubError(
                f"{module_file.name}:{node.lineno}: `{statement}` is not loadable as a custom pipeline; "
                "diffusers only resolves sibling modules imported as `from .module import name`"
            )
        modules.add(node.module)
    return sorted(modules)


def pipeline_modules(source: Path, entry: str = ENTRY_POINT) -> list[str]:
    """File names of the entry file and of every sibling module it imports, directly or through other siblings.

    Hub loading follows relative imports recursively, but loading a local folder copies only the modules named in
    the entry file itself. A module reached only through another one would work from the Hub and fail from the staged
    folder, so the entry file must import every module directly.

    Args:
        entry: The pipeline file staged as `pipeline.py` (one of `ENTRIES`).
    """
    entry_point = source / entry
    if not entry_point.is_file():
        raise HubError(f"{entry_point} not found: diffusers needs a pipeline file, staged as {ENTRY_POINT}")
    direct = relative_imports(entry_point)
    importers = {name: entry for name in direct}
    pending = list(direct)
    while pending:
        name = pending.pop()
        module_file = source / f"{name}.py"
        if not module_file.is_file():
            raise HubError(f"{importers[name]} imports `.{name}` but {module_file} does not exist")
        for imported in relative_imports(module_file):
            if imported not in importers and imported != Path(entry).stem:
                importers[imported] = module_file.name
                pending.append(imported)
    indirect = sorted(set(importers) - set(direct))
    if indirect:
        missing = ", ".join(f"`.{name}` (imported by {importers[name]})" for name in indirect)
        raise HubError(
            f"{entry} must import every sibling module itself, since diffusers copies only its relative "
            f"imports when loading a local folder; add a `from .module import ...` line for {missing}"
        )
    return [entry, *sorted(f"{name}.py" for name in importers)]


def check_model_card(readme: Path) -> ModelCard:
    """Parse `README.md` as a Hub model card and require the front matter that makes the repository findable."""
    try:
        # Checked here because without front matter `ModelCard` only logs a warning and returns an empty card.
        if not FRONT_MATTER.match(readme.read_text(encoding="utf-8-sig")):
            raise HubError(f"{readme} has no YAML front matter (a block between `---` lines at the top)")
        # A `Path` (not a `str`) keeps `ModelCard.load` from treating the argument as a repository id to download.
        card = ModelCard.load(readme)
    # `UnicodeDecodeError` is a `ValueError` too.
    except (ValueError, yaml.YAMLError) as error:
        raise HubError(f"{readme} is not a valid model card: {one_line(error)}") from error
    data = card.data
    missing = [field for field in REQUIRED_CARD_FIELDS if not getattr(data, field, None)]
    if missing:
        raise HubError(f"the YAML front matter of {readme} has no {', '.join(missing)}")
    if data.library_name != "diffusers":
        raise HubError(f"the model card of {readme} says library_name: {data.library_name}, expected diffusers")
    return card


def prepare_output(output: Path, overwrite: bool, source: Path, files: list[str]) -> list[str]:
    """Create the output folder, or clear a previous staging out of an existing one when `overwrite` is set.

    The folder's modules must be exactly the staged ones (a stale module would be uploaded by a manual `git push`), so
    top-level `*.py` files that this staging does not write are deleted, and their names returned to be listed.
    Hidden entries, such as the `.git` folder of a clone of the Hub repository, are kept. Any other content means the
    folder is not a previous staging: it is refused rather than emptied.

    Args:
        files: The names this staging writes.

    Returns:
        The names of the stale files removed.
    """
    if output.exists() and not output.is_dir():
        raise HubError(f"{output} exists and is not a folder")
    if output.resolve() == source:
        raise HubError(f"{output} is the source folder: stage into another folder")
    if output.is_dir():
        entries = list(output.iterdir())
        if entries and not overwrite:
            raise HubError(f"{output} is not empty: pass --overwrite to replace the staged files in it")
        visible = [entry for entry in entries if not entry.name.startswith(".")]
        staged_kind = [e for e in visible if e.is_file() and (e.suffix == ".py" or e.name in (MODEL_CARD, LICENSE))]
        foreign = sorted(entry.name for entry in visible if entry not in staged_kind)
        if foreign:
            raise HubError(
                f"{output} holds files a staging does not write ({', '.join(foreign[:5])}); --overwrite only "
                "replaces a previous staging: stage into an empty folder or a clone of the Hub repository"
            )
        if visible and not (output / "pipeline.py").is_file():
            raise HubError(f"{output} has no pipeline.py, so it is not a previous staging: stage into another folder")
        removed = sorted(entry.name for entry in staged_kind if entry.name not in files)
        for entry in staged_kind:
            entry.unlink()
        return removed
    output.mkdir(parents=True, exist_ok=True)
    return []


def stage(output: Path, overwrite: bool = False, source: Path = SOURCE, entry: str = ENTRY_POINT) -> StagedRepo:
    """Copy the entry file (as `pipeline.py`), its sibling modules, the model card and the licence from `source` into
    `output`.

    Everything is checked before the output folder is touched, so a failure leaves it as it was.

    Args:
        entry: The technique's pipeline file, a key of `ENTRIES`; its card gets that entry's front matter.
    """
    if entry not in ENTRIES:
        raise HubError(f"--entry must be one of {', '.join(ENTRIES)}, got {entry!r}")
    source = Path(source).resolve()
    output = Path(output)
    entry_file, *siblings = pipeline_modules(source, entry)
    modules = [ENTRY_POINT, *siblings]
    for name in (MODEL_CARD, LICENSE):
        if not (source / name).is_file():
            raise HubError(
                f"{source} has no {name}: an installed package ships only the modules, so run this command from a "
                "clone of the repository (or pass --source)"
            )
    card = check_model_card(source / MODEL_CARD)
    files = [*modules, MODEL_CARD, LICENSE]
    removed = prepare_output(output, overwrite, source, files)
    shutil.copyfile(source / entry_file, output / ENTRY_POINT)
    for name in files[1:]:
        shutil.copyfile(source / name, output / name)
    if ENTRIES[entry]:
        for field, value in ENTRIES[entry].items():
            setattr(card.data, field, value if field != "tags" else [*(card.data.tags or []), *value])
        card.save(output / MODEL_CARD)
    base_model = card.data.base_model
    # `base_model` may be a list in the card; the first entry is the one to load the pipeline with.
    if isinstance(base_model, list):
        base_model = base_model[0]
    return StagedRepo(folder=output, files=files, base_model=base_model, removed=removed)


def push(
    repo_id: str,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    private: bool = False,
    source: Path = SOURCE,
    entry: str = ENTRY_POINT,
) -> tuple[CommitInfo, StagedRepo]:
    """Stage into a temporary folder and upload it as the model repository `repo_id` (created if missing).

    Returns the `CommitInfo` of the upload and what was staged. Modules of the repository that are no longer staged
    (`*.py` files) are deleted in the same commit, so it holds exactly the staged modules.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"invalid --repo-id {repo_id!r}: {one_line(error)}") from error
    # `get_token` reads HF_TOKEN, then the token saved by `hf auth login`.
    token = token or get_token()
    if not token:
        raise HubError(NO_TOKEN)
    with tempfile.TemporaryDirectory(prefix="cross-image-attention-hub-") as folder:
        staged = stage(Path(folder), source=source, entry=entry)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
                delete_patterns="*.py",
            )
        except OfflineModeIsEnabled as error:
            raise HubError("cannot reach the Hugging Face Hub: offline mode is on (unset HF_HUB_OFFLINE)") from error
        except HfHubHTTPError as error:
            # The Hub answered with an error status: a bad token, no write access, a missing revision...
            raise HubError(f"the Hugging Face Hub refused the upload: {one_line(error)}") from error
        # Evaluated only when an exception gets here, so the HTTP client's module is imported by then.
        except (OSError, *http_client_errors()) as error:
            raise HubError(f"cannot reach the Hugging Face Hub: {one_line(error)}") from error
    return commit, staged


def http_client_errors() -> tuple[type[Exception], ...]:
    """The base exceptions of the HTTP clients `huggingface_hub` may use, for network failures it does not wrap.

    huggingface_hub 0.x uses requests (whose errors are `OSError`s), 1.x httpx and 2.x httpx2, whose errors are not.
    Only modules that are already imported can have raised, so none is imported here.
    """
    errors = []
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "HTTPError", None), type):
            errors.append(module.HTTPError)
    return tuple(errors)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (Hub errors add the request id and server message on further lines)."""
    message = " ".join(str(error).split()) or type(error).__name__
    return message if len(message) <= 400 else message[:397] + "..."


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one `error:` line and exit status 1, like every other error of the command (argparse's
    own print the usage and exit 2); `--help` is unchanged. Subcommand parsers inherit the class."""

    def error(self, message: str):
        raise HubError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Stage or upload the code-only Hub repository (pipeline.py, its sibling modules, README.md "
        "model card, LICENSE) that DiffusionPipeline.from_pretrained(..., custom_pipeline=...) loads.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{stage,push}")
    source_help = "folder holding pipeline.py, README.md and LICENSE (default: the folder of this module)"
    entry_help = f"pipeline file staged as pipeline.py, one repository per technique: {', '.join(ENTRIES)}"

    stage_parser = commands.add_parser("stage", help="copy the Hub repository's files into a folder")
    stage_parser.add_argument("--output", type=Path, required=True, help="folder to stage into")
    stage_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="stage into a folder holding a previous staging, replacing it (stale modules are listed as removed; "
        "hidden entries such as .git are kept; a folder holding anything else is refused)",
    )
    stage_parser.add_argument("--source", type=Path, default=SOURCE, help=source_help)
    stage_parser.add_argument("--entry", default=ENTRY_POINT, help=f"{entry_help} (default: {ENTRY_POINT})")

    push_parser = commands.add_parser("push", help="stage into a temporary folder and upload it to the Hub")
    push_parser.add_argument("--repo-id", required=True, help='model repository, e.g. "you/cross-image-attention"')
    push_parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    push_parser.add_argument("--revision", help="branch to commit to, created if missing (default: main)")
    push_parser.add_argument(
        "--commit-message", default=DEFAULT_COMMIT_MESSAGE, help=f'(default: "{DEFAULT_COMMIT_MESSAGE}")'
    )
    push_parser.add_argument(
        "--private", action="store_true", help="create the repository as private (an existing one is left as is)"
    )
    push_parser.add_argument("--source", type=Path, default=SOURCE, help=source_help)
    push_parser.add_argument("--entry", default=ENTRY_POINT, help=f"{entry_help} (default: {ENTRY_POINT})")
    return parser


def print_staged(staged: StagedRepo) -> None:
    if staged.removed:
        removed = ", ".join(staged.removed)
        print(f"Removed {len(staged.removed)} files of a previous staging that this one lacks: {removed}")
    print(f"Staged {len(staged.files)} files in {staged.folder}:")
    for name in staged.files:
        print(f"  {name}")


def main(argv: list[str] | None = None) -> int:
    """Run `stage` or `push`; returns the exit status (0, or 1 after one `error: ...` line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "stage":
            staged = stage(args.output, overwrite=args.overwrite, source=args.source, entry=args.entry)
            print_staged(staged)
            print(
                f'Load it with custom_pipeline="{staged.folder}", trust_remote_code=True, or upload it with '
                f"`{PROG} push --repo-id <namespace/name>`."
            )
        else:
            commit, staged = push(
                args.repo_id,
                token=args.token,
                revision=args.revision,
                commit_message=args.commit_message,
                private=args.private,
                source=args.source,
                entry=args.entry,
            )
            print(f"Uploaded {len(staged.files)} files to {args.repo_id}: {', '.join(staged.files)}")
            print(f"Commit {commit.oid}: {commit.commit_url}")
            # A Hub repository id runs whatever its latest commit holds; pinning keeps users on reviewed code.
            print("Pin this commit when loading the pipeline, so later pushes cannot change the code that runs:")
            print(
                f'  DiffusionPipeline.from_pretrained("{staged.base_model}", custom_pipeline="{args.repo_id}", '
                f'custom_revision="{commit.oid}", trust_remote_code=True)'
            )
    except HubError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        # Reading the sources or writing the output folder failed (permissions, a full disk...).
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
