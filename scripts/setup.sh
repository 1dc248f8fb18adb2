#!/usr/bin/env bash
# Idempotent machine setup for Ferry on Debian 12 (run as root by `make setup`):
# Debian packages, kernel headers where bcc looks for them, and a venv at .venv that can import bcc.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}; this kernel ships no headers,
# Debian's (same UAPI for the socket-level programs) stand in.
modules="/lib/modules/$(uname -r)"
headers=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$headers" ] && [ ! -e "$modules/build" ]; then
  mkdir -p "$modules"
  ln -sfn "$headers" "$modules/build"
  ln -sfn "${common:-$headers}" "$modules/source"
fi

# The venv uses Debian's python3 (3.11) so Debian's pure-Python bcc bindings import in it.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for mod in bcc nftables; do
  [ -e "/usr/lib/python3/dist-packages/$mod" ] && ln -sfn "/usr/lib/python3/dist-packages/$mod" "$site/$mod"
done
.venv/bin/python -c 'import bcc, iptc, pyroute2' && echo "setup: ok"
