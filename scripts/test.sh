#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian/Ubuntu machine, then run them:
# system packages (OpenSSH server, rsync, pssh, Chromium, Slurm and munge), a virtualenv
# with the project and its dev extras, lint (ruff), types (mypy), and pytest -- including
# the integration tests that start real sshd servers on 127.0.0.x loopback addresses and a
# single-node Slurm cluster (they need root).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v rsync >/dev/null || missing+=(rsync)
command -v parallel-ssh >/dev/null || command -v pssh >/dev/null || missing+=(pssh)
command -v ps >/dev/null || missing+=(procps)
command -v ip >/dev/null || missing+=(iproute2)
# the report's browser test drives Debian's Chromium (never a browser playwright downloads)
[ -x /usr/bin/chromium ] || missing+=(chromium)
# the Slurm tests start their own munged, slurmctld and slurmd (tests/slurmcluster.py); the
# packages' recommended extras (influxdb, hdf5, rocm... plugins) are not needed
slurm=()
for tool in /usr/bin/sbatch /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged; do
    [ -x "$tool" ] || slurm=(slurm-wlm munge)
done
if [ ${#missing[@]} -gt 0 ] || [ ${#slurm[@]} -gt 0 ]; then
    echo "== installing system packages: ${missing[*]} ${slurm[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ${#slurm[@]} -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${slurm[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi
echo "== installing the project with its dev extras"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check src tests scripts
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# three workers (pytest-xdist): the integration tests mostly wait on sshd hosts and
# subprocesses, so they overlap well even on two cores; INFRA_TEST_WORKERS=0 runs serially.
# --dist loadgroup: the tests marked xdist_group("slurm") all go to one worker, which starts
# one Slurm cluster for them; every other test is spread over the workers as usual
workers=${INFRA_TEST_WORKERS:-3}
dist=()
[ "$workers" = 0 ] || dist=(--dist loadgroup)
.venv/bin/python -m pytest -p no:cacheprovider -n "$workers" "${dist[@]}" "$@"
