"""Ray job entry point: every step of `sage-stream run` on a Ray cluster (--executor ray).

Submit it from the folder that holds your model factory (it becomes the job's working dir, so
`model = "mymodels:net"` is importable on every worker):

    ray job submit --address http://HEAD_NODE:8265 --working-dir . \\
        --runtime-env-json '{"pip": ["sage-stream[ray,s3]"]}' \\
        -- python pipelines/ray_job.py --config pipelines/ray-s3-gpu.toml

It joins the cluster the job runs on (`ray.init(address="auto")`), or starts a local Ray when
there is none, so the same command works on a laptop. Arguments after --config go to
`sage-stream run` as they are and win over the file (`--keep 0.2`, `--out s3://...`).
Exit status: 0 done, 2 bad input or configuration (one line on stderr), as the CLI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import ray

from sage_stream.cli import main as sage_stream_main

log = logging.getLogger("sage_stream")


def connect() -> None:
    """The job's cluster if there is one, else a local Ray on this machine."""
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        log.warning("no running Ray cluster found: starting a local one on this machine")
        ray.init()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="sage-stream run --executor ray, as a Ray job",
        epilog="any other argument is passed on to `sage-stream run`",
    )
    parser.add_argument("--config", required=True, metavar="FILE.toml", help="run options")
    args, rest = parser.parse_known_args(argv)
    connect()
    return sage_stream_main(["run", "--config", args.config, "--executor", "ray", *rest])


if __name__ == "__main__":
    sys.exit(main())
