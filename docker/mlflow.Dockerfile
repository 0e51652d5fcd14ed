# The MLflow tracking server: mlflow/server.sh, configured by MLFLOW_* variables (see mlflow/README.md), with the
# Postgres driver and the GCS client for proxied artifacts. Built from the repository root:
#   docker build -f docker/mlflow.Dockerfile -t cloudscreen/mlflow .
# Run it with an init process (compose `init: true`, `docker run --init`): uvicorn's exited workers must be reaped.

# The lock as constraints: whatever the server installs comes at the lock's version, without the rest of the
# pipeline's environment.
FROM python:3.11.14-slim-bookworm AS constraints
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN uv export --frozen --no-dev --no-emit-project --no-hashes --output-file constraints.txt

FROM python:3.11.14-slim-bookworm
# mlflow and google-cloud-storage at the lock's versions; psycopg2-binary is not in the lock (the pipeline never
# talks to Postgres itself).
COPY --from=constraints /src/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt \
        mlflow==3.17.2 google-cloud-storage==3.17.1 psycopg2-binary==2.9.13 \
    && rm /tmp/constraints.txt \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin mlflow

COPY mlflow/server.sh /opt/mlflow/server.sh
USER 10001:10001
WORKDIR /home/mlflow
# server.sh binds 127.0.0.1 by default: in a container the port must be reachable from outside. MLflow's usage
# telemetry is off (mlflow/README.md says how to turn it on).
ENV MLFLOW_HOST=0.0.0.0 \
    MLFLOW_PORT=5000 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONUNBUFFERED=1
EXPOSE 5000
CMD ["bash", "/opt/mlflow/server.sh"]
