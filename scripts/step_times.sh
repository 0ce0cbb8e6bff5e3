#!/usr/bin/env bash
# Sourced by run_main.sh and gpu_check.sh: the wall time and CPU time of each step, one TSV row per step.
#   step_times_start FILE      write the header unless FILE has rows already (a resumed job appends)
#   step_time_begin            before a step
#   step_time_end FILE NAME    after it: NAME, wall_s, cpu_user_s, cpu_sys_s
# CPU time is `times` of this shell: the user and sys time of the children it has waited for, grandchildren
# included. It is read here, in the calling shell, because a subshell's `times` starts again from 0.

step_times_start() {
  [ -s "$1" ] || printf 'step\twall_s\tcpu_user_s\tcpu_sys_s\n' > "$1"
}

_step_clock() {  # NAME: set NAME to "<epoch seconds> <children's user> <children's sys>" (times' 'XmY.Zs' form)
  local tmp line
  tmp="$(mktemp)"
  times > "$tmp"
  { read -r _; read -r line; } < "$tmp"
  rm -f "$tmp"
  printf -v "$1" '%s %s' "$EPOCHREALTIME" "$line"
}

step_time_begin() { _step_clock _step_t0; }

step_time_end() {
  local t1
  _step_clock t1
  awk -v name="$2" -v a="$_step_t0" -v b="$t1" '
    function s(x, p) { split(x, p, /[ms]/); return p[1] * 60 + p[2] }  # 1m2.500s -> 62.5
    BEGIN {
      gsub(",", ".", a); gsub(",", ".", b)  # a locale with a decimal comma
      split(a, A, " "); split(b, B, " ")
      printf "%s\t%.1f\t%.1f\t%.1f\n", name, B[1] - A[1], s(B[2]) - s(A[2]), s(B[3]) - s(A[3])
    }' >> "$1"
}
