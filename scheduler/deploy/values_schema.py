"""The Helm chart's ``values.schema.json``, generated from the project's pydantic config schema.

The ``config`` section of the chart values *is* a :class:`~scheduler.config.models.ClusterConfig` (minus ``gpus``,
which the chart derives from ``gpuTypes``), so its JSON schema is generated from the pydantic models rather than
written by hand: a field added to the config cannot silently be rejected (or, worse, accepted unchecked) by the
chart. ``llmsched chart check`` reports a finding when the checked-in file is stale; regenerate with

    python -m scheduler.deploy.values_schema deploy/helm/llmsched/values.schema.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from scheduler.config.models import ClusterConfig

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# An object's name (Secret, PVC: a DNS subdomain), or "" for none.
OPTIONAL_NAME = {"type": "string", "maxLength": 253,
                 "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"}
OPTIONAL_ABS_PATH = {"type": "string", "pattern": "^(/.*)?$"}
# Label keys and values as the API server validates them (k8s.io/apimachinery validation.IsQualifiedName /
# IsValidLabelValue). Pod nodeSelectors and metadata labels are checked only when the object is created -- for the
# worker pods, by KubeRay long after `helm install` succeeded -- so the values schema checks them up front.
LABEL_VALUE = {"type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}
LABELS = {
    "type": "object",
    "propertyNames": {
        "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    },
    "additionalProperties": LABEL_VALUE,
}
# Kubernetes resource.Quantity, as the API server's openapi spec spells it (int-or-string).
QUANTITY = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9.]+[a-zA-Z]*$"}]
}

# Keys of a GPU worker group that are the chart's, not GPUSpec's.
_GPU_SPEC_DERIVED = ("name", "count", "gpus_per_node")


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A closed object: unknown keys are errors (a typo must not be ignored)."""
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def _k8s_passthrough(description: str, kind: str = "object") -> dict[str, Any]:
    """Kubernetes-native structures (resources, tolerations, ...) are checked on the rendered manifests instead."""
    return {"type": kind, "description": description}


def _strip_titles(node: Any) -> Any:
    # Pydantic's auto titles ("Memory Gib") only add noise to Helm's error messages.
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items() if k != "title" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def build_values_schema() -> dict[str, Any]:
    """The complete values.schema.json (JSON Schema draft 2020-12) as a dict."""
    cfg = _strip_titles(ClusterConfig.model_json_schema())
    defs: dict[str, Any] = cfg.pop("$defs")

    # gpuTypes[].spec is a GPUSpec without the fields the chart fills in itself.
    gpu_spec = copy.deepcopy(defs["GPUSpec"])
    for key in _GPU_SPEC_DERIVED:
        gpu_spec["properties"].pop(key, None)
        if key in gpu_spec.get("required", []):
            gpu_spec["required"].remove(key)
    gpu_spec["description"] = "Hardware numbers for this GPU type (scheduler.config.models.GPUSpec)."
    defs["GPUTypeSpec"] = gpu_spec

    config = copy.deepcopy(cfg)
    config["properties"].pop("gpus")
    config["required"] = [r for r in config.get("required", []) if r != "gpus"]
    config["description"] = (
        "The cluster config (scheduler.config.models.ClusterConfig) without `gpus`, which is rendered from gpuTypes."
    )
    # YAML map keys are strings; ClusterConfig.slos is keyed by integer priority.
    config["properties"]["slos"]["propertyNames"] = {"pattern": "^[0-9]+$"}
    config["properties"]["pools"]["minItems"] = 1

    gpu_type = _obj(
        {
            "name": {
                "type": "string",
                "pattern": DNS_LABEL,
                "maxLength": 40,
                "description": "GPU type name: pools[].gpu refers to it; Ray resource llmsched_gpu_<name>.",
            },
            "product": {
                **LABEL_VALUE,
                "description": "nvidia.com/gpu.product node label value; selects the nodes of this type.",
            },
            "gpusPerNode": {
                "type": "integer",
                "minimum": 0,
                "description": "nvidia.com/gpu per worker; 0 = CPU-only",
            },
            "slots": {
                "type": "integer",
                "minimum": 1,
                "description": "Ray llmsched_gpu_<name> resource per worker when gpusPerNode is 0 (simulated engines)",
            },
            "replicas": {"type": "integer", "minimum": 0},
            "minReplicas": {"type": "integer", "minimum": 0},
            "maxReplicas": {"type": "integer", "minimum": 1},
            "resources": _k8s_passthrough(
                "cpu/memory requests and limits (nvidia.com/gpu is added from gpusPerNode)"
            ),
            "nodeSelector": LABELS,
            "tolerations": _k8s_passthrough("pod tolerations", "array"),
            "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
            "spec": {"$ref": "#/$defs/GPUTypeSpec"},
        },
        required=["name", "gpusPerNode", "maxReplicas", "spec"],
        # A CPU-only group must say how many simulated GPU slots it offers to placement.
        **{"if": {"properties": {"gpusPerNode": {"const": 0}}}, "then": {"required": ["slots"]}},
    )

    image = _obj(
        {
            "repository": {"type": "string", "minLength": 1},
            "tag": {"type": "string"},
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        },
        required=["repository"],
    )
    head = _obj(
        {
            "resources": _k8s_passthrough("head container resources"),
            "nodeSelector": LABELS,
            "tolerations": _k8s_passthrough("head pod tolerations", "array"),
            "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
        }
    )
    token = {"type": "string", "description": "empty: generated at install and kept on upgrade"}
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "llmsched Helm chart values",
        "type": "object",
        "additionalProperties": False,
        "required": ["image", "ray", "gpuTypes", "config", "auth"],
        "properties": {
            "global": {"type": "object", "description": "Helm global values (umbrella charts)."},
            "nameOverride": {"type": "string"},
            "fullnameOverride": {"type": "string"},
            "image": image,
            "imagePullSecrets": {
                "type": "array",
                "items": _obj({"name": {"type": "string"}}, required=["name"]),
            },
            "serviceAccount": _obj({"create": {"type": "boolean"}, "name": {"type": "string"}}),
            "rbac": _obj({"create": {"type": "boolean"}}),
            "ray": _obj(
                {
                    "version": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
                    "head": head,
                    "enableInTreeAutoscaling": {"type": "boolean"},
                    "upgradeStrategy": {
                        "enum": ["Recreate", "None"],
                        "description": "KubeRay spec.upgradeStrategy.type: Recreate re-creates all pods when the RayCluster spec (e.g. the config checksum) changes; None keeps running pods",
                    },
                },
                required=["version"],
            ),
            "scheduler": _obj(
                {
                    "resources": _k8s_passthrough("scheduler container resources"),
                    "logLevel": {"enum": ["debug", "info", "warning", "error"]},
                    "directChannel": {"type": "boolean",
                                      "description": "ingress<->instance direct TCP channel (false: Ray calls only)"},
                    "extraEnv": _k8s_passthrough("extra env entries for the scheduler container", "array"),
                }
            ),
            "gpuTypes": {"type": "array", "minItems": 1, "items": gpu_type},
            "config": config,
            "weights": _obj(
                {
                    "hfHome": {**OPTIONAL_ABS_PATH, "description": "HF_HOME for the engines and the ingress tokenizer"},
                    "hfTokenSecret": _obj(
                        {
                            "name": {**OPTIONAL_NAME, "description": "an existing Secret holding HF_TOKEN; empty: none"},
                            "key": {"type": "string", "pattern": r"^[-._a-zA-Z0-9]+$"},
                        }
                    ),
                    "volume": _obj(
                        {
                            "existingClaim": {**OPTIONAL_NAME, "description": "a PVC with the weights; empty: none"},
                            "hostPath": {**OPTIONAL_ABS_PATH, "description": "or a node directory; empty: none"},
                            "mountPath": {"type": "string", "pattern": "^/.", "description": "where it is mounted"},
                            "readOnly": {"type": "boolean"},
                        }
                    ),
                }
            ),
            "service": _obj(
                {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "grpcPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "httpPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                }
            ),
            "auth": _obj(
                {
                    "enabled": {
                        "type": "boolean",
                        "description": "token auth on the inference API; the admin API always requires its token",
                    },
                    "clientToken": token,
                    "adminToken": token,
                    "existingSecret": {
                        "type": "string",
                        "description": "use this Secret (keys client-token, admin-token) instead of creating one",
                    },
                },
                required=["enabled"],
            ),
            "tls": _obj(
                {
                    "enabled": {"type": "boolean"},
                    "secretName": {
                        "type": "string",
                        "description": "a kubernetes.io/tls Secret for gRPC and HTTP",
                    },
                    "clientCASecretName": {
                        "type": "string",
                        "description": "Secret with ca.crt: require client certificates (mTLS)",
                    },
                },
                **{
                    "if": {"properties": {"enabled": {"const": True}}},
                    "then": {"required": ["secretName"], "properties": {"secretName": {"minLength": 1}}},
                },
            ),
            "workerDrain": _obj(
                {
                    "enabled": {"type": "boolean", "description": "preStop: drain the node's instances (DrainNode)"},
                    "gracePeriodSeconds": {"type": "integer", "minimum": 1, "maximum": 86400},
                    "tlsServerName": {"type": "string", "maxLength": 253,
                                      "description": "name checked in the server certificate; empty: <fullname>-grpc"},
                }
            ),
            "podDisruptionBudget": _obj(
                {
                    "enabled": {"type": "boolean"},
                    "maxUnavailable": {"type": "integer", "minimum": 0},
                }
            ),
            "metrics": _obj(
                {
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "serviceMonitor": _obj(
                        {
                            "enabled": {"type": "boolean"},
                            "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "labels": LABELS,
                        }
                    ),
                }
            ),
            "otel": _obj(
                {
                    "endpoint": {
                        "type": "string",
                        "description": "OTLP collector endpoint; empty: tracing off",
                    },
                    "protocol": {"enum": ["grpc", "http/protobuf"]},
                    "samplerRatio": {"type": "number", "minimum": 0, "maximum": 1},
                }
            ),
            "grafana": _obj(
                {
                    "dashboard": _obj(
                        {
                            "enabled": {"type": "boolean"},
                            "labels": LABELS,
                        }
                    )
                }
            ),
        },
        "$defs": defs,
    }
    return schema


def render_values_schema() -> str:
    """The schema as the exact text checked in to the chart (stable key order, trailing newline)."""
    return json.dumps(build_values_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    # argparse: `--help` was taken for the output path (it wrote the schema to a file named "--help").
    p = argparse.ArgumentParser(prog="python -m scheduler.deploy.values_schema",
                                description="Write the chart's values.schema.json, generated from ClusterConfig.")
    p.add_argument("out", nargs="?", type=Path, default=Path("deploy/helm/llmsched/values.schema.json"),
                   help="where to write it (default: %(default)s)")
    out = p.parse_args(argv).out
    out.write_text(render_values_schema())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
