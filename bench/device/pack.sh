# usage: bash bench/device/pack.sh WORK OUT: the arms' folders (a finished arm without its last.pt, an unfinished
# one with it, to resume), logs and status, as gzip parts of at most 15 MiB (the device returns 16 MiB a file)
W=$1; O=$2
list=$(mktemp)
for arm in "$W"/*/*/; do
  arm=${arm%/}
  if [ -f "$arm/seconds.json" ] || [ -f "$arm/arm.json" ]; then
    find "$arm" -type f ! -name last.pt ! -name '*.lock' >> "$list"
  else
    find "$arm" -type f ! -name '*.lock' >> "$list"
  fi
done
find "$W/logs" "$W/status.tsv" -type f 2>/dev/null >> "$list"
rm -f "$O"/arms.tgz.part*
tar czf - -T "$list" | split -b 15m -d - "$O/arms.tgz.part"
rm -f "$list"; ls -la "$O"
