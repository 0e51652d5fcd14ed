# The model server: `python -m tasks.serve`, the registry's `champion` over HTTP (MLflow's scoring protocol), following
# the alias. Built from the repository root:
#   docker build -f docker/serve.Dockerfile -t cloudscreen/serve .
# Run by docker/k8s/serve-deployment.yaml and the compose stack's `serve` service; MLFLOW_TRACKING_URI names the
# tracking server (artifacts are proxied by it: the pod needs no bucket credentials).

# The lock as constraints: the server installs only what serving needs, at the lock's versions (TensorFlow for CPU,
# no Airflow, Dask or DVC).
FROM python:3.11.14-slim-bookworm AS constraints
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN uv export --frozen --no-dev --no-emit-project --no-hashes --output-file constraints.txt

FROM python:3.11.14-slim-bookworm
# Dependencies before code, so that a code change reuses this large layer. uvloop and httptools are uvicorn's fast
# event loop and HTTP parser; onnx and onnxruntime the compiled inference path (tasks.lib.inference).
COPY --from=constraints /src/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt \
        mlflow==3.17.2 tensorflow-cpu==2.21.0 keras==3.15.1 numpy==2.4.6 pandas==3.1.1 pyarrow==25.0.1 \
        pydantic==2.14.3 pyyaml==6.0.3 tifffile==2026.3.3 bigearthnet-common==2.8.0 \
        fastapi==0.136.3 uvicorn==0.54.0 uvloop==0.23.0 httptools==0.9.0 python-multipart==0.0.34 \
        onnx==1.23.2 onnxruntime==1.32.0 \
    && rm /tmp/constraints.txt \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin cloudscreen

WORKDIR /opt/cloudscreen
# tasks/ finds params.yaml beside itself (tasks.lib.config); the CLI reads it from the working directory.
COPY params.yaml ./
COPY tasks ./tasks

# Numeric, so that Kubernetes' runAsNonRoot can verify it. MLflow's usage telemetry is off (mlflow/README.md says how
# to turn it on).
USER 10001:10001
ENV PYTHONPATH=/opt/cloudscreen \
    PYTHONUNBUFFERED=1 \
    HOME=/home/cloudscreen \
    MLFLOW_DISABLE_TELEMETRY=true \
    TF_CPP_MIN_LOG_LEVEL=2
EXPOSE 8000

# Last, so that a new commit rebuilds nothing above. The image has no .git: this is the lineage's git commit.
ARG GIT_COMMIT=""
ENV CLOUDSCREEN_GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="cloudscreen serve" \
      org.opencontainers.image.revision=${GIT_COMMIT}

# In a container the port must be reachable from outside: bind every address. --model and the rest come as arguments
# (Kubernetes `args`, compose `command`); the default model is models:/cloudscreen-classifier@champion.
ENTRYPOINT ["python", "-m", "tasks.serve", "--host", "0.0.0.0", "--port", "8000"]
