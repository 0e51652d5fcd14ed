"""Data versions: a snapshot's tiles and sample manifests, content-addressed in a DVC remote, and restored from it.

A snapshot's data version V is DVC's own hash of one directory holding `tiles/` (the tile step's output) and
`samples/` (the sample step's output): the `md5` that a `.dvc` file records for it, `<32 hex digits>.dir`. Because V
is a content hash, restoring V brings back exactly those bytes, from any machine that can read the remote. The hashes
of `tiles/` and `samples/` alone are recorded too; they equal what dvc.lock records for the same directories as stage
outputs, and they can be restored on their own.

    python -m tasks.versioning version --tiles DIR --samples DIR                      print V; nothing is uploaded
    python -m tasks.versioning push --snapshot S --tiles DIR --samples DIR --out DIR  upload; write OUT/version.json
    python -m tasks.versioning restore --version V --dest DIR                         DEST/tiles, DEST/samples

The remote is `versioning.remote` (a `gs://` URL). With STORAGE_EMULATOR_HOST set (demo, tests) it is reached at the
emulator, anonymously; otherwise gcsfs finds credentials in the environment (ADC, Workload Identity).

Every call works in a throwaway DVC workspace of its own (`dvc init --no-scm`, beside its output), so concurrent
runs, such as two backfills at once or a retry racing its predecessor, never contend for DVC's repo lock. The remote
is content-addressed: two runs that upload the same object upload the same bytes, so they cannot corrupt each other.
Calls set a few environment variables for DVC and gcsfs while they run: run concurrent calls in separate processes
(Airflow tasks, the CLI), not in threads of one process.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import Field, field_validator

from tasks.lib import cli
from tasks.lib.config import StepParams, load_section
from tasks.lib.errors import ConfigError, UnknownVersionError, VersioningError
from tasks.lib.files import atomic_dir, write_json
from tasks.lib.tiles import MANIFEST_FILE as TILE_MANIFEST_FILE
from tasks.sample import MANIFEST_FILE as SAMPLE_MANIFEST_FILE

if TYPE_CHECKING:
    from dvc.output import Output
    from dvc.repo import Repo

log = logging.getLogger(__name__)

RECORD_FILE = "version.json"
DVC_FILE = "data.dvc"
TILES_DIR = "tiles"
SAMPLES_DIR = "samples"
_DATA_DIR = "data"  # the versioned directory inside a workspace; `data.dvc` describes it
_REMOTE_NAME = "store"
_REMOTE_RE = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/\S*)?")
_VERSION_RE = re.compile(r"[0-9a-f]{32}(\.dir)?")
_SNAPSHOT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")  # logical dates and Airflow run ids; no path separators
# Levels for the libraries' loggers during DVC calls: DVC logs progress at INFO on stdout, where the CLIs print their
# result; gcsfs logs every failed request with a traceback, which the VersioningError raised for it already names.
_QUIET_LOGGERS = {
    "dvc": logging.WARNING,
    "dvc_objects": logging.WARNING,
    "dvc_data": logging.WARNING,
    "fsspec": logging.WARNING,
    "gcsfs": logging.CRITICAL,
}


class VersioningParams(StepParams):
    """The `versioning` section of params.yaml."""

    remote: str
    jobs: int = Field(ge=1)

    @field_validator("remote")
    @classmethod
    def _gs_url(cls, value: str) -> str:
        if not _REMOTE_RE.fullmatch(value):
            raise ValueError(f"{value!r}: expected gs://BUCKET or gs://BUCKET/PATH")
        return value.rstrip("/")


@dataclass(frozen=True)
class DataVersion:
    version: str  # DVC's hash of the snapshot directory (tiles/ and samples/), "<md5>.dir"
    tiles: str  # DVC's hash of tiles/ alone (what dvc.lock records for the same directory)
    samples: str  # DVC's hash of samples/ alone
    files: int
    size: int  # bytes


@dataclass(frozen=True)
class PushResult:
    snapshot: str
    data: DataVersion
    remote: str
    uploaded: int  # objects sent; 0 when the remote already held them all
    record: Path  # OUT/version.json


@dataclass(frozen=True)
class RestoreResult:
    version: str
    dest: Path
    files: int
    size: int  # bytes


# --- DVC workspaces -----------------------------------------------------------------------------------------------


def _remote_config(remote: str) -> dict[str, Any]:
    config: dict[str, Any] = {"url": remote}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        # dvc-gs turns allow_anonymous_login into gcsfs's token="anon" (`credentialpath anon` is read as a file name).
        config["endpointurl"] = emulator if "://" in emulator else f"http://{emulator}"
        config["allow_anonymous_login"] = True
    return config


@contextlib.contextmanager
def _dvc_environment(root: Path) -> Iterator[None]:
    """Environment and logging for DVC calls, restored afterwards (DVC and gcsfs read some of it only once)."""
    env = {
        # gcsfs reads this at import: its experimental bucket-type probe waits 60 s per bucket of an emulator.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # DVC keeps per-repo state in a machine-wide directory (/var/tmp/dvc); a throwaway workspace keeps its own.
        "DVC_SITE_CACHE_DIR": str(root / "site-cache"),
        # Only the workspace's own configuration counts, never a user's or the machine's (a shared cache, a remote).
        "DVC_GLOBAL_CONFIG_DIR": str(root / "no-config"),
        "DVC_SYSTEM_CONFIG_DIR": str(root / "no-config"),
    }
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # Never probe for GCE metadata credentials against an emulator. Not set otherwise: on GKE, Workload Identity
        # credentials come from the metadata server.
        env["NO_GCE_CHECK"] = "true"
    experimental = os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "true").lower() in ("true", "1")
    if "gcsfs" in sys.modules and experimental and os.environ.get("STORAGE_EMULATOR_HOST"):
        log.warning("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set: each emulator bucket "
                    "may take 60 s to probe; set it in this process's environment")  # fmt: skip
    saved_env = {key: os.environ.get(key) for key in env}
    saved_levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    os.environ.update(env)
    try:
        import dvc.repo  # noqa: F401  (importing dvc sets up its loggers; override them below)

        for name, level in _QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        yield
    finally:
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _workspace(root: Path, remote: str | None = None) -> Iterator[Repo]:
    """A fresh DVC workspace at `root/repo` (no SCM), with `remote` as its default remote."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with _dvc_environment(root):
        try:
            init = Repo.init(str(root / "repo"), no_scm=True)
            with init.config.edit() as config:
                # Hard links from the cache: files staged or pulled into the workspace are written once.
                config["cache"]["type"] = "hardlink"
                if remote is not None:
                    config["remote"][_REMOTE_NAME] = _remote_config(remote)
                    config["core"]["remote"] = _REMOTE_NAME
            init.close()
            with Repo(str(root / "repo")) as repo:
                yield repo
        except (DvcException, OSError) as exc:
            # OSError: gcsfs and aiohttp report an unreachable or refusing remote as connection errors.
            where = f" with the remote {remote}" if remote else ""
            raise VersioningError(f"DVC failed{where}: {exc}") from exc


@contextlib.contextmanager
def _scratch(beside: Path, suffix: str) -> Iterator[Path]:
    """A temporary directory beside `beside` (same file system, so hard links and renames work), removed after."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=suffix, dir=beside.parent))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _stage(data: Path, tiles: Path, samples: Path, copy: Callable[[str, str], object]) -> None:
    data.mkdir()
    shutil.copytree(tiles, data / TILES_DIR, copy_function=copy)
    shutil.copytree(samples, data / SAMPLES_DIR, copy_function=copy)


def _describe(out: Output) -> tuple[DataVersion, list[Any]]:
    """The data version of a `data` output, and the tree objects of its parts (tiles/, samples/)."""
    tree = out.obj
    parts = [tree.get_obj(None, (name,)) for name in (TILES_DIR, SAMPLES_DIR)]
    version = DataVersion(
        version=out.hash_info.value,
        tiles=parts[0].oid,
        samples=parts[1].oid,
        files=out.meta.nfiles,
        size=out.meta.size,
    )
    return version, parts


def _check_inputs(tiles: Path, samples: Path) -> None:
    if not (tiles / TILE_MANIFEST_FILE).is_file():
        raise VersioningError(f"{tiles}: no {TILE_MANIFEST_FILE} (expected the tile step's output)")
    if not any(samples.glob(f"*/{SAMPLE_MANIFEST_FILE}")):
        raise VersioningError(f"{samples}: no <set>/{SAMPLE_MANIFEST_FILE} (expected the sample step's output)")


def parse_version(version: str) -> str:
    """A data version as DVC names the object: `<32 hex digits>.dir` (the `.dir` may be left out).

    Raises:
        VersioningError: not a DVC directory hash.
    """
    text = version.strip().lower()
    if not _VERSION_RE.fullmatch(text):
        raise VersioningError(f"data version {version!r}: expected a DVC directory hash, 32 hex digits + '.dir'")
    return text if text.endswith(".dir") else f"{text}.dir"


# --- the entry functions ------------------------------------------------------------------------------------------


def data_version(*, tiles: Path, samples: Path) -> DataVersion:
    """The data version of a snapshot's tiles and samples directories, computed exactly as `push` does, uploading
    nothing (for lineage tags before or without a push).

    Raises:
        VersioningError: `tiles` or `samples` is not the output of its step.
    """
    _check_inputs(tiles, samples)
    with _scratch(tiles, ".version") as root, _workspace(root) as repo:
        data = Path(repo.root_dir) / _DATA_DIR
        # Hard links cost nothing, and without a commit DVC neither moves nor write-protects the files.
        _stage(data, tiles, samples, copy=_link_or_copy)
        (stage,) = repo.add(str(data), no_commit=True)
        version, _ = _describe(stage.outs[0])
    log.info("data version of %s + %s: %s (%d files, %d bytes)", tiles, samples, version.version, version.files,
             version.size)  # fmt: skip
    return version


def push(*, snapshot: str, tiles: Path, samples: Path, out: Path, params: VersioningParams) -> PushResult:
    """Upload a snapshot's tiles and samples to the DVC remote and record its data version in `out`.

    `out` (replaced atomically) receives `version.json` (snapshot, version, part hashes, counts, remote, inputs) and
    `data.dvc`, the DVC file that `dvc pull` in any workspace with this remote restores the data from. Objects the
    remote already holds are not sent again.

    Raises:
        VersioningError: a bad snapshot name, inputs that are not their steps' outputs, or a failed upload.
    """
    if not _SNAPSHOT_RE.fullmatch(snapshot):
        raise VersioningError(f"snapshot {snapshot!r}: expected letters, digits and . _ : + - (no path separators)")
    _check_inputs(tiles, samples)
    log.info("pushing snapshot %s (tiles %s, samples %s) to %s", snapshot, tiles, samples, params.remote)
    with _scratch(out, ".push") as root:
        with _workspace(root, params.remote) as repo:
            data = Path(repo.root_dir) / _DATA_DIR
            # A copy: committing moves staged files into the cache and write-protects them, which must not happen
            # to the step's own output files through a shared hard link.
            _stage(data, tiles, samples, copy=shutil.copy2)
            (stage,) = repo.add(str(data))
            version, parts = _describe(stage.outs[0])
            uploaded = repo.push(jobs=params.jobs)
            # The parts' own directory objects, so that their hashes (dvc.lock's) can be restored on their own.
            remote_odb = repo.cloud.get_remote_odb(command="push")
            for part in parts:
                if not remote_odb.exists(part.oid):
                    remote_odb.add(part.path, part.fs, part.oid)
                    uploaded += 1
            dvc_file = (Path(repo.root_dir) / DVC_FILE).read_text()
        with atomic_dir(out) as tmp:
            (tmp / DVC_FILE).write_text(dvc_file)
            write_json(
                tmp / RECORD_FILE,
                {
                    "snapshot": snapshot,
                    "version": version.version,
                    "parts": {TILES_DIR: version.tiles, SAMPLES_DIR: version.samples},
                    "files": version.files,
                    "bytes": version.size,
                    "remote": params.remote,
                    "inputs": {TILES_DIR: str(tiles.resolve()), SAMPLES_DIR: str(samples.resolve())},
                },
            )
    log.info("pushed snapshot %s as data version %s (%d files, %d bytes, %d objects uploaded); record %s", snapshot,
             version.version, version.files, version.size, uploaded, out / RECORD_FILE)  # fmt: skip
    return PushResult(snapshot, version, params.remote, uploaded, out / RECORD_FILE)


def restore(*, version: str, dest: Path, params: VersioningParams) -> RestoreResult:
    """Bring back the directory whose DVC hash is `version` from the remote into `dest` (replaced atomically).

    For a snapshot's data version, `dest` receives `tiles/` and `samples/`; for a part's hash, that directory's files.

    Raises:
        VersioningError: a malformed version, an unreachable remote, or a version stored incompletely.
        UnknownVersionError: the remote holds no directory with this hash.
    """
    oid = parse_version(version)
    log.info("restoring data version %s from %s into %s", oid, params.remote, dest)
    with _scratch(dest, ".restore") as root:
        with _workspace(root, params.remote) as repo:
            workspace = Path(repo.root_dir)
            remote_odb = repo.cloud.get_remote_odb(command="pull")
            try:
                # Not odb.exists(): fsspec answers False for any error, an unreachable remote included.
                remote_odb.fs.info(remote_odb.oid_to_path(oid))
            except FileNotFoundError as exc:
                raise UnknownVersionError(f"data version {oid} is not in the DVC remote {params.remote}") from exc
            (workspace / DVC_FILE).write_text(
                yaml.safe_dump({"outs": [{"md5": oid, "hash": "md5", "path": _DATA_DIR}]}, sort_keys=False)
            )
            from dvc.exceptions import CheckoutError

            try:
                repo.pull(jobs=params.jobs)
            except CheckoutError as exc:
                raise VersioningError(
                    f"data version {oid} is incomplete in the DVC remote {params.remote}: {exc}"
                ) from exc
        data = workspace / _DATA_DIR
        files = [p for p in data.rglob("*") if p.is_file()]
        with atomic_dir(dest) as tmp:
            for child in data.iterdir():
                child.replace(tmp / child.name)
            for path in tmp.rglob("*"):
                if path.is_file():
                    # The cache's write protection came along with the hard link; these are ordinary files now.
                    path.chmod(0o644)
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    log.info("restored data version %s into %s (%d files, %d bytes)", oid, dest, len(files), size)
    return RestoreResult(oid, dest, len(files), size)


def restore_into(into: Path, *, version: str | None, params: VersioningParams) -> Path:
    """Restore a data version into `into/data` and return that directory (tiles/ and samples/): how an image's
    entrypoint (`--restore-data DIR --data-version V` of tasks.train and tasks.screen), away from the pipeline's files,
    gets its data. A subdirectory, because `into` may be a mount point (a pod's emptyDir), which the atomic replacement
    cannot rename.

    Raises:
        ConfigError: no data version was given.
    """
    if not version:
        raise ConfigError("--restore-data needs --data-version (which data version to restore)")
    return restore(version=version, dest=into / _DATA_DIR, params=params).dest


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiles", type=Path, required=True, help="the snapshot's tile step output directory")
    parser.add_argument("--samples", type=Path, required=True, help="the snapshot's sample step output directory")


def main() -> None:
    p = cli.parser(__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True, metavar="{version,push,restore}")
    _add_inputs(commands.add_parser("version", help="print the data version of tiles + samples; upload nothing"))
    push_cmd = commands.add_parser("push", help="upload a snapshot, record it in OUT, print its data version")
    push_cmd.add_argument("--snapshot", required=True, help="the snapshot (partition key), e.g. a logical date")
    _add_inputs(push_cmd)
    push_cmd.add_argument("--out", type=Path, required=True, help="directory for version.json and data.dvc")
    restore_cmd = commands.add_parser("restore", help="bring back a data version into DEST, print DEST")
    restore_cmd.add_argument("--version", required=True, help="a data version printed by push or version")
    restore_cmd.add_argument("--dest", type=Path, required=True, help="directory to restore into (replaced)")
    for command in (push_cmd, restore_cmd):
        command.add_argument("--remote", help="DVC remote, gs://BUCKET/PATH (default: params versioning.remote)")
    args = p.parse_args()
    cli.configure_logging(args.verbose)
    if args.command == "version":
        print(data_version(tiles=args.tiles, samples=args.samples).version)
        return
    overrides = [*args.overrides, *([f"versioning.remote={args.remote}"] if args.remote else [])]
    params = load_section("versioning", VersioningParams, args.params, overrides)
    if args.command == "push":
        result = push(snapshot=args.snapshot, tiles=args.tiles, samples=args.samples, out=args.out, params=params)
        print(result.data.version)
    else:
        print(restore(version=args.version, dest=args.dest, params=params).dest)


if __name__ == "__main__":
    cli.run(main)
