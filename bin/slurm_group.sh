#!/usr/bin/env bash
#SBATCH --job-name=brainage-group
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=brainage-group-%j.out
#
# brainage group level after a participant job array (bin/slurm_participant_array.sh):
#
#   jid=$(sbatch --parsable --array=1-"$n" bin/slurm_participant_array.sh BIDS_DIR OUT_DIR ...)
#   sbatch --dependency=afterany:"$jid" bin/slurm_group.sh BIDS_DIR OUT_DIR [GROUP OPTION...]
#
# With afterany, the group job starts once every array task has ended, whether it succeeded or
# not. The script tabulates each participant's recorded exit code in
# OUT_DIR/logs/slurm/exitcodes.tsv (participant_id, exit_code, status). A task that recorded
# nothing is 'missing': it never ran, or it was killed (out of memory, node failure). The
# failures are printed. Then the script runs
#   brainage BIDS_DIR OUT_DIR group --nprocs $SLURM_CPUS_PER_TASK [GROUP OPTION...]
# on the participants that produced outputs, and exits with its code.
#
# Environment:
#   BRAINAGE_CMD, BRAINAGE_PARTICIPANTS   as for slurm_participant_array.sh (use the same values)
#   BRAINAGE_REQUIRE_ALL=1                skip the group level (exit 1) unless every
#                                         participant exited 0
set -uo pipefail

die() { echo "slurm_group: $*" >&2; exit 64; }

list_participants() {  # the same list, in the same order, as slurm_participant_array.sh
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

[[ $# -ge 2 ]] || die "usage: sbatch --dependency=afterany:JOBID $0 BIDS_DIR OUT_DIR [brainage group option...]"
bids_dir=$1 out_dir=$2
shift 2
labels=$(list_participants "$bids_dir") || exit $?
[[ -n $labels ]] || die "no participants listed (BIDS_DIR $bids_dir, BRAINAGE_PARTICIPANTS=${BRAINAGE_PARTICIPANTS:-})"
log_dir=$out_dir/logs/slurm
mkdir -p "$log_dir" || exit 73

table=$log_dir/exitcodes.tsv
n_ok=0 n_failed=0 n_missing=0
{
    printf 'participant_id\texit_code\tstatus\n'
    while IFS= read -r label; do
        [[ -n $label ]] || continue
        code=$(head -n 1 "$log_dir/sub-$label.exitcode" 2>/dev/null | tr -d '[:space:]')
        if [[ ! $code =~ ^[0-9]+$ ]]; then
            printf 'sub-%s\tn/a\tmissing\n' "$label"
            echo "sub-$label: no exit code recorded (the task never ran, or it was killed)" >&2
            n_missing=$((n_missing + 1))
        elif [[ $code -eq 0 ]]; then
            printf 'sub-%s\t0\tsuccess\n' "$label"
            n_ok=$((n_ok + 1))
        else
            printf 'sub-%s\t%s\tfailed\n' "$label" "$code"
            echo "sub-$label: participant level exited $code (see brainage --help; log: the task's .out file)" >&2
            n_failed=$((n_failed + 1))
        fi
    done <<<"$labels"
} >"$table.$$"
mv -f "$table.$$" "$table"
echo "participant level: $n_ok succeeded, $n_failed failed, $n_missing missing (table: $table)" >&2

if [[ ${BRAINAGE_REQUIRE_ALL:-0} == 1 && $((n_failed + n_missing)) -gt 0 ]]; then
    echo "slurm_group: BRAINAGE_REQUIRE_ALL=1 and not every participant succeeded: group level not run" >&2
    exit 1
fi
read -ra cmd <<<"${BRAINAGE_CMD:-brainage}"
"${cmd[@]}" "$bids_dir" "$out_dir" group --nprocs "${SLURM_CPUS_PER_TASK:-1}" "$@"
