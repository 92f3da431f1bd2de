"""``llmsched serve --config PATH --port N``: the control plane plus the gRPC (and optional HTTP) servers.

Runs in the foreground until SIGTERM/SIGINT, then reports NOT_SERVING, drains (in-flight gRPC and HTTP streams
finish, for up to ``--grace-s``), and exits 0 after what ``--on-exit`` says: ``shutdown`` (default: a laptop's
Ctrl-C) releases every instance and stops the Controller; ``keep`` (the Helm chart) leaves them running in Ray, and
the next start attaches to that Controller instead of loading every model again. Starts a local Ray cluster unless
one is reachable (``RAY_ADDRESS`` or an initialised Ray), so the same command serves a laptop and a KubeRay head pod.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys

from scheduler.cli_args import nonneg_float, nonneg_int, port
from scheduler.config.load import parse_config, read_config
from scheduler.config.models import ClusterConfig, fill_model_shape

log = logging.getLogger("llmsched.serve")


_AUTH_VARS = ("LLMSCHED_CLIENT_TOKEN_FILE", "LLMSCHED_ADMIN_TOKEN_FILE")
ON_EXIT = ("shutdown", "keep")
INGRESS_CLOSE_S = 5.0  # how long ``Ingress.close`` waits for its background tasks (its default)


def exit_bound_s(grace_s: float) -> float:
    """The longest a SIGTERM of ``serve --on-exit keep`` takes to exit: the gRPC and HTTP drains side by side
    (``grace_s``, HTTP's + 1 s), the ingress's close, Ray's disconnect (~1 s). The chart's
    ``terminationGracePeriodSeconds`` must be above it. A ``shutdown`` exit adds ``Deployment.shutdown`` (up to
    30 s)."""
    return grace_s + 1 + INGRESS_CLOSE_S + 1


def _on_exit(s: str) -> str:
    v = s.strip().lower()
    if v not in ON_EXIT:
        raise argparse.ArgumentTypeError(f"use shutdown or keep, got {s!r} (the flag, or env LLMSCHED_ON_EXIT)")
    return v


def _auth(host: str):
    """Token/TLS settings from the environment the Helm chart sets.

    With none of them set, a server bound to loopback is open (a developer's machine, the tests); bound to any
    other address it still locks the admin API (``AuthConfig.from_env``), so nothing is exposed by accident.
    """
    from scheduler.server.auth import TLS_VARS, AuthConfig

    # NOTE: any TLS variable counts: a half-set TLS (key without cert) is an error, never a silent plaintext server.
    configured = any(os.environ.get(v) for v in (*_AUTH_VARS, *TLS_VARS))
    if not configured and host in ("127.0.0.1", "localhost", "::1"):
        log.warning("no auth configured: serving open on loopback %s", host)
        return None
    return AuthConfig.from_env()


def _telemetry(cfg):
    """Prometheus recorder (+ exposition on LLMSCHED_METRICS_PORT), OpenTelemetry from OTEL_*, in-flight limits."""
    from prometheus_client import CollectorRegistry

    from scheduler.server.admission import InflightLimiter
    from scheduler.telemetry.metrics import Metrics, MetricsRecorder, start_metrics_server
    from scheduler.telemetry.tracing import setup_tracing

    recorder = MetricsRecorder(Metrics(CollectorRegistry(), slos=cfg.slos))  # SLOs: histogram boundaries
    port = int(os.environ.get("LLMSCHED_METRICS_PORT", "0") or 0)
    if port:
        start_metrics_server(port, recorder.registry)
    return recorder, setup_tracing(), InflightLimiter.from_env(os.environ) or InflightLimiter.for_config(cfg)


async def _follow_cluster(ingress, cfg, limiter, every_s: float = 5.0) -> None:
    """Keep a limiter sized from the config (``InflightLimiter.for_config``) at the batch slots of the instances
    serving now: the scaling loop and an admin Scale add and remove instances after start."""
    from scheduler.server.admission import cluster_slots

    while True:
        await asyncio.sleep(every_s)
        try:
            slots = cluster_slots(cfg, (await ingress.cluster_state()).instances)
        except Exception:  # a failed look keeps the last size; the next one retries
            log.debug("in-flight limit: cluster state unavailable", exc_info=True)
            continue
        if slots is not None and slots != limiter.max_total:
            log.info("in-flight limit follows the cluster: %d -> %d", limiter.max_total, slots)
            limiter.resize(slots)


async def _serve(args: argparse.Namespace) -> int:
    from scheduler.control.cluster import start_local_cluster
    from scheduler.server.grpc_server import serve

    cfg = args.cfg
    try:  # the last check before Ray starts (in main, its tests' default port would have to be free)
        if args.port and args.port == args.http_port:
            raise ValueError(f"--http-port: {args.http_port} is --port's too; give the HTTP API its own port")
        _check_listenable("--port", args.host, args.port)
        _check_listenable("--http-port", args.host, args.http_port)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    runtime = None
    if args.fake_gpus_per_node > 0:
        import ray

        from scheduler.control.cluster import nodes_for, start_ray

        if not ray.is_initialized():
            # Here, not in the executor below: Ray's multi-node test cluster sets a SIGTERM handler, which only
            # the main thread may (started there, `serve --fake-gpus-per-node` died with a ValueError). Before
            # the handlers below, so theirs win.
            runtime = start_ray(nodes_for(cfg, fake_gpus_per_node=args.fake_gpus_per_node))
    # SIGTERM/SIGINT from now on stop the server cleanly (exit 0), also while the engines are still starting:
    # a signal then lets start-up finish, and the cluster is shut down instead of served (no leaked Ray workers),
    # or left running (--on-exit keep).
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass
    keep = args.on_exit == "keep"
    print(f"llmsched starting {cfg.name} ({cfg.num_instances} instances)...", flush=True)
    # Ray start-up and engine creation block: keep them off the event loop. Kept, the Controller is detached: one
    # owned by this driver died with it, instances and all.
    cluster = await loop.run_in_executor(
        None, lambda: start_local_cluster(cfg, fake_gpus_per_node=args.fake_gpus_per_node, detached=keep,
                                          runtime=runtime,
                                          ingress_kwargs={"direct": args.direct_channel, "predictor": args.predictor})
    )
    if cluster.deployment.attached:
        print(f"llmsched attached to the running {cfg.name} ({len(cluster.deployment.instances)} instances)",
              flush=True)
    if keep and cluster.runtime is not None:
        log.warning("--on-exit keep: this process started its own Ray cluster (no RAY_ADDRESS), which stops with it")
    ingress = cluster.ingress
    http_task = http_exit = follow = server = None
    try:
        if stop.is_set():
            print(f"llmsched: stopped while starting; {'leaving' if keep else 'shutting'} the cluster "
                  f"{'running' if keep else 'down'}", flush=True)
            return 0
        recorder, tracing, limiter = _telemetry(cfg)
        ingress.recorder, ingress.tracing = recorder, tracing  # per-stage spans and instance gauges
        await ingress.start()
        auth = args.auth
        obs = {"recorder": recorder, "tracing": tracing, "limiter": limiter}
        if limiter.follows_cluster:
            follow = asyncio.create_task(_follow_cluster(ingress, cfg, limiter))
        if args.http_port:
            import uvicorn

            from scheduler.server.http_server import build_app

            tls = auth.uvicorn_kwargs() if auth is not None else {}
            # default_model: what a response says when the client named none (/v1/models lists the instances' model).
            app = build_app(ingress, auth=auth, default_model=cfg.model.name, **obs)
            # Drained as gRPC is, side by side: streams in flight get ``grace_s`` to finish. It was cancelled once
            # gRPC had stopped, which with no gRPC stream in flight was at once, cutting every HTTP stream.
            server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.http_port, lifespan="off",
                                                   log_level="warning", timeout_graceful_shutdown=args.grace_s, **tls))
            http_task = asyncio.create_task(server.serve())
            http_exit = asyncio.create_task(_exit_on(stop, server))

        def started(srv) -> None:
            http = f", OpenAI-compatible HTTP on {args.host}:{args.http_port}" if args.http_port else ""
            print(f"llmsched serving {cfg.name} ({cfg.num_instances} instances) on {args.host}:{srv.port}{http}",
                  flush=True)

        await serve(ingress, port=args.port, host=args.host, auth=auth, on_started=started,
                    grace_s=args.grace_s, stop=stop, **obs)
    finally:
        if http_task is not None:
            server.should_exit = True
            await asyncio.wait({http_task}, timeout=args.grace_s + 1)  # its own grace ends it; +1: its close
            http_task.cancel()
            http_exit.cancel()
        if follow is not None:
            follow.cancel()
        await ingress.close(INGRESS_CLOSE_S)
        if keep:
            # Safe under `helm uninstall`: it deletes the RayCluster, and the kept Controller and instances with it.
            print(f"llmsched: leaving {cfg.name} running (--on-exit keep)", flush=True)
            await loop.run_in_executor(None, cluster.detach)
        else:
            await loop.run_in_executor(None, cluster.shutdown)
    return 0


async def _exit_on(stop: asyncio.Event, server) -> None:
    await stop.wait()
    server.should_exit = True


def _check_listenable(flag: str, host: str, port: int) -> None:
    """Refuse now, naming the flag, when ``host:port`` is already taken: the servers bind only once Ray and every
    engine are up (minutes with vLLM), and then the gRPC one failed with a traceback, the HTTP one after printing
    that it served. A race with another process can still lose; this catches the usual case."""
    if not port:
        return
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as both servers: TIME_WAIT is no owner
            sock.bind(addr)
    except OSError as e:
        held = "; another process listens there" if e.errno == errno.EADDRINUSE else ""
        raise ValueError(f"{flag}: cannot listen on {host}:{port} ({e.strerror or e}){held}") from None


def _model_path(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("empty; name a Hugging Face repo id or a model directory")
    return s


def _load(args: argparse.Namespace) -> ClusterConfig:
    """The config file, with ``--model-path`` as its ``model.path`` when given, and the model fields it omits from
    that directory's ``config.json``, or a repo id's in the local hub cache (``fill_model_shape``)."""
    data, source = read_config(args.config)
    if isinstance(data, dict) and isinstance(data.get("model", {}), dict):  # else parse_config names what is wrong
        model = dict(data.get("model") or {})
        if args.model_path is not None:
            model["path"] = args.model_path
            source = f"{source} with --model-path"
        if model:
            data = {**data, "model": fill_model_shape(model)}
    return parse_config(data, source=source)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmsched serve", description=__doc__)
    p.add_argument("--config", required=True, help="cluster config YAML (e.g. deploy/examples/cpu-pd.yaml)")
    p.add_argument("--model-path", type=_model_path, default=None,
                   help="the weights vllm pools serve, instead of the config's model.path: a Hugging Face repo id "
                        "or a model directory (on every worker node, and here for the tokenizer; the model fields "
                        "the config omits are read from its config.json: the directory's, or a repo id's in the "
                        "local Hugging Face cache)")
    # NOTE: checked types: a bad number fails here, not once Ray and the engines are up (minutes later).
    p.add_argument("--port", type=port, default=50051)
    p.add_argument("--host", default=os.environ.get("LLMSCHED_HOST", "127.0.0.1"))
    p.add_argument("--http-port", type=port, default=os.environ.get("LLMSCHED_HTTP_PORT", "0"),
                   help="also serve the HTTP API on this port (default: env LLMSCHED_HTTP_PORT; 0: no HTTP)")
    p.add_argument("--fake-gpus-per-node", type=nonneg_int, default=0,
                   help="start local Ray nodes with this many fake GPUs, per GPU type as many as its pools' instances "
                        "pack onto (dev/test)")
    p.add_argument("--grace-s", type=nonneg_float, default=10.0,
                   help="on SIGTERM/SIGINT, how long in-flight gRPC and HTTP streams get to finish")
    p.add_argument("--on-exit", type=_on_exit, default=os.environ.get("LLMSCHED_ON_EXIT", "shutdown"),
                   help="on SIGTERM/SIGINT, shutdown: release every instance and stop the Controller; keep: leave "
                        "them running in Ray for the next start to attach to, no model reload (the Helm chart: a "
                        "container restart). Default: env LLMSCHED_ON_EXIT, else shutdown")
    p.add_argument("--no-direct-channel", dest="direct_channel", action="store_false",
                   default=os.environ.get("LLMSCHED_DIRECT_CHANNEL", "1").lower() not in ("0", "false", "no"),
                   help="Ray actor calls only between the ingress and the instances (default: the direct TCP "
                        "channel, with Ray as fallback; env LLMSCHED_DIRECT_CHANNEL=0 does the same)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = os.environ.get("LLMSCHED_LOG_LEVEL", "WARNING").strip().upper()
    try:
        if not isinstance(logging.getLevelName(level), int):  # basicConfig's "Unknown level" named no variable
            raise ValueError(  # noqa: TRY004 -- a bad setting, reported with the config errors below
                f"LLMSCHED_LOG_LEVEL: Unknown level: {level!r}; use DEBUG, INFO, WARNING or ERROR")
        logging.basicConfig(level=level)
        cfg = args.cfg = _load(args)
        cfg.chat_template_text()  # a template file that cannot be read: exit 2 now, not once the engines are up
        if cfg.model.path is not None and any(p.backend == "vllm" for p in cfg.pools):
            cfg.model.weights()  # likewise a model directory missing here, where the ingress tokenizes with it
        if args.fake_gpus_per_node:
            from scheduler.control.cluster import nodes_for

            try:
                nodes_for(cfg, fake_gpus_per_node=args.fake_gpus_per_node)
            except ValueError as e:
                raise ValueError(f"--fake-gpus-per-node: {e}") from None
        # NOTE: before Ray starts: a bad token/TLS variable is exit 2 naming it, not a traceback minutes later.
        args.auth = _auth(args.host)
        # The same for the length predictor: its artifacts and tenant are checked where they load (a ValueError
        # naming policies.predictor.params.*), which was the Ingress, built once every engine had started. The
        # ingress is handed this one.
        from scheduler.predict.serving import serving_predictor

        args.predictor = serving_predictor(cfg.policies.predictor)
    except ValueError as e:  # a ConfigError, or AuthConfig.from_env naming the variable
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
