#!/usr/bin/env bash
# Start a single-node SLURM (Debian's 22.05 packages) on this machine, for tests/test_slurm_real.py.
# Needs root and no systemd. Installs the packages if they are missing, writes /etc/slurm/slurm.conf for this
# host (its CPUs and memory, no GPUs), starts munged, slurmctld and slurmd as plain processes and waits until the
# node takes jobs. Does nothing when a SLURM controller already answers. Logs: /var/log/slurm/.
set -euo pipefail

if scontrol ping 2>/dev/null | grep -q "is UP"; then
    echo "start-slurm: a SLURM controller is already up"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc --all)  # --all: plain nproc follows OMP_NUM_THREADS, which CI sets to 1
# Leave ~10 % of the memory to the daemons and the test process itself.
memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

mkdir -p /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm /run/munge
chown slurm:slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm
chown munge:munge /run/munge
[[ -s /etc/munge/munge.key ]] || { mungekey --create --force 2>/dev/null || \
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key

# No systemd and no cgroup hierarchy to delegate here: linuxproc tracking and no task plugin. Jobs default to
# 1 GB per CPU so that two one-CPU jobs (an array task and its export, say) can share the node.
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
# A requeued job may start again once its old credential has expired (default 120 s); tests requeue jobs.
AuthInfo=cred_expire=15
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
JobRequeue=1
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
# No accounting database (sacct): the job completion log records each run's end state and exit code instead.
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
# setsid: the daemons outlive this script and the shell that ran it.
setsid /usr/sbin/slurmctld -D -i >/dev/null 2>&1 < /dev/null &
for _ in $(seq 60); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.5
done
setsid /usr/sbin/slurmd -D >/dev/null 2>&1 < /dev/null &

for _ in $(seq 120); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    if [[ "$state" == idle* ]]; then
        echo "start-slurm: node $host idle ($cpus CPUs, ${memory_mb} MB)"
        exit 0
    fi
    sleep 0.5
done
echo "start-slurm: the node did not come up (state: ${state:-unknown}); see /var/log/slurm/" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
