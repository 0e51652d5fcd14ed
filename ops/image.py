"""The trainer image: built with the Docker SDK, tagged with the git commit, pushed, recorded with its digest.

    python -m ops.image build [--repository REPO] [--tag TAG] [--record PATH]   prints REPO:TAG
    python -m ops.image push [--record PATH]                                    prints REPO@sha256:...

`build` builds docker/trainer.Dockerfile with the repository root as context (what .dockerignore lets through), tags
it with the short git commit (`-dirty` when the checkout has changes no commit holds) and writes the record: image,
repository, tag, commit, image id, built_at. `push` pushes that tag and adds the registry's digest to the record:
`REPO@sha256:...` names the exact bytes a pod runs, whatever later happens to the tag. The training backends pass it
to the trainer as CLOUDSCREEN_IMAGE, which every MLflow run records as `cloudscreen.image` (tasks.lib.tracking.Lineage).

The engine is DOCKER_HOST, else the default socket (Docker's own rules, TLS variables included). `docker_client()`
is what the docker training backend connects with too. Without an engine both commands fail with a one-line message
naming where they looked, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import logging
import re
import shlex
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.lib.docker_engine import connection_failure, docker_client
from tasks.lib.errors import ImageError
from tasks.lib.files import write_json

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "trainer.Dockerfile"
DEFAULT_RECORD = REPO / ".local" / "image.json"
# A local name: enough for the docker backend on the machine that built it; a push needs a registry repository.
DEFAULT_REPOSITORY = "cloudscreen-trainer"
# Seconds the engine may stay silent during a build or push (a long pip install prints nothing for minutes).
STREAM_TIMEOUT = 3600
SHORT_COMMIT = 12

# Docker's reference grammar: an optional registry host[:port], then lowercase path components; tags are 1-128
# characters of [A-Za-z0-9_.-] not starting with . or -.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# A first component is a registry host only with a dot or a port, or as localhost (Docker's rule).
_HOST = r"(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|[A-Za-z0-9-]+(?=:))(?::[0-9]+)?"
_REPOSITORY_RE = re.compile(rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class ImageRecord:
    """What `build` made and `push` published; written as JSON (the record file)."""

    image: str  # REPOSITORY:TAG
    repository: str
    tag: str
    commit: str  # the full git commit built from; "" when the context is not a git checkout
    dirty: bool  # the checkout had changes no commit holds
    image_id: str  # the engine's sha256:... id of the built image
    dockerfile: str  # relative to the build context
    built_at: str  # UTC, ISO 8601
    digest: str | None = None  # REPOSITORY@sha256:... once pushed: the reference to run
    pushed_at: str | None = None


# --- the engine -------------------------------------------------------------------------------------------------


# --- names and paths ---------------------------------------------------------------------------------------------


def git_state(repo: Path) -> tuple[str, bool]:
    """(full commit of HEAD, dirty) of the checkout at `repo`.

    Dirty means modified, staged or untracked files that git does not ignore: the build context would copy them
    into the image, so the image is not what the commit holds.

    Raises:
        ImageError: git is missing, or `repo` is not a git checkout with a commit.
    """

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except FileNotFoundError as exc:
            raise ImageError("git is not installed: the image is tagged with the commit (or pass --tag)") from exc

    head = git("rev-parse", "--verify", "HEAD")
    if head.returncode != 0:
        reason = (head.stderr.strip().splitlines() or ["git rev-parse failed"])[-1]
        raise ImageError(f"{repo}: not a git checkout with a commit ({reason}); tag the image with --tag")
    status = git("status", "--porcelain", "--untracked-files=normal")
    if status.returncode != 0:
        raise ImageError(f"{repo}: git status failed: {status.stderr.strip()}")
    return head.stdout.strip(), bool(status.stdout.strip())


def commit_tag(commit: str, dirty: bool) -> str:
    """The image tag for a commit: its first 12 hex digits, with `-dirty` for uncommitted changes."""
    return commit[:SHORT_COMMIT] + ("-dirty" if dirty else "")


def check_repository(repository: str) -> str:
    """`repository` when it is a valid image repository without tag or digest.

    Raises:
        ImageError: it is not; the message names it.
    """
    if not _REPOSITORY_RE.fullmatch(repository):
        raise ImageError(
            f"{repository!r}: not an image repository (lowercase [REGISTRY/]PATH/NAME without :TAG or @DIGEST, "
            "e.g. europe-west4-docker.pkg.dev/PROJECT_ID/cloudscreen/trainer)"
        )
    return repository


def registry_host(repository: str) -> str | None:
    """The registry a repository names (`europe-west4-docker.pkg.dev`), None for a bare name (Docker Hub)."""
    first, sep, _ = repository.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def dockerignore_patterns(context: Path) -> list[str]:
    """The patterns of `context`/.dockerignore, read the way the Docker SDK reads them for a build."""
    lines = (context / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def context_files(context: Path, dockerfile: str) -> set[str]:
    """The relative paths (files and directories) a build of `context` sends to the engine, per .dockerignore."""
    from docker.utils.build import exclude_paths

    return set(exclude_paths(str(context), dockerignore_patterns(context), dockerfile=dockerfile))


def copy_sources(dockerfile: Path) -> list[str]:
    """The build-context paths the Dockerfile's COPY and ADD instructions read (copies from stages excluded)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    sources = []
    for line in text.splitlines():
        words = line.strip().split(maxsplit=1)
        if len(words) < 2 or words[0].upper() not in {"COPY", "ADD"}:
            continue
        rest = words[1].strip()
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        sources += [a for a in args if not a.startswith("--")][:-1]  # the last argument is the destination
    return sources


def check_build_inputs(context: Path, dockerfile: Path) -> str:
    """Check the context and the Dockerfile before anything is sent to an engine; return the Dockerfile's path
    relative to the context.

    Raises:
        ImageError: the context is not a directory or has no .dockerignore (the whole tree, .venv and .git included,
            would be sent), the Dockerfile is missing or outside the context, or it copies a path the context does
            not send.
    """
    context = context.resolve()
    dockerfile = dockerfile.resolve()
    if not context.is_dir():
        raise ImageError(f"{context}: the build context is not a directory")
    if not (context / ".dockerignore").is_file():
        raise ImageError(f"{context}: no .dockerignore, so the whole directory (.venv, .local, .git) would be sent")
    if not dockerfile.is_file():
        raise ImageError(f"{dockerfile}: Dockerfile not found")
    if not dockerfile.is_relative_to(context):
        raise ImageError(f"{dockerfile}: the Dockerfile is outside the build context {context}")
    relative = dockerfile.relative_to(context).as_posix()
    sent = context_files(context, relative)
    for source in copy_sources(dockerfile):
        pattern = source.strip("/").removeprefix("./") or "."
        if pattern == "." or any(fnmatch.fnmatch(path, pattern) for path in sent):
            continue
        raise ImageError(
            f"{dockerfile}: COPY {source}: not in the build context {context} (missing, or excluded by .dockerignore)"
        )
    return relative


# --- build and push ---------------------------------------------------------------------------------------------


def build(
    *,
    repository: str,
    record: Path,
    tag: str | None = None,
    dockerfile: Path = DOCKERFILE,
    context: Path = REPO,
    pull: bool = False,
    no_cache: bool = False,
    client: docker.DockerClient | None = None,
) -> ImageRecord:
    """Build `dockerfile`, tag it REPOSITORY:TAG and write the record (replacing any earlier one, atomically).

    Args:
        repository: image repository; a registry one (HOST/PATH/NAME) to push later.
        record: the JSON record to write.
        tag: default: the short git commit of `context`, with `-dirty` for uncommitted changes.
        client: an engine client; default `docker_client()`.

    Raises:
        ImageError: bad names or paths (before any engine is contacted), no engine (DockerUnavailableError), or a
            failed build (the message names the Dockerfile and the engine's error).
    """
    check_repository(repository)
    relative = check_build_inputs(context, dockerfile)
    if tag is None:
        commit, dirty = git_state(context)
        tag = commit_tag(commit, dirty)
    else:
        if not _TAG_RE.fullmatch(tag):
            raise ImageError(f"--tag {tag!r}: a tag is 1-128 characters of [A-Za-z0-9_.-], not starting with . or -")
        try:
            commit, dirty = git_state(context)
        except ImageError:
            commit, dirty = "", False
    image = f"{repository}:{tag}"
    client = client or docker_client()
    if dirty:
        log.warning("%s: built from a checkout with uncommitted changes; commit them for a reproducible image", image)
    log.info("building %s from %s (context %s)", image, dockerfile, context)
    stream = _engine_call(
        f"{dockerfile}: build",
        client.api.build,
        path=str(context),
        dockerfile=relative,
        tag=image,
        rm=True,
        forcerm=True,
        pull=pull,
        nocache=no_cache,
        decode=True,
        timeout=STREAM_TIMEOUT,
        buildargs={"GIT_COMMIT": commit},
        labels={"org.opencontainers.image.revision": commit, "cloudscreen.dirty": str(dirty).lower()},
    )
    image_id = None
    for chunk in _chunks(f"{dockerfile}: build", stream):
        if chunk.get("error") or chunk.get("errorDetail"):
            detail = chunk.get("error") or chunk["errorDetail"].get("message", "")
            raise ImageError(f"{dockerfile}: the build of {image} failed: {str(detail).strip()}")
        for line in str(chunk.get("stream", "")).splitlines():
            if line.strip():
                log.info("build: %s", line.rstrip())
        if chunk.get("status") and not chunk.get("progressDetail"):
            log.info("build: %s %s", chunk.get("id", ""), chunk["status"])
        image_id = (chunk.get("aux") or {}).get("ID", image_id)
    image_id = image_id or _engine_call(f"{image}: inspect", client.api.inspect_image, image)["Id"]
    result = ImageRecord(
        image=image,
        repository=repository,
        tag=tag,
        commit=commit,
        dirty=dirty,
        image_id=image_id,
        dockerfile=relative,
        built_at=_now(),
    )
    write_json(record, dataclasses.asdict(result))
    log.info("built %s (%s); record %s", image, image_id, record)
    return result


def push(*, record: Path, client: docker.DockerClient | None = None) -> ImageRecord:
    """Push the image the record describes and add its registry digest to the record (atomically).

    Raises:
        ImageError: no or a broken record, a repository without a registry, the tag now naming another image than the
            recorded one, no engine (DockerUnavailableError), or a failed push (the engine's message).
    """
    built = read_record(record)
    if registry_host(built.repository) is None:
        raise ImageError(
            f"{record}: {built.repository} names no registry, so a push would go to Docker Hub; build with "
            "--repository REGISTRY/PATH/NAME, e.g. europe-west4-docker.pkg.dev/PROJECT_ID/cloudscreen/trainer"
        )
    client = client or docker_client()
    from docker.errors import ImageNotFound

    try:
        current = client.api.inspect_image(built.image)["Id"]
    except ImageNotFound as exc:
        raise ImageError(f"{record}: {built.image} is not in this engine; build it here first") from exc
    # A later build with the same tag (a dirty checkout, or --tag) moved the tag: never publish what was not recorded.
    if current != built.image_id:
        raise ImageError(f"{record}: {built.image} is now {current}, not the recorded {built.image_id}; build again")
    if built.dirty:
        log.warning("pushing %s, built from a checkout with uncommitted changes", built.image)
    log.info("pushing %s", built.image)
    stream = _engine_call(
        f"{built.image}: push", client.api.push, built.repository, tag=built.tag, stream=True, decode=True
    )
    digest = None
    last_status: dict[str, str] = {}
    for chunk in _chunks(f"{built.image}: push", stream):
        if chunk.get("error") or chunk.get("errorDetail"):
            detail = chunk.get("error") or chunk["errorDetail"].get("message", "")
            raise ImageError(f"{built.image}: push failed: {str(detail).strip()}")
        status, layer = chunk.get("status"), chunk.get("id", "")
        if status and last_status.get(layer) != status:  # one line per layer and state, not per progress tick
            last_status[layer] = status
            log.info("push: %s %s", layer, status)
        digest = (chunk.get("aux") or {}).get("Digest", digest)
    if not digest:
        repo_digests = _engine_call(f"{built.image}: inspect", client.api.inspect_image, built.image)["RepoDigests"]
        digest = next((d.split("@", 1)[1] for d in repo_digests if d.startswith(built.repository + "@")), None)
    if not digest:
        raise ImageError(f"{built.image}: the registry reported no digest for the pushed image")
    result = dataclasses.replace(built, digest=f"{built.repository}@{digest}", pushed_at=_now())
    write_json(record, dataclasses.asdict(result))
    log.info("pushed %s as %s; record %s", built.image, result.digest, record)
    return result


def read_record(path: Path) -> ImageRecord:
    """The record `build` (and `push`) wrote.

    Raises:
        ImageError: the file is missing, not JSON, or not a record; the message names the file.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no image record; run `python -m ops.image build` first") from exc
    except json.JSONDecodeError as exc:
        raise ImageError(f"{path}: not a valid image record: {exc}") from exc
    fields = {f.name for f in dataclasses.fields(ImageRecord)}
    if not isinstance(data, dict) or set(data) - fields or not {"image", "repository", "tag", "image_id"} <= set(data):
        raise ImageError(f"{path}: not an image record (expected the keys {', '.join(sorted(fields))})")
    try:
        return ImageRecord(**data)
    except TypeError as exc:
        raise ImageError(f"{path}: not an image record: {exc}") from exc


def _engine_call(what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the Docker SDK; its API and connection errors become an ImageError that says what was being done."""
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    try:
        return function(*args, **kwargs)
    except (DockerException, RequestException) as exc:
        raise ImageError(f"{what} failed: {_engine_message(exc)}") from exc


def _chunks(what: str, stream: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The engine's decoded progress messages; a connection lost midway becomes an ImageError."""
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    iterator = iter(stream)
    while True:
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        except (DockerException, RequestException) as exc:
            raise ImageError(f"{what} failed: {_engine_message(exc)}") from exc
        yield chunk


def _engine_message(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or connection_failure(exc)).strip()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --- command line -----------------------------------------------------------------------------------------------


def _cli() -> None:
    from tasks.lib import cli

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True, metavar="{build,push}")
    build_cmd = commands.add_parser(
        "build", help="build docker/trainer.Dockerfile, tag it with the git commit, record it; print REPOSITORY:TAG"
    )
    build_cmd.add_argument(
        "--repository",
        default=DEFAULT_REPOSITORY,
        help="image repository, e.g. europe-west4-docker.pkg.dev/PROJECT_ID/cloudscreen/trainer "
        "(default: %(default)s, a local name that cannot be pushed)",
    )
    build_cmd.add_argument("--tag", help="default: the short git commit, with -dirty for uncommitted changes")
    build_cmd.add_argument("--dockerfile", type=Path, default=DOCKERFILE, help="default: %(default)s")
    build_cmd.add_argument("--context", type=Path, default=REPO, help="build context (default: %(default)s)")
    build_cmd.add_argument("--pull", action="store_true", help="pull newer versions of the base images")
    build_cmd.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    push_cmd = commands.add_parser(
        "push", help="push the recorded image, add its digest to the record; print REPOSITORY@sha256:..."
    )
    for command in (build_cmd, push_cmd):
        command.add_argument(
            "--record", type=Path, default=DEFAULT_RECORD, help="the image record, JSON (default: %(default)s)"
        )
        command.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    if args.command == "build":
        result = build(
            repository=args.repository,
            record=args.record,
            tag=args.tag,
            dockerfile=args.dockerfile,
            context=args.context,
            pull=args.pull,
            no_cache=args.no_cache,
        )
        print(result.image)
    else:
        print(push(record=args.record).digest)


if __name__ == "__main__":
    from tasks.lib import cli

    cli.run(_cli)
