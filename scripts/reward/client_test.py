"""A reward-service client written the way Cosmos-RL's clients are (requests +
numpy), checking jpeg-compressibility scores against PIL.

Pings, enqueues an image batch and a video batch, polls the pulls, and checks
every score against PIL's `Image.save(buf, format="JPEG", quality=95)` sizes
(videos: the mean over frames). Exits non-zero on any mismatch.

Usage: client_test.py --url http://127.0.0.1:8080 [--token T]
Run by reward-service/tests/python_client.rs.
"""

import argparse
import io
import json
import sys
import time

import numpy as np
import requests
from PIL import Image

API_PING = "/api/reward/ping"
API_ENQUEUE = "/api/reward/enqueue"
API_PULL = "/api/reward/pull"


def log(msg: str) -> None:
    print(f"[client_test] {msg}", flush=True)


def headers(token, replica_id=None, extra=None):
    h = {}
    if token:
        h["Authorization"] = f"Bearer {token}"
    if replica_id:
        h["X-Lepton-Replica-Target"] = replica_id
    if extra:
        h.update(extra)
    return h


def jpeg_kb(image: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.tell() / 1000


def test_images(rng, n, h, w):
    """Smooth gradients plus noise of varying strength, so sizes differ per item."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        noise = rng.normal(0, 8 * (i + 1), size=(h, w, 3))
        out[i] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return out


def enqueue(url, token, data, arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    payload = json.dumps(data).encode("utf-8") + b"\n" + buf.getvalue()
    r = requests.post(
        url + API_ENQUEUE,
        data=payload,
        headers=headers(token, extra={"Content-Type": "application/octet-stream"}),
        timeout=30,
    )
    assert r.status_code == 200, f"enqueue: {r.status_code} {r.text}"
    body = r.json()
    return body["uuid"], body.get("replica_id")


def pull(url, token, uuid, replica_id, reward, deadline_s=60.0):
    start = time.time()
    while True:
        r = requests.post(
            url + API_PULL,
            data={"uuid": uuid, "type": reward},
            headers=headers(token, replica_id),
            timeout=10,
        )
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 400, f"pull: {r.status_code} {r.text}"
        assert r.json()["message"] == f"Not found scores for {uuid}", r.text
        assert time.time() - start < deadline_s, f"no scores for {uuid} after {deadline_s}s"
        time.sleep(0.05)


def check_close(name, got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    # Sizes are whole bytes / 1000: the same encoder gives the same float.
    assert np.allclose(got, want, rtol=0, atol=1e-12), f"{name}: {got} != {want}"
    log(f"{name}: {got.tolist()} matches PIL")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", default=None)
    args = ap.parse_args()
    url, token = args.url.rstrip("/"), args.token
    rng = np.random.default_rng(0)
    rewards = {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}

    r = requests.post(url + API_PING, data={"info_data": json.dumps({"hello": 1})}, headers=headers(token), timeout=10)
    assert r.status_code == 200 and r.json() == {"message": "Ping request received"}, r.text
    log("ping ok")
    if token:
        r = requests.post(url + API_PING, data={"info_data": "{}"}, timeout=10)
        assert r.status_code == 401, f"ping without a token: {r.status_code}"
        log("ping without a token: 401")

    # Images [B, H, W, C].
    images = test_images(rng, 4, 96, 128)
    prompts = [f"prompt {i}" for i in range(len(images))]
    img_uuid, img_replica = enqueue(url, token, {"prompts": prompts, "reward_fn": rewards, "media_type": "image"}, images)
    log(f"enqueued images: {img_uuid}")

    # Videos [B, C, T, H, W].
    frames = test_images(rng, 2 * 3, 64, 80).reshape(2, 3, 64, 80, 3)  # B, T, H, W, C
    video = np.ascontiguousarray(frames.transpose(0, 4, 1, 2, 3))
    vid_uuid, vid_replica = enqueue(
        url,
        token,
        {
            "prompts": ["a video", "another video"],
            "reward_fn": {"jpeg_incompressibility": 1.0},
            "media_type": "video",
            "video_infos": [{"video_fps": 16.0}, {"video_fps": 16.0}],
        },
        video,
    )
    log(f"enqueued videos: {vid_uuid}")

    want_kb = [jpeg_kb(im) for im in images]
    res = pull(url, token, img_uuid, img_replica, "jpeg_compressibility")
    assert res["type"] == "jpeg_compressibility", res
    assert res["input_info"]["shape"] == [4, 96, 128, 3], res["input_info"]
    assert res["input_info"]["dtype"] == "torch.uint8", res["input_info"]
    assert res["input_info"]["min"] == f"{images.min():.3f}", res["input_info"]
    assert res["input_info"]["max"] == f"{images.max():.3f}", res["input_info"]
    assert set(res) >= {"scores", "input_info", "duration", "decoded_duration", "type"}, res
    check_close("jpeg_compressibility", res["scores"]["jpeg_compressibility"], [-kb / 500 for kb in want_kb])
    res = pull(url, token, img_uuid, img_replica, "jpeg_incompressibility")
    check_close("jpeg_incompressibility", res["scores"]["jpeg_incompressibility"], want_kb)

    want_video = [np.mean([jpeg_kb(frames[b, t]) for t in range(3)]) for b in range(2)]
    res = pull(url, token, vid_uuid, vid_replica, "jpeg_incompressibility")
    check_close("video jpeg_incompressibility", res["scores"]["jpeg_incompressibility"], want_video)
    log("all scores match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
