#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (munge + slurmctld + slurmd)
# for tests/test_slurm.py and CI; run as root:  tests/slurm/start_slurm.sh
#
# Idempotent: when the cluster answers and its configuration is unchanged it is
# left alone; otherwise the daemons this script started earlier (found by their
# pid files) are stopped and started again. Prints how long it took.
#
# Designed for a root shell in a container without systemd or usable cgroups
# (CI): daemons are started directly, and the configuration avoids every plugin
# that needs cgroups or a database:
#   ProctrackType=proctrack/linuxproc   process tracking via /proc (no cgroups)
#   TaskPlugin=task/none                no binding/confinement (no cgroups)
#   JobAcctGatherType=jobacct_gather/none, AccountingStorageType=none
#                                       no slurmdbd, hence no sacct: poll
#                                       `scontrol show job` (MinJobAge keeps
#                                       finished jobs visible for an hour)
#   SelectType=select/cons_tres, CR_Core, CPUs=max(nproc,4) and
#   SlurmdParameters=config_overrides   a 2-core CI box accepts 4 one-CPU tasks
#   MpiDefault=pmi2                     srun runs a PMI server (PMI-2, and the
#                                       PMI-1 wire protocol); the ranks of the
#                                       mpich wheel (5.0.2 tested) join one
#                                       COMM_WORLD through it. --mpi=none would
#                                       give n singletons.
#   JobRequeue=1                        batch jobs may be requeued; there is no
#                                       RequeueExit: jobs/run.sbatch requeues
#                                       itself, as it must on real clusters
#   AuthInfo=cred_expire=5              a requeued job may start again after
#                                       6 s instead of the default 121 s (5 is
#                                       the least slurmctld accepts; it is also
#                                       how long a step credential is valid:
#                                       ample on localhost), and
#   SchedulerParameters=sched_interval=1 is started within a second of that
#
#   cgroup.conf: CgroupPlugin=cgroup/v1, CgroupAutomount=no
#                                       slurmd 22.05 initialises a cgroup plugin
#                                       even when nothing uses it; autodetection
#                                       fails without a (complete) cgroup mount
#
# Environment: QMLHFL_SLURM_DIR (default /tmp/qmlhfl-slurm) holds the config,
# state, spool, logs and pid files; the config is also installed as
# /etc/slurm/slurm.conf and /etc/slurm/cgroup.conf (never over files this script
# did not write) so the client commands find it. Installs the Debian packages
# only if missing.
# Exits non-zero with a message naming the log to read if anything fails.
set -euo pipefail

T0=$(date +%s.%N)
DIR=${QMLHFL_SLURM_DIR:-/tmp/qmlhfl-slurm}
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
ETC_CGROUP=/etc/slurm/cgroup.conf
MARK="# qmlhfl-mpi test cluster (tests/slurm/start_slurm.sh)"

die() { echo "start_slurm.sh: error: $*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
ours() { [ -f "$1" ] && head -n1 "$1" | grep -qF "$MARK"; }
alive() {  # $1 pid file, $2 daemon name
  local pid
  pid=$(cat "$1" 2>/dev/null || true)
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
cluster_ok() {  # our daemons run, the controller answers and the node is usable
  # (the controller notices a dead slurmd only minutes later: check the pids)
  alive "$DIR/slurmctld.pid" slurmctld && alive "$DIR/slurmd.pid" slurmd || return 1
  scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  case "$(sinfo -h -N -o %t 2>/dev/null | head -n1)" in
    idle*|mix*|alloc*|comp*) return 0 ;; *) return 1 ;;
  esac
}
stop_pidfile() {  # $1 pid file, $2 daemon name: stop only what this script started
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null || true)
  # a stale pid file may name a reused pid: only signal the daemon it was for
  if alive "$f" "$2"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

[ "$(id -u)" -eq 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"

# --- packages ---------------------------------------------------------------------
need=()
command -v munged    >/dev/null 2>&1 || need+=(munge)
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd    >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch    >/dev/null 2>&1 || need+=(slurm-client)
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them"
  echo "start_slurm.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q "${need[@]}"; } >"/tmp/qmlhfl-slurm-apt.log" 2>&1 \
    || die "apt-get install ${need[*]} failed (see /tmp/qmlhfl-slurm-apt.log)"
fi

# --- configuration ------------------------------------------------------------------
mkdir -p "$DIR"/{state,spool,log}
chmod 755 "$DIR"
HOST=$(hostname -s)
NCPU=$(nproc)
CPUS=$(( NCPU > 4 ? NCPU : 4 ))   # oversubscribe small CI boxes: 4 single-CPU tasks
cat > "$CONF.new" <<CONF
$MARK
ClusterName=qmlhfl
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=pmi2
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=15
InactiveLimit=0
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
# slurmd 22.05 always initialises a cgroup plugin, and the autodetected one
# fails where no cgroup hierarchy is mounted (or only part of one, as in many
# containers). cgroup/v1 without automount initialises without touching
# /sys/fs/cgroup, and nothing here uses it (proctrack/linuxproc, task/none).
printf '%s\nCgroupPlugin=cgroup/v1\nCgroupAutomount=no\n' "$MARK" > "$DIR/cgroup.conf.new"
for f in "$ETC_CONF" "$ETC_CGROUP"; do
  if [ -e "$f" ] && ! ours "$f"; then
    rm -f "$CONF.new" "$DIR/cgroup.conf.new"
    die "$f exists and was not written by this script; refusing to replace it"
  fi
done
if cmp -s "$CONF.new" "$ETC_CONF" && cmp -s "$DIR/cgroup.conf.new" "$ETC_CGROUP" && cluster_ok; then
  rm -f "$CONF.new" "$DIR/cgroup.conf.new"
  echo "start_slurm.sh: cluster already up, configuration unchanged ($(elapsed) s)"
  exit 0
fi
mv "$CONF.new" "$CONF"
mv "$DIR/cgroup.conf.new" "$DIR/cgroup.conf"
mkdir -p /etc/slurm
cp "$CONF" "$ETC_CONF"
cp "$DIR/cgroup.conf" "$ETC_CGROUP"

# --- munge ----------------------------------------------------------------------------
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  # munged will not run as root without --force; run it as its own user.
  if command -v runuser >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --log-file=/var/log/munge/munged.log \
      || die "munged failed to start: see /var/log/munge/munged.log"
  else
    /usr/sbin/munged --force || die "munged failed to start: see /var/log/munge/munged.log"
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munge does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm daemons ---------------------------------------------------------------------
stop_pidfile "$DIR/slurmd.pid" slurmd
stop_pidfile "$DIR/slurmctld.pid" slurmctld
# Keep saved state (jobs survive a restart for a config change); -i: ignore
# errors reading it, e.g. after a change of node name.
/usr/sbin/slurmctld -i -f "$ETC_CONF" || die "slurmctld failed to start: see $DIR/log/slurmctld.log"
/usr/sbin/slurmd -f "$ETC_CONF" || die "slurmd failed to start: see $DIR/log/slurmd.log"

for _ in $(seq 300); do cluster_ok && break; sleep 0.1; done
if ! cluster_ok; then   # a node left DOWN by an earlier run: resume it once
  scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
  for _ in $(seq 100); do cluster_ok && break; sleep 0.1; done
fi
if ! cluster_ok; then
  { echo "--- scontrol ping / sinfo ---"; scontrol ping || true; sinfo -N -l || true
    echo "--- tail $DIR/log/slurmctld.log ---"; tail -n 20 "$DIR/log/slurmctld.log" || true
    echo "--- tail $DIR/log/slurmd.log ---"; tail -n 20 "$DIR/log/slurmd.log" || true; } >&2
  die "cluster did not come up within 40 s (logs in $DIR/log)"
fi
echo "start_slurm.sh: cluster up: node $HOST, $CPUS CPUs, partition debug, config $ETC_CONF, logs $DIR/log ($(elapsed) s)"
