# gcp-storage-emulator: the local stack's stand-in for Google Cloud Storage (docker/compose.yaml). Never production.
# Clients reach it through STORAGE_EMULATOR_HOST=http://gcs:9023. Objects persist under /data (a volume).

FROM python:3.11.14-slim-bookworm AS constraints
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN uv export --frozen --no-dev --no-emit-project --no-hashes --output-file constraints.txt

FROM python:3.11.14-slim-bookworm
COPY --from=constraints /src/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt gcp-storage-emulator==2026.7.19 \
    && rm /tmp/constraints.txt \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin gcs \
    && mkdir /data \
    && chown 10001:10001 /data

USER 10001:10001
WORKDIR /data
# The emulator keeps its objects under $STORAGE_BASE/.cloudstorage.
ENV STORAGE_BASE=/data
EXPOSE 9023
CMD ["gcp-storage-emulator", "start", "--host", "0.0.0.0", "--port", "9023", "--default-bucket", "cloudscreen"]
