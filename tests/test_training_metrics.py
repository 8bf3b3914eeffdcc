"""MetricsWriter: metrics.jsonl records and the TensorBoard event file (read back here)."""

import json
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from kure_jax.training.metrics import MetricsWriter


def read_scalars(path):
    """``{tag: [(step, value)]}`` from a TFRecord file of Event protos (format read by hand)."""
    scalars = {}
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + length]  # Skip the length's CRC; the payload's follows.
        pos += 12 + length + 4
        event = event_pb2.Event.FromString(payload)
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write("train", 10, {"loss": np.float32(1.25), "kurtosis": {"conv1": 2.5, "head": 3.0},
                               "images": np.zeros(3)})  # Arrays: JSON only, not scalars.
    writer.write("eval", 20, {"accuracy": 0.75})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "train" and records[0]["step"] == 10
    assert records[0]["loss"] == 1.25 and records[0]["kurtosis"] == {"conv1": 2.5, "head": 3.0}
    assert records[1] == {"kind": "eval", "step": 20, "accuracy": 0.75}
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert read_scalars(events) == {
        "train/loss": [(10, 1.25)], "train/kurtosis/conv1": [(10, 2.5)],
        "train/kurtosis/head": [(10, 3.0)], "eval/accuracy": [(20, 0.75)],
    }


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.write("train", 1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()
