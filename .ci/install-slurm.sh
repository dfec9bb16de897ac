#!/usr/bin/env bash
# Installs what the `-m slurm` tests need (DESIGN.md §6): Debian's Slurm (slurmctld, slurmd, client tools) and
# munge. Idempotent and quiet: does nothing when the commands are already there. Needs root (CI runs as root).
# The tests start and stop the daemons themselves (tests/slurm/conftest.py), with their own slurm.conf; nothing
# is started here (a temporary policy-rc.d keeps the packages' init scripts from starting services).
set -euo pipefail

need=()
for cmd in slurmctld slurmd sbatch srun scontrol squeue sinfo scancel munged mungekey; do
    command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm.sh: missing ${need[*]}; run as root to install slurm-wlm and munge" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

start=$(date +%s)
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "install-slurm.sh: apt-get failed" >&2
    exit 1
fi
rm -f "$log"
echo "install-slurm.sh: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurmctld) and munge" \
     "in $(( $(date +%s) - start )) s"
