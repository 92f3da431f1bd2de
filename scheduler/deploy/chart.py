"""``llmsched chart check``: lint, render and validate the Helm chart, offline.

For the chart defaults and each values file (each file is one deployment, checked on its own):

1. render the templates with the Helm engine embedded in PyPI ``helm-python-sdk`` (Helm 4, no binary, no
   network): values are checked against ``values.schema.json`` first, then the templates' own cross-field checks
   (``fail``) run;
2. ``helm lint --strict`` (warnings are findings too);
3. validate every rendered manifest: built-in kinds against the Kubernetes OpenAPI schemas bundled in PyPI
   ``kubernetes-validate`` (strict: unknown fields are errors), the ``RayCluster`` against the vendored KubeRay
   CRD's ``openAPIV3Schema`` (closed like the API server's strict field validation, see :func:`crd_schema`);
4. parse the rendered scheduler config (the ConfigMap's ``config.yaml``) with the project's own
   :func:`scheduler.config.load.parse_config`.

Every problem is a :class:`Finding`; ``main`` prints them and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scheduler.config.load import ConfigError, parse_config

DEFAULT_CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "llmsched"
DEFAULT_VALUES_DIR = DEFAULT_CHART.parent / "values"
CRD_DIR = Path(__file__).resolve().parent / "crds"
DEFAULT_KUBE_VERSION = "1.30"
RELEASE_NAME = "llmsched"
NAMESPACE = "llmsched"

# Lint messages: 0 unknown, 1 info, 2 warning, 3 error. Strict lint fails on warnings.
_LINT_FINDING_SEVERITY = 2

# Kinds from CRDs the project does not vendor (the prometheus-operator CRD is ~1 MB and only the ServiceMonitor
# shape below is rendered): a closed structural schema of exactly what the template emits.
_SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found by :func:`check_chart`.

    Attributes:
        source: the values file the problem shows up with (``<chart defaults>`` for the chart's own values).
        stage: ``values`` | ``render`` | ``lint`` | ``manifest`` | ``config`` | ``schema-drift``.
        where: the key, template or manifest (``Kind/name``) concerned.
        message: what is wrong, naming the field and what is allowed where the tool says so.
    """

    source: str
    stage: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.stage}: {self.where}: {self.message}"


@dataclass(slots=True)
class Rendered:
    """What one values set rendered to: the parsed manifests and the scheduler config text."""

    source: str
    manifests: list[dict[str, Any]] = field(default_factory=list)
    config_yaml: str | None = None
    notes: str | None = None  # NOTES.txt, what `helm install/upgrade` prints


# ---------------------------------------------------------------------------------------------------------------
# Schemas


def _close_objects(node: Any) -> None:
    """Make every structural object schema reject unknown keys, in place.

    The API server prunes or (with ``fieldValidation=Strict``, kubectl's default) rejects fields a CRD's
    structural schema does not declare, unless the node sets ``x-kubernetes-preserve-unknown-fields``; plain JSON
    Schema silently accepts them. ``additionalProperties: false`` on each object with ``properties`` gives the
    strict behaviour (a typo such as ``workerGroupSpec`` is an error, not a silently dropped group).
    """
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


@functools.cache
def crd_schema(group: str = "ray.io", plural: str = "rayclusters", version: str = "v1") -> dict[str, Any]:
    """The strict (closed) openAPIV3Schema of a vendored CRD version, e.g. ``ray.io/v1`` ``rayclusters``."""
    path = CRD_DIR / f"{group}_{plural}.yaml.gz"
    crd = yaml.safe_load(gzip.decompress(path.read_bytes()))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            _close_objects(schema)
            return schema
    raise ValueError(
        f"{path}: no version {version!r}; allowed: {', '.join(v['name'] for v in crd['spec']['versions'])}"
    )


@functools.cache
def _validator(group: str, plural: str, version: str) -> Any:
    import jsonschema

    # OpenAPI v3.0 schemas are a draft-4-like dialect; int-or-string fields carry an explicit anyOf.
    return jsonschema.Draft4Validator(crd_schema(group, plural, version))


def _error_path(err: Any) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<root>"


def _custom_resource_errors(doc: dict[str, Any]) -> list[str] | None:
    """Errors for custom resources the checker knows, or None when the kind is not a known custom resource."""
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if api == "ray.io/v1" and kind == "RayCluster":
        validator = _validator("ray.io", "rayclusters", "v1")
    elif api == "monitoring.coreos.com/v1" and kind == "ServiceMonitor":
        import jsonschema

        validator = jsonschema.Draft7Validator(_SERVICE_MONITOR_SCHEMA)
    else:
        return None
    errs = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_error_path(e)}: {e.message}" for e in errs]


def _builtin_errors(doc: dict[str, Any], kube_version: str) -> list[str]:
    import kubernetes_validate as kv

    try:
        kv.validate(doc, kube_version, strict=True)
    except kv.ValidationError as e:
        return [f"{_error_path(e)}: {e.message} (Kubernetes {e.version} schema)"]
    except kv.SchemaNotFoundError as e:
        return [f"unknown kind: {e.message}"]
    return []


def manifest_errors(doc: dict[str, Any], kube_version: str = DEFAULT_KUBE_VERSION) -> list[str]:
    """Schema errors for one rendered manifest (empty when valid)."""
    custom = _custom_resource_errors(doc)
    return custom if custom is not None else _builtin_errors(doc, kube_version)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _load_values(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"top level must be a mapping, got {type(data).__name__}")
    return data


def _short(message: str) -> str:
    # Helm's schema errors repeat a header; keep the lines that name keys.
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    keep = [ln.removeprefix("- ") for ln in lines if ln.startswith("- at ")]
    return "; ".join(keep) if keep else " ".join(lines)


# No kubeconfig: only the API server given to render_chart is reached (never the operator's ~/.kube/config).
_NO_KUBECONFIG = "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n"


def render_chart(
    chart_dir: Path, values: dict[str, Any] | None, source: str, *, upgrade_from: str | None = None
) -> tuple[Rendered, list[Finding]]:
    """Render the chart for one values set and parse the manifests.

    Args:
        upgrade_from: None: an install, offline (``lookup`` is empty, as under ``helm template``). Else the URL of a
            Kubernetes API server (tests serve an in-memory one): rendered as an upgrade of the release there, with
            ``lookup`` reading its live objects, as ``helm upgrade`` does.

    Returns:
        The rendered manifests (empty when rendering failed) and the findings of this stage.
    """
    from helm_python import chart as helm_chart
    from helm_python.config import Config
    from helm_python.errors import HelmError, HelmValuesError

    out = Rendered(source)
    try:
        with helm_chart.Chart.load(chart_dir) as chart:
            if upgrade_from is None:
                files = chart.render(values, name=RELEASE_NAME, namespace=NAMESPACE, is_install=True)
            else:
                with Config(kube_apiserver=upgrade_from, kubeconfig_content=_NO_KUBECONFIG) as cluster:
                    files = cluster.render(chart, values, name=RELEASE_NAME, namespace=NAMESPACE, is_upgrade=True)
    except HelmValuesError as e:
        return out, [Finding(source, "values", "values.schema.json", _short(str(e)))]
    except HelmError as e:
        return out, [Finding(source, "render", "templates", _short(str(e)))]
    findings: list[Finding] = []
    for name, text in sorted(files.items()):
        if name.endswith("NOTES.txt"):
            out.notes = text
            continue
        if not text.strip():
            continue
        try:
            docs = [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as e:
            findings.append(Finding(source, "render", name, f"rendered YAML does not parse: {e}"))
            continue
        for doc in docs:
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                findings.append(
                    Finding(source, "render", name, "a rendered document is not a Kubernetes object")
                )
                continue
            doc.setdefault("metadata", {})
            out.manifests.append(doc)
            if doc["kind"] == "ConfigMap" and "config.yaml" in (doc.get("data") or {}):
                out.config_yaml = doc["data"]["config.yaml"]
    return out, findings


def _lint_findings(
    chart_dir: Path, values: dict[str, Any] | None, source: str, kube_version: str
) -> list[Finding]:
    from helm_python import chart as helm_chart

    report = helm_chart.lint(
        chart_dir, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}.0"
    )
    return [
        Finding(source, "lint", m.get("path") or "chart", _short(m.get("error", "")))
        for m in report.get("messages", [])
        if m.get("severity", 0) >= _LINT_FINDING_SEVERITY
    ]


def _config_findings(rendered: Rendered) -> list[Finding]:
    if rendered.config_yaml is None:
        return [Finding(rendered.source, "config", "ConfigMap", "no ConfigMap with config.yaml was rendered")]
    try:
        parse_config(yaml.safe_load(rendered.config_yaml), source="config.yaml")
    except (ConfigError, yaml.YAMLError) as e:
        return [
            Finding(rendered.source, "config", "ConfigMap data.config.yaml", " | ".join(str(e).splitlines()))
        ]
    return []


def _schema_drift(chart_dir: Path) -> list[Finding]:
    """The project's chart: its values.schema.json must be what the pydantic config schema generates."""
    from scheduler.deploy.values_schema import render_values_schema

    path = chart_dir / "values.schema.json"
    if chart_dir.resolve() != DEFAULT_CHART or not path.is_file():
        return []
    if path.read_text() != render_values_schema():
        return [
            Finding(
                str(path),
                "schema-drift",
                "values.schema.json",
                "stale: ClusterConfig changed; regenerate with `python -m scheduler.deploy.values_schema`",
            )
        ]
    return []


def check_chart(
    chart_dir: Path, values_files: list[Path], *, kube_version: str = DEFAULT_KUBE_VERSION
) -> list[Finding]:
    """Lint, render and validate the chart with its defaults and with each values file; offline.

    Args:
        chart_dir: the chart directory (``deploy/helm/llmsched``).
        values_files: deployments to check, each on its own on top of the chart defaults (as ``helm -f FILE``).
        kube_version: Kubernetes minor version whose schemas the manifests are checked against (1.25 .. 1.37).

    Returns:
        Every finding; empty when the chart is good for all of them.
    """
    chart_dir = Path(chart_dir)
    findings = _schema_drift(chart_dir)
    scenarios: list[tuple[str, Path | None]] = [("<chart defaults>", None)]
    scenarios += [(str(p), Path(p)) for p in values_files]
    for source, path in scenarios:
        values: dict[str, Any] | None = None
        if path is not None:
            try:
                values = _load_values(path)
            except (OSError, ValueError, TypeError) as e:
                findings.append(Finding(source, "values", str(path), str(e)))
                continue
        rendered, stage = render_chart(chart_dir, values, source)
        findings += stage
        if not rendered.manifests:
            continue  # lint would repeat the render error
        findings += _lint_findings(chart_dir, values, source, kube_version)
        for doc in rendered.manifests:
            where = f"{doc['kind']}/{doc['metadata'].get('name', '?')}"
            findings += [Finding(source, "manifest", where, m) for m in manifest_errors(doc, kube_version)]
        findings += _config_findings(rendered)
    return findings


def kube_version_error(version: str) -> str | None:
    """Why ``version`` is not a Kubernetes ``MAJOR.MINOR`` with schemas here (None when it is): helm and
    kubernetes-validate would otherwise fail on it with a traceback."""
    parts = version.split(".")
    if len(parts) != 2 or not all(x.isdigit() and str(int(x)) == x for x in parts):  # helm refuses "01"
        return f"expected MAJOR.MINOR, e.g. {DEFAULT_KUBE_VERSION}; got {version!r}"
    try:
        from kubernetes_validate.utils import all_versions
    except ImportError:  # the check itself will say the dev extra is missing
        return None
    known = sorted({tuple(map(int, v.split(".")[:2])) for v in all_versions()})
    if (int(parts[0]), int(parts[1])) not in known:
        return (f"no schemas for Kubernetes {version}; supported: {'.'.join(map(str, known[0]))} .. "
                f"{'.'.join(map(str, known[-1]))}")
    return None


def main(argv: list[str] | None = None) -> int:
    """``llmsched chart check [--values PATH ...] [--chart DIR] [--kube-version X.Y]``; exit 1 on any finding."""
    parser = argparse.ArgumentParser(prog="llmsched chart", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="lint, render and validate the chart (exit 1 on any finding)")
    check.add_argument(
        "--chart", type=Path, default=DEFAULT_CHART, help="chart directory (default: %(default)s)"
    )
    check.add_argument(
        "--values",
        type=Path,
        action="append",
        default=None,
        help="values file to check (repeatable; default: every deploy/helm/values/*.yaml)",
    )
    check.add_argument(
        "--kube-version", default=DEFAULT_KUBE_VERSION, help="Kubernetes schemas (1.25 .. 1.37)"
    )
    args = parser.parse_args(argv)
    err = kube_version_error(args.kube_version)
    if err:
        parser.error(f"--kube-version: {err}")

    values = args.values
    if values is None:
        values = sorted(DEFAULT_VALUES_DIR.glob("*.yaml")) if args.chart.resolve() == DEFAULT_CHART else []
    findings = check_chart(args.chart, values, kube_version=args.kube_version)
    for f in findings:
        print(f)
    checked = ", ".join(["<chart defaults>", *map(str, values)])
    if findings:
        print(f"chart check: {len(findings)} finding(s) in {args.chart} ({checked})", file=sys.stderr)
        return 1
    print(f"chart check: OK: {args.chart} ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
