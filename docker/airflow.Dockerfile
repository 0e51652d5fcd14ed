# Airflow 3.3 with the project: the image of every Airflow service in docker/compose.yaml, and the image to give the
# official Helm chart (`images.airflow`). Built from the repository root:
#   docker build -f docker/airflow.Dockerfile -t cloudscreen/airflow .
# The whole uv.lock is installed (providers, tensorflow-cpu for the `local` training backend, DVC, Dask, MLflow ...),
# at the lock's versions and hashes; the lock pins apache-airflow to this image's release.

FROM python:3.11.14-slim-bookworm AS requirements
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN uv export --frozen --no-dev --no-emit-project --output-file requirements.txt

FROM apache/airflow:3.3.2-python3.11

# As the airflow user, the way Airflow's image documents it. --no-deps: the list is the whole locked environment.
COPY --chown=50000:0 --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The data root the DAGs write under (CLOUDSCREEN_DATA_ROOT): created here, owned by the image's airflow user (uid
# 50000, group 0), so that a named volume mounted on it starts with that owner.
USER 0
RUN mkdir -p /opt/cloudscreen/data && chown 50000:0 /opt/cloudscreen/data
USER 50000:0

# The project runs from its source tree, importable through PYTHONPATH: tasks/ finds params.yaml beside itself.
COPY --chown=50000:0 params.yaml /opt/cloudscreen/params.yaml
COPY --chown=50000:0 tasks /opt/cloudscreen/tasks
# ops/alerts.py: the DAGs' e-mail callbacks.
COPY --chown=50000:0 ops /opt/cloudscreen/ops
COPY --chown=50000:0 dags /opt/airflow/dags
# MLflow's usage telemetry is off (mlflow/README.md says how to turn it on).
ENV PYTHONPATH=/opt/cloudscreen \
    CLOUDSCREEN_DATA_ROOT=/opt/cloudscreen/data \
    MLFLOW_DISABLE_TELEMETRY=true

# Last, so that a new commit rebuilds nothing above. The image has no .git: this is the lineage's git commit.
ARG GIT_COMMIT=""
ENV CLOUDSCREEN_GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="cloudscreen airflow" \
      org.opencontainers.image.revision=${GIT_COMMIT}
