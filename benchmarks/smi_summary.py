"""Summary per GPU of an nvidia-smi log taken while a run lasted (BENCHMARKS.md, session 16, two H200s):
  nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
      --format=csv,noheader,nounits -lms 1000 > smi.csv
Only samples drawing more than MIN_W watts count (the GPU at work, not idle before or after). Run anywhere:
  python3 benchmarks/smi_summary.py SMI_CSV [MIN_W]    (default 400)
"""
import collections
import csv
import statistics
import sys

SW_POWER_CAP = 0x4  # the clock-event reason bit (sccsdxl.power.SW_POWER_CAP)


def summarize(path: str, min_watts: float) -> dict[str, dict]:
    """GPU index -> samples, SM clock mean/min/max, power mean/max, largest temperature, power-capped samples."""
    busy = collections.defaultdict(list)
    with open(path) as fh:
        for _, index, mhz, watts, celsius, reasons in csv.reader(fh, skipinitialspace=True):
            if float(watts) > min_watts:
                busy[index].append((float(mhz), float(watts), float(celsius), int(reasons, 16)))
    return {index: {"samples": len(rows), "sm_mhz_mean": round(statistics.mean(r[0] for r in rows)),
                    "sm_mhz_min": min(r[0] for r in rows), "sm_mhz_max": max(r[0] for r in rows),
                    "power_w_mean": round(statistics.mean(r[1] for r in rows)), "power_w_max": max(r[1] for r in rows),
                    "temperature_c_max": max(r[2] for r in rows),
                    "power_capped": sum(1 for r in rows if r[3] & SW_POWER_CAP)}
            for index, rows in sorted(busy.items())}


def main() -> None:
    gpus = summarize(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 400.0)
    print("| GPU | samples | SM MHz mean (min-max) | W mean (max) | °C max | power-capped samples |")
    print("|---|---|---|---|---|---|")
    for index, g in gpus.items():
        print(f"| {index} | {g['samples']} | {g['sm_mhz_mean']} ({g['sm_mhz_min']:.0f}-{g['sm_mhz_max']:.0f}) | "
              f"{g['power_w_mean']} ({g['power_w_max']:.0f}) | {g['temperature_c_max']:.0f} | {g['power_capped']} |")


if __name__ == "__main__":
    main()
