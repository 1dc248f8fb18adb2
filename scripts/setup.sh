#!/usr/bin/env bash
# Idempotent machine setup for Ferry on Debian 12 (run as root by `make setup`): the Debian
# packages of scripts/debian-packages.txt, kernel headers where bcc looks for them, and a venv at
# .venv that can import bcc. Works from a pristine Debian 12 (`make fresh-check` proves it).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE_LIST=scripts/debian-packages.txt
[ -r "$PACKAGE_LIST" ] || { echo "setup: $PACKAGE_LIST is missing (run from a Ferry checkout)" >&2; exit 1; }

# The package list: one per line, `#` comments, @ARCH@ for the Debian architecture.
# (The future Containerfile reads the same file the same way; see its header.)
read_packages() {
  local arch=$1
  sed -e 's/#.*//' -e "s/@ARCH@/$arch/g" "$PACKAGE_LIST" | tr -s ' \t' '\n' | sed '/^$/d'
}

debian=
if command -v dpkg-query >/dev/null && command -v apt-get >/dev/null; then
  debian=1
  arch=$(dpkg --print-architecture)
  missing=()
  while read -r pkg; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done < <(read_packages "$arch")
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "setup: these Debian packages are missing and installing them needs root:" \
        "${missing[*]} (run make setup as root)" >&2
      exit 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
else
  # Not Debian: the README's "What `make setup` installs" says what to install instead.
  arch=$(uname -m)
  echo "setup: no apt-get/dpkg here, so no packages installed; install the equivalents of" \
    "$PACKAGE_LIST yourself (README: What make setup installs)" >&2
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. A kernel without its headers
# installed (a custom one, or a container's host) gets Debian's (same UAPI for the socket-level
# programs). linux-headers-amd64 installs /usr/src/linux-headers-<version>-amd64 (-arm64 on arm64).
modules="/lib/modules/$(uname -r)"
if [ ! -e "$modules/build" ]; then
  headers=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$headers" ] && [ -w /lib ]; then
    mkdir -p "$modules"
    ln -sfn "$headers" "$modules/build"
    ln -sfn "${common:-$headers}" "$modules/source"
    echo "setup: kernel headers for bcc: $modules/build -> $headers"
  else
    echo "setup: warning: no kernel headers at $modules/build (bcc cannot compile there)" >&2
  fi
fi

# The venv uses Debian's python3 (3.11) so Debian's pure-Python bcc bindings import in it.
# A venv left without pip (made before python3-venv was installed) is made again.
if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "setup: .venv has no working pip; making it again"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for mod in bcc nftables; do
  if [ -e "/usr/lib/python3/dist-packages/$mod" ]; then
    ln -sfn "/usr/lib/python3/dist-packages/$mod" "$site/$mod"
  fi
done
# Debian's bcc and nftables bindings are part of the check where setup installed them.
imports=iptc,pyroute2
[ -n "$debian" ] && imports=$imports,bcc,nftables
.venv/bin/python -c "import $imports" && echo "setup: ok"
