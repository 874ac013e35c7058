# shellcheck shell=bash
# Helpers shared by the scripts: install missing tools, make sure Postgres and Redis answer.

log() { printf '==> %s\n' "$*" >&2; }

# The documented development key (its SHA-256 is in the gateway's base configuration and in
# compose/dev-secrets/api-keys.json); for local use only.
DEV_API_KEY=stackline-dev-key
export DEV_API_KEY

# True when a Docker engine answers (the docker client alone is not enough).
docker_engine_answers() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
# ensure_command COMMAND DEBIAN_PACKAGE: installs the package when the command is missing.
ensure_command() {
  command -v "$1" >/dev/null 2>&1 && return 0
  log "installing $2 (for $1)"
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

# wait_until SECONDS COMMAND...: retries COMMAND every 0.2 s until it succeeds or time runs out.
wait_until() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

ensure_postgres() {
  ensure_command psql postgresql-client
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return 0; fi
  ensure_command pg_ctlcluster postgresql
  log "starting PostgreSQL"
  local version
  version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf "%f\n" | sort -V | tail -n 1)"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_until 30 pg_isready -q -h 127.0.0.1 -p 5432 || { log "PostgreSQL did not start"; return 1; }
}

ensure_redis() {
  ensure_command redis-cli redis-tools
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then return 0; fi
  ensure_command redis-server redis-server
  log "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_until 30 redis-cli -h 127.0.0.1 -p 6379 ping || { log "Redis did not start"; return 1; }
}

# ensure_python_tool VENV PACKAGE VERSION [COMMAND]: a pinned PyPI tool in a virtualenv;
# COMMAND is the executable it installs when not named after the package.
ensure_python_tool() {
  local venv="$1" package="$2" version="$3" command="${4:-$2}"
  if [ -x "$venv/bin/$command" ] && "$venv/bin/pip" show "$package" 2>/dev/null | grep -x "Version: $version" >/dev/null; then
    return 0
  fi
  log "installing $package $version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$package==$version"
}

# A TCP port nobody listens on right now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
