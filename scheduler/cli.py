"""llmsched: a distributed LLM-serving cluster scheduler (live control plane and simulator).

usage: llmsched COMMAND [--help] ...

    llmsched run          the README main job: live CPU cluster + replay through gRPC + the same trace simulated
    llmsched serve        run the control plane and gRPC/HTTP servers from a config
    llmsched simulate     replay a trace in the discrete-event simulator
    llmsched compare      router x trace x load matrix in the simulator
    llmsched plan         capacity planning: cheapest cluster meeting the SLOs
    llmsched replay       send a trace to a live cluster through the SDK
    llmsched admin        the Admin API from a shell: instances, drain, drain-node, scale
    llmsched profile      measure a real engine's step times into a latency table
    llmsched predict      train / evaluate the response-length predictors (fit-trace: on your own request log)
    llmsched chart        lint, render and validate the Helm chart
    llmsched bench        benchmarks (migration, chaos, ...)

Each command's options: llmsched COMMAND --help. README.md has the two set-up commands and examples.
"""

# Each subcommand lives with the code it drives; this module only dispatches.

from __future__ import annotations

import importlib
import sys

# name -> "module:function(argv) -> int"; imported lazily so `llmsched simulate` never imports Ray or vLLM.
COMMANDS: dict[str, str] = {
    "run": "scheduler.demo:main",
    "serve": "scheduler.serve:main",
    "simulate": "sim.commands:simulate_main",
    "compare": "sim.compare:main",
    "plan": "sim.planner:main",
    "replay": "sim.replay:main",
    "admin": "scheduler.client.admin:main",
    "profile": "scheduler.profile:main",
    "predict": "scheduler.predict.cli:main",
    "chart": "scheduler.deploy.chart:main",
    "bench": "bench.cli:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"llmsched {version('llmsched')}")
        except PackageNotFoundError:
            print("llmsched (not installed as a package)")
        return 0
    name, rest = argv[0], argv[1:]
    target = COMMANDS.get(name)
    if name == "predict" and rest[:1] == ["fit-trace"]:  # reads trace files: the simulator's loaders
        target, rest = "sim.commands:fit_predictor_main", rest[1:]
    if target is None:
        print(f"llmsched: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    mod, _, fn = target.partition(":")
    try:
        func = getattr(importlib.import_module(mod), fn)
    except ModuleNotFoundError as e:
        if e.name and mod.startswith(e.name):
            print(f"llmsched {name}: not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
