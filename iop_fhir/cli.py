"""The ``iop-fhir`` command: serve, init-db."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from iop_fhir.config import Settings


def _serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from iop_fhir.store import migrate
    from iop_fhir.store.sql import SqlStore

    settings = Settings.from_env()
    # Migrate once in the master, before workers start, so that workers never race on an empty database.
    store = SqlStore(settings.database_url)
    migrate.upgrade(store.engine)
    store.close()

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread" if args.threads > 1 else "sync")
            self.cfg.set("accesslog", "-" if args.access_log else None)
            # Method, path, status, size and duration only: query strings carry search values (names, MRNs, dates
            # of birth) that must not reach logs.
            self.cfg.set("access_log_format", '%(t)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms')
            self.cfg.set("timeout", 120)
            self.cfg.set("keepalive", 5)

        def load(self) -> Any:
            from iop_fhir.app import create_app

            return create_app(settings)

    print(
        f"iop-fhir serving FHIR R4 at http://{args.host}:{args.port}/fhir ({settings.database_url.split(':')[0]})",
        file=sys.stderr,
    )
    Server().run()
    return 0


def _init_db(_args: argparse.Namespace) -> int:
    from iop_fhir.store import migrate
    from iop_fhir.store.sql import SqlStore

    store = SqlStore(Settings.from_env().database_url)
    migrate.upgrade(store.engine)
    store.close()
    print("database is at the newest schema revision", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iop-fhir", description="FHIR R4 service for Intensive Outpatient Programs")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service under gunicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--threads", type=int, default=1, help="threads per worker (gthread when above 1)")
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log method, path, status and duration of each request (never query strings or bodies)",
    )
    serve.set_defaults(run=_serve)
    init_db = commands.add_parser("init-db", help="apply the database migrations")
    init_db.set_defaults(run=_init_db)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
