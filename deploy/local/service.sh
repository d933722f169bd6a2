# Sourced by ensure-rabbitmq.sh and ensure-redis.sh, not run: the steps they
# share to make a local service answer on $host:$port. The caller sets
# `name` (for messages), `host` and `port`, then:
#
#   ready_to_start BIN PKG      exits 0 if it answers already, 1 if the host is
#                               not local; makes sure BIN is installed (apt-get
#                               install PKG as root), else prints stdin (what
#                               to do by hand) and exits 1
#   ... starts it ...
#   wait_up SECONDS WHERE       exits 0 once it answers, 1 after SECONDS
#                               (saying WHERE to look)
#
# A caller may define `check_up`: run once the service answers, before the
# exit 0 (it exits 1 itself, saying why, if the service cannot be used).

answering() {
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

exit_if_up() {
  if answering; then
    echo "$name: up on $host:$port"
    up_and_usable
  fi
}

up_and_usable() {
  if declare -F check_up >/dev/null; then check_up; fi
  exit 0
}

require_local() {
  if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
    echo "$name: nothing answers on $host:$port, and it is not local, so this script cannot start it." >&2
    exit 1
  fi
}

ensure_installed() {
  local binary="$1" package="$2"
  if command -v "$binary" >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "$name: not installed; installing Debian's $package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq "$package" </dev/null >/dev/null
  else
    cat >&2
    exit 1
  fi
}

wait_up() {
  local seconds="$1" where="$2"
  for _ in $(seq 1 "$seconds"); do
    if answering; then
      echo "$name: up on $host:$port"
      up_and_usable
    fi
    sleep 1
  done
  echo "$name: started but not answering on $host:$port after $seconds s; see $where" >&2
  exit 1
}

ready_to_start() {
  exit_if_up
  require_local
  ensure_installed "$1" "$2"
}
