#!/usr/bin/env bash
# A one-node Slurm cluster for the tests (and for trying deploy/slurm/ on a
# laptop): Debian's slurm-wlm and munge, configured under DIR, daemons started
# in the background. Prints the SLURM_CONF to export. Idempotent: a cluster
# already answering under DIR is left as it is.
#
#   scripts/slurm_cluster.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm_cluster.sh stop DIR
set -euo pipefail
cmd="${1:?start|stop}"
dir="$(mkdir -p "${2:?directory}" && cd "$2" && pwd)"
conf="$dir/slurm.conf"

stop() {
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
}

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi

for b in slurmctld slurmd munged sbatch srun; do
    command -v "$b" >/dev/null || {
        echo "slurm_cluster.sh: $b is missing: install Debian's slurm-wlm and munge (scripts/env.sh does)" >&2
        exit 1
    }
done

node_up() {
    SLURM_CONF="$conf" sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

if [ -f "$conf" ] && [ -f "$dir/slurmd.pid" ] && kill -0 "$(cat "$dir/slurmd.pid")" 2>/dev/null && node_up; then
    echo "$conf"
    exit 0
fi

# munge: one key per machine; the daemon may already run (systemd or an earlier test).
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
    chown -R munge:munge /etc/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
fi

node="$(hostname -s)"
cpus="$(nproc)"
mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
# Free ports, so neither a system cluster nor daemons left by an earlier run
# (another DIR) get in the way.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ctld_port="${SANA_SLURMCTLD_PORT:-$(free_port)}"
d_port="${SANA_SLURMD_PORT:-$(free_port)}"
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
cat > "$conf" <<CONF
ClusterName=sana-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
stop
SLURM_CONF="$conf" slurmctld -f "$conf"
SLURM_CONF="$conf" slurmd -f "$conf"
for _ in $(seq 1 60); do
    if node_up; then
        echo "$conf"
        exit 0
    fi
    sleep 0.5
done
echo "slurm_cluster.sh: the node did not come up; see $dir/log/" >&2
SLURM_CONF="$conf" sinfo >&2 || true
exit 1
