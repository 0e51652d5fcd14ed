"""ops.image without a Docker engine: tags from git, the no-engine error, path checks, records, and build and push
driven through a stand-in for the engine's API (the Docker SDK's low-level calls and their decoded stream)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ops import image
from tasks.lib.errors import DockerUnavailableError, ImageError
from tests.conftest import REPO

REGISTRY_REPO = "europe-west4-docker.pkg.dev/proj/cloudscreen/trainer"


def _git(repo: Path, *args: str) -> str:
    run = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A one-commit git checkout that is a valid build context: .dockerignore, a Dockerfile, the copied code."""
    repo = tmp_path / "repo"
    (repo / "docker").mkdir(parents=True)
    (repo / "tasks").mkdir()
    (repo / "tasks" / "train.py").write_text("print('train')\n")
    (repo / ".gitignore").write_text(".local/\n")
    (repo / ".dockerignore").write_text("**\n!tasks\n")
    (repo / "docker" / "trainer.Dockerfile").write_text("FROM python:3.11.14-slim-bookworm\nCOPY tasks ./tasks\n")
    _git(repo, "init", "--quiet")
    _git(repo, "add", ".")
    _git(repo, "commit", "--quiet", "-m", "init")
    return repo


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(*args: str, docker_host: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    if docker_host is not None:
        env["DOCKER_HOST"] = docker_host
    return subprocess.run(
        [sys.executable, "-m", "ops.image", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


# --- tags from git -----------------------------------------------------------------------------------------------


def test_the_tag_is_the_short_commit_and_dirty_when_the_checkout_has_changes(checkout):
    head = _git(checkout, "rev-parse", "HEAD")
    assert image.git_state(checkout) == (head, False)
    assert image.commit_tag(head, False) == head[:12]

    (checkout / "tasks" / "train.py").write_text("print('changed')\n")  # a modified tracked file
    assert image.git_state(checkout) == (head, True)
    assert image.commit_tag(head, True) == head[:12] + "-dirty"

    _git(checkout, "checkout", "--", "tasks/train.py")
    (checkout / "tasks" / "new.py").write_text("")  # untracked: the build context would copy it
    assert image.git_state(checkout) == (head, True)

    (checkout / "tasks" / "new.py").unlink()
    (checkout / ".local").mkdir()
    (checkout / ".local" / "image.json").write_text("{}")  # ignored by git: not a change
    assert image.git_state(checkout) == (head, False)


def test_outside_a_git_checkout_the_commit_cannot_be_the_tag(tmp_path):
    with pytest.raises(ImageError, match=r"not a git checkout with a commit.*--tag"):
        image.git_state(tmp_path)


@pytest.mark.parametrize(
    ("repository", "valid"),
    [
        ("cloudscreen/trainer", True),
        (REGISTRY_REPO, True),
        ("localhost:5000/trainer", True),
        ("Cloudscreen/trainer", False),
        ("cloudscreen/trainer:latest", False),
        ("cloudscreen/trainer@sha256:abc", False),
        ("", False),
    ],
)
def test_repository_names_are_checked(repository, valid):
    if valid:
        assert image.check_repository(repository) == repository
    else:
        with pytest.raises(ImageError, match="not an image repository"):
            image.check_repository(repository)


def test_registry_host_tells_a_registry_repository_from_a_local_name():
    assert image.registry_host(REGISTRY_REPO) == "europe-west4-docker.pkg.dev"
    assert image.registry_host("localhost:5000/trainer") == "localhost:5000"
    assert image.registry_host("cloudscreen/trainer") is None


# --- no engine -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("docker_host", "reason"),
    [
        (f"tcp://127.0.0.1:{_closed_port()}", "connection refused"),
        ("unix:///nonexistent/cloudscreen/docker.sock", "no such file or directory"),
    ],
)
def test_build_without_an_engine_is_a_one_line_error_naming_docker_host_and_exit_2(tmp_path, docker_host, reason):
    record = tmp_path / "image.json"
    run = _run_cli("build", "--record", str(record), docker_host=docker_host)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, run.stderr
    assert f"no Docker engine at {docker_host} (DOCKER_HOST): {reason}" in errors[0]
    assert run.stdout == ""
    assert not record.exists()


def test_push_without_an_engine_is_a_one_line_error_and_exit_2(tmp_path):
    record = tmp_path / "image.json"
    record.write_text(json.dumps(_record_data(repository=REGISTRY_REPO)))
    before = record.read_text()
    run = _run_cli("push", "--record", str(record), docker_host=f"tcp://127.0.0.1:{_closed_port()}")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "no Docker engine at tcp://127.0.0.1:" in run.stderr
    assert record.read_text() == before


def test_push_without_a_record_says_to_build_first(tmp_path):
    run = _run_cli("push", "--record", str(tmp_path / "none.json"), docker_host=None)
    assert run.returncode == 2
    assert "no image record; run `python -m ops.image build` first" in run.stderr
    assert "Traceback" not in run.stderr


def test_docker_client_names_the_default_socket_when_docker_host_is_unset(monkeypatch):
    if Path("/var/run/docker.sock").exists():
        pytest.skip("a Docker engine socket exists on this machine")
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    with pytest.raises(DockerUnavailableError, match=r"unix:///var/run/docker\.sock \(the default socket; DOCKER_HOST"):
        image.docker_client()


def test_docker_client_names_an_explicit_base_url():
    url = f"tcp://127.0.0.1:{_closed_port()}"
    with pytest.raises(DockerUnavailableError, match=f"no Docker engine at {url}: connection refused"):
        image.docker_client(url)


# --- build context and Dockerfile checks ---------------------------------------------------------------------------


def test_the_real_trainer_build_sends_the_code_and_lock_and_nothing_local():
    assert image.check_build_inputs(REPO, image.DOCKERFILE) == "docker/trainer.Dockerfile"
    sent = image.context_files(REPO, "docker/trainer.Dockerfile")
    assert {"uv.lock", "pyproject.toml", "params.yaml", "tasks/train.py", "tasks/lib/model.py"} <= sent
    for local in (".venv", ".local", ".git", "tests", ".pytest_cache", "bench"):
        assert not any(p == local or p.startswith(local + "/") for p in sent), local


def test_a_missing_dockerfile_is_named(checkout):
    missing = checkout / "docker" / "nope.Dockerfile"
    with pytest.raises(ImageError, match=f"{missing}: Dockerfile not found"):
        image.check_build_inputs(checkout, missing)


def test_a_dockerfile_outside_the_context_is_refused(checkout, tmp_path):
    outside = tmp_path / "elsewhere.Dockerfile"
    outside.write_text("FROM python:3.11.14-slim-bookworm\n")
    with pytest.raises(ImageError, match="outside the build context"):
        image.check_build_inputs(checkout, outside)


def test_a_context_without_dockerignore_is_refused(checkout):
    (checkout / ".dockerignore").unlink()
    with pytest.raises(ImageError, match=r"no \.dockerignore.*\.venv"):
        image.check_build_inputs(checkout, checkout / "docker" / "trainer.Dockerfile")


def test_a_copy_of_something_the_context_does_not_send_is_named(checkout):
    dockerfile = checkout / "docker" / "trainer.Dockerfile"
    dockerfile.write_text(
        "FROM python:3.11.14-slim-bookworm AS a\nCOPY --from=a /x /y\nCOPY --chown=1:1 tasks \\\n  params.yaml ./\n"
    )
    with pytest.raises(ImageError, match=f"{dockerfile}: COPY params.yaml: not in the build context"):
        image.check_build_inputs(checkout, dockerfile)


def test_build_checks_names_and_paths_before_contacting_an_engine(checkout, tmp_path):
    with pytest.raises(ImageError, match="not an image repository"):
        image.build(repository="Bad/Name", record=tmp_path / "r.json", context=checkout, client=_Unreachable())
    with pytest.raises(ImageError, match="Dockerfile not found"):
        image.build(
            repository="cloudscreen/trainer",
            record=tmp_path / "r.json",
            context=checkout,
            dockerfile=checkout / "nope",
            client=_Unreachable(),
        )
    with pytest.raises(ImageError, match="--tag 'bad tag'"):
        image.build(
            repository="cloudscreen/trainer",
            record=tmp_path / "r.json",
            tag="bad tag",
            context=checkout,
            dockerfile=checkout / "docker" / "trainer.Dockerfile",
            client=_Unreachable(),
        )


# --- build and push through a stand-in engine ----------------------------------------------------------------------


class _Api:
    """The low-level calls ops.image makes, answering with canned decoded streams."""

    def __init__(self, build_chunks=(), push_chunks=(), image_id="sha256:" + "1" * 64):
        self.build_chunks = list(build_chunks)
        self.push_chunks = list(push_chunks)
        self.image_id = image_id
        self.build_kwargs: dict = {}
        self.pushed: tuple = ()

    def build(self, **kwargs):
        self.build_kwargs = kwargs
        return iter(self.build_chunks)

    def inspect_image(self, name):
        return {"Id": self.image_id, "RepoDigests": []}

    def push(self, repository, tag, stream, decode):
        self.pushed = (repository, tag)
        return iter(self.push_chunks)


class _Client:
    def __init__(self, api: _Api):
        self.api = api


class _Unreachable:
    @property
    def api(self):
        raise AssertionError("the engine was contacted")


def _record_data(**changes) -> dict:
    data = {
        "image": "cloudscreen/trainer:abc",
        "repository": "cloudscreen/trainer",
        "tag": "abc",
        "commit": "abc" + "0" * 37,
        "dirty": False,
        "image_id": "sha256:" + "1" * 64,
        "dockerfile": "docker/trainer.Dockerfile",
        "built_at": "2026-11-23T00:00:00+00:00",
        "digest": None,
        "pushed_at": None,
    }
    data.update(changes)
    if "repository" in changes and "image" not in changes:
        data["image"] = f"{changes['repository']}:{data['tag']}"
    return data


def test_build_streams_the_log_tags_with_the_commit_and_writes_the_record(checkout, tmp_path, caplog):
    caplog.set_level("INFO", logger="ops.image")
    api = _Api(
        build_chunks=[
            {"stream": "Step 1/2 : FROM python:3.11.14-slim-bookworm\n"},
            {"status": "Pulling fs layer", "id": "abc123"},
            {"stream": "Step 2/2 : COPY tasks ./tasks\n"},
            {"aux": {"ID": "sha256:" + "2" * 64}},
            {"stream": "Successfully built 222222222222\n"},
        ]
    )
    record = tmp_path / "out" / "image.json"
    head = _git(checkout, "rev-parse", "HEAD")
    result = image.build(
        repository=REGISTRY_REPO,
        record=record,
        context=checkout,
        dockerfile=checkout / "docker" / "trainer.Dockerfile",
        client=_Client(api),
    )
    assert result.tag == head[:12] and result.image == f"{REGISTRY_REPO}:{head[:12]}"
    assert result.commit == head and result.dirty is False
    assert result.image_id == "sha256:" + "2" * 64
    assert api.build_kwargs["dockerfile"] == "docker/trainer.Dockerfile"
    assert api.build_kwargs["path"] == str(checkout)
    assert api.build_kwargs["tag"] == result.image
    assert api.build_kwargs["buildargs"] == {"GIT_COMMIT": head}  # the image's CLOUDSCREEN_GIT_COMMIT
    saved = json.loads(record.read_text())
    assert saved == {**_record_data(), **saved} and saved["image"] == result.image and saved["digest"] is None
    assert image.read_record(record) == result
    assert "build: Step 2/2 : COPY tasks ./tasks" in caplog.text
    assert [p.name for p in record.parent.iterdir()] == ["image.json"]  # no temporary file left


def test_a_failed_build_names_the_dockerfile_and_keeps_the_old_record(checkout, tmp_path):
    record = tmp_path / "image.json"
    record.write_text(json.dumps(_record_data()))
    before = record.read_text()
    api = _Api(
        build_chunks=[
            {"stream": "Step 2/2 : COPY tasks ./tasks\n"},
            {"errorDetail": {"message": "COPY failed: no source files"}, "error": "COPY failed: no source files"},
        ]
    )
    dockerfile = checkout / "docker" / "trainer.Dockerfile"
    with pytest.raises(ImageError, match=f"{dockerfile}: the build of .* failed: COPY failed: no source files"):
        image.build(
            repository="cloudscreen/trainer",
            record=record,
            context=checkout,
            dockerfile=dockerfile,
            client=_Client(api),
        )
    assert record.read_text() == before


def test_push_adds_the_registry_digest_to_the_record(tmp_path):
    record = tmp_path / "image.json"
    record.write_text(json.dumps(_record_data(repository=REGISTRY_REPO)))
    digest = "sha256:" + "3" * 64
    api = _Api(
        push_chunks=[
            {"status": "Preparing", "id": "l1"},
            {"status": "Pushing", "id": "l1", "progressDetail": {"current": 1, "total": 2}},
            {"status": "Pushed", "id": "l1"},
            {"status": f"abc: digest: {digest} size: 1234"},
            {"aux": {"Tag": "abc", "Digest": digest, "Size": 1234}},
        ]
    )
    result = image.push(record=record, client=_Client(api))
    assert api.pushed == (REGISTRY_REPO, "abc")
    assert result.digest == f"{REGISTRY_REPO}@{digest}"
    saved = json.loads(record.read_text())
    assert saved["digest"] == result.digest and saved["pushed_at"]
    assert saved["image_id"] == "sha256:" + "1" * 64


def test_push_refuses_a_local_name_and_a_moved_tag(tmp_path):
    record = tmp_path / "image.json"
    record.write_text(json.dumps(_record_data()))
    with pytest.raises(ImageError, match="names no registry, so a push would go to Docker Hub"):
        image.push(record=record, client=_Unreachable())
    record.write_text(json.dumps(_record_data(repository=REGISTRY_REPO)))
    moved = _Api(image_id="sha256:" + "9" * 64)
    with pytest.raises(ImageError, match=r"is now sha256:9+, not the recorded sha256:1+; build again"):
        image.push(record=record, client=_Client(moved))
    assert moved.pushed == ()


def test_a_failed_push_keeps_the_record(tmp_path):
    record = tmp_path / "image.json"
    record.write_text(json.dumps(_record_data(repository=REGISTRY_REPO)))
    before = record.read_text()
    api = _Api(push_chunks=[{"status": "Preparing", "id": "l1"}, {"error": "denied: Permission denied on repository"}])
    with pytest.raises(ImageError, match="push failed: denied: Permission denied"):
        image.push(record=record, client=_Client(api))
    assert record.read_text() == before


def test_the_record_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that dies midway leaves the previous record whole and no partial file behind."""
    record = tmp_path / "image.json"
    record.write_text(json.dumps(_record_data(repository=REGISTRY_REPO)))
    before = record.read_text()
    real_write_text = Path.write_text

    def dying_write_text(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", dying_write_text)
    api = _Api(push_chunks=[{"aux": {"Digest": "sha256:" + "3" * 64}}])
    with pytest.raises(OSError, match="disk full"):
        image.push(record=record, client=_Client(api))
    monkeypatch.undo()
    assert record.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["image.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not a valid image record"), ('{"image": "x"}', "not an image record"), ("[]", "not an image")],
)
def test_a_broken_record_is_named(tmp_path, content, message):
    record = tmp_path / "image.json"
    record.write_text(content)
    with pytest.raises(ImageError, match=f"{record}: {message}"):
        image.read_record(record)
