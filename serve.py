"""Serve the steering page and an HTTP API: generate with hooks and attributions, and run the stages as jobs whose
progress streams as server-sent events. Binds 127.0.0.1 by default (no authentication: keep it local)."""

from models.io.cli import ArgumentParser, add_common, options_from_args
from models.io.errors import run_cli
from models.server.serving import ServeOptions, serve


def build_parser() -> ArgumentParser:
    d = ServeOptions()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--host", default=d.host, help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port")
    p.add_argument("--teacher", default=d.teacher, help="teacher checkpoint")
    p.add_argument("--student", default=d.student, help="direct-decoder checkpoint distilled from --teacher")
    p.add_argument("--features", default=d.features,
                   help="reference features of this pair (default: found in WORKDIR/features, demo/ or "
                        "./reference_features.pt, else extracted once into WORKDIR/features, a few CPU minutes)")
    p.add_argument("--workdir", default=d.workdir,
                   help="working directory: job records (jobs.sqlite), job logs, built features; every path in a "
                        "job's options must lie inside it")
    add_common(p)
    return p


def main():
    args = build_parser().parse_args()
    serve(options_from_args(ServeOptions, args), dry_run=args.dry_run)


if __name__ == "__main__":
    run_cli(main, resumable=False)
