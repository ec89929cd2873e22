"""Torch pickles: no payload ever runs, and tensors a soup cannot average are refused.

A pickle may hold anything torch's safe unpickler can rebuild; these cases are all
allowed objects (or payloads the safe list stops), none of them a state dict of dense,
real, named tensors with values.
"""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
from refusal import refused

from conftest import tiny_state


class _Payload:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint asks to run."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "exec": _Payload(exec, code),
        "eval": _Payload(eval, code),
        "os.system": _Payload(os.system, f"touch {marker}"),
        "open": _Payload(open, str(marker), "w"),
    }


@pytest.mark.parametrize("how", ["zip", "legacy", "raw-pickle", "inside-state-dict"])
@pytest.mark.parametrize("payload", ["exec", "eval", "os.system", "open"])
def test_no_payload_runs(tmp_path, capsys, how, payload):
    marker = tmp_path / "marker"
    evil = _payloads(marker)[payload]
    good = tmp_path / "good.pt"
    torch.save(tiny_state(0), good)
    bad = tmp_path / "bad.pt"
    if how == "zip":
        torch.save(evil, bad)
    elif how == "legacy":
        torch.save(evil, bad, _use_new_zipfile_serialization=False)
    elif how == "raw-pickle":
        bad.write_bytes(pickle.dumps(evil))
    else:
        torch.save({**tiny_state(1), "extra": evil}, bad)
    assert not marker.exists()
    line = refused(capsys, tmp_path, good, bad)
    assert not marker.exists(), "the payload ran"
    assert str(bad) in line


def _sparse():
    return torch.eye(3).to_sparse()


def _csr():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.eye(3).to_sparse_csr()


def _nested():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are a prototype"
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


def _quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "quantize_per_tensor is deprecated"
        return torch.quantize_per_tensor(torch.ones(16, 8), 0.1, 0, torch.qint8)


BAD_ENTRIES = {
    # case: (make the state dict from a good one, what the error must say)
    "meta": (lambda sd: {**sd, "fc1.weight": torch.empty(16, 8, device="meta")}, "meta tensor"),
    "sparse-coo": (lambda sd: {**sd, "fc1.weight": _sparse()}, "sparse_coo"),
    "sparse-csr": (lambda sd: {**sd, "fc1.weight": _csr()}, "sparse_csr"),
    "nested": (lambda sd: {**sd, "fc1.weight": _nested()}, "nested tensor"),
    "complex": (
        lambda sd: {**sd, "fc1.weight": sd["fc1.weight"].to(torch.complex64)},
        "complex64",
    ),
    "quantized": (lambda sd: {**sd, "fc1.weight": _quantized()}, "qint8"),
    "integer-key": (lambda sd: {**sd, 3: torch.ones(1)}, "key 3"),
    "tuple-key": (lambda sd: {**sd, ("fc1", "weight"): torch.ones(1)}, "key ('fc1', 'weight')"),
    "integer-key-wrapped": (lambda sd: {"state_dict": {**sd, 0: torch.ones(1)}}, "key 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_tensors_we_cannot_average_are_refused(tmp_path, capsys, case):
    make, says = BAD_ENTRIES[case]
    good = tmp_path / "good.pt"
    torch.save(tiny_state(0), good)
    bad = tmp_path / "bad.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(make(tiny_state(1)), bad)
    line = refused(capsys, tmp_path, good, bad)
    assert str(bad) in line and says in line


def test_meta_tensors_alone_are_refused_not_averaged_as_zeros(tmp_path, capsys):
    # the case that used to exit 0: two all-meta checkpoints made an all-zero soup
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"meta{i}.pt")
        meta = {k: torch.empty_like(v, device="meta") for k, v in tiny_state(i).items()}
        torch.save(meta, paths[-1])
    assert "meta tensor" in refused(capsys, tmp_path, *paths)
