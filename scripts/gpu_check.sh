#!/usr/bin/env bash
# GPU check for kaio on a fresh NVIDIA machine. One command, from the repository root:
#
#     bash scripts/gpu_check.sh
#
# 1. installs kaio into /tmp/kaio-venv (pip pulls a CUDA build of torch),
# 2. prints `kaio gpus --json`,
# 3. runs the short GPU training `kaio run configs/gpu_check.yaml --plain` while an
#    independent kaio poller samples the GPUs at 10 Hz (it reads no journal internals),
# 4. compares: which metrics the device gave, counter energy vs integrated power, the
#    callback's per-step peak VRAM vs the device's VRAM in use, the achieved poll interval,
#    `kaio plan`'s VRAM estimate (before the run) and the report's (for what ran) vs the true peak,
#    and the run's MFU.
#
# Everything goes to stdout, and to $OUT/gpu-check.txt when $OUT is set.
# docs/gpu-check.md explains where its output is recorded.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=/tmp/kaio-venv
CONFIG=${GPU_CHECK_CONFIG:-configs/gpu_check.yaml}  # another config only to try the script without a GPU
HISTORY=docs/reports/gpu-check/history.json
WORK=$(mktemp -d /tmp/kaio-gpu-check.XXXXXX)

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu-check.txt") 2>&1
fi

section() { printf '\n=== %s ===\n' "$*"; }

if [[ -n "${KAIO_GPU_CHECK_NO_INSTALL:-}" ]]; then
  # An offline machine whose python3 already has the dependencies: use this checkout as it is.
  section "using this checkout with $(command -v python3) (no install)"
  PY=python3
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  section "install kaio into $VENV"
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e .
  PY="$VENV/bin/python"
fi
KAIO=("$PY" -m kaio)
"$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU available:", torch.cuda.is_available())'
nvidia-smi --query-gpu=index,name,driver_version,power.draw,memory.used --format=csv || true

section "kaio gpus --json"
"${KAIO[@]}" gpus --json | tee "$WORK/gpus.json"

section "kaio plan $CONFIG (the VRAM estimate before the run)"
"${KAIO[@]}" plan "$CONFIG" || echo "kaio plan failed"
"${KAIO[@]}" plan "$CONFIG" --json > "$WORK/plan.json" 2>/dev/null || true

section "kaio run configs/gpu_check.yaml --plain (with an independent 10 Hz poller)"
# The independent poller runs until $WORK/stop appears (or 5 minutes pass).
"$PY" - "$WORK" <<'PY' &
import json
import pathlib
import sys
import time

from kaio.devices.detect import detect
from kaio.devices.energy import trapezoid_energy_j
from kaio.devices.poller import Poller

work = pathlib.Path(sys.argv[1])
found = detect("auto")
samples = {}


def keep(tick):
    for sample in tick.gpus:
        samples.setdefault(sample.key, []).append(sample)


poller = Poller(found.backends, hz=10, on_tick=keep)
devices = list(poller.devices)
poller.start()
deadline = time.monotonic() + 300
while not (work / "stop").exists() and time.monotonic() < deadline:
    time.sleep(0.2)
poller.stop()

report = {"notes": found.notes, "stats": poller.stats(), "devices": []}
fields = ("util_pct", "vram_used_bytes", "run_vram_bytes", "power_w", "temp_c", "temp_junction_c",
          "energy_counter_j", "sm_clock_mhz", "mem_clock_mhz", "throttle")
for device in devices:
    rows = samples.get(device.key, [])
    counted = [s for s in rows if s.energy_counter_j is not None]
    window = [s for s in rows if counted and counted[0].t_mono <= s.t_mono <= counted[-1].t_mono]
    throttles = sorted({reason for s in rows for reason in (s.throttle or ())})
    report["devices"].append({
        "key": device.key,
        "name": device.name,
        "power_kind": device.power_kind,
        "samples": len(rows),
        "metrics_seen": [f for f in fields if any(getattr(s, f) is not None for s in rows)],
        "window_s": counted[-1].t_mono - counted[0].t_mono if counted else None,
        "counter_energy_j": counted[-1].energy_counter_j - counted[0].energy_counter_j if counted else None,
        "integrated_energy_j": trapezoid_energy_j([s.t_mono for s in window], [s.power_w for s in window]),
        "poller_energy_j": rows[-1].energy_j if rows else None,
        "poller_energy_method": rows[-1].energy_method if rows else None,
        "power_w_max": max((s.power_w for s in rows if s.power_w is not None), default=None),
        "vram_used_max_bytes": max((s.vram_used_bytes for s in rows if s.vram_used_bytes is not None), default=None),
        "throttle_reasons_seen": throttles,
    })
(work / "poller.json").write_text(json.dumps(report, indent=1))
PY
POLLER_PID=$!
sleep 3  # let the poller check the energy counter before the load starts
set +e
rm -rf docs/reports/gpu-check checkpoints/gpu-check
timeout 240 "${KAIO[@]}" run "$CONFIG" --plain
RUN_STATUS=$?
set -e
touch "$WORK/stop"
wait "$POLLER_PID" || echo "the independent poller failed (its traceback is above)"
echo "kaio run exit status: $RUN_STATUS"
"${KAIO[@]}" report gpu-check --json > "$WORK/summary.json" 2>/dev/null || true

section "comparison"
"$PY" - "$WORK" "$HISTORY" <<'PY'
import json
import pathlib
import sys

work, history_path = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
poller_file = work / "poller.json"
poller = json.loads(poller_file.read_text()) if poller_file.exists() else {
    "devices": [], "stats": {}, "notes": ["the independent poller produced no result"]}


def gb(value):
    return f"{value / 1e9:.3f} GB" if isinstance(value, (int, float)) else "n/a"


def num(value, unit="", digits=1):
    return f"{value:.{digits}f}{unit}" if isinstance(value, (int, float)) else "n/a"


print("Independent poller (10 Hz):")
for device in poller["devices"]:
    print(f"  {device['key']} {device['name']} ({device['samples']} samples, power {device['power_kind']})")
    print(f"    metrics the device gave: {', '.join(device['metrics_seen']) or 'none'}")
    counter, integrated = device["counter_energy_j"], device["integrated_energy_j"]
    ratio = counter / integrated if counter is not None and integrated else None
    print(f"    energy over {num(device['window_s'], ' s')}: counter {num(counter, ' J')}, "
          f"integrated power {num(integrated, ' J')}, counter/integrated {num(ratio, '', 3)}")
    print(f"    poller's choice: {num(device['poller_energy_j'], ' J')} by {device['poller_energy_method']}")
    print(f"    peak power {num(device['power_w_max'], ' W')}, peak VRAM in use {gb(device['vram_used_max_bytes'])}, "
          f"throttle reasons seen: {', '.join(device['throttle_reasons_seen']) or 'none'}")
stats = poller["stats"]
print(f"  achieved interval {num(stats.get('mean_interval_s'), ' s', 4)} (target 0.1 s), "
      f"lateness p99 {num(stats.get('lateness_p99_s'), ' s', 4)}, max {num(stats.get('lateness_max_s'), ' s', 4)}, "
      f"skipped ticks {stats.get('skipped_ticks')}, energy fallbacks {stats.get('energy_fallbacks') or 'none'}")
for note in poller["notes"]:
    print(f"  note: {note}")

print(f"\n{history_path}:")
if not history_path.exists():
    print("  missing: the run did not write its history")
    sys.exit(0)
history = json.loads(history_path.read_text())
telemetry = history.get("telemetry") or {}
print(f"  status {history.get('status')}, {len(history.get('steps') or [])} steps")
poll = telemetry.get("poll") or {}  # history.json schema 2 (docs/history-schema.md)
print(f"  poll interval mean {num(poll.get('mean_interval_s'), ' s', 4)} at {telemetry.get('poll_hz')} Hz, "
      f"lateness p99 {num(poll.get('lateness_p99_s'), ' s', 4)}")
for device in history.get("devices") or []:
    info = device.get("info") or {}
    print(f"  device {device.get('key')} {info.get('name')}: in_run={info.get('in_run')}, "
          f"power {info.get('power_kind')}, energy {num(device.get('energy_j'), ' J')} by {device.get('energy_method')}")

print("\n  per step: callback peak VRAM (max over ranks) vs device VRAM in use (max over the step's samples)")
print(f"  {'step':>5} {'peak allocated':>16} {'device used':>14} {'device - peak':>14}")
steps = history.get("steps") or []
shown = steps if len(steps) <= 12 else steps[:6] + steps[-6:]
for step in shown:
    peaks = [v for v in (step.get("peak_vram_bytes") or {}).values() if isinstance(v, (int, float))]
    used = [g.get("vram_used_max_bytes") for g in (step.get("gpus") or {}).values()]
    used = [v for v in used if isinstance(v, (int, float))]
    peak, device_used = (max(peaks) if peaks else None), (max(used) if used else None)
    gap = device_used - peak if peak is not None and device_used is not None else None
    print(f"  {step.get('step'):>5} {gb(peak):>16} {gb(device_used):>14} {gb(gap):>14}")
print("  (device use includes the CUDA context and the allocator's cache, so it should exceed the peak allocated)")

print("\n  VRAM estimate (kaio/record/memory.py) vs the measured true peak; MFU")
summary_file = work / "summary.json"
summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
plan_file = work / "plan.json"
try:
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else {}
except ValueError:
    plan = {}
true_peak = summary.get("vram_true_peak_bytes")
model = plan.get("model") or {}
chosen = "with" if model.get("gradient_checkpointing") else "without"
planned = ((model.get("estimates") or {}).get(f"{chosen}_gradient_checkpointing") or {}).get("total_bytes")
for label, estimate in (("kaio plan (before the run)", planned), ("report (for what ran)", summary.get("vram_estimate_bytes"))):
    error = 100 * (estimate - true_peak) / true_peak if estimate and true_peak else None
    print(f"  {label:<28} {gb(estimate):>12} vs true peak {gb(true_peak)}: {num(error, ' %', 0)}")
print(f"  terms: {summary.get('vram_estimate_terms')}")
print(f"  tokens/s per device {num(summary.get('tokens_per_s_per_device'), '', 0)}, "
      f"MFU {num(100 * summary['mfu'] if summary.get('mfu') is not None else None, ' %', 1)}")
PY
