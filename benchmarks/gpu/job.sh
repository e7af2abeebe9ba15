# Sourced by the device scripts: a job that outlives one call (a call ends within 10 minutes,
# the machine stays while held).  job_start SCRIPT runs `bash SCRIPT job` in a new session and
# waits; job_wait N waits up to N s for it, copies its log and report-*.txt to $OUT and shows
# the log's tail.  JOB (a folder) and LOG (its name under $OUT) are the caller's.
job_start() {
  mkdir -p "$JOB"
  setsid nohup bash "$1" job > "$JOB/log" 2>&1 < /dev/null &
  job_wait "${2:-540}"
}

job_wait() {
  for _ in $(seq "${1:-540}"); do [ -e "$JOB/done" ] && break; sleep 1; done
  cp "$JOB/log" "${OUT:-/tmp}/$LOG" 2>/dev/null; cp "$JOB"/report-*.txt "${OUT:-/tmp}/" 2>/dev/null
  tail -c 9000 "$JOB/log"
  if [ -e "$JOB/done" ]; then echo "JOB DONE: $(cat "$JOB/done")"; else echo "JOB STILL RUNNING"; fi
}
