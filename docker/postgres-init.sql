-- Runs once, when the local stack's Postgres volume is first initialised (docker-entrypoint-initdb.d).
-- Airflow's metadata database is the image's POSTGRES_DB; MLflow gets a database and a role of its own on the same
-- server. Local-stack values only: production databases and passwords come from a secret store, never from git.
CREATE ROLE mlflow WITH LOGIN PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
