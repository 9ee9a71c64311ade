# Helpers for launch/slurm.sbatch, sourced (not run). Kept apart so tests can call them alone.

# The first host of a slurm node list, e.g. "gpu-[003-010,012],cpu1" -> "gpu-003". Uses
# `scontrol show hostnames` where it exists (it knows every syntax slurm accepts); otherwise parses
# the common forms: comma-separated entries, each "prefix[ranges]suffix" with one or more bracket
# groups ("rack[1-2]-n[5-6]" -> "rack1-n5"), zero padding kept.
first_host() {
  local nodelist=$1 host
  if [ -z "$nodelist" ]; then
    echo "first_host: empty node list (SLURM_JOB_NODELIST is not set; run inside a slurm job)" >&2
    return 1
  fi
  if command -v scontrol >/dev/null 2>&1; then
    host=$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1)
    if [ -n "$host" ]; then
      echo "$host"
      return 0
    fi
  fi
  # first top-level entry: up to the first comma outside brackets
  local entry="" depth=0 ch i
  for ((i = 0; i < ${#nodelist}; i++)); do
    ch=${nodelist:i:1}
    case $ch in
      "[") depth=$((depth + 1)) ;;
      "]") depth=$((depth - 1)) ;;
      ",") [ "$depth" -eq 0 ] && break ;;
    esac
    entry+=$ch
  done
  # every bracket group -> its first number (kept as written, so zero padding survives)
  host=$(printf '%s' "$entry" | sed -E 's/\[([0-9]+)[^]]*\]/\1/g')
  case $host in
    *"["* | *"]"* | "")
      echo "first_host: cannot parse node list '$nodelist'; install scontrol or set MASTER_ADDR" >&2
      return 1
      ;;
  esac
  echo "$host"
}

# Whether the Hydra overrides set train.run_dir (as key=value, +key=value or ++key=value).
overrides_set_run_dir() {
  local arg
  for arg in "$@"; do
    case $arg in
      train.run_dir=* | +train.run_dir=* | ++train.run_dir=*) return 0 ;;
    esac
  done
  return 1
}

# Reject arguments that are not Hydra overrides (key=value, +key=value, ++key=value, ~key, or a
# group choice like parallel=tp2), naming the first bad one and the fix.
check_overrides() {
  local arg
  for arg in "$@"; do
    case $arg in
      -*)
        echo "error: '$arg' is not a Hydra override: every argument is passed to deltatron.train" \
          "as key=value; launcher settings are environment variables (see the launch script's" \
          "header), and sbatch options go before the script: sbatch [options] launch/slurm.sbatch" >&2
        return 2
        ;;
      *=* | "~"*) ;;
      *)
        echo "error: '$arg' is not a Hydra override (expected key=value, e.g. train.steps=100)" >&2
        return 2
        ;;
    esac
  done
}
