#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests of `pipeline submit --slurm`
# (tests/slurm.rs) and for trying a grid on Slurm without a cluster:
#
#   bash scripts/slurm-local.sh start     # installs Debian's slurm-wlm and munge if missing
#   bash scripts/slurm-local.sh status
#   bash scripts/slurm-local.sh stop
#
# Runs as root (SlurmUser=root, SlurmdUser=root), with process tracking by /proc
# (proctrack/linuxproc), no task plugin, no accounting (so `sacct` does not work; `squeue` and
# `scontrol` do), consumable cores and memory (select/cons_tres), one node named after this
# host with what `slurmd -C` reports, and one partition `debug` with requeueing allowed.
# Its state, logs and spool live under ${SLURM_LOCAL_DIR:-/var/tmp/ldl-slurm}.
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/var/tmp/ldl-slurm}
CONF=/etc/slurm/slurm.conf

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  echo "slurm-local: installing slurmctld, slurmd, slurm-client, munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq slurmctld slurmd slurm-client munge >&2
}

write_conf() {
  local node
  node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$(hostname -s)/" | sed 's/ UpTime=.*//')
  mkdir -p /etc/slurm "$DIR/spool/ctld" "$DIR/spool/d" "$DIR/log"
  cat > "$CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-node test cluster.
ClusterName=ldl-local
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it starts again (default 120).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Small, so that the tests exercise arrays cut into chunks.
MaxArraySize=3
# Jobs without --mem get this much per CPU, so several fit on the node at once.
DefMemPerCPU=1024
# A requeued job starts again at once (the default waits for the node's epilogue).
JobRequeue=1
KillWait=10
MinJobAge=600
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install
  write_conf
  # munge: a key, then the daemon.
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  chmod 0700 /etc/munge
  if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- /usr/sbin/munged
    else
      /usr/sbin/munged --force
    fi
  fi
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm-local: up ($(sinfo -h -o '%P %D node(s) %T %c CPUs %m MB'))" >&2
      return 0
    fi
    # A node left DOWN by an earlier stop comes back with ReturnToService=2, or by hand.
    scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm-local: the node did not come up; see $DIR/log/" >&2
  sinfo >&2 || true
  tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  return 1
}

stop() {
  scancel --full --quiet --user=root 2>/dev/null || true
  for d in slurmd slurmctld munged; do
    pkill -x "$d" 2>/dev/null || true
  done
  for _ in $(seq 1 20); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
    sleep 0.5
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
