"""``llmsched admin``: the Admin gRPC service from a shell (an operator's ``kubectl exec``, a worker pod's preStop).

::

    llmsched admin instances                     the instances, one per line (JSON with --json)
    llmsched admin drain INSTANCE                migrate its requests off, release it (its pool shrinks by one)
    llmsched admin drain-node NODE [--deadline-s S]
                                                 a node going away: nothing new placed there, its instances
                                                 drained onto the rest and replaced elsewhere (pools keep sizes)
    llmsched admin scale POOL COUNT              set a pool's size

Connection (these and ``--json`` go before or after the subcommand): ``--target`` (default ``$LLMSCHED_TARGET``
or localhost:50051), the admin token from ``--admin-token-file`` (default ``$LLMSCHED_ADMIN_TOKEN_FILE``; none: no
token), TLS with ``--tls-ca`` (a PEM file; ``--tls`` for the system roots) and ``--tls-server-name``. Exit status:
0 done, 1 the server refused (its status and message on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scheduler.cli_args import nonneg_float, nonneg_int, positive_float
from scheduler.client._common import ClientTLS
from scheduler.client.client import Client
from scheduler.client.types import LLMSchedError

DEFAULT_TARGET = "localhost:50051"


def _options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The connection and output options. Given to each subcommand too (without defaults, so one given before the
    subcommand stands): ``llmsched admin instances --json`` was an "unrecognized arguments" error."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--target", default=default(os.environ.get("LLMSCHED_TARGET") or DEFAULT_TARGET),
                   help=f"host:port of the llmsched gRPC server (default: $LLMSCHED_TARGET or {DEFAULT_TARGET})")
    p.add_argument("--admin-token-file", default=default(os.environ.get("LLMSCHED_ADMIN_TOKEN_FILE") or None),
                   help="file holding the admin token (default: $LLMSCHED_ADMIN_TOKEN_FILE)")
    p.add_argument("--tls", action="store_true", default=default(False),
                   help="TLS with the system's root certificates")
    p.add_argument("--tls-ca", default=default(None), help="TLS, trusting this PEM CA file")
    p.add_argument("--tls-server-name", default=default(None), help="the name to check in the server's certificate")
    p.add_argument("--timeout-s", type=positive_float, default=default(None),
                   help="give up after this many seconds (default: the call's own bound)")
    p.add_argument("--json", action="store_true", default=default(False), help="print the answer as JSON")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmsched admin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(p, defaults=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("instances", help="list the instances")
    d = sub.add_parser("drain", help="migrate an instance's requests off, then release it")
    d.add_argument("instance_id")
    n = sub.add_parser("drain-node", help="drain every instance on a node that is going away")
    n.add_argument("node", help="Ray node id, hostname (KubeRay: the worker pod's name) or IP")
    n.add_argument("--deadline-s", type=nonneg_float, default=0.0,
                   help="when the node will be killed, in seconds from now (0: unknown)")
    s = sub.add_parser("scale", help="set a pool's size")
    s.add_argument("pool")
    s.add_argument("count", type=nonneg_int)
    for sp in (i, d, n, s):
        _options(sp, defaults=False)
    return p


def _client(args: argparse.Namespace) -> Client:
    token = None
    if args.admin_token_file:
        try:
            token = Path(args.admin_token_file).read_text().strip() or None
        except OSError as e:
            raise SystemExit(f"llmsched admin: --admin-token-file: {e}") from None
    tls: ClientTLS | bool | None = None
    if args.tls_ca or args.tls_server_name:
        try:
            tls = ClientTLS.from_files(ca=args.tls_ca, server_name=args.tls_server_name)
        except (OSError, ValueError) as e:
            raise SystemExit(f"llmsched admin: --tls-ca: {e}") from None
    elif args.tls:
        tls = True
    return Client(args.target, admin_token=token, tls=tls, timeout_s=args.timeout_s)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with _client(args) as c:
            if args.cmd == "instances":
                out: object = [
                    {"instance_id": i.instance_id, "role": i.role.value if i.role else None, "gpu": i.gpu,
                     "tp": i.tp, "running": i.running, "waiting": i.waiting, "kv_usage": round(i.kv_usage, 4),
                     "healthy": i.healthy, "draining": i.draining, "leaving": i.leaving, "node_id": i.node_id}
                    for i in c.instances()
                ]
                text = "\n".join(
                    f"{i['instance_id']:<16} {i['role'] or '?':<8} {i['gpu']}x{i['tp']} running={i['running']} "
                    f"waiting={i['waiting']} kv={i['kv_usage']:.0%} node={i['node_id'] or '?'}"
                    + ("" if i["healthy"] else " UNHEALTHY") + (" draining" if i["draining"] else "")
                    + (" (leaving)" if i["leaving"] else "")
                    for i in out
                )
            elif args.cmd == "drain":
                moved = c.drain(args.instance_id)
                out, text = {"requests_moved": moved}, f"{args.instance_id}: released, {moved} request(s) moved"
            elif args.cmd == "drain-node":
                r = c.drain_node(args.node, deadline_s=args.deadline_s)
                out = {"node_id": r.node_id, "drained": list(r.drained), "kept": r.kept,
                       "requests_moved": r.requests_moved}
                text = (f"node {args.node} ({r.node_id}): drained {', '.join(r.drained) or 'none'}; "
                        f"{r.requests_moved} request(s) moved"
                        + "".join(f"\n  kept {i}: {why}" for i, why in sorted(r.kept.items())))
            else:
                count = c.scale(args.pool, args.count)
                out, text = {"count": count}, f"{args.pool}: {count} instance(s)"
    except LLMSchedError as e:
        print(f"llmsched admin {args.cmd}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
