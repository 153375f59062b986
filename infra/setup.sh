#!/usr/bin/env bash
# Idempotent machine setup for Weft (Debian 12, run as root): Debian packages, kernel
# filesystems BCC needs, kernel headers for BCC, and the project venv. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
DEB_PKGS=(python3-bpfcc bpfcc-tools bpftool linux-headers-amd64 redis-server iproute2 nftables
          curl wrk golang gcc nginx python3-venv python3-dev procps)

say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    say "needs root (it installs Debian packages and mounts tracefs): run 'sudo make setup'"; exit 1
fi

missing=()
for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The Debian packages start redis/nginx system-wide where systemd runs; Weft starts its own.
fi

# Kernel filesystems: BCC attaches tracepoints through tracefs; lockdown is read from securityfs.
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
mountpoint -q /sys/kernel/security || mount -t securityfs nodev /sys/kernel/security 2>/dev/null || true

# BCC compiles against /lib/modules/$(uname -r)/{build,source}. When the running kernel has no
# headers package (as here), point it at Debian's; Weft never trusts their struct layouts (BTF does).
KVER=$(uname -r)
if [ ! -e "/lib/modules/$KVER/build/Makefile" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    common=${hdr%-amd64}-common
    if [ -n "$hdr" ] && [ -d "$common" ]; then
        mkdir -p "/lib/modules/$KVER"
        ln -sfn "$hdr" "/lib/modules/$KVER/build"
        ln -sfn "$common" "/lib/modules/$KVER/source"
        say "kernel $KVER has no headers package: BCC will compile against $(basename "$hdr") (struct offsets come from BTF)"
    else
        say "no Debian kernel headers found under /usr/src: BCC cannot compile"; exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV from /usr/bin/python3 (with system site-packages, for bcc)"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.weft-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing Python dependencies into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'
    touch "$stamp"
fi
"$VENV/bin/python" -c 'import bcc, confluent_kafka, faust, redis' || { say "venv is broken: remove $VENV and re-run"; exit 1; }
say "ready"
