"""The compiled live pass (`engine.compiled`): the same outputs as the eager pass, and a fallback."""

from __future__ import annotations

import contextlib
import shutil

import torch

from umvd_live.engine.compiled import CompiledPass
from umvd_live.engine.model import build_model


def _window(net, batch: int = 1, size: int = 32):
    torch.manual_seed(1)
    frames = [torch.rand(batch, 1, size, size) for _ in range(net.spec.window)]
    with torch.inference_mode():
        feats = [net.features(f) for f in frames]
    return feats, torch.rand(batch, len(net.spec.context), 1, size, size)


def test_compiled_pass_equals_the_eager_pass_and_follows_new_weights():
    net = build_model("lite").eval()
    net.requires_grad_(False)
    feats, context = _window(net)
    compiled = CompiledPass(net.denoise_features, enabled=True)
    compiled.start(lambda: (feats, context), contextlib.nullcontext)
    assert compiled.wait(timeout=600)
    # Where inductor cannot build (no C++ compiler), the eager pass answers: same checks, either way.
    has_compiler = any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "cl"))
    assert compiled.state == ("ready" if has_compiler else "failed") or compiled.state == "ready", compiled.error
    with torch.inference_mode():
        assert torch.allclose(compiled(feats, context), net.denoise_features(feats, context), atol=1e-5)
        # weights are updated in place during a stream: the compiled graph must read the new ones
        net.load_state_dict({k: v * 1.1 for k, v in net.state_dict().items()})
        assert torch.allclose(compiled(feats, context), net.denoise_features(feats, context), atol=1e-5)
        # a batch of several windows goes through the eager pass (compiled for one window only)
        feats2, context2 = _window(net, batch=2)
        assert torch.equal(compiled(feats2, context2), net.denoise_features(feats2, context2))


def test_a_failed_build_leaves_the_eager_pass():
    calls = []

    def eager(feats, context):
        calls.append(len(feats))
        return feats[0]

    def broken_example():
        raise RuntimeError("no compiler here")

    compiled = CompiledPass(eager, enabled=True)
    compiled.start(broken_example, contextlib.nullcontext)
    assert compiled.wait(timeout=60) and compiled.state == "failed" and "no compiler" in compiled.error
    x = torch.ones(1, 2)
    assert compiled([x], None) is x and calls == [1]
    off = CompiledPass(eager, enabled=False)
    off.start(broken_example, contextlib.nullcontext)  # never builds
    assert off.state == "off" and off([x], None) is x
