#!/usr/bin/env bash
# start.sh DIR [CONF]: a single-host SLURM (munged, slurmctld, slurmd) for the launch tests, with
# state, spool, logs and pid files under DIR. CONF is slurm.conf (one node, default) or
# slurm-2nodes.conf (n1 and n2: two slurmd on this host). Needs root and
# apt-get install -y slurmctld slurmd slurm-client munge (.ci/run installs them).
# Prints the SLURM_CONF to export; stop.sh DIR stops it.
set -euo pipefail
DIR="$(mkdir -p "$1" && cd "$1" && pwd)"
SRC="${2:-$(dirname "${BASH_SOURCE[0]}")/slurm.conf}"
HOST="$(hostname)"
CONF="$DIR/slurm.conf"
sed -e "s#@DIR@#$DIR#g" -e "s#@HOST@#$HOST#g" "$SRC" > "$CONF"
mkdir -p "$DIR/state" "$DIR/log"
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
[ -S /run/munge/munge.socket.2 ] || runuser -u munge -- /usr/sbin/munged
export SLURM_CONF="$CONF"
slurmctld -f "$CONF"
nodes=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF")
for n in $nodes; do
  mkdir -p "$DIR/spool/$n"
  if [ "$n" = "$HOST" ]; then slurmd -f "$CONF"; else slurmd -f "$CONF" -N "$n"; fi
done
for _ in $(seq 1 150); do
  idle=$(sinfo -h -o %T 2>/dev/null | grep -c idle || true)
  [ "$idle" -ge 1 ] && [ -z "$(sinfo -h -o %T | grep -v idle)" ] && { echo "export SLURM_CONF=$CONF"; exit 0; }
  sleep 0.2
done
echo "slurm did not come up; see $DIR/log" >&2; exit 1
