#!/bin/bash
# Stop the cluster start_cluster.sh started in FOLDER.
folder=${1:?usage: stop_cluster.sh FOLDER}
for pid_file in slurmd.pid slurmctld.pid munge/munged.pid; do
  if [ -f "$folder/$pid_file" ]; then
    kill "$(cat "$folder/$pid_file")" 2>/dev/null
  fi
done
exit 0
