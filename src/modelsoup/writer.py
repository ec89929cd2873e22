"""Write named tensors to a checkpoint, streaming piece by piece; it knows no soup.

The output format follows the path (:func:`modelsoup.formats.dispatch.output_format`):

- ``*.safetensors``: one safetensors file (streamed: memory holds one piece);
- ``*.pt``, ``*.pth``, ``*.bin``, ``*.ckpt``: a torch pickle (needs the whole state in
  memory); a ``.ckpt`` given a Lightning layout is written the way Lightning saves it;
- anything else: a Hugging Face style folder, ``model.safetensors`` or shards of at most
  ``max_shard_size`` bytes with ``model.safetensors.index.json``; the non-weight files of
  ``copy_from`` (config, tokenizer) are copied in.

A *sidecar* text (the soup card) travels with the weights as one unit: inside a folder
output (``soup_card.json``), or beside a single file (``<out>.json``), renamed into
place before the weights, so weights never stand beside a sidecar that is not theirs.
Every file appears only when complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from modelsoup._util import parse_size, remove_path, temp_sibling, write_error
from modelsoup._util import progress as stage_progress
from modelsoup.errors import WriteError
from modelsoup.formats.base import TensorMeta
from modelsoup.formats.dispatch import output_format
from modelsoup.formats.hf_folder import FOLDER_CARD, write_folder
from modelsoup.formats.safetensors_io import write_safetensors
from modelsoup.formats.torch_pickle import LightningLayout, write_torch

_logger = logging.getLogger(__name__)

Pieces = Callable[[str], torch.Tensor | Iterable[torch.Tensor]]


def sidecar_path(out: Path) -> Path:
    """Where the sidecar (soup card) of ``out`` goes: inside a folder, beside a file.

    Example:
        >>> sidecar_path(Path("soups/greedy.safetensors")), sidecar_path(Path("soups/greedy"))
        (PosixPath('soups/greedy.safetensors.json'), PosixPath('soups/greedy/soup_card.json'))
    """
    if output_format(out) == "folder":
        return out / FOLDER_CARD
    return out.with_name(out.name + ".json")


def write_tensors(
    out: str | Path,
    layout: Mapping[str, TensorMeta],
    pieces: Pieces,
    *,
    sidecar: str | Callable[[], str] | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str = "5GB",
    copy_from: Path | None = None,
    torch_dtype: torch.dtype | None = None,
    lightning: LightningLayout | None = None,
    progress: bool = True,
) -> Path:
    """Stream the tensors of ``layout`` to ``out``, each made by ``pieces(name)``.

    With ``lightning`` (the first ingredient's layout), a ``.ckpt`` output is written
    in Lightning's layout, so ``LightningModule.load_from_checkpoint`` reads it; other
    outputs ignore it.

    ``pieces(name)`` returns the tensor, or flat pieces of it in row-major order
    (see :meth:`modelsoup.soup.Soup.pieces`). ``sidecar`` is the text, or a function
    called once the tensors are written (a soup card can then use the hashes the
    reads computed).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> lay = {"w": TensorMeta((2,), torch.float32)}
        >>> _ = write_tensors(out, lay, lambda n: torch.ones(2), sidecar="{}", progress=False)
        >>> sorted(p.name for p in out.parent.iterdir())
        ['w.safetensors', 'w.safetensors.json']
    """
    out = Path(out)
    fmt = output_format(out)
    shard = parse_size(max_shard_size)
    bar = stage_progress(
        total=len(layout), desc=f"writing {out.name}", unit="tensor", enabled=progress
    )
    meta = {"format": "pt", **(metadata or {})}
    try:
        if fmt == "folder":
            extra = {FOLDER_CARD: sidecar} if sidecar is not None else None
            try:
                write_folder(
                    out,
                    layout,
                    pieces,
                    max_shard_size=shard,
                    copy_from=copy_from,
                    metadata=meta,
                    on_tensor=lambda n: bar.update(),
                    torch_dtype=torch_dtype,
                    extra_files=extra,
                )
            except WriteError as err:  # name the output, not the folder it is staged in
                staged = str(temp_sibling(out))
                raise WriteError(str(err).replace(staged, str(out))) from err.__cause__
            except OSError as err:  # a full disk while copying or writing the card
                raise write_error(out, err) from err
            return out
        staged = temp_sibling(out)
        try:
            if fmt == "safetensors":
                write_safetensors(staged, layout, pieces, meta, on_tensor=lambda n: bar.update())
            else:
                state = {}
                for name, m in layout.items():
                    state[name] = _whole(pieces(name), m)
                    bar.update()
                wrap = lightning if out.name.lower().endswith(".ckpt") else None
                write_torch(staged, state, lightning=wrap)
            _publish(staged, out, sidecar)
        except WriteError as err:  # name the output, not its hidden temporary
            raise WriteError(str(err).replace(str(staged), str(out))) from err.__cause__
        finally:
            remove_path(staged)
    finally:
        bar.close()
    return out


def _whole(made: torch.Tensor | Iterable[torch.Tensor], meta: TensorMeta) -> torch.Tensor:
    if isinstance(made, torch.Tensor):
        return made
    flat = [p.reshape(-1).clone() for p in made]  # pieces share buffers: copy each
    if not flat:
        return torch.empty(meta.shape, dtype=meta.dtype)
    return torch.cat(flat).reshape(meta.shape)


def _publish(staged: Path, out: Path, sidecar: str | Callable[[], str] | None) -> None:
    """Rename a complete single-file output into place with its sidecar.

    Order matters for a crash at any step: the new sidecar is complete on disk first
    (a full disk stops here, and the old output stands as it was), then the old output
    goes, then the new sidecar appears, then the new weights. Whatever stands at
    ``out`` is never beside a sidecar of another output.
    """
    card = sidecar_path(out)
    card_tmp = temp_sibling(card)
    try:
        if sidecar is not None:
            text = sidecar() if callable(sidecar) else sidecar
            try:
                with open(card_tmp, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as err:
                raise write_error(card, err) from err
            out.unlink(missing_ok=True)
            os.replace(card_tmp, card)
        os.replace(staged, out)
    except OSError as err:
        raise write_error(out, err) from err
    finally:
        remove_path(card_tmp)
