# The arms trained on the device, one process each, as NAME<TAB>ARGS lines for launch.sh. Each benchmark's
# arms share its folder WORK/<experiment>, as the comparison run here expects.
# usage: bash bench/device/arms.sh WORK DATA [extra args for every arm]
W=$1; D=$2; shift 2; X="$*"
A56="hesso-fisher-x16-rb tp-taylor gating-x16-rb gating-dynamic-x16-rb"  # one process per arm, all in --arms
A20="hesso-fisher-rb gating-rb gating-dynamic-rb gating-annealed-rb"
P56="bench/prune_vs_torch_pruning.py --model builtin:resnet56-cifar10 --epochs 30 --train-only --threads 1 --work $W/pvt56 --data-root $D --arms ${A56// /,}"
P20="bench/prune_vs_torch_pruning.py --model builtin:resnet20-cifar10 --epochs 30 --train-only --threads 1 --work $W/pvt20 --data-root $D --arms ${A20// /,}"
S56="bench/gating_scratch.py --arch resnet56 --macs 0.5 --epochs 30 --train-only --threads 1 --work $W/scratch56 --data-root $D"
KD="bench/distill.py --teacher builtin:resnet56-cifar10 --epochs 30 --tag 30ep --threads 1 --work $W/distill30 --data-root $D"
for a in $A56; do printf '%s\t%s\n' "pvt56-$a" "$P56 --only $a $X"; done
for a in dense gating; do printf '%s\t%s\n' "scratch56-$a" "$S56 --arms $a $X"; done
for a in alone kd; do printf '%s\t%s\n' "distill30-$a" "$KD --arms $a $X"; done
for a in $A20; do printf '%s\t%s\n' "pvt20-$a" "$P20 --only $a $X"; done
