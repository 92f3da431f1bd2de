"""Deployment: the Helm chart check (``chart``) and the Kubernetes integration (``k8s``)."""
