# Shared by the benchmark scripts (sourced, not run).

TCK=$(getconf CLK_TCK)
# CPU ticks (user + system) a process has used so far.
ticks() { awk '{print $14+$15}' /proc/$1/stat; }

# An HAProxy config set up as ../shared/bench/peers.sh sets up its own (one thread,
# keep-alive, server connections reused), backend 127.0.0.1:18081; each argument is one
# frontend `bind` line's arguments.
haproxy_cfg() {
  printf '%s\n' global '  nbthread 1' '  maxconn 9000' defaults '  mode http' \
    '  timeout connect 5s' '  timeout client 30s' '  timeout server 30s' \
    '  option http-keep-alive' '  http-reuse always' 'frontend f'
  local b
  for b in "$@"; do printf '  bind %s\n' "$b"; done
  printf '%s\n' '  default_backend b' 'backend b' '  server s1 127.0.0.1:18081'
}

# Runs with errors make their figures worthless: each check below prints what went wrong and
# counts it, and `exit_if_failed` (the last line of every benchmark script) exits non-zero
# when any run had errors.
FAILURES=0
failed_run() {
  echo "!! $1" >&2
  FAILURES=$((FAILURES + 1))
}
# wrk: any non-2xx/3xx answer or socket error (connect, read, write, timeout), or no request.
check_wrk() { # LABEL OUTPUT
  local bad n
  bad=$(echo "$2" | grep -E 'Non-2xx or 3xx responses|Socket errors' | tr '\n' ' ' || true)
  n=$(echo "$2" | awk '/requests in/ {print $1}')
  [ -z "$bad" ] || failed_run "$1: $bad"
  [ "${n:-0}" -gt 0 ] || failed_run "$1: no request completed"
}
# h2load: any failed, errored or timed-out request, any 4xx or 5xx, or none succeeded.
check_h2load() { # LABEL OUTPUT
  local req codes
  req=$(echo "$2" | awk '/^requests:/ {print $8, $10, $12, $14}')
  codes=$(echo "$2" | awk '/^status codes:/ {print $7, $9}')
  read -r ok bad err tmo <<<"${req:-0 0 0 0}"
  read -r c4 c5 <<<"${codes:-0 0}"
  if [ "$ok" -eq 0 ] || [ $((bad + err + tmo + c4 + c5)) -gt 0 ]; then
    failed_run "$1: $ok succeeded, $bad failed, $err errored, $tmo timed out, ${c4} 4xx, ${c5} 5xx"
  fi
}
exit_if_failed() {
  if [ "$FAILURES" -gt 0 ]; then
    echo "!! $FAILURES run(s) had errors: their figures are not valid" >&2
    exit 1
  fi
}
