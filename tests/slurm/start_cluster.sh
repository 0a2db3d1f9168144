#!/bin/bash
# A one-node SLURM cluster on this machine, for tests: munged, slurmctld and
# slurmd with their configuration, state and logs in FOLDER. Needs root and
# Debian's slurm-wlm and munge. Prints the path of slurm.conf; export it as
# SLURM_CONF for sbatch, squeue and scontrol. Stop it with stop_cluster.sh.
set -euo pipefail
folder=${1:?usage: start_cluster.sh FOLDER}
mkdir -p "$folder/state" "$folder/spool" "$folder/munge"
node=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$folder/slurm.conf" <<CONF
ClusterName=alexnet-test
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: SLURM holds a requeued job back this long (120 s by default).
AuthInfo=socket=$folder/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$folder/state
SlurmdSpoolDir=$folder/spool
SlurmctldPidFile=$folder/slurmctld.pid
SlurmdPidFile=$folder/slurmd.pid
SlurmctldLogFile=$folder/slurmctld.log
SlurmdLogFile=$folder/slurmd.log
SlurmctldPort=$((7000 + RANDOM % 1000))
SlurmdPort=$((8000 + RANDOM % 1000))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=10
# This machine may be busy with other tests: RPCs wait 60 s, not 10, before
# SLURM takes a slow daemon for a dead one and cancels the job's step.
MessageTimeout=60
NodeName=$node CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
munged --force --socket="$folder/munge/munge.socket" \
    --pid-file="$folder/munge/munged.pid" --log-file="$folder/munge/munged.log" \
    --seed-file="$folder/munge/munged.seed"
export SLURM_CONF=$folder/slurm.conf
slurmctld -i
slurmd
for _ in $(seq 100); do
  if sinfo -h -o %t 2>/dev/null | grep -q idle; then
    echo "$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "start_cluster.sh: the node did not become idle; see $folder/*.log" >&2
exit 1
