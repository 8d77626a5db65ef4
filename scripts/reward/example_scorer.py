"""An example scorer for reward-service's `command` reward type.

Speaks the line protocol: one JSON request per line on stdin, one JSON answer
per line on stdout; exits when stdin closes. Scores each item by its mean
brightness in [0, 1] (`brightness`), and reports how many batches this process
has answered (`calls`, the same for every item), which shows it stays alive
between batches.

Configure it with:

    [[reward_args]]
    reward_type = "command"
    name = "brightness"
    command = ["python3", "scripts/reward/example_scorer.py"]

For tests: a prompt "crash" makes it exit without answering, a prompt "error"
makes it answer an error, and the extra `sleep_s` makes it sleep first.
"""

import json
import sys
import time

import numpy as np


def main() -> None:
    calls = 0
    for line in sys.stdin:
        req = json.loads(line)
        calls += 1
        # Anything on stdout that is not a JSON line is logged by the service.
        print(f"scoring batch {req['id']} of shape {req['shape']}", flush=True)
        if "crash" in req["prompts"]:
            sys.exit(3)
        if "error" in req["prompts"]:
            print(json.dumps({"id": req["id"], "error": "asked to fail"}), flush=True)
            continue
        time.sleep(float(req["extras"].get("sleep_s", 0)))
        arr = np.load(req["npy_path"], allow_pickle=False)
        per_item = arr.reshape(arr.shape[0], -1).astype(np.float64)
        brightness = (per_item.mean(axis=1) / 255.0).tolist()
        answer = {"id": req["id"], "scores": {"brightness": brightness, "calls": [calls] * arr.shape[0]}}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
