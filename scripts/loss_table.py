"""Render the README's loss table from the JSON files ``vitrine train --json`` wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

KS = (1, 10, 20, 30, 40)


def main(paths: list[str]) -> None:
    print("| loss | " + " | ".join(f"R@{k}" for k in KS) + " | MAP@R | train img/s | minutes |")
    print("|---" * (len(KS) + 4) + "|")
    for path in paths:
        m = json.loads(Path(path).read_text())
        recalls = " | ".join(f"{100 * m[f'recall@{k}']:.1f}" for k in KS)
        speed = m["train"]["train_images_per_second"]
        print(
            f"| {m['loss']} | {recalls} | {100 * m['map@r']:.1f} | {speed:.1f} | "
            f"{m['total_minutes']:.1f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
