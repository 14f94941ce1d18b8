# The CPU image: every Kubeflow task except training, the service, and `cacara` anywhere.
# It installs the project at exactly the versions `make setup` installs (requirements.lock), converts
# the pretrained YAMNet weights at build time (nothing is converted or downloaded when a pod starts),
# carries the demo corpus for smoke tests, and runs as an unprivileged user.
#   make image                                   (buildah; base image from Debian's packages, offline)
#   docker build -t cacara:0.1.0 .               (elsewhere: the public Python base)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG UID=10001
# The CA bundle pip trusts while building (a proxy that re-signs TLS needs its own; scripts/build_image.sh
# passes the host's). It is read at build time only and is not kept in the image.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/cacara/venv \
    PATH=/opt/cacara/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DVC_NO_ANALYTICS=1 \
    BENTOML_DO_NOT_TRACK=true \
    CACARA_WEIGHTS_DIR=/opt/cacara/weights \
    CACARA_PARAMS=/opt/cacara/params.yaml \
    CACARA_REQUIREMENTS=/opt/cacara/src/requirements.lock

WORKDIR /opt/cacara/src
COPY pyproject.toml requirements.lock README.md ./
COPY cacara/ cacara/
COPY components/ components/
COPY model/ model/
COPY pipelines/ pipelines/
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir -c requirements.lock . \
    && python -c "from model.yamnet import ensure_weights; print(ensure_weights())" \
    && useradd --uid "$UID" --no-log-init --create-home --home-dir /home/cacara --shell /usr/sbin/nologin cacara
COPY params.yaml /opt/cacara/params.yaml
COPY data/ /opt/cacara/data/

USER ${UID}
WORKDIR /home/cacara
# The service (k8s/base/serving): bentoml serve cacara.service:CacaraSearch --port 3000
EXPOSE 3000
CMD ["cacara", "--help"]
