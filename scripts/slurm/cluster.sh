#!/usr/bin/env bash
# A one-node SLURM cluster on localhost (munge, MariaDB + slurmdbd for accounting, slurmctld,
# slurmd), started as root without systemd, for trying sweeps locally and for the `slurm` tests.
#
#   bash scripts/slurm/cluster.sh start    # install Debian packages if missing, configure, start (idempotent)
#   bash scripts/slurm/cluster.sh start --fresh  # the same, then cancel every job left from earlier runs (CI)
#   bash scripts/slurm/cluster.sh stop     # stop the daemons it started, by the PIDs in their pidfiles
#   bash scripts/slurm/cluster.sh status
#
# Why accounting: without slurmdbd, `sacct` fails, and submitit cannot learn the fate of a job
# that died without writing its result (scancel, node failure); a multirun then waits forever.
# Why --fresh: slurmctld keeps its jobs across restarts (StateSaveLocation). A test run stopped
# midway leaves its jobs there; restarted, they hold the node and every new job pends behind them.
# Why DefMemPerCPU: a job that asks for no memory would otherwise reserve the whole node, and
# jobs would run one at a time. No cgroups here: jobs are not pinned to cores, so the training
# code sets torch threads from SLURM_CPUS_PER_TASK.
# Why cred_expire=30: a requeued job waits this long before it may start again (default 120 s,
# most of what the requeue tests took); 30 s still leaves a step's launch time to spare.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
NODE="$(hostname -s)"
DB_PASS="${SLURM_DB_PASS:-trainsae}"
LOG_DIR=/var/log/slurm
say() { echo "[cluster $(date +%T)] $*"; }

# alive PIDFILE COMM: the pidfile names a live process with that name. A SIGKILLed daemon can
# linger as a zombie for seconds, and `kill -0` succeeds on zombies, so read /proc instead.
alive() {
  local pid
  [[ -s "$1" ]] || return 1
  pid="$( { tr -dc '0-9' < "$1"; } 2>/dev/null)"  # the daemon may delete its pidfile meanwhile
  [[ -n "$pid" && -r /proc/$pid/stat ]] || return 1
  [[ "$(cat /proc/$pid/comm 2>/dev/null)" == "$2" ]] || return 1
  [[ "$(awk '{print $3}' /proc/$pid/stat)" != Z ]]
}

wait_until() {  # wait_until SECONDS WHAT CMD...
  local deadline=$((SECONDS + $1)) what="$2"; shift 2
  until timeout 5 "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { say "timed out waiting for $what"; return 1; }
    sleep 0.5
  done
}

stop_daemon() {  # stop_daemon PIDFILE COMM
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  local pid; pid="$(tr -dc '0-9' < "$1")"
  say "stopping $2 ($pid)"; kill "$pid" || true
  for _ in $(seq 40); do alive "$1" "$2" || break; sleep 0.25; done
  alive "$1" "$2" && kill -9 "$pid" || true
  rm -f "$1"
}

DAEMONS=("/run/slurmd.pid slurmd" "/run/slurmctld.pid slurmctld" "/run/slurmdbd.pid slurmdbd"
         "/run/mysqld/mysqld.pid mariadbd" "/run/munge/munged.pid munged")

FRESH=0
[[ "${2:-}" == "--fresh" ]] && FRESH=1
[[ -z "${2:-}" || "$FRESH" == 1 ]] || { echo "usage: $0 start [--fresh] | stop | status" >&2; exit 2; }

case "${1:-start}" in
  stop) for d in "${DAEMONS[@]}"; do stop_daemon $d; done; exit 0 ;;
  status) for d in "${DAEMONS[@]}"; do set -- $d; alive "$1" "$2" && echo "$2 up" || echo "$2 down"; done
          sinfo 2>/dev/null || true; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start [--fresh] | stop | status" >&2; exit 2 ;;
esac

[[ $EUID -eq 0 ]] || { echo "cluster.sh must run as root (it installs packages and starts daemons)" >&2; exit 1; }

# 1. packages
need=()
for pkg in munge slurmctld slurmd slurm-client slurmdbd mariadb-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  say "installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. the node name must resolve
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts

# 3. munge (authentication between the daemons)
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
alive /run/munge/munged.pid munged || { rm -f /run/munge/munged.pid; runuser -u munge -- /usr/sbin/munged --force; }
wait_until 20 munge bash -c 'munge -n | unmunge'

# 4. slurm.conf for this one node (rewritten only when it changes, which restarts the daemons)
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOG_DIR"
mem_mb=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') * 85 / 100 ))
cat > /etc/slurm/slurm.conf.new <<CONF
# written by train-SAE scripts/slurm/cluster.sh
ClusterName=trainsae
SlurmctldHost=$NODE
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=30
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$NODE CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
changed=0
if ! cmp -s /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; then
  mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; changed=1
else
  rm /etc/slurm/slurm.conf.new
fi

# 5. accounting: MariaDB + slurmdbd, so that sacct works
install -d -o mysql -g mysql /run/mysqld
[[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
if ! alive /run/mysqld/mysqld.pid mariadbd; then
  # fully detached, every fd redirected: an inherited stdout would keep a CI log pipe open forever
  (cd / && setsid -f /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      </dev/null >"$LOG_DIR/mariadbd.out" 2>&1)
fi
wait_until 60 mariadb mariadb-admin ping
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf  # slurmdbd refuses a readable one
alive /run/slurmdbd.pid slurmdbd || { rm -f /run/slurmdbd.pid; /usr/sbin/slurmdbd; }
wait_until 60 slurmdbd sacctmgr -n show cluster

# 6. controller and node daemon
if ((changed)); then stop_daemon /run/slurmctld.pid slurmctld; stop_daemon /run/slurmd.pid slurmd; fi
alive /run/slurmctld.pid slurmctld || { rm -f /run/slurmctld.pid; /usr/sbin/slurmctld; }
wait_until 30 slurmctld scontrol ping
alive /run/slurmd.pid slurmd || { rm -f /run/slurmd.pid; /usr/sbin/slurmd; }
node_ready() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
if ! wait_until 30 "node $NODE" bash -c "$(declare -f node_ready); NODE=$NODE node_ready"; then
  scontrol update NodeName="$NODE" State=RESUME || true
  wait_until 30 "node $NODE after resume" bash -c "$(declare -f node_ready); NODE=$NODE node_ready"
fi

# 7. --fresh: no job left from an earlier run (a recovered one may hold the node for good)
if ((FRESH)) && [[ -n "$(squeue -h -o %i)" ]]; then
  say "cancelling jobs left from earlier runs: $(squeue -h -o %i | tr '\n' ' ')"
  squeue -h -o %i | xargs -r scancel
  wait_until 90 "the queue to empty" bash -c '[[ -z $(squeue -h) ]]'
fi

# 8. smoke test: one job runs and is accounted for
out="$(mktemp)"
job=$(sbatch --parsable -o "$out" --wrap hostname)
if ! wait_until 60 "smoke job $job" bash -c "[[ -z \$(squeue -h -j $job) ]]"; then
  say "the queue (jobs left from an earlier run? try: $0 start --fresh):"; squeue >&2; exit 1
fi
[[ "$(cat "$out")" == "$(hostname)" ]] || { say "smoke job $job failed: $(cat "$out")"; exit 1; }
rm -f "$out"
wait_until 30 "sacct record of $job" bash -c "sacct -n -X -j $job -o State | grep -q COMPLETED"
say "SLURM up on $NODE ($(nproc) CPUs, ${mem_mb} MB); smoke job $job completed"
