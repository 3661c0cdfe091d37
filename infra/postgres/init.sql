-- Runs once, on an empty data volume (docker-entrypoint-initdb.d). One role (POSTGRES_USER,
-- password from POSTGRES_PASSWORD in the environment), one database per service.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
