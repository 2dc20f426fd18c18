#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis run on loopback for the integration tests, and
# writes the URLs the tests use to .ci/test-env (sourced by .ci/run).
# Installs the Debian packages when missing (also chromium, chromium-driver and prometheus's promtool for
# the status page's browser and /metrics tests); creates a test role with a freshly
# generated password through the local socket as the postgres OS user; never
# weakens the server's authentication. Exits non-zero when a server cannot be reached.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v pg_lsclusters >/dev/null 2>&1 || need_apt+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# The status page's browser test (headless Chromium driven by selenium, no browser download) and promtool for /metrics.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# make test-e2e / test-systemd: the Debian roots (debootstrap, zstd) and booting one (systemd-container's nspawn).
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
command -v systemd-nspawn >/dev/null 2>&1 || need_apt+=(systemd-container)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# PostgreSQL: start the first cluster if it is down.
read -r pg_version pg_cluster pg_port pg_status _ < <(pg_lsclusters --no-header | head -n 1)
if [ "$pg_status" != "online" ]; then
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$pg_cluster" start
fi
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$pg_port" && break
  sleep 0.5
done
pg_isready -h 127.0.0.1 -p "$pg_port"

pg_password=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
su postgres -c "psql -q -v ON_ERROR_STOP=1 -p $pg_port" <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'appliance_test') THEN
    CREATE ROLE appliance_test LOGIN CREATEDB;
  END IF;
END
\$\$;
ALTER ROLE appliance_test WITH LOGIN CREATEDB PASSWORD '$pg_password';
SQL

# Redis: start one on loopback if none answers.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
for _ in $(seq 1 40); do
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
  sleep 0.25
done
redis-cli -h 127.0.0.1 -p 6379 ping

umask 077
cat > .ci/test-env <<ENV
export APPLIANCE_TEST_PG_URL=postgresql://appliance_test:${pg_password}@127.0.0.1:${pg_port}/postgres
export APPLIANCE_TEST_REDIS_URL=redis://127.0.0.1:6379/0
ENV
echo "PostgreSQL $pg_version on 127.0.0.1:$pg_port and Redis on 127.0.0.1:6379 are up"
