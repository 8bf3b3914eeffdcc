"""torchvision -> kure_jax conversion against torchvision itself (needs torch: `make test-torch`).

Each architecture is a torchvision model with random weights and random BatchNorm running
statistics (nothing downloaded); its eval-mode logits are the reference for the converted kure_jax
model's on the same input, read three ways: the in-memory state dict, a .safetensors file and a
.pth file. The command line runs once end to end, and its checkpoint is read back by
``restore_for_eval`` (what train.py's ``init_from`` and eval.py use).
"""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # collected only by `make test-torch` (see pyproject.toml)
torchvision = pytest.importorskip("torchvision")
from safetensors.torch import save_file  # noqa: E402

from kure_jax.models import get_model  # noqa: E402
from kure_jax.models.convert import convert_state_dict, load_state_dict  # noqa: E402
from kure_jax.training import restore_for_eval  # noqa: E402

ARCHS = ("resnet18", "resnet50", "mobilenet_v2")
SIZE = 64  # small images keep each forward pass well under a second; the maths is size-free
RTOL = 1e-4  # float32; relative to the largest logit (logits near 0 make per-entry ratios noisy)


def _random_torchvision(arch, seed):
    """A torchvision model in eval mode with random weights and random BN running statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                # Fresh BN stats (mean 0, var 1) and affine (1, 0) would hide a mix-up of them.
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def reference(request):
    """(arch, torchvision model, NCHW input, torchvision logits)."""
    arch = request.param
    model = _random_torchvision(arch, seed=ARCHS.index(arch))
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images).numpy()
    return arch, model, images, logits


def _kure_logits(arch, variables, images):
    model = get_model(arch, num_classes=variables["params"]["head"]["bias"].shape[0])
    nhwc = images.numpy().transpose(0, 2, 3, 1)
    return np.asarray(model.apply(variables, nhwc, train=False))


def _assert_close(got, want):
    assert got.shape == want.shape
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < RTOL, f"max |diff| / max |logit| = {error:.2e}"


def _state_dict_from(source, model, tmp_path):
    if source == "memory":
        return {k: v.numpy() for k, v in model.state_dict().items()}
    if source == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(model.state_dict(), str(path))
    else:
        path = tmp_path / "weights.pth"
        torch.save(model.state_dict(), path)
    return load_state_dict(path)


@pytest.mark.parametrize("source", ["memory", "safetensors", "pth"])
def test_converted_logits_match_torchvision(reference, source, tmp_path):
    arch, model, images, want = reference
    variables = convert_state_dict(arch, _state_dict_from(source, model, tmp_path))
    _assert_close(_kure_logits(arch, variables, images), want)


def test_a_state_dict_of_another_arch_is_refused(reference):
    arch, model, _, _ = reference
    other = "resnet50" if arch != "resnet50" else "resnet18"
    with pytest.raises(ValueError, match=rf"does not match torchvision {other}\b.*'"):
        convert_state_dict(other, {k: v.numpy() for k, v in model.state_dict().items()})


def test_cli_end_to_end(tmp_path):
    model = _random_torchvision("resnet18", seed=3)
    weights = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "kure_jax.models.convert", "--arch", "resnet18",
         "--weights", str(weights), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "11,689,512 params" in result.stdout and "--config.init_from=" in result.stdout
    config, kure_model, variables = restore_for_eval(out)
    assert (config.model, config.num_classes, config.qat.enabled) == ("resnet18", 1000, False)
    assert config.pretrained.source == str(weights)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(images).numpy()
    got = np.asarray(kure_model.apply(variables, images.numpy().transpose(0, 2, 3, 1),
                                      train=False))
    _assert_close(got, want)
    again = subprocess.run(
        [sys.executable, "-m", "kure_jax.models.convert", "--arch", "resnet18",
         "--weights", str(weights), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: ") and "already" in again.stderr
