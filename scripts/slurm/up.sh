#!/usr/bin/env bash
# Starts a real one-node Slurm cluster on this machine for the cluster tests
# (tests/slurm_cluster.rs): Debian's slurm-wlm and munge, no systemd, run as root.
#
# The node has two fake GPUs (gres `gpu:2`: character devices with NVIDIA's major number,
# isolated by cgroups, so a job sees CUDA_VISIBLE_DEVICES and cannot open the other one), a
# preemptible default partition `low` (PreemptMode=REQUEUE) under `high`, and a job-completion
# log; there is no accounting daemon (plain `sacct` is disabled, as on some real clusters).
#
# Idempotent: installs the packages if missing and starts only daemons that are not running.
# Stop it with scripts/slurm/down.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# procps: the cluster tests find worker processes with pgrep/pkill.
if ! command -v slurmctld >/dev/null || ! command -v pgrep >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge procps >/dev/null
fi
install -m 644 "$here/slurm.conf" /etc/slurm/slurm.conf
fake=/var/lib/slurm/fakegpu
mkdir -p "$fake"
# Never reuse /dev/null's numbers (1:3): with device isolation a job could no longer open it.
for i in 0 1; do [ -e "$fake/gpu$i" ] || mknod "$fake/gpu$i" c 195 "$i"; done
echo "Name=gpu File=$fake/gpu[0-1]" > /etc/slurm/gres.conf
install -m 644 "$here/cgroup.conf" /etc/slurm/cgroup.conf
mkdir -p /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge
chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm 2>/dev/null || true
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
running /run/slurmctld.pid || /usr/sbin/slurmctld
# The machine's hostname is not "localhost": name the node explicitly.
running /run/slurmd.pid || /usr/sbin/slurmd -N localhost
for _ in $(seq 1 120); do
  state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle|mixed|allocated) exit 0 ;;
    # A node drained by an earlier configuration comes back.
    drain*|down*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
  esac
  sleep 0.25
done
echo "the Slurm node did not become idle:" >&2; sinfo -R >&2 || true; exit 1
