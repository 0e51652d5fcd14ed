"""The Docker engine connection the docker training backend and ops.image share."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from tasks.lib.errors import DockerUnavailableError

if TYPE_CHECKING:
    import docker

DEFAULT_SOCKET = "unix:///var/run/docker.sock"  # where the Docker SDK looks when DOCKER_HOST is unset


def docker_client(base_url: str | None = None) -> docker.DockerClient:
    """A client connected to the Docker engine at `base_url`, else DOCKER_HOST, else the default socket.

    Raises:
        DockerUnavailableError: nothing answers there; the message names where the client looked and why it failed.
    """
    import docker
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    if base_url:
        where = base_url
    elif os.environ.get("DOCKER_HOST"):
        where = f"{os.environ['DOCKER_HOST']} (DOCKER_HOST)"
    else:
        where = f"{DEFAULT_SOCKET} (the default socket; DOCKER_HOST is not set)"
    try:
        # Both ask the engine for its API version first, so an absent engine fails here, not at the first call.
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        client.ping()
    except (DockerException, RequestException) as exc:
        raise DockerUnavailableError(
            f"no Docker engine at {where}: {connection_failure(exc)}; start Docker or point DOCKER_HOST at an engine"
        ) from exc
    return client


def connection_failure(exc: BaseException) -> str:
    """The root cause of a connection failure in a few words ("connection refused"), not urllib3's nested reprs."""
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        item = pending.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.strerror:
            return item.strerror.lower()
        pending.extend([*item.args, item.__cause__, item.__context__, getattr(item, "reason", None)])
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text)
    if found:
        return found.group(1).strip().lower()
    return text.removeprefix("Error while fetching server API version: ").splitlines()[0][:200]
