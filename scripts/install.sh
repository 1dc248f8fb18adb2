#!/usr/bin/env bash
# `make install`: Ferry as a service on a plain Linux host (README: Plain Linux host).
#
# Puts Ferry under PREFIX with its own venv, the systemd units where systemd finds them, and a
# config that keeps node credentials across reboots; never enables or starts anything.
#   PREFIX   (default /opt/ferry)  PREFIX/.venv (Ferry and its Python dependencies, from this
#            checkout), PREFIX/README.md (the units' Documentation=)
#   DESTDIR  (default: none)       a staging root for a package: every file lands under it, while
#            the units and the venv name the final paths (the venv's scripts are rewritten)
#   UNITDIR  (default /etc/systemd/system)
#   BINDIR   (default /usr/local/bin)  `agent` there, a link to the venv's, so it is on PATH
#   VENV     (default: none)       an existing venv with Ferry installed (e.g. the checkout's
#            .venv from `make setup`) that the units run instead: no PREFIX/.venv is made
# The Debian packages come from `make setup` (scripts/debian-packages.txt). Run as root;
# idempotent: a second run replaces Ferry and the units, and keeps an edited config.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/opt/ferry}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-/etc/systemd/system}
BINDIR=${BINDIR:-/usr/local/bin}
VENV=${VENV:-}

fail() { echo "install: $*" >&2; exit 1; }
case "$PREFIX" in /*) ;; *) fail "PREFIX must be an absolute path, not '$PREFIX'" ;; esac
case "$UNITDIR" in /*) ;; *) fail "UNITDIR must be an absolute path, not '$UNITDIR'" ;; esac
case "$BINDIR" in /*) ;; *) fail "BINDIR must be an absolute path, not '$BINDIR'" ;; esac
if [ -n "$VENV" ]; then
  [ -x "$VENV/bin/agent" ] || fail "VENV=$VENV has no bin/agent (make setup builds .venv)"
  VENV=$(cd "$VENV" && pwd)
fi
root="$DESTDIR$PREFIX"
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT

# Ferry's venv, built beside the old one and swapped in only when complete (a failed install
# leaves the installed Ferry as it was).
agent="$VENV/bin/agent"
if [ -z "$VENV" ]; then
  /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null \
    || fail "/usr/bin/python3 with venv is missing (Debian: python3-venv; run make setup)"
  mkdir -p "$root"
  new="$root/.venv.new"
  rm -rf "$new"
  /usr/bin/python3 -m venv "$new"
  # A copy of the package to build from: the checkout keeps no build output of the install.
  mkdir -p "$staging/src"
  cp -r pyproject.toml agent "$staging/src/"
  "$new/bin/python" -m pip install -q "$staging/src"
  site=$("$new/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for mod in bcc nftables; do  # Debian's bindings, as make setup links them
    if [ -e "/usr/lib/python3/dist-packages/$mod" ]; then
      ln -sfn "/usr/lib/python3/dist-packages/$mod" "$site/$mod"
    fi
  done
  "$new/bin/python" -c 'import agent.cli, iptc, pyroute2' || fail "the new venv cannot import Ferry"
  # The venv's scripts name the path they were made at; name the final one.
  grep -lF "$new" "$new"/bin/* | xargs -r sed -i "s|$new|$PREFIX/.venv|g"
  rm -rf "$root/.venv"
  mv "$new" "$root/.venv"
  agent="$PREFIX/.venv/bin/agent"
fi
install -D -m 0644 README.md "$root/README.md"
mkdir -p "$DESTDIR$BINDIR"
ln -sfn "$agent" "$DESTDIR$BINDIR/agent"

# The units, naming this install's paths (systemd/ has the defaults, /opt/ferry).
mkdir -p "$DESTDIR$UNITDIR"
for unit in systemd/*.service; do
  sed -e "s|/opt/ferry/.venv/bin/agent|$agent|g" -e "s|/opt/ferry/|$PREFIX/|g" "$unit" \
    > "$staging/$(basename "$unit")"
  install -m 0644 "$staging/$(basename "$unit")" "$DESTDIR$UNITDIR/"
done

# The units read FERRY_CONFIG from /etc/default/ferry; a config that keeps node credentials in
# the StateDirectory (/var/lib/ferry) rather than in /run, which a reboot empties. Kept if there.
if [ ! -e "$DESTDIR/etc/default/ferry" ]; then
  install -D -m 0644 /dev/stdin "$DESTDIR/etc/default/ferry" <<'EOF'
# Read by ferry-agent.service and ferry-proxy.service.
FERRY_CONFIG=/etc/ferry/ferry.yaml
EOF
fi
if [ ! -e "$DESTDIR/etc/ferry/ferry.yaml" ]; then
  install -D -m 0644 /dev/stdin "$DESTDIR/etc/ferry/ferry.yaml" <<'EOF'
# Ferry's configuration: every key has a default (`agent/config.py` lists them all).
identity:
  # `agent ca issue-node <node> --out /var/lib/ferry/identity`: kept across reboots.
  node_credentials: /var/lib/ferry/identity
EOF
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
echo "install: Ferry in $PREFIX, units in $DESTDIR$UNITDIR (agent: $agent)"
echo "install: start it with: systemctl enable --now ferry-agent ferry-proxy"
