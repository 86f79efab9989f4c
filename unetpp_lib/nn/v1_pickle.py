"""Reading nnU-Net v1's pickles safely: its plans and checkpoint `.pkl` files, and its `.model` checkpoints.

The `.pkl` files go through `restricted_load`, which builds numpy arrays and scalars, OrderedDicts and
plain Python values only and refuses any other class or function before anything is built; the
checkpoint through torch.load(weights_only=True) with numpy's scalar and array reconstructors allowed.
"""
from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ImportV1Error(ValueError):
    """A fork fold folder the importer cannot take: one line naming the file and the fix."""


class UnsafePickleError(ImportV1Error, pickle.UnpicklingError):
    """A pickle that asks for a class or function outside the allow-list; refused before it is built."""


NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x writes the first, numpy 2 the second
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own array reconstructor, whatever module this numpy keeps it in
_SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar reconstructor (np.float64, np.int64, np.bool_ ...)
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5's array reconstructor (numpy.core.numeric._frombuffer)


def _ndarray(subtype, shape, dtype):
    """numpy's `_reconstruct`, for plain ndarrays only (a subclass would bring its own code)."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"array of type {subtype!r} refused: only numpy.ndarray is allowed")
    return _RECONSTRUCT(subtype, shape, dtype)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles (torch.save's) spell bytes: latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} refused: pickles spell bytes in latin-1")
    return text.encode("latin1")


# What nnU-Net v1 writes into plans.pkl and <checkpoint>.model.pkl (read off real files with pickletools):
# OrderedDicts, numpy arrays (shapes, spacings) and numpy scalars (np.float64 intensities, np.int64 axes, np.bool_),
# and plain values that pickle spells with opcodes of its own (dict, list, tuple, str, int, float, bool, None, bytes).
# Protocols 2 and 3 (Python <= 3.7 wrote 3) spell a few plain types by name instead: those are allowed too.
PLAIN = {"set": set, "frozenset": frozenset, "complex": complex, "bytes": bytes}
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    **{(m, n): t for m in ("builtins", "__builtin__") for n, t in PLAIN.items()},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
    **{(m, "_reconstruct"): _ndarray for m in NUMPY_CORE},
    **{(m, "scalar"): _SCALAR for m in NUMPY_CORE},
    **{(m, "_frombuffer"): _FROMBUFFER for m in ("numpy.core.numeric", "numpy._core.numeric")},
}


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names of ALLOWED; anything else stops the load at its name."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        """The allowed object for `module.name`, or UnsafePickleError (nothing is imported or called)."""
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused: the pickle asks for {module}.{name}, which a v1 plans or checkpoint .pkl "
                f"never holds (allowed: numpy arrays and scalars, OrderedDict, plain values); the file is not "
                f"nnU-Net v1's or was altered: do not load it, copy the file again from the machine that trained "
                f"the model") from None

    def persistent_load(self, pid):
        """v1's .pkl files have no persistent ids (torch's storages live in .model, not here)."""
        raise UnsafePickleError(f"{self.source}: refused: persistent id {pid!r} (not a v1 .pkl)")


def _short(err: BaseException) -> str:
    """The first sentence of an error message (torch's and pickle's run on for lines)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0][:200]


def restricted_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle `data` with the allow-list; UnsafePickleError for any other global, ImportV1Error if damaged."""
    try:
        return _AllowListUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError as e:  # the reconstructors' refusals do not know the file: name it
        if str(e).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: refused: {e}; the file is not nnU-Net v1's or was altered") from None
    except Exception as e:  # a truncated or garbled pickle raises many kinds
        raise ImportV1Error(f"{source}: not a readable pickle ({type(e).__name__}: {_short(e)}); copy the file "
                            f"again") from None


def restricted_load(path: str | Path) -> Any:
    """`restricted_loads` of a file."""
    return restricted_loads(Path(path).read_bytes(), str(path))


def torch_safe_globals() -> list:
    """What torch.load(weights_only=True) must also accept in a v1 checkpoint: numpy scalars in `plot_stuff`
    (the losses of every epoch), under numpy 1's and numpy 2's names, and the dtype classes they build."""
    named = [(obj, f"{m}.{n}") for (m, n), obj in ALLOWED.items() if m in NUMPY_CORE]
    dtypes = sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}, key=str)  # bool, integers, floats, complex
    return [*named, np.ndarray, np.dtype, *dtypes]


def load_v1_checkpoint(path: Path) -> dict:
    """A v1 checkpoint dict (epoch, state_dict, ...), read with weights_only=True: tensors and the allowed numpy
    values only."""
    try:
        with torch.serialization.safe_globals(torch_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's refusal; its advice to allow-list the global is not ours to give
        name = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"but got (<[^>]*>)", str(e))
        what = f"it asks for {name.group(1)}" if name else _short(e)
        raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): {what}, and a v1 checkpoint holds "
                                f"tensors, numpy scalars and plain values only; the file is not nnU-Net v1's or was "
                                f"altered: copy it again from the machine that trained the model") from None
    except Exception as e:  # a truncated zip or legacy file raises many kinds
        raise ImportV1Error(f"{path}: unreadable checkpoint ({type(e).__name__}: {_short(e)}); copy the file "
                            f"again") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ImportV1Error(f"{path}: not an nnU-Net v1 checkpoint (no state_dict); pass the fold folder that holds "
                            f"model_final_checkpoint.model")
    return ckpt
