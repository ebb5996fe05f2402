#!/usr/bin/env bash
# Runs a command and restarts it when it ends with exit code 75, ghl_jax's "stuck, restart me"
# (the watchdog saw a phase outlast its timeout, or a peer process is gone): at most GHL_RESTARTS
# times (default 3); the run resumes from its last complete checkpoint. Any other exit code, and
# every exit after SIGTERM/SIGINT (forwarded to the command), ends this script with that code.
#   bash launch/restart.sh [--watchdog] python -m experiments.main --config=... --workdir=...
# --watchdog turns ghl_jax's watchdog on: --config.watchdog.enabled=True right after --config, so
# that a later --config.watchdog.* on the command line (e.g. enabled=False) still wins.
set -uo pipefail
if [ "${1:-}" = "--watchdog" ]; then
  shift
  command=()
  after_config=0
  for arg in "$@"; do
    command+=("$arg")
    if [ "$after_config" -eq 1 ]; then command+=("--config.watchdog.enabled=True"); after_config=0; fi
    case "$arg" in
      --config=*|-config=*) command+=("--config.watchdog.enabled=True");;
      --config|-config) after_config=1;;
    esac
  done
  set -- "${command[@]}"
fi
restarts="${GHL_RESTARTS:-3}"
attempt=0
child=0
stopping=0
forward() {
  stopping=1
  if [ "$child" -ne 0 ]; then kill -"$1" "$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
while true; do
  "$@" &
  child=$!
  wait "$child"
  code=$?
  while kill -0 "$child" 2>/dev/null; do      # wait was cut short by a forwarded signal
    wait "$child"
    code=$?
  done
  child=0
  if [ "$code" -ne 75 ] || [ "$stopping" -eq 1 ] || [ "$attempt" -ge "$restarts" ]; then
    exit "$code"
  fi
  attempt=$((attempt + 1))
  echo "[restart] $(hostname): exit 75 (stuck phase or lost peer); restart $attempt of $restarts," \
       "resuming from the last complete checkpoint" >&2
done
