#!/usr/bin/env bash
# Install a single-node Slurm (Debian's slurm-wlm) and munge, for tests/test_slurm.py.
#
# Idempotent: does nothing when slurmctld, slurmd, sbatch and munged are already on PATH.
# Needs root (or passwordless sudo) and a Debian/Ubuntu apt. It only installs packages: the test
# fixture writes its own slurm.conf and munge key in a temporary folder and starts the daemons there,
# so nothing here touches /etc/slurm or starts a service.
#
#   scripts/install_slurm.sh            # install if missing
#   scripts/install_slurm.sh --check    # exit 0 when installed, 1 when not; installs nothing
set -euo pipefail

have_all() {
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
}

# Debian puts the daemons in /usr/sbin, which a non-login root shell may not have on PATH.
export PATH="$PATH:/usr/sbin:/sbin"

if have_all; then
    echo "install_slurm: slurm-wlm and munge are already installed ($(command -v slurmctld))"
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    echo "install_slurm: slurm-wlm or munge is missing" >&2
    exit 1
fi

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install_slurm: need root or passwordless sudo to apt-get install slurm-wlm munge" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: no apt-get here; install slurm-wlm (slurmctld, slurmd, sbatch) and munge by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Package lists may be missing on a fresh container; refresh them only then (or when install fails).
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends slurm-wlm munge; then
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

if have_all; then
    echo "install_slurm: installed $(slurmctld -V 2>/dev/null || echo slurm) and munge"
else
    echo "install_slurm: apt-get finished but slurmctld/slurmd/sbatch/munged are still not on PATH" >&2
    exit 1
fi
