"""The ``iop-fhir`` command: serve, worker, sync, export, init-db, demo, report, validate, map, client, token."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

from iop_fhir.config import Settings


def _serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from iop_fhir import runtime

    settings = Settings.from_env()
    # Migrate once in the master, before workers start, so that workers never race on an empty database.
    runtime.open_store(settings).close()
    if args.server == "waitress":
        from iop_fhir import serving

        print(
            f"iop-fhir serving FHIR R4 at http://{args.host}:{args.port}/fhir under waitress "
            f"({settings.database_url.split(':')[0]})",
            file=sys.stderr,
        )

        def make_app() -> Any:
            from iop_fhir.app import create_app

            return serving.settled(create_app(settings))

        return serving.serve(
            make_app,
            settings,
            host=args.host,
            port=args.port,
            workers=args.workers,
            threads=args.threads,
            access_log=args.access_log,
        )

    from gunicorn import util

    from iop_fhir import limits

    util.write_error = limits.gunicorn_write_error  # its 400/414/431 pages are OperationOutcomes, not HTML

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
            # gunicorn's largest request line (its own 414 is an HTML page): above the app's limit on the request
            # target (limits.MAX_TARGET_BYTES), which answers 414 with an OperationOutcome first.
            self.cfg.set("limit_request_line", 8190)

        def load(self) -> Any:
            from iop_fhir import serving
            from iop_fhir.app import create_app

            return serving.settled(create_app(settings))

    print(
        f"iop-fhir serving FHIR R4 at http://{args.host}:{args.port}/fhir ({settings.database_url.split(':')[0]})",
        file=sys.stderr,
    )
    Server().run()
    return 0


def _init_db(_args: argparse.Namespace) -> int:
    from iop_fhir import runtime

    runtime.open_store(Settings.from_env()).close()
    print("database is at the newest schema revision", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from iop_fhir import demo, runtime
    from iop_fhir.app import create_app

    settings = Settings.from_env()
    with runtime.opened(settings, seed=settings.seed_conformance) as parts:
        try:
            summary = demo.seed(create_app(runtime=parts), patients=args.patients, seed=args.seed, progress=True)
        except demo.DemoError as error:
            print(f"iop-fhir demo: {error}", file=sys.stderr)
            return 1
    print(summary)
    return 0


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {raw}")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {raw}")
    return value


def _worker(args: argparse.Namespace) -> int:
    import logging

    from iop_fhir import runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    return runtime.run_worker(
        settings,
        once=args.once,
        poll=args.poll,
        batch=args.batch,
        lease=args.lease,
        follow_every=args.follow,
        sync_every=args.sync,
    )


def _sync(args: argparse.Namespace) -> int:
    import logging

    from iop_fhir import runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return runtime.run_sync(Settings.from_env(), partner_id=args.partner, once=args.once, interval=args.interval)


def _export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from iop_fhir import runtime
    from iop_fhir.errors import FhirError
    from iop_fhir.fhir import export

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"iop-fhir export: {out} must be a new or empty folder", file=sys.stderr)
        return 2
    level = "group" if args.group else "patient" if args.patient else "system"
    params = [(name, value) for name, value in (("_type", args.type), ("_since", args.since)) if value]
    try:
        request = export.parse(level, params, group=args.group)
    except FhirError as error:
        print(f"iop-fhir export: {error}", file=sys.stderr)
        return 2
    with runtime.opened(Settings.from_env()) as parts:
        out.mkdir(parents=True, exist_ok=True)
        with tqdm(desc="export", unit=" resources", disable=None, file=sys.stderr) as progress:

            def advance(res_type: str, count: int) -> None:
                progress.set_description(res_type)
                progress.update(count)

            try:
                result = export.export_to_folder(parts.exporter(background=False), request, out, on_chunk=advance)
            except FhirError as error:
                print(f"iop-fhir export: {error}", file=sys.stderr)
                return 2
    print(json.dumps(result, indent=2))
    return 1 if result["error"] else 0


def _report_pages(out: Path) -> Path:
    """The folder the stays' pages of a report written to ``out`` go to: beside it, named after it."""
    return out.with_name(f"{out.stem}-stays")


def _report_date(name: str, raw: str) -> date:
    try:
        if len(raw) != 10:
            raise ValueError
        return date.fromisoformat(raw)
    except ValueError:
        raise _CommandError(f"{name} must be a date (YYYY-MM-DD), got {raw[:40]!r}") from None


def _report(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from sqlalchemy.exc import SQLAlchemyError
    from tqdm import tqdm

    from iop_fhir import runtime
    from iop_fhir.outcomes import page, patient, program
    from iop_fhir.outcomes import rules as outcome_rules

    settings = Settings.from_env()
    try:
        start, end = _report_date("--from", args.start), _report_date("--to", args.end)
        today = _report_date("--today", args.today) if args.today else date.today()
        if start > end:
            raise _CommandError(f"--from ({start.isoformat()}) is after --to ({end.isoformat()})")
        if (end - start).days >= program.MAX_PERIOD_DAYS:
            raise _CommandError(f"the period is longer than {program.MAX_PERIOD_DAYS} days; ask for five years or less")
        codes = sorted(outcome_rules.programs(Path(settings.mappings_dir)))
        if args.program not in codes:
            raise _CommandError(f"--program must be one of: {', '.join(codes)}; got {args.program[:40]!r}")
        out = Path(args.out)
        if not out.parent.is_dir():
            raise _CommandError(f"--out {out}: its folder {out.parent} does not exist")
        with runtime.opened(settings) as parts:
            reader = parts.outcomes
            period = program.Period(start, end)
            loaded = reader.stays(program=args.program, period=period)
            group = program.cohort(loaded.stays, period, args.program)
            report = program.outcomes(group, reader.rules, period, today, args.program)
            stays = [patient.outcomes(s, reader.rules, today) for s in group]
        folder = _report_pages(out)
        folder.mkdir(exist_ok=True)
        # Enrollment ids are the store's ids; quoted all the same, so that none can name a path outside the folder.
        names = {s["enrollment_id"]: quote(s["enrollment_id"], safe="-_.~") + ".html" for s in stays}
        for stay in tqdm(stays, desc="stay pages", unit=" pages", disable=None, file=sys.stderr):
            (folder / names[stay["enrollment_id"]]).write_text(page.patient_page(stay), encoding="utf-8")

        def href(enrollment_id: str) -> str:
            return f"{quote(folder.name)}/{quote(names[enrollment_id])}"

        out.write_text(page.program_page(report, stays, patient_href=href), encoding="utf-8")
    except (_CommandError, runtime.StoreUnavailable) as error:
        print(f"iop-fhir report: {error}", file=sys.stderr)
        return 2
    except SQLAlchemyError as error:
        print(f"iop-fhir report: database error ({type(error).__name__})", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"iop-fhir report: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    print(f"{out}: {report['stays']} stays; their pages in {folder}/", file=sys.stderr)
    return 0


def _resources(source: str) -> Iterator[tuple[str, Any]]:
    """(label, parsed JSON) for a .json file, each line of an .ndjson file, every such file under a folder, or -."""
    if source == "-":
        yield "-", json.loads(sys.stdin.read())
        return
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".ndjson")) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".ndjson":
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if line.strip():
                    yield f"{file}:{number}", json.loads(line)
        else:
            yield str(file), json.loads(file.read_text())


def _describe(expression: str | None, diagnostics: str) -> str:
    if not expression or diagnostics.startswith(expression):
        return diagnostics
    return f"{expression}: {diagnostics}"


def _validate(args: argparse.Namespace) -> int:
    from iop_fhir.r4.validation import validate

    failed = 0
    for source in args.sources:
        try:
            for label, resource in _resources(source):
                issues = validate(resource, conditional_references=args.conditional_references)
                errors = [i for i in issues if i.severity in ("error", "fatal")]
                if errors:
                    failed += 1
                    details = "; ".join(_describe(i.expression, i.diagnostics) for i in errors)
                    print(f"FAIL {label} :: {details}")
                elif not args.quiet:
                    print(f"OK {label}")
        except (OSError, ValueError) as exc:
            failed += 1
            print(f"FAIL {source} :: cannot read: {exc}")
    return 1 if failed else 0


def _map(args: argparse.Namespace) -> int:
    from iop_fhir.errors import FhirError
    from iop_fhir.iop import schemas
    from iop_fhir.mapping import load_engine, to_bundle

    settings = Settings.from_env()
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        payload = json.loads(text)
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    engine = load_engine(settings.mappings_dir)
    context = {"age_group": args.age_group}
    try:
        record = schemas.load(args.kind, payload)
        bundle = to_bundle(args.kind, record, engine, context=context)
    except FhirError as error:
        print(json.dumps(error.outcome, indent=2), file=sys.stderr)
        return 1
    print(json.dumps(bundle, indent=2, ensure_ascii=False))
    return 0


class _CommandError(Exception):
    """A message for the operator; the command exits 2."""


def _auth_server() -> tuple[Any, Any]:
    """The client registry and the store, on the database of IOP_FHIR_DATABASE_URL (migrated when behind)."""
    from iop_fhir import runtime
    from iop_fhir.security.registry import ClientRegistry

    try:
        store = runtime.open_store(Settings.from_env())
    except runtime.StoreUnavailable as error:
        raise _CommandError(str(error)) from None
    return ClientRegistry(store), store


def _auth_command(run: Any) -> Any:
    """Runs a client/token command: its errors become one line on stderr and exit 2, never a traceback."""

    def command(args: argparse.Namespace) -> int:
        from sqlalchemy.exc import SQLAlchemyError

        from iop_fhir.security.registry import ClientError, GrantError, KeyRingError

        name = " ".join(["iop-fhir", args.command, *([args.action] if getattr(args, "action", None) else [])])
        store = None
        try:
            registry, store = _auth_server()
            result: int = run(args, registry, store)
            return result
        except (_CommandError, ClientError, KeyRingError) as error:
            print(f"{name}: {error}", file=sys.stderr)
        except GrantError as error:
            print(f"{name}: {error.error}: {error.description}", file=sys.stderr)
        except SQLAlchemyError as error:
            print(f"{name}: database error ({type(error).__name__})", file=sys.stderr)
        finally:
            if store is not None:
                store.close()
        return 2

    return command


def _read_jwks(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise _CommandError(f"--jwks {path}: cannot read it ({error.strerror})") from None
    except ValueError:
        raise _CommandError(f"--jwks {path}: not JSON") from None


def _generated_client_key(path: str) -> dict[str, Any]:
    """Writes a new EC P-384 private key to ``path`` (mode 0600, never over an existing file) and returns its public
    JWKS, the key id being its RFC 7638 thumbprint."""
    import os

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from iop_fhir.security.tokens import jwk_thumbprint, public_jwk

    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise _CommandError(f"--generate-key {path}: cannot create it ({error.strerror})") from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    jwk = {**public_jwk(key), "kid": jwk_thumbprint(key), "alg": "ES384", "use": "sig"}
    return {"keys": [jwk]}


def _client_add(args: argparse.Namespace, registry: Any, _store: Any) -> int:
    import os

    from iop_fhir.security.registry import ClientError

    if args.generate_key and registry.get(args.client_id) is not None:
        raise ClientError([("client_id", f"a client {args.client_id!r} is already registered")])
    jwks = _read_jwks(args.jwks) if args.jwks else _generated_client_key(args.generate_key)
    try:
        client = registry.add(
            args.client_id,
            jwks=jwks,
            scope=args.scope,
            name=args.name,
            partner_id=args.partner,
            purpose_of_use=args.purpose,
            admin=args.admin,
            consents=args.consents,
        )
    except BaseException:
        if args.generate_key:
            os.unlink(args.generate_key)  # the key of a client that was not registered
        raise
    print(json.dumps(client.summary()))
    if args.generate_key:
        kid = client.jwks["keys"][0]["kid"]
        print(f"private key written to {args.generate_key} (kid {kid}); sign client assertions ES384", file=sys.stderr)
    return 0


def _client_list(_args: argparse.Namespace, registry: Any, _store: Any) -> int:
    for client in registry.list():
        print(json.dumps(client.summary()))
    return 0


def _client_disable(args: argparse.Namespace, registry: Any, _store: Any) -> int:
    registry.disable(args.client_id)
    print(f"client {args.client_id} is disabled", file=sys.stderr)
    return 0


def _token(args: argparse.Namespace, registry: Any, store: Any) -> int:
    from iop_fhir.security.registry import KeyRing, issue_for_client

    keyring = KeyRing.load(Settings.from_env(), store.engine)
    token, scope, expires_in = issue_for_client(registry, keyring, args.client, args.scope)
    print(token)
    print(f"scope {scope}; expires in {expires_in} s", file=sys.stderr)
    return 0


def _add_auth_commands(commands: Any) -> None:
    clients = commands.add_parser("client", help="register, list and disable the clients of /auth/token")
    actions = clients.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a client (SMART Backend Services: private_key_jwt)")
    add.add_argument("client_id", metavar="CLIENT_ID")
    keys = add.add_mutually_exclusive_group(required=True)
    keys.add_argument("--jwks", metavar="FILE", help="the client's public JWKS (RS384 or ES384 keys)")
    keys.add_argument(
        "--generate-key", metavar="OUT.pem", help="make an ES384 key pair: the private key goes to OUT.pem (0600)"
    )
    add.add_argument("--scope", required=True, help='the most the client may be granted, e.g. "system/*.rs"')
    add.add_argument("--partner", metavar="ID", help="the partner (/iop/partners) the client acts for")
    add.add_argument("--purpose", metavar="CODE", help="v3-ActReason purpose of use (default TREAT with --partner)")
    add.add_argument("--admin", action="store_true", help="the client may use the operator endpoints")
    add.add_argument(
        "--consents",
        action="store_true",
        help="the program's consent management: the client may write Consents through /fhir (never with --partner)",
    )
    add.add_argument("--name", help="a display name (default: the client id)")
    add.set_defaults(run=_auth_command(_client_add))
    listing = actions.add_parser("list", help="print every client as a JSON line (no keys)")
    listing.set_defaults(run=_auth_command(_client_list))
    disable = actions.add_parser("disable", help="refuse the client any new token")
    disable.add_argument("client_id", metavar="CLIENT_ID")
    disable.set_defaults(run=_auth_command(_client_disable))
    minter = commands.add_parser(
        "token", help="print an access token for a registered client (local development and tests)"
    )
    minter.add_argument("--client", required=True, metavar="CLIENT_ID")
    minter.add_argument("--scope", help="scopes to ask for (default: everything the client is registered for)")
    minter.set_defaults(run=_auth_command(_token))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iop-fhir", description="FHIR R4 service for Intensive Outpatient Programs")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service (waitress processes, or gunicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--threads", type=int, default=1, help="threads per worker (gunicorn: gthread when above 1)")
    serve.add_argument(
        "--server",
        choices=["gunicorn", "waitress"],
        default="waitress",
        help="waitress processes (default), which read each request whole before the app runs, so that idle and "
        "slow clients hold no thread; or gunicorn (sync workers, gthread when --threads is above 1)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log method, path, status and duration of each request (never query strings or bodies)",
    )
    serve.set_defaults(run=_serve)
    deliverer = commands.add_parser(
        "worker", help="deliver the outbox to partners (retrying with backoff) until SIGTERM or SIGINT"
    )
    deliverer.add_argument("--once", action="store_true", help="deliver what is due now, then exit")
    deliverer.add_argument(
        "--poll", type=_positive_float, default=1.0, help="seconds between looks when nothing is due (default 1)"
    )
    deliverer.add_argument("--batch", type=_positive_int, default=20, help="rows claimed at a time (default 20)")
    deliverer.add_argument(
        "--lease",
        type=_positive_float,
        default=None,
        help="seconds a claimed row stays with this worker (default IOP_FHIR_WORKER_LEASE_SECONDS, 60)",
    )
    deliverer.add_argument(
        "--follow",
        type=float,
        default=60.0,
        help="seconds between looks at the aftercare partners' Tasks of delivered transitions (0: never; default 60)",
    )
    deliverer.add_argument(
        "--sync",
        type=float,
        default=0.0,
        help="seconds between pulls from hospital EHR partners, as `iop-fhir sync` does (0: never, the default)",
    )
    deliverer.set_defaults(run=_worker)
    puller = commands.add_parser(
        "sync",
        help="pull new Conditions, MedicationRequests and lab Observations of enrolled patients from hospital EHRs",
    )
    puller.add_argument("--partner", metavar="ID", help="only this hospital-ehr partner (default: every active one)")
    puller.add_argument("--once", action="store_true", help="one pass, then exit (1 if anything failed)")
    puller.add_argument(
        "--interval", type=_positive_float, default=300.0, help="seconds between passes without --once (default 300)"
    )
    puller.set_defaults(run=_sync)
    exporter = commands.add_parser(
        "export", help="run a Bulk Data export in this process (as the service, every type) into NDJSON files"
    )
    exporter.add_argument("--type", metavar="T,...", help="only these resource types (default: every type)")
    exporter.add_argument("--since", metavar="INSTANT", help="only resources changed after this FHIR instant")
    level = exporter.add_mutually_exclusive_group()
    level.add_argument("--patient", action="store_true", help="the Patient compartment of every patient")
    level.add_argument("--group", metavar="ID", help="the Patient compartment of the Group's member patients")
    exporter.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the files")
    exporter.set_defaults(run=_export)
    init_db = commands.add_parser("init-db", help="apply the database migrations")
    init_db.set_defaults(run=_init_db)
    seeder = commands.add_parser(
        "demo",
        help="seed the database with a synthetic program (partners, referrals, 25 patients' stays) through the API; "
        "running it again changes nothing",
    )
    seeder.add_argument("--patients", type=_positive_int, default=25, help="patients admitted (default 25)")
    seeder.add_argument("--seed", type=int, default=2026, help="the program drawn (default 2026)")
    seeder.set_defaults(run=_demo)
    reporter = commands.add_parser(
        "report",
        help="write a program's outcomes for a period as an HTML page (charts inline, no network), with a page per "
        "stay in a folder beside it (for --out q1.html: q1-stays/<enrollment id>.html), linked from the program page",
    )
    reporter.add_argument("--program", required=True, metavar="CODE", help="a program code (vocabulary program)")
    reporter.add_argument("--from", dest="start", required=True, metavar="YYYY-MM-DD", help="first day of the period")
    reporter.add_argument("--to", dest="end", required=True, metavar="YYYY-MM-DD", help="last day of the period")
    reporter.add_argument("--out", required=True, metavar="FILE.html", help="the program page (written over)")
    reporter.add_argument(
        "--today", metavar="YYYY-MM-DD", help="the day the outcomes are computed as of (default: today)"
    )
    reporter.set_defaults(run=_report)
    check = commands.add_parser("validate", help="validate FHIR R4 JSON files (.json, .ndjson, folders, -) offline")
    check.add_argument("sources", nargs="+", metavar="FILE|DIR|-")
    check.add_argument("--quiet", action="store_true", help="print failures only")
    check.add_argument(
        "--conditional-references",
        action="store_true",
        help="accept Type?query references, as in transaction and bulk-import content (e.g. Synthea exports)",
    )
    check.set_defaults(run=_validate)
    mapper = commands.add_parser(
        "map", help="print the FHIR transaction Bundle an IOP record maps to (no server, no database)"
    )
    mapper.add_argument(
        "kind",
        choices=[
            "enrollment",
            "assessment",
            "treatment-plan",
            "session",
            "consent",
            "discharge",
            "medication",
            "partner",
        ],
    )
    mapper.add_argument("file", metavar="FILE|-")
    mapper.add_argument(
        "--age-group",
        choices=["adult", "adolescent"],
        default="adult",
        help="the program's age group, for the ASAM intensity check of a treatment plan (default adult)",
    )
    mapper.set_defaults(run=_map)
    _add_auth_commands(commands)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
