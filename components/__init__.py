"""Pipeline steps: one plain typed function per step, shared by the kfp components, dvc stages and tests.

Nothing in this package imports kfp: inside a running kfp component only kfp's runtime types exist.
"""
