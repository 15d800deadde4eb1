#!/usr/bin/env bash
# A one-node Slurm cluster of this machine, everything under DIR (its own munge key and
# socket, slurm.conf, state, spool and logs; nothing in /etc): for the Slurm test
# (crates/nulltext-cli/tests/slurm.rs) and for trying deploy/slurm/pie-bench.sbatch.
#
#   tools/slurm-local.sh start DIR     # then: export SLURM_CONF=DIR/slurm.conf; sbatch …
#   tools/slurm-local.sh stop DIR
#
# Needs Debian's slurm-wlm and munge (tools/test-deps.sh installs them) and root (slurmd
# starts jobs as their users). Exit status 3: Slurm is not installed.
set -euo pipefail
cmd="${1:?usage: tools/slurm-local.sh start|stop DIR}"
dir="$(mkdir -p "${2:?usage: tools/slurm-local.sh start|stop DIR}" && cd "$2" && pwd)"

stop() {
    # Only the daemons this script started, by the ids in their pid files.
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/run/$name.pid" ]; then
            pid="$(cat "$dir/run/$name.pid")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            rm -f "$dir/run/$name.pid"
        fi
    done
}

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi
[ "$cmd" = start ] || { echo "usage: tools/slurm-local.sh start|stop DIR" >&2; exit 2; }

for bin in munged slurmctld slurmd sbatch sinfo; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        echo "tools/slurm-local.sh: \`$bin\` not found: install Debian's slurm-wlm and munge (tools/test-deps.sh does)" >&2
        exit 3
    fi
done
export PATH="$PATH:/usr/sbin"
if [ "$(id -u)" -ne 0 ]; then
    echo "tools/slurm-local.sh: slurmd must run as root to start jobs" >&2
    exit 3
fi

mkdir -p "$dir/run" "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
chmod 700 "$dir/munge"
# Ports of this cluster only (several may run at once).
base=$((20000 + ($$ % 20000)))
host="$(hostname -s)"
cpus="${SLURM_LOCAL_CPUS:-12}"

head -c 1024 /dev/urandom > "$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"

cat > "$dir/slurm.conf" <<EOF
ClusterName=nulltext-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$base
SlurmdPort=$((base + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# The node as declared here, whatever the hardware: tasks ask for CPUs the job file names.
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf"
for _ in $(seq 100); do
    state="$(sinfo -h -o %T 2>/dev/null || true)"
    case "$state" in idle*|mixed*|alloc*) echo "slurm cluster up: SLURM_CONF=$dir/slurm.conf"; exit 0 ;; esac
    sleep 0.2
done
echo "tools/slurm-local.sh: the node did not come up (state: ${state:-none}); logs in $dir/log:" >&2
tail -n 20 "$dir"/log/*.log >&2 || true
stop
exit 1
