# The GPU trainer: `python -m tasks.train` on TensorFlow's CUDA image. Built from the repository root by
# `python -m ops.image build`; run by the kubernetes backend (docker/k8s/trainer-pod.yaml) and the docker backend.
#
# The project locks tensorflow-cpu; the base image's `tensorflow` is the same release built for CUDA. So every
# locked package except tensorflow-cpu is installed, at the lock's versions and hashes, beside it.

# uv turns uv.lock into a hashed requirements list. This stage reruns only when the lock changes.
FROM python:3.11.14-slim-bookworm AS requirements
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN uv export --frozen --no-dev --no-emit-project --no-emit-package tensorflow-cpu --output-file requirements.txt

FROM tensorflow/tensorflow:2.21.0-gpu

# The lock holds CPython 3.11 wheels: say so here, not halfway through the install, if the base image moves on.
RUN python3 -c "import sys; sys.version_info[:2] == (3, 11) or sys.exit(f'trainer.Dockerfile: the base image has Python {sys.version}; uv.lock needs 3.11')" \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin cloudscreen

# Dependencies before code, so that a code change reuses this large layer. A virtual environment that sees the
# system site-packages: the base image's tensorflow stays importable, the locked packages shadow whatever versions
# the base image (or its distribution) installed, and nothing of the base image is uninstalled or overwritten.
# --no-deps: the list is the whole locked environment; nothing may be resolved in beside it.
COPY --from=requirements /usr/local/bin/uv /usr/local/bin/uv
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN uv venv --no-cache --system-site-packages --python python3 /opt/venv \
    && uv pip install --no-cache --python /opt/venv/bin/python --no-deps --require-hashes -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

WORKDIR /opt/cloudscreen
# tasks/ finds params.yaml beside itself (tasks.lib.config); the CLIs read it from the working directory.
COPY params.yaml ./
COPY tasks ./tasks

# Numeric, so that Kubernetes' runAsNonRoot can verify it. MLflow's usage telemetry is off (mlflow/README.md says
# how to turn it on).
USER 10001:10001
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONPATH=/opt/cloudscreen \
    PYTHONUNBUFFERED=1 \
    HOME=/home/cloudscreen \
    MLFLOW_DISABLE_TELEMETRY=true

# Last, so that a new commit rebuilds nothing above. The image has no .git: this is the lineage's git commit.
ARG GIT_COMMIT=""
ENV CLOUDSCREEN_GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="cloudscreen trainer" \
      org.opencontainers.image.revision=${GIT_COMMIT}

ENTRYPOINT ["python", "-m", "tasks.train"]
