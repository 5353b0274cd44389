#!/usr/bin/env bash
#SBATCH --job-name=brainage-participant
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=brainage-participant-%A_%a.out
#
# brainage participant level as a SLURM job array, one participant per array task.
#
#   n=$(bin/slurm_participant_array.sh --count BIDS_DIR)
#   jid=$(sbatch --parsable --array=1-"$n" bin/slurm_participant_array.sh BIDS_DIR OUT_DIR [OPTION...])
#   sbatch --dependency=afterany:"$jid" bin/slurm_group.sh BIDS_DIR OUT_DIR [GROUP OPTION...]
#
# Task N (1-based) processes the N-th participant of the list, and every task has its own work dir.
# Every OPTION goes to `brainage participant`, after the defaults, so an OPTION overrides a
# default of the same name. The defaults are -w WORK_ROOT/sub-<label>,
# --nprocs/--omp-nthreads $SLURM_CPUS_PER_TASK and --mem from the job's memory.
# Each task writes brainage's exit code (see `brainage --help`) to
# OUT_DIR/logs/slurm/sub-<label>.exitcode and exits with it. slurm_group.sh tabulates the exit
# codes and then runs the group level.
#
# Environment:
#   BRAINAGE_CMD           how to call brainage (default: brainage). For a container, e.g.
#                          "apptainer run --cleanenv -B /data -B /scratch brainage.sif". Words are
#                          split on blanks, and paths must be the same inside and outside.
#   BRAINAGE_PARTICIPANTS  a file with one participant label per line ('sub-' optional,
#                          '#' comments). Default: the participant_id column of
#                          BIDS_DIR/participants.tsv, or the sub-* folders when it is missing.
#   BRAINAGE_WORK_ROOT     parent of the per-participant work dirs (default: $SLURM_TMPDIR when
#                          set, that is node-local scratch without resume; otherwise ./work).
#                          A shared folder lets a rerun resume.
#
# Exit codes: brainage's own code, or 64 for a usage error of this script (missing
# arguments, no participant for this task).
set -uo pipefail

die() { echo "slurm_participant_array: $*" >&2; exit 64; }

list_participants() {  # the participant labels (no 'sub-'), one per line, in task order
    local bids_dir=$1
    if [[ -n ${BRAINAGE_PARTICIPANTS:-} ]]; then
        [[ -r $BRAINAGE_PARTICIPANTS ]] || die "BRAINAGE_PARTICIPANTS=$BRAINAGE_PARTICIPANTS is not a readable file"
        sed -e 's/#.*//' -e 's/[[:space:]]//g' -e 's/^sub-//' "$BRAINAGE_PARTICIPANTS" | { grep -v '^$' || true; }
    elif [[ -f $bids_dir/participants.tsv ]]; then
        awk -F'\t' 'NR == 1 { for (i = 1; i <= NF; i++) { sub(/\r$/, "", $i); if ($i == "participant_id") col = i }
                              if (!col) { print "participants.tsv has no participant_id column" > "/dev/stderr"; exit 65 }
                              next }
                    { sub(/\r$/, "") } $col != "" { sub(/^sub-/, "", $col); print $col }' \
            "$bids_dir/participants.tsv"
    elif [[ -d $bids_dir ]]; then
        find "$bids_dir" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' | sed 's|.*/sub-||' | LC_ALL=C sort
    else
        die "$bids_dir does not exist; give an existing BIDS dataset or set BRAINAGE_PARTICIPANTS"
    fi
}

if [[ ${1:-} == --count ]]; then
    [[ $# -eq 2 ]] || die "usage: $0 --count BIDS_DIR"
    labels=$(list_participants "$2") || exit $?
    [[ -n $labels ]] || die "no participants listed (BIDS_DIR $2, BRAINAGE_PARTICIPANTS=${BRAINAGE_PARTICIPANTS:-})"
    grep -c . <<<"$labels"
    exit 0
fi
[[ $# -ge 2 ]] || die "usage: sbatch --array=1-N $0 BIDS_DIR OUT_DIR [brainage option...]"
bids_dir=$1 out_dir=$2
shift 2
task=${SLURM_ARRAY_TASK_ID:-}
[[ $task =~ ^[0-9]+$ && $task -ge 1 ]] || die "SLURM_ARRAY_TASK_ID='$task': submit with sbatch --array=1-N (1-based)"

labels=$(list_participants "$bids_dir") || exit $?
[[ -n $labels ]] || die "no participants listed (BIDS_DIR $bids_dir, BRAINAGE_PARTICIPANTS=${BRAINAGE_PARTICIPANTS:-})"
label=$(sed -n "${task}p" <<<"$labels")
[[ -n $label ]] || die "array task $task has no participant: the list has $(grep -c . <<<"$labels") (submit --array=1-N with N from --count)"

read -ra cmd <<<"${BRAINAGE_CMD:-brainage}"
work_root=${BRAINAGE_WORK_ROOT:-${SLURM_TMPDIR:-$PWD/work}}
cpus=${SLURM_CPUS_PER_TASK:-1}
defaults=(-w "$work_root/sub-$label" --nprocs "$cpus" --omp-nthreads "$cpus")
if [[ -n ${SLURM_MEM_PER_NODE:-} ]]; then
    defaults+=(--mem "${SLURM_MEM_PER_NODE}M")
elif [[ -n ${SLURM_MEM_PER_CPU:-} ]]; then
    defaults+=(--mem "$((SLURM_MEM_PER_CPU * cpus))M")
fi

log_dir=$out_dir/logs/slurm
mkdir -p "$log_dir" || exit 73
record=$log_dir/sub-$label.exitcode
rm -f "$record"  # a rerun killed before it ends must not leave the previous run's code behind
args=("$bids_dir" "$out_dir" participant --participant-label "$label" "${defaults[@]}" "$@")
echo "brainage array task $task (job ${SLURM_ARRAY_JOB_ID:-?}) on $(hostname): sub-$label" >&2
echo "running: ${cmd[*]} ${args[*]}" >&2

# brainage runs in the background. Bash then ignores TERM/INT, so it outlives the job's SIGTERM
# (scancel, time limit) to record the code. brainage gets the signal from SLURM itself, keeps
# what it finished and exits 130. The trap comes after the fork, so brainage does not
# inherit it.
"${cmd[@]}" "${args[@]}" &
child=$!
trap '' TERM INT
wait "$child"
code=$?

printf '%s\n' "$code" >"$record.$$" && mv -f "$record.$$" "$record"
echo "sub-$label: brainage exited $code (recorded in $record)" >&2
exit "$code"
