"""Save the last TensorBoard picture of every ``startwell/...`` image tag of a run as a PNG file (the pictures in docs/
come from a quickstart run exported with this).

    startwell fit --config examples/configs/quickstart.yaml
    python examples/export_pictures.py lightning_logs/version_0 docs/pictures
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def export(log_dir: Path, out_dir: Path) -> list[Path]:
    """Write ``<tag with / as _>.png`` for the last picture of each ``startwell/`` tag under ``log_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(event_file), size_guidance={"images": 0})
        events.Reload()
        for tag in events.Tags()["images"]:
            if tag.startswith("startwell/"):
                path = out_dir / (tag.removeprefix("startwell/").replace("/", "_") + ".png")
                path.write_bytes(events.Images(tag)[-1].encoded_image_string)  # PNG as TensorBoard stores it
                written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path, help="a run's log directory (holds events.out.tfevents.* files)")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    for path in export(args.log_dir, args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
