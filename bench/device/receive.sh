# Here: unpack what a device call returned (its files_at folder) into wip/device/ (WORK's layout kept).
# usage: bash bench/device/receive.sh FILES_AT [DEST]
set -euo pipefail
src=$1; dest=${2:-wip/device}
mkdir -p "$dest"
cat "$src"/arms.tgz.part* | tar xzf - -C "$dest" --strip-components=2
cat "$dest/status.tsv"
