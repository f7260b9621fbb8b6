# Device side: every arm at once, each logging to WORK/logs/NAME.log; packed into OUT every 2 minutes and at the
# end; after SECONDS the unfinished are stopped (each resumes from its last finished epoch). SECONDS must leave
# a minute of the call's timeout for the last packing.
# usage: [ONLY=REGEX] bash bench/device/launch.sh WORK DATA SECONDS OUT [extra args for every arm]
# (ONLY: the arms whose names match, e.g. ONLY='^pvt56-')
W=$1; D=$2; T=$3; O=$4; shift 4
here=$(dirname "$0")
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # cifarpress is not installed on the device: the repo is
mkdir -p "$W/logs" "$W/pvt56/tp-taylor"
[ -f .device-data/B/tp-taylor-resnet56.pt ] && cp -n .device-data/B/tp-taylor-resnet56.pt "$W/pvt56/tp-taylor/pruned-before-finetune.pt"
nvidia-smi > "$W/logs/nvidia-smi.txt" 2>&1
declare -A pids rcs
while IFS=$'\t' read -r name args; do
  PYTHONUNBUFFERED=1 python3 $args > "$W/logs/$name.log" 2>&1 &
  pids[$name]=$!
done < <(bash "$here/arms.sh" "$W" "$D" "$@" | grep -E "^(${ONLY:-.})")
end=$((SECONDS + T)); next_pack=$((SECONDS + 120))
status() {
  : > "$W/status.tsv"
  for n in "${!pids[@]}"; do
    if [ -n "${rcs[$n]:-}" ]; then st="rc=${rcs[$n]}"  # reaped at an earlier call: a second wait says 127
    elif kill -0 ${pids[$n]} 2>/dev/null; then st=running
    else wait ${pids[$n]}; rcs[$n]=$?; st="rc=${rcs[$n]}"; fi
    printf '%s\t%s\t%s\n' "$n" "$st" "$(grep -ao 'epoch [0-9]*/[0-9]*' "$W/logs/$n.log" | tail -1)" >> "$W/status.tsv"
  done
}
while [ $SECONDS -lt $end ]; do
  alive=0; for n in "${!pids[@]}"; do kill -0 ${pids[$n]} 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  if [ $SECONDS -ge $next_pack ]; then status; bash "$here/pack.sh" "$W" "$O" > /dev/null; next_pack=$((SECONDS + 120)); fi
  sleep 5
done
for n in "${!pids[@]}"; do kill ${pids[$n]} 2>/dev/null; done
sleep 3; status; bash "$here/pack.sh" "$W" "$O"; sort "$W/status.tsv"
