"""`make demo`: the ingest stages on the embedded default data, end to end, on this machine.

Builds the BigEarthNet-format mirror described by params.yaml (`mirror`), serves it over HTTP on a random loopback
port the way the official archive is served, downloads it with tasks.download (checksum from the served .sha256),
validates it with tasks.validate, and prints where everything went. Re-running is cheap: every stage skips work
that is already complete.
"""

from __future__ import annotations

import functools
import http.server
import logging
import threading
import time
from pathlib import Path

from tasks.cli import configure_logging
from tasks.config import load_section
from tasks.download import DownloadParams, download, resolve_request
from tasks.mirror import MirrorParams, build_mirror
from tasks.validate import DATA_DOCS_INDEX, ValidateParams, validate

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".local" / "data"
SNAPSHOT = "demo"

log = logging.getLogger("demo")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        log.debug("http: " + format, *args)


def _serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    configure_logging(verbose=False)
    started = time.monotonic()
    mirror = build_mirror(out=DATA / "mirror", params=load_section("mirror", MirrorParams))
    server, base = _serve(mirror.archive.parent)
    try:
        params = load_section("download", DownloadParams)
        url, checksum = resolve_request(
            url=f"{base}/{mirror.archive.name}",
            source=None,
            checksum_url=f"{base}/{mirror.archive.name}.sha256",
            params=params,
        )
        fetched = download(url=url, dest=DATA / "raw" / SNAPSHOT, checksum=checksum, params=params)
    finally:
        server.shutdown()
    validated = validate(
        patches=fetched.root, out=DATA / "validated" / SNAPSHOT, params=load_section("validate", ValidateParams)
    )
    report = validated.report
    print(
        f"""
cloudscreen demo — snapshot {SNAPSHOT!r}, {time.monotonic() - started:.0f} s
  mirror      {mirror.archive}
              {len(mirror.patch_ids)} patches ({len(mirror.cloud_patch_ids)} in the official cloud-and-shadow list)
  served at   {url}
  downloaded  {fetched.root}{"  (already there)" if fetched.skipped else ""}
  validated   {report["checked"]} checked, {report["valid"]} valid, {len(report["quarantined"])} quarantined; \
suite {"passed" if report["suite_success"] else "FAILED"}
  report      {validated.report_path}
  Data Docs   file://{validated.report_path.parent / DATA_DOCS_INDEX}
"""
    )
    if not validated.success:
        raise SystemExit("validation failed: see the report and Data Docs above")


if __name__ == "__main__":
    main()
