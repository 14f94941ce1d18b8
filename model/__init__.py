"""Model library: pretrained audio encoders (YAMNet, transformers), frozen text encoders, frontends.

Submodules are imported on demand (``from model.audio_encoders import build_audio_encoder``) so that
``import model`` stays cheap for code that only needs, say, the metrics.
"""
