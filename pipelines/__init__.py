"""Kubeflow pipeline definitions (kfp v2) over the step functions in components/."""
