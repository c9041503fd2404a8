#!/usr/bin/env bash
# What `make test` needs beyond Python: Debian's prometheus package (promtool and prometheus, for
# tests/ops) and wrk (the serving benchmark's short real run). Installed with apt-get when
# missing (as root, or through passwordless sudo); otherwise it says what to install. Quiet and
# idempotent: nothing happens when both are there.
set -euo pipefail
need=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  need+=(prometheus)
fi
command -v wrk >/dev/null 2>&1 || need+=(wrk)
((${#need[@]})) || exit 0
as_root=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "the tests need the Debian packages: ${need[*]}; install them (sudo apt-get install ${need[*]}) and run again" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "the tests need: ${need[*]} (promtool/prometheus and wrk); install them and run again" >&2
  exit 1
fi
echo "installing ${need[*]} (apt-get) for the tests" >&2
"${as_root[@]}" apt-get update -qq >/dev/null
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Where init lets the package start its own service, stop it: the tests start their own.
("${as_root[@]}" service prometheus stop || true) >/dev/null 2>&1
