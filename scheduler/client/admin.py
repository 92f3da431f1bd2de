"""``llmsched admin``: the Admin gRPC service from a shell (an operator's ``kubectl exec``, a worker pod's preStop).

::

    llmsched admin instances                     the instances, one per line (JSON with --json)
    llmsched admin drain INSTANCE                migrate its requests off, release it (its pool shrinks by one)
    llmsched admin drain-node NODE [--deadline-s S]
                                                 a node going away: nothing new placed there, its instances
                                                 drained onto the rest and replaced elsewhere (pools keep sizes)
    llmsched admin scale POOL COUNT              set a pool's size
    llmsched admin switch-role INSTANCE ROLE     re-role an instance, prefill or decode (it drains, then switches;
                                                 no engine restart); --wait: until it serves in the new role
    llmsched admin migrate REQUEST [--to INSTANCE]
                                                 live-migrate a running request (exit 1 when it did not commit)
    llmsched admin state                         the router, requests in flight and the cluster's counters

Connection (these and ``--json`` go before or after the subcommand): ``--target`` (default ``$LLMSCHED_TARGET``
or localhost:50051), the admin token from ``--admin-token-file`` (default ``$LLMSCHED_ADMIN_TOKEN_FILE``; none: no
token), TLS with ``--tls-ca`` (a PEM file; ``--tls`` for the system roots) and ``--tls-server-name``. Exit status:
0 done, 1 the server refused (its status and message on stderr), a migration did not commit, or ``--wait``
timed out, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
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
    r = sub.add_parser("switch-role", help="re-role an instance between prefill and decode")
    r.add_argument("instance_id")
    r.add_argument("role", choices=("prefill", "decode"))
    r.add_argument("--wait", action="store_true", help="return once it serves in the new role (else: once begun)")
    m = sub.add_parser("migrate", help="live-migrate a running request")
    m.add_argument("request_id")
    m.add_argument("--to", dest="destination", default=None, help="the destination instance (default: the policy's)")
    st = sub.add_parser("state", help="the router, requests in flight and the cluster's counters")
    for sp in (i, d, n, s, r, m, st):
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
    rc = 0
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
            elif args.cmd == "scale":
                count = c.scale(args.pool, args.count)
                out, text = {"count": count}, f"{args.pool}: {count} instance(s)"
            elif args.cmd == "switch-role":
                started = c.switch_role(args.instance_id, args.role)
                if started and args.wait:
                    _wait_for_role(c, args.instance_id, args.role, args.timeout_s or SWITCH_WAIT_S)
                out = {"started": started}
                text = (f"{args.instance_id}: " + ("serves as " if args.wait else "switching to ") + args.role
                        if started else f"{args.instance_id}: not switched (already {args.role}, or switching or "
                        "draining)")
            elif args.cmd == "migrate":
                res = c.migrate(args.request_id, args.destination)
                out = dataclasses.asdict(res)
                text = (f"{res.request_id}: {res.source} -> {res.destination} "
                        + (f"committed ({res.stages} stage(s), paused {res.downtime_s * 1e3:.1f} ms)" if res.committed
                           else f"not migrated: {res.reason}"))
                rc = 0 if res.committed else 1
            else:
                state = c.cluster_state()
                out = {"router": state.router, "requests_in_flight": state.requests_in_flight,
                       "instances": len(state.instances), "counters": dict(sorted(state.extra.items()))}
                text = (f"router {state.router}, {state.requests_in_flight} request(s) in flight, "
                        f"{len(state.instances)} instance(s)"
                        + "".join(f"\n  {k} {v:g}" for k, v in sorted(state.extra.items())))
    except (LLMSchedError, TimeoutError) as e:  # (TimeoutError: ``switch-role --wait``)
        print(f"llmsched admin {args.cmd}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else text)
    return rc


SWITCH_WAIT_S = 300.0  # ``switch-role --wait`` without --timeout-s: a drain of long requests can take minutes


def _wait_for_role(c: Client, instance_id: str, role: str, timeout_s: float) -> None:
    """Until ``instance_id`` serves as ``role`` (listed in it, not draining), polling ListInstances."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = next((i for i in c.instances() if i.instance_id == instance_id), None)
        if info is not None and info.role is not None and info.role.value == role and not info.draining:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{instance_id} did not serve as {role} within {timeout_s:.0f} s (it may still switch)")


if __name__ == "__main__":
    sys.exit(main())
