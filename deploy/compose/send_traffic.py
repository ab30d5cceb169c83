"""Send digits to the compose stack's server, optionally inverted (a drift the monitor catches) and with their
true labels (the feedback the loop retrains on). Standard library and Pillow only, so it runs inside the
stack's own containers, which can reach http://serve:8000 and hold the feedback token:

    docker compose exec -T loop python3 - --invert --feedback --count 300 < send_traffic.py

It reads the images that `docker compose run --rm train` ingested into the shared home volume
(<home>/sources/<dataset>/<class>/*.png), posts them to /predict as JSON (base64) in small batches, and with
--feedback posts each one's folder name as its true label to /feedback with VISIONLOOP_SERVE__FEEDBACK_TOKEN.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image, ImageOps


def post(url: str, body: dict, token: str = "") -> dict:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def encoded(path: Path, invert: bool) -> str:
    if not invert:
        return base64.b64encode(path.read_bytes()).decode()
    image = ImageOps.invert(Image.open(path).convert("L"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://serve:8000")
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("VISIONLOOP_HOME", "/var/lib/visionloop")))
    parser.add_argument("--count", type=int, default=200, help="images to send")
    parser.add_argument("--invert", action="store_true", help="invert every image (drift)")
    parser.add_argument("--feedback", action="store_true", help="send each image's true label to /feedback")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = sorted(args.home.glob("sources/*/*/*.png"))
    if not images:
        print(f"no images under {args.home}/sources: run `docker compose run --rm train` first", file=sys.stderr)
        return 2
    picked = random.Random(args.seed).choices(images, k=args.count)
    token = os.environ.get("VISIONLOOP_SERVE__FEEDBACK_TOKEN", "")
    sent = labelled = correct = 0
    for start in range(0, len(picked), args.batch):
        batch = picked[start : start + args.batch]
        answer = post(f"{args.server}/predict", {"images": [encoded(p, args.invert) for p in batch], "top_k": 1})
        sent += len(batch)
        for path, prediction in zip(batch, answer["predictions"], strict=True):
            if args.feedback:
                body = {"request_id": prediction["request_id"], "label": path.parent.name}
                correct += post(f"{args.server}/feedback", body, token)["correct"]
                labelled += 1
    version = answer["model"]["version"]
    summary = f"sent {sent} {'inverted ' if args.invert else ''}images to v{version}"
    if labelled:
        summary += f", {labelled} labels ({correct / labelled:.0%} of its answers right)"
    print(summary)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except urllib.error.HTTPError as exc:  # a 401 (wrong feedback token), 503 (no champion yet): say which
        sys.exit(f"{exc.url}: {exc.code} {exc.read().decode(errors='replace')}")
    except urllib.error.URLError as exc:
        sys.exit(f"cannot reach the server: {exc.reason}")
