#!/bin/sh
# Starts `mlflow server` behind its basic-auth app. Every secret comes from the environment:
#   POSTGRES_USER, POSTGRES_PASSWORD    backend store and the auth app's user store
#   MLFLOW_AUTH_ADMIN_PASSWORD          the admin user's password (created on first start)
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL   MinIO, for artifacts
# The auth config file is written here, at start, so no password is ever stored in the image.
set -eu
: "${POSTGRES_USER:?set POSTGRES_USER}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
PG_HOST="${POSTGRES_HOST:-postgres}"
DB="postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@${PG_HOST}:5432"
umask 077
cat > "$HOME/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${DB}/mlflow_auth
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$HOME/basic_auth.ini"
exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "${DB}/mlflow" \
  --serve-artifacts \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow}" \
  --host 0.0.0.0 --port 5000 \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,mlflow,mlflow:*}"
