#!/usr/bin/env bash
# `make fresh-check`: the README's quick start, proven on a pristine Debian 12.
#
# debootstrap builds a minbase bookworm root and adds git, make and ca-certificates (the
# "pristine userland" of issue 12); this machine's resolver, CA certificates, apt mirror settings
# and pip configuration are copied in (it reaches the registries through them); the repository's
# HEAD commit is cloned into it; then `make demo` and `make test` run as root in a chroot in a
# private mount namespace. Same kernel, so namespaces, iptables and eBPF work there. Prints how
# long each step took, and removes the root afterwards, never deleting through a mount.
#
# Settings (environment):
#   KEEP=1      keep the root for debugging (this script's `enter` and `remove` then work on it)
#   CACHE=1     reuse the Debian packages debootstrap downloaded before (build/fresh-cache); the
#               root is still installed from scratch, only the download is skipped
#   MIRROR=URL  Debian mirror for debootstrap (default: the bookworm one in this machine's apt
#               sources, else deb.debian.org)
#   FRESH_DIR   where roots and logs go (default: build/ in the repository, git-ignored)
# Subcommands:
#   fresh-check.sh enter DIR    a shell in a kept root, mounted as during the check
#   fresh-check.sh remove DIR   remove a kept root (unmounts first, refuses while anything is
#                               still mounted below it)
set -euo pipefail

SELF=$(readlink -f "$0")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
SUITE=bookworm
EXTRA_PACKAGES=(git make ca-certificates)   # what the issue's pristine userland adds to minbase
MARKER=.ferry-fresh-check                   # marks a work dir as this script's, for `remove`
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "fresh-check: error: $*" >&2; exit 1; }
say() { printf '\n== fresh-check: %s\n' "$*"; }
now() { echo "$EPOCHREALTIME"; }
# m:ss of the time since $1
since() {
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { s = b - a; printf "%d:%04.1f", s / 60, s % 60 }'
}

# step TIMINGS NAME CMD...: run CMD, append "NAME<TAB>m:ss<TAB>exit status" to TIMINGS.
step() {
  local timings=$1 name=$2 t0 rc=0
  shift 2
  say "$name"
  t0=$(now)
  "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$(since "$t0")" "$rc" >>"$timings"
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Inside the private mount namespace: mounts, then commands in the chroot.

# The mounts a booted Debian has, made only in this (private) mount namespace, so they vanish
# with it and never appear in the machine's mount table.
mount_root() {
  local root=$1
  mount --bind "$root" "$root"                      # `/` must be a mount point for `ip netns`
  mount -t proc proc "$root/proc"
  mount -t sysfs sysfs "$root/sys"
  if [ -d /sys/fs/cgroup ] && mountpoint -q /sys/fs/cgroup; then
    mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
  fi
  if grep -qw bpf /proc/filesystems && [ -d "$root/sys/fs/bpf" ]; then
    mount -t bpf bpf "$root/sys/fs/bpf"             # a fresh bpffs, as systemd mounts one
  fi
  if grep -qw tracefs /proc/filesystems && [ -d "$root/sys/kernel/tracing" ]; then
    mount -t tracefs tracefs "$root/sys/kernel/tracing"   # bcc's kprobes
  fi
  mount --bind /dev "$root/dev"                     # device nodes (devtmpfs), not its submounts
  mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$root/dev/pts"
  mount --bind "$root/dev/pts/ptmx" "$root/dev/ptmx"    # ptys from this devpts, not the host's
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"   # fresh /run (netns, locks, pids)
  mkdir -m 1777 "$root/run/lock"
}

# The environment of a fresh root login, plus this machine's pip and proxy settings.
chroot_env() {
  local name
  CHROOT_ENV=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash PATH="$CHROOT_PATH"
    LANG=C.UTF-8 TERM="${TERM:-dumb}")
  while read -r name; do
    case "$name" in
      PIP_FIND_LINKS | PIP_INDEX_URL | PIP_EXTRA_INDEX_URL)
        # shellcheck disable=SC2086 # pip splits these on whitespace too
        local_only ${!name} && continue ;;   # local to this machine, as in drop_local_indexes
    esac
    CHROOT_ENV+=("$name=${!name}")
  done < <(compgen -e | grep -iE '^(PIP_[A-Z_]+|(http|https|ftp|all|no)_proxy)$' || true)
}

in_chroot() {
  chroot "$ROOT" /usr/bin/env -i "${CHROOT_ENV[@]}" /bin/bash -c "$1"
}

inside() {
  local work=$1 commit=$2 timings=$1/timings
  ROOT=$work/root
  readlink /proc/self/ns/mnt >"$work/mntns"    # cleanup finds leftover processes by it
  mount_root "$ROOT"
  chroot_env
  step "$timings" "extra packages (${EXTRA_PACKAGES[*]})" in_chroot \
    "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq &&
     apt-get install -y -qq --no-install-recommends ${EXTRA_PACKAGES[*]} >/dev/null"
  check_ca_bundle "$ROOT"
  step "$timings" "git clone (commit ${commit:0:12})" in_chroot \
    "git clone -q /tmp/ferry.bundle /root/ferry &&
     git -C /root/ferry -c advice.detachedHead=false checkout -q $commit &&
     rm /tmp/ferry.bundle && git -C /root/ferry log -1 --format='%H %s'"
  step "$timings" "make demo (runs make setup)" in_chroot "cd /root/ferry && make demo"
  step "$timings" "make test" in_chroot "cd /root/ferry && make test"
}

# ca-certificates rebuilt the root's bundle from its own list and /usr/local/share/ca-certificates;
# say so if this machine's bundle has certificates the root's lacks (HTTPS may then fail).
check_ca_bundle() {
  local root=$1 bundle=/etc/ssl/certs/ca-certificates.crt host_n root_n
  host_n=$(grep -c 'BEGIN CERTIFICATE' "$bundle" 2>/dev/null || true)
  root_n=$(grep -c 'BEGIN CERTIFICATE' "$root$bundle" 2>/dev/null || true)
  if [ "${root_n:-0}" -lt "${host_n:-0}" ]; then
    echo "fresh-check: warning: the root's CA bundle has $root_n certificates, this machine's" \
      "$host_n (put extra CAs in /usr/local/share/ca-certificates on this machine)" >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# On the machine: the root, this machine's network configuration, cleanup.

# The first bookworm mirror of this machine's apt sources (deb822 .sources or one-line .list).
host_mirror() {
  local uri
  uri=$(awk 'BEGIN { RS = "" } {
      uri = ""; ok = 0; n = split($0, line, "\n")
      for (i = 1; i <= n; i++) {
        if (line[i] ~ /^URIs:/) { split(line[i], f, /[ \t]+/); uri = f[2] }
        if (line[i] ~ /^Suites:/ && line[i] ~ /[ \t]bookworm([ \t]|$)/) ok = 1
        if (line[i] ~ /^Enabled:[ \t]*no/) { ok = 0; break }
      }
      if (ok && uri != "") { print uri; exit }
    }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [ -z "$uri" ]; then
    uri=$(awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                             if ($(i + 1) == "bookworm") { print $i; exit } }' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# This machine's apt sources for Debian itself (bookworm, Debian's keyring only): copied so the
# root gets the same mirror, updates and security suites. Third-party sources stay out.
debian_source_files() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.{list,sources}; do
    [ -f "$f" ] && grep -q bookworm "$f" || continue
    if grep -iE '(signed-by)[:=]' "$f" | grep -vq 'debian-archive-'; then continue; fi
    echo "$f"
  done
}

# What this machine reaches Debian mirrors and PyPI through, copied into the root: resolver, CA
# certificates, apt proxy/validity settings, pip configuration. Read-only information only: no
# apt auth.conf, no keys.
copy_machine_config() {
  local root=$1 f copied=0 home_pip
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  if [ ! -s "$root/etc/hosts" ]; then       # minbase has none; Debian's installer writes this
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
      "$(cat "$root/etc/hostname" 2>/dev/null || hostname)" >"$root/etc/hosts"
  fi
  # The local CAs (ca-certificates, installed next, adds them to the root's bundle) and the
  # bundle itself for anything using HTTPS before that.
  if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  fi
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$root/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  fi
  while read -r f; do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
    copied=1
  done < <(debian_source_files)
  # debootstrap's one-line sources.list would repeat the copied sources
  if [ "$copied" = 1 ] && ! debian_source_files | grep -qx /etc/apt/sources.list; then
    rm -f "$root/etc/apt/sources.list"
  fi
  for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
    [ -f "$f" ] || continue
    if grep -qE 'Acquire::[A-Za-z:]*[Pp]roxy|Check-Valid-Until|Check-Date' "$f"; then
      cp -L "$f" "$root$f"
    fi
  done
  for f in /etc/pip.conf /etc/xdg/pip "${PIP_CONFIG_FILE:-}"; do
    [ -n "$f" ] && [ -e "$f" ] || continue
    mkdir -p "$root$(dirname "$f")"
    cp -aL "$f" "$root$f"
  done
  home_pip=${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf
  if [ -f "$home_pip" ]; then
    mkdir -p "$root/root/.config/pip"
    cp -L "$home_pip" "$root/root/.config/pip/pip.conf"
  fi
  for f in "$root/etc/pip.conf" "$root/etc/xdg/pip/pip.conf" "$root/root/.config/pip/pip.conf" \
    "$root${PIP_CONFIG_FILE:-/nonexistent}"; do
    [ -f "$f" ] && drop_local_indexes "$f"
  done
  # No init system runs in a chroot: a package's postinst must not start its daemon (nginx on
  # :80 in this machine's network namespace). Debian's convention for chroots and images.
  printf '#!/bin/sh\n# fresh-check: no services in this chroot\nexit 101\n' \
    >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
}

# Package locations that are files on this machine (file: URLs, paths) do not exist in the root
# and are not how a new user installs: pip settings naming only such locations are left out.
local_only() {  # local_only VALUE...: all values are local files or directories
  local v
  for v in "$@"; do
    case "$v" in file:* | /* | ./* | ../*) ;; *) return 1 ;; esac
  done
}

drop_local_indexes() {
  local conf=$1 line key values tmp
  tmp=$conf.tmp
  : >"$tmp"
  while IFS= read -r line || [ -n "$line" ]; do
    if [[ "$line" =~ ^[[:space:]]*(find-links|index-url|extra-index-url)[[:space:]]*=(.*)$ ]]; then
      key=${BASH_REMATCH[1]}
      read -ra values <<<"${BASH_REMATCH[2]}"
      if local_only "${values[@]}"; then
        echo "fresh-check: pip: leaving out $key = ${values[*]} (local to this machine)"
        line="# fresh-check: local to the machine: $line"
      fi
    fi
    printf '%s\n' "$line" >>"$tmp"
  done <"$conf"
  mv "$tmp" "$conf"
}

# debootstrap without its line per package and stage.
debootstrap_root() {
  debootstrap_root_ "$@" 2>&1 \
    | { grep --line-buffered -vE '^I: (Retriev|Validat|Extract|Unpack|Configur)ing ' || true; }
}

debootstrap_root_() {
  local work=$1 mirror=$2 arch tarball
  arch=$(dpkg --print-architecture)
  # In a private mount namespace: the proc/sys mounts debootstrap makes in the target die with it.
  if [ "${CACHE:-0}" = 1 ]; then
    tarball=$FRESH_DIR/fresh-cache/$SUITE-minbase-$arch.tgz
    if [ ! -s "$tarball" ]; then
      mkdir -p "$(dirname "$tarball")" "$work/download"
      unshare --mount --propagation private -- debootstrap --variant=minbase --arch="$arch" \
        --make-tarball="$tarball.part" "$SUITE" "$work/download" "$mirror"
      mv "$tarball.part" "$tarball"
      rm -rf --one-file-system "$work/download"
    fi
    echo "fresh-check: debootstrap from the cached packages in $tarball"
    unshare --mount --propagation private -- debootstrap --variant=minbase --arch="$arch" \
      --unpack-tarball="$tarball" "$SUITE" "$work/root" "$mirror"
  else
    unshare --mount --propagation private -- debootstrap --variant=minbase --arch="$arch" \
      "$SUITE" "$work/root" "$mirror"
  fi
}

# Mount points at or below $1 in this machine's mount table.
mounts_below() {
  awk -v w="$1" '$5 == w || index($5, w "/") == 1 { print $5 }' /proc/self/mountinfo
}

# Processes of the check still alive: chrooted into the root, or in its mount namespace.
processes_in() {
  local work=$1 ns="" p r
  [ -f "$work/mntns" ] && ns=$(cat "$work/mntns")
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    if [[ "$r" == "$work/root" || "$r" == "$work/root/"* ]] \
      || { [ -n "$ns" ] && [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$ns" ]; }; then
      echo "${p#/proc/}"
    fi
  done
}

# Remove a work dir: stop what still runs in it, unmount what is mounted below it, and delete
# only when nothing is mounted there any more (rm never crosses into a mounted file system).
remove_work() {
  local work=$1 pids m i
  [ -f "$work/$MARKER" ] || die "$work is not a fresh-check directory (no $MARKER); not removing"
  for i in 1 2 3 4 5 6 7 8 9 10; do
    pids=$(processes_in "$work" | tr '\n' ' ')
    [ -z "${pids// /}" ] && break
    [ "$i" = 1 ] && echo "fresh-check: stopping processes left in the root: $pids"
    # shellcheck disable=SC2086 # a list of pids
    kill $([ "$i" -lt 6 ] && echo -TERM || echo -KILL) $pids 2>/dev/null || true
    sleep 1
  done
  [ -z "$(processes_in "$work")" ] || die "processes still run in $work/root; not removing it"
  for m in $(mounts_below "$work" | sort -r); do
    umount "$m" 2>/dev/null || umount -R "$m" 2>/dev/null || umount -l "$m" || true
  done
  if [ -n "$(mounts_below "$work")" ]; then
    die "still mounted below $work, not removing it: $(mounts_below "$work" | tr '\n' ' ')"
  fi
  rm -rf --one-file-system "$work"
}

enter() {
  local work=${1:?usage: fresh-check.sh enter DIR}
  work=$(readlink -f "$work")
  [ -f "$work/$MARKER" ] || die "$work is not a fresh-check directory (no $MARKER)"
  exec unshare --mount --propagation private -- bash "$SELF" __shell "$work"
}

shell_inside() {
  ROOT=$1/root
  mount_root "$ROOT"
  chroot_env
  chroot "$ROOT" /usr/bin/env -i "${CHROOT_ENV[@]}" /bin/bash -c 'cd /root/ferry; exec bash -l'
}

main() {
  local mirror commit work timings log t0 status=0
  [ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, mounts and chroot need it)"
  for tool in unshare chroot mount umount mountpoint git dpkg awk; do
    command -v "$tool" >/dev/null || die "\`$tool\` is not on PATH"
  done
  if ! command -v debootstrap >/dev/null; then
    echo "fresh-check: installing Debian's debootstrap (only on this machine, not part of setup)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap \
      || die "cannot install debootstrap (apt-get install debootstrap)"
  fi
  FRESH_DIR=${FRESH_DIR:-$REPO/build}
  mkdir -p "$FRESH_DIR"
  FRESH_DIR=$(readlink -f "$FRESH_DIR")
  mirror=${MIRROR:-$(host_mirror)}
  # Pin the commit: the bundle carries HEAD as it is now, whatever is committed meanwhile.
  work=$(mktemp -d "$FRESH_DIR/fresh-XXXXXX")
  touch "$work/$MARKER"
  timings=$work/timings
  log=$work.log
  : >"$timings"
  # shellcheck disable=SC2064 # expand now: the trap must remove this run's dir
  trap "finish '$work' \$?" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  exec > >(tee -a "$log") 2>&1

  say "root in $work/root, mirror $mirror, log $log"
  t0=$(now)
  step "$timings" "debootstrap ($SUITE minbase)" debootstrap_root "$work" "$mirror" || exit 1
  copy_machine_config "$work/root"
  git -C "$REPO" bundle create -q "$work/root/tmp/ferry.bundle" HEAD \
    || die "git bundle of $REPO failed"
  commit=$(git bundle list-heads "$work/root/tmp/ferry.bundle" HEAD | awk '{ print $1; exit }')
  [ -n "$commit" ] || die "no HEAD in the bundle of $REPO"
  echo "fresh-check: checking commit $commit ($(git -C "$REPO" log -1 --format=%s "$commit"))"
  unshare --mount --propagation private -- bash "$SELF" __inside "$work" "$commit" || status=$?
  TOTAL=$(since "$t0")
  exit "$status"
}

# On exit: the timing table, then the root removed (or kept with KEEP=1).
finish() {
  local work=$1 status=$2 name took rc
  trap - EXIT INT TERM
  echo
  echo "fresh-check: steps"
  printf '  %-46s %9s  %s\n' step "time" result
  while IFS=$'\t' read -r name took rc; do
    [ "$rc" = 0 ] && rc=ok || rc="FAILED (exit $rc)"
    printf '  %-46s %9s  %s\n' "$name" "$took" "$rc"
  done <"$work/timings"
  [ -n "${TOTAL:-}" ] && printf '  %-46s %9s\n' total "$TOTAL"
  if [ "${KEEP:-0}" = 1 ]; then
    echo "fresh-check: kept $work (KEEP=1): scripts/fresh-check.sh enter $work;" \
      "scripts/fresh-check.sh remove $work"
  else
    remove_work "$work" && echo "fresh-check: removed $work"
  fi
  if [ "$status" = 0 ]; then
    echo "fresh-check: PASSED (log: $work.log)"
  else
    echo "fresh-check: FAILED (log: $work.log)"
  fi
  exit "$status"
}

case "${1:-}" in
  __inside) inside "$2" "$3" ;;
  __shell) shell_inside "$2" ;;
  enter) enter "${2:-}" ;;
  remove)
    [ "$(id -u)" -eq 0 ] || die "run as root"
    remove_work "$(readlink -f "${2:?usage: fresh-check.sh remove DIR}")"
    ;;
  "") main ;;
  *) die "unknown argument $1 (usage: fresh-check.sh [enter DIR | remove DIR])" ;;
esac
