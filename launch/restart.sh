#!/usr/bin/env bash
# Runs a command and restarts it when it ends with exit code 75, ghl_jax's "stuck, restart me"
# (the watchdog saw a phase outlast its timeout, or a peer process is gone), or, in a multi-process
# run (JAX_NUM_PROCESSES > 1, GHL_MULTIHOST=1 or SLURM_NTASKS > 1), with 134 (SIGABRT): JAX's
# distributed runtime aborts a process whose peer or coordinator is gone, after its own message.
# At most GHL_RESTARTS times (default 3); the run resumes from its last complete checkpoint. Any
# other exit code, and every exit after SIGTERM/SIGINT (forwarded to the command), ends this script
# with that code.
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
multiprocess=0
if [ "${JAX_NUM_PROCESSES:-1}" -gt 1 ] || [ "${GHL_MULTIHOST:-0}" = 1 ] || [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  multiprocess=1
fi
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
  case "$code" in
    75) why="stuck phase or lost peer";;
    134) why="the distributed runtime ended this process: a peer or the coordinator is gone";;
    *) why="";;
  esac
  if [ "$code" -eq 134 ] && [ "$multiprocess" -eq 0 ]; then why=""; fi
  if [ -z "$why" ] || [ "$stopping" -eq 1 ] || [ "$attempt" -ge "$restarts" ]; then
    exit "$code"
  fi
  attempt=$((attempt + 1))
  echo "[restart] $(hostname): exit $code ($why); restart $attempt of $restarts," \
       "resuming from the last complete checkpoint" >&2
done
