"""Markdown table of 04_quantization results (results.jsonl files under a directory) for BENCHMARKS.md."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: str) -> None:
    rows = [json.loads(line) for path in sorted(Path(root).glob("*/results.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]
    reference = next((r.get("samples_per_second") for r in rows if r["config"] == "fp16:"), None)
    print("| configuration | status | samples/s | vs fp16 | first call s (compile) | warm first call s | peak GiB | "
          "PSNR vs fp16 dB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sps = r.get("samples_per_second")
        peak = r.get("peak_gpu_memory_bytes")
        psnr = (r.get("guard") or {}).get("mean_psnr_db")
        print(f"| `{r['config']}` | {r['status']} | {sps if sps is not None else '-'} | "
              f"{f'{sps / reference:.2f}x' if sps and reference else '-'} | {r.get('first_call_seconds', '-')} | "
              f"{r.get('warm_first_call_seconds', '-')} | {f'{peak / 2**30:.1f}' if peak else '-'} | "
              f"{f'{psnr:.1f}' if psnr is not None else '-'} | {r.get('error') or r.get('warm_start_error') or ''} |")


if __name__ == "__main__":
    main(sys.argv[1])
