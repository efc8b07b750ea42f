"""`vqret index s3://...` against a local S3 (moto's server): time and requests per run.

    python -m vqret.benchmarks.remote_s3 FOLDER --model ViT-B-32 --pretrained FILE [--json]

Uploads FOLDER's images to s3://bench/photos on a moto server in this process, then runs
`vqret index s3://bench/photos --store TMP` twice as a user would (a fresh process each,
AWS_ENDPOINT_URL pointing at the server): a first run, and a second with nothing changed.
For each run: wall seconds, the report's counts, and the HTTP requests the server answered
by kind (LIST, object GET, HEAD, other). The second run should cost its listing only.
Needs s3fs and moto[server] (the test extra).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vqret.retrieval.images import IMAGE_EXTENSIONS


def _server():
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    seen: list[tuple[str, str, str]] = []
    app = DomainDispatcherApplication(create_backend_app)

    def recording(environ, start_response):
        seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"],
                     environ.get("QUERY_STRING", "")))
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, recording, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def _kinds(requests: list[tuple[str, str, str]]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for method, path, query in requests:
        if method == "GET" and "list-type=2" in query:
            counts["list"] += 1
        elif method == "GET" and path.count("/") >= 2:
            counts["object_get"] += 1
        else:
            counts[method.lower()] += 1
    return dict(counts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--engine", default="local")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    server, seen = _server()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    for p in files:
        fs.put_file(str(p), f"bench/photos/{p.relative_to(args.folder).as_posix()}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("first", "unchanged"):
            seen.clear()
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "vqret.cli.main", "index", "s3://bench/photos",
                 "--store", f"{tmp}/store", "--model", args.model, "--pretrained",
                 args.pretrained, "--engine", args.engine, "--json"],
                capture_output=True, text=True, env={**os.environ, **env}, check=True,
            )
            report = json.loads(proc.stdout)
            runs.append({
                "run": name, "seconds": round(time.perf_counter() - started, 2),
                "report_seconds": report["seconds"],
                **{k: report[k] for k in ("added", "unchanged", "embedded")},
                "failed": len(report["failed"]), "requests": _kinds(seen),
            })
    server.shutdown()
    result = {"images": len(files), "bytes": sum(p.stat().st_size for p in files),
              "engine": args.engine, "runs": runs}
    print(json.dumps(result, indent=None if args.json else 2))
    return result


if __name__ == "__main__":
    main()
