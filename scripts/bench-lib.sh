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
